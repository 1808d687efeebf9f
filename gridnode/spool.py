"""
Upload bodies on disk: the spool folder, its files, and their sha256.

A body goes to a named file in the spool as it arrives, never into memory,
and is renamed later rather than copied. Its sha256 is computed as it is
written (``InlineSha256``) or, where the reactor runs threads, by a thread
reading the file behind the writer (``TrailingSha256``), so that the
reactor thread only receives and writes. A declared size is reserved on
disk up front (``reserve``), so a body that cannot fit is refused before a
byte of it is read; a body of no declared size is watched as it grows
(``FreeSpace``). The web layer routes request bodies here
(gridnode/web/upload.py); the job service owns the spool.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from gridnode.errors import GridnodeError


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
        raise no_room(f"this node has no room for an upload of {length} bytes; try another node")
    return False


#: while a body streams in, the free space is looked at once per this many bytes of it
CHECK_EVERY = 4 * 1024 * 1024


def no_room(message: str) -> GridnodeError:
    return GridnodeError(message, code="insufficient_storage", status=507)


class FreeSpace:
    """The work folder's free space against ``--min-free``: checked when an upload is admitted,
    and while its body streams in, by the `Meter` each body has."""

    def __init__(self, free_bytes: Callable[[], int], min_free: int, every: int = CHECK_EVERY) -> None:
        self.free_bytes = free_bytes
        self.min_free = min_free
        self.every = every

    def check(self, length: int | None = None,
              message: str = "this node is low on disk space; try another node") -> None:
        """507 when fewer than ``min_free`` bytes would be left once ``length`` more are written."""
        if self.free_bytes() - (length or 0) < self.min_free:
            raise no_room(message)

    def meter(self, message: str = "this node ran low on disk space while the body arrived, and kept "
                                   "nothing of it; send it to another node") -> Meter:
        """A `Meter` for one body; ``message`` says what a body refused mid-way should do."""
        return Meter(self, message)


class Meter:
    """One body's bytes against the free space. A statvfs per read would cost more than the read
    itself: the space is looked at once per ``every`` bytes, so a body stops within that much of
    ``min_free``. Bytes reserved up front (``reserve``) need no look."""

    def __init__(self, space: FreeSpace, message: str) -> None:
        self.space = space
        self.message = message
        self.reserved = 0
        self.total = 0
        self._unchecked = 0

    def add(self, n: int) -> None:
        """``n`` more bytes (about to be) written; a 507 once the folder crossed ``min_free``."""
        self.total += n
        if self.total <= self.reserved:
            return
        self._unchecked += n
        if self._unchecked >= self.space.every:
            self._unchecked = 0
            self.space.check(message=self.message)


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


class Follower(Protocol):
    """Told of a body's growth as it is written (gridnode/store/streamed.py: `StreamedPut` puts it
    into the store as it arrives); ``grew`` may refuse the body with a coded error."""

    def grew(self, size: int) -> None: ...

    def abort(self) -> Any: ...


class SpoolFile:
    """A named file in the spool that hashes what is written to it (``digest``)."""

    def __init__(self, path: str, mode: str = "w+b", *, offset: int = 0, limit: int | None = None,
                 reactor: Any = None, meter: Meter | None = None) -> None:
        self.path = path
        # unbuffered: what write() returns is in the file, where a trailing hasher reads it;
        # 0600: an upload is the node's alone (a child is let read its own: sandbox.let_read)
        self.file = open(path, mode, buffering=0,  # noqa: SIM115 - closed by close()/discard()
                         opener=lambda p, flags: os.open(p, flags, 0o600))
        # a trailing hasher reads the file from its start: only for a file written from its start
        trailing = IReactorThreads.providedBy(reactor) and offset == 0 and "a" not in mode
        self._hash: InlineSha256 | TrailingSha256 = TrailingSha256(reactor, path) if trailing else InlineSha256()
        self.size = offset
        self.start = offset
        #: bytes that arrived by ``grew``, not ``write``
        self.spliced = 0
        self.limit = limit
        #: watches the free space as the body grows (None: not watched)
        self.meter = meter
        #: called once when the body is over (closed or discarded): frees the node's slot
        self.on_release: Callable[[], None] | None = None
        #: follows the body as it grows (puts it into the store); aborted when it is discarded
        self.follower: Follower | None = None

    def release(self) -> None:
        callback, self.on_release = self.on_release, None
        if callback is not None:
            callback()

    def write(self, data: bytes) -> None:
        if self.limit is not None and self.size + len(data) > self.limit:
            raise GridnodeError(f"the upload is larger than allowed here ({self.limit} bytes: this node's "
                                "--max-upload, or your upload token's max_size)", code="too_large", status=413)
        if self.meter is not None:
            self.meter.add(len(data))
        view, written = memoryview(data), 0
        while written < len(data):
            n = self.file.write(view[written:])
            if not n:
                raise OSError(f"nothing written to {self.path}")
            written += n
        self._hash.wrote(data)
        self.size += len(data)
        if self.follower is not None:
            self.follower.grew(self.size)

    @property
    def grows_in_place(self) -> bool:
        """Whether bytes may reach the file without passing through ``write`` (``grew``): its
        digest is read back from the file, not computed from the bytes written."""
        return isinstance(self._hash, TrailingSha256)

    def grew(self, n: int) -> None:
        """``n`` bytes were appended to the file behind our back (by ``BodySplice``); a 507 when the
        folder crossed ``--min-free`` meanwhile."""
        assert isinstance(self._hash, TrailingSha256)
        self._hash.grew(n)
        self.size += n
        self.spliced += n
        if self.meter is not None:
            self.meter.add(n)
        if self.follower is not None:
            self.follower.grew(self.size)

    def reserve(self, length: int) -> bool:
        """Reserve disk for a body of ``length`` bytes (``reserve``); before the first write."""
        done = reserve(self.file.fileno(), length)
        if done and self.meter is not None:
            self.meter.reserved = length
        return done

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
        """Close and remove the file, and what its follower put: the upload is refused or cut off."""
        follower, self.follower = self.follower, None
        if follower is not None:
            follower.abort()
        self._hash.cancel()
        self.file.close()
        self.release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    abort = discard

    @staticmethod
    def remove(path: str) -> None:
        """Remove a body whose job is over. A ``file:`` store may hold the same inode as the job's
        input (it links the spool file rather than copy it), which a child was let read (0640,
        ``sandbox.let_read``; unreachable meanwhile under the store's 0700 folders): private again
        before the spool lets go of it."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)
            os.unlink(path)


class Spool:
    """The folder of upload bodies; every file in it belongs to an upload in progress."""

    _log = Logger()

    def __init__(self, folder: str, reactor: Any = None) -> None:
        self.folder = folder
        #: with a reactor that runs threads, bodies are hashed in a thread of their own
        self.reactor = reactor
        os.makedirs(folder, mode=0o700, exist_ok=True)  # the converter settles who else may pass

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def new(self, name: str, limit: int | None = None, meter: Meter | None = None) -> SpoolFile:
        return SpoolFile(self.path(name), limit=limit, reactor=self.reactor, meter=meter)

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
                SpoolFile.remove(self.path(name))
                removed += 1
        if removed:
            self._log.info("removed {count} leftover spool files", count=removed)
        return removed
