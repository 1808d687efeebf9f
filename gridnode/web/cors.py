"""
CORS for the configured page origins (``--cors-origins``): a page served
from the bucket (Lei Zhu's pattern) or another site calls any node's API.
``*`` allows every origin.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

ALLOW_METHODS = "GET, POST, PATCH, HEAD, DELETE, OPTIONS"
BASE_ALLOW_HEADERS = ("Content-Type", "Upload-Checksum", "Authorization", "Notify", "Notify-Progress")
BASE_EXPOSE_HEADERS = ("Location", "Retry-After", "ETag")


class CORS:
    def __init__(self, origins: tuple[str, ...], allow_headers: tuple[str, ...] = (),
                 expose_headers: tuple[str, ...] = ()) -> None:
        self.origins = frozenset(origins)
        self.allow_headers = ", ".join(dict.fromkeys(BASE_ALLOW_HEADERS + allow_headers))
        self.expose_headers = ", ".join(dict.fromkeys(BASE_EXPOSE_HEADERS + expose_headers))

    def headers_for(self, origin: bytes | None) -> list[tuple[str, str]]:
        """The headers to add to an answer for a request from ``origin``."""
        if origin is None or not self.origins:
            return []
        text = origin.decode("latin-1")
        if "*" not in self.origins and text not in self.origins:
            return []
        return [("Access-Control-Allow-Origin", text), ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", self.expose_headers)]

    def wrap(self, root: Resource) -> Resource:
        return _CORSRoot(self, root)


class _CORSRoot(Resource):
    def __init__(self, cors: CORS, root: Resource) -> None:
        super().__init__()
        self.cors = cors
        self.root = root

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:  # noqa: N802 - Twisted's name
        headers = self.cors.headers_for(request.getHeader(b"origin"))
        for name, value in headers:
            request.setHeader(name.encode(), value.encode())
        if headers and request.method == b"OPTIONS" and request.getHeader(b"access-control-request-method"):
            return _Preflight(self.cors)
        return self.root.getChildWithDefault(path, request)

    def render(self, request: Request) -> Any:
        return self.root.render(request)


class _Preflight(Resource):
    isLeaf = True

    def __init__(self, cors: CORS) -> None:
        super().__init__()
        self.cors = cors

    def render(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", ALLOW_METHODS.encode())
        request.setHeader(b"access-control-allow-headers", self.cors.allow_headers.encode())
        request.setHeader(b"access-control-max-age", b"600")
        return b""
