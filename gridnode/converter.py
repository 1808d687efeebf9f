"""
The node's media side as the pipeline sees it (`gridnode.media.interface.Media`):
presets, probe and a pool of ffmpeg workers (gridnode/media/), configured
from `NodeConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode.chunked import ChunkedRun, ChunkStates, ChunkTasks, LocalTasks, plan_for
from gridnode.config import NodeConfig, cpu_count
from gridnode.errors import GridnodeError
from gridnode.media.ffmpeg import (
    FfmpegResult,
    ProducedFile,
    collect_outputs,
    max_time_for,
    start_transcode,
)
from gridnode.media.finish import write_cmaf_codecs, write_storyboards
from gridnode.media.interface import SCRATCH_FULL
from gridnode.media.pool import JobSlot, TranscodePool, cancelled_error
from gridnode.media.presets import Preset, job_output_limit
from gridnode.media.probe import Limits, ProbeResult, probe
from gridnode.media.sandbox import (
    Host,
    Sandbox,
    announce,
    check_reachable,
    choose,
    find_host,
    private_folder,
    resolve_user,
    share_with,
    take_back,
)
from gridnode.media.scratch import (
    ScratchSpace,
    free_bytes,
    learned_needs,
    output_estimate,
    ran_out,
    scratch_full,
    wait_limit,
)
from gridnode.media.split import RunTask
from gridnode.media.templates import Catalog, check_inputs
from gridnode.media.verify import OutputWatch, folder_size, measure_outputs

if TYPE_CHECKING:
    from gridnode.media.interface import Media


#: jobs whose learned scratch needs are kept
MAX_LEARNED = 1000


class Converter(Service):
    """A service: started, it settles how children run (``sandbox``: a box, or the node does not
    start unless ``--sandbox weak``), makes the work folders the node's own and clears the
    scratch folder; stopped, it cancels every job."""

    _log = Logger()

    def __init__(self, reactor: Any, config: NodeConfig,
                 find: Callable[..., Host] = find_host) -> None:
        self.reactor = reactor
        self.config = config
        self.limits = Limits(max_duration=float(config.max_duration), max_pixels=config.max_pixels,
                             max_audio_duration=float(config.max_audio_duration))
        # Each ffmpeg gets its share of the cores, not all of them: with every
        # worker busy, that is less context switching and a responsive reactor.
        self.threads = max(1, cpu_count() // config.workers)
        user = resolve_user(config.ffmpeg_user)
        #: as the configuration asks; ``startService`` confirms it or refuses to start
        self.sandbox = Sandbox(boxed=config.sandbox == "bwrap", user=user)
        self._find = find
        #: the built-in presets and the config file's templates
        self.catalog = Catalog(config.templates, config.watermark_dir)
        scratch = os.path.join(config.work_dir, "scratch")
        #: the scratch filesystem's free space, which each job's outputs are checked against
        self.space = ScratchSpace(lambda: free_bytes(scratch))
        # the admission's bound (gridnode/priority.py): a job of higher priority beyond ``queue``
        self.pool = TranscodePool(reactor, scratch, workers=config.workers, queue=2 * config.queue, space=self.space)
        #: a node stopping at once (a second SIGTERM): cancelled ffmpegs get SIGKILL, not a grace
        self.hurried = False
        #: job id -> the scratch bytes a run that ran out showed it needs (its next run waits for them)
        self._needs: dict[str, int] = {}
        #: where a chunked job's tasks run (gridnode/chunked.py): this node's workers by default
        self.chunk_tasks: ChunkTasks = LocalTasks(reactor, self.pool, config.node_id or "", lambda: self.sandbox,
                                                  lambda: self.hurried)
        #: the pool's chunks (gridnode/chunk_grid.py), set by the node: a chunked job's chunks are
        #: made by any node's idle workers (None: all on this node's)
        self.chunk_grid: Any = None

    @property
    def user(self) -> str | None:
        return self.sandbox.user

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        """Settle the sandbox (a trial box); make the work folders the node's own, passable by the
        children's group only; remove scratch folders a crash left behind."""
        super().startService()
        work = self.config.work_dir
        for folder in (os.path.join(work, "spool"), os.path.join(work, "scratch")):
            private_folder(folder, self.user)
        if self.user:
            check_reachable(self.user, work, self.config.ffmpeg_user)
        host = self._find(self.user, trial=self.sandbox.boxed, trial_binary=self.config.ffprobe)
        self.sandbox = choose(self.config.sandbox, host, self.user)
        line = announce(self.sandbox)
        if self.sandbox.boxed:
            self._log.info(line)
        else:
            self._log.warn(line)
        self.pool.sweep()

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        """Cancel every job; fires when no ffmpeg is left."""
        super().stopService()
        return self.pool.stop_all()

    def parse_presets(self, text: str | None, spec: Sequence[Any] | None = None) -> list[Preset]:
        return self.catalog.parse(text, spec)

    def probe(self, path: str) -> Deferred[ProbeResult]:
        return probe(self.reactor, path, ffprobe=self.config.ffprobe, limits=self.limits, sandbox=self.sandbox)

    def check(self, presets: list[Preset], info: ProbeResult) -> None:
        check_inputs(presets, info)

    def run(self, job_id: str, info: ProbeResult, input_path: str, presets: list[Preset],
            started: Callable[[], None], progress: Callable[[float], None],
            finish: Callable[[list[ProducedFile]], Deferred[Any]],
            waiting: Callable[[], None] | None = None, rank: int = 1, tenant: str = "",
            chunks: Callable[[list[dict[str, Any]]], None] | None = None, job: Any = None) -> Deferred[Any]:
        """Queue the job (at priority ``rank``, among ``tenant``'s: gridnode/media/fair.py) until a
        worker and the scratch space its outputs need are free
        (``waiting()`` when it waits for space); then ffmpeg (its output folder watched against
        the job's output limit), its outputs checked whole, then ``finish(outputs)`` while the
        scratch folder still holds them. An ffmpeg that ran out of space fails the run with
        ``scratch_full``, and the job's next run waits for what it showed it needs. A job the
        plan cuts in chunks runs them as tasks of its own (gridnode/chunked.py), ``chunks``
        told of their states; with ``job`` (its record) and a ``chunk_grid``, its chunks are
        made by the pool."""
        per_output = self.config.max_output_bytes
        limit = job_output_limit(info, presets, per_output)
        needs = max(output_estimate(info, presets, per_output), self._needs.get(job_id, 0))
        seconds = self.config.chunk_seconds
        plan = plan_for(info, presets, chunk_over=self.config.chunk_over, chunk_seconds=seconds)
        if plan.chunked:
            states = ChunkStates(plan, info, chunks)
            states.tell()  # listed at once (the upload's answer shows them)
            grid = self.chunk_grid if job is not None else None

            def chunked(slot: JobSlot) -> Deferred[Any]:
                if grid is None:
                    return self._chunked(job_id, info, input_path, presets, states, None, rank, tenant,
                                         self.pool.workers + 1).work(slot, started, progress, finish, states)
                # read with a worker taken, not before the job is queued: the queue keeps the order
                # jobs were accepted in (gridnode/media/fair.py)
                return grid.recorded_chunk_seconds(job_id).addErrback(unread).addCallback(planned, slot, grid)

            def planned(recorded: float | None, slot: JobSlot, grid: Any) -> Deferred[Any]:
                if slot.cancelled:  # while its records were read
                    return fail(cancelled_error())
                # an adopter plans the cuts its records were made with, and keeps the chunks done
                length = recorded or seconds
                cuts = states
                if length != seconds:
                    cuts = ChunkStates(plan_for(info, presets, chunk_over=self.config.chunk_over,
                                                chunk_seconds=length), info, chunks)
                    cuts.tell()

                def on_pool(work_dir: str, local: RunTask) -> RunTask:
                    return grid.run_task(job, cuts.plan, length, work_dir, limit, local, told=cuts.noted)
                # on the pool, every chunk at once (the pool's idle workers say how many run)
                run = self._chunked(job_id, info, input_path, presets, cuts, (on_pool, lambda: grid.stop(job_id)),
                                    rank, tenant, len(cuts.plan.chunks) + 1)
                return run.work(slot, started, progress, finish, cuts)

            def unread(failure: Failure) -> None:
                self._log.warn("job {job}: its chunk records not read ({reason}); planned anew", job=job_id,
                               reason=failure.getErrorMessage())

            # the chunks' files and the stitched outputs are in the scratch folder at once
            return self.pool.submit(job_id, chunked, needs=2 * needs, on_hold=waiting, rank=rank, tenant=tenant,
                                    wait_limit=wait_limit(max_time_for(info.duration)))

        def work(slot: JobSlot) -> Deferred[Any]:
            started()
            out_dir = str(slot.scratch / "out")
            share_with(self.user, str(slot.scratch))  # private (0700) to the node, and to its children
            watch = OutputWatch(self.reactor, out_dir, limit)
            process = start_transcode(self.reactor, info, input_path, out_dir, presets, ffmpeg=self.config.ffmpeg,
                                      on_progress=progress, on_tick=watch.tick, max_output_bytes=per_output,
                                      threads=self.threads, label=f"ffmpeg {job_id}", sandbox=self.sandbox,
                                      input_limits=self.limits)
            slot.on_cancel(lambda: process.cancel(at_once=self.hurried))
            d: Deferred[Any] = process.deferred

            def transcoded(result: FfmpegResult) -> list[ProducedFile]:
                slot.free_worker()  # ffmpeg is done: the next job's may start while these are stored
                take_back(self.user, str(slot.scratch))  # what is checked now stays what is read
                write_storyboards(out_dir, info, presets)  # the VTTs of the sheets ffmpeg made
                write_cmaf_codecs(out_dir, info, presets)  # each rung's codec string in the manifests
                found = collect_outputs(out_dir, info, presets, max_output_bytes=per_output)
                return measure_outputs(found, info, presets, result.stderr_tail)  # whole, or not done

            def failed(failure: Failure) -> Failure:
                error = failure.value
                if not (isinstance(error, GridnodeError) and error.code == "ffmpeg_failed"):
                    return failure  # output_too_large, timeout, cancelled...: never a lack of space
                if not ran_out(getattr(error, "stderr_tail", ()), self.space.free_now()):
                    return failure
                written, _ = folder_size(out_dir)
                reached = process.parser.out_seconds / info.duration if info.duration > 0 else 0.0
                more = learned_needs(needs, written, min(1.0, reached), limit)
                self._learn(job_id, more)
                self._log.warn("job {job}: ffmpeg ran out of scratch space after {written} bytes; it waits for "
                               "{needs} bytes free", job=job_id, written=written, needs=more)
                return Failure(scratch_full(more))  # the pool removes the partial outputs with the folder

            d.addCallbacks(transcoded, failed)
            d.addCallback(finish)
            return d

        def forget(result: Any) -> Any:
            if not (isinstance(result, Failure) and getattr(result.value, "code", None) == SCRATCH_FULL):
                self._needs.pop(job_id, None)  # what a run showed is for the job's next run only
            return result

        queued = self.pool.submit(job_id, work, needs=needs, wait_limit=wait_limit(max_time_for(info.duration)),
                                  on_hold=waiting, rank=rank, tenant=tenant)
        return queued.addBoth(forget)

    def _chunked(self, job_id: str, info: ProbeResult, input_path: str, presets: list[Preset], states: ChunkStates,
                 on_pool: tuple[Callable[[str, RunTask], RunTask], Callable[[], object]] | None, rank: int,
                 tenant: str, parallel: int) -> ChunkedRun:
        """A job made in chunks (``states.plan``'s), ``parallel`` tasks queued at a time: on the
        pool's workers (``on_pool``: the `RunTask` for a work folder and a local runner, and what
        stops it), or on this node's. Here, one task more than the workers stays queued: the job
        keeps its turn among the tenants (media/fair.py) between the end of a chunk and the next."""
        return ChunkedRun(job_id, info, input_path, presets, states.plan, self.chunk_tasks, self.config.ffmpeg,
                          self.threads, parallel, self.limits, self.config.max_output_bytes, lambda: self.user,
                          rank=rank, tenant=tenant, pool=on_pool[0] if on_pool else None,
                          stop_pool=on_pool[1] if on_pool else None)

    def _learn(self, job_id: str, needs: int) -> None:
        # A job handed to the pool never comes back for its entry: keep the newest few.
        self._needs[job_id] = needs
        while len(self._needs) > MAX_LEARNED:
            del self._needs[next(iter(self._needs))]

    def cancel(self, job_id: str) -> bool:
        return self.pool.cancel(job_id)


if TYPE_CHECKING:
    _media: type[Media[Preset, ProbeResult]] = Converter
