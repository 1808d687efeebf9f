"""The metrics of chunks run by the pool (gridnode/metrics.py), on the fakes of the owner's and the
worker's tests: each counter moves when its event happens and no other does, and a label whose
value comes from a peer stays within its few values."""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import globalLogPublisher

from gridnode import chunk_files, keys
from gridnode.chunk_records import POISON, Board
from gridnode.chunk_run import ChunkRun
from gridnode.errors import GridnodeError
from gridnode.metrics import Metrics
from tests import test_chunk_owner as owner_side
from tests import test_chunk_worker as worker_side
from tests.test_chunk_records import result

FAMILIES = ("gridnode_chunks_", "gridnode_chunk_", "gridnode_peer_chunk")


def moved(metrics: Metrics) -> dict[str, float]:
    """Every chunk series off zero, as ``name{label=value,...}``: histograms by their count alone."""
    found = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            if not s.name.startswith(FAMILIES) or s.name.endswith(("_created", "_bucket", "_sum")) or not s.value:
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}"] = s.value
    return found


def owner_rig(tmp: Path, free: int = 0) -> owner_side.Rig:
    return owner_side.Rig(tmp, free=free, metrics=Metrics())


def worker_rig(tmp: Path, run: Any = None) -> worker_side.Rig:
    rig = worker_side.Rig(tmp, run=run, metrics=Metrics())
    ticks = iter(range(0, 10_000, 5))  # each reading of the clock 5 s later than the last
    rig.worker.now = lambda: float(next(ticks))
    return rig


def failing(code: str) -> Any:
    return lambda c, p: fail(GridnodeError(code, code=code, status=422))


def out_of_space(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
    error = GridnodeError("ffmpeg exited with 1", code="ffmpeg_failed", status=422)
    error.stderr_tail = ("av_interleaved_write_frame(): No space left on device",)  # type: ignore[attr-defined]
    return fail(error)


class OwnerMetricsTests:
    def test_made_here_and_offers_sent(self, tmp_path: Path) -> None:
        """A chunk our own worker made counts made_here; the other one's offer to two idle peers
        counts two offers; a peer's done note offers it the next open task: one more."""
        rig = owner_rig(tmp_path, free=1)
        first, _second, _third = rig.start(1), rig.start(2), rig.start(3)
        assert moved(rig.owner.metrics) == {"gridnode_chunk_offers_sent_total{}": 4}
        rig.local_runs[0][1].callback(1500)
        assert result(first) == 1500
        rig.owner.noted("p1", "claimed", owner_side.JOB, "chunk-2")
        rig.finish_as("p1", 2)
        rig.owner.noted("p1", "done", owner_side.JOB, "chunk-2")
        assert moved(rig.owner.metrics) == {"gridnode_chunk_offers_sent_total{}": 5,
                                            "gridnode_chunks_finished_total{code=,result=made_here}": 1,
                                            "gridnode_chunks_finished_total{code=,result=collected}": 1}

    def test_no_idle_peer_no_offer_counted(self, tmp_path: Path) -> None:
        """Nobody idle: nothing is sent and nothing counted, however long the task waits."""
        rig = owner_rig(tmp_path)
        rig.idle = []
        rig.start(2)
        for _ in range(10):
            rig.clock.advance(60)
        assert moved(rig.owner.metrics) == {}

    def test_a_lost_holder_and_poison(self, tmp_path: Path) -> None:
        """Each holder that dies reopens the task (lost_holder); the one that makes it poison does
        not reopen it: the task fails with code poison."""
        rig = owner_rig(tmp_path)
        rig.idle = [(f"p{i}", 1) for i in range(5)]
        d = rig.start(2)
        for i in range(POISON):
            result(rig.peer(f"p{i}").claim(owner_side.JOB, "chunk-2"))
            rig.owner.noted(f"p{i}", "claimed", owner_side.JOB, "chunk-2")
            rig.dead.add(f"p{i}")
            rig.owner.holder_gone(f"p{i}")
            rig.owner.holder_gone(f"p{i}")  # told twice (a death and a look): reopened once
            rig.clock.advance(0)
        with pytest.raises(GridnodeError):
            result(d)
        counted = moved(rig.owner.metrics)
        assert counted.pop("gridnode_chunk_offers_sent_total{}") > 0
        assert counted == {"gridnode_chunks_redone_total{reason=lost_holder}": POISON - 1,
                           "gridnode_chunks_finished_total{code=poison,result=failed}": 1}

    def test_the_old_owners_own_chunk_is_counted_redone(self, tmp_path: Path) -> None:
        """An adopter reopens the chunk the dead owner was making itself: lost_holder too (the
        record counts no lost holder: the job's attempts count that loss)."""
        old = owner_rig(tmp_path, free=1)
        old.start(1)
        new = owner_side.Rig(tmp_path, free=1, node="new", metrics=Metrics())
        new.backend, new.store = old.backend, old.store
        new.owner.board.store = new.owner.store = old.store
        new.dead.add("owner")
        new.start(1)
        assert [t.index for t, _ in new.local_runs] == [1] and new.record(1).lost == 0
        assert moved(new.owner.metrics) == {"gridnode_chunks_redone_total{reason=lost_holder}": 1}

    def test_a_bad_archive_is_counted_redone(self, tmp_path: Path) -> None:
        """An archive that is not its record's size: bad_archive, and nothing finished."""
        rig = owner_rig(tmp_path)
        rig.start(2)
        rig.finish_as("p1", 2)
        rig.backend.put_bytes(keys.chunk_files(owner_side.JOB, "chunk-2") + chunk_files.ARCHIVE, b"short")
        rig.owner.noted("p1", "done", owner_side.JOB, "chunk-2")
        counted = moved(rig.owner.metrics)
        counted.pop("gridnode_chunk_offers_sent_total{}")
        assert counted == {"gridnode_chunks_redone_total{reason=bad_archive}": 1}

    @pytest.mark.parametrize("code,label", [("ffmpeg_failed", "ffmpeg_failed"), ("timeout", "timeout"),
                                            ("output_too_large", "output_too_large"),
                                            ("made_up_by_a_peer_" + "x" * 100, "other")])
    def test_a_peers_failure_by_its_code_bounded(self, tmp_path: Path, code: str, label: str) -> None:
        """A failed record's code is the label when it is a chunk's own; any other code a peer
        writes counts as other (the series stay few)."""
        rig = owner_rig(tmp_path)
        d = rig.start(2)
        board = rig.peer("p1")
        result(board.fail(result(board.claim(owner_side.JOB, "chunk-2")), code, "exited 1"))
        rig.owner.noted("p1", "failed", owner_side.JOB, "chunk-2")
        with pytest.raises(GridnodeError):
            result(d)
        counted = moved(rig.owner.metrics)
        counted.pop("gridnode_chunk_offers_sent_total{}")
        assert counted == {f"gridnode_chunks_finished_total{{code={label},result=failed}}": 1}

    def test_the_stores_trouble_and_a_stop(self, tmp_path: Path) -> None:
        """The archive cannot be fetched: failed, other; a stopped run's waiting tasks: cancelled,
        not failed."""
        rig = owner_rig(tmp_path)
        d = rig.start(2)
        rig.finish_as("p1", 2)

        def down(key: str, path: str) -> Any:
            raise GridnodeError("the store is unreachable", code="storage_unavailable", status=503)

        rig.backend.get_file = down  # type: ignore[method-assign]
        rig.owner.noted("p1", "done", owner_side.JOB, "chunk-2")
        with pytest.raises(GridnodeError):
            result(d)
        waiting = [rig.start(3), rig.start(4)]
        rig.owner.stop(owner_side.JOB)
        for w in waiting:
            with pytest.raises(GridnodeError):
                result(w)
        counted = moved(rig.owner.metrics)
        counted.pop("gridnode_chunk_offers_sent_total{}")
        assert counted == {"gridnode_chunks_finished_total{code=other,result=failed}": 1,
                           "gridnode_chunks_finished_total{code=,result=cancelled}": 2}


class WorkerMetricsTests:
    def test_made_here_timed_and_running(self, tmp_path: Path) -> None:
        """Two peers' chunks made: two claims, two done, each timed claim to end; the gauge counts
        the chunk while it runs and not after."""
        runs: list[Deferred[Any]] = []

        def run(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
            made = rig.run(chunk, progress)
            runs.append(Deferred())
            return runs[-1].addCallback(lambda _: made)

        rig = worker_rig(tmp_path, run)
        rig.publish(2)
        rig.publish(3)
        sample = rig.worker.metrics.registry.get_sample_value
        assert result(rig.worker.offered(worker_side.JOB, "chunk-2")) is True
        assert sample("gridnode_peer_chunks_running") == 1
        runs[0].callback(None)
        assert sample("gridnode_peer_chunks_running") == 0
        result(rig.worker.offered(worker_side.JOB, "chunk-3"))
        runs[1].callback(None)
        assert moved(rig.worker.metrics) == {
            "gridnode_peer_chunk_offers_total{answer=claimed}": 2,
            "gridnode_peer_chunks_finished_total{reason=,result=done}": 2,
            "gridnode_peer_chunk_duration_seconds_count{result=done}": 2}
        assert sample("gridnode_peer_chunk_duration_seconds_sum", {"result": "done"}) == 10.0

    def test_offers_not_taken_by_answer(self, tmp_path: Path) -> None:
        """No worker free: busy; claimed by another node: taken; the job ended: ended; a record
        planted from another job: bad_record. Nothing runs, nothing else counts."""
        rig = worker_rig(tmp_path)
        rig.publish(2)
        rig.worker.can_take = lambda: False
        result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        rig.worker.can_take = lambda: True
        result(Board(rig.store, "w2", lambda: 1.0).claim(worker_side.JOB, "chunk-2"))
        result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        result(rig.worker.offered(worker_side.JOB, "chunk-4"))
        other = worker_side.record(5, job=keys.new_id(1_700_000_200))
        rig.store.backend.put_bytes(keys.chunk_record(worker_side.JOB, "chunk-5"), other.dumps())
        result(rig.worker.offered(worker_side.JOB, "chunk-5"))
        assert moved(rig.worker.metrics) == {"gridnode_peer_chunk_offers_total{answer=busy}": 1,
                                             "gridnode_peer_chunk_offers_total{answer=taken}": 1,
                                             "gridnode_peer_chunk_offers_total{answer=ended}": 1,
                                             "gridnode_peer_chunk_offers_total{answer=bad_record}": 1}

    @pytest.mark.parametrize("run,result_,reason", [
        (failing("ffmpeg_failed"), "failed", "ffmpeg_failed"),
        (failing("timeout"), "failed", "timeout"),
        (lambda c, p: succeed(7), "failed", "ffmpeg_failed"),  # the wrong number of frames
        (failing("cancelled"), "released", "stopped"),
        (failing("duplicate_job"), "released", "run"),
        (out_of_space, "released", "scratch"),  # ffmpeg filled this node's disk
    ])
    def test_a_run_that_ends_without_its_chunk(self, tmp_path: Path, run: Any, result_: str, reason: str) -> None:
        """The chunk's own failure counts failed with its code; this node's, released with why."""
        rig = worker_rig(tmp_path, run)
        rig.publish(2)
        result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        assert moved(rig.worker.metrics) == {
            "gridnode_peer_chunk_offers_total{answer=claimed}": 1,
            f"gridnode_peer_chunks_finished_total{{reason={reason},result={result_}}}": 1,
            f"gridnode_peer_chunk_duration_seconds_count{{result={result_}}}": 1}

    def test_released_before_the_run(self, tmp_path: Path) -> None:
        """A plan that disagrees, or presets this node cannot parse (its templates differ):
        refused; no source in the store: source."""
        rig = worker_rig(tmp_path)
        rig.publish(3, first=worker_side.record(3).first + 1)
        result(rig.worker.offered(worker_side.JOB, "chunk-3"))
        rig.publish(4, spec=[{"name": "v", "container": "no-such-container"}])
        result(rig.worker.offered(worker_side.JOB, "chunk-4"))
        rig.store.backend.delete(keys.input_source(worker_side.JOB))
        rig.sources.forget(worker_side.JOB)
        rig.publish(2)
        result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        assert rig.runs == [] and moved(rig.worker.metrics) == {
            "gridnode_peer_chunk_offers_total{answer=claimed}": 3,
            "gridnode_peer_chunks_finished_total{reason=refused,result=released}": 2,
            "gridnode_peer_chunks_finished_total{reason=source,result=released}": 1,
            "gridnode_peer_chunk_duration_seconds_count{result=released}": 3}

    @pytest.mark.parametrize("trouble,reason", [
        (GridnodeError("down", code="storage_unavailable", status=503), "store"),
        (OSError(errno.ENOSPC, "No space left on device"), "scratch"),
        (KeyError("a bug"), "error"),
    ])
    def test_trouble_after_the_run(self, tmp_path: Path, trouble: Exception, reason: str) -> None:
        """Storing the archive fails (the store, a full disk, a bug): released, with why; only a
        bug's traceback is logged."""
        rig = worker_rig(tmp_path)
        rig.publish(2)

        def put_file(*a: Any, **kw: Any) -> Any:
            raise trouble

        rig.store.backend.put_file = put_file  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        finally:
            globalLogPublisher.removeObserver(events.append)
        assert sum("log_failure" in e for e in events) == (reason == "error"), events
        assert moved(rig.worker.metrics) == {
            "gridnode_peer_chunk_offers_total{answer=claimed}": 1,
            f"gridnode_peer_chunks_finished_total{{reason={reason},result=released}}": 1,
            "gridnode_peer_chunk_duration_seconds_count{result=released}": 1}

    def test_reopened_under_us_is_lost(self, tmp_path: Path) -> None:
        """The owner reopened the task while it ran here: lost, nothing else."""
        rig = worker_rig(tmp_path)
        rig.publish(2)

        def run(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
            result(rig.owner.reopen(worker_side.JOB, "chunk-2", lambda n: True))
            return rig.run(chunk, progress)

        rig.worker.run_chunk = run
        result(rig.worker.offered(worker_side.JOB, "chunk-2"))
        assert moved(rig.worker.metrics) == {
            "gridnode_peer_chunk_offers_total{answer=claimed}": 1,
            "gridnode_peer_chunks_finished_total{reason=,result=lost}": 1,
            "gridnode_peer_chunk_duration_seconds_count{result=lost}": 1}


def test_every_family_has_a_row_in_the_operators_table() -> None:
    """Each family the node exports (the chunks' among them) is named in the first column of
    docs/operations.md's metrics table, with the name Prometheus shows."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = text[text.index("\n## Metrics\n"):]
    section = section[:section.index("\n## ", 1)]
    named = {name for line in section.splitlines() if line.startswith("| `")
             for name in re.findall(r"`(gridnode_[a-z_]+)`", line.split(" | ")[0])}
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in Metrics().registry.collect()}
    exported.add("gridnode_tenant_jobs")  # a collector bound at the node's start (bind_tenants)
    assert exported - named == set()
