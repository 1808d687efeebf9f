"""
The job service of one node: what it takes on, and what it hands on.

`JobService` admits an upload before any body byte is read (on S3 the body
streams into the store as it arrives: gridnode/store/streamed.py) and answers
it (201) once the input is probed and the job durably accepted: its input,
record and active marker in the store, so a peer adopts it should this node
and its disk be lost. The job then goes to its `Runner` (gridnode/runner.py),
which converts and finishes it. A local journal (``spool/<id>.json`` beside
the spooled body) lets a restarted node resume from its own copy. It also
runs the jobs its `Adopter` (gridnode/adoption.py) claims: a gone owner's, one
handed to it, or an earlier life's of this node.

Draining (SIGTERM): no new uploads or adoptions; running jobs get
``--drain-timeout``; the rest are released, and the node's watchers take them
once it has left (gridnode/succession.py).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode import job_records, jobs, keys
from gridnode.admission import Admission, by_priority
from gridnode.adoption import LEGACY, LEGACY_EVERY, Adopter, Claim
from gridnode.config import NodeConfig
from gridnode.errors import GridnodeError, NotFound, StorageUnavailable
from gridnode.job_follow import follow_record
from gridnode.jobs import Job
from gridnode.media.interface import Media
from gridnode.metrics import Metrics
from gridnode.notify.service import Webhooks, notify_urls
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.priority import load_figures
from gridnode.runner import Active, Runner, in_store
from gridnode.spool import FreeSpace, Spool, SpoolFile
from gridnode.store.base import ObjectStore
from gridnode.store.rate import BACKGROUND
from gridnode.store.streamed import StreamedPut
from gridnode.timers import SPREAD, JitteredLoop

#: seconds a drain waits for the records that hand its released jobs back to the pool
RELEASE_GRACE = 2.0


def _listed(ids: dict[str, Any], most: int = 10) -> str:
    """``": a, b, c"`` (the first ``most`` of them) for a log line; "" when there are none."""
    return (": " + ", ".join(list(ids)[:most]) + (" ..." if len(ids) > most else "")) if ids else ""


class JobService(Service):
    """A service: started, it recovers what an earlier life left (`recovered` fires when done) and
    looks for jobs handed to it; stopped, every loop it started stops."""

    _log = Logger()

    def __init__(self, reactor: Any, config: NodeConfig, store: ObjectStore, media: Media[Any, Any],
                 now: Callable[[], float] = time.time, rng: random.Random | None = None,
                 metrics: Metrics | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self.media = media
        self.now = now
        self.rng = rng or random.Random()
        self.node_id = config.node_id or ""
        self.lease = config.job_lease
        self.spool = Spool(os.path.join(config.work_dir, "spool"), reactor)
        self.metrics = metrics or Metrics()
        #: runs what it is given: accepted uploads, claimed and recovered jobs
        self.runner = Runner(reactor, store, media, node_id=self.node_id, lease=self.lease, now=now,
                             metrics=self.metrics, rng=self.rng)
        self.draining = False
        #: whether a new upload is taken now, and its spool file
        free = FreeSpace(self.spool.free_bytes, config.min_free * 1024 * 1024)
        self.door = Admission(config, store, self.spool, free, self.metrics, now,
                              lambda: by_priority(a.job for a in self.active.values()), lambda: self.draining)
        #: fired by `hurry`: a drain waits no longer
        self._hurried: Deferred[None] = Deferred()
        #: claims orphaned jobs (and ours from an earlier life) and hands them to `run_claimed`
        self.adopter = Adopter(store.in_lane(BACKGROUND), self, self.node_id, self.lease, now=now, rng=self.rng)
        self.runner.on_released = self.adopter.hand_on
        #: fires once the recovery that startService begins is over: the node listens only then
        self.recovered: Deferred[None] = Deferred()
        #: every loop running, with what fires when it has stopped
        self._loops: dict[JitteredLoop, Deferred[Any]] = {}
        self.webhooks: Webhooks | None = None
        self.metrics.bind_load(self.load)
        for state in jobs.STATES:
            if state not in jobs.FINAL:
                self.metrics.jobs_active.labels(state).set_function(self._counter_of(state))
        self.metrics.bind_tenants(lambda: (a.job for a in self.active.values()))

    @property
    def active(self) -> dict[str, Active]:
        """The jobs this node works on, by id (its runner's)."""
        return self.runner.active

    # -- life cycle

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        """Resume what an earlier life left, sweep the spool, then look at our own markers every
        2 x lease for jobs handed to us, and (the registry writer alone) at the old layout's every
        `LEGACY_EVERY` s; each wait jittered (gridnode/timers.py)."""
        super().startService()
        d = self.recover()
        d.addCallback(lambda _: self.spool.sweep(keep=self._journaled))
        d.addCallback(lambda _: None).chainDeferred(self.recovered)
        self._every(2 * self.lease, self.adopter.check_own, "own markers")
        self._every(LEGACY_EVERY, self.adopter.migrate, "old markers")

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        """Stop every loop this service started: looks at the markers, the polls of records
        followed for subscribers. Fires once none is in the middle of a round."""
        super().stopService()
        stopping = list(self._loops.items())
        for loop, _ in stopping:
            if loop.running:
                loop.stop()
        return DeferredList([done for _, done in stopping]).addCallback(lambda _: None)

    def _every(self, seconds: float, work: Callable[[], object], what: str, spread: float = SPREAD) -> JitteredLoop:
        """Run ``work`` every ``seconds`` (each wait jittered by ``spread``) until the loop is stopped
        (by stopService at the latest)."""
        loop = JitteredLoop(self.reactor, work, seconds, self.rng, spread)
        done = self._loops[loop] = loop.start(now=False)

        def stopped(result: object) -> None:
            if isinstance(result, Failure):
                self._log.failure("{what} stopped", result, what=what)
            del self._loops[loop]

        done.addBoth(stopped)
        return loop

    def _counter_of(self, state: str) -> Callable[[], float]:
        return lambda: sum(1 for a in self.active.values() if a.job.state == state)

    def _journaled(self, name: str) -> bool:
        stem = name[:-5] if name.endswith(".json") else name
        return stem in self.active

    # -- admission (before any body byte is read): gridnode/admission.py

    @property
    def capacity(self) -> int:
        """The jobs this node holds before it refuses normal work (adoption takes no more)."""
        return self.config.workers + self.config.queue

    @property
    def uploading(self) -> set[str]:
        return self.door.uploading

    @property
    def space(self) -> FreeSpace:
        """``--min-free`` at admission and while bodies stream in (POST /jobs and tus chunks alike)."""
        return self.door.space

    @space.setter
    def space(self, space: FreeSpace) -> None:
        self.door.space = space

    def admit(self, length: int | None, limit: int | None = None,
              level: str = DEFAULT_PRIORITY) -> SpoolFile | Deferred[SpoolFile]:
        return self.door.admit(length, limit, level)

    def hold(self, name: str, length: int | None, limit: int | None = None,
             level: str = DEFAULT_PRIORITY) -> Callable[[], None]:
        return self.door.hold(name, length, limit, level)

    def check_admission(self, length: int | None, limit: int | None = None, level: str = DEFAULT_PRIORITY) -> None:
        self.door.check(length, limit, level)

    def limit(self, limit: int | None = None) -> int:
        return self.door.limit(limit)

    # -- a finished upload becomes a job

    @inlineCallbacks
    def submit(self, spool: SpoolFile, *, name: str, presets: str | None, checksum: str | None,
               tenant: str = "", claim: Callable[[str], Deferred[Any]] | None = None,
               notify: list[str] | None = None, notify_progress: bool = False,
               spec: list[Any] | None = None, priority: str = DEFAULT_PRIORITY) -> Any:
        """Check, probe, store and queue an uploaded body for ``tenant`` at ``priority``; returns the job (state
        queued) once it is durably accepted: its input, record and active marker in the store.
        ``claim(job_id)``, called once the job passed every check and before anything of it but its
        input is stored, writes its Idempotency-Key's entry (gridnode/idempotency.py); should it
        fail (another request with the key won), the job is dropped and never written. ``spec``: the
        job's inline outputs (a JSON list of output specs), besides the ``presets`` named."""
        job_id = os.path.basename(spool.path)
        self.metrics.upload_bytes.inc(spool.received())
        started = time.monotonic()
        self._log.info("job {job} received: {size} bytes", job=job_id, size=spool.received())
        stored: Deferred[Any] | None = None
        try:
            spool.close(release=False)  # its slot is held until the job is active or refused
            if spool.size == 0:
                raise GridnodeError("the upload is empty; send the video as the request body",
                                    code="not_a_video", status=422)
            # The input goes into the store (its last part and the completion, when it streamed in
            # as it arrived) while the digest and the probe run.
            stored = self._store_input(spool)
            # the digest is finished by a thread reading behind the upload: the probe runs meanwhile
            hashed = spool.digest()
            digest = None
            if checksum is not None:
                digest = yield hashed
                if checksum != digest:
                    raise GridnodeError("the upload's sha256 differs from its Upload-Checksum; send it again",
                                        code="checksum_mismatch", status=460)
            chosen = self.media.parse_presets(presets, spec)
            asked = list(dict.fromkeys(p.template for p in chosen if p.template))
            notify = yield notify_urls(self.webhooks, self.config.webhook.of(tenant), notify)
            job = Job.new(job_id, name=name[:255], presets=asked, node=self.node_id, size=spool.size,
                          now=self.now(), tenant=tenant, spec=spec, notify=notify,
                          notify_progress=notify_progress and bool(notify),  # notify: checked (gridnode/notify/)
                          priority=priority)
            job.advance(jobs.PROBING, self.now())
            probe_started = time.monotonic()
            probe = yield self.media.probe(spool.path)
            self._log.info("job {job} probed in {elapsed:.3f}s", job=job_id, elapsed=time.monotonic() - probe_started)
            self.media.check(chosen, probe)  # e.g. a clip past the end: refused now, not after the 201
            job.sha256 = digest if digest is not None else (yield hashed)
            if claim is not None:
                yield claim(job_id)
            job.input.update(probe.to_json())
            job.input["name"] = name[:255]
            job.accept(self.now(), self.lease)
            active = Active(job, spool.path)
            yield stored
            yield self.runner.store_accepted(active)
        except BaseException as e:
            if stored is not None:
                stored.addErrback(lambda _: None)  # its failure is this one, or moot
            spool.discard()  # frees the slot, and removes what reached the store
            code = getattr(e, "code", "error")
            self.metrics.upload_rejections.labels(code).inc()
            self._log.info("upload {job} refused: {code}", job=job_id, code=code)
            raise
        # Accepted: from here the job is the pool's (a peer adopts it should this node die).
        self.metrics.phase_seconds.labels("probe").observe(time.monotonic() - started)
        for preset in job.presets:
            self.metrics.jobs_accepted.labels(preset).inc()
        self.active[job.id] = active
        spool.release()
        active.marks["accepted"] = started
        self.runner.counts["accepted"] += 1
        self._log.info("job {job} accepted: {size} bytes, presets {presets}", job=job.id, size=spool.size,
                       presets=",".join(job.presets), state=job.state)
        if self.webhooks is not None:
            self.webhooks.announce(job, "job.queued")  # its body as the job is now: queued
        active.work = self.runner.run(active, probe, chosen, input_stored=True)
        return job

    def _store_input(self, spool: SpoolFile) -> Deferred[Any]:
        """Put the body into the store as its job's input: the end of what streamed in as it
        arrived, or the whole file (a tus upload assembled here, a store that takes files whole)."""
        put = spool.follower
        if not isinstance(put, StreamedPut):
            put = spool.follower = StreamedPut(self.store, keys.input_source(os.path.basename(spool.path)),
                                               spool.path)
        began, job_id = time.monotonic(), os.path.basename(spool.path)

        def stored(info: Any) -> None:
            took = time.monotonic() - began
            self.metrics.phase_seconds.labels("store_input").observe(took)
            self._log.info("job {job} input stored {elapsed:.3f}s after its last byte", job=job_id, elapsed=took)

        def failed(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, GridnodeError) and not isinstance(error, StorageUnavailable):
                # whatever the store said of the input (a lost completion, a refusal), the upload
                # is not stored: the client sends it again
                raise StorageUnavailable(f"the store did not take this upload ({error.message}); "
                                         "send it again") from error
            return failure

        d: Deferred[Any] = put.finish(spool.size)
        return d.addCallbacks(stored, failed)

    # -- adoption and recovery

    def holds(self, job_id: str) -> bool:
        """Whether we work on ``job_id`` or are accepting it (its upload's slot is held until then)."""
        return job_id in self.active or job_id in self.uploading

    def run_claimed(self, claim: Claim) -> None:
        """Run a job the adopter won for this node."""
        self.runner.counts["adopted"] += 1
        self.metrics.jobs_adopted.inc()
        job = claim.job
        active = self.active[job.id] = Active(job, self.spool.path(job.id), etag=claim.etag, record=job.dumps())
        active.work = self.runner.resume(active)

    def quarantined(self, job: Job) -> None:
        """The adopter failed a job as poison instead of claiming it."""
        self.runner.counts["poison"] += 1

    @inlineCallbacks
    def recover(self) -> Any:
        """At start: jobs in the local journal (accepted before a crash) run again from their
        spooled copy, which spares fetching the input; so do jobs the store says this node owned
        in an earlier life. The store is the truth: a job is journaled only once its record is
        stored, so a journal whose record is missing was never acknowledged by this version."""
        for job, path in job_records.journaled(self.spool.folder):
            try:
                # where its marker is we do not know (an earlier version's layout, if upgraded in
                # place): the claim marks it under us and drops an old-layout marker
                won = yield self.adopter.claim(job.id, LEGACY)
            except GridnodeError as e:
                self._log.warn("cannot check job {job} in the store: {reason}", job=job.id, reason=e.message)
                won = False
            if won or job.id in self.active:
                continue
            # No record: journaled by an earlier version, which answered 201 before storing
            # anything. Ours alone: run it from the spool.
            exists = yield in_store(self.store, keys.job_record(job.id))
            if exists:
                continue
            job.reclaim(self.node_id, self.now(), self.lease)
            active = self.active[job.id] = Active(job, path)
            chosen = self.media.parse_presets(",".join(job.presets) or None, job.spec or None)
            probe = yield self.media.probe(path)
            self._log.info("job {job} resumed from the local journal", job=job.id)
            active.work = self.runner.run(active, probe, chosen, input_stored=False)
        yield self.adopter.check_own()  # one LIST of our own prefix: whatever the pool's job count

    # -- draining

    @inlineCallbacks
    def drain(self, timeout: float, grace: float = RELEASE_GRACE) -> Any:
        """Refuse uploads; give running jobs ``timeout`` seconds, then release the rest and give the
        record writes that hand them back ``grace`` seconds: with the store down those retry for
        ever, and what is not written by then is left to our watchers (they adopt the jobs of a
        node that left) and the local journal (this node resumes it at its next start). `hurry`
        ends both waits at once."""
        self.draining = True
        pending = {a.job.id: a.work for a in self.active.values() if a.work is not None}
        self._log.info("draining: waiting up to {timeout}s for {count} jobs{ids}", count=len(pending),
                       timeout=timeout, ids=_listed(pending))
        if pending:
            # Wait for the jobs or the timeout, whichever comes first; cancelling the
            # jobs' Deferreds would cancel the jobs, which is not what draining means.
            yield self._first_of(DeferredList(list(pending.values()), consumeErrors=True), timeout)
        left = [a for a in self.active.values() if a.work is not None and not a.work.called]
        if left:
            self._log.info("draining: {count} jobs still running; released to the pool{ids}", count=len(left),
                           ids=_listed({a.job.id: a for a in left}))
        for active in left:
            active.released = True
            self.media.cancel(active.job.id)
        if left:
            works = [a.work for a in left if a.work is not None]
            yield self._first_of(DeferredList(works, consumeErrors=True), grace)
            for active in left:
                if active.work is not None and not active.work.called:
                    self._log.warn("draining: job {job} ({state}) could not be handed back in {grace}s (the store "
                                   "is unreachable?); our watchers and the local journal settle it", job=active.job.id,
                                   state=active.job.state, grace=grace)
        return len(left)

    def hurry(self) -> None:
        """End a drain's waits now (a second SIGTERM)."""
        if not self._hurried.called:
            self._hurried.callback(None)

    def _first_of(self, work: Deferred[Any], seconds: float) -> Deferred[Any]:
        """Fires when ``work`` does, after ``seconds``, or on `hurry`, whichever comes first."""
        timer: Deferred[None] = deferLater(self.reactor, seconds, lambda: None)
        first = DeferredList([work, timer, self._hurried], fireOnOneCallback=True, consumeErrors=True)

        def done(result: Any) -> Any:
            if not timer.called:
                timer.cancel()
            return result

        return first.addBoth(done)

    # -- what clients ask

    @inlineCallbacks
    def get(self, job_id: str) -> Any:
        """This node's live view of a job, else its record in the store. While the record of a job
        that ended here is being written, the record as this node last stored it: its end is told
        once it is stored."""
        active = self.active.get(job_id)
        told = active.told if active is not None else None
        if told is not None:
            return told
        try:
            job, _ = yield job_records.read(self.store, job_id)
        except NotFound:
            raise NotFound(f"no job {job_id}") from None
        return job

    def listing(self, tenant: str | None = None) -> dict[str, Any]:
        """This node's jobs now, and the last ones that ended here: ``tenant``'s only, unless None."""
        shown = [t for a in self.active.values() if (t := a.told) is not None]  # as `get` tells them
        return {"active": [j.to_json() for j in shown if tenant in (None, j.tenant)],
                "recent": [j.to_json() for j in reversed(self.runner.recent) if tenant in (None, j.tenant)]}

    def subscribe(self, job_id: str, callback: Callable[[Job], None], poll: float = 1.0) -> Callable[[], None]:
        """Call ``callback`` on every change of a job; returns the unsubscribe. A job another
        node runs (or adopted) is followed through its record in the store, every ``poll`` s."""
        active = self.active.get(job_id)
        if active is None:
            # a subscriber's own pace: it reads and writes nothing the pool shares
            return follow_record(self.get, lambda check: self._every(poll, check, f"following job {job_id}",
                                                                     spread=0.0), job_id, callback)
        active.listeners.append(callback)

        def unsubscribe() -> None:
            if callback in active.listeners:
                active.listeners.remove(callback)

        return unsubscribe

    @inlineCallbacks
    def cancel(self, job_id: str) -> Any:
        active = self.active.get(job_id)
        if active is None:
            job = yield self.get(job_id)
            if job.final:
                raise GridnodeError(f"job {job_id} is {job.state} already; nothing to cancel",
                                    code="already_final", status=409)
            raise GridnodeError(f"job {job_id} runs on node {job.node}; cancel it there",
                                code="not_here", status=409)
        active.cancelled = True
        self.media.cancel(job_id)
        if active.work is not None and not active.job.final:
            yield active.work
        return active.job

    def load(self) -> dict[str, float]:
        """What ``/health`` and the registry record say of this node's load (docs/api.md)."""
        running = sum(1 for a in self.active.values() if a.job.state in (jobs.TRANSCODING, jobs.STORING))
        work = sum(a.job.input_left() for a in self.active.values())
        load: dict[str, float] = {"running": running, "queued": len(self.active) - running,
                                  "workers": self.config.workers, "free_disk": self.spool.free_bytes(),
                                  "work": round(work, 1)}
        load |= load_figures((a.job.priority, a.job.input_left()) for a in self.active.values()
                             if a.job.state not in (jobs.TRANSCODING, jobs.STORING))
        speed = self.runner.speed.value
        return load if speed is None else load | {"speed": round(speed, 3)}


