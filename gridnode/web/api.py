"""The API resource tree of a node (DESIGN.md, "HTTP API of a node")."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.resource import Resource
from twisted.web.server import Request

from gridnode.web.http import JSONRoot, json_body

if TYPE_CHECKING:
    from gridnode.node import Node


class HealthResource(Resource):
    """``GET /health``: 200 while serving, 503 while draining."""

    isLeaf = True

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        health = self.node.health()
        return json_body(request, health, 503 if health["state"] == "draining" else 200)


def api_root(node: Node) -> Resource:
    root = JSONRoot()
    root.putChild(b"health", HealthResource(node))
    return root
