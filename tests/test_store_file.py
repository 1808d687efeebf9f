from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from gridnode.errors import InvalidKey, PreconditionFailed
from gridnode.store.file import FileBackend
from tests.store_contract import StoreContract


class FileStoreTests(StoreContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> FileBackend:
        return FileBackend(str(tmp_path / "store"))

    def test_objects_are_plain_files(self, backend: FileBackend) -> None:
        """An object is the file <root>/<key>, so the folder can be browsed."""
        backend.put_bytes("outputs/J/poster.jpg", b"jpeg")
        path = os.path.join(backend.root, "outputs", "J", "poster.jpg")
        assert open(path, "rb").read() == b"jpeg"
        assert backend.local_path("outputs/J/poster.jpg") == path

    def test_the_store_is_the_nodes_own(self, tmp_path: Path) -> None:
        """Whatever the umask, every folder the store makes is 0700 and every file 0600 (objects,
        ETags, the lock, a file fetched out of it), and a root an older version left open is
        closed at open; a shared sticky folder as root is left as it is."""
        old = os.umask(0o022)
        try:
            root = tmp_path / "store"
            root.mkdir(mode=0o755)
            backend = FileBackend(str(root))
            backend.put_bytes("jobs/J.json", b"{}")
            source = tmp_path / "video"
            source.write_bytes(b"v")
            backend.put_file("inputs/J/source", str(source))
            backend.get_file("inputs/J/source", str(tmp_path / "fetched"))
            with backend._locked():
                pass
        finally:
            os.umask(old)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        for path in root.rglob("*"):
            assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
        assert stat.S_IMODE((tmp_path / "fetched").stat().st_mode) == 0o600
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        FileBackend(str(shared))
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777

    def test_own_folder_is_not_a_key(self, backend: FileBackend) -> None:
        """The store's metadata folder is neither writable nor listed."""
        with pytest.raises(InvalidKey):
            backend.put_bytes(".gridnode/lock", b"x")
        backend.put_bytes("a", b"x")
        assert [i.key for i in backend.list("").items] == ["a"]

    def test_file_put_by_hand_gets_an_etag(self, backend: FileBackend) -> None:
        """A file copied into the folder by hand is served with its MD5."""
        os.makedirs(os.path.join(backend.root, "inputs", "J"))
        with open(os.path.join(backend.root, "inputs", "J", "source"), "wb") as f:
            f.write(b"hello")
        assert backend.stat("inputs/J/source").etag == "5d41402abc4b2a76b9719d911017c592"

    def test_delete_prunes_empty_folders(self, backend: FileBackend) -> None:
        """Deleting the last object of a folder removes the folder."""
        backend.put_bytes("outputs/J/hls/720p/seg0.ts", b"x")
        backend.delete("outputs/J/hls/720p/seg0.ts")
        assert not os.path.exists(os.path.join(backend.root, "outputs"))

    def test_key_under_an_object_is_refused(self, backend: FileBackend) -> None:
        """A key that would need an object to be a folder gets a clear error."""
        backend.put_bytes("a/b", b"x")
        with pytest.raises(InvalidKey):
            backend.put_bytes("a/b/c", b"y")
        with pytest.raises(InvalidKey):
            backend.put_bytes("a", b"y")

    def test_no_temporary_files_left(self, backend: FileBackend, tmp_path: Path) -> None:
        """Neither a successful nor a refused put leaves a temporary file."""
        backend.put_bytes("jobs/x.json", b"1", if_none_match="*")
        with pytest.raises(PreconditionFailed):
            backend.put_bytes("jobs/x.json", b"2", if_none_match="*")
        assert os.listdir(os.path.join(backend.root, ".gridnode", "tmp")) == []

    @pytest.mark.integration  # real processes racing
    def test_conditional_puts_across_processes(self, backend: FileBackend) -> None:
        """Two nodes sharing a folder: racing processes, exactly one wins."""
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(backend.root, i, queue)) for i in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        results = [queue.get(timeout=5) for _ in procs]
        assert sorted(results).count("won") == 1


def _claim(root: str, i: int, queue: multiprocessing.Queue[str]) -> None:
    try:
        FileBackend(root).put_bytes("jobs/proc.json", str(i).encode(), if_none_match="*")
        queue.put("won")
    except PreconditionFailed:
        queue.put("lost")

    def test_a_handed_over_file_is_kept_not_copied(self, backend: FileBackend, tmp_path: Path) -> None:
        """A file the caller hands over (a spooled upload it never writes again) becomes the object
        itself on the same filesystem (written to disk once, not copied) and outlives the caller's
        name for it; a file not handed over is copied."""
        src = tmp_path / "body"
        src.write_bytes(b"spooled upload")
        backend.put_file("inputs/J/source", str(src), handed_over=True)
        stored = backend.local_path("inputs/J/source")
        assert stored is not None and os.stat(stored).st_ino == src.stat().st_ino
        src.unlink()
        assert backend.get_bytes("inputs/J/source")[0] == b"spooled upload"
        src.write_bytes(b"kept by its caller")
        backend.put_file("inputs/K/source", str(src))
        assert os.stat(backend.local_path("inputs/K/source") or "").st_ino != src.stat().st_ino
