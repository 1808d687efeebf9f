"""
`UploadStore`: the uploads of the pool as this node sees them (tusd's DataStore; see
gridnode/uploads/__init__.py for the design); gridnode/uploads/sweep.py runs its sweep.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode import keys
from gridnode.errors import Busy, GridnodeError, NotFound, PreconditionFailed, StorageUnavailable
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.spool import SpoolFile
from gridnode.store.rate import BACKGROUND
from gridnode.store.streamed import StreamedPut
from gridnode.uploads.files import Chunk, LocalCopy
from gridnode.uploads.info import MAX_INFO_BYTES, Part, UploadInfo, info_key, owned_by, part_key

if TYPE_CHECKING:
    from gridnode.jobs import Job
    from gridnode.pipeline import JobService
    from gridnode.store.base import ObjectStore

DEFAULT_EXPIRY = 24 * 3600.0
#: chunks per upload; past it the info object grows too large to rewrite on every PATCH
MAX_PARTS = 10_000
#: completed uploads remembered for HEAD without a store read
REMEMBER_FINISHED = 1024
_UPLOADS_ROOT = "uploads/"


def _bad(message: str, code: str, status: int = 400) -> GridnodeError:
    return GridnodeError(message, code=code, status=status)


def not_yours(upload_id: str) -> NotFound:
    """Gone, never was, or another tenant's: one answer, so that ids tell nothing."""
    return NotFound(f"no upload {upload_id}: it finished, expired or was terminated; start a new upload")


def offset_mismatch(expected: int | None, got: int) -> GridnodeError:
    where = "" if expected is None else f" (the upload is at {expected})"
    return _bad(f"Upload-Offset {got} is not the upload's offset{where}; ask with HEAD and resume from there",
                "offset_mismatch", 409)


@dataclass
class Outcome:
    """An upload after a chunk (or its creation), and the job it became once complete."""

    info: UploadInfo
    job: Job | None = None


@dataclass(frozen=True)
class Progress:
    """How far an upload is; one that finished (here or on another node) names its job."""

    offset: int
    length: int
    info: UploadInfo | None = None
    job_id: str | None = None


class UploadStore:
    """The uploads of the pool as this node sees them: create, receive and commit chunks, assemble
    the last one into a job, terminate, sweep. ``clock`` is only used as a clock (``seconds()``),
    so a `task.Clock` drives expiry in tests."""

    _log = Logger()

    def __init__(self, clock: Any, jobs: JobService, store: ObjectStore, *, max_upload_bytes: int,
                 expiry_seconds: float = DEFAULT_EXPIRY) -> None:
        self.clock = clock
        self.jobs = jobs
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.expiry = expiry_seconds
        self._local: dict[str, LocalCopy] = {}
        self._locks: dict[str, DeferredLock] = {}
        self._finished: dict[str, tuple[int, str]] = {}  # upload id -> (length, tenant)
        self._orphans: set[str] = set()  # store keys no info lists, seen by the last sweep

    def spool_path(self, name: str) -> str:
        return self.jobs.spool.path(name)

    def now(self) -> float:
        return float(self.clock.seconds())

    # -- admission (before any body byte is read)

    def check_presets(self, presets: str | None) -> list[str]:
        """The presets a finished upload will be converted to: an unknown one is refused now, not
        after the upload. The names asked for (presets and templates), as a token's claim names them."""
        return list(dict.fromkeys(p.template for p in self.jobs.media.parse_presets(presets) if p.template))

    def new_upload(self, length: int, *, metadata: str, filename: str, presets: str | None,
                   tenant: str = "", notify: str = "", level: str = DEFAULT_PRIORITY) -> UploadInfo:
        """Admit a new upload; it is not stored yet (`create`, or the commit of its first chunk)."""
        # The job service's admission (draining, full, too large, low disk) with its coded errors.
        self.jobs.check_admission(length, level=level)
        now = self.now()
        return UploadInfo(id=keys.new_id(self.jobs.now()), length=length, offset=0, created=now,
                          expires=now + self.expiry, metadata=metadata, filename=filename[:255], presets=presets,
                          tenant=tenant, notify=notify, priority=level)

    def first_chunk(self, info: UploadInfo, length: int | None, checksum: str | None) -> Chunk:
        """Where the body of a creation request goes; the upload is created as it is committed."""
        if length is not None and length > info.length:
            raise _bad(f"the body ({length} bytes) is longer than Upload-Length ({info.length})", "too_large", 413)
        return self._chunk(info.id, 0, info.length, length, checksum, info)

    def find(self, upload_id: str) -> UploadInfo | Deferred[UploadInfo]:
        """The upload a chunk is for, before any byte of the chunk is read: NotFound, or 410 once
        expired. This node's view when it has one (the commit reads the store again anyway);
        otherwise a Deferred, once the store has answered, serialized with the upload's commits."""
        if upload_id in self._finished:
            raise NotFound(f"upload {upload_id} is complete: it became job {upload_id}")
        local = self._local.get(upload_id)
        if local is not None and local.info.expires > self.now():
            return local.info
        read: Deferred[LocalCopy] = self._serialized(upload_id, lambda: self._read(upload_id))
        return read.addCallback(lambda copy: copy.info)

    def chunk(self, upload_id: str, start: int, length: int | None, checksum: str | None,
              tenant: str | None = None) -> Chunk:
        """Where ``tenant``'s chunk at ``start`` goes (None: anyone's), or the coded refusal (answered
        before its body); once `find` has answered for the upload."""
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
        return self._chunk(upload_id, start, limit, length, checksum, None, tenant,  # its priority where known here
                           local.info.priority if local is not None else DEFAULT_PRIORITY)

    def _chunk(self, upload_id: str, start: int, limit: int, length: int | None, checksum: str | None,
               creation: UploadInfo | None, tenant: str | None = None, level: str = DEFAULT_PRIORITY) -> Chunk:
        name = f"{upload_id}.{keys.new_id()}.chunk"
        # A chunk in flight takes a slot as a POST /jobs body does (503 busy when the node is full,
        # 507 below --min-free), and gives it back once it is committed or dropped.
        release = self.jobs.hold(name, length, limit, creation.priority if creation is not None else level)
        meter = self.jobs.space.meter("this node ran low on disk space while the chunk arrived, and dropped it; "
                                      "resume the upload (HEAD for its offset) on another node")
        return Chunk(self.spool_path(name), upload_id, start, limit, checksum, creation, cut_off=self.commit_cut_off,
                     meter=meter, tenant=tenant, on_release=release)

    # -- the operations (serialized per upload on this node)

    def create(self, info: UploadInfo) -> Deferred[Outcome]:
        """Store a new, empty upload."""

        @inlineCallbacks
        def create() -> Any:
            stat = yield self.store.put_bytes(info_key(info.id), info.dumps(), if_none_match="*",
                                              content_type="application/json")
            self._local[info.id] = LocalCopy(info, stat.etag, self.spool_path(f"{info.id}.partial"))
            self._log.info("upload {upload} created: {length} bytes", upload=info.id, length=info.length)
            return Outcome(info)

        return self._serialized(info.id, create)

    def progress(self, upload_id: str, tenant: str | None = None) -> Deferred[Progress]:
        """How far ``tenant``'s upload is (None: anyone's), once the commits in flight are done;
        NotFound or 410 when it is over."""

        @inlineCallbacks
        def look() -> Any:
            if upload_id in self._finished:
                length, owner = self._finished[upload_id]
                if tenant not in (None, owner):
                    raise not_yours(upload_id)
                return Progress(length, length, None, upload_id)
            try:
                local = yield self._read(upload_id, tenant)
            except NotFound as gone:
                # Finished on another node: the job has the upload's id.
                try:
                    job = yield self.jobs.get(upload_id)
                except NotFound:
                    raise gone from None
                if tenant not in (None, job.tenant):
                    raise gone from None
                size = int(job.input.get("size") or 0)
                return Progress(size, size, None, job.id)
            return Progress(local.info.offset, local.info.length, local.info, None)

        return self._serialized(upload_id, look)

    def terminate(self, upload_id: str, tenant: str | None = None) -> Deferred[None]:
        """End ``tenant``'s upload (None: anyone's): its info, parts and local copy are removed."""

        @inlineCallbacks
        def terminate() -> Any:
            yield self._read(upload_id, tenant)
            yield self._delete_upload(upload_id)
            self._log.info("upload {upload} terminated", upload=upload_id)

        return self._serialized(upload_id, terminate)

    def commit(self, chunk: Chunk) -> Deferred[Outcome]:
        """Validate a received chunk against the stored upload and commit it."""

        def work() -> Any:
            return self._commit(chunk)

        d = self._serialized(chunk.upload_id, work)

        def cleanup(result: Any) -> Any:
            chunk.remove()
            return result

        return d.addBoth(cleanup)

    def commit_cut_off(self, chunk: Chunk) -> None:
        """Keep what a dropped connection delivered: the client resumes from there."""

        def done(outcome: Outcome) -> None:
            self._log.info("upload {upload}: kept {size} bytes of a cut-off chunk, offset now {offset}",
                           upload=chunk.upload_id, size=chunk.size, offset=outcome.info.offset)

        def failed(f: Failure) -> None:
            reason = f.value.message if isinstance(f.value, GridnodeError) else repr(f.value)
            self._log.info("upload {upload}: dropped a cut-off chunk of {size} bytes: {reason}",
                           upload=chunk.upload_id, size=chunk.size, reason=reason)

        self.commit(chunk).addCallbacks(done, failed)

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
    def _read(self, upload_id: str, tenant: str | None = None) -> Any:
        """The stored info (refreshing this node's view); NotFound or 410 when the upload is over,
        and NotFound, as if it never was, when it is not ``tenant``'s (None: anyone's)."""
        try:
            data, stat = yield self.store.get_bytes(info_key(upload_id), max_size=MAX_INFO_BYTES)
        except NotFound:
            self._forget(upload_id)
            raise not_yours(upload_id) from None
        info = UploadInfo.loads(data, upload_id)
        if not owned_by(info, tenant):
            raise not_yours(upload_id)
        if info.expires <= self.now():
            yield self._delete_upload(upload_id, if_match=stat.etag)
            raise _bad(f"upload {upload_id} expired; start a new upload", "upload_expired", 410)
        local = self._local.get(upload_id)
        if local is None:
            local = self._local[upload_id] = LocalCopy(info, stat.etag, self.spool_path(f"{upload_id}.partial"))
            local.reset()
        local.info, local.etag = info, stat.etag
        return local

    # -- committing a chunk

    @inlineCallbacks
    def _commit(self, chunk: Chunk) -> Any:
        upload_id = chunk.upload_id
        if chunk.checksum is not None and chunk.checksum != chunk.sha256.hexdigest():
            raise GridnodeError("the chunk's sha256 differs from its Upload-Checksum; it was discarded, "
                                "send it again", code="checksum_mismatch", status=460)
        if chunk.creation is not None:
            stat = yield self.store.put_bytes(info_key(upload_id), chunk.creation.dumps(), if_none_match="*",
                                              content_type="application/json")
            local = self._local[upload_id] = LocalCopy(chunk.creation, stat.etag,
                                                    self.spool_path(f"{upload_id}.partial"))
            local.reset()
            self._log.info("upload {upload} created: {length} bytes", upload=upload_id, length=chunk.creation.length)
        else:
            local = yield self._read(upload_id, chunk.tenant)
        info = local.info
        if chunk.start != info.offset:
            raise offset_mismatch(info.offset, chunk.start)
        end = chunk.start + chunk.size
        if end > info.length:
            raise _bad(f"the chunk ends at {end}, past the upload's length {info.length}", "too_large", 413)
        if chunk.size == 0:
            return Outcome(info)
        if end == info.length:
            job = yield self._assemble(local, chunk)
            return Outcome(replace(info, offset=end), job)
        if len(info.parts) >= MAX_PARTS:
            raise _bad(f"an upload may have at most {MAX_PARTS} chunks; send larger chunks", "too_many_chunks")
        part = Part(keys.new_id(self.now()), chunk.size, chunk.sha256.hexdigest())
        key = part_key(upload_id, len(info.parts) + 1, part.id)
        yield self.store.put_file(key, chunk.path)
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
        yield self._keep_locally(local, info, chunk, part)
        local.info, local.etag = new, stat.etag
        return Outcome(new)

    @inlineCallbacks
    def _keep_locally(self, local: LocalCopy, before: UploadInfo, chunk: Chunk, part: Part) -> Any:
        """Append a committed chunk to the partial file. The store has it already, so a
        failure here costs a fetch later, not the chunk."""
        try:
            yield self._catch_up(local, before)
            local.append(chunk.path, chunk.sha256)
            local.part_ids.append(part.id)
        except Exception as e:  # noqa: BLE001 - the local copy is only a cache of the store
            self._log.warn("upload {upload}: local copy dropped ({reason}); it is fetched again when needed",
                           upload=before.id, reason=str(e))
            local.reset()

    @inlineCallbacks
    def _catch_up(self, local: LocalCopy, info: UploadInfo) -> Any:
        """Fetch the parts this node lacks (the upload moved here from another node) into the partial file."""
        if not local.in_step(info):
            local.reset()
        for index in range(len(local.part_ids), len(info.parts)):
            part = info.parts[index]
            fetched = self.spool_path(f"{info.id}.{part.id}.fetch")
            try:
                yield self.store.get_file(part_key(info.id, index + 1, part.id), fetched)
                digest = local.append(fetched, None)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(fetched)
            if digest != part.sha256:
                local.reset()
                raise _bad(f"part {index + 1} of upload {info.id} differs from its record in the store",
                           "storage_corrupt", 502)
            local.part_ids.append(part.id)

    @inlineCallbacks
    def _assemble(self, local: LocalCopy, chunk: Chunk) -> Any:
        """The last chunk: assemble, then hand the file to the job service. The upload is gone
        afterwards, whether the job was accepted or refused (not a video...)."""
        info = local.info
        yield self._catch_up(local, info)
        local.append(chunk.path, chunk.sha256)
        final = self.spool_path(info.id)  # its basename is the job id
        os.replace(local.path, final)
        spool = SpoolFile(final, "ab")
        spool.size = info.length
        spool.use_digest(local.sha256)
        # The job's input: on S3, the committed chunks copied inside the bucket when each is a
        # valid part (5 MiB+), only this last chunk sent again; else the assembled file put whole.
        put = spool.follower = StreamedPut(self.store, keys.input_source(info.id), final)
        put.copy_first([(part_key(info.id, n, p.id), p.size) for n, p in enumerate(info.parts, start=1)])
        self._local.pop(info.id, None)
        try:
            # answered once the job's input (this file, put whole) and record are in the store
            job = yield self.jobs.submit(spool, name=info.filename, presets=info.presets, checksum=None,
                                         tenant=info.tenant, notify=info.notify_urls(), priority=info.priority)
        except StorageUnavailable:
            # The upload stays as it was before this chunk (its parts are in the store): the
            # client is told 503 and sends the last chunk again, here or to another node.
            self._log.info("upload {upload}: the store cannot take its input now; kept", upload=info.id)
            raise
        except Exception as e:
            self._log.info("upload {upload} refused on completion: {reason}", upload=info.id,
                           reason=e.message if isinstance(e, GridnodeError) else repr(e))
            yield self._delete_stored(info.id)
            raise
        self._remember_finished(info.id, info.length, info.tenant)
        yield self._delete_stored(info.id)
        self._log.info("upload {upload} complete: {length} bytes, job {job}", upload=info.id, length=info.length,
                       job=job.id)
        return job

    def _remember_finished(self, upload_id: str, length: int, tenant: str) -> None:
        self._finished[upload_id] = (length, tenant)
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
        scan = self.store.in_lane(BACKGROUND)  # behind what clients wait for
        objects = yield scan.list_all(_UPLOADS_ROOT)
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
                    data, stat = yield scan.get_bytes(info_key(upload_id), max_size=MAX_INFO_BYTES)
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
