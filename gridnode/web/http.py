"""Small helpers every resource uses: JSON bodies and coded errors."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from gridnode.errors import GridnodeError


def json_body(request: Request, obj: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


def error_body(request: Request, error: GridnodeError) -> bytes:
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        request.setHeader(b"retry-after", str(int(retry_after)).encode())
    return json_body(request, error.to_json(), error.status)


def not_found(what: str = "no such resource") -> GridnodeError:
    return GridnodeError(what, code="not_found", status=404)


class ErrorResource(Resource):
    """A leaf that answers a coded JSON error (twisted's NoResource is HTML)."""

    isLeaf = True

    def __init__(self, error: GridnodeError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> bytes:
        return error_body(request, self.error)


class JSONRoot(Resource):
    """A Resource whose missing children answer JSON 404s."""

    def getChild(self, path: bytes, request: Request) -> Resource:  # noqa: N802 - Twisted's name
        return ErrorResource(not_found(f"no such resource: {request.path.decode('latin-1')}"))
