"""
The runs of the jobs this node owns: each from accepted (or claimed) to its
final record, the record written at every state and owned as it goes.

A new upload's job comes with its input, record and active marker in the store
already (`store_accepted`, before its 201: peers may adopt it from then on); a
job claimed from an earlier life may still need its input stored and its
marker written. A run then waits for a worker in the media pool, stores the
outputs and writes the end. The record is written when the job's state
changes, never to renew it: peers adopt a job when its owner is gone
(gridnode/adoption.py), not when a lease runs out. Every write of
``jobs/<id>.json`` is conditional on our last (gridnode/job_records.py), and a
run whose record was taken over stops without writing again. A store that is
unreachable is waited for, never a reason to drop an accepted job.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredLock, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gridnode import job_list, job_records, jobs, keys, priority
from gridnode.errors import GridnodeError, NotFound, StorageUnavailable
from gridnode.job_records import Lost
from gridnode.jobs import Job
from gridnode.media.interface import SCRATCH_FULL, SCRATCH_WAIT, WAITING_SCRATCH, Described, Media, Named, Produced
from gridnode.metrics import Metrics
from gridnode.speed import Speed
from gridnode.spool import SpoolFile
from gridnode.store.base import ObjectStore
from gridnode.store.rate import KEEP
from gridnode.timers import jittered


@dataclass
class Active:
    """A job this node is working on."""

    job: Job
    spool_path: str
    etag: str | None = None  # of our last write of jobs/<id>.json
    listeners: list[Callable[[Job], None]] = field(default_factory=list)
    work: Deferred[Any] | None = None
    marks: dict[str, float] = field(default_factory=dict)  # phase -> monotonic start, for metrics
    cancelled: bool = False  # a client asked
    lost: bool = False  # another node took the job over
    released: bool = False  # handed to the pool (draining, or no scratch space here)
    #: the store has its record, input and active marker: a peer may adopt it
    stored: bool = False
    #: its last record is written (or the job is another node's): clients may hear how it ended
    ended: bool = False
    #: jobs/<id>.json as this node last stored it (its claim, or our last write)
    record: bytes | None = None
    #: one write of jobs/<id>.json at a time: a write in flight must not land after, and so over,
    #: the write of a later state
    writing: DeferredLock = field(default_factory=DeferredLock)

    @property
    def stopping(self) -> bool:
        return self.cancelled or self.lost or self.released

    @property
    def told(self) -> Job | None:
        """The job as clients may hear of it: its end only once its record says so; until then
        the record last stored (None: this node stored none, ask the store)."""
        if self.ended or not self.job.final:
            return self.job
        return Job.loads(self.record) if self.record is not None else None


#: runs of one job that may run out of scratch space on this node before it goes to the pool
SCRATCH_RETRIES = 3


class Runner:
    """Runs what the job service hands it (`run` an accepted job, `resume` a claimed one), each
    record written as its state changes."""

    _log = Logger()

    def __init__(self, reactor: Any, store: ObjectStore, media: Media[Any, Any], *, node_id: str, lease: float,
                 now: Callable[[], float], metrics: Metrics, rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.store = store
        #: the record writes, which say where a job is: first in the store's queue (gridnode/store/rate.py)
        self.keeping = store.in_lane(KEEP)
        self.rng = rng or random.Random()
        self.media = media
        self.node_id = node_id
        self.lease = lease
        self.now = now
        self.metrics = metrics
        #: the jobs this node works on, by id
        self.active: dict[str, Active] = {}
        #: the last jobs that ended here, newest last (for the status page)
        self.recent: deque[Job] = deque(maxlen=50)
        self.counts: Counter[str] = Counter()
        #: this node's conversion speed, smoothed: clients rank nodes by it (its load's ``speed``)
        self.speed = Speed()
        #: a job released while this node stays (no scratch space for it) is handed on by this
        self.on_released: Callable[[str], Deferred[Any]] | None = None
        #: told of every change of a job it runs (job.progress webhooks), and, before its marker
        #: goes, of its end once stored (the webhooks it owes: gridnode/notify/)
        self.on_change: Callable[[Job], None] | None = None
        self.on_final: Callable[[Job], Deferred[Any]] | None = None
        metrics.scratch_waiting.set_function(
            lambda: sum(1 for a in self.active.values() if a.job.waiting == WAITING_SCRATCH))

    @inlineCallbacks
    def store_accepted(self, active: Active) -> Any:
        """A new job whose input is stored: its active marker, then its record, so that no record
        is left without a marker (a retried Idempotency-Key is answered with the record's job, and
        a peer adopts only what is marked; it drops a marker without a record). Not retried: on
        failure what was written is removed and `StorageUnavailable` raised; the client is told
        503 and sends again."""
        job_id = active.job.id
        try:
            yield job_records.mark(self.store, self.node_id, job_id)
            yield self._save(active)
            for key in job_list.entries(active.job):
                yield self.store.put_bytes(key, b"")
        except GridnodeError as e:
            for key in (*job_list.entries(active.job), keys.active_marker(self.node_id, job_id),
                        keys.job_record(job_id)):
                try:
                    yield self.store.delete(key)
                except GridnodeError:
                    pass  # unmarked, a record is never adopted; the input goes with the refusal
            if isinstance(e, StorageUnavailable):
                raise
            raise StorageUnavailable(f"the store refused this job's record ({e.message}); send it again") from e
        active.stored = True
        self._log.info("job {job} stored: input, record and active marker", job=job_id)

    @inlineCallbacks
    def run(self, active: Active, probe: Described, presets: list[Named], input_stored: bool) -> Any:
        """Store the input (unless it is), mark the job active (unless it is), queue it for ffmpeg,
        store its outputs; fires when the job has ended here, its last record written."""
        job = active.job
        try:
            if not active.stored:
                yield self._durably("write job record", lambda: self._save(active))
                if not input_stored:
                    began = time.monotonic()
                    yield self._durably("store input", lambda: self.store.put_file(keys.input_source(job.id),
                                                                                   active.spool_path))
                    self.metrics.phase_seconds.labels("store_input").observe(time.monotonic() - began)
                # Only now may peers adopt the job: before, its input is in our spool alone.
                yield self._durably("mark job active", lambda: job_records.mark(self.store, self.node_id, job.id))
                for entry in job_list.entries(job):
                    yield self._durably("list job", functools.partial(self.store.put_bytes, entry, b""))
                active.stored = True
            active.marks["queued"] = time.monotonic()
            if active.stopping:
                raise CancelledError()
            stored = yield self._queue(active, probe, presets)
            if active.stopping:
                raise CancelledError()
            job.outputs = stored
            job.advance(jobs.DONE, self.now())
            self.counts["done"] += 1
            self._log.info("job {job} done: {count} outputs", job=job.id, count=len(stored), state=job.state,
                           attempts=job.attempts)
        except (CancelledError, Lost) as e:
            self._stopped(active, e)
        except GridnodeError as e:
            if e.code == "cancelled" or active.stopping:
                self._stopped(active, e)
            else:
                job.fail(e.code, e.message, self.now())
                self.counts["failed"] += 1
                self._log.warn("job {job} failed: {code}: {message}", job=job.id, code=e.code, message=e.message,
                               state=job.state)
        except Exception as e:  # noqa: BLE001 - a job must always end in a final state
            self._log.failure("job {job} crashed", job=job.id)
            job.fail("internal_error", f"the node failed on this job ({type(e).__name__}); submit it again",
                     self.now())
            self.counts["failed"] += 1
        yield self._finish(active)

    @inlineCallbacks
    def resume(self, active: Active) -> Any:
        """Run a claimed job from its stored input (or our earlier life's spooled copy)."""
        job = active.job
        stored = True
        try:
            if os.path.exists(active.spool_path):
                # Our own earlier life's spool: the store may not have the input yet.
                stored = yield in_store(self.store, keys.input_source(job.id))
            else:
                yield self._durably("fetch input", lambda: self.store.get_file(keys.input_source(job.id),
                                                                               active.spool_path))
            chosen = self.media.parse_presets(",".join(job.presets) or None, job.spec or None)
            probe = yield self.media.probe(active.spool_path)
        except GridnodeError as e:
            job.fail(e.code, e.message, self.now())
            self._log.warn("adopted job {job} failed: {code}: {message}", job=job.id, code=e.code, message=e.message)
            yield self._finish(active)
            return
        yield self.run(active, probe, chosen, input_stored=stored)


    @inlineCallbacks
    def _queue(self, active: Active, probe: Described, presets: list[Named]) -> Any:
        """Hand the job to the pool; an accepted job waits for room rather than failing. A run
        that ran out of scratch space is no fault of the job: it waits for space and runs again
        (no attempt counted), up to ``SCRATCH_RETRIES`` times; a job that waited its longest
        for space, or ran out again, goes to the pool, as a draining node's jobs go."""
        short = 0
        while True:
            try:
                result = yield self.media.run(active.job.id, probe, active.spool_path, presets,
                                              started=lambda: self._transcoding(active),
                                              progress=lambda p: self._progress(active, p),
                                              finish=lambda produced: self._store_outputs(active, produced),
                                              waiting=lambda: self._waiting(active, "start"),
                                              rank=priority.RANK[active.job.priority], tenant=active.job.tenant,
                                              chunks=lambda chunks: self._chunks(active, chunks),
                                              job=active.job)
                return result
            except GridnodeError as e:
                if active.stopping or e.code not in ("busy", SCRATCH_FULL, SCRATCH_WAIT):
                    raise
                if e.code == SCRATCH_FULL and short < SCRATCH_RETRIES:
                    short += 1
                    self._waiting(active, "run", e.message)
                    continue  # the pool holds it until the space is there
                if e.code != "busy":
                    self._log.warn("job {job}: {reason}; handing it to the pool", job=active.job.id, reason=e.message)
                    active.released = True
                    raise CancelledError() from None
            yield deferLater(self.reactor, 1.0, lambda: None)

    def _waiting(self, active: Active, when: str, why: str = "") -> None:
        """The job waits for scratch space: held before its start, or after ffmpeg ran out."""
        job = active.job
        self.metrics.scratch_full.labels(when).inc()
        if when == "run":
            self._log.warn("job {job}: {reason}", job=job.id, reason=why)
        if job.state != jobs.QUEUED:
            job.advance(jobs.QUEUED, self.now())
        job.waiting = WAITING_SCRATCH
        job.updated = self.now()
        self._changed(active)
        self._durably("write job record", lambda: self._save(active)).addErrback(self._save_failed, active)

    def _stopped(self, active: Active, why: BaseException) -> None:
        job = active.job
        if active.lost or isinstance(why, Lost):
            active.lost = True
            self._log.warn("job {job}: another node took it over; stopped here", job=job.id)
        elif active.released:
            self._log.info("job {job} released to the pool", job=job.id)
        else:
            if not job.final:
                job.cancel(self.now())
            self.counts["cancelled"] += 1
            self._log.info("job {job} cancelled", job=job.id, state=job.state)

    @inlineCallbacks
    def _finish(self, active: Active) -> Any:
        """Write the last record (unless the job is someone else's now) and forget the job."""
        job = active.job
        if job.final:
            for preset in job.presets:
                self.metrics.jobs_finished.labels(job.state, preset).inc()
            if "accepted" in active.marks:
                self.metrics.job_seconds.labels(job.state).observe(time.monotonic() - active.marks["accepted"])
        try:
            if active.released and not job.final and not active.lost:
                job.release(self.now())
            if not active.lost:
                try:
                    # its end is told once stored: a refusal waits for the operator, not a lie
                    yield self._durably("write job record", lambda: self._save(active), refusals=True)
                    self._ended(active)
                    if job.final and self.on_final is not None:
                        yield self.on_final(job)
                    if job.final:
                        yield self._durably("unmark job", lambda: job_records.unmark(self.store, self.node_id, job.id))
                    elif active.released and (hand_on := self.on_released) is not None:
                        yield self._durably("hand job on", lambda: hand_on(job.id))
                except Lost:
                    self._log.warn("job {job}: another node took it over before its end was written", job=job.id)
        finally:
            self._ended(active)
            self.active.pop(job.id, None)
            SpoolFile.remove(active.spool_path)
            SpoolFile.remove(active.spool_path + ".json")

    @inlineCallbacks
    def _store_outputs(self, active: Active, produced: Sequence[Produced]) -> Any:
        """ffmpeg is done: store every output while the scratch folder still holds them."""
        job = active.job
        if active.stopping:
            raise CancelledError()
        job.advance(jobs.STORING, self.now())
        now = time.monotonic()
        if "transcoding" in active.marks:
            took = now - active.marks["transcoding"]
            self.metrics.phase_seconds.labels("transcode").observe(took)
            if took > 0 and job.input.get("duration"):
                ratio = float(job.input["duration"]) / took
                self.metrics.ffmpeg_speed.observe(ratio)
                # a poster alone is no conversion speed; a chunked job's is several workers'
                if any(p.duration is not None for p in produced) and not job.chunks:
                    self.speed.observe(ratio)
        self._changed(active)
        yield self._durably("write job record", lambda: self._save(active))
        stored: dict[str, dict[str, Any]] = {}
        for output in produced:
            if active.stopping:
                raise CancelledError()
            yield self._durably("store output", self._store_output(job.id, output))
            # One entry per preset: its first file (HLS: the master playlist, whose
            # relative URLs lead to the rest), with the size of all its files.
            entry = stored.get(output.preset)
            if entry is not None:
                entry["size"] += output.size
                entry["files"] += 1
                if output.name.endswith(".mpd"):  # CMAF: the DASH manifest over the same segments
                    entry["dash"] = f"/results/{job.id}/{output.name}"
                continue
            entry = stored[output.preset] = {
                "preset": output.preset, "name": output.name, "size": output.size, "files": 1,
                "content_type": output.content_type, "url": f"/results/{job.id}/{output.name}"}
            if output.duration is not None:
                entry["duration"] = round(output.duration, 3)  # measured, not the input's
        self.metrics.phase_seconds.labels("store_outputs").observe(time.monotonic() - now)
        return list(stored.values())

    def _store_output(self, job_id: str, output: Produced) -> Callable[[], Deferred[Any]]:
        key = keys.output(job_id, output.name)
        return lambda: self.store.put_file(key, output.path, content_type=output.content_type)

    def _transcoding(self, active: Active) -> None:
        active.job.advance(jobs.TRANSCODING, self.now())  # and waits no more
        active.marks["transcoding"] = time.monotonic()
        if "queued" in active.marks:
            self.metrics.phase_seconds.labels("queue").observe(active.marks["transcoding"] - active.marks["queued"])
        self._changed(active)
        self._durably("write job record", lambda: self._save(active)).addErrback(self._save_failed, active)

    def _save_failed(self, failure: Any, active: Active) -> None:
        if failure.check(Lost):
            self._lose(active)
        else:
            self._log.failure("job {job}: could not write its record", failure, job=active.job.id)

    def _lose(self, active: Active) -> None:
        if not active.lost:
            active.lost = True
            self._log.warn("job {job}: our record was taken over; stopping", job=active.job.id)
            self.media.cancel(active.job.id)

    def _progress(self, active: Active, progress: float) -> None:
        # a stopped ffmpeg says "progress=end" (1.0) as it goes: a cancelled job keeps what it had
        if not active.stopping and active.job.set_progress(progress, self.now()):
            self._changed(active)

    def _chunks(self, active: Active, chunks: list[dict[str, Any]]) -> None:
        # told to subscribers (the status page, SSE); stored with the job's next state
        if not active.stopping and active.job.set_chunks(chunks, self.now()):
            self._changed(active)

    def _ended(self, active: Active) -> None:
        """Tell the job's listeners how it ended, once its record says so: a client that heard
        `done` never sees the job run again after a crash (its adopter reads the same record)."""
        if not active.ended:
            active.ended = True
            if active.job.final:
                self.recent.append(active.job)
            self._changed(active)

    def _changed(self, active: Active) -> None:
        listeners = list(active.listeners) + ([self.on_change] if self.on_change is not None else [])
        for listener in listeners:
            try:
                listener(active.job)
            except Exception:  # noqa: BLE001 - a broken listener must not break the job
                self._log.failure("job listener failed")

    # -- the job record, owned

    def _save(self, active: Active) -> Deferred[Any]:
        """Write jobs/<id>.json, as the job is when the previous write of it has ended, on the
        condition that it is still ours."""
        return active.writing.run(self._write_record, active)

    @inlineCallbacks
    def _write_record(self, active: Active) -> Any:
        job = active.job
        data = job.dumps()
        info = yield job_records.write(self.keeping, job.id, data, active.etag, self.node_id)
        active.etag, active.record = info.etag, data
        if not job.final and os.path.exists(active.spool_path):
            job_records.journal(active.spool_path, data)
        return info

    @inlineCallbacks
    def _durably(self, what: str, action: Callable[[], Deferred[Any]], refusals: bool = False) -> Any:
        """Run a store action until it succeeds: while the store is unreachable, wait and retry.
        With ``refusals``, also while it refuses the action for a reason of its own (an S3 error
        this node does not know, such as a bucket policy or a KMS key; a `file:` store's full or
        read-only disk): what waits on it must not go on without it, and an operator can mend
        the cause."""
        delay = 0.5
        while True:
            try:
                result = yield action()
                return result
            except StorageUnavailable as e:
                wait = jittered(delay, self.rng)  # nodes that failed together do not retry together
                self._log.warn("{what}: store unreachable ({reason}); retrying in {delay:.1f}s", what=what,
                               reason=e.message, delay=wait)
            except (GridnodeError, OSError) as e:
                if not refusals or (isinstance(e, GridnodeError) and e.code != "storage_error"):
                    raise  # Lost, among others: the action is moot
                wait = jittered(delay, self.rng)
                self._log.error("{what}: the store refused it ({reason}); retrying in {delay:.1f}s", what=what,
                                reason=getattr(e, "message", str(e)), delay=wait)
            yield deferLater(self.reactor, wait, lambda: None)
            delay = min(delay * 2, 30.0)


@inlineCallbacks
def in_store(store: ObjectStore, key: str) -> Any:
    """Whether the store has ``key``."""
    try:
        yield store.stat(key)
        return True
    except NotFound:
        return False
