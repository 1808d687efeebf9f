"""
Upload bodies go to disk as they arrive, never into memory.

twisted.web's stock Request buffers a body of 100 kB or more into an
anonymous temporary file, has no size limit, and parses multipart bodies
whole in memory. `GridRequest` asks the site, once the headers are in and
before any body byte is read, where the body should go:

- an upload route answers with a `SpoolFile` (a named file in the spool,
  hashed as it is written, renamed later rather than copied), after the
  admission checks: draining, queue full (503 + Retry-After), too little
  disk (507), declared size over ``--max-upload`` (413); a declared size
  is reserved on disk up front (``reserve``);
- any other route gets a small in-memory body with a hard cap.

A refusal is answered at once (clients sending ``Expect: 100-continue``
never send the body); the body of a refused request is read and dropped up
to a bound, then the connection is closed, so the client sees the answer
rather than a reset.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.web.server import Request, Site

from gridnode.errors import GridnodeError
from gridnode.web.splice import BodySplice, can_splice

#: socket reads of an upload body
UPLOAD_READ_SIZE = 512 * 1024
#: bodies of non-upload requests (JSON, tus creation) stay this small
SMALL_BODY = 64 * 1024
#: seconds a refused request's connection may linger before it is cut
REFUSED_LINGER = 30.0
#: how much of a refused body is read and dropped before the connection is closed
DRAIN_REFUSED = 64 * 1024 * 1024


def _load_fallocate() -> Any:
    """fallocate(2), which Python's os module lacks (os.posix_fallocate falls back to writing
    zeros where a filesystem cannot), or None where the C library has none (not Linux)."""
    try:
        call = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return call


_fallocate = _load_fallocate()
_FALLOC_FL_KEEP_SIZE = 1


def reserve(fd: int, length: int) -> bool:
    """Reserve ``length`` bytes of disk for the file ``fd`` is about to receive; its size does not
    change. The filesystem then allocates the file's extents once instead of page by page as the
    writes come (~10 % more receiving speed through a Python read loop on ext4: bench/pipeline.py,
    ingest), and a body that cannot fit is known before a byte of it is read. False where it
    cannot be done (no fallocate here, or not on this filesystem); a full disk or quota is a 507
    ``insufficient_storage``."""
    if _fallocate is None or length <= 0:
        return False
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, length) == 0:
        return True
    failed = ctypes.get_errno()
    # ext4 keeps what it allocated before running out: give it back at once (a truncation to
    # the file's own size frees the blocks past its end), not when the file is removed.
    os.ftruncate(fd, os.fstat(fd).st_size)
    if failed in (errno.ENOSPC, errno.EDQUOT):
        raise GridnodeError(f"this node has no room for an upload of {length} bytes; try another node",
                            code="insufficient_storage", status=507)
    return False


class InlineSha256:
    """The sha256 of what is written, computed as it is written, in the writer's thread."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()

    def wrote(self, data: bytes) -> None:
        self.sha256.update(data)

    def result(self) -> Deferred[str]:
        return succeed(self.sha256.hexdigest())

    def cancel(self) -> None:
        pass


class TrailingSha256:
    """The sha256 of a file being written, computed behind the writer so that the reactor thread
    only receives and writes (hashing there halved the upload rate).

    While the body streams in, a thread of its own reads the file behind the writer (from the page
    cache) at idle CPU priority, so it takes only what the receiving does not need. Once the body
    is complete (``result``), what is left is hashed at normal priority in the reactor's thread
    pool: an idle-priority thread on a node busy transcoding would hardly run, and an unprivileged
    thread cannot raise its own priority again. hashlib drops the GIL while it hashes.
    """

    READ = 512 * 1024  # as the socket reads: both stay within a core's L2 cache

    def __init__(self, reactor: Any, path: str) -> None:
        self.reactor = reactor
        self.path = path
        self._cond = threading.Condition()
        self._written = 0
        self._final = False
        self._cancelled = False
        self._done: Deferred[str] = Deferred()
        threading.Thread(target=self._trail, name="sha256 " + os.path.basename(path), daemon=True).start()

    def wrote(self, data: bytes) -> None:
        self.grew(len(data))

    def grew(self, n: int) -> None:
        """``n`` more bytes are in the file (written by someone else: ``BodySplice``)."""
        with self._cond:
            self._written += n
            self._cond.notify()

    def result(self) -> Deferred[str]:
        """No more writes: the digest, once every byte is hashed. Call it once."""
        with self._cond:
            self._final = True
            self._cond.notify()
        return self._done

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify()

    def _hash(self, fd: int, h: Any, done: int, end: int, view: memoryview, stop: Callable[[], bool]) -> int:
        while done < end and not stop():
            n = os.preadv(fd, [view[:min(len(view), end - done)]], done)
            if not n:
                raise OSError(f"{self.path} is shorter than what was written to it")
            h.update(view[:n])
            done += n
        return done

    def _trail(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux only; lowering is always allowed
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        h = hashlib.sha256()
        done = 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view = memoryview(bytearray(self.READ))
                while True:
                    with self._cond:
                        while done >= self._written and not self._final and not self._cancelled:
                            self._cond.wait()
                        if self._cancelled or self._final:
                            break
                        target = self._written
                    done = self._hash(fd, h, done, target, view, lambda: self._final or self._cancelled)
            finally:
                os.close(fd)
        except OSError as e:
            if not self._cancelled:
                self.reactor.callFromThread(self._done.errback, e)
            return
        if not self._cancelled:
            self.reactor.callFromThread(self._finish, h, done)

    def _finish(self, h: Any, done: int) -> None:
        from twisted.internet.threads import deferToThreadPool

        def rest() -> str | None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                end = self._hash(fd, h, done, self._written, memoryview(bytearray(self.READ)),
                                 lambda: self._cancelled)
            finally:
                os.close(fd)
            return None if end < self._written else str(h.hexdigest())

        def fire(digest: str | None) -> None:
            if digest is not None and not self._cancelled:
                self._done.callback(digest)

        def fail(failure: Any) -> None:
            if not self._cancelled:
                self._done.errback(failure)

        deferToThreadPool(self.reactor, self.reactor.getThreadPool(), rest).addCallbacks(fire, fail)


class SpoolFile:
    """A named file in the spool that hashes what is written to it (``digest``)."""

    def __init__(self, path: str, mode: str = "w+b", *, offset: int = 0, limit: int | None = None,
                 reactor: Any = None) -> None:
        self.path = path
        # unbuffered: what write() returns is in the file, where a trailing hasher reads it
        self.file = open(path, mode, buffering=0)  # noqa: SIM115 - closed by close()/discard()
        # a trailing hasher reads the file from its start: only for a file written from its start
        trailing = IReactorThreads.providedBy(reactor) and offset == 0 and "a" not in mode
        self._hash: InlineSha256 | TrailingSha256 = TrailingSha256(reactor, path) if trailing else InlineSha256()
        self.size = offset
        self.start = offset
        #: bytes that arrived by ``grew``, not ``write``
        self.spliced = 0
        self.limit = limit
        #: called once when the body is over (closed or discarded): frees the node's slot
        self.on_release: Callable[[], None] | None = None

    def release(self) -> None:
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()

    def write(self, data: bytes) -> None:
        if self.limit is not None and self.size + len(data) > self.limit:
            raise GridnodeError(
                f"the upload is larger than this node accepts ({self.limit} bytes)", code="too_large", status=413
            )
        view, written = memoryview(data), 0
        while written < len(data):
            n = self.file.write(view[written:])
            if not n:
                raise OSError(f"nothing written to {self.path}")
            written += n
        self._hash.wrote(data)
        self.size += len(data)

    @property
    def grows_in_place(self) -> bool:
        """Whether bytes may reach the file without passing through ``write`` (``grew``): its
        digest is read back from the file, not computed from the bytes written."""
        return isinstance(self._hash, TrailingSha256)

    def grew(self, n: int) -> None:
        """``n`` bytes were appended to the file behind our back (by ``BodySplice``)."""
        assert isinstance(self._hash, TrailingSha256)
        self._hash.grew(n)
        self.size += n
        self.spliced += n

    def reserve(self, length: int) -> bool:
        """Reserve disk for a body of ``length`` bytes (``reserve``); before the first write."""
        return reserve(self.file.fileno(), length)

    def digest(self) -> Deferred[str]:
        """The hex sha256 of what was written; call it once the body is complete."""
        return self._hash.result()

    def use_digest(self, sha256: Any) -> None:
        """The bytes were hashed elsewhere (a tus upload, assembled from its parts)."""
        self._hash.cancel()
        inline = InlineSha256()
        inline.sha256 = sha256
        self._hash = inline

    def received(self) -> int:
        """Bytes received by this request (a tus PATCH appends at an offset)."""
        return self.size - self.start

    # twisted.web's Request.requestReceived seeks and tells the content.
    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def close(self, release: bool = True) -> None:
        self.file.close()
        if release:
            self.release()

    def discard(self) -> None:
        """Close and remove the file: the upload is refused or cut off."""
        self._hash.cancel()
        self.file.close()
        self.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    abort = discard

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Spool:
    """The folder of upload bodies; every file in it belongs to an upload in progress."""

    _log = Logger()

    def __init__(self, folder: str, reactor: Any = None) -> None:
        self.folder = folder
        #: with a reactor that runs threads, bodies are hashed in a thread of their own
        self.reactor = reactor
        os.makedirs(folder, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def new(self, name: str, limit: int | None = None) -> SpoolFile:
        return SpoolFile(self.path(name), limit=limit, reactor=self.reactor)

    def free_bytes(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize

    def sweep(self, keep: Callable[[str], bool] = lambda name: False) -> int:
        """Remove files a crash left behind (at start-up), except those ``keep`` names."""
        removed = 0
        for name in os.listdir(self.folder):
            if keep(name):
                continue
            with contextlib.suppress(OSError):
                os.unlink(self.path(name))
                removed += 1
        if removed:
            self._log.info("removed {count} leftover spool files", count=removed)
        return removed


class BodyRouter(Protocol):
    def __call__(self, method: bytes, path: bytes, request: Request, length: int | None) -> Any: ...


class GridRequest(Request):
    """A Request whose body goes where the site's body router says."""

    _log = Logger()
    _refused: GridnodeError | None = None
    _dropped = 0
    _splice: BodySplice | None = None
    #: the query string, known before the body (request.args is parsed only after it)
    early_query = b""

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        site = self._channel().site
        channel = self._channel()
        # The request line is parsed but not yet set on the request (that
        # happens once the body is in); the channel holds it meanwhile.
        method: bytes = getattr(channel, "_command", b"")
        path, _, self.early_query = getattr(channel, "_path", b"").partition(b"?")
        try:
            sink = site.route_body(method, path, self, length)
        except GridnodeError as e:
            self._refuse(e)
            return
        if sink is not None:
            self.content = sink
            # Read uploads in 512 KiB pieces instead of Twisted's 64 KiB: an eighth of the
            # per-chunk work (parse, write) for the same bytes; larger pieces fall out of L2.
            transport = getattr(channel, "transport", None)
            if transport is not None and hasattr(transport, "bufferSize"):
                transport.bufferSize = UPLOAD_READ_SIZE
            if can_splice(channel, sink, length):
                # once the part of the body that came with the headers went the usual way
                self._splice = BodySplice(site.reactor, channel, sink)
                site.reactor.callLater(0, self._splice.start)
            return
        if length is not None and length > SMALL_BODY:
            self._refuse(GridnodeError(f"a body of more than {SMALL_BODY} bytes is not accepted here",
                                       code="too_large", status=413))
            return
        self.content = _CappedBuffer(SMALL_BODY)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._refused is not None:
            self._dropped += len(data)
            if self._dropped > DRAIN_REFUSED:
                self._channel().transport.loseConnection()
            return
        content: Any = self.content
        try:
            content.write(data)
        except GridnodeError as e:
            self._channel().site.on_refused(e)
            self._refuse(e)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self._refused is not None:
            self._channel().transport.loseConnection()
            return
        super().requestReceived(command, path, version)

    _body_done = False

    def _channel(self) -> Any:
        # Twisted's stubs type channel.site/transport loosely; they are always set here.
        return self.channel

    def process(self) -> None:
        self._body_done = True
        super().process()

    _linger: Any = None

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._splice is not None:
            self._splice.stop()
        # A body cut off mid-way: the sink decides what is kept (nothing for a
        # plain upload; the bytes so far for a resumable one).
        if not self._body_done:
            abort = getattr(self.content, "abort", None)
            if abort is not None:
                abort()
        super().connectionLost(reason)

    def _refuse(self, error: GridnodeError) -> None:
        """Answer now, before (or instead of) reading the body, and close after."""
        self._refused = error
        abort = getattr(self.content, "abort", None)
        if abort is not None:
            abort()
        self.content = io.BytesIO()
        # No "100 Continue" for a request we refuse: the client keeps its body.
        self.requestHeaders.removeHeader(b"expect")
        body = json.dumps(error.to_json()).encode() + b"\n"
        try:
            reason = HTTPStatus(error.status).phrase
        except ValueError:
            reason = "Error"
        head = [
            f"HTTP/1.1 {error.status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            head.append(f"Retry-After: {int(retry_after)}")
        for name, value in self._channel().site.extra_headers(self):
            head.append(f"{name}: {value}")
        self._channel().transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self._log.info("refused a request body: {code}", code=error.code)
        transport = self._channel().transport
        # Half-close: the client reads our answer to its end while we go on reading (and
        # dropping) what it still sends. Closing outright with its body unread would reset
        # the connection, and a client busy sending would never see the answer.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        reactor = getattr(self._channel().site, "reactor", None)
        if reactor is not None:
            self._linger = reactor.callLater(REFUSED_LINGER, transport.abortConnection)


class _CappedBuffer(io.BytesIO):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.cap:
            raise GridnodeError(f"a body of more than {self.cap} bytes is not accepted here",
                                code="too_large", status=413)
        return super().write(data)


class GridSite(Site):
    """A Site that routes bodies and never parses form submissions in memory."""

    requestFactory = GridRequest

    def __init__(self, resource: Any, reactor: Any, route_body: BodyRouter,
                 extra_headers: Callable[[Request], list[tuple[str, str]]] = lambda request: [],
                 on_refused: Callable[[GridnodeError], None] = lambda error: None) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.route_body = route_body
        self.extra_headers = extra_headers
        #: told of bodies refused mid-stream (admission refusals are the router's to count)
        self.on_refused = on_refused
        self.started = time.time()
