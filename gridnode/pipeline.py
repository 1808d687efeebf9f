"""
The conversion pipeline of one node: upload -> probe -> stored input ->
ffmpeg pool -> stored outputs -> done, and who owns each job.

`JobService` is the I/O side around the `Job` state machine.

- The answer to an upload (201) comes once the input is probed. From then on
  the job is never dropped: a local journal (``spool/<id>.json`` beside the
  spooled body) survives a crash, and the input stays in the spool until the
  store has it, however long the store is unreachable.
- Every write of ``jobs/<id>.json`` is conditional on the ETag of our last
  write. The owner renews its jobs' leases; a job whose lease ran out (its
  owner died) is claimed by exactly one peer with a conditional write, run
  again from the stored input, and after `MAX_ATTEMPTS` quarantined as
  ``poison``. A node that finds its record taken over stops its own work.
- ``active/<id>`` marks the unfinished jobs, so adoption scans only those;
  and of those a node reads only the ones it watches (``WATCHERS`` per job,
  by consistent hashing over the live members) and ``SAMPLE`` others: not
  N x M reads a round. Its first pass reads them all if an earlier life of
  its own may have left some (the registry found that life's record).
- Draining (SIGTERM): no new uploads; running jobs get ``--drain-timeout``;
  the rest are released with an expired lease so peers adopt them at once.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredLock, inlineCallbacks
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from gridnode import jobs, keys
from gridnode.config import NodeConfig
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed, StorageUnavailable
from gridnode.jobs import Job
from gridnode.metrics import Metrics
from gridnode.spool import Spool, SpoolFile
from gridnode.store.base import ObjectStore
from gridnode.watchers import WatchRing

#: tries of one job (first run and adoptions) before it is quarantined as poison
MAX_ATTEMPTS = 3
#: nodes that watch each unfinished job for adoption (gridnode/watchers.py)
WATCHERS = 2
#: jobs watched by others that a pass reads too, at random: found even when their watchers are
#: full or gone
SAMPLE = 8


class Busy(GridnodeError):
    code = "busy"
    status = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Lost(GridnodeError):
    """Another node owns this job now: stop working on it, write nothing."""

    code = "lost_ownership"
    status = 409


@dataclass
class Active:
    """A job this node is working on."""

    job: Job
    spool_path: str
    etag: str | None = None  # of our last write of jobs/<id>.json
    watchers: list[Callable[[Job], None]] = field(default_factory=list)
    work: Deferred[Any] | None = None
    marks: dict[str, float] = field(default_factory=dict)  # phase -> monotonic start, for metrics
    cancelled: bool = False  # a client asked
    lost: bool = False  # another node took the job over
    released: bool = False  # draining: handed to the pool
    #: one write of jobs/<id>.json at a time: a lease renewal in flight must not land after, and
    #: so over, the write of a later state
    writing: DeferredLock = field(default_factory=DeferredLock)

    @property
    def stopping(self) -> bool:
        return self.cancelled or self.lost or self.released


class JobService:
    _log = Logger()

    def __init__(self, reactor: Any, config: NodeConfig, store: ObjectStore, media: Any,
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
        self.active: dict[str, Active] = {}
        self.uploading: set[str] = set()
        self.draining = False
        self.counts: dict[str, int] = {}
        self._adopting = DeferredLock()
        #: the live members' ids (ourselves included), when there is a membership
        self.members: Callable[[], list[str]] | None = None
        self._first_pass = True
        #: whether an earlier life of ours may have left jobs (None: not known): the registry found
        #: its record at start. One that left cleanly deleted it, its jobs released to its peers.
        self.earlier_life: Callable[[], bool | None] = lambda: None
        self._ring: WatchRing | None = None
        #: the last jobs that ended here, newest last (for the status page)
        self.recent: deque[Job] = deque(maxlen=50)
        self._loops: list[LoopingCall] = []
        self.metrics = metrics or Metrics()
        self.metrics.bind_load(self.load)
        for state in jobs.STATES:
            if state not in jobs.FINAL:
                self.metrics.jobs_active.labels(state).set_function(self._counter_of(state))

    # -- life cycle

    def start(self, scan: bool = True) -> Deferred[Any]:
        """Resume what an earlier life left in the journal, sweep the spool, then renew
        leases and look for orphaned jobs periodically."""
        d = self.recover()
        d.addCallback(lambda _: self.spool.sweep(keep=self._journaled))
        renew = LoopingCall(self.renew_leases)
        renew.clock = self.reactor
        renew.start(self.lease / 3, now=False)
        self._loops.append(renew)
        if scan:
            adopt = LoopingCall(self.adopt_orphans)
            adopt.clock = self.reactor
            adopt.start(self.lease / 2 * (0.75 + self.rng.random() / 2), now=False)
            self._loops.append(adopt)
        return d

    def _counter_of(self, state: str) -> Callable[[], float]:
        return lambda: sum(1 for a in self.active.values() if a.job.state == state)

    def stop_loops(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    def _journaled(self, name: str) -> bool:
        stem = name[:-5] if name.endswith(".json") else name
        return stem in self.active

    # -- admission (before any body byte is read)

    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.queue

    def admit(self, length: int | None) -> SpoolFile:
        """A spool file for a new upload, or the coded reason it is refused now."""
        try:
            return self._admit(length)
        except GridnodeError as e:
            self.metrics.upload_rejections.labels(e.code).inc()
            raise

    def _admit(self, length: int | None) -> SpoolFile:
        if self.draining:
            raise Busy("this node is draining; upload to another node of the pool", retry_after=30)
        taken = len(self.active) + len(self.uploading)
        if taken >= self.capacity:
            raise Busy(f"this node is full ({len(self.active)} jobs, {len(self.uploading)} uploads); "
                       "try another node or retry later")
        limit = self.config.max_upload_bytes
        if length is not None and length > limit:
            raise GridnodeError(f"the upload is {length} bytes; this node accepts at most {limit}",
                                code="too_large", status=413)
        free = self.spool.free_bytes()
        if free - (length or 0) < self.config.min_free * 1024 * 1024:
            raise GridnodeError("this node is low on disk space; try another node",
                                code="insufficient_storage", status=507)
        name = keys.new_id(self.now())
        spool = self.spool.new(name, limit=limit)
        if length:
            try:
                spool.reserve(length)  # a race with other uploads for the last free space ends here
            except GridnodeError:
                spool.discard()
                raise
        # An upload in flight holds a slot until its body is over.
        self.uploading.add(name)
        spool.on_release = lambda: self.uploading.discard(name)
        return spool

    # -- a finished upload becomes a job

    @inlineCallbacks
    def submit(self, spool: SpoolFile, *, name: str, presets: str | None, checksum: str | None) -> Any:
        """Check, probe and queue an uploaded body; returns the job (state queued)."""
        job_id = os.path.basename(spool.path)
        self.metrics.upload_bytes.inc(spool.received())
        started = time.monotonic()
        self._log.info("job {job} received: {size} bytes", job=job_id, size=spool.received())
        try:
            spool.close(release=False)  # its slot is held until the job is active or refused
            if spool.size == 0:
                raise GridnodeError("the upload is empty; send the video as the request body",
                                    code="not_a_video", status=422)
            # the digest is finished by a thread reading behind the upload: the probe runs meanwhile
            hashed = spool.digest()
            digest = None
            if checksum is not None:
                digest = yield hashed
                if checksum != digest:
                    raise GridnodeError("the upload's sha256 differs from its Upload-Checksum; send it again",
                                        code="checksum_mismatch", status=460)
            chosen = self.media.parse_presets(presets)
            job = Job.new(job_id, name=name[:255], presets=[p.name for p in chosen], node=self.node_id,
                          size=spool.size, now=self.now())
            job.advance(jobs.PROBING, self.now())
            probe_started = time.monotonic()
            probe = yield self.media.probe(spool.path)
            self._log.info("job {job} probed in {elapsed:.3f}s", job=job_id, elapsed=time.monotonic() - probe_started)
            job.sha256 = digest if digest is not None else (yield hashed)
        except BaseException as e:
            spool.discard()  # frees the slot too
            code = getattr(e, "code", "error")
            self.metrics.upload_rejections.labels(code).inc()
            self._log.info("upload {job} refused: {code}", job=job_id, code=code)
            raise
        self.metrics.phase_seconds.labels("probe").observe(time.monotonic() - started)
        for preset in job.presets:
            self.metrics.jobs_accepted.labels(preset).inc()
        job.input.update(probe.to_json())
        job.input["name"] = name[:255]
        job.advance(jobs.QUEUED, self.now())
        job.attempts = 1
        job.lease_until = self.now() + self.lease
        active = self.active[job.id] = Active(job, spool.path)
        spool.release()
        active.marks["accepted"] = started
        self._journal(active)
        self._count("accepted")
        self._log.info("job {job} accepted: {size} bytes, presets {presets}", job=job.id, size=spool.size,
                       presets=",".join(job.presets), state=job.state)
        active.work = self._run(active, probe, chosen, input_stored=False)
        return job

    def _journal(self, active: Active, data: bytes | None = None) -> None:
        """The job (``data``: as just dumped) beside its spooled body: what a restart resumes from."""
        tmp = active.spool_path + ".json.tmp"
        with open(tmp, "wb") as f:
            f.write(active.job.dumps() if data is None else data)
        os.replace(tmp, active.spool_path + ".json")

    @inlineCallbacks
    def _run(self, active: Active, probe: Any, presets: list[Any], input_stored: bool) -> Any:
        job = active.job
        try:
            yield self._durably("write job record", lambda: self._save(active))
            if not input_stored:
                began = time.monotonic()
                yield self._durably("store input", lambda: self.store.put_file(keys.input_source(job.id),
                                                                               active.spool_path))
                self.metrics.phase_seconds.labels("store_input").observe(time.monotonic() - began)
            # Only now may peers adopt the job: before, its input is in our spool alone (and our
            # journal resumes it if we restart).
            yield self._durably("mark job active", lambda: self.store.put_bytes(keys.active_marker(job.id), b""))
            active.marks["queued"] = time.monotonic()
            if active.stopping:
                raise CancelledError()
            stored = yield self._queue(active, probe, presets)
            if active.stopping:
                raise CancelledError()
            job.outputs = stored
            job.advance(jobs.DONE, self.now())
            self._count("done")
            self._log.info("job {job} done: {count} outputs", job=job.id, count=len(stored), state=job.state,
                           attempts=job.attempts)
        except (CancelledError, Lost) as e:
            self._stopped(active, e)
        except GridnodeError as e:
            if e.code == "cancelled" or active.stopping:
                self._stopped(active, e)
            else:
                job.fail(e.code, e.message, self.now())
                self._count("failed")
                self._log.warn("job {job} failed: {code}: {message}", job=job.id, code=e.code, message=e.message,
                               state=job.state)
        except Exception as e:  # noqa: BLE001 - a job must always end in a final state
            self._log.failure("job {job} crashed", job=job.id)
            job.fail("internal_error", f"the node failed on this job ({type(e).__name__}); submit it again",
                     self.now())
            self._count("failed")
        yield self._finish(active)

    @inlineCallbacks
    def _queue(self, active: Active, probe: Any, presets: list[Any]) -> Any:
        """Hand the job to the pool; an accepted job waits for room rather than failing."""
        while True:
            try:
                result = yield self.media.run(active.job.id, probe, active.spool_path, presets,
                                              started=lambda: self._transcoding(active),
                                              progress=lambda p: self._progress(active, p),
                                              finish=lambda produced: self._store_outputs(active, produced))
                return result
            except GridnodeError as e:
                if e.code != "busy" or active.stopping:
                    raise
            yield deferLater(self.reactor, 1.0, lambda: None)

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
            self._count("cancelled")
            self._log.info("job {job} cancelled", job=job.id, state=job.state)

    @inlineCallbacks
    def _finish(self, active: Active) -> Any:
        """Write the last record (unless the job is someone else's now) and forget the job."""
        job = active.job
        if job.final:
            self.recent.append(job)
            for preset in job.presets:
                self.metrics.jobs_finished.labels(job.state, preset).inc()
            if "accepted" in active.marks:
                self.metrics.job_seconds.labels(job.state).observe(time.monotonic() - active.marks["accepted"])
        try:
            if active.released and not job.final and not active.lost:
                # Back to the pool: queued, lease expired, so a peer adopts it at once.
                job.state = jobs.QUEUED
                job.progress = 0.0
                job.lease_until = 0.0
                job.updated = self.now()
            self._changed(active)
            if not active.lost:
                try:
                    yield self._durably("write job record", lambda: self._save(active))
                    if job.final:
                        yield self._durably("unmark job", lambda: self.store.delete(keys.active_marker(job.id)))
                except Lost:
                    self._log.warn("job {job}: another node took it over before its end was written", job=job.id)
        finally:
            self.active.pop(job.id, None)
            SpoolFile.remove(active.spool_path)
            SpoolFile.remove(active.spool_path + ".json")

    @inlineCallbacks
    def _store_outputs(self, active: Active, produced: list[Any]) -> Any:
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
                self.metrics.ffmpeg_speed.observe(float(job.input["duration"]) / took)
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
                continue
            entry = stored[output.preset] = {
                "preset": output.preset, "name": output.name, "size": output.size, "files": 1,
                "content_type": output.content_type, "url": f"/results/{job.id}/{output.name}"}
            if not output.content_type.startswith("image/"):
                entry["duration"] = job.input.get("duration")
        self.metrics.phase_seconds.labels("store_outputs").observe(time.monotonic() - now)
        return list(stored.values())

    def _store_output(self, job_id: str, output: Any) -> Callable[[], Deferred[Any]]:
        key = keys.output(job_id, output.name)
        return lambda: self.store.put_file(key, output.path, content_type=output.content_type)

    def _transcoding(self, active: Active) -> None:
        active.job.advance(jobs.TRANSCODING, self.now())
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
        if active.job.set_progress(progress, self.now()):
            self._changed(active)

    def _changed(self, active: Active) -> None:
        for watcher in list(active.watchers):
            try:
                watcher(active.job)
            except Exception:  # noqa: BLE001 - a broken watcher must not break the job
                self._log.failure("job watcher failed")

    # -- the job record, owned

    def _save(self, active: Active) -> Deferred[Any]:
        """Write jobs/<id>.json, as the job is when the previous write of it has ended, on the
        condition that it is still ours."""
        return active.writing.run(self._write_record, active)

    @inlineCallbacks
    def _write_record(self, active: Active) -> Any:
        job = active.job
        if not job.final and not active.released:
            job.lease_until = max(job.lease_until, self.now() + self.lease)
        data = job.dumps()
        key = keys.job_record(job.id)
        try:
            if active.etag is None:
                info = yield self.store.put_bytes(key, data, if_none_match="*", content_type="application/json")
            else:
                info = yield self.store.put_bytes(key, data, if_match=active.etag, content_type="application/json")
        except (PreconditionFailed, NotFound):
            # A retried write may have landed the first time: then the record is ours.
            try:
                current, info = yield self.store.get_bytes(key, max_size=jobs.MAX_RECORD_BYTES)
            except NotFound:
                raise Lost(f"job {job.id}: its record is gone") from None
            if Job.loads(current).node != self.node_id:
                raise Lost(f"job {job.id} is owned by another node now") from None
            info = yield self.store.put_bytes(key, data, if_match=info.etag, content_type="application/json")
        active.etag = info.etag
        if not job.final and os.path.exists(active.spool_path):
            self._journal(active, data)
        return info

    @inlineCallbacks
    def renew_leases(self) -> Any:
        """Renew the lease of every job we run; a job someone took over is stopped here."""
        for active in list(self.active.values()):
            if active.job.final or active.stopping or active.etag is None:
                continue
            try:
                yield self._save(active)
            except Lost:
                self._lose(active)
            except GridnodeError as e:
                self._log.warn("could not renew the lease of job {job}: {reason}", job=active.job.id,
                               reason=e.message)

    @inlineCallbacks
    def _durably(self, what: str, action: Callable[[], Deferred[Any]]) -> Any:
        """Run a store action until it succeeds: while the store is unreachable, wait and retry."""
        delay = 0.5
        while True:
            try:
                result = yield action()
                return result
            except StorageUnavailable as e:
                self._log.warn("{what}: store unreachable ({reason}); retrying in {delay}s", what=what,
                               reason=e.message, delay=delay)
                yield deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 30.0)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    # -- adoption and recovery

    def adopt_orphans(self, dead: frozenset[str] = frozenset()) -> Deferred[Any]:
        """Claim unfinished jobs whose owner's lease ran out (or whose owner is in ``dead``).

        One pass at a time: a pass started by a confirmed death while the periodic one runs would
        read a job the first has just claimed, take it for one of our earlier lives, and claim it
        again (two runs of one job)."""
        return self._adopting.run(self._adopt_pass, dead)

    @inlineCallbacks
    def _adopt_pass(self, dead: frozenset[str]) -> Any:
        if self.draining:
            return 0
        try:
            markers = yield self.store.list_all(keys.active_prefix())
        except GridnodeError as e:
            self._log.warn("cannot scan for orphaned jobs: {reason}", reason=e.message)
            return 0
        claimed = 0
        ids = self._to_read([m.key[len(keys.active_prefix()):] for m in markers], dead)
        for job_id in ids:
            if job_id in self.active or not keys.is_id(job_id) or len(self.active) >= self.capacity:
                continue
            try:
                won = yield self._claim(job_id, dead)
                claimed += int(won)
            except GridnodeError as e:
                self._log.warn("could not adopt job {job}: {reason}", job=job_id, reason=e.message)
        return claimed

    def _to_read(self, ids: list[str], dead: frozenset[str]) -> list[str]:
        """The jobs whose records a pass reads: all of them without a membership, or on our first
        pass unless we know no earlier life of ours left any; else those we watch, then a few others."""
        self.rng.shuffle(ids)  # peers scanning at once start at different jobs
        first, self._first_pass = self._first_pass, False
        if self.members is None or (first and self.earlier_life() is not False):
            return ids
        members = frozenset(self.members()) - dead | {self.node_id}
        if self._ring is None or self._ring.members != sorted(members):
            self._ring = WatchRing(members)
        ring = self._ring
        mine = [j for j in ids if self.node_id in ring.watchers(j, WATCHERS)]
        watched = set(mine)
        others = [j for j in ids if j not in watched]
        return mine + others[:SAMPLE]

    @inlineCallbacks
    def _claim(self, job_id: str, dead: frozenset[str] = frozenset()) -> Any:
        key = keys.job_record(job_id)
        try:
            data, info = yield self.store.get_bytes(key, max_size=jobs.MAX_RECORD_BYTES)
        except NotFound:
            return False
        job = Job.loads(data)
        if job.final:
            yield self.store.delete(keys.active_marker(job_id))
            return False
        if job_id in self.active:
            return False  # ours in this life (the scan and this read are not atomic)
        earlier_life = job.node == self.node_id
        if not (earlier_life or job.node in dead or job.lease_until < self.now()):
            return False
        previous = job.node
        if job.attempts >= MAX_ATTEMPTS:
            job.fail("poison", f"the job failed {job.attempts} times on nodes that then stopped; it is "
                     "quarantined. Check the input, then submit it again", self.now())
            active = Active(job, "", etag=info.etag)
            try:
                yield self._save(active)
            except Lost:
                return False
            yield self.store.delete(keys.active_marker(job_id))
            self._count("poison")
            self._log.warn("job {job} quarantined as poison after {attempts} attempts", job=job_id,
                           attempts=job.attempts, code="poison")
            return False
        job.reclaim(self.node_id, self.now(), self.lease)
        try:
            info = yield self.store.put_bytes(key, job.dumps(), if_match=info.etag, content_type="application/json")
        except (PreconditionFailed, NotFound):
            return False  # another node was faster
        self._count("adopted")
        self.metrics.jobs_adopted.inc()
        self._log.info("job {job} adopted from {previous} (attempt {attempts})", job=job_id, previous=previous,
                       attempts=job.attempts, state=job.state)
        active = self.active[job_id] = Active(job, self.spool.path(job_id), etag=info.etag)
        active.work = self._resume(active)
        return True

    @inlineCallbacks
    def _resume(self, active: Active) -> Any:
        """Run an adopted job from its stored input."""
        job = active.job
        stored = True
        try:
            if os.path.exists(active.spool_path):
                # Our own earlier life's spool: the store may not have the input yet.
                stored = yield self._exists(keys.input_source(job.id))
            else:
                yield self._durably("fetch input", lambda: self.store.get_file(keys.input_source(job.id),
                                                                               active.spool_path))
            chosen = self.media.parse_presets(",".join(job.presets))
            probe = yield self.media.probe(active.spool_path)
        except GridnodeError as e:
            job.fail(e.code, e.message, self.now())
            self._log.warn("adopted job {job} failed: {code}: {message}", job=job.id, code=e.code, message=e.message)
            yield self._finish(active)
            return
        yield self._run(active, probe, chosen, input_stored=stored)

    @inlineCallbacks
    def recover(self) -> Any:
        """At start: jobs in the local journal (accepted before a crash) run again; so do jobs
        the store says this node owned in an earlier life."""
        for name in sorted(os.listdir(self.spool.folder)):
            if not name.endswith(".json") or not keys.is_id(name[:-5]):
                continue
            job_id = name[:-5]
            path = self.spool.path(job_id)
            try:
                with open(path + ".json", "rb") as f:
                    job = Job.loads(f.read())
            except (OSError, GridnodeError):
                continue
            if not os.path.exists(path) or job.final:
                continue
            try:
                won = yield self._claim(job_id)
            except GridnodeError as e:
                self._log.warn("cannot check job {job} in the store: {reason}", job=job_id, reason=e.message)
                won = False
            if not won and job_id not in self.active:
                # Never written to the store: ours alone. Run it from the spool.
                exists = yield self._exists(keys.job_record(job_id))
                if exists:
                    continue
                job.reclaim(self.node_id, self.now(), self.lease)
                active = self.active[job_id] = Active(job, path)
                chosen = self.media.parse_presets(",".join(job.presets))
                probe = yield self.media.probe(path)
                self._log.info("job {job} resumed from the local journal", job=job_id)
                active.work = self._run(active, probe, chosen, input_stored=False)
        yield self.adopt_mine()

    @inlineCallbacks
    def adopt_mine(self) -> Any:
        try:
            markers = yield self.store.list_all(keys.active_prefix())
        except GridnodeError:
            return
        for m in markers:
            job_id = m.key[len(keys.active_prefix()):]
            if job_id not in self.active and keys.is_id(job_id):
                try:
                    data, _ = yield self.store.get_bytes(keys.job_record(job_id), max_size=jobs.MAX_RECORD_BYTES)
                    if Job.loads(data).node == self.node_id:
                        yield self._claim(job_id)
                except GridnodeError:
                    continue

    @inlineCallbacks
    def _exists(self, key: str) -> Any:
        try:
            yield self.store.stat(key)
            return True
        except NotFound:
            return False

    # -- draining

    @inlineCallbacks
    def drain(self, timeout: float) -> Any:
        """Refuse uploads; give running jobs ``timeout`` seconds, then release the rest."""
        self.draining = True
        self.stop_loops()
        pending = [a.work for a in self.active.values() if a.work is not None]
        self._log.info("draining: {count} jobs, up to {timeout}s", count=len(pending), timeout=timeout)
        if pending:
            # Wait for the jobs or the timeout, whichever comes first; cancelling the
            # jobs' Deferreds would cancel the jobs, which is not what draining means.
            done: Deferred[Any] = DeferredList(pending, consumeErrors=True)
            timer: Deferred[None] = deferLater(self.reactor, timeout, lambda: None)
            yield DeferredList([done, timer], fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
        left = [a for a in self.active.values() if a.work is not None]
        for active in left:
            active.released = True
            self.media.cancel(active.job.id)
        for active in left:
            try:
                yield active.work
            except Exception:  # noqa: BLE001 - ending anyway
                pass
        return len(left)

    # -- what clients ask

    @inlineCallbacks
    def get(self, job_id: str) -> Any:
        """This node's live view of a job, else its record in the store."""
        if job_id in self.active:
            return self.active[job_id].job
        try:
            data, _ = yield self.store.get_bytes(keys.job_record(job_id), max_size=jobs.MAX_RECORD_BYTES)
        except NotFound:
            raise NotFound(f"no job {job_id}") from None
        return Job.loads(data)

    def listing(self) -> dict[str, Any]:
        """This node's jobs now, and the last ones that ended here."""
        return {"active": [a.job.to_json() for a in self.active.values()],
                "recent": [j.to_json() for j in reversed(self.recent)]}

    def watch(self, job_id: str, callback: Callable[[Job], None], poll: float = 1.0) -> Callable[[], None]:
        """Call ``callback`` on every change of a job; returns the unsubscribe. A job another
        node runs (or adopted) is followed through its record in the store, every ``poll`` s."""
        active = self.active.get(job_id)
        if active is None:
            return self._watch_record(job_id, callback, poll)
        active.watchers.append(callback)

        def unsubscribe() -> None:
            if callback in active.watchers:
                active.watchers.remove(callback)

        return unsubscribe

    def _watch_record(self, job_id: str, callback: Callable[[Job], None], poll: float) -> Callable[[], None]:
        last: list[bytes] = []

        @inlineCallbacks
        def check() -> Any:
            try:
                job = yield self.get(job_id)
            except GridnodeError:
                return  # unreachable for now: try again at the next poll
            data = job.dumps()
            if not last or data != last[0]:
                last[:] = [data]
                callback(job)
            if job.final and loop.running:
                loop.stop()

        loop = LoopingCall(check)
        loop.clock = self.reactor
        loop.start(poll, now=False).addErrback(lambda f: self._log.failure("watching {job}", f, job=job_id))

        def unsubscribe() -> None:
            if loop.running:
                loop.stop()

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
        running = sum(1 for a in self.active.values() if a.job.state in (jobs.TRANSCODING, jobs.STORING))
        return {"running": running, "queued": len(self.active) - running, "workers": self.config.workers,
                "free_disk": self.spool.free_bytes()}


