"""
Spool files: their sha256, and the disk reserved for them. A body is hashed by a thread reading
behind the writer where the reactor runs threads: those tests run the real reactor and its
threads, so they are in the integration suite; the rest are unit tests on real files.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

import gridnode.spool
from gridnode.errors import GridnodeError
from gridnode.spool import InlineSha256, Spool, SpoolFile, TrailingSha256


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_trailing_digest_equals_hashlib(tmp_path: Path) -> None:
    """Pieces of every size, written while the thread trails: the digest is the file's sha256."""
    spool = Spool(str(tmp_path), reactor)
    f = spool.new("job1")
    assert isinstance(f._hash, TrailingSha256)
    rng = bytes(range(256)) * 4096
    pieces = [rng[: 1 + (i * 7919) % len(rng)] for i in range(40)]
    for piece in pieces:
        f.write(piece)
    f.close(release=False)
    digest = await f.digest()
    assert digest == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert digest == hashlib.sha256((tmp_path / "job1").read_bytes()).hexdigest()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_empty_body(tmp_path: Path) -> None:
    """No write at all: the digest of nothing."""
    f = Spool(str(tmp_path), reactor).new("empty")
    f.close(release=False)
    assert await f.digest() == hashlib.sha256(b"").hexdigest()


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_discard_stops_the_thread(tmp_path: Path) -> None:
    """A refused or cut-off body: the file goes, and so does its hashing thread."""
    before = {t.name for t in threading.enumerate()}
    f = Spool(str(tmp_path), reactor).new("cut")
    f.write(b"x" * 100_000)
    f.discard()
    for _ in range(1000):  # bounded: the thread ends on its own time (a loaded machine's)
        if not any(t.name == "sha256 cut" for t in threading.enumerate()):
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert not os.path.exists(tmp_path / "cut")
    assert "sha256 cut" not in {t.name for t in threading.enumerate()} - before


def test_without_a_threaded_reactor_the_hash_is_inline(tmp_path: Path) -> None:
    """A fake clock runs no threads: bodies are hashed as they are written (unit tests)."""
    f = Spool(str(tmp_path), Clock()).new("inline")
    assert isinstance(f._hash, InlineSha256)
    f.write(b"abc")
    result: list[str] = []
    f.digest().addCallback(result.append)
    assert result == [hashlib.sha256(b"abc").hexdigest()]


@pytest.mark.integration
@pytest.mark.parametrize("size", [0, 1, TrailingSha256.READ, 3 * TrailingSha256.READ + 17])
@pytest_twisted.ensureDeferred
async def test_sizes_around_the_read_size(tmp_path: Path, size: int) -> None:
    """Bodies at and around the thread's read size."""
    body = os.urandom(size)
    f = Spool(str(tmp_path), reactor).new(f"s{size}")
    f.write(body)
    f.close(release=False)
    assert await f.digest() == hashlib.sha256(body).hexdigest()


@implementer(IReactorThreads)
class ThreadedClock(Clock):
    """A clock that says it runs threads (it starts none): what a spool file's choice of hasher sees."""


def test_a_file_not_written_from_its_start_is_hashed_inline(tmp_path: Path) -> None:
    """Appending to a file (or from an offset): the digest is of what is written, not of the file."""
    (tmp_path / "a").write_bytes(b"already here")
    f = SpoolFile(str(tmp_path / "a"), "ab", reactor=ThreadedClock())
    assert isinstance(f._hash, InlineSha256)
    f.write(b"new")
    result: list[str] = []
    f.digest().addCallback(result.append)
    assert result == [hashlib.sha256(b"new").hexdigest()]
    f.close(release=False)


MiB = 1024 * 1024


def _reserving(tmp_path: Path) -> Spool:
    """A spool on a filesystem where reserve works (ext4, xfs, tmpfs...), else skip."""
    spool = Spool(str(tmp_path))
    probe = spool.new("probe")
    try:
        if not probe.reserve(4096):
            pytest.skip("no fallocate(2) for this folder's filesystem")
    finally:
        probe.discard()
    return spool


def test_reserve_allocates_without_growing_the_file(tmp_path: Path) -> None:
    """A declared body's blocks are reserved up front; the file's size still follows the writes."""
    f = _reserving(tmp_path).new("job1")
    assert f.reserve(8 * MiB)
    st = os.stat(f.path)
    assert st.st_size == 0 and st.st_blocks * 512 >= 8 * MiB
    f.write(b"x" * 1000)
    f.close(release=False)
    assert os.path.getsize(f.path) == 1000


def out_of_space_halfway(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) as ext4 does it when the disk fills up meanwhile: half, then ENOSPC."""
    assert gridnode.spool._fallocate is not None
    gridnode.spool._load_fallocate()(fd, mode, offset, length // 2)
    ctypes.set_errno(errno.ENOSPC)
    return -1


def test_no_room_is_insufficient_storage_and_keeps_no_blocks(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A body the disk cannot hold is refused with 507 before a byte of it is read, and the
    blocks the filesystem allocated before it ran out are given back at once."""
    spool = _reserving(tmp_path)
    monkeypatch.setattr(gridnode.spool, "_fallocate", out_of_space_halfway)
    f = spool.new("big")
    with pytest.raises(GridnodeError) as e:
        f.reserve(64 * MiB)
    assert e.value.code == "insufficient_storage" and e.value.status == 507
    assert os.stat(f.path).st_blocks == 0


def test_a_spool_file_is_the_nodes_alone(tmp_path: Path) -> None:
    """An upload body is 0600 and its folder 0700 whatever the umask: no other user, and no
    child of the node, reads another tenant's upload (a child is let read its own input only:
    gridnode.media.sandbox.let_read)."""
    old = os.umask(0o022)
    try:
        spool = Spool(str(tmp_path / "spool"))
        body = spool.new("J")
        body.write(b"video")
        body.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(spool.folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(body.path).st_mode) == 0o600
