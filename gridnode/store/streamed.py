"""
A body put into the store while it is still arriving: `StreamedPut`.

An upload is acknowledged only once its input is in the store (docs/api.md,
201). Put after the last byte, a large body would keep its client waiting for
the whole transfer; so on a store that takes parts (S3: ``part_size``), the
body becomes a multipart upload begun at admission, and every ``part_size``
bytes that reach the spool file (written by Python or spliced by the kernel:
the bytes are read back from the file by offset as they are sent, never kept)
go up as one part on the store's thread pool, at most ``in_flight`` at once, so
memory stays bounded whatever the body's size. After the last byte only the
tail part and the completion remain. A store that takes bodies whole (``part_size`` None: a
local folder) gets the file in one put once it is complete, the file flushed to
disk as it arrived so that the put's fsync has only the tail left to write.

A body assembled here from parts already stored (a tus upload) may start with
those, copied inside the store (`copy_first`), so that only its last bytes
travel again.

A part that fails (after botocore's retries) fails the body: the next bytes
written raise its `StorageUnavailable`, and the web layer answers 503 at once
(gridnode/web/upload.py). `abort` leaves nothing behind: parts in flight are
waited for, then the multipart upload is aborted; an object already put is
deleted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError, StorageUnavailable
from gridnode.store.base import MIN_PART, ObjectStore

#: parts of one body on their way at once (the store's thread pool bounds them node-wide)
IN_FLIGHT = 4
#: a body the store takes whole is flushed to disk every this many bytes as it arrives
FLUSH_EVERY = 32 * 1024 * 1024


class StreamedPut:
    """The file ``path``, still growing, put under ``key``. Driven from the reactor thread:
    `begin`, `grew` as bytes arrive, then `finish` once the body is complete, or `abort`."""

    _log = Logger()

    def __init__(self, store: ObjectStore, key: str, path: str, *, in_flight: int = IN_FLIGHT,
                 content_type: str | None = None) -> None:
        self.store = store
        self.key = key
        self.path = path
        self.part_size = store.part_size
        self.in_flight = in_flight
        self.content_type = content_type
        self.upload_id: str | None = None
        #: bytes in the file so far, and the offset of the first not handed to a part
        self.size = 0
        self._next = 0
        self._final = False
        self._aborted = False
        #: a body the store takes whole: flushed to disk up to here, a flush in flight
        self._flushed = 0
        self._flushing = False
        self._parts: dict[int, tuple[str, int]] = {}
        #: stored objects that become the first parts by copies inside the store
        self._sources: list[tuple[str, int]] = []
        self._running: dict[int, Deferred[Any]] = {}
        self._begun: Deferred[Any] | None = None
        #: the call that makes the object (the whole put, or the completion), once made
        self._closing: Deferred[Any] | None = None
        self._drained: Deferred[None] | None = None
        #: the first failure of a part: every later call raises it
        self.failure: GridnodeError | None = None

    def copy_first(self, sources: list[tuple[str, int]]) -> bool:
        """Make the stored objects ``sources`` (key, size) the object's first parts, copied inside
        the store (S3 UploadPartCopy: no byte through this node), the file's bytes past their total
        following: a tus upload's committed chunks, when every one is a valid part (``MIN_PART``
        at least). False, and nothing changed, where that cannot be; call before `finish`."""
        if self.part_size is None or not sources or any(size < MIN_PART for _, size in sources):
            return False
        self._sources = list(sources)
        self._next = sum(size for _, size in sources)
        return True

    def streams(self, length: int | None) -> bool:
        """Whether a body of ``length`` bytes (None: not declared) goes up in parts as it arrives."""
        return self.part_size is not None and (length is None or length > self.part_size)

    def begin(self) -> Deferred[Any]:
        """Begin the multipart upload (before the body is read: a store that cannot be reached
        refuses the upload with nothing of it read)."""
        assert self.part_size is not None and self._begun is None
        self._begun = self.store.begin_upload(self.key, content_type=self.content_type)

        def begun(upload_id: str) -> None:
            self.upload_id = upload_id
            if self._aborted:
                self._abort_stored()
                return
            if self._sources:
                self._log.info("{key}: {count} stored parts copied inside the store", key=self.key,
                               count=len(self._sources))
            copies = [(number, size, self.store.copy_part(self.key, upload_id, number, source))
                      for number, (source, size) in enumerate(self._sources, start=1)]
            for number, _, d in copies:  # all numbered before any may end and the file's parts follow
                self._running[number] = d
            for number, size, d in copies:
                d.addBoth(self._part_done, number, size)
            self._pump()

        return self._begun.addCallback(begun)

    def grew(self, size: int) -> None:
        """The file holds ``size`` bytes now; the failure of an earlier part is raised here."""
        if self.failure is not None:
            raise self.failure
        self.size = size
        if self.part_size is None:
            self._flush()
        else:
            self._pump()

    def _flush(self) -> None:
        """A body the store takes whole goes to disk as it arrives (one flush at a time, every
        ``FLUSH_EVERY`` bytes), so its put before the answer has only the tail left to write."""
        if self._flushing or self.size - self._flushed < FLUSH_EVERY or self._aborted:
            return
        self._flushing, upto = True, self.size

        def flushed(result: Any) -> None:
            self._flushing = False
            if not isinstance(result, Failure):
                self._flushed = upto
            # a failure here is the put's to meet: it fsyncs the whole file again

        self.store.flush(self.path).addBoth(flushed)

    def _pump(self) -> None:
        """Hand complete parts (and, once final, the tail) to the store, ``in_flight`` at most."""
        if self.upload_id is None or self._aborted or self.failure is not None:
            return
        assert self.part_size is not None
        while len(self._running) < self.in_flight:
            length = min(self.part_size, self.size - self._next)
            if length <= 0 or (length < self.part_size and not self._final):
                break
            number = len(self._parts) + len(self._running) + 1
            offset, self._next = self._next, self._next + length
            d = self.store.put_part(self.key, self.upload_id, number, self.path, offset, length)
            self._running[number] = d
            d.addBoth(self._part_done, number, length)
        if self._final and not self._running and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def _part_done(self, result: Any, number: int, length: int) -> None:
        del self._running[number]
        if isinstance(result, Failure):
            if self.failure is None:
                error = result.value
                self.failure = error if isinstance(error, StorageUnavailable) else StorageUnavailable(
                    f"the store failed to take part {number} of this upload "
                    f"({error.message if isinstance(error, GridnodeError) else type(error).__name__}); "
                    "send it again, to this node or another")
                self._log.warn("{key}: part {number} failed: {reason}", key=self.key, number=number,
                               reason=self.failure.message)
        else:
            self._parts[number] = (result, length)
        self._pump()
        if self.failure is not None and not self._running and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    @inlineCallbacks
    def finish(self, size: int) -> Any:
        """The body is complete at ``size`` bytes: fires with the object once it is stored."""
        self.size = size
        self._final = True
        if self.failure is not None:
            raise self.failure
        if self._begun is None and self._sources:
            self.begin()
        if self._begun is None:
            # the spool's file is never written again: a folder store may keep it as it is
            self._closing = self.store.put_file(self.key, self.path, content_type=self.content_type,
                                                handed_over=True)
            info = yield self._closing
            return info
        yield self._begun
        self._drained = Deferred()
        self._pump()
        yield self._drained
        if self.failure is not None:
            raise self.failure
        assert self.upload_id is not None
        parts = [self._parts[n] for n in sorted(self._parts)]
        self._closing = self.store.finish_upload(self.key, self.upload_id, parts)
        info = yield self._closing
        return info

    def abort(self) -> Deferred[None]:
        """Leave nothing in the store (best effort: a store that cannot be reached keeps an
        incomplete upload; the bucket's lifecycle rule removes it, docs/operations.md)."""
        if self._aborted:
            return succeed(None)
        self._aborted = True
        return self._abort_stored()

    @inlineCallbacks
    def _abort_stored(self) -> Any:
        try:
            if self._closing is not None:
                [(made, _)] = yield DeferredList([self._closing], consumeErrors=True)
                if made:
                    yield self.store.delete(self.key)
                    return
            if self.upload_id is not None:
                # S3 keeps a part that lands after the abort: wait for those in flight first
                yield DeferredList(list(self._running.values()), consumeErrors=True)
                yield self.store.abort_upload(self.key, self.upload_id)
        except GridnodeError as e:
            self._log.warn("{key}: an aborted upload may be left in the store: {reason}", key=self.key,
                           reason=e.message)
