"""
tus 1.0.0 resumable uploads at ``/files/``: core, creation,
creation-with-upload, termination, checksum (sha256) and expiration.
A finished upload becomes a job whose id is the upload's id.

Why it is built this way:

- Every PATCH body (and a POST's body) goes, through the sink GridRequest
  routes it to, into a chunk file of its own in the spool: never into
  memory. A chunk that fails its checksum, or loses a race with another
  request, is dropped by removing one file; a chunk cut off mid-way keeps
  what arrived (tus resume depends on that).
- The store is the truth, so a client may resume on any node of the pool:
  ``uploads/<id>/info`` (JSON: length, offset, metadata, expiry, the list
  of parts) and ``uploads/<id>/part-NNNNN-<nonce>`` per committed chunk. A
  commit writes its part, then the info on the condition of the ETag it
  read: that write is the commit point. A part the info does not list is
  never read, and a fresh nonce per attempt means a losing writer never
  overwrites the winner's bytes.
- Locally ``<id>.partial`` holds the parts this node has, in order; a node
  that meets an upload for the first time fetches the missing parts into it
  before appending. The final chunk is never stored: the partial file
  becomes the job's spool file and is submitted. A node that dies meanwhile
  leaves the upload one chunk short, which the client simply sends again.
- Commits of one upload are serialized on this node, and a HEAD waits for
  them, so the offset it answers includes a chunk that was just cut off.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.pipeline import Busy
from gridnode.spool import SpoolFile
from gridnode.web.http import error_body, parse_checksum, respond_later

if TYPE_CHECKING:
    from gridnode.jobs import Job
    from gridnode.pipeline import JobService
    from gridnode.store.base import ObjectStore

_log = Logger()

TUS_VERSION = "1.0.0"
#: Upload-Defer-Length is refused, so creation-defer-length is not listed
EXTENSIONS = "creation,creation-with-upload,termination,checksum,expiration"
CHECKSUM_ALGORITHMS = "sha256"
OFFSET_STREAM = b"application/offset+octet-stream"

#: request headers a browser page must be allowed to send (Access-Control-Allow-Headers)
ALLOW_HEADERS = ("Tus-Resumable", "Upload-Length", "Upload-Metadata", "Upload-Offset", "Upload-Checksum",
                 "Upload-Defer-Length", "Content-Type", "X-HTTP-Method-Override")
#: response headers a browser page must be allowed to read (Access-Control-Expose-Headers)
EXPOSE_HEADERS = ("Upload-Offset", "Location", "Upload-Length", "Tus-Version", "Tus-Resumable", "Tus-Max-Size",
                  "Tus-Extension", "Upload-Metadata", "Upload-Expires", "Gridnode-Job", "Tus-Checksum-Algorithm")

DEFAULT_EXPIRY = 24 * 3600.0
#: chunks per upload; past it the info object grows too large to rewrite on every PATCH
MAX_PARTS = 10_000
MAX_INFO_BYTES = 4 * 1024 * 1024
MAX_METADATA = 8 * 1024
#: completed uploads remembered for HEAD without a store read
REMEMBER_FINISHED = 1024
_BLOCK = 1024 * 1024
_UPLOADS_ROOT = "uploads/"


def _bad(message: str, code: str, status: int = 400) -> GridnodeError:
    return GridnodeError(message, code=code, status=status)


# -- the upload's state, as stored in uploads/<id>/info


@dataclass(frozen=True)
class Part:
    """A committed chunk: ``uploads/<upload>/part-<n>-<id>``."""

    id: str
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadInfo:
    id: str
    length: int
    offset: int
    created: float
    expires: float
    #: the Upload-Metadata header as the client sent it (echoed on HEAD)
    metadata: str = ""
    filename: str = ""
    presets: str | None = None
    parts: tuple[Part, ...] = ()

    def dumps(self) -> bytes:
        doc = {"id": self.id, "length": self.length, "offset": self.offset, "created": self.created,
               "expires": self.expires, "metadata": self.metadata, "filename": self.filename,
               "presets": self.presets, "parts": [[p.id, p.size, p.sha256] for p in self.parts]}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes, upload_id: str) -> UploadInfo:
        """Parse and check an info object: the store is shared, so trust nothing in it."""
        try:
            doc = json.loads(data)
            parts = tuple(Part(str(p[0]), int(p[1]), str(p[2])) for p in doc["parts"])
            info = cls(id=str(doc["id"]), length=int(doc["length"]), offset=int(doc["offset"]),
                       created=float(doc["created"]), expires=float(doc["expires"]),
                       metadata=str(doc.get("metadata") or ""), filename=str(doc.get("filename") or ""),
                       presets=None if doc.get("presets") is None else str(doc["presets"]), parts=parts)
        except (ValueError, KeyError, TypeError, IndexError):
            raise _bad(f"the stored state of upload {upload_id} is unreadable; start a new upload",
                       "storage_corrupt", 500) from None
        if (info.id != upload_id or not all(keys.is_id(p.id) for p in parts)
                or info.offset != sum(p.size for p in parts) or info.offset > info.length):
            raise _bad(f"the stored state of upload {upload_id} is inconsistent; start a new upload",
                       "storage_corrupt", 500)
        return info


def info_key(upload_id: str) -> str:
    return keys.check_key(keys.upload_prefix(upload_id) + "info")


def part_key(upload_id: str, number: int, part_id: str) -> str:
    """Part ``number`` (1-based); ``part_id`` is a fresh id per attempt, checked before use."""
    return keys.check_key(keys.upload_prefix(upload_id) + f"part-{number:05d}-{keys.check_segment(part_id)}")


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
    if not text.isdigit() or len(text) > 19:
        raise _bad(f"{header} must be a non-negative integer", f"bad_{header.lower().replace('-', '_')}")
    return int(text)


def http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


# -- this node's copy of an upload


@dataclass
class _Local:
    info: UploadInfo
    etag: str
    path: str  # <id>.partial: the parts below, concatenated
    part_ids: list[str] = field(default_factory=list)
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)  # of the partial file, kept as it grows

    def reset(self) -> None:
        """Forget the local bytes (they no longer match the store); they are fetched again."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.part_ids = []
        self.size = 0
        self.sha256 = hashlib.sha256()

    def in_step(self, info: UploadInfo) -> bool:
        """The partial file holds a prefix of ``info``'s parts, and exactly their bytes."""
        on_disk = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        ids = [p.id for p in info.parts[:len(self.part_ids)]]
        return on_disk == self.size and ids == self.part_ids


class _ChunkSink:
    """Where GridRequest writes one PATCH (or creation POST) body: a chunk file in the spool."""

    def __init__(self, service: TusService, upload_id: str, start: int, limit: int, checksum: str | None,
                 creation: UploadInfo | None) -> None:
        self.service = service
        self.upload_id = upload_id
        self.start = start
        self.limit = limit
        self.checksum = checksum  # hex sha256 the client announced, or None
        self.creation = creation  # the upload to create first (POST with a body)
        self.path = service.spool_path(f"{upload_id}.{keys.new_id()}.chunk")
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()/abort()
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.refused = False
        self.ended = False  # the body is complete, or was cut off: nothing more is written

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            self.refused = True
            raise _bad(f"this chunk goes past the upload's length or this node's limit ({self.start + self.limit} "
                       "bytes)", "too_large", 413)
        self.file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    # twisted.web's Request.requestReceived seeks and tells the content.
    def seek(self, offset: int, whence: int = 0) -> int:
        return self.size

    def tell(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()

    def end(self) -> None:
        """The whole body is here."""
        self.ended = True
        self.close()

    def abort(self) -> None:
        """The connection dropped mid-body, or GridRequest refused it."""
        if self.ended:
            return
        self.ended = True
        self.close()
        # A partial chunk cannot be checked against its checksum; a creation whose
        # answer never reached the client has no one to resume it.
        if self.refused or self.creation is not None or self.checksum is not None or self.size == 0:
            self.remove()
            return
        self.service.commit_cut_off(self)

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@dataclass
class _Outcome:
    info: UploadInfo
    job: Job | None = None


class TusService:
    """
    The tus endpoint of one node. ``reactor`` is only used as a clock
    (``seconds()``, LoopingCall), so a `task.Clock` drives expiry in tests.
    """

    _log = Logger()

    def __init__(self, reactor: Any, jobs: JobService, store: ObjectStore, *, max_upload_bytes: int,
                 expiry_seconds: float = DEFAULT_EXPIRY, sweep_interval: float | None = None,
                 base_path: str = "/files/",
                 authorize: Callable[[Any, list[str], int | None], None] | None = None) -> None:
        self.clock = reactor
        self.jobs = jobs
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.expiry = expiry_seconds
        self.sweep_interval = sweep_interval or min(3600.0, expiry_seconds / 4)
        self.base = "/" + base_path.strip("/") + "/"
        #: the node's upload-token check, called at creation as for POST /jobs: (request, presets, length)
        self.authorize = authorize
        self._local: dict[str, _Local] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._finished: dict[str, int] = {}
        self._orphans: set[str] = set()  # store keys no info lists, seen by the last sweep
        self._loop: LoopingCall | None = None

    # -- life cycle

    def start(self) -> None:
        """Sweep expired uploads every ``sweep_interval`` seconds."""
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.clock
        self._loop.start(self.sweep_interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def resource(self) -> Resource:
        """The resource to mount at ``/files``."""
        return _FilesResource(self)

    def spool_path(self, name: str) -> str:
        return self.jobs.spool.path(name)

    def now(self) -> float:
        return float(self.clock.seconds())

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

    def route_body(self, method: bytes, path: bytes, request: Any, length: int | None) -> _ChunkSink | None:
        """A sink for ``POST /files/`` with a body and ``PATCH /files/<id>``; None for anything else.
        Raises the coded refusal (answered before the body is read)."""
        method = effective_method(method, request)
        if method not in (b"PATCH", b"POST"):
            return None
        upload_id = self.target(path)
        if upload_id is None:
            return None
        if method == b"PATCH" and upload_id:
            return self._patch_sink(upload_id, request, length)
        if method == b"POST" and upload_id == "" and (length is None or length > 0):
            return self._creation_sink(request, length)
        return None

    def _patch_sink(self, upload_id: str, request: Any, length: int | None) -> _ChunkSink:
        check_version(request)
        check_offset_stream(request)
        start = parse_count(request.getHeader(b"upload-offset"), "Upload-Offset")
        checksum = parse_checksum(request.getHeader(b"upload-checksum"))
        if self.jobs.draining:
            raise Busy("this node is draining; resume the upload on another node of the pool", retry_after=30)
        limit = self.max_upload_bytes - start
        local = self._local.get(upload_id)
        if local is not None:
            # This node's view may lag the store (another node appended since),
            # never lead it: an offset below it is certainly wrong.
            if start < local.info.offset:
                raise offset_mismatch(local.info.offset, start)
            limit = local.info.length - start
        if limit < 0:
            raise offset_mismatch(None, start)
        if length is not None and length > limit:
            raise _bad(f"this chunk of {length} bytes at offset {start} goes past the upload's length",
                       "too_large", 413)
        return _ChunkSink(self, upload_id, start, limit, checksum, None)

    def _creation_sink(self, request: Any, length: int | None) -> _ChunkSink:
        check_version(request)
        check_offset_stream(request)
        checksum = parse_checksum(request.getHeader(b"upload-checksum"))
        info = self._new_upload(request)
        if length is not None and length > info.length:
            raise _bad(f"the body ({length} bytes) is longer than Upload-Length ({info.length})", "too_large", 413)
        return _ChunkSink(self, info.id, 0, info.length, checksum, info)

    def _new_upload(self, request: Any) -> UploadInfo:
        """Check a creation request and admit it; the upload is not stored yet."""
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
        chosen = self.jobs.media.parse_presets(presets)  # an unknown preset is refused now, not after the upload
        if self.authorize is not None:
            # The upload id, 80 random bits, is the capability for the requests that follow.
            self.authorize(request, [p.name for p in chosen], length)
        # The job service's admission (draining, full, too large, low disk) with its coded errors;
        # its fresh spool name is the upload id, and later the job id.
        spool = self.jobs.admit(length)
        spool.discard()
        now = self.now()
        return UploadInfo(id=os.path.basename(spool.path), length=length, offset=0, created=now,
                          expires=now + self.expiry, metadata=raw, filename=filename[:255], presets=presets)

    # -- one upload at a time on this node

    def _serialized(self, upload_id: str, work: Callable[[], Any]) -> Deferred[Any]:
        lock = self._locks.setdefault(upload_id, DeferredLock())

        def release(result: Any) -> Any:
            if not lock.locked and not lock.waiting and self._locks.get(upload_id) is lock:
                del self._locks[upload_id]
            return result

        d: Deferred[Any] = lock.run(work)
        return d.addBoth(release)

    # -- reading the truth

    @inlineCallbacks
    def _read(self, upload_id: str) -> Any:
        """The stored info (refreshing this node's view); NotFound or 410 when the upload is over."""
        try:
            data, stat = yield self.store.get_bytes(info_key(upload_id), max_size=MAX_INFO_BYTES)
        except NotFound:
            self._forget(upload_id)
            raise NotFound(f"no upload {upload_id}: it finished, expired or was terminated; "
                           "start a new upload") from None
        info = UploadInfo.loads(data, upload_id)
        if info.expires <= self.now():
            yield self._delete_upload(upload_id, if_match=stat.etag)
            raise _bad(f"upload {upload_id} expired; start a new upload", "upload_expired", 410)
        local = self._local.get(upload_id)
        if local is None:
            local = self._local[upload_id] = _Local(info, stat.etag, self.spool_path(f"{upload_id}.partial"))
            local.reset()
        local.info, local.etag = info, stat.etag
        return local

    # -- committing a chunk

    def commit(self, sink: _ChunkSink) -> Deferred[Any]:
        """Validate a received chunk against the stored upload and commit it -> `_Outcome`."""

        def work() -> Any:
            return self._commit(sink)

        d = self._serialized(sink.upload_id, work)

        def cleanup(result: Any) -> Any:
            sink.remove()
            return result

        return d.addBoth(cleanup)

    def commit_cut_off(self, sink: _ChunkSink) -> None:
        """Keep what a dropped connection delivered: the client resumes from there."""

        def done(outcome: _Outcome) -> None:
            self._log.info("upload {upload}: kept {size} bytes of a cut-off chunk, offset now {offset}",
                           upload=sink.upload_id, size=sink.size, offset=outcome.info.offset)

        def failed(f: Failure) -> None:
            reason = f.value.message if isinstance(f.value, GridnodeError) else repr(f.value)
            self._log.info("upload {upload}: dropped a cut-off chunk of {size} bytes: {reason}",
                           upload=sink.upload_id, size=sink.size, reason=reason)

        self.commit(sink).addCallbacks(done, failed)

    @inlineCallbacks
    def _commit(self, sink: _ChunkSink) -> Any:
        upload_id = sink.upload_id
        if sink.checksum is not None and sink.checksum != sink.sha256.hexdigest():
            raise GridnodeError("the chunk's sha256 differs from its Upload-Checksum; it was discarded, "
                                "send it again", code="checksum_mismatch", status=460)
        if sink.creation is not None:
            stat = yield self.store.put_bytes(info_key(upload_id), sink.creation.dumps(), if_none_match="*",
                                              content_type="application/json")
            local = self._local[upload_id] = _Local(sink.creation, stat.etag, self.spool_path(f"{upload_id}.partial"))
            local.reset()
            self._log.info("upload {upload} created: {length} bytes", upload=upload_id, length=sink.creation.length)
        else:
            local = yield self._read(upload_id)
        info = local.info
        if sink.start != info.offset:
            raise offset_mismatch(info.offset, sink.start)
        end = sink.start + sink.size
        if end > info.length:
            raise _bad(f"the chunk ends at {end}, past the upload's length {info.length}", "too_large", 413)
        if sink.size == 0:
            return _Outcome(info)
        if end == info.length:
            job = yield self._complete(local, sink)
            return _Outcome(replace(info, offset=end), job)
        if len(info.parts) >= MAX_PARTS:
            raise _bad(f"an upload may have at most {MAX_PARTS} chunks; send larger chunks", "too_many_chunks")
        part = Part(keys.new_id(self.now()), sink.size, sink.sha256.hexdigest())
        key = part_key(upload_id, len(info.parts) + 1, part.id)
        yield self.store.put_file(key, sink.path)
        new = replace(info, offset=end, parts=(*info.parts, part), expires=self.now() + self.expiry)
        try:
            stat = yield self.store.put_bytes(info_key(upload_id), new.dumps(), if_match=local.etag,
                                              content_type="application/json")
        except (PreconditionFailed, NotFound) as e:
            # Another node changed (or ended) the upload since we read it: this chunk lost.
            yield self._delete_quietly(key)
            self._forget(upload_id)
            if isinstance(e, NotFound):
                raise NotFound(f"upload {upload_id} ended while this chunk arrived") from None
            raise _bad("the upload changed while this chunk arrived (another request?); check its offset "
                       "with HEAD and resume", "offset_mismatch", 409) from None
        yield self._keep_locally(local, info, sink, part)
        local.info, local.etag = new, stat.etag
        return _Outcome(new)

    @inlineCallbacks
    def _keep_locally(self, local: _Local, before: UploadInfo, sink: _ChunkSink, part: Part) -> Any:
        """Append a committed chunk to the partial file. The store has it already, so a
        failure here costs a fetch later, not the chunk."""
        try:
            yield self._catch_up(local, before)
            self._append(local, sink.path, sink.sha256)
            local.part_ids.append(part.id)
        except Exception as e:  # noqa: BLE001 - the local copy is only a cache of the store
            self._log.warn("upload {upload}: local copy dropped ({reason}); it is fetched again when needed",
                           upload=before.id, reason=str(e))
            local.reset()

    @inlineCallbacks
    def _catch_up(self, local: _Local, info: UploadInfo) -> Any:
        """Fetch the parts this node lacks (the upload moved here from another node) into the partial file."""
        if not local.in_step(info):
            local.reset()
        for index in range(len(local.part_ids), len(info.parts)):
            part = info.parts[index]
            fetched = self.spool_path(f"{info.id}.{part.id}.fetch")
            try:
                yield self.store.get_file(part_key(info.id, index + 1, part.id), fetched)
                digest = self._append(local, fetched, None)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fetched)
            if digest != part.sha256:
                local.reset()
                raise _bad(f"part {index + 1} of upload {info.id} differs from its record in the store",
                           "storage_corrupt", 502)
            local.part_ids.append(part.id)

    def _append(self, local: _Local, source: str, source_sha256: Any) -> str:
        """Append ``source`` to the partial file, keeping its running sha256; returns the source's
        sha256. A first chunk whose hash is known already is renamed, not copied."""
        if local.size == 0 and source_sha256 is not None:
            os.replace(source, local.path)
            local.sha256 = source_sha256.copy()
            local.size = os.path.getsize(local.path)
            digest: str = source_sha256.hexdigest()
            return digest
        chunk = hashlib.sha256()
        with open(source, "rb") as src, open(local.path, "ab") as dst:
            while block := src.read(_BLOCK):
                chunk.update(block)
                local.sha256.update(block)
                dst.write(block)
                local.size += len(block)
        return chunk.hexdigest()

    @inlineCallbacks
    def _complete(self, local: _Local, sink: _ChunkSink) -> Any:
        """The last chunk: assemble, then hand the file to the job service. The upload is gone
        afterwards, whether the job was accepted or refused (not a video...)."""
        info = local.info
        yield self._catch_up(local, info)
        self._append(local, sink.path, sink.sha256)
        final = self.spool_path(info.id)  # its basename is the job id
        os.replace(local.path, final)
        spool = SpoolFile(final, "ab")
        spool.size = info.length
        spool.use_digest(local.sha256)
        self._local.pop(info.id, None)
        try:
            job = yield self.jobs.submit(spool, name=info.filename, presets=info.presets, checksum=None)
        except Exception as e:
            self._log.info("upload {upload} refused on completion: {reason}", upload=info.id,
                           reason=e.message if isinstance(e, GridnodeError) else repr(e))
            yield self._delete_stored(info.id)
            raise
        self._remember_finished(info.id, info.length)
        yield self._delete_stored(info.id)
        self._log.info("upload {upload} complete: {length} bytes, job {job}", upload=info.id, length=info.length,
                       job=job.id)
        return job

    def _remember_finished(self, upload_id: str, length: int) -> None:
        self._finished[upload_id] = length
        while len(self._finished) > REMEMBER_FINISHED:
            del self._finished[next(iter(self._finished))]

    # -- removing uploads

    def _forget(self, upload_id: str) -> None:
        """Drop this node's copy (the chunk files of requests in flight are theirs to remove)."""
        local = self._local.pop(upload_id, None)
        if local is not None:
            local.reset()

    @inlineCallbacks
    def _delete_upload(self, upload_id: str, if_match: str | None = None) -> Any:
        """Delete the info first (the upload ends there), then every other object under the prefix."""
        try:
            yield self.store.delete(info_key(upload_id), if_match=if_match)
        except PreconditionFailed:
            return False  # renewed meanwhile by another node: not expired after all
        except NotFound:
            pass
        self._forget(upload_id)
        yield self._delete_stored(upload_id, info_first=False)
        return True

    @inlineCallbacks
    def _delete_stored(self, upload_id: str, info_first: bool = True) -> Any:
        """Best effort: what is left behind is an orphan the sweep removes later."""
        try:
            if info_first:
                yield self.store.delete(info_key(upload_id))
            for item in (yield self.store.list_all(keys.upload_prefix(upload_id))):
                yield self.store.delete(item.key)
        except GridnodeError as e:
            self._log.warn("upload {upload}: could not remove all of it from the store: {reason}",
                           upload=upload_id, reason=e.message)

    @inlineCallbacks
    def _delete_quietly(self, key: str) -> Any:
        try:
            yield self.store.delete(key)
        except GridnodeError as e:
            self._log.warn("could not remove {key}: {reason}", key=key, reason=e.message)

    @inlineCallbacks
    def sweep(self) -> Any:
        """Delete expired uploads, and store objects no upload lists (seen on two sweeps running,
        so a commit between its part and its info write is never mistaken for one)."""
        try:
            return (yield self._sweep())
        except Exception:  # noqa: BLE001 - the loop must survive a store outage
            self._log.failure("upload sweep failed")
            return 0

    @inlineCallbacks
    def _sweep(self) -> Any:
        objects = yield self.store.list_all(_UPLOADS_ROOT)
        groups: dict[str, list[str]] = {}
        for item in objects:
            upload_id = item.key[len(_UPLOADS_ROOT):].partition("/")[0]
            groups.setdefault(upload_id, []).append(item.key)
        expired = 0
        orphans: set[str] = set()
        for upload_id, names in groups.items():
            if not keys.is_id(upload_id):
                continue
            listed = {info_key(upload_id)}
            if info_key(upload_id) in names:
                try:
                    data, stat = yield self.store.get_bytes(info_key(upload_id), max_size=MAX_INFO_BYTES)
                    info = UploadInfo.loads(data, upload_id)
                except NotFound:
                    continue
                except GridnodeError as e:
                    # Unreadable: nothing can resume it, so it goes like an orphan.
                    self._log.warn("upload {upload}: {reason}", upload=upload_id, reason=e.message)
                    orphans |= set(names)
                    continue
                if info.expires <= self.now():
                    gone = yield self._serialized(upload_id, partial(self._delete_upload, upload_id,
                                                                     if_match=stat.etag))
                    if gone:
                        expired += 1
                        self._log.info("upload {upload} expired at {offset} of {length} bytes", upload=upload_id,
                                       offset=info.offset, length=info.length)
                    continue
                listed |= {part_key(upload_id, n, p.id) for n, p in enumerate(info.parts, start=1)}
            orphans |= {name for name in names if name not in listed}
        for key in orphans & self._orphans:
            yield self._delete_quietly(key)
        self._orphans = orphans - self._orphans
        for upload_id in list(self._local):
            if upload_id not in groups and upload_id not in self._locks:
                self._forget(upload_id)  # ended on another node
        return expired

    # -- requests (the resource calls these)

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"tus-resumable", TUS_VERSION.encode())
        try:
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
            request.setHeader(b"allow", b"OPTIONS, POST" if upload_id == "" else b"OPTIONS, HEAD, PATCH, DELETE")
            raise _bad(f"{method.decode('latin-1')} is not allowed here", "method_not_allowed", 405)
        except GridnodeError as e:
            return answer_error(request, e)

    def _options(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(b"tus-version", TUS_VERSION.encode())
        request.setHeader(b"tus-extension", EXTENSIONS.encode())
        request.setHeader(b"tus-max-size", str(self.max_upload_bytes).encode())
        request.setHeader(b"tus-checksum-algorithm", CHECKSUM_ALGORITHMS.encode())
        return b""

    def _post(self, request: Request) -> bytes | int:
        sink = request.content
        if isinstance(sink, _ChunkSink):
            sink.end()
            work = self.commit(sink)
        elif request.content is not None and request.content.seek(0, 2) > 0:
            raise GridnodeError("this node does not route POST bodies to the tus service", code="internal_error")
        else:
            info = self._new_upload(request)

            @inlineCallbacks
            def create() -> Any:
                stat = yield self.store.put_bytes(info_key(info.id), info.dumps(), if_none_match="*",
                                                  content_type="application/json")
                self._local[info.id] = _Local(info, stat.etag, self.spool_path(f"{info.id}.partial"))
                self._log.info("upload {upload} created: {length} bytes", upload=info.id, length=info.length)
                return _Outcome(info)

            work = self._serialized(info.id, create)

        def created(outcome: _Outcome) -> None:
            request.setHeader(b"location", f"{self.base}{outcome.info.id}".encode())
            answer(request, 201, outcome)

        return respond_later(request, work, created, answer_error)

    def _patch(self, request: Request) -> int:
        sink = request.content
        if not isinstance(sink, _ChunkSink):
            raise GridnodeError("this node does not route PATCH bodies to the tus service", code="internal_error")
        sink.end()
        return respond_later(request, self.commit(sink), lambda outcome: answer(request, 204, outcome), answer_error)

    def _head(self, request: Request, upload_id: str) -> int:
        request.setHeader(b"cache-control", b"no-store")

        @inlineCallbacks
        def look() -> Any:
            if upload_id in self._finished:
                length = self._finished[upload_id]
                return length, length, None, upload_id
            try:
                local = yield self._read(upload_id)
            except NotFound as gone:
                # Finished on another node: the job has the upload's id.
                try:
                    job = yield self.jobs.get(upload_id)
                except NotFound:
                    raise gone from None
                size = int(job.input.get("size") or 0)
                return size, size, None, job.id
            return local.info.offset, local.info.length, local.info, None

        def found(result: tuple[int, int, UploadInfo | None, str | None]) -> None:
            offset, length, info, job_id = result
            request.setResponseCode(200)
            request.setHeader(b"upload-offset", str(offset).encode())
            request.setHeader(b"upload-length", str(length).encode())
            if info is not None:
                request.setHeader(b"upload-expires", http_date(info.expires).encode())
                if info.metadata:
                    request.setHeader(b"upload-metadata", info.metadata.encode("latin-1"))
            if job_id is not None:
                request.setHeader(b"gridnode-job", job_id.encode())
            request.finish()

        return respond_later(request, self._serialized(upload_id, look), found, answer_error)

    def _delete(self, request: Request, upload_id: str) -> int:
        @inlineCallbacks
        def terminate() -> Any:
            yield self._read(upload_id)
            yield self._delete_upload(upload_id)
            self._log.info("upload {upload} terminated", upload=upload_id)

        def done(_: Any) -> None:
            request.setResponseCode(204)
            request.finish()

        return respond_later(request, self._serialized(upload_id, terminate), done, answer_error)


class _FilesResource(Resource):
    """``/files`` and everything below it."""

    isLeaf = True

    def __init__(self, service: TusService) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Request) -> bytes | int:
        return self.service.render(request)


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


def offset_mismatch(expected: int | None, got: int) -> GridnodeError:
    where = "" if expected is None else f" (the upload is at {expected})"
    return _bad(f"Upload-Offset {got} is not the upload's offset{where}; ask with HEAD and resume from there",
                "offset_mismatch", 409)


def answer(request: Request, status: int, outcome: _Outcome) -> None:
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
