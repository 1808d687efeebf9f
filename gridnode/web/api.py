"""The API resource tree of a node (docs/api.md, "Endpoints"). Who may reach which resource is
decided before it is reached, in one place: gridnode/web/access.py."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.static import File

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound
from gridnode.media.templates import Catalog
from gridnode.web.http import ErrorResource, JSONRoot, error_body, json_body
from gridnode.web.jobs import JobsResource, ResultsResource

if TYPE_CHECKING:
    from gridnode.web.view import NodeView


class HealthResource(Resource):
    """``GET /health``: 200 while serving, 503 while draining."""

    isLeaf = True

    def __init__(self, node: NodeView) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        health = self.node.health()
        return json_body(request, health, 503 if health["state"] == "draining" else 200)


class NodesListResource(Resource):
    """``GET /registry/nodes.json``: the live list as the registry holds it."""

    isLeaf = True

    def __init__(self, node: NodeView) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        key = keys.nodes_list(self.node.config.env, self.node.config.pool)

        def found(result: tuple[bytes, Any]) -> None:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(result[0])
            request.finish()

        def failed(f: Failure) -> None:
            error = f.value if isinstance(f.value, GridnodeError) else GridnodeError("cannot read the registry")
            if isinstance(error, NotFound):
                error = NotFound("no nodes.json yet: the pool's first heartbeat has not happened")
            request.write(error_body(request, error))
            request.finish()

        self.node.store.get_bytes(key, max_size=4 * 1024 * 1024).addCallbacks(found, failed)
        return NOT_DONE_YET


class PeersResource(Resource):
    """``GET /peers``: this node's membership view."""

    isLeaf = True

    def __init__(self, node: NodeView) -> None:
        super().__init__()
        self.node = node

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        m = self.node.membership
        if m is None:
            return json_body(request, {"node": self.node.node_id, "peers": [], "dropped": {}, "watching": [],
                                       "host_checks": {}})
        return json_body(request, {"node": self.node.node_id, "peers": m.peers(), "dropped": dict(m.dropped),
                                   "watching": sorted(m.machine.watching()), "host_checks": dict(m.checks)})


class PresetsResource(Resource):
    """``GET /presets``: the presets and templates the caller may ask for, each with its outputs."""

    isLeaf = True

    def __init__(self, node: NodeView) -> None:
        super().__init__()
        self.node = node
        self.catalog = Catalog(node.config.templates, node.config.watermark_dir)

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        try:
            grant = self.node.access.caller(request).grant
        except GridnodeError as e:
            return error_body(request, e)
        tenant = None if grant is None or grant.every_tenant else grant.tenant
        return json_body(request, {"presets": self.catalog.listing(grant.presets if grant is not None else None,
                                                                   tenant)})


class MetricsResource(Resource):
    """``GET /metrics``: prometheus_client's exposition, a WSGI app on the reactor's threads, for
    GET (and HEAD) alone: the app itself answers any method."""

    isLeaf = True

    def __init__(self, registry: Any) -> None:
        super().__init__()
        from prometheus_client.twisted import MetricsResource as exposition  # imports the reactor

        self.exposition = exposition(registry)

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        return self.exposition.render(request)


STATIC = os.path.join(os.path.dirname(__file__), "static")


class StaticFiles(File):
    """web/static: its files only, and coded JSON 404s (twisted.web's File lists a folder and answers
    HTML error pages)."""

    # twisted.web types these as its own HTML pages; any resource renders there
    childNotFound = ErrorResource(NotFound("no such file"))  # type: ignore[assignment]
    forbidden = childNotFound  # type: ignore[assignment]

    def directoryListing(self) -> Resource:  # noqa: N802 - Twisted's name
        return self.childNotFound

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        self.restat(reraise=False)
        if self.isdir():  # a folder: no listing, no redirect to one
            return self.childNotFound.render(request)
        return super().render_GET(request)

    render_HEAD = render_GET


#: the OpenAPI document of this API (package data; docs/openapi.yaml links it)
OPENAPI = os.path.join(os.path.dirname(__file__), "openapi.yaml")


class PageResource(Resource):
    """A file of the package, served without caching (it changes with releases): a page of
    web/static as HTML, or the API's OpenAPI document."""

    isLeaf = True

    def __init__(self, path: str, content_type: bytes = b"text/html; charset=utf-8") -> None:
        super().__init__()
        self.path = path
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - Twisted's name
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return error_body(request, NotFound("this page is not installed"))
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        return body


def api_root(node: NodeView) -> Resource:
    root = JSONRoot()
    root.putChild(b"", PageResource(os.path.join(STATIC, "index.html")))
    root.putChild(b"status", PageResource(os.path.join(STATIC, "status.html")))
    root.putChild(b"openapi.yaml", PageResource(OPENAPI, b"application/yaml"))
    root.putChild(b"static", StaticFiles(STATIC))
    root.putChild(b"health", HealthResource(node))
    root.putChild(b"peers", PeersResource(node))
    root.putChild(b"presets", PresetsResource(node))
    registry = JSONRoot()
    registry.putChild(b"nodes.json", NodesListResource(node))
    root.putChild(b"registry", registry)
    root.putChild(b"jobs", JobsResource(node.jobs, node.access, node.result_urls, node.ledger))
    root.putChild(b"files", node.tus.resource())
    root.putChild(b"results", ResultsResource(node.jobs, node.access, node.result_urls))
    root.putChild(b"metrics", MetricsResource(node.jobs.metrics.registry))
    return root
