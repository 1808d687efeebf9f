"""
The conversion pool: ``workers`` jobs at a time, a bounded queue behind them
served by priority and tenant in turn (gridnode/media/fair.py), cancellation by
job id, and a private scratch folder per job.

A job is a *work* function ``work(slot) -> Deferred | coroutine`` run when a
worker is free. ``slot.scratch`` is its folder (created empty, removed after
the work ends, whichever way it ends); the work registers how to stop itself
with ``slot.on_cancel(fn)``, e.g. ``slot.on_cancel(process.cancel)``. The
work's result must only arrive once it has really stopped (``FfmpegProcess``
behaves so), because the scratch folder goes then. A work that registers
nothing is stopped with ``Deferred.cancel()`` on what it returned.

The work spans everything that needs the scratch folder (ffmpeg, then storing
the outputs), and the folder stays until it ends; the *worker* is held until the
work calls ``slot.free_worker()`` or ends. The converter frees it as soon as
ffmpeg has exited, so storing one job's outputs overlaps the next job's ffmpeg
and ``workers`` bounds the ffmpeg processes, not the store writes.

Scratch space (``space``, gridnode/media/scratch.py): a job submitted with ``needs`` bytes
starts only when that much is free beside what the jobs converting were promised. The job
served next and held for space holds those behind it too (a large job is never overtaken for
ever by small ones; only a job of a higher priority goes first), and no worker is taken while it
waits.
The pool looks again every ``RECHECK`` seconds and whenever a job ends; a job held longer
than its ``wait_limit`` fails with ``scratch_wait``, for its owner to hand it to the pool.

Errors: ``busy`` (503, ``retry_after`` seconds attribute) when the queue is
full; ``cancelled`` (409) for a cancelled job; ``duplicate_job`` (409) for a
job id already in the pool; ``invalid_job_id`` (400).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode.errors import Busy, GridnodeError
from gridnode.media.fair import FairQueue
from gridnode.media.scratch import ScratchSpace, scratch_wait

T = TypeVar("T")

_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
#: seconds between two looks at the free space while a job is held for it
RECHECK = 5.0


def cancelled_error() -> GridnodeError:
    return GridnodeError("the job was cancelled", code="cancelled", status=409)


class JobSlot:
    """What a running job gets from the pool."""

    def __init__(self, job_id: str, scratch: Path, on_free: Callable[[], object] | None = None) -> None:
        self.job_id = job_id
        self.scratch = scratch
        self.cancelled = False
        self._on_cancel: list[Callable[[], object]] = []
        self._on_free = on_free

    def free_worker(self) -> None:
        """The CPU-heavy part is over: another job may take the worker (the scratch folder stays)."""
        on_free, self._on_free = self._on_free, None
        if on_free is not None:
            on_free()

    def on_cancel(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` when the job is cancelled (at once if it already is)."""
        if self.cancelled:
            fn()
        else:
            self._on_cancel.append(fn)

    @property
    def has_cancel_hooks(self) -> bool:
        return bool(self._on_cancel)

    def _cancel(self) -> None:
        self.cancelled = True
        hooks, self._on_cancel = self._on_cancel, []
        for fn in hooks:
            fn()


Work = Callable[[JobSlot], "Deferred[T] | Coroutine[Any, Any, T]"]


class _Entry(Generic[T]):
    def __init__(self, job_id: str, work: Work[T], needs: int = 0, wait_limit: float = float("inf"),
                 on_hold: Callable[[], object] | None = None, rank: int = 1, tenant: str = "") -> None:
        self.job_id = job_id
        self.rank = rank
        self.tenant = tenant
        self.work = work
        self.needs = needs
        self.wait_limit = wait_limit
        self.on_hold = on_hold
        self.held_since: float | None = None
        self.result: Deferred[T] = Deferred()
        self.slot: JobSlot | None = None
        self.running: Deferred[Any] | None = None
        self.started = 0.0


class TranscodePool:
    """``workers`` concurrent jobs, ``queue`` more waiting (by priority, tenants in turn), 503 beyond."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        scratch_root: str | os.PathLike[str],
        *,
        workers: int | None = None,
        queue: int = 32,
        default_retry_after: int = 30,
        space: ScratchSpace | None = None,
    ) -> None:
        self.clock = clock
        self.scratch_root = Path(scratch_root)
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.queue_limit = max(0, queue)
        self.default_retry_after = default_retry_after
        self._queue: FairQueue[_Entry[Any]] = FairQueue()
        self._running: dict[str, _Entry[Any]] = {}  # holding a worker
        self._finishing: dict[str, _Entry[Any]] = {}  # worker freed, work not ended yet
        self._recent: deque[float] = deque(maxlen=20)  # seconds per finished job, for Retry-After
        self.space = space
        self._recheck: Any = None  # the call that looks at the free space again

    # -- counters for /health and /metrics

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def load(self) -> float:
        """(running + queued) / workers: 1.0 means every worker busy and nothing waiting."""
        return (self.running + self.queued) / self.workers

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "queued": self.queued, "workers": self.workers,
                "queue_limit": self.queue_limit, "load": round(self.load, 3)}

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: recent job times x the queue ahead, 5..300."""
        if not self._recent:
            return self.default_retry_after
        mean = sum(self._recent) / len(self._recent)
        ahead = (self.queued + 1) / self.workers
        return int(min(300, max(5, math.ceil(mean * ahead))))

    def waiting(self) -> list[str]:
        """The ids of the entries waiting for a worker."""
        return [e.job_id for e in self._queue]

    def has_job(self, job_id: str) -> bool:
        return (job_id in self._running or job_id in self._finishing
                or any(e.job_id == job_id for e in self._queue))

    # -- jobs

    def submit(self, job_id: str, work: Work[T], *, needs: int = 0, wait_limit: float = float("inf"),
               on_hold: Callable[[], object] | None = None, rank: int = 1, tenant: str = "",
               bounded: bool = True) -> Deferred[T]:
        """Queue ``work`` under ``job_id``, of ``tenant`` at priority ``rank`` (0 first: gridnode/
        priority.py); the Deferred fires with its result. ``needs``: bytes of
        scratch space it starts with; ``on_hold()`` is called when it is first held for them, and
        after ``wait_limit`` seconds held it fails with ``scratch_wait``.

        Raises (synchronously) ``Busy`` when the queue is full, unless not ``bounded`` (a task of
        a job already running, such as a chunk: gridnode/chunked.py).
        """
        if not _JOB_ID.fullmatch(job_id):
            raise GridnodeError(f"invalid job id {job_id[:40]!r}", code="invalid_job_id", status=400)
        if self.has_job(job_id):
            raise GridnodeError(f"job {job_id} is already in the pool", code="duplicate_job", status=409)
        if bounded and self.running >= self.workers and self.queued >= self.queue_limit:
            retry = self.retry_after()
            self._log.info("pool full, refusing {job} (retry after {retry_after}s)", job=job_id, retry_after=retry)
            raise Busy(f"this node is busy ({self.running} running, {self.queued} queued); "
                       f"try again in {retry} s or use another node", retry)
        entry: _Entry[T] = _Entry(job_id, work, needs, wait_limit, on_hold, rank, tenant)
        self._queue.push(rank, tenant, entry)
        self._log.info("job {job} queued ({queued} waiting)", job=job_id, queued=self.queued)
        self._pump()
        return entry.result

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False if the pool does not hold it.

        A queued job fails at once with ``cancelled``; a running one once its
        work has stopped and its scratch folder is gone.
        """
        for entry in list(self._queue):
            if entry.job_id == job_id:
                self._queue.remove(entry)
                self._log.info("job {job} cancelled while queued", job=job_id)
                entry.result.errback(Failure(cancelled_error()))
                self._pump()  # it may have held the queue for space
                return True
        running = self._running.get(job_id) or self._finishing.get(job_id)
        if running is None or running.slot is None:
            return False
        if running.slot.cancelled:
            return True
        self._log.info("cancelling running job {job}", job=job_id)
        use_deferred_cancel = not running.slot.has_cancel_hooks
        running.slot._cancel()
        if use_deferred_cancel and running.running is not None:
            running.running.cancel()
        return True

    def stop_all(self) -> Deferred[None]:
        """Cancel everything (service shutdown); fires when no ffmpeg of a job is left. A job whose
        ffmpeg is done and whose outputs are being stored is not waited for: that waits on the store,
        which may be down, and a stopping node's jobs are the pool's anyway."""
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        for entry in list(self._queue):
            self.cancel(entry.job_id)
        waiting = [e.result for e in self._running.values()]
        for job_id in [*self._running, *self._finishing]:
            self.cancel(job_id)
        if not waiting:
            return succeed(None)
        done: Deferred[Any] = DeferredList(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def sweep(self) -> list[str]:
        """Remove scratch folders left by an earlier run (call at start-up)."""
        self.scratch_root.mkdir(parents=True, exist_ok=True)
        removed = []
        for child in self.scratch_root.iterdir():
            if child.name in self._running or child.name in self._finishing:
                continue
            _remove(child)
            removed.append(child.name)
        if removed:
            self._log.info("removed {count} leftover scratch folders", count=len(removed))
        return removed

    # -- internals

    @property
    def held(self) -> int:
        """Jobs held for scratch space now: the one served next, or none."""
        head = self._queue.peek()
        return 1 if head is not None and head.held_since is not None else 0

    def _pump(self) -> None:
        while (head := self._queue.peek()) is not None and self.running < self.workers:
            if not self._room_for(head):
                if self._hold(head):
                    continue  # it waited its longest and left the queue: look at the next
                return
            self._start(self._queue.pop())

    def _room_for(self, entry: _Entry[Any]) -> bool:
        if self.space is None or entry.needs <= 0:
            return True
        promised = sum(e.needs for e in self._running.values())
        return self.space.fits(entry.needs, promised)

    def _hold(self, entry: _Entry[Any]) -> bool:
        """Hold ``entry`` for space; True when it waited its longest and has left the queue."""
        now = self.clock.seconds()
        if entry.held_since is None:
            entry.held_since = now
            self._log.info("job {job} waits for {needs} bytes of scratch space", job=entry.job_id, needs=entry.needs)
            if entry.on_hold is not None:
                entry.on_hold()
        waited = now - entry.held_since
        if waited > entry.wait_limit:
            self._queue.remove(entry)
            entry.result.errback(Failure(scratch_wait(entry.needs, waited)))
            return True
        if self._recheck is None or not self._recheck.active():
            self._recheck = self.clock.callLater(RECHECK, self._pump)
        return False

    def _start(self, entry: _Entry[Any]) -> None:
        scratch = self.scratch_root / entry.job_id
        self._running[entry.job_id] = entry
        entry.started = self.clock.seconds()
        try:
            if scratch.exists() or scratch.is_symlink():
                _remove(scratch)
            scratch.mkdir(parents=True, mode=0o700)
            entry.slot = JobSlot(entry.job_id, scratch, lambda: self._free(entry))
            self._log.info("job {job} started", job=entry.job_id)
            entry.running = _as_deferred(entry.work, entry.slot)
        except Exception:  # noqa: BLE001 - a work that raises at once fails its job, not the pool
            entry.running = Deferred()
            entry.running.errback(Failure())
        entry.running.addBoth(self._finished, entry)

    def _free(self, entry: _Entry[Any]) -> None:
        if self._running.pop(entry.job_id, None) is entry:
            self._finishing[entry.job_id] = entry
            self._pump()

    def _finished(self, result: Any, entry: _Entry[Any]) -> None:
        self._running.pop(entry.job_id, None)
        self._finishing.pop(entry.job_id, None)
        _remove(self.scratch_root / entry.job_id)
        elapsed = self.clock.seconds() - entry.started
        cancelled = entry.slot is not None and entry.slot.cancelled
        if cancelled:
            result = Failure(cancelled_error())
        else:
            self._recent.append(elapsed)
        if isinstance(result, Failure):
            self._log.info("job {job} ended after {elapsed:.1f}s: {error}", job=entry.job_id, elapsed=elapsed,
                           error=str(result.value))
        else:
            self._log.info("job {job} done after {elapsed:.1f}s", job=entry.job_id, elapsed=elapsed)
        self._pump()
        if isinstance(result, Failure):
            entry.result.errback(result)
        else:
            entry.result.callback(result)


def _as_deferred(work: Work[Any], slot: JobSlot) -> Deferred[Any]:
    out = work(slot)
    if isinstance(out, Deferred):
        return out
    if isinstance(out, Coroutine):
        return ensureDeferred(out)
    raise TypeError(f"work for {slot.job_id} returned {type(out).__name__}, not a Deferred or coroutine")


def _remove(path: Path) -> None:
    # Scratch holds flat files and HLS sub-folders: a quick unlink walk.
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except OSError as e:
        Logger().warn("cannot remove scratch {path}: {error}", path=str(path), error=str(e))
