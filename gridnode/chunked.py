"""
Chunked jobs: a job the plan cuts in chunks (gridnode/media/chunks.py) runs as a ``SplitJob``
(gridnode/media/split.py), whose tasks (each chunk, the audio pass, each output's stitch) are run
by a ``ChunkTasks``. ``LocalTasks``, the default, runs each one on a worker of this node's pool
as an entry of the job's own tenant and priority, so fair share (gridnode/media/fair.py) covers
chunks: another tenant's short jobs take turns with a long job's chunks instead of waiting for
all of them. Another ``ChunkTasks`` may run them anywhere, as long as each task's files end up
in the job's work folder. On a node, the chunks themselves go to the pool (gridnode/chunk_grid.py:
``ChunkedRun.pool``): any node's idle workers make them, this node's first, through records in the
store; the audio pass and the stitches stay here.

The job itself holds no worker while its tasks run (it would hold one idle, and with one worker
wait for ever): its pool entry keeps the scratch folder (the chunks' files, the stitched
outputs) and frees its worker once its first tasks are queued. A failed task is redone alone
once (``SplitJob.run()`` again) before the job fails, unless it failed as ``poison`` (a chunk
whose holders kept dying). The job's chunk list (index, start, seconds, state, node, tries) is
told to the runner at each change (``ChunkStates``, the one list: the pool's owner side tells it
too).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from gridnode.media import chunks as plan_chunks
from gridnode.media.ffmpeg import ProducedFile, collect_outputs, max_time_for, spawn_ffmpeg, watermarks
from gridnode.media.finish import write_cmaf_codecs, write_storyboards
from gridnode.media.pool import JobSlot, TranscodePool, cancelled_error
from gridnode.media.presets import Preset, default_output_limit
from gridnode.media.probe import Limits, ProbeResult
from gridnode.media.sandbox import ChildLimits, Sandbox, ffmpeg_processes, let_read, share_with, take_back
from gridnode.media.split import RunTask, SplitJob, Task, TasksFailed
from gridnode.media.stitch import chunk_dir
from gridnode.media.verify import measure_outputs

#: runs of a chunked job's tasks: the first, then the failed ones alone once more
TRIES = 2
#: the most chunks a job is cut in (its record lists them all): a longer input gets longer chunks
MAX_CHUNKS = 500


def plan_for(probe: ProbeResult, presets: Sequence[Preset], *, chunk_over: float | None,
             chunk_seconds: float) -> plan_chunks.Plan:
    """The node's plan for a job: ``--chunk-over``, and chunks of about ``--chunk-seconds``, or
    longer where that would make more than ``MAX_CHUNKS``."""
    seconds = max(chunk_seconds, probe.converted_duration / MAX_CHUNKS)
    return plan_chunks.plan(probe, presets, chunk_seconds=seconds, chunk_over=chunk_over)


@dataclass
class ChunkJob:
    """A chunked job as a ``ChunkTasks`` sees it: whose it is, its ``split`` (plan, probe,
    presets, input and folders), and ``started(task, node)``, to be called when a task starts
    running on a node (by id)."""

    job_id: str
    tenant: str
    rank: int
    split: SplitJob
    started: Callable[[Task, str], None]


class ChunkTasks(Protocol):
    """Where a chunked job's tasks run."""

    def run(self, job: ChunkJob, task: Task, progress: Callable[[float], None]) -> Deferred[Any]:
        """Run ``task``, telling ``job.started`` where it runs and ``progress`` (0..1) as it goes;
        fire once its files are in ``job.split``'s work folder (a stitch's: in its out folder)
        with the video frames it wrote (an int; None where unknown), or fail with its error
        (``cancelled`` once ``cancel`` stopped it)."""
        ...

    def cancel(self, job: ChunkJob) -> None:
        """Stop every task of ``job``, queued or running."""
        ...


class LocalTasks:
    """Each task on a worker of this node's ``pool``, queued as an entry of the job's tenant and
    priority (``<job>.chunk-3``), its ffmpeg in a box that shows it its input and its folder."""

    def __init__(self, reactor: Any, pool: TranscodePool, node_id: str, sandbox: Callable[[], Sandbox],
                 hurried: Callable[[], bool] = lambda: False) -> None:
        self.reactor = reactor
        self.pool = pool
        self.node_id = node_id
        self.sandbox = sandbox
        self.hurried = hurried
        self._queued: dict[str, set[str]] = {}  # job id -> its tasks' pool ids

    def run(self, job: ChunkJob, task: Task, progress: Callable[[float], None]) -> Deferred[Any]:
        split = job.split
        entry = f"{job.job_id}.{task.key}"

        def work(slot: JobSlot) -> Deferred[Any]:
            job.started(task, self.node_id)
            process = spawn_ffmpeg(self.reactor, task.argv, duration=task.seconds or split.probe.duration,
                                   on_progress=progress, label=f"ffmpeg {entry}", limits=self.limits(split, task))
            slot.on_cancel(lambda: process.cancel(at_once=self.hurried()))
            return process.deferred.addCallback(lambda _r: _frames(process.parser.fields)
                                                if task.kind in ("chunk", "stitch") else None)

        def forget(result: Any) -> Any:
            left = self._queued.get(job.job_id)
            if left is not None:
                left.discard(entry)
                if not left:
                    del self._queued[job.job_id]
            return result

        self._queued.setdefault(job.job_id, set()).add(entry)
        return self.pool.submit(entry, work, rank=job.rank, tenant=job.tenant, bounded=False).addBoth(forget)

    def cancel(self, job: ChunkJob) -> None:
        for entry in sorted(self._queued.pop(job.job_id, set())):
            self.pool.cancel(entry)

    def limits(self, split: SplitJob, task: Task) -> ChildLimits:
        """A task's box: a chunk sees the input and writes its own folder; the audio pass writes
        the work folder; a stitch reads the work folder and writes the outputs'."""
        threads = max(1, split.threads or 1)
        out_limit = split.max_output_bytes or default_output_limit(split.probe)
        base = ChildLimits(cpu_seconds=int(max_time_for(split.probe.duration) * threads) + 60,
                           file_size=out_limit + 1024 * 1024, processes=ffmpeg_processes())
        if task.kind == "stitch":
            return self.sandbox().limits(base, reads=[split.work_dir], writes=[split.out_dir])
        reads = [split.input_path, *watermarks(split.presets)]
        folder = os.path.join(split.work_dir, chunk_dir(task.index)) if task.kind == "chunk" else split.work_dir
        return self.sandbox().limits(base, reads=reads, writes=[folder])


def _frames(fields: dict[str, str]) -> int | None:
    """The frames an ffmpeg wrote, from its last ``-progress`` report."""
    try:
        return int(fields["frame"])
    except (KeyError, ValueError):
        return None


class ChunkStates:
    """A chunked job's chunk list, as the job's JSON shows it; ``on_change`` told of each change."""

    def __init__(self, split_plan: plan_chunks.Plan, probe: ProbeResult,
                 on_change: Callable[[list[dict[str, Any]]], None] | None) -> None:
        self.on_change = on_change
        #: the plan the list is of
        self.plan = split_plan
        self.entries: list[dict[str, Any]] = []
        for c in split_plan.chunks:
            seconds = c.seconds if c.seconds is not None else max(0.0, probe.converted_duration - float(c.start))
            self.entries.append({"index": c.index, "start": round(float(c.start), 3), "seconds": round(seconds, 3),
                                 "state": "queued", "node": "", "tries": 0})

    def listing(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self.entries]

    def tell(self) -> None:
        if self.on_change is not None:
            self.on_change(self.listing())

    def set(self, index: int, state: str, node: str | None = None) -> None:
        """Chunk ``index`` is ``state``; a ``node`` it starts running on counts one try (told
        again of the same run, by the pool and by the worker, it counts once)."""
        entry = self.entries[index]
        if node is not None and (entry["state"] != "running" or entry["node"] != node):
            entry["tries"] += 1
        if node is not None:
            entry["node"] = node
        entry["state"] = state
        self.tell()

    def noted(self, index: int, state: str, node: str) -> None:
        """The pool's word on a chunk (gridnode/chunk_owner.py's states): a holder runs it, it is
        open again (its holder gone), made (here, by a peer, or before an adoption), or failed."""
        if 0 <= index < len(self.entries):
            shown = _POOL_STATES.get(state, "queued")
            if shown == "running":
                self.set(index, shown, node)
            else:
                if node or shown == "queued":  # open again: its holder is gone, none is shown
                    self.entries[index]["node"] = node
                self.set(index, shown)

    def started(self, task: Task, node: str) -> None:
        if task.kind == "chunk":
            self.set(task.index, "running", node)

    def failed(self, keys: Sequence[str]) -> None:
        for key in keys:
            kind, _, index = key.partition("-")
            if kind == "chunk" and index.isdigit() and int(index) < len(self.entries):
                self.entries[int(index)]["state"] = "failed"
        self.tell()


#: a chunk record's state (gridnode/chunk_records.py) as the job's chunk list shows it
_POOL_STATES = {"open": "queued", "claimed": "running", "done": "done", "failed": "failed"}


@dataclass
class ChunkedRun:
    """One chunked job's run on this node: queued in ``pool`` as the job, then its tasks through
    ``tasks``; ``finish(outputs)`` once they are stitched, as a whole job's. ``pool``, given the
    job's work folder and the local `RunTask`, gives the `RunTask` that makes its chunks on the
    pool (gridnode/chunk_grid.py); None: every task here."""

    job_id: str
    probe: ProbeResult
    input_path: str
    presets: list[Preset]
    plan: plan_chunks.Plan
    tasks: ChunkTasks
    ffmpeg: str
    threads: int
    parallel: int
    input_limits: Limits
    max_output_bytes: int | None
    user: Callable[[], str | None]
    rank: int = 1
    tenant: str = ""
    pool: Callable[[str, RunTask], RunTask] | None = None
    #: called when the job's entry is cancelled: stops what ``pool`` waits for
    stop_pool: Callable[[], object] | None = None

    _log = Logger()

    def work(self, slot: JobSlot, started: Callable[[], None], progress: Callable[[float], None],
             finish: Callable[[list[ProducedFile]], Deferred[Any]], states: ChunkStates) -> Deferred[Any]:
        return ensureDeferred(self._work(slot, started, progress, finish, states))

    async def _work(self, slot: JobSlot, started: Callable[[], None], progress: Callable[[float], None],
                    finish: Callable[[list[ProducedFile]], Deferred[Any]], states: ChunkStates) -> Any:
        started()
        user = self.user()
        scratch = str(slot.scratch)
        job: ChunkJob | None = None
        work_dir = os.path.join(scratch, "work")

        def local(task: Task, told: Callable[[float], None]) -> Deferred[Any]:
            assert job is not None
            return self.tasks.run(job, task, told)

        runner = local if self.pool is None else self.pool(work_dir, local)

        def run_task(task: Task, told: Callable[[float], None]) -> Deferred[Any]:
            if task.kind == "chunk":
                states.set(task.index, "queued")
            d = runner(task, told)
            if task.kind == "chunk":
                d.addCallback(_then, lambda: states.set(task.index, "done"))
            return d

        split = SplitJob(self.plan, self.probe, self.input_path, self.presets, work_dir,
                         os.path.join(scratch, "out"), run_task, ffmpeg=self.ffmpeg, threads=self.threads,
                         parallel=self.parallel, input_limits=self.input_limits, on_progress=progress,
                         max_output_bytes=self.max_output_bytes, on_list=lambda path: let_read(user, path))
        job = ChunkJob(self.job_id, self.tenant, self.rank, split, states.started)
        split.prepare()
        let_read(user, self.input_path)
        share_with(user, *_folders(scratch))  # private (0700) to the node, and to its children
        slot.on_cancel(lambda: self.tasks.cancel(job))
        if self.stop_pool is not None:
            slot.on_cancel(self.stop_pool)  # chunks held by peers or still open: waited for no more
        for attempt in range(1, TRIES + 1):
            running = split.run()
            if attempt == 1:
                slot.free_worker()  # its tasks are queued: they take the workers, not the job
            try:
                await running
                break
            except TasksFailed as e:
                if slot.cancelled:
                    raise cancelled_error() from None
                states.failed(list(e.failed))
                if attempt == TRIES or e.code in ("input_truncated", "poison"):  # the input will not grow,
                    raise  # and a chunk that killed its holders kills more
                self._log.warn("job {job}: {failed} failed ({error}); redoing them", job=self.job_id,
                               failed=", ".join(e.failed), error=e.message.splitlines()[0])
        take_back(user, scratch)  # what is checked now stays what is read
        out_dir = split.out_dir
        write_storyboards(out_dir, self.probe, self.presets)
        write_cmaf_codecs(out_dir, self.probe, self.presets)
        found = collect_outputs(out_dir, self.probe, self.presets, max_output_bytes=self.max_output_bytes)
        return await finish(measure_outputs(found, self.probe, self.presets))


def _then(result: Any, fn: Callable[[], None]) -> Any:
    fn()
    return result


def _folders(root: str) -> list[str]:
    out = []
    for path, dirs, _files in os.walk(root):
        out.append(path)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(path, d))]
    return out

