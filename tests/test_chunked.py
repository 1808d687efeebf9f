"""
gridnode/chunked.py: the node's plan (``--chunk-over``, ``--chunk-seconds``, at most
``MAX_CHUNKS``), the chunk list a job shows, and on real ffmpeg and a real pool a chunked run's
redo of a failed task alone, its failure when a task fails twice, and its cancellation.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gridnode.chunked import MAX_CHUNKS, ChunkedRun, ChunkJob, ChunkStates, LocalTasks, plan_for
from gridnode.errors import GridnodeError
from gridnode.media.pool import JobSlot, TranscodePool
from gridnode.media.probe import Limits, probe
from gridnode.media.sandbox import Sandbox
from gridnode.media.split import Task, TasksFailed
from gridnode.media.templates import Catalog
from tests.media_samples import FFMPEG, FFPROBE, Clips, needs_ffmpeg, wait_for
from tests.test_media_presets import source

VIDEO = dataclasses.replace(source(640, 360, duration=20.0), rate=Fraction(25), frame_rate=25.0)


class PlanTests:
    def test_over_and_off(self) -> None:
        """Longer than --chunk-over: chunks of about --chunk-seconds; off, or not longer: whole."""
        presets = Catalog().parse("mp4-720p")
        assert len(plan_for(VIDEO, presets, chunk_over=0, chunk_seconds=5).chunks) == 4
        assert not plan_for(VIDEO, presets, chunk_over=20, chunk_seconds=5).chunked
        assert not plan_for(VIDEO, presets, chunk_over=None, chunk_seconds=5).chunked

    def test_at_most_max_chunks(self) -> None:
        """A long input with short chunks gets longer ones: its record lists at most MAX_CHUNKS."""
        long = dataclasses.replace(VIDEO, duration=4 * 3600.0)
        plan = plan_for(long, Catalog().parse("mp4-720p"), chunk_over=0, chunk_seconds=1)
        assert MAX_CHUNKS // 2 < len(plan.chunks) <= MAX_CHUNKS

    def test_audio_alone_is_never_chunked(self) -> None:
        """No video rate (audio alone): made whole."""
        audio = dataclasses.replace(VIDEO, rate=None, frame_rate=None, video_codec="")
        assert not plan_for(audio, Catalog().parse("mp4-720p"), chunk_over=0, chunk_seconds=1).chunked


class ChunkStatesTests:
    def test_the_list_as_it_changes(self) -> None:
        """Every chunk queued at first (index, start, seconds, no node, no try); a start puts it
        running on a node and counts a try; failed keys mark their chunks, not other tasks."""
        plan = plan_for(VIDEO, Catalog().parse("mp4-720p"), chunk_over=0, chunk_seconds=5)
        told: list[list[dict[str, Any]]] = []
        states = ChunkStates(plan, VIDEO, told.append)
        states.tell()
        assert told[-1] == [{"index": i, "start": 5.0 * i, "seconds": 5.0, "state": "queued", "node": "", "tries": 0}
                            for i in range(4)]
        states.started(Task("chunk", 2, []), "n1")
        states.started(Task("audio", 0, []), "n1")
        assert told[-1][2] == {"index": 2, "start": 10.0, "seconds": 5.0, "state": "running", "node": "n1", "tries": 1}
        states.failed(["chunk-2", "audio-0", "stitch-0", "chunk-99"])
        assert [c["state"] for c in told[-1]] == ["queued", "queued", "failed", "queued"]
        told[-1][0]["state"] = "changed by a listener"
        assert states.listing()[0]["state"] == "queued"  # listeners get copies


    def test_the_pools_word(self) -> None:
        """The pool's owner side tells each chunk's record state: a holder's run counts one try
        however often it is told (by the pool, then by the worker that runs it here); a holder
        gone puts it back in the queue, its next holder a second try; a chunk made before an
        adoption shows done by its maker with no try of this run."""
        plan = plan_for(VIDEO, Catalog().parse("mp4-720p"), chunk_over=0, chunk_seconds=5)
        states = ChunkStates(plan, VIDEO, None)
        states.noted(1, "claimed", "n1")
        states.noted(1, "claimed", "n1")
        states.started(Task("chunk", 1, []), "n1")
        assert {k: states.listing()[1][k] for k in ("state", "node", "tries")} == {
            "state": "running", "node": "n1", "tries": 1}
        states.noted(1, "open", "")
        assert {k: states.listing()[1][k] for k in ("state", "node", "tries")} == {
            "state": "queued", "node": "", "tries": 1}  # nobody holds it now: no node shown
        states.noted(1, "claimed", "n2")
        states.noted(1, "done", "n2")
        states.noted(3, "done", "p1")
        states.noted(99, "done", "p1")  # no such chunk: nothing changes
        listed = states.listing()
        assert [(c["state"], c["node"], c["tries"]) for c in listed] == [
            ("queued", "", 0), ("done", "n2", 2), ("queued", "", 0), ("done", "p1", 0)]


class TasksFailedTests:
    def test_a_cut_input_is_the_reason(self) -> None:
        """Chunks past the end of a cut input fail too: the job fails with input_truncated,
        whichever failed first."""
        e = TasksFailed({"chunk-4": GridnodeError("exited with status 1", code="ffmpeg_failed", status=422),
                         "chunk-2": GridnodeError("only 9.8 s of 20 s", code="input_truncated", status=422)})
        assert e.code == "input_truncated" and "only 9.8 s" in e.message and list(e.failed) == ["chunk-4", "chunk-2"]


    def test_poison_before_a_plain_failure(self) -> None:
        """A chunk lost with the nodes that held it (``poison``) says why the job fails, not a
        chunk that merely failed beside it."""
        e = TasksFailed({"chunk-1": GridnodeError("exited with status 1", code="ffmpeg_failed", status=422),
                         "chunk-3": GridnodeError("lost with 3 nodes", code="poison", status=422)})
        assert e.code == "poison" and "lost with 3 nodes" in e.message


class HandTasks:
    """Each task a pool entry of the job's tenant and priority, as ``LocalTasks``, ended by the
    test (no process)."""

    def __init__(self, pool: TranscodePool) -> None:
        self.pool = pool
        self.pending: dict[str, Deferred[Any]] = {}
        self.submitted: list[str] = []

    def run(self, job: ChunkJob, task: Task, progress: Any) -> Deferred[Any]:
        entry = f"{job.job_id}.{task.key}"
        self.submitted.append(entry)

        def work(_slot: JobSlot) -> Deferred[Any]:
            job.started(task, "me")
            self.pending[entry] = Deferred()
            return self.pending[entry]

        return self.pool.submit(entry, work, rank=job.rank, tenant=job.tenant, bounded=False)

    def cancel(self, job: ChunkJob) -> None:
        for entry in self.submitted:
            self.pool.cancel(entry)


class FairShareTests:
    def test_another_tenants_jobs_take_turns_with_the_chunks(self, tmp_path: Path) -> None:
        """One worker; bob's eight jobs queued, then alice's chunked job: the worker serves them in
        turn, one of bob's between two of alice's starts while both have some queued (her job
        itself takes a turn, frees its worker as soon as its tasks are queued, and with the
        converter's ``parallel`` of workers + 1 keeps one queued, so she never leaves the round
        between two chunks: with 1 she would get one start to his two). Cancelled, it leaves
        nothing of hers."""
        pool = TranscodePool(Clock(), tmp_path / "scratch", workers=1)
        order: list[str] = []
        bob: dict[str, Deferred[Any]] = {}

        def short(slot: JobSlot) -> Deferred[Any]:
            order.append(slot.job_id)
            bob[slot.job_id] = Deferred()
            return bob[slot.job_id]

        for i in range(8):
            pool.submit(f"bob{i}", short, tenant="bob")
        presets = Catalog().parse("mp4-480p")
        plan = plan_for(VIDEO, presets, chunk_over=0, chunk_seconds=5)
        tasks = HandTasks(pool)
        states = ChunkStates(plan, VIDEO, None)
        run = ChunkedRun("job1", VIDEO, str(tmp_path / "in.mp4"), presets, plan, tasks, FFMPEG, 1, 2, Limits(),
                         None, lambda: None, tenant="alice")

        def coordinator(slot: JobSlot) -> Deferred[Any]:
            order.append(slot.job_id)
            return run.work(slot, lambda: None, lambda _p: None, succeed, states)

        done = pool.submit("job1", coordinator, tenant="alice")
        done.addErrback(lambda f: f.value.code)
        for _ in range(12):  # end whatever holds the worker
            running = [d for d in [*bob.values(), *tasks.pending.values()] if not d.called]
            assert len(running) == 1, order
            running[0].callback(None)
            order.extend(k.split(".", 1)[1] for k in tasks.pending if k.split(".", 1)[1] not in order)
        assert order == ["bob0", "bob1", "job1", "bob2", "chunk-0", "bob3", "chunk-1", "bob4", "chunk-2", "bob5",
                         "chunk-3", "bob6", "audio-0", "bob7"], " ".join(order)
        assert [c["tries"] for c in states.listing()] == [1, 1, 1, 1]
        assert pool.cancel("job1") and done.result == "cancelled"
        assert "job1.stitch-0" in tasks.submitted and not any(pool.has_job(e) for e in ["job1", *tasks.submitted])
        assert pool.running == 1 and pool.queued == 0  # bob's last job


class Flaky:
    """Local tasks, but chunk 1 fails its first ``times`` runs after starting on "elsewhere"."""

    def __init__(self, inner: LocalTasks, times: int, code: str = "ffmpeg_failed") -> None:
        self.inner = inner
        self.times = times
        self.code = code

    def run(self, job: ChunkJob, task: Task, progress: Any) -> Deferred[Any]:
        if task.key == "chunk-1" and self.times > 0:
            self.times -= 1
            job.started(task, "elsewhere")
            return fail(GridnodeError("ffmpeg was killed by signal 9", code=self.code, status=422))
        return self.inner.run(job, task, progress)

    def cancel(self, job: ChunkJob) -> None:
        self.inner.cancel(job)


async def start(reactor: Any, clip: Path, tmp_path: Path,
                flaky: int, code: str = "ffmpeg_failed") -> tuple[TranscodePool, Flaky, ChunkStates, list[Any],
                                                                  Deferred[Any]]:
    info = await probe(reactor, str(clip), ffprobe=FFPROBE)
    presets = Catalog().parse("mp4-480p")
    plan = plan_for(info, presets, chunk_over=0, chunk_seconds=1)
    pool = TranscodePool(reactor, tmp_path / "scratch", workers=2)
    tasks = Flaky(LocalTasks(reactor, pool, "me", lambda: Sandbox(boxed=False)), flaky, code)
    told: list[Any] = []
    states = ChunkStates(plan, info, told.append)
    run = ChunkedRun("job1", info, str(clip), presets, plan, tasks, FFMPEG, 1, 3, Limits(), None, lambda: None)
    done = pool.submit("job1", lambda slot: run.work(slot, lambda: None, lambda _p: None,
                                                     lambda produced: succeed([p.name for p in produced]), states))
    return pool, tasks, states, told, done


@pytest.mark.integration
@needs_ffmpeg
class ChunkedRunTests:
    @pytest_twisted.ensureDeferred
    async def test_a_failed_chunk_is_redone_alone(self, media_clips: Clips, real_reactor: Any,
                                                  tmp_path: Path) -> None:
        """Chunk 1 fails once (its node lost): it alone runs again, the job's outputs are made, and
        the list shows it tried twice, now done here; every other chunk once."""
        pool, tasks, states, told, done = await start(real_reactor, media_clips.landscape, tmp_path, 1)
        assert await done == ["mp4-480p.mp4"]
        listed = states.listing()
        assert len(listed) == 4 and [c["tries"] for c in listed] == [1, 2, 1, 1], listed
        assert all(c["state"] == "done" and c["node"] == "me" for c in listed), listed
        assert any(c[1]["state"] == "failed" and c[1]["node"] == "elsewhere" for c in told), told
        assert pool.running == pool.queued == 0 and tasks.inner._queued == {}  # nothing kept of the job

    @pytest_twisted.ensureDeferred
    async def test_a_chunk_failing_twice_fails_the_job(self, media_clips: Clips, real_reactor: Any,
                                                       tmp_path: Path) -> None:
        """Chunk 1 fails on both runs: the job fails naming it, with its error's code."""
        _pool, _tasks, states, _told, done = await start(real_reactor, media_clips.landscape, tmp_path, 2)
        with pytest.raises(TasksFailed) as e:
            await done
        assert e.value.code == "ffmpeg_failed" and list(e.value.failed) == ["chunk-1"]
        assert states.listing()[1]["state"] == "failed"

    @pytest_twisted.ensureDeferred
    async def test_a_poison_chunk_is_not_run_again(self, media_clips: Clips, real_reactor: Any,
                                                   tmp_path: Path) -> None:
        """Chunk 1 fails as ``poison`` (its holders kept dying): no second run, the job fails
        ``poison``."""
        _pool, tasks, states, _told, done = await start(real_reactor, media_clips.landscape, tmp_path, 2, "poison")
        with pytest.raises(TasksFailed) as e:
            await done
        assert e.value.code == "poison" and tasks.times == 1 and states.listing()[1]["tries"] == 1

    @pytest_twisted.ensureDeferred
    async def test_cancelled_while_its_chunks_run(self, media_clips: Clips, real_reactor: Any,
                                                  tmp_path: Path) -> None:
        """Cancelling the job stops its running chunks and drops its queued ones: it fails with
        ``cancelled`` and the pool is empty."""
        pool, _tasks, _states, _told, done = await start(real_reactor, media_clips.landscape, tmp_path, 0)
        await wait_for(real_reactor, lambda: pool.running >= 2, 30)
        assert pool.cancel("job1")
        with pytest.raises(GridnodeError) as e:
            await done
        assert e.value.code == "cancelled"
        assert pool.running == pool.queued == 0 and not pool.has_job("job1.chunk-0")
