"""
tus 1.0.0 resumable uploads at ``/files/``: core, creation,
creation-with-upload, termination, checksum (sha256) and expiration.

This module maps tus requests (headers, methods, status codes) onto the
node's `UploadStore` (gridnode/uploads/), as tusd's handler does onto its
DataStore; the store owns the upload's state, its parts and the commit.
A finished upload becomes a job whose id is the upload's id.

A PATCH body (or a creation POST's) is routed, before any byte of it is
read, to a chunk file of the store (``route_body``, called by GridRequest);
its refusals (unknown or expired upload, draining, full, low disk, wrong
offset, too large) are answered before the body. A PATCH for an upload this
node has not seen waits for the store's answer with the body unread. A HEAD
waits for the commits in flight, so the offset it answers includes a chunk
that was just cut off.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from gridnode import keys, priority
from gridnode.errors import GridnodeError, NotFound
from gridnode.idempotency import UPLOAD, Claim, Intent, Ledger
from gridnode.notify.service import require_webhooks
from gridnode.notify.targets import parse_urls
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.uploads.files import Chunk
from gridnode.uploads.info import UploadInfo, owned_by
from gridnode.uploads.store import Outcome, Progress, UploadStore, not_yours
from gridnode.web import replay
from gridnode.web.http import error_body, parse_checksum, respond_later

TUS_VERSION = "1.0.0"
#: Upload-Defer-Length is refused, so creation-defer-length is not listed
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHECKSUM_ALGORITHMS = "sha256"
OFFSET_STREAM = b"application/offset+octet-stream"

#: request headers a browser page must be allowed to send (Access-Control-Allow-Headers)
ALLOW_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Metadata", "Upload-Offset", "Upload-Checksum",
                 "Upload-Defer-Length", "Content-Type", "X-HTTP-Method-Override", "Idempotency-Key")
#: response headers a browser page must be allowed to read (Access-Control-Expose-Headers)
EXPOSE_HEADERS = ("Upload-Offset", "Location", "Upload-Length", "Tus-Version", "Tus-Resumable", "Tus-Max-Size",
                  "Tus-Extension", "Upload-Metadata", "Upload-Expires", "Gridnode-Job", "Tus-Checksum-Algorithm",
                  "Idempotent-Replayed")

MAX_METADATA = 8 * 1024


def methods(upload_id: str) -> tuple[bytes, ...]:
    """The methods the collection ('') and an upload take (``Allow``; the OpenAPI document's)."""
    return (b"OPTIONS", b"POST") if upload_id == "" else (b"OPTIONS", b"HEAD", b"PATCH", b"DELETE")


def _bad(message: str, code: str, status: int = 400) -> GridnodeError:
    return GridnodeError(message, code=code, status=status)


# -- header parsing (pure)


def parse_metadata(header: str) -> dict[str, bytes]:
    """``Upload-Metadata``: ``key base64,key2 base64,key3`` -> {key: decoded bytes}."""
    if len(header) > MAX_METADATA:
        raise _bad(f"Upload-Metadata is longer than {MAX_METADATA} characters", "bad_metadata")
    result: dict[str, bytes] = {}
    for pair in header.split(","):
        pair = pair.strip()
        if not pair:
            continue
        fields = pair.split(" ")
        key = fields[0]
        if len(fields) > 2 or not key:
            raise _bad(f"Upload-Metadata pair {pair[:40]!r} must be 'key base64value'", "bad_metadata")
        if key in result:
            raise _bad(f"Upload-Metadata names {key[:40]!r} twice", "bad_metadata")
        try:
            result[key] = base64.b64decode(fields[1], validate=True) if len(fields) == 2 else b""
        except (binascii.Error, ValueError):
            raise _bad(f"Upload-Metadata value of {key[:40]!r} is not base64", "bad_metadata") from None
    return result


def metadata_text(metadata: dict[str, bytes], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"Upload-Metadata {key} must be UTF-8 text", "bad_metadata") from None


def parse_count(value: bytes | None, header: str) -> int:
    """A non-negative integer header (Upload-Length, Upload-Offset)."""
    if value is None:
        raise _bad(f"{header} is required", f"bad_{header.lower().replace('-', '_')}")
    text = value.decode("latin-1").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise _bad(f"{header} must be a non-negative integer", f"bad_{header.lower().replace('-', '_')}")
    return int(text)


def http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


# -- the handler


@dataclass(frozen=True)
class Creation:
    """A creation request, checked: what it declared, and the tenant its upload will belong to."""

    length: int
    metadata: str  # the Upload-Metadata header as sent
    filename: str
    presets: str | None
    tenant: str
    notify: str = ""  # its job's notify URLs (Upload-Metadata ``notify``), their syntax checked
    priority: str = DEFAULT_PRIORITY  # its job's (Upload-Metadata ``priority``), as the token allows


class UploadAccess(Protocol):
    """The node's authorization as the tus handler asks it (gridnode/web/access.py)."""

    def creator(self, request: Any, presets: list[str], length: int | None) -> str:
        """The tenant a new upload belongs to, once the token allows it (else the coded refusal)."""

    def owner_filter(self, request: Any) -> str | None:
        """Whose uploads ``request`` may touch: a tenant, or None for any."""

    def priority(self, request: Any, asked: str) -> str:
        """``asked``, once the token allows it (else the coded refusal)."""


class _Anyone:
    def creator(self, request: Any, presets: list[str], length: int | None) -> str:
        return ""

    def owner_filter(self, request: Any) -> str | None:
        return None

    def priority(self, request: Any, asked: str) -> str:
        return asked


class TusHandler:
    """The tus endpoint of one node, over its `UploadStore`."""

    def __init__(self, uploads: UploadStore, *, base_path: str = "/files/",
                 access: UploadAccess | None = None, ledger: Ledger | None = None) -> None:
        self.uploads = uploads
        #: the Idempotency-Keys of creation requests, in the store
        self.ledger = ledger or Ledger(uploads.store, now=uploads.now)
        self.base = "/" + base_path.strip("/") + "/"
        #: who may create an upload and whose uploads a request reaches; another tenant's upload
        #: answers 404, as one that never was
        self.access: UploadAccess = access or _Anyone()

    @property
    def max_upload_bytes(self) -> int:
        return self.uploads.max_upload_bytes

    def resource(self) -> Resource:
        """The resource to mount at ``/files``."""
        return _FilesResource(self)

    # -- routing (before any body byte is read)

    def target(self, path: bytes) -> str | None:
        """'' for the collection, an upload id, or None for a path that is not ours (NotFound for a bad id)."""
        text = path.decode("latin-1")
        if text in (self.base, self.base.rstrip("/")):
            return ""
        if not text.startswith(self.base):
            return None
        upload_id = text[len(self.base):]
        if not keys.is_id(upload_id):
            raise NotFound(f"no upload {upload_id[:40]!r} here")
        return upload_id

    def extra_headers(self, request: Any) -> list[tuple[str, str]]:
        """Headers for answers GridRequest writes itself (refusals before the body): tus wants them on all."""
        path = getattr(request, "path", None)
        if path is None:
            path = getattr(getattr(request, "channel", None), "_path", b"").partition(b"?")[0]
        try:
            ours = self.target(path) is not None
        except GridnodeError:
            ours = True
        return [("Tus-Resumable", TUS_VERSION), ("Tus-Version", TUS_VERSION)] if ours else []

    def route_body(self, method: bytes, path: bytes, request: Any,
                   length: int | None) -> Chunk | Deferred[Chunk] | None:
        """A sink for ``POST /files/`` with a body and ``PATCH /files/<id>`` (or a Deferred of it, once
        the store has said whether the upload exists); None for anything else. Raises (or fails
        with) the coded refusal, answered before the body is read."""
        method = effective_method(method, request)
        if method not in (b"PATCH", b"POST"):
            return None
        upload_id = self.target(path)
        if upload_id is None:
            return None
        if method == b"PATCH" and upload_id:
            return self._patch_sink(upload_id, request, length)
        if method == b"POST" and upload_id == "":
            return self._creation_route(request, length)
        return None

    def _creation_route(self, request: Any, length: int | None) -> Chunk | Deferred[Any] | None:
        """A creation's sink (None: no body); with an Idempotency-Key, once the store has said whether
        the key made an upload already (then the answer, before the body)."""
        with_body = length is None or length > 0
        key = replay.key_of(request)
        if key is None:
            return self._creation_sink(request, length) if with_body else None
        check_version(request)
        creation = self._checked_creation(request)
        intent = Intent.of(creation.tenant, key, UPLOAD, length=creation.length, metadata=creation.metadata)

        def admitted(claim: Claim) -> Chunk | None:
            # Admission (busy, draining, disk) comes after the lookup: a retry is answered even then.
            info = claim.made = self._admit(creation)
            return self._creation_sink(request, length, info) if with_body else None

        return replay.route(self.ledger, request, intent, replay.upload_fetcher(self.uploads, creation.tenant),
                            replay.upload_answer(self.base), admitted)

    def _patch_sink(self, upload_id: str, request: Any, length: int | None) -> Chunk | Deferred[Chunk]:
        check_version(request)
        check_offset_stream(request)
        start = parse_count(request.getHeader(b"upload-offset"), "Upload-Offset")
        checksum = parse_checksum(request.getHeader(b"upload-checksum"))
        tenant = self.access.owner_filter(request)

        def sink(info: UploadInfo) -> Chunk:
            # The upload's stored info is known here, before a byte of the chunk is read: another
            # tenant's upload answers 404 as one that never was.
            if not owned_by(info, tenant):
                raise not_yours(upload_id)
            return self.uploads.chunk(upload_id, start, length, checksum, tenant)

        found = self.uploads.find(upload_id)
        return found.addCallback(sink) if isinstance(found, Deferred) else sink(found)

    def _creation_sink(self, request: Any, length: int | None, info: UploadInfo | None = None) -> Chunk:
        check_version(request)
        check_offset_stream(request)
        checksum = parse_checksum(request.getHeader(b"upload-checksum"))
        return self.uploads.first_chunk(info or self._new_upload(request), length, checksum)

    def _new_upload(self, request: Any) -> UploadInfo:
        """Check a creation request and admit it; the upload is not stored yet."""
        return self._admit(self._checked_creation(request))

    def _admit(self, c: Creation) -> UploadInfo:
        return self.uploads.new_upload(c.length, metadata=c.metadata, filename=c.filename, presets=c.presets,
                                       tenant=c.tenant, notify=c.notify, level=c.priority)

    def _checked_creation(self, request: Any) -> Creation:
        """What a creation request declared, checked, and whose it is."""
        if request.getHeader(b"upload-length") is None and request.getHeader(b"upload-defer-length") is not None:
            raise _bad("Upload-Defer-Length is not supported: send Upload-Length", "defer_length_unsupported")
        length = parse_count(request.getHeader(b"upload-length"), "Upload-Length")
        if length == 0:
            raise _bad("the upload is empty; a video has at least one byte", "not_a_video", 422)
        if length > self.max_upload_bytes:
            raise _bad(f"the upload is {length} bytes; this node accepts at most {self.max_upload_bytes}",
                       "too_large", 413)
        raw = (request.getHeader(b"upload-metadata") or b"").decode("latin-1")
        metadata = parse_metadata(raw)
        filename = metadata_text(metadata, "filename") or ""
        presets = metadata_text(metadata, "presets")
        chosen = self.uploads.check_presets(presets)
        # The upload id is the upload's name; its tenant, recorded here, is checked on every request
        # that follows. A token's cap is checked against Upload-Length here: no chunk may pass that.
        tenant = self.access.creator(request, chosen, length)
        # the URLs' syntax now; where they resolve to, when the job is submitted (the last chunk)
        notify = ",".join(require_webhooks(self.uploads.jobs.webhooks, parse_urls(metadata_text(metadata, "notify"))))
        level = priority.parse(metadata_text(metadata, "priority"))
        return Creation(length, raw, filename, presets, tenant, notify, self.access.priority(request, level))

    # -- requests (the resource calls these)

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"tus-resumable", TUS_VERSION.encode())
        try:
            return self._render(request)
        except GridnodeError as e:
            if isinstance(request.content, Chunk):
                request.content.remove()  # refused before its commit: the file and its slot go
            return answer_error(request, e)

    def _render(self, request: Request) -> bytes | int:
        upload_id = self.target(request.path)
        method = effective_method(request.method, request)
        if upload_id is None:
            raise NotFound("no such resource")
        if method == b"OPTIONS":
            return self._options(request)
        check_version(request)
        if upload_id == "" and method == b"POST":
            return self._post(request)
        if upload_id and method == b"HEAD":
            return self._head(request, upload_id)
        if upload_id and method == b"PATCH":
            return self._patch(request)
        if upload_id and method == b"DELETE":
            return self._delete(request, upload_id)
        request.setHeader(b"allow", b", ".join(methods(upload_id)))
        raise _bad(f"{method.decode('latin-1')} is not allowed here", "method_not_allowed", 405)

    def _options(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"tus-version", TUS_VERSION.encode())
        request.setHeader(b"tus-extension", EXTENSIONS.encode())
        request.setHeader(b"tus-max-size", str(self.max_upload_bytes).encode())
        request.setHeader(b"tus-checksum-algorithm", CHECKSUM_ALGORITHMS.encode())
        return b""

    def _post(self, request: Request) -> bytes | int:
        sink = request.content
        claim = getattr(request, "idempotency", None)  # the router's, for a request with an Idempotency-Key
        if isinstance(sink, Chunk):
            sink.end()
            chunk, upload_id = sink, sink.upload_id
            make = partial(self.uploads.commit, sink)
        elif request.content is not None and request.content.seek(0, 2) > 0:
            raise GridnodeError("this node does not route POST bodies to the tus service", code="internal_error")
        else:
            info = claim.made if claim is not None else self._new_upload(request)
            chunk, upload_id, make = None, info.id, partial(self.uploads.create, info)
        work = replay.accept(claim, upload_id, make)
        if claim is not None:
            def dropped(failure: Failure) -> Failure:
                if chunk is not None:
                    chunk.remove()  # lost the key's race before its commit: its bytes go
                return failure

            work.addErrback(dropped)
            work.addErrback(replay.settled(claim, replay.upload_fetcher(self.uploads, claim.intent.tenant)))

        def created(outcome: Outcome | Progress) -> None:
            if isinstance(outcome, Progress):  # another request with the key won: its upload
                request.setResponseCode(201)
                for name, value in replay.upload_headers(self.base, replay.upload_id_of(outcome), outcome):
                    request.setHeader(name.encode(), value.encode())
                request.finish()
                return
            request.setHeader(b"location", f"{self.base}{outcome.info.id}".encode())
            answer(request, 201, outcome)

        return respond_later(request, work, created, answer_error)

    def _patch(self, request: Request) -> int:
        sink = request.content
        if not isinstance(sink, Chunk):
            raise GridnodeError("this node does not route PATCH bodies to the tus service", code="internal_error")
        sink.end()
        return respond_later(request, self.uploads.commit(sink), lambda outcome: answer(request, 204, outcome),
                             answer_error)

    def _head(self, request: Request, upload_id: str) -> int:
        request.setHeader(b"cache-control", b"no-store")

        def found(progress: Progress) -> None:
            info = progress.info
            request.setResponseCode(200)
            request.setHeader(b"upload-offset", str(progress.offset).encode())
            request.setHeader(b"upload-length", str(progress.length).encode())
            if info is not None:
                request.setHeader(b"upload-expires", http_date(info.expires).encode())
                if info.metadata:
                    request.setHeader(b"upload-metadata", info.metadata.encode("latin-1"))
            if progress.job_id is not None:
                request.setHeader(b"gridnode-job", progress.job_id.encode())
            request.finish()

        return respond_later(request, self.uploads.progress(upload_id, self.access.owner_filter(request)), found,
                             answer_error)

    def _delete(self, request: Request, upload_id: str) -> int:
        def done(_: Any) -> None:
            request.setResponseCode(204)
            request.finish()

        return respond_later(request, self.uploads.terminate(upload_id, self.access.owner_filter(request)), done,
                             answer_error)


class _FilesResource(Resource):
    """``/files`` and everything below it."""

    isLeaf = True

    def __init__(self, handler: TusHandler) -> None:
        super().__init__()
        self.handler = handler

    def render(self, request: Request) -> bytes | int:
        return self.handler.render(request)


# -- small helpers


def effective_method(method: bytes, request: Any) -> bytes:
    """tus lets clients that cannot send PATCH or DELETE say so in a POST."""
    if method == b"POST":
        override = request.getHeader(b"x-http-method-override")
        if override:
            return bytes(override).strip().upper()
    return method


def check_version(request: Any) -> None:
    if request.getHeader(b"tus-resumable") != TUS_VERSION.encode():
        raise _bad(f"this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}",
                   "unsupported_version", 412)


def check_offset_stream(request: Any) -> None:
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != OFFSET_STREAM:
        raise _bad("a tus chunk must be sent as Content-Type: application/offset+octet-stream",
                   "unsupported_media_type", 415)


def answer(request: Request, status: int, outcome: Outcome) -> None:
    info = outcome.info
    request.setResponseCode(status)
    request.setHeader(b"upload-offset", str(info.offset).encode())
    if outcome.job is not None:
        request.setHeader(b"gridnode-job", outcome.job.id.encode())
    else:
        request.setHeader(b"upload-expires", http_date(info.expires).encode())
    request.finish()


def answer_error(request: Request, error: GridnodeError) -> bytes:
    if error.status == 412:
        request.setHeader(b"tus-version", TUS_VERSION.encode())
    body = error_body(request, error)
    if error.status == 460:
        request.setResponseCode(460, b"Checksum Mismatch")
    # A HEAD answer has no body (twisted.web would drop it, with a warning).
    return b"" if request.method == b"HEAD" else body

