"""
The worker side of chunks run by the pool: a node offered a task of another node's chunked job
claims its record (gridnode/chunk_records.py), rebuilds the chunk's argv on its own paths, runs
it on one of its own workers under the job's tenant and priority, stores what it made and marks
the record done.

- The source is fetched from the store (``inputs/<job>/source``) once per job per node and
  probed once (`Sources`), then kept for that job's other chunks while the job's offers come,
  the least recently used dropped past ``keep`` jobs.
- The argv is ``chunks.chunk_argv`` of this node's own `chunks.plan` of the job (the record's
  presets and ``chunk_seconds``), and only when that plan gives the record's cut: a node whose
  ffprobe or templates differ releases the task as ``refused`` instead of making a chunk that
  would not join.
- What the chunk made is one archive (gridnode/chunk_files.py) put under
  ``chunks/<job>/<task>/``; then the record is marked done, conditional on our claim.
- Failures: the chunk's own (ffmpeg failed, a limit) fail the record with their code, which
  fails the job as the owner's own run would; this node's trouble (the source cannot be
  fetched, its scratch disk full, ffmpeg out of space there, a stop) releases it for another
  node, no holder lost and no try counted. A record
  reopened under us (`NotHeld`) ends the work silently. Either way the owner is told (``tell``).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger

from gridnode import chunk_files, keys
from gridnode.chunk_records import CHUNK_ERRORS, BadChunk, Board, ChunkRecord, Held, NotHeld, disagrees
from gridnode.chunk_run import ChunkRun
from gridnode.errors import GridnodeError, NotFound
from gridnode.media import chunks as plan_chunks
from gridnode.media.presets import Preset, folders, job_output_limit
from gridnode.media.probe import Limits, ProbeResult
from gridnode.media.sandbox import private_folder
from gridnode.media.scratch import free_bytes, ran_out
from gridnode.media.split import Task
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore

#: runs one chunk on a worker of this node under the record's tenant and priority, telling its
#: progress; fires with the frames it wrote where known (as `split.RunTask`; the node's:
#: `chunk_run.pool_runner`)
RunChunk = Callable[[ChunkRun, Callable[[float], None]], "Deferred[Any]"]
#: tells a task's owner of it: (owner, what, job id, task); what is claimed, done, failed or released
Tell = Callable[[str, str, str, str], object]


#: offers turned away while a claim was on its way, kept to try if that claim is lost
MISSED = 16


def folder_free(folder: str) -> int | None:
    """The bytes free on ``folder``'s filesystem, or None where it cannot be asked."""
    try:
        return free_bytes(folder)
    except OSError:
        return None


class Sources:
    """Each job's source on this node's disk, fetched and probed once, kept for ``keep`` jobs."""

    _log = Logger()

    def __init__(self, store: ObjectStore, folder: str, probe: Callable[[str], Deferred[ProbeResult]],
                 keep: int = 4, user: Callable[[], str | None] = lambda: None) -> None:
        self.store = store
        self.folder = folder
        self.probe = probe
        self.keep = keep
        #: the children's user ("uid:gid"; None: the node's own), settled at the node's start
        self.user = user
        #: job id -> (path, probe) once fetched; LRU order
        self._ready: OrderedDict[str, tuple[str, ProbeResult]] = OrderedDict()
        self._waiting: dict[str, list[Deferred[tuple[str, ProbeResult]]]] = {}
        #: job id -> chunks of it running here: never dropped while one is
        self.users: dict[str, int] = {}

    def folder_of(self, job_id: str) -> str:
        return os.path.join(self.folder, keys.check_segment(job_id, "job id"))

    def get(self, job_id: str) -> Deferred[tuple[str, ProbeResult]]:
        """The job's source path and probe: fetched, or being fetched, once."""
        self.users[job_id] = self.users.get(job_id, 0) + 1
        if job_id in self._ready:
            self._ready.move_to_end(job_id)
            return succeed(self._ready[job_id])
        d: Deferred[tuple[str, ProbeResult]] = Deferred()
        waiting = self._waiting.setdefault(job_id, [])
        waiting.append(d)
        if len(waiting) == 1:
            self._fetch(job_id)
        return d

    @inlineCallbacks
    def _fetch(self, job_id: str) -> Any:
        path = os.path.join(self.folder_of(job_id), "source")
        try:
            for folder in (self.folder, self.folder_of(job_id)):
                private_folder(folder, self.user())  # the probe's box, run as that user, binds the source
            yield self.store.get_file(keys.input_source(job_id), path)
            info = yield self.probe(path)
        except Exception as e:  # noqa: BLE001 - every waiter hears of it; the next offer fetches again
            for d in self._waiting.pop(job_id, []):
                d.errback(e)
            return
        self._ready[job_id] = (path, info)
        for d in self._waiting.pop(job_id, []):
            d.callback((path, info))

    def done_with(self, job_id: str) -> None:
        """A chunk of the job ended here: past ``keep`` jobs, the least recently used unused go."""
        self.users[job_id] = self.users.get(job_id, 1) - 1
        if self.users[job_id] <= 0:
            del self.users[job_id]
        idle = [j for j in self._ready if j not in self.users]
        for old in idle[:max(0, len(self._ready) - self.keep)]:
            self.forget(old)
        if job_id not in self._ready and job_id not in self.users and job_id not in self._waiting:
            shutil.rmtree(self.folder_of(job_id), ignore_errors=True)  # a fetch that failed

    def forget(self, job_id: str) -> None:
        """Drop the job's source and folder (its owner says it ended, or it is the oldest)."""
        self._ready.pop(job_id, None)
        if job_id not in self.users:
            shutil.rmtree(self.folder_of(job_id), ignore_errors=True)


class ChunkWorker:
    """Takes tasks offered by other nodes' chunked jobs, one claim each, while ``can_take()``."""

    _log = Logger()

    def __init__(self, board: Board, store: ObjectStore, sources: Sources, *,
                 parse_presets: Callable[[str | None, list[Any] | None], list[Preset]], run_chunk: RunChunk,
                 tell: Tell, can_take: Callable[[], bool] = lambda: True, ffmpeg: str = "ffmpeg",
                 threads: int | None = None, input_limits: Limits = Limits(), metrics: Metrics | None = None,
                 now: Callable[[], float] = time.monotonic,
                 free_space: Callable[[str], int | None] = folder_free) -> None:
        self.board = board
        #: the archives' puts (bodies: no token)
        self.store = store
        self.sources = sources
        self.parse_presets = parse_presets
        self.run_chunk = run_chunk
        self.tell = tell
        #: whether this node has a worker to give a peer's chunk now (idle, not draining)
        self.can_take = can_take
        self.ffmpeg = ffmpeg
        self.threads = threads
        self.input_limits = input_limits
        #: (job, task) -> its run here
        self.running: dict[tuple[str, str], Deferred[Any]] = {}
        self.metrics = metrics or Metrics()
        self.metrics.peer_chunks_running.set_function(lambda: len(self.running))
        #: the clock of the runs' durations
        self.now = now
        #: the bytes free on a folder's filesystem (None: unknown): a failed ffmpeg that found it
        #: full ran out of space here
        self.free_space = free_space
        #: runs claimed that have not reached a worker yet (fetching, probing): not in the
        #: node's pool's figures, so ``can_take`` counts them
        self.preparing = 0
        #: offers turned away while a claim was on its way, newest kept
        self._missed: deque[tuple[str, str]] = deque(maxlen=MISSED)

    @inlineCallbacks
    def offered(self, job_id: str, task: str) -> Any:
        """A task of ``job_id`` is offered to us: claimed and started if we can take it; fires True
        then (the run goes on in ``running``), False when we cannot or another node was faster."""
        answered = self.metrics.peer_chunk_offers.labels
        if (job_id, task) in self.running or not self.can_take():
            answered("taken" if (job_id, task) in self.running else "busy").inc()
            if self.preparing and (job_id, task) not in self.running:
                self._missed.append((job_id, task))  # its chance if the claim on its way is lost
            return False
        # The claim holds a worker from now on: offers that come while it is on its way (an owner
        # offers several at once) see it taken, and one worker never claims several chunks.
        self.preparing += 1
        held, lost = None, "taken"  # by another node
        try:
            held = yield self.board.claim(job_id, task)
        except BadChunk as e:
            self._log.warn("chunk record {task} of job {job} refused: {reason}", task=task, job=job_id,
                           reason=e.message)
            lost = "bad_record"
        except NotFound:
            lost = "ended"  # the job ended since the offer
        finally:
            if held is None:
                self.preparing -= 1
        if held is None:
            answered(lost).inc()
            self._try_missed()
            return False
        answered("claimed").inc()
        self.tell(held.record.owner, "claimed", job_id, task)

        def ended(outcome: Any) -> Any:
            self.running.pop((job_id, task), None)
            return outcome

        d = self._run(held)
        if not d.called:  # ended already where the store answers at once (tests)
            self.running[(job_id, task)] = d.addBoth(ended)
        return True

    def _try_missed(self) -> None:
        """A claim was lost (another node was faster, or the chunk is gone): the offers turned
        away while it was on its way get their chance, one at a time (a loss tries the next)."""
        if self._missed and self.can_take():
            job_id, task = self._missed.popleft()
            self.offered(job_id, task).addErrback(
                lambda f: self._log.failure("offer of {task} of job {job}", f, task=task, job=job_id))

    @inlineCallbacks
    def _run(self, held: Held) -> Any:
        record = held.record
        began = self.now()
        try:
            outcome, reason, held = yield self._work(held)
        except NotHeld:
            outcome, reason = "lost", ""
        except Exception as e:  # noqa: BLE001 - a bug must not leave the task claimed for ever
            outcome, reason = "released", _trouble(e)
            if reason == "error":
                self._log.failure("chunk {task} of job {job} failed here", task=record.task, job=record.job)
            else:  # the store's trouble or a full disk: what happened, no traceback
                self._log.warn("chunk {task} of job {job} released ({reason}): {error}", task=record.task,
                               job=record.job, reason=reason, error=getattr(e, "message", None) or str(e))
            try:
                yield self.board.release(held)
            except GridnodeError:
                pass
        finally:
            self.sources.done_with(record.job)
            shutil.rmtree(self._folder(record), ignore_errors=True)
        self.metrics.peer_chunks_finished.labels(outcome, reason).inc()
        self.metrics.peer_chunk_seconds.labels(outcome).observe(max(0.0, self.now() - began))
        if outcome != "lost":
            self.tell(record.owner, outcome, record.job, record.task)
        return outcome

    def _folder(self, record: ChunkRecord) -> str:
        return os.path.join(self.sources.folder_of(record.job), record.task)

    @inlineCallbacks
    def _work(self, held: Held) -> Any:
        """(how it ended: done, failed or released; why: the failure's code or the release's
        reason; the record as last written). Its claim is counted in ``preparing`` (by
        `offered`) until the node's pool counts it."""
        started: list[bool] = []
        try:
            outcome = yield self._prepare_and_run(held, started)
        finally:
            if not started:
                self.preparing -= 1
        return outcome

    @inlineCallbacks
    def _prepare_and_run(self, held: Held, started: list[bool]) -> Any:
        record = held.record
        why = "source"  # the source cannot be fetched or probed here; then "refused": our templates differ
        try:
            source, info = yield self.sources.get(record.job)
            why = "refused"
            presets = self.parse_presets(",".join(record.presets) or None, record.spec or None)
        except GridnodeError as e:
            self._log.warn("chunk {task} of job {job} released: {reason}", task=record.task, job=record.job,
                           reason=e.message)
            return "released", why, (yield self.board.release(held))
        plan = plan_chunks.plan(info, presets, chunk_seconds=record.chunk_seconds, chunk_over=0)
        reason = disagrees(record, plan)
        if reason:
            self._log.warn("chunk {task} of job {job} refused: {reason}", task=record.task, job=record.job,
                           reason=reason)
            return "released", "refused", (yield self.board.release(held, refused=True))
        chunk = plan.chunks[record.index]
        folder = self._folder(record)
        out = os.path.join(folder, "out")
        for name in ["", *folders(plan_chunks.video_presets(presets))]:
            os.makedirs(os.path.join(out, name), exist_ok=True)
        argv = plan_chunks.chunk_argv(self.ffmpeg, info, source, out, presets, chunk, threads=self.threads,
                                      input_limits=self.input_limits)
        task = Task("chunk", record.index, argv, record.seconds)
        limit = job_output_limit(info, presets)
        started.append(True)
        self.preparing -= 1  # the node's pool counts it from here
        try:
            frames = yield self.run_chunk(ChunkRun(record, task, source, out, limit), lambda _p: None)
            if isinstance(frames, int) and chunk.frames is not None and frames != chunk.frames:
                raise GridnodeError(f"chunk {record.index} made {frames} frames of its {chunk.frames}",
                                    code="frames", status=422)
            archive = os.path.join(folder, chunk_files.ARCHIVE)
            size = chunk_files.pack(out, archive, limit)
        except GridnodeError as e:
            if e.code == "ffmpeg_failed" and ran_out(getattr(e, "stderr_tail", ()), self.free_space(folder)):
                # our disk, not the chunk: another node makes it, and it is no try of the chunk's
                self._log.warn("chunk {task} of job {job} released: this node's scratch space ran out",
                               task=record.task, job=record.job)
                return "released", "scratch", (yield self.board.release(held))
            if e.code not in CHUNK_ERRORS:
                self._log.warn("chunk {task} of job {job} released ({code}): {reason}", task=record.task,
                               job=record.job, code=e.code, reason=e.message)
                why = "stopped" if e.code == "cancelled" else "run"
                return "released", why, (yield self.board.release(held))
            code = "ffmpeg_failed" if e.code == "frames" else e.code
            return "failed", code, (yield self.board.fail(held, code, e.message))
        yield self.store.put_file(keys.chunk_files(record.job, record.task) + chunk_files.ARCHIVE, archive,
                                  content_type="application/x-tar", handed_over=True)
        written = yield self.board.finish(held, frames if isinstance(frames, int) else None, size)
        return "done", "", written


def _trouble(error: Exception) -> str:
    """Why a run released on an unexpected error: the store's trouble (storing the archive or
    the record), a full scratch disk, or anything else (a bug: its traceback is logged)."""
    if isinstance(error, GridnodeError) and error.code.startswith("storage_"):
        return "store"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "scratch"
    return "error"
