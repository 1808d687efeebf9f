"""The upload store under tus, without HTTP: its stored format, its chunk files, its catch-up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from gridnode import keys
from gridnode.errors import GridnodeError
from gridnode.uploads.files import Chunk
from gridnode.uploads.info import Part, UploadInfo
from tests.test_tus import Pool, create, patch


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    pool = Pool(Clock(), tmp_path)
    yield pool
    pool.close()


class UploadInfoTests:
    def test_round_trip(self) -> None:
        """An info object reads back as it was written."""
        parts = (Part(keys.new_id(), 10, "ab" * 32), Part(keys.new_id(), 5, "cd" * 32))
        info = UploadInfo(id=keys.new_id(), length=40, offset=15, created=1.5, expires=2.5,
                          metadata="filename YQ==", filename="a", presets="poster", parts=parts)
        assert UploadInfo.loads(info.dumps(), info.id) == info

    @pytest.mark.parametrize("change", ["another id", "offset past length", "offset not the parts' sum",
                                        "unreadable"])
    def test_inconsistent_state_is_refused(self, change: str) -> None:
        """The store is shared: an info object that is not JSON, names another upload, or whose offset
        disagrees with its parts or its length is storage_corrupt (500), never trusted."""
        upload_id = keys.new_id()
        info = UploadInfo(id=upload_id, length=10, offset=4, created=0, expires=1,
                          parts=(Part(keys.new_id(), 4, "ab" * 32),))
        data = {
            "another id": replace(info, id=keys.new_id()).dumps(),
            "offset past length": replace(info, length=3).dumps(),
            "offset not the parts' sum": replace(info, offset=5).dumps(),
            "unreadable": b"{not json",
        }[change]
        with pytest.raises(GridnodeError) as e:
            UploadInfo.loads(data, upload_id)
        assert e.value.code == "storage_corrupt" and e.value.status == 500


class ChunkTests:
    def chunk(self, tmp_path: Path, cut: list[Chunk], checksum: str | None = None,
              creation: UploadInfo | None = None) -> Chunk:
        return Chunk(str(tmp_path / "c.chunk"), keys.new_id(), 0, 10, checksum, creation, cut_off=cut.append)

    def test_a_cut_off_chunk_is_offered_for_keeping(self, tmp_path: Path) -> None:
        """A plain chunk cut off mid-way goes to ``cut_off`` with what arrived (tus resumes after it)."""
        cut: list[Chunk] = []
        chunk = self.chunk(tmp_path, cut)
        chunk.write(b"abc")
        chunk.abort()
        assert cut == [chunk] and chunk.size == 3 and os.path.exists(chunk.path)

    def test_what_cannot_be_kept_is_removed(self, tmp_path: Path) -> None:
        """An empty chunk, one with a checksum (it cannot be checked), a creation (no one has its id) and
        a refused one (past its limit) are removed when cut off; a complete one is never aborted."""
        info = UploadInfo(id=keys.new_id(), length=10, offset=0, created=0, expires=1)
        cut: list[Chunk] = []
        for kind in ("empty", "checksum", "creation", "refused"):
            chunk = self.chunk(tmp_path, cut, checksum="ab" * 32 if kind == "checksum" else None,
                               creation=info if kind == "creation" else None)
            if kind == "refused":
                with pytest.raises(GridnodeError) as e:
                    chunk.write(b"x" * 11)
                assert e.value.status == 413
            elif kind != "empty":
                chunk.write(b"abc")
            chunk.abort()
            assert not os.path.exists(chunk.path), kind
        ended = self.chunk(tmp_path, cut)
        ended.write(b"abc")
        ended.end()
        ended.abort()
        assert cut == [] and os.path.exists(ended.path)


class CatchUpTests:
    def test_a_part_that_differs_from_its_record_is_refused(self, pool: Pool) -> None:
        """A node completing an upload fetches the parts it lacks and checks each against the sha256
        the info records: a part changed in the store fails the completion (storage_corrupt, 502)
        rather than becoming a job's input."""
        a, b = pool.node("n1"), pool.node("n2")
        upload_id = create(a, 20)
        assert patch(a, upload_id, 0, b"x" * 10).status_code == 204
        (part,) = [k for k in pool.keys(f"uploads/{upload_id}/") if "/part-" in k]
        pool.backend.put_bytes(part, b"y" * 10)
        r = patch(b, upload_id, 10, b"z" * 10)
        assert r.status_code == 502 and r.json()["error"]["code"] == "storage_corrupt"
        assert upload_id not in b.jobs.active
