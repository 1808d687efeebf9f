"""Small helpers every resource uses: JSON bodies, coded errors, answers that come later."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gridnode.errors import GridnodeError

_log = Logger()


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


def respond_later(request: Request, work: Any, done: Callable[[Any], None],
                  error: Callable[[Request, GridnodeError], bytes] = error_body) -> int:
    """Answer when ``work`` (a Deferred or a coroutine) fires: ``done(result)`` writes the answer
    and finishes the request, or ``error`` renders its coded error. Nothing is written to a client
    that went away meanwhile."""

    def succeeded(result: Any) -> None:
        if not request._disconnected:
            done(result)

    def failed(f: Failure) -> None:
        error_ = f.value if isinstance(f.value, GridnodeError) else None
        if error_ is None:
            _log.failure("request failed", f)
            error_ = GridnodeError("the node failed to answer; try again or another node")
        if not request._disconnected:
            request.write(error(request, error_))
            request.finish()

    ensureDeferred(work).addCallbacks(succeeded, failed).addErrback(lambda f: _log.failure("answer failed", f))
    return NOT_DONE_YET


def parse_checksum(header: bytes | None) -> str | None:
    """``Upload-Checksum: sha256 <base64>`` -> hex digest (None when absent)."""
    if header is None:
        return None
    try:
        algo, value = header.decode("ascii").split(" ", 1)
        digest = base64.b64decode(value.strip(), validate=True)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise GridnodeError("Upload-Checksum must be 'sha256 <base64 digest>'",
                            code="bad_checksum", status=400) from None
    if algo.lower() != "sha256" or len(digest) != 32:
        raise GridnodeError("Upload-Checksum: only sha256 is supported", code="bad_checksum", status=400)
    return digest.hex()


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


def is_json(request: Any) -> bool:
    """Whether a POST /jobs body is a JSON job request (gridnode/job_request.py), not the video."""
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    return bool(kind == b"application/json")


class MethodChecked:
    """A resource as `GridRequest` renders it: a method it does not take is a coded ``405
    method_not_allowed`` with ``Allow`` (twisted.web answers an HTML page, and ``501`` for a method
    it does not know, such as PUT). A HEAD of a GET-only resource is left to twisted.web's."""

    def __init__(self, resource: Any) -> None:
        self.resource = resource

    def render(self, request: Request) -> Any:
        try:
            return self.resource.render(request)
        except UnsupportedMethod as e:
            allowed: list[bytes] = list(e.allowedMethods)
            if request.method == b"HEAD" and b"GET" in allowed:
                raise
            request.setHeader(b"allow", b", ".join(allowed))
            method = request.method.decode("latin-1")[:20]
            return error_body(request, GridnodeError(
                f"{method} is not allowed here; this path takes {b', '.join(allowed).decode()}",
                code="method_not_allowed", status=405))
