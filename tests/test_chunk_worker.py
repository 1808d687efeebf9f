"""The worker side of pool-run chunks (gridnode/chunk_worker.py) with fakes: the source fetched
once per job, the argv rebuilt on the worker's paths from its own plan, the archive stored and
the record done; a plan that disagrees, a chunk's own failure, a node's own trouble, a record
reopened under the holder; and the archive (gridnode/chunk_files.py) against hostile content."""

from __future__ import annotations

import io
import os
import tarfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from gridnode import chunk_files, keys
from gridnode.chunk_records import DONE, FAILED, OPEN, Board, ChunkRecord
from gridnode.chunk_run import ChunkRun
from gridnode.chunk_worker import ChunkWorker, Sources
from gridnode.errors import GridnodeError
from gridnode.media import chunks
from gridnode.media.split import Task
from gridnode.media.templates import Catalog
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.test_chunk_records import result
from tests.test_media_chunks import source

JOB = keys.new_id(1_700_000_100)
SPEC = [{"name": "v", "container": "mp4"}]


def plan() -> chunks.Plan:
    return chunks.plan(source(600.0), Catalog().parse(None, SPEC), chunk_seconds=60.0, chunk_over=0)


def record(index: int = 2, **kw: Any) -> ChunkRecord:
    p = plan()
    c = p.chunks[index]
    fields: dict[str, Any] = {"job": JOB, "index": index, "owner": "owner", "chunks": len(p.chunks), "first": c.first,
                              "end": c.end, "rate": str(c.rate), "chunk_seconds": 60.0, "seconds": 60.0,
                              "spec": SPEC, "tenant": "t1", "priority": "high"}
    return ChunkRecord(**(fields | kw))


class Rig:
    """An owner's board, a worker's, and the worker over the memory store with fake media."""

    def __init__(self, tmp: Path, run: Any = None, metrics: Metrics | None = None) -> None:
        self.store = ObjectStore.synchronous(MemoryBackend())
        self.owner = Board(self.store, "owner", lambda: 1.0)
        self.board = Board(self.store, "w1", lambda: 2.0)
        self.probes: list[str] = []
        self.told: list[tuple[str, ...]] = []
        self.runs: list[tuple[ChunkRecord, Task]] = []
        self.store.backend.put_bytes(keys.input_source(JOB), b"source bytes")

        def probe(path: str) -> Deferred[Any]:
            self.probes.append(path)
            return succeed(source(600.0))

        self.sources = Sources(self.store, str(tmp / "chunks"), probe, keep=1)
        self.worker = ChunkWorker(self.board, self.store, self.sources, parse_presets=Catalog().parse,
                                  run_chunk=run or self.run, tell=lambda *a: self.told.append(a), threads=1,
                                  metrics=metrics)

    def run(self, chunk: ChunkRun, progress: Any) -> Deferred[Any]:
        """ffmpeg's stand-in: writes the argv's output file and answers the chunk's frames."""
        rec, task = chunk.record, chunk.task
        assert chunk.source in task.argv[task.argv.index("-i") + 1] and task.argv[-1].startswith(chunk.out_dir)
        self.runs.append((rec, task))
        out = task.argv[-1]
        Path(out).write_bytes(b"chunk video")
        c = plan().chunks[rec.index]
        return succeed(c.frames)

    def publish(self, index: int = 2, **kw: Any) -> None:
        result(self.owner.publish(record(index, **kw)))

    def one_worker_slow_claims(self) -> list[Deferred[Any]]:
        """Chunks 2 and 3 published; the worker has one idle worker (as ChunkGrid's ``can_take``
        says) and each claim waits until its Deferred in the list is fired."""
        self.worker.can_take = lambda: 1 > self.worker.preparing
        self.publish(2)
        self.publish(3)
        claim, pending = self.board.claim, []

        def slow_claim(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append(d)
            return d.addCallback(lambda _: claim(*args))

        self.board.claim = slow_claim  # type: ignore[method-assign]
        return pending


class WorkerTests:
    def test_a_chunk_run_end_to_end(self, tmp_path: Path) -> None:
        """Offered, the worker claims the task, fetches and probes the source once for two chunks,
        runs the chunk's own argv (this node's paths, the record's tenant and priority), stores one
        archive, marks the record done with its frames, tells the owner, and leaves no folder behind."""
        rig = Rig(tmp_path)
        rig.publish(2)
        rig.publish(3)
        assert result(rig.worker.offered(JOB, "chunk-2")) is True
        assert result(rig.worker.offered(JOB, "chunk-3")) is True
        assert len(rig.probes) == 1
        rec, task = rig.runs[0]
        assert (rec.tenant, rec.priority, task.kind, task.index) == ("t1", "high", "chunk", 2)
        source_path = rig.sources.folder_of(JOB) + "/source"
        assert "file:" + source_path in task.argv and str(tmp_path) in task.argv[-1]
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.holder, now.frames) == (DONE, "w1", plan().chunks[2].frames)
        data, _ = result(rig.store.get_bytes(keys.chunk_files(JOB, "chunk-2") + chunk_files.ARCHIVE))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert [m.name for m in tar] == ["v.mp4"] and now.size == len(data)
        assert rig.told == [("owner", "claimed", JOB, "chunk-2"), ("owner", "done", JOB, "chunk-2"),
                            ("owner", "claimed", JOB, "chunk-3"), ("owner", "done", JOB, "chunk-3")]
        assert not os.path.exists(rig.worker._folder(rec)) and rig.worker.running == {}
        assert rig.worker.preparing == 0

    def test_not_taken_when_busy_or_already_claimed(self) -> None:
        """No worker free: no claim (no request); a task claimed by another node: False."""
        rig = Rig(Path("/nonexistent"))
        rig.worker.can_take = lambda: False
        rig.publish(2)
        assert result(rig.worker.offered(JOB, "chunk-2")) is False
        assert result(rig.owner.read(JOB, "chunk-2")).record.state == OPEN
        result(Board(rig.store, "w2", lambda: 1.0).claim(JOB, "chunk-2"))
        rig.worker.can_take = lambda: True
        assert result(rig.worker.offered(JOB, "chunk-2")) is False

    def test_one_worker_claims_one_of_offers_that_come_together(self, tmp_path: Path) -> None:
        """An owner offers several chunks at once: while the first claim is on its way, the
        worker's one idle worker counts as taken, so the others are not claimed (to wait in its
        queue while the owner's own worker idles)."""
        rig = Rig(tmp_path)
        pending = rig.one_worker_slow_claims()
        first = rig.worker.offered(JOB, "chunk-2")
        assert result(rig.worker.offered(JOB, "chunk-3")) is False and len(pending) == 1
        pending[0].callback(None)
        assert result(first) is True and rig.worker.preparing == 0
        assert result(rig.owner.read(JOB, "chunk-3")).record.state == OPEN

    def test_an_offer_turned_away_gets_its_chance_when_the_claim_is_lost(self, tmp_path: Path) -> None:
        """Two nodes are offered the same chunks: the one whose claim loses (the other was faster)
        claims the next offer it turned away meanwhile, instead of taking none."""
        rig = Rig(tmp_path)
        pending = rig.one_worker_slow_claims()
        first = rig.worker.offered(JOB, "chunk-2")
        assert result(rig.worker.offered(JOB, "chunk-3")) is False
        result(Board(rig.store, "w2", lambda: 1.0).claim(JOB, "chunk-2"))  # the other node first
        pending[0].callback(None)
        assert result(first) is False and len(pending) == 2
        pending[1].callback(None)
        assert [(r.index, r.holder) for r, _task in rig.runs] == [(3, "w1")] and rig.worker.preparing == 0

    def test_a_plan_that_disagrees_is_refused(self, tmp_path: Path) -> None:
        """A record whose cut this node's plan does not give: released as refused, nothing run."""
        rig = Rig(tmp_path)
        rig.publish(2, first=record(2).first + 1)
        assert result(rig.worker.offered(JOB, "chunk-2")) is True
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.refused, rig.runs) == (OPEN, ["w1"], [])
        assert rig.told[-1] == ("owner", "released", JOB, "chunk-2")

    def test_a_chunks_own_failure_fails_the_record(self, tmp_path: Path) -> None:
        """ffmpeg failing, or a chunk with the wrong number of frames: the record fails with the code."""
        rig = Rig(tmp_path, run=lambda c, p: fail(GridnodeError("boom", code="ffmpeg_failed", status=422)))
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.error["code"]) == (FAILED, "ffmpeg_failed")
        assert rig.told[-1] == ("owner", "failed", JOB, "chunk-2")
        rig = Rig(tmp_path, run=lambda c, p: succeed(7))
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert now.state == FAILED and "7 frames" in now.error["message"]

    def test_this_nodes_trouble_releases_it(self, tmp_path: Path) -> None:
        """No source in the store, or a run cancelled here: the task is open again, no holder lost."""
        rig = Rig(tmp_path)
        rig.store.backend.delete(keys.input_source(JOB))
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.lost, now.refused) == (OPEN, 0, [])
        rig = Rig(tmp_path, run=lambda c, p: fail(GridnodeError("stop", code="cancelled", status=409)))
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        assert result(rig.owner.read(JOB, "chunk-2")).record.state == OPEN

    def test_ffmpeg_out_of_space_here_releases_it(self, tmp_path: Path) -> None:
        """ffmpeg failed as this node's scratch disk filled (its ENOSPC line, or the disk found
        full as it exited): the task is open again for another node, no try of the chunk's."""
        def no_space(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
            error = GridnodeError("ffmpeg exited with 1", code="ffmpeg_failed", status=422)
            error.stderr_tail = ("[mp4 @ 0x1] Error writing trailer: No space left on device",)  # type: ignore[attr-defined]
            return fail(error)

        rig = Rig(tmp_path, run=no_space)
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.error, now.lost, now.refused) == (OPEN, None, 0, [])
        assert rig.told[-1] == ("owner", "released", JOB, "chunk-2")
        rig = Rig(tmp_path, run=lambda c, p: fail(GridnodeError("ffmpeg exited with 1", code="ffmpeg_failed",
                                                               status=422)))
        rig.worker.free_space = lambda folder: 0
        rig.publish(2)
        result(rig.worker.offered(JOB, "chunk-2"))
        assert result(rig.owner.read(JOB, "chunk-2")).record.state == OPEN

    def test_reopened_under_the_holder(self, tmp_path: Path) -> None:
        """The owner reopened the task while it ran (it held us gone): the finish writes nothing,
        no archive counts, the owner is not told."""
        rig = Rig(tmp_path, metrics=Metrics())
        rig.publish(2)

        def run(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
            result(rig.owner.reopen(JOB, "chunk-2", lambda n: True))
            return rig.run(chunk, progress)

        rig.worker.run_chunk = run
        result(rig.worker.offered(JOB, "chunk-2"))
        now = result(rig.owner.read(JOB, "chunk-2")).record
        assert (now.state, now.lost) == (OPEN, 1)
        assert [t[1] for t in rig.told] == ["claimed"]
        lost = {"result": "lost", "reason": ""}
        assert rig.worker.metrics.registry.get_sample_value("gridnode_peer_chunks_finished_total", lost) == 1

    def test_an_offer_for_a_job_that_ended(self, tmp_path: Path) -> None:
        """The record is gone (the job ended since the offer): not taken, nothing run, no error."""
        rig = Rig(tmp_path)
        assert result(rig.worker.offered(JOB, "chunk-2")) is False
        assert rig.runs == [] and rig.told == []

    def test_a_hostile_record_is_not_claimed(self, tmp_path: Path) -> None:
        """A record of another job planted under this one is refused before any claim."""
        rig = Rig(tmp_path)
        other = record(2, job=keys.new_id(1_700_000_200))
        rig.store.backend.put_bytes(keys.chunk_record(JOB, "chunk-2"), other.dumps())
        assert result(rig.worker.offered(JOB, "chunk-2")) is False
        assert rig.runs == []

    def test_sources_kept_for_keep_jobs(self, tmp_path: Path) -> None:
        """Past ``keep`` jobs, the oldest unused source is removed from disk."""
        rig = Rig(tmp_path)
        second = keys.new_id(1_700_000_300)
        rig.store.backend.put_bytes(keys.input_source(second), b"x")
        for job in (JOB, second):
            result(rig.sources.get(job))
            rig.sources.done_with(job)
        assert not os.path.exists(rig.sources.folder_of(JOB)) and os.path.exists(rig.sources.folder_of(second))


class ArchiveTests:
    def test_round_trip(self, tmp_path: Path) -> None:
        """A folder's files, nested, come back whole in a folder that replaced the old one."""
        src = tmp_path / "src"
        (src / "c").mkdir(parents=True)
        (src / "v.mp4").write_bytes(b"a" * 1000)
        (src / "c" / "seg-1.m4s").write_bytes(b"b")
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "stale").write_bytes(b"old")
        chunk_files.pack(str(src), str(tmp_path / "a.tar"), 10_000)
        assert sorted(chunk_files.unpack(str(tmp_path / "a.tar"), str(dest), 10_000)) == ["c/seg-1.m4s", "v.mp4"]
        assert (dest / "v.mp4").read_bytes() == b"a" * 1000 and not (dest / "stale").exists()

    def test_pack_refuses_links_and_too_much(self, tmp_path: Path) -> None:
        """A link the child left fails ffmpeg_failed; more bytes than the limit output_too_large."""
        src = tmp_path / "src"
        src.mkdir()
        (src / "v.mp4").write_bytes(b"a" * 100)
        with pytest.raises(GridnodeError) as e:
            chunk_files.pack(str(src), str(tmp_path / "a.tar"), 10)
        assert e.value.code == "output_too_large"
        os.symlink("/etc/passwd", src / "w.mp4")
        with pytest.raises(GridnodeError) as e:
            chunk_files.pack(str(src), str(tmp_path / "a.tar"), 10_000)
        assert e.value.code == "ffmpeg_failed"

    @pytest.mark.parametrize("kind,name", [("link", "v.mp4"), ("file", "../x"), ("file", "/abs"),
                                           ("file", "a/./b"), ("dev", "d"), ("file", "a b")])
    def test_unpack_refuses_hostile_members(self, tmp_path: Path, kind: str, name: str) -> None:
        """Links, devices, absolute or climbing or odd names: bad_chunk, the folder as it was."""
        archive = tmp_path / "h.tar"
        with tarfile.open(archive, "w") as tar:
            info = tarfile.TarInfo(name)
            if kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "dev":
                info.type = tarfile.CHRTYPE
            tar.addfile(info, io.BytesIO(b""))
        dest = tmp_path / "dest"
        dest.mkdir()
        (dest / "keep").write_bytes(b"k")
        with pytest.raises(GridnodeError) as e:
            chunk_files.unpack(str(archive), str(dest), 1000)
        assert e.value.code == "bad_chunk" and (dest / "keep").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "h.tar"]  # no unpacking folder left

    def test_unpack_refuses_garbage_bombs_and_twins(self, tmp_path: Path) -> None:
        """Not a tar, more bytes than allowed, a name twice: bad_chunk."""
        (tmp_path / "g.tar").write_bytes(b"garbage" * 100)
        with pytest.raises(GridnodeError, match="not a tar"):
            chunk_files.unpack(str(tmp_path / "g.tar"), str(tmp_path / "d"), 1000)
        with tarfile.open(tmp_path / "b.tar", "w") as tar:
            for _ in range(2):
                info = tarfile.TarInfo("v.mp4")
                info.size = 600
                tar.addfile(info, io.BytesIO(b"x" * 600))
        with pytest.raises(GridnodeError, match="more than"):
            chunk_files.unpack(str(tmp_path / "b.tar"), str(tmp_path / "d"), 1000)
        with pytest.raises(GridnodeError, match="twice"):
            chunk_files.unpack(str(tmp_path / "b.tar"), str(tmp_path / "d"), 10_000)
        for names in (["a", "a/b"], ["a/b", "a"]):  # a file where a folder must be, and the other way
            with tarfile.open(tmp_path / "f.tar", "w") as tar:
                for name in names:
                    info = tarfile.TarInfo(name)
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))
            with pytest.raises(GridnodeError) as e:
                chunk_files.unpack(str(tmp_path / "f.tar"), str(tmp_path / "d"), 10_000)
            assert e.value.code == "bad_chunk", names


def test_the_plan_is_chunked() -> None:
    """The fixture's plan has the chunks the records name (so the tests above mean something)."""
    assert len(plan().chunks) == 10 and plan().rate == Fraction(25)
