"""
The owner's side of chunks run by the pool: a `split.RunTask` for a chunked job whose chunk
tasks any node may take, the owner's own idle workers first.

Each chunk task is published as a record (gridnode/chunk_records.py), then:

- **Ours first.** While this node has idle workers (``local_free()``), it claims its open
  tasks itself (one conditional PUT, on the ETag it just wrote) and runs them through the
  node's own runner (``local``), on its own paths, as a job without peers would. With
  ``turn(job)`` (another job's task waits for this node's workers), a job with fewer than
  ``TURN`` tasks running or queued here claims one even with no worker idle: one always waits
  in the node's fair queue, so the job keeps its turn among the tenants' jobs there (another
  tenant's short jobs take turns with its chunks). With nothing else waiting here, its open
  tasks stay open for idle peers until a worker here is free.
- **Offers.** What is left is offered by a peer note to nodes that say they have idle workers
  (``peers()``: their ``chunk_idle`` load figure), each task to ``fanout`` of them, spread by
  their idle workers; none is sent when no peer is idle. A peer that says it made one is
  offered the next open task at once: it has a worker free. A node that claims one says so
  (``claimed``) and, when it ends, how (``done``, ``failed``, ``released``). A task still open
  is offered again after ``reoffer`` s, doubling to 8 x while nobody takes it; before an offer is
  repeated its record is read once (a ``claimed`` note lost on the way).
- **Collect.** A done task's archive is fetched and unpacked into the job's work folder
  (``stitch.chunk_dir``), so the stitch runs unchanged (a bad or missing archive: made again;
  the store's trouble: the task fails, and a run of the job again collects it); a failed one
  fails the task with its code, which fails the job's run as a local run would. A run of the
  job again (or its adopter's) makes a failed chunk again, unless it failed as ``poison``.
- **Deaths.** A holder gone by the membership's word (``holder_gone``, and at each look,
  ``gone(holder)``) has its task reopened (one holder lost; ``poison`` at three) and offered
  again: only that task is redone. A task a peer holds is looked at in the store after 60 s,
  then 120, 240 and every 480 s, in case its note was lost.
- **Adoption.** A job's adopter publishes the same tasks: records already there are kept, a
  done one collected rather than run again, one held by a live peer waited for (the record now
  names us as its owner), one the previous owner was running itself reopened without counting a
  loss (the job's attempts count that death).
- **End.** `end` deletes the job's records and archives and tells their holders to drop the job's
  source.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode import chunk_files, keys
from gridnode.chunk_records import CHUNK_ERRORS, CLAIMED, DONE, FAILED, OPEN, Board, ChunkRecord, Held, disagrees
from gridnode.errors import GridnodeError, NotFound
from gridnode.media import stitch
from gridnode.media.chunks import Plan
from gridnode.media.sandbox import share_with
from gridnode.media.split import RunTask, Task
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore
from gridnode.timers import jittered

#: seconds before an open task is offered again (doubling while nobody takes it, to 8 x)
REOFFER = 15.0
#: peers each open task is offered to at once
FANOUT = 2
#: a job's tasks kept here (running or queued) while no worker is idle, with ``turn(job)``
TURN = 2
#: seconds before a task a peer holds is looked at in the store (a note lost on the way),
#: doubling at each look to 8 x
LOOK = 60.0


@dataclass(frozen=True)
class OwnedJob:
    """What a job's chunk records carry of it, and where its chunks are made."""

    id: str
    tenant: str
    priority: str
    presets: list[str]
    spec: list[dict[str, Any]]
    chunk_seconds: float
    plan: Plan
    work_dir: str
    #: the most bytes a chunk's archive may hold (the job's outputs' limit)
    limit: int
    #: told of each chunk's change here: (index, state, node making or that made it); the job's
    #: chunk list (gridnode/chunked.py ``ChunkStates.noted``)
    told: Callable[[int, str, str], None] = field(default=lambda _i, _s, _n: None, compare=False)

    def record(self, task: Task, owner: str) -> ChunkRecord:
        chunk = self.plan.chunks[task.index]
        return ChunkRecord(job=self.id, index=task.index, owner=owner, chunks=len(self.plan.chunks),
                           first=chunk.first, end=chunk.end, rate=str(chunk.rate), chunk_seconds=self.chunk_seconds,
                           seconds=task.seconds, presets=list(self.presets), spec=list(self.spec),
                           tenant=self.tenant, priority=self.priority)


@dataclass(eq=False)
class _Entry:
    """One chunk task of ours in flight."""

    job: OwnedJob
    task: Task
    local: RunTask
    progress: Callable[[float], None]
    held: Held
    result: Deferred[Any] = field(default_factory=Deferred)
    #: a peer holding it (known from its note or its record); "" while open or ours
    holder: str = ""
    running_here: bool = False
    offers: int = 0
    next_offer: float = 0.0
    looks: int = 0
    next_look: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.job.id, self.task.key)


class ChunkOwner:
    """Runs the chunk tasks of this node's chunked jobs on the pool (`run_task`)."""

    _log = Logger()

    def __init__(self, board: Board, store: ObjectStore, clock: Any, *, send: Callable[[str, str, str, str], object],
                 peers: Callable[[], Deferred[list[tuple[str, float]]]], gone: Callable[[str], bool],
                 local_free: Callable[[], int], turn: Callable[[str], bool] = lambda _job: False,
                 reoffer: float = REOFFER, fanout: int = FANOUT,
                 look: float = LOOK, rng: random.Random | None = None,
                 user: Callable[[], str | None] = lambda: None, metrics: Metrics | None = None) -> None:
        self.board = board
        #: the archives' fetches (bodies)
        self.store = store
        self.clock = clock
        self.node_id = board.node_id
        #: sends a note: (peer, kind, job id, task)
        self.send = send
        #: the peers with idle workers: (node id, how many), as their load figures last said
        self.peers = peers
        self.gone = gone
        self.local_free = local_free
        self.turn = turn
        self.reoffer = reoffer
        self.fanout = fanout
        self.look = look
        self.rng = rng or random.Random()
        #: the children's user ("uid:gid"; None: the node's own): a peer's chunk is theirs to read
        #: in the stitch's box, as one made here by them is
        self.user = user
        self.metrics = metrics or Metrics()
        self.entries: dict[tuple[str, str], _Entry] = {}
        #: job id -> peers that held a task of it (told when it ends)
        self.holders: dict[str, set[str]] = {}
        self._pumping = False
        self._again = False
        self._timer: Any = None
        #: jobs whose run here stopped (`stop`): a task whose record was still being written fails
        self._stopped: set[str] = set()

    def run_task(self, job: OwnedJob, local: RunTask) -> RunTask:
        """The `RunTask` of ``job``'s `SplitJob`: chunks on the pool, its other tasks ``local``."""

        self._stopped.discard(job.id)  # a new run of the job here

        def run(task: Task, progress: Callable[[float], None]) -> Deferred[Any]:
            if task.kind != "chunk":
                return local(task, progress).addBoth(self._freed)  # the audio pass took a worker of ours
            return self._start(job, task, local, progress).addErrback(self._failed)

        return run

    def _failed(self, failure: Failure) -> Failure:
        """Counts a chunk task that ended without its chunk (its successes count where they land)."""
        code = getattr(failure.value, "code", "")
        if code == "cancelled":
            self.metrics.chunks_finished.labels("cancelled", "").inc()
        else:  # a peer's record may carry any code: the label's values stay few
            label = code if code in CHUNK_ERRORS or code == "poison" else "other"
            self.metrics.chunks_finished.labels("failed", label).inc()
        return failure

    def _freed(self, result: Any) -> Any:
        """A worker of ours is free: our open tasks first, before the next offer to a peer."""
        if self.entries:
            self._schedule(0)
        return result

    @inlineCallbacks
    def _start(self, job: OwnedJob, task: Task, local: RunTask, progress: Callable[[float], None]) -> Any:
        mine = job.record(task, self.node_id)
        held = yield self.board.publish(mine)
        error = held.record.error or {}
        if held.record.state == FAILED and error.get("code") != "poison":
            # a run of the job again (or its adopter's) makes a failed chunk again, as it would here
            again = ChunkRecord(**{**asdict(held.record), "state": OPEN, "holder": "", "error": None})
            held = (yield self.board.replace(held, again)) or (yield self.board.read(job.id, task.key))
        if job.id in self._stopped:
            raise _ended()
        entry = _Entry(job, task, local, progress, held)
        self.entries[entry.key] = entry
        try:
            yield self._settle(entry, held)
            frames = yield entry.result
        finally:
            self.entries.pop(entry.key, None)
        return frames

    # -- what a record's state means

    @inlineCallbacks
    def _settle(self, entry: _Entry, held: Held) -> Any:
        record = held.record
        mine = entry.job.record(entry.task, self.node_id)
        if entry.running_here and record.state == CLAIMED and record.holder == self.node_id:
            entry.held = held  # ours, running: its end says the rest
            return
        if disagrees(record, entry.job.plan):
            held = yield self._rewrite(entry, held, mine)  # an earlier plan's: ours replaces it
            record = held.record
        if record.state == CLAIMED and record.holder in (self.node_id, record.owner) and not entry.running_here:
            # our earlier life's run, or the previous owner's own: neither runs now, and the job's
            # attempts count that loss
            held = yield self.board.reopen(record.job, record.task, lambda h: True, count=False)
            if held.record.state == OPEN:
                self.metrics.chunks_redone.labels("lost_holder").inc()
            entry.next_offer = 0.0
            yield self._settle(entry, held)
            return
        if record.owner != self.node_id and record.state in (OPEN, CLAIMED):
            held = yield self._rewrite(entry, held, ChunkRecord(**{**asdict(record), "owner": self.node_id}))
            record = held.record
        entry.held = held
        if record.state == CLAIMED and self.gone(record.holder):
            yield self._reopen(entry)
        elif record.state == CLAIMED:
            self._hold(entry, record.holder)
        elif record.state == DONE:
            yield self._collect(entry, held)
        elif record.state == FAILED:
            error = record.error or {}
            self._fail(entry, GridnodeError(error.get("message", "the chunk failed"),
                                            code=error.get("code", "ffmpeg_failed"), status=422))
        else:
            entry.holder = ""
            self._note_state(entry, OPEN, "")
            self._schedule(0)

    @inlineCallbacks
    def _rewrite(self, entry: _Entry, held: Held, record: ChunkRecord) -> Any:
        written = yield self.board.replace(held, record)
        if written is None:  # written meanwhile (a holder's finish): read it again
            written = yield self.board.read(record.job, record.task)
        return written

    @inlineCallbacks
    def _reopen(self, entry: _Entry) -> Any:
        held = yield self.board.reopen(entry.job.id, entry.task.key, self.gone)
        if held.record.state == OPEN and held.record.lost > entry.held.record.lost:
            self.metrics.chunks_redone.labels("lost_holder").inc()
        entry.held, entry.holder, entry.next_offer = held, "", 0.0  # offered again at once
        yield self._settle(entry, held)

    @inlineCallbacks
    def _collect(self, entry: _Entry, held: Held) -> Any:
        """The holder's archive into the job's work folder; a bad one sends the task back to open."""
        record = held.record
        folder = os.path.join(entry.job.work_dir, stitch.chunk_dir(record.index))
        archive = folder + ".tar"
        try:
            if record.size > entry.job.limit:
                raise chunk_files.bad_archive(f"of {record.size} bytes is over the job's limit")
            info = yield self.store.get_file(keys.chunk_files(record.job, record.task) + chunk_files.ARCHIVE, archive)
            if info.size != record.size:
                raise chunk_files.bad_archive(f"of {info.size} bytes is not the {record.size} its record says")
            chunk_files.unpack(archive, folder, entry.job.limit)
            share_with(self.user(), *(os.path.join(path, name) for path, dirs, files in os.walk(folder)
                                      for name in [".", *dirs, *files]))
        except GridnodeError as e:
            if e.code not in ("bad_chunk", "not_found"):
                raise  # the store's trouble or ours, not the holder's: the task fails, a retry collects
            self._log.warn("chunk {task} of job {job} made again: {reason}", task=record.task, job=record.job,
                           reason=e.message)
            again = yield self.board.redo(held)
            if again is None:
                again = yield self.board.read(record.job, record.task)
            elif again.record.state == OPEN:
                self.metrics.chunks_redone.labels("bad_archive").inc()
            entry.next_offer = 0.0
            yield self._settle(entry, again)
            return
        finally:
            if os.path.exists(archive):
                os.unlink(archive)
        entry.progress(1.0)
        self._note_state(entry, DONE, record.holder)
        if not entry.result.called:
            self.metrics.chunks_finished.labels("collected", "").inc()
            entry.result.callback(record.frames)

    def _fail(self, entry: _Entry, error: BaseException | Failure) -> None:
        if not entry.result.called:
            self._note_state(entry, FAILED, entry.holder)
            entry.result.errback(error)

    def _note_state(self, entry: _Entry, state: str, node: str) -> None:
        entry.job.told(entry.task.index, state, node)

    # -- notes and deaths

    def noted(self, sender: str, kind: str, job_id: str, task: str) -> None:
        """A peer's note about a task of ours: ``claimed`` (it holds it) needs no read; ``done``,
        ``failed`` and ``released`` one read of the record."""
        entry = self.entries.get((job_id, task))
        if entry is None:
            return
        if kind == "claimed":
            self._hold(entry, sender)
        elif kind in ("done", "failed", "released"):
            self._look(entry)
            if kind == "done":
                self._offer_to(sender)

    def _offer_to(self, peer: str) -> None:
        """``peer`` just made a task of ours, so a worker of its is free now (its load figure may
        say otherwise until its next heartbeat): offer it the next open task at once, a note and
        no request, rather than leave it idle until that task's next round of offers."""
        if peer == self.node_id or self.gone(peer):
            return
        for entry in self._open():
            if peer not in entry.held.record.refused:
                self.send(peer, "offer", entry.job.id, entry.task.key)
                self.metrics.chunk_offers_sent.inc()
                entry.offers += 1  # a later round reads its record first: this claim's note may be lost
                return

    def _hold(self, entry: _Entry, holder: str) -> None:
        """``holder`` holds the task: wait for its note, and look in the store now and then."""
        if entry.holder != holder:
            entry.holder, entry.looks = holder, 0
        self._note_state(entry, CLAIMED, holder)
        self.holders.setdefault(entry.job.id, set()).add(holder)
        entry.next_look = self.clock.seconds() + jittered(self.look * min(8, 2 ** entry.looks), self.rng)
        entry.looks += 1
        self._schedule(max(1.0, entry.next_look - self.clock.seconds()))

    def holder_gone(self, member: str) -> None:
        """``member`` is gone (confirmed dead, left): its tasks of ours are reopened and offered."""
        for entry in [e for e in self.entries.values() if e.holder == member]:
            self._guard(entry, self._reopen(entry))

    def _look(self, entry: _Entry) -> None:
        self._guard(entry, self.board.read(entry.job.id, entry.task.key).addCallback(
            lambda held: self._settle(entry, held)))

    def _guard(self, entry: _Entry, d: Deferred[Any]) -> None:
        """A failure to read or write the record fails the task (the job's run decides what next)."""
        def failed(f: Any) -> None:
            self._log.warn("chunk {task} of job {job}: {reason}", task=entry.task.key, job=entry.job.id,
                           reason=f.getErrorMessage())
            self._fail(entry, f)
        d.addErrback(failed)

    # -- ours first, then offers

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._pump)

    def _pump(self) -> None:
        self._timer = None
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        d = self._round()

        def failed(f: Failure) -> None:
            self._log.warn("offering chunks failed: {reason}; again in {delay}s", reason=f.getErrorMessage(),
                           delay=self.reoffer)
            self._schedule(self.reoffer)

        def ended(_: Any) -> None:
            self._pumping = False
            if self._again:
                self._again = False
                self._schedule(0)
        d.addErrback(failed).addBoth(ended)

    @inlineCallbacks
    def _round(self) -> Any:
        now = self.clock.seconds()
        for entry in list(self.entries.values()):
            if entry.holder and self.gone(entry.holder):  # gone without our hearing of it
                self._guard(entry, self._reopen(entry))
            elif entry.holder and not entry.result.called and entry.next_look <= now:
                self._look(entry)  # its note may be lost: the record says
        free = self.local_free()
        for entry in self._open():
            here = sum(e.running_here for e in self.entries.values() if e.job.id == entry.job.id)
            if free <= 0 and (here >= TURN or not self.turn(entry.job.id)):
                continue
            won = yield self.board.claim(entry.job.id, entry.task.key, entry.held)
            if won is None:  # claimed meanwhile: learn by whom
                self._look(entry)
                continue
            free -= 1
            self._run_here(entry, won)
        due = [e for e in self._open() if e.next_offer <= now]
        if due:
            yield self._offer(due, now)
        waiting = [e.next_offer for e in self._open()] + [e.next_look for e in self.entries.values() if e.holder]
        if waiting:
            self._schedule(max(1.0, min(waiting) - now))

    def _open(self) -> list[_Entry]:
        return [e for e in self.entries.values()
                if e.held.record.state == OPEN and not e.holder and not e.running_here and not e.result.called]

    def _run_here(self, entry: _Entry, held: Held) -> None:
        entry.held, entry.running_here = held, True
        self._note_state(entry, CLAIMED, self.node_id)
        d = entry.local(entry.task, entry.progress)

        def ended(result: Any) -> Any:
            entry.running_here = False
            if isinstance(result, Failure):
                self._fail(entry, result)
            elif not entry.result.called:
                self._note_state(entry, DONE, self.node_id)
                self.metrics.chunks_finished.labels("made_here", "").inc()
                entry.result.callback(result)
            return None
        d.addBoth(ended).addBoth(self._freed)

    @inlineCallbacks
    def _offer(self, due: list[_Entry], now: float) -> Any:
        peers = yield self.peers()
        slots = [peer for peer, idle in sorted(peers, key=lambda p: -p[1])
                 if peer != self.node_id and not self.gone(peer) for _ in range(int(min(idle, 64)))]
        if not slots:
            return
        cursor = self.rng.randrange(len(slots))
        for entry in due:
            if entry.offers:  # offered before and still open here: a "claimed" note may be lost
                held = yield self.board.read(entry.job.id, entry.task.key)
                if held.record.state != OPEN:
                    yield self._settle(entry, held)
                    continue
                entry.held = held
            chosen: list[str] = []
            for _ in range(len(slots)):
                peer = slots[cursor % len(slots)]
                cursor += 1
                if peer not in chosen and peer not in entry.held.record.refused:
                    chosen.append(peer)
                if len(chosen) >= self.fanout:
                    break
            for peer in chosen:
                self.send(peer, "offer", entry.job.id, entry.task.key)
            self.metrics.chunk_offers_sent.inc(len(chosen))
            entry.offers += 1
            entry.next_offer = now + jittered(self.reoffer * min(8, 2 ** (entry.offers - 1)), self.rng)

    # -- the job's end

    def stop(self, job_id: str) -> None:
        """The job's run here stopped (cancelled, lost, the node stopping): its tasks still waiting
        fail (``cancelled``); its records stay, for a run again or an adopter."""
        self._stopped.add(job_id)
        for key, entry in list(self.entries.items()):
            if key[0] == job_id:
                del self.entries[key]
                self._fail(entry, _ended())

    @inlineCallbacks
    def end(self, job_id: str) -> Any:
        """The job is over (whichever way): its tasks still waiting fail (``cancelled``), its records
        and archives are deleted, its holders told."""
        self.stop(job_id)
        self._stopped.discard(job_id)
        for peer in sorted(self.holders.pop(job_id, set())):
            self.send(peer, "ended", job_id, "")
        try:
            yield self.board.remove(job_id)
        except NotFound:
            pass


def _ended() -> GridnodeError:
    return GridnodeError("the job ended", code="cancelled", status=409)
