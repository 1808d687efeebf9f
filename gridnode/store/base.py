"""
The object store contract.

A *backend* is a plain, blocking object (file folder, S3 bucket, memory) with
S3's semantics: ETag is the MD5 of a single-part object's bytes, conditional
puts with ``if_none_match="*"`` or ``if_match=etag``, conditional deletes,
listing by prefix in key order with pagination, and multipart uploads (an
object put in numbered parts, then completed or aborted: how a body still
arriving is stored as it comes). `ObjectStore` runs a backend's
calls on dedicated, bounded thread pools so the reactor never blocks; every
method returns a Deferred.
"""

from __future__ import annotations

import builtins
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed

from gridnode.store.rate import ANSWER, LANES, Gate

T = TypeVar("T")

#: the smallest part of a multipart upload but its last (S3's rule)
MIN_PART = 5 * 1024 * 1024
#: threads of a store's calls, and as many again for its bodies
THREADS = 8


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified: float = 0.0


@dataclass(frozen=True)
class Page:
    items: list[ObjectInfo] = field(default_factory=list)
    #: pass as ``start_after`` to read the next page; None on the last page
    next_after: str | None = None


class Backend(Protocol):
    """What every store backend does, blocking. Keys are checked by `gridnode.keys`."""

    #: a URL of the store, for logs and ``/health``
    url: str
    #: the part size a body still arriving is streamed to the store in (gridnode/store/streamed.py);
    #: None: the store takes a body whole once it is complete (a local folder: a copy there costs
    #: less than the parts would)
    part_size: int | None

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None,
    ) -> ObjectInfo: ...

    def put_file(
        self, key: str, path: str, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None, handed_over: bool = False,
    ) -> ObjectInfo:
        """``handed_over``: the caller never writes the file again (it may remove it), so a folder
        store may keep the file itself (a hard link) rather than a copy."""
        ...

    def get_bytes(self, key: str, *, max_size: int | None = None) -> tuple[bytes, ObjectInfo]: ...

    def get_file(self, key: str, path: str) -> ObjectInfo: ...

    def stat(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> Page: ...

    def delete(self, key: str, *, if_match: str | None = None) -> None: ...

    def presigned_url(self, key: str, expires: int = 3600) -> str | None: ...

    # A multipart upload: begun, parts put from a file or copied from a stored object inside the
    # store (numbered from 1; every part but the last of ``MIN_PART`` at least on S3), then
    # finished (the object appears whole, at once) or aborted (nothing is left). Until then the
    # key's current object, if any, is unchanged.

    def begin_upload(self, key: str, *, content_type: str | None = None) -> str: ...

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int, length: int) -> str: ...

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> str: ...

    def finish_upload(self, key: str, upload_id: str, parts: builtins.list[tuple[str, int]]) -> ObjectInfo: ...

    def abort_upload(self, key: str, upload_id: str) -> None: ...

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str]]: ...

    def local_path(self, key: str) -> str | None: ...

    def close(self) -> None: ...


class ObjectStore:
    """
    The asynchronous face of a backend. ``run`` is how a blocking call is
    made: in production a bounded thread pool, in unit tests a plain call.
    Bodies (inputs, outputs, multipart parts) go through ``data_run``, their own
    threads, so a record write never queues behind another upload's parts.
    With a `Gate` (gridnode/store/rate.py), every other call waits for a token
    in this store's ``lane`` first; bodies take none.
    """

    def __init__(self, backend: Backend, run: Callable[..., Deferred[Any]], *,
                 data_run: Callable[..., Deferred[Any]] | None = None, gate: Gate | None = None,
                 lane: str = ANSWER) -> None:
        self.backend = backend
        self._run = run
        self._data_run = data_run or run
        self.gate = gate
        self.lane = lane

    @classmethod
    def synchronous(cls, backend: Backend) -> ObjectStore:
        """A store whose Deferreds have fired on return: for unit tests."""

        def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            try:
                return succeed(fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - handed to the caller's errback
                return fail(e)

        return cls(backend, run)

    @classmethod
    def threaded(cls, backend: Backend, reactor: Any, threads: int = THREADS) -> ObjectStore:
        """A store on two thread pools of ``threads`` each (calls, bodies), stopped with the reactor."""
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        def pool_run(name: str) -> Callable[..., Deferred[Any]]:
            pool = ThreadPool(minthreads=0, maxthreads=threads, name=name)
            pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", pool.stop)

            def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, pool, fn, *args, **kwargs)

            return run

        return cls(backend, pool_run("gridnode-store"), data_run=pool_run("gridnode-store-data"))

    def wrapped(self, wrap: Callable[[Callable[..., Deferred[Any]]], Callable[..., Deferred[Any]]]) -> ObjectStore:
        """The same backend, each call made through ``wrap(run)`` (the metrics time them)."""
        return ObjectStore(self.backend, wrap(self._run), data_run=wrap(self._data_run), gate=self.gate,
                           lane=self.lane)

    def gated(self, gate: Gate) -> ObjectStore:
        """The same backend, every call but bodies' waiting for a token of ``gate``."""
        return ObjectStore(self.backend, self._run, data_run=self._data_run, gate=gate, lane=self.lane)

    def in_lane(self, lane: str) -> ObjectStore:
        """The same store, its calls waiting in ``lane`` for their tokens (`KEEP`, `ANSWER`,
        `BACKGROUND`)."""
        if lane not in LANES:
            raise ValueError(f"no lane {lane!r}")
        return ObjectStore(self.backend, self._run, data_run=self._data_run, gate=self.gate, lane=lane)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """One request on a record, marker or listing: through the gate, when there is one."""
        if self.gate is None:
            return self._run(fn, *args, **kwargs)
        return self.gate.run(self.lane, lambda: self._run(fn, *args, **kwargs))

    @property
    def url(self) -> str:
        return self.backend.url

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> Deferred[ObjectInfo]:
        return self._call(self.backend.put_bytes, key, data, **kw)

    def put_file(self, key: str, path: str, **kw: Any) -> Deferred[ObjectInfo]:
        return self._data_run(self.backend.put_file, key, path, **kw)

    def get_bytes(self, key: str, **kw: Any) -> Deferred[tuple[bytes, ObjectInfo]]:
        return self._call(self.backend.get_bytes, key, **kw)

    def get_file(self, key: str, path: str) -> Deferred[ObjectInfo]:
        return self._data_run(self.backend.get_file, key, path)

    def stat(self, key: str) -> Deferred[ObjectInfo]:
        return self._call(self.backend.stat, key)

    def list(self, prefix: str, **kw: Any) -> Deferred[Page]:
        return self._call(self.backend.list, prefix, **kw)

    def list_all(self, prefix: str) -> Deferred[builtins.list[ObjectInfo]]:
        """Every object under ``prefix``, all pages read: in the thread, or a page a token."""
        if self.gate is None:
            return self._run(list_all, self.backend, prefix)
        return self._paged(prefix)

    @inlineCallbacks
    def _paged(self, prefix: str) -> Any:
        items: builtins.list[ObjectInfo] = []
        after: str | None = None
        while True:
            page = yield self.list(prefix, start_after=after)
            items.extend(page.items)
            if page.next_after is None:
                return items
            after = page.next_after

    def delete(self, key: str, **kw: Any) -> Deferred[None]:
        return self._call(self.backend.delete, key, **kw)

    def presigned_url(self, key: str, expires: int = 3600) -> Deferred[str | None]:
        return self._run(self.backend.presigned_url, key, expires)  # signed here: no request

    @property
    def part_size(self) -> int | None:
        return self.backend.part_size

    def begin_upload(self, key: str, **kw: Any) -> Deferred[str]:
        return self._data_run(self.backend.begin_upload, key, **kw)

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int,
                 length: int) -> Deferred[str]:
        return self._data_run(self.backend.put_part, key, upload_id, number, path, offset, length)

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> Deferred[str]:
        return self._data_run(self.backend.copy_part, key, upload_id, number, source)

    def finish_upload(self, key: str, upload_id: str,
                      parts: builtins.list[tuple[str, int]]) -> Deferred[ObjectInfo]:
        return self._data_run(self.backend.finish_upload, key, upload_id, parts)

    def abort_upload(self, key: str, upload_id: str) -> Deferred[None]:
        return self._data_run(self.backend.abort_upload, key, upload_id)

    def local_path(self, key: str) -> str | None:
        return self.backend.local_path(key)

    def flush(self, path: str) -> Deferred[None]:
        """Write what is written of the local file ``path`` to disk, on the store's threads: a body
        bound for a store that takes it whole is flushed as it arrives, so the put that makes it
        durable has only its tail left to write."""
        return self._data_run(fdatasync, path)


def fdatasync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes of the file ``path`` from ``offset``: a part of a body (never more than
    a part is read into memory at once)."""
    with open(path, "rb", buffering=0) as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise OSError(f"{path} holds {len(data)} bytes at {offset}, not the {length} of the part")
    return data


def list_all(backend: Backend, prefix: str) -> list[ObjectInfo]:
    items: list[ObjectInfo] = []
    after: str | None = None
    while True:
        page = backend.list(prefix, start_after=after)
        items.extend(page.items)
        if page.next_after is None:
            return items
        after = page.next_after


class FileWindow(io.RawIOBase):
    """``length`` bytes of the file ``path`` from ``offset``, as a seekable file of their own."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        super().__init__()
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._offset = offset
        self._length = length
        self._pos = 0
        if os.fstat(self._file.fileno()).st_size < offset + length:
            self._file.close()
            raise OSError(f"{path} holds fewer than the {offset + length} bytes of this part")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def read(self, size: int | None = -1) -> bytes:
        left = self._length - self._pos
        n = left if size is None or size < 0 else min(size, left)
        data = os.pread(self._file.fileno(), n, self._offset + self._pos) if n > 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._file.close()
        super().close()
