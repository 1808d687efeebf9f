"""
The contract every store backend passes (klein's habit: one suite, run
against the in-memory fake and every real backend). A test module subclasses
`StoreContract` and provides a ``backend`` fixture.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import pytest

from gridnode.errors import GridnodeError, InvalidKey, NotFound, PreconditionFailed


class StoreContract:
    @pytest.fixture
    def backend(self) -> Any:
        raise NotImplementedError

    def test_put_and_get_bytes(self, backend: Any) -> None:
        """Bytes put under a key come back the same, with the MD5 as ETag."""
        info = backend.put_bytes("jobs/a.json", b'{"x": 1}')
        assert info.etag == hashlib.md5(b'{"x": 1}').hexdigest()
        assert info.size == 8
        data, got = backend.get_bytes("jobs/a.json")
        assert data == b'{"x": 1}'
        assert got.etag == info.etag

    def test_put_file_and_get_file(self, backend: Any, tmp_path: Any) -> None:
        """A file goes in and comes out to another path byte for byte. Its ETag is opaque (an
        MD5 on S3 for one part, not for several; a random token in a folder): reads report
        the one the put returned, and a put of other bytes changes it."""
        src = tmp_path / "src.bin"
        payload = os.urandom(3 * 1024 * 1024 + 17)
        src.write_bytes(payload)
        info = backend.put_file("outputs/J/video.mp4", str(src))
        assert info.etag and '"' not in info.etag
        dst = tmp_path / "dst.bin"
        assert backend.get_file("outputs/J/video.mp4", str(dst)).etag == info.etag
        assert dst.read_bytes() == payload
        assert backend.stat("outputs/J/video.mp4").size == len(payload)
        assert backend.stat("outputs/J/video.mp4").etag == info.etag
        src.write_bytes(payload[::-1])
        assert backend.put_file("outputs/J/video.mp4", str(src)).etag != info.etag

    def test_missing_key(self, backend: Any, tmp_path: Any) -> None:
        """Reading or statting a missing key raises NotFound."""
        with pytest.raises(NotFound):
            backend.get_bytes("jobs/missing.json")
        with pytest.raises(NotFound):
            backend.stat("jobs/missing.json")
        with pytest.raises(NotFound):
            backend.get_file("jobs/missing.json", str(tmp_path / "x"))

    def test_max_size(self, backend: Any) -> None:
        """A read with max_size refuses a larger object instead of loading it."""
        backend.put_bytes("registry/dev/p/nodes/n.json", b"x" * 100)
        with pytest.raises(Exception) as e:
            backend.get_bytes("registry/dev/p/nodes/n.json", max_size=10)
        assert getattr(e.value, "code", None) == "too_large"

    def test_overwrite(self, backend: Any) -> None:
        """A plain put replaces the object and its ETag."""
        a = backend.put_bytes("jobs/k.json", b"one")
        b = backend.put_bytes("jobs/k.json", b"two")
        assert a.etag != b.etag
        assert backend.get_bytes("jobs/k.json")[0] == b"two"

    def test_if_none_match(self, backend: Any) -> None:
        """if_none_match='*' creates a key once and then fails with 412."""
        backend.put_bytes("jobs/c.json", b"first", if_none_match="*")
        with pytest.raises(PreconditionFailed):
            backend.put_bytes("jobs/c.json", b"second", if_none_match="*")
        assert backend.get_bytes("jobs/c.json")[0] == b"first"

    def test_if_match(self, backend: Any) -> None:
        """if_match succeeds on the current ETag, fails on an old one, 404s on none."""
        a = backend.put_bytes("jobs/m.json", b"v1")
        b = backend.put_bytes("jobs/m.json", b"v2", if_match=a.etag)
        with pytest.raises(PreconditionFailed):
            backend.put_bytes("jobs/m.json", b"v3", if_match=a.etag)
        assert backend.get_bytes("jobs/m.json")[0] == b"v2"
        backend.put_bytes("jobs/m.json", b"v3", if_match=b.etag)
        with pytest.raises(NotFound):
            backend.put_bytes("jobs/none.json", b"v1", if_match=a.etag)

    def test_conditional_delete(self, backend: Any) -> None:
        """delete(if_match) removes only the version it names."""
        a = backend.put_bytes("registry/e/p/nodes/n1.json", b"inc1")
        backend.put_bytes("registry/e/p/nodes/n1.json", b"inc2")
        with pytest.raises(PreconditionFailed):
            backend.delete("registry/e/p/nodes/n1.json", if_match=a.etag)
        assert backend.get_bytes("registry/e/p/nodes/n1.json")[0] == b"inc2"
        cur = backend.stat("registry/e/p/nodes/n1.json")
        backend.delete("registry/e/p/nodes/n1.json", if_match=cur.etag)
        with pytest.raises(NotFound):
            backend.stat("registry/e/p/nodes/n1.json")

    def test_delete_missing_is_quiet(self, backend: Any) -> None:
        """A plain delete of a missing key succeeds, as S3's does."""
        backend.delete("jobs/never.json")

    def test_list_prefix_sorted_and_paginated(self, backend: Any) -> None:
        """Listing returns only keys under the prefix, in key order, page by page."""
        names = [f"outputs/J/f{i:03d}" for i in range(25)]
        for n in reversed(names):
            backend.put_bytes(n, n.encode())
        backend.put_bytes("outputs/K/other", b"x")
        backend.put_bytes("outputs/Jx", b"x")
        seen: list[str] = []
        after = None
        pages = 0
        while True:
            page = backend.list("outputs/J/", start_after=after, limit=10)
            pages += 1
            seen.extend(i.key for i in page.items)
            if page.next_after is None:
                break
            after = page.next_after
        assert seen == names
        assert pages == 3
        partial = [i.key for i in backend.list("outputs/J").items]
        assert partial == names + ["outputs/Jx"]
        assert all(i.size == len(i.key) for i in backend.list("outputs/J/").items)

    def test_list_empty(self, backend: Any) -> None:
        """An empty prefix lists nothing and has no next page."""
        page = backend.list("registry/none/")
        assert page.items == [] and page.next_after is None

    def test_delete_leaves_nothing_listed(self, backend: Any) -> None:
        """Every key written can be listed and deleted again."""
        for k in ["outputs/J/hls/720p/seg0.ts", "outputs/J/hls/master.m3u8", "inputs/J/source"]:
            backend.put_bytes(k, b"x")
        for info in backend.list("").items:
            backend.delete(info.key)
        assert backend.list("").items == []

    @pytest.mark.parametrize("key", ["", "/a", "a//b", "a/../b", "..", "a/./b", "a b", "a/\x00", "é", "a" * 1025])
    def test_bad_keys_refused(self, backend: Any, key: str) -> None:
        """Keys outside the safe alphabet are refused before any I/O."""
        with pytest.raises(InvalidKey):
            backend.put_bytes(key, b"x")

    @pytest.mark.integration  # real threads racing
    def test_concurrent_conditional_puts_one_wins(self, backend: Any) -> None:
        """Of many racing if_none_match='*' puts on one key, exactly one wins."""
        results: list[str] = []
        barrier = threading.Barrier(8)

        def claim(i: int) -> None:
            barrier.wait()
            try:
                backend.put_bytes("jobs/race.json", f"owner-{i}".encode(), if_none_match="*")
                results.append(f"won-{i}")
            except PreconditionFailed:
                results.append("lost")

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r.startswith("won")]
        assert len(winners) == 1 and results.count("lost") == 7
        assert backend.get_bytes("jobs/race.json")[0] == f"owner-{winners[0][4:]}".encode()

    @pytest.mark.integration  # real threads racing
    def test_concurrent_if_match_one_wins(self, backend: Any) -> None:
        """Of many racing updates on the same ETag, exactly one wins."""
        base = backend.put_bytes("jobs/claim.json", b"unclaimed")
        wins: list[int] = []
        barrier = threading.Barrier(6)

        def claim(i: int) -> None:
            barrier.wait()
            try:
                backend.put_bytes("jobs/claim.json", f"by-{i}".encode(), if_match=base.etag)
                wins.append(i)
            except PreconditionFailed:
                pass

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        assert backend.get_bytes("jobs/claim.json")[0] == f"by-{wins[0]}".encode()

    def test_multipart_upload_round_trips(self, backend: Any, tmp_path: Any) -> None:
        """Parts read from a file by offset, then finished, make one object of those bytes; the
        key's former object stays as it was until the finish, and the upload is gone after."""
        part = 5 * 1024 * 1024  # S3's smallest part but the last
        payload = os.urandom(2 * part + 1234)
        src = tmp_path / "body"
        src.write_bytes(payload)
        backend.put_bytes("inputs/J/source", b"before")
        upload = backend.begin_upload("inputs/J/source")
        assert backend.list_uploads("inputs/") == [("inputs/J/source", upload)]
        parts = []
        for number, offset in enumerate(range(0, len(payload), part), start=1):
            length = min(part, len(payload) - offset)
            parts.append((backend.put_part("inputs/J/source", upload, number, str(src), offset, length), length))
        assert backend.get_bytes("inputs/J/source")[0] == b"before"
        info = backend.finish_upload("inputs/J/source", upload, parts)
        assert info.size == len(payload)
        assert backend.get_bytes("inputs/J/source")[0] == payload
        assert backend.list_uploads("inputs/") == []

    def test_aborted_upload_leaves_nothing(self, backend: Any, tmp_path: Any) -> None:
        """An aborted upload leaves no object and no upload in progress; aborting twice is fine."""
        src = tmp_path / "body"
        src.write_bytes(b"x" * 1000)
        upload = backend.begin_upload("inputs/K/source")
        backend.put_part("inputs/K/source", upload, 1, str(src), 0, 1000)
        backend.abort_upload("inputs/K/source", upload)
        backend.abort_upload("inputs/K/source", upload)
        assert backend.list_uploads("") == []
        with pytest.raises(NotFound):
            backend.stat("inputs/K/source")

    def test_part_of_an_unknown_upload(self, backend: Any, tmp_path: Any) -> None:
        """A part for an upload that was aborted (or never begun) is refused, not stored (S3 says
        404 NoSuchUpload; moto a 500)."""
        src = tmp_path / "body"
        src.write_bytes(b"x" * 10)
        upload = backend.begin_upload("inputs/L/source")
        backend.abort_upload("inputs/L/source", upload)
        with pytest.raises(GridnodeError):
            backend.put_part("inputs/L/source", upload, 1, str(src), 0, 10)
        assert backend.list_uploads("") == []

    def test_parts_copied_from_stored_objects(self, backend: Any, tmp_path: Any) -> None:
        """Stored objects become parts inside the store (no bytes through the caller), followed by
        a part from a file: the object is their concatenation. A missing source is NotFound."""
        part = 5 * 1024 * 1024
        first, second, tail = os.urandom(part), os.urandom(part + 1), b"the end"
        backend.put_bytes("uploads/U/1", first)
        backend.put_bytes("uploads/U/2", second)
        src = tmp_path / "tail"
        src.write_bytes(tail)
        upload = backend.begin_upload("inputs/U/source")
        parts = [(backend.copy_part("inputs/U/source", upload, 1, "uploads/U/1"), part),
                 (backend.copy_part("inputs/U/source", upload, 2, "uploads/U/2"), part + 1),
                 (backend.put_part("inputs/U/source", upload, 3, str(src), 0, len(tail)), len(tail))]
        with pytest.raises(NotFound):
            backend.copy_part("inputs/U/source", upload, 4, "uploads/U/missing")
        backend.finish_upload("inputs/U/source", upload, parts)
        assert backend.get_bytes("inputs/U/source")[0] == first + second + tail
