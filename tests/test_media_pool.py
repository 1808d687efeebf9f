"""
The conversion pool: concurrency, FIFO order, the bounded queue (503 busy),
cancellation of queued and running jobs, scratch folders removed on every
path, start-up sweep and counters; plus one real ffmpeg job cancelled mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from gridnode.errors import Busy, GridnodeError
from gridnode.media.ffmpeg import collect_outputs, start_transcode
from gridnode.media.pool import JobSlot, TranscodePool
from gridnode.media.probe import probe
from gridnode.media.templates import parse_presets
from tests.media_samples import FFMPEG, FFPROBE, Clips, group_alive, wait_for


class FakeWork:
    """A work function whose Deferreds the test fires by hand."""

    def __init__(self) -> None:
        self.started: list[JobSlot] = []
        self.pending: dict[str, Deferred[str]] = {}
        self.cancelled: list[str] = []

    def __call__(self, slot: JobSlot) -> Deferred[str]:
        assert slot.scratch.is_dir() and not any(slot.scratch.iterdir())
        (slot.scratch / "partial.mp4").write_bytes(b"x")
        self.started.append(slot)
        d: Deferred[str] = Deferred()
        self.pending[slot.job_id] = d
        slot.on_cancel(lambda: self.cancelled.append(slot.job_id))
        return d

    def finish(self, job_id: str, value: str = "ok") -> None:
        self.pending.pop(job_id).callback(value)

    def fail(self, job_id: str, error: Exception) -> None:
        self.pending.pop(job_id).errback(Failure(error))


def collect(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def code_of(results: list[Any]) -> str:
    assert len(results) == 1 and isinstance(results[0], Failure), results
    value = results[0].value
    assert isinstance(value, GridnodeError)
    return value.code


class PoolTests:
    def make(self, tmp_path: Path, workers: int = 2, queue: int = 2) -> tuple[TranscodePool, FakeWork, task.Clock]:
        clock = task.Clock()
        return TranscodePool(clock, tmp_path / "scratch", workers=workers, queue=queue), FakeWork(), clock

    def test_serves_higher_priority_first_and_tenants_in_turn(self, tmp_path: Path) -> None:
        """One worker busy; tenant a queues three low jobs, b one low and c one normal, then a high
        one comes: high, then normal, then the low ones with a and b in turn; a cancelled queued
        job leaves the order of the rest as it was."""
        pool, work, _ = self.make(tmp_path, workers=1, queue=10)
        pool.submit("busy", work)
        for job_id, rank, tenant in [("a1", 2, "a"), ("a2", 2, "a"), ("a3", 2, "a"), ("b1", 2, "b"),
                                     ("c1", 1, "c"), ("x", 2, "a"), ("h1", 0, "a")]:
            pool.submit(job_id, work, rank=rank, tenant=tenant)
        assert pool.cancel("x")
        for job_id in ["busy", "h1", "c1", "a1", "b1", "a2"]:
            work.finish(job_id)
        assert [s.job_id for s in work.started] == ["busy", "h1", "c1", "a1", "b1", "a2", "a3"]

    def test_runs_workers_at_once_in_fifo_order(self, tmp_path: Path) -> None:
        """Two workers: jobs 1 and 2 run, 3 and 4 wait, and start in submission order as slots free."""
        pool, work, _ = self.make(tmp_path)
        results = {j: collect(pool.submit(j, work)) for j in ["j1", "j2", "j3", "j4"]}
        assert [s.job_id for s in work.started] == ["j1", "j2"]
        assert pool.stats() == {"running": 2, "queued": 2, "workers": 2, "queue_limit": 2, "load": 2.0}
        work.finish("j2", "two")
        assert results["j2"] == ["two"]
        assert [s.job_id for s in work.started] == ["j1", "j2", "j3"]
        work.finish("j1")
        assert [s.job_id for s in work.started][-1] == "j4"

    def test_a_freed_worker_takes_the_next_job_while_the_first_finishes(self, tmp_path: Path) -> None:
        """free_worker(): the next job starts at once; the first keeps its scratch folder (its outputs
        are being stored), can still be cancelled, and its result arrives when its work ends."""
        pool, work, _ = self.make(tmp_path, workers=1)
        first, second = collect(pool.submit("j1", work)), collect(pool.submit("j2", work))
        assert [s.job_id for s in work.started] == ["j1"]
        work.started[0].free_worker()
        work.started[0].free_worker()  # once only
        assert [s.job_id for s in work.started] == ["j1", "j2"]
        assert pool.running == 1 and pool.has_job("j1") and (tmp_path / "scratch" / "j1").is_dir()
        assert pool.sweep() == [] and (tmp_path / "scratch" / "j1").is_dir()
        work.finish("j1", "stored")
        assert first == ["stored"] and not (tmp_path / "scratch" / "j1").exists() and not pool.has_job("j1")
        assert pool.running == 1 and second == []
        work.started[1].free_worker()
        assert pool.cancel("j2") and work.cancelled == ["j2"]
        work.finish("j2")
        assert code_of(second) == "cancelled" and pool.running == 0

    def test_full_queue_is_busy(self, tmp_path: Path) -> None:
        """Workers busy and queue full: busy (503) with a retry_after hint; nothing is queued."""
        pool, work, _ = self.make(tmp_path, workers=1, queue=1)
        pool.submit("a", work)
        pool.submit("b", work)
        with pytest.raises(Busy) as info:
            pool.submit("c", work)
        assert (info.value.code, info.value.status, info.value.retry_after) == ("busy", 503, 30)
        assert pool.queued == 1

    def test_retry_after_follows_recent_jobs(self, tmp_path: Path) -> None:
        """Retry-After is estimated from how long recent jobs took and the queue ahead."""
        pool, work, clock = self.make(tmp_path, workers=1, queue=0)
        pool.submit("a", work)
        clock.advance(40)
        work.finish("a")
        pool.submit("b", work)
        with pytest.raises(Busy) as info:
            pool.submit("c", work)
        assert info.value.retry_after == 40

    def test_scratch_removed_on_success_and_failure(self, tmp_path: Path) -> None:
        """The job's scratch folder is gone when its result is delivered, done or failed."""
        pool, work, _ = self.make(tmp_path)
        seen: list[bool] = []
        ok = pool.submit("ok", work)
        ok.addCallback(lambda _: seen.append((tmp_path / "scratch" / "ok").exists()))
        bad = collect(pool.submit("bad", work))
        work.finish("ok")
        work.fail("bad", GridnodeError("broken", code="ffmpeg_failed"))
        assert seen == [False]
        assert code_of(bad) == "ffmpeg_failed"
        assert list((tmp_path / "scratch").iterdir()) == []

    def test_cancel_queued(self, tmp_path: Path) -> None:
        """A queued job cancelled: fails with cancelled at once and never starts."""
        pool, work, _ = self.make(tmp_path, workers=1)
        pool.submit("a", work)
        queued = collect(pool.submit("b", work))
        assert pool.cancel("b") is True
        assert code_of(queued) == "cancelled"
        work.finish("a")
        assert [s.job_id for s in work.started] == ["a"]
        assert pool.cancel("nope") is False

    def test_cancel_running_waits_for_the_work(self, tmp_path: Path) -> None:
        """A running job cancelled: its hook runs; the result (cancelled) and cleanup wait until the work ends."""
        pool, work, _ = self.make(tmp_path, workers=1)
        running = collect(pool.submit("a", work))
        nxt = collect(pool.submit("b", work))
        assert pool.cancel("a") is True
        assert work.cancelled == ["a"] and running == []
        assert (tmp_path / "scratch" / "a").exists()
        work.fail("a", GridnodeError("stopped", code="cancelled"))
        assert code_of(running) == "cancelled"
        assert not (tmp_path / "scratch" / "a").exists()
        assert [s.job_id for s in work.started] == ["a", "b"] and nxt == []

    def test_cancel_even_if_the_work_succeeds(self, tmp_path: Path) -> None:
        """A job cancelled while running is reported cancelled even if its work then returns a value."""
        pool, work, _ = self.make(tmp_path)
        running = collect(pool.submit("a", work))
        pool.cancel("a")
        work.finish("a")
        assert code_of(running) == "cancelled"

    def test_cancel_without_hooks_cancels_the_deferred(self, tmp_path: Path) -> None:
        """Work that registers no hook is stopped with Deferred.cancel()."""
        pool, _, _ = self.make(tmp_path)
        cancelled: list[bool] = []
        never: Deferred[str] = Deferred(lambda d: cancelled.append(True))
        results = collect(pool.submit("a", lambda slot: never))
        pool.cancel("a")
        assert cancelled == [True] and code_of(results) == "cancelled"

    def test_coroutine_work(self, tmp_path: Path) -> None:
        """An async work function is run and its return value delivered."""
        pool, _, _ = self.make(tmp_path)

        async def work(slot: JobSlot) -> str:
            return slot.scratch.name

        assert collect(pool.submit("job-1", work)) == ["job-1"]

    def test_work_raising_at_once(self, tmp_path: Path) -> None:
        """Work that raises synchronously fails its job and frees the worker."""
        pool, _, _ = self.make(tmp_path, workers=1)

        def broken(slot: JobSlot) -> Deferred[str]:
            raise GridnodeError("nope", code="ffmpeg_failed")

        assert code_of(collect(pool.submit("a", broken))) == "ffmpeg_failed"
        assert pool.running == 0 and not (tmp_path / "scratch" / "a").exists()

    def test_job_ids(self, tmp_path: Path) -> None:
        """Job ids must be safe folder names and unique in the pool."""
        pool, work, _ = self.make(tmp_path)
        for bad in ["", "..", ".", "a/b", "x" * 200, ".hidden"]:
            with pytest.raises(GridnodeError) as info:
                pool.submit(bad, work)
            assert info.value.code == "invalid_job_id"
        pool.submit("a", work)
        with pytest.raises(GridnodeError) as dup:
            pool.submit("a", work)
        assert dup.value.code == "duplicate_job"

    def test_sweep_removes_leftovers(self, tmp_path: Path) -> None:
        """sweep() removes folders and files left by an earlier run, creating the root if needed."""
        pool, work, _ = self.make(tmp_path)
        assert pool.sweep() == []
        (tmp_path / "scratch" / "old" / "hls").mkdir(parents=True)
        (tmp_path / "scratch" / "old" / "hls" / "x.ts").write_bytes(b"x")
        (tmp_path / "scratch" / "stray").write_bytes(b"x")
        pool.submit("live", work)
        assert sorted(pool.sweep()) == ["old", "stray"]
        assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["live"]

    def test_stop_all(self, tmp_path: Path) -> None:
        """stop_all cancels queued and running jobs and fires once the running ones end."""
        pool, work, _ = self.make(tmp_path, workers=1)
        a = collect(pool.submit("a", work))
        b = collect(pool.submit("b", work))
        stopped = collect(pool.stop_all())
        assert code_of(b) == "cancelled" and stopped == []
        work.fail("a", CancelledError())
        assert code_of(a) == "cancelled" and stopped == [None]

    def test_stop_all_does_not_wait_for_outputs_being_stored(self, tmp_path: Path) -> None:
        """A job whose ffmpeg is done (its worker freed) and whose outputs wait on the store does
        not hold the stop: the store may be down, and no ffmpeg of it is left."""
        pool, work, _ = self.make(tmp_path, workers=1)
        storing = collect(pool.submit("a", work))
        work.started[0].free_worker()
        assert collect(pool.stop_all()) == [None] and storing == []

    def test_default_workers_is_cpu_count(self, tmp_path: Path) -> None:
        """workers defaults to the CPU count."""
        assert TranscodePool(task.Clock(), tmp_path).workers == (os.cpu_count() or 1)


@pytest.mark.integration
class PoolWithFfmpegTests:
    @pytest_twisted.ensureDeferred
    async def test_real_job_done_and_cancelled(self, real_reactor: Any, media_clips: Clips, tmp_path: Path) -> None:
        """A real job's outputs are readable inside the work; a cancelled one leaves no ffmpeg and no scratch."""
        source = await probe(real_reactor, str(media_clips.landscape), ffprobe=FFPROBE)
        presets = parse_presets("mp4-480p,poster")
        pool = TranscodePool(real_reactor, tmp_path / "scratch", workers=1, queue=4)
        pids: list[int] = []

        async def work(slot: JobSlot) -> list[str]:
            run = start_transcode(real_reactor, source, str(media_clips.landscape), str(slot.scratch), presets,
                                  ffmpeg=FFMPEG)
            assert run.pid is not None
            pids.append(run.pid)
            slot.on_cancel(run.cancel)
            await run.deferred
            return [f.name for f in collect_outputs(str(slot.scratch), source, presets)]

        assert sorted(await pool.submit("done", work)) == ["mp4-480p.mp4", "poster.jpg"]
        second = pool.submit("cancel-me", work)
        await wait_for(real_reactor, lambda: len(pids) == 2)
        pool.cancel("cancel-me")
        with pytest.raises(GridnodeError) as info:
            await second
        assert info.value.code == "cancelled"
        assert not group_alive(pids[1])
        assert list((tmp_path / "scratch").iterdir()) == []
