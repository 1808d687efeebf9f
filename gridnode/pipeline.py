"""
The conversion pipeline of one node: upload -> probe -> stored input ->
ffmpeg pool -> stored outputs -> done.

`JobService` is the I/O side around the `Job` state machine. A job record is
written to the store on every state change. The answer to an upload (201)
comes once the input is probed; from then on the job is never dropped: the
input stays in the local spool until the store has it, however long the
store is unreachable.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gridnode import jobs, keys
from gridnode.config import NodeConfig
from gridnode.errors import GridnodeError, NotFound, StorageUnavailable
from gridnode.jobs import Job
from gridnode.store.base import ObjectStore
from gridnode.web.upload import Spool, SpoolFile


class Busy(GridnodeError):
    code = "busy"
    status = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Active:
    """A job this node is working on, with who is watching it."""

    job: Job
    spool_path: str
    watchers: list[Callable[[Job], None]] = field(default_factory=list)
    work: Deferred[Any] | None = None
    cancelled: bool = False


class JobService:
    _log = Logger()

    def __init__(self, reactor: Any, config: NodeConfig, store: ObjectStore, media: Any,
                 now: Callable[[], float] = time.time) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self.media = media
        self.now = now
        self.node_id = config.node_id or ""
        self.spool = Spool(os.path.join(config.work_dir, "spool"))
        self.active: dict[str, Active] = {}
        self.draining = False
        self.counts: dict[str, int] = {}

    def start(self) -> None:
        """At start-up: spool files are uploads a crash cut off; nothing refers to them."""
        self.spool.sweep(keep=lambda name: name in self.active)

    # -- admission (before any body byte is read)

    @property
    def capacity(self) -> int:
        return self.config.workers + self.config.queue

    def admit(self, length: int | None) -> SpoolFile:
        """A spool file for a new upload, or the coded reason it is refused now."""
        if self.draining:
            raise Busy("this node is draining; upload to another node of the pool", retry_after=30)
        if len(self.active) >= self.capacity:
            raise Busy(f"this node is full ({len(self.active)} jobs); try another node or retry later")
        limit = self.config.max_upload_bytes
        if length is not None and length > limit:
            raise GridnodeError(f"the upload is {length} bytes; this node accepts at most {limit}",
                                code="too_large", status=413)
        free = self.spool.free_bytes()
        if free - (length or 0) < self.config.min_free * 1024 * 1024:
            raise GridnodeError("this node is low on disk space; try another node",
                                code="insufficient_storage", status=507)
        return self.spool.new(keys.new_id(self.now()), limit=limit)

    # -- a finished upload becomes a job

    @inlineCallbacks
    def submit(self, spool: SpoolFile, *, name: str, presets: str | None, checksum: str | None) -> Any:
        """Check, probe and queue an uploaded body; returns the job (state queued)."""
        job_id = os.path.basename(spool.path)
        try:
            spool.close()
            if spool.size == 0:
                raise GridnodeError("the upload is empty; send the video as the request body",
                                    code="not_a_video", status=422)
            digest = spool.sha256.hexdigest()
            if checksum is not None and checksum != digest:
                raise GridnodeError("the upload's sha256 differs from its Upload-Checksum; send it again",
                                    code="checksum_mismatch", status=460)
            chosen = self.media.parse_presets(presets)
            job = Job.new(job_id, name=name[:255], presets=[p.name for p in chosen], node=self.node_id,
                          size=spool.size, now=self.now(), sha256=digest)
            job.advance(jobs.PROBING, self.now())
            probe = yield self.media.probe(spool.path)
        except BaseException:
            spool.discard()
            raise
        job.input.update(probe.to_json())
        job.input["name"] = name[:255]
        job.advance(jobs.QUEUED, self.now())
        active = self.active[job.id] = Active(job, spool.path)
        self._count("accepted")
        self._log.info("job {job} accepted: {size} bytes, presets {presets}", job=job.id, size=spool.size,
                       presets=",".join(job.presets), state=job.state)
        active.work = self._run(active, probe, chosen)
        return job

    @inlineCallbacks
    def _run(self, active: Active, probe: Any, presets: list[Any]) -> Any:
        job = active.job
        try:
            yield self._durably("write job record", lambda: self._save(job))
            yield self._durably("store input", lambda: self.store.put_file(keys.input_source(job.id),
                                                                           active.spool_path))
            if active.cancelled:
                raise CancelledError()
            stored = yield self.media.run(job.id, probe, active.spool_path, presets,
                                          started=lambda: self._transcoding(active),
                                          progress=lambda p: self._progress(active, p),
                                          finish=lambda produced: self._store_outputs(active, produced))
            if active.cancelled:
                raise CancelledError()
            job.outputs = stored
            job.advance(jobs.DONE, self.now())
            self._count("done")
            self._log.info("job {job} done: {count} outputs", job=job.id, count=len(stored), state=job.state)
        except CancelledError:
            if not job.final:
                job.cancel(self.now())
            self._count("cancelled")
            self._log.info("job {job} cancelled", job=job.id, state=job.state)
        except GridnodeError as e:
            if e.code == "cancelled" or active.cancelled:
                if not job.final:
                    job.cancel(self.now())
                self._count("cancelled")
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
        finally:
            self._changed(active)
            try:
                yield self._durably("write job record", lambda: self._save(job))
            finally:
                self.active.pop(job.id, None)
                SpoolFile.remove(active.spool_path)

    @inlineCallbacks
    def _store_outputs(self, active: Active, produced: list[Any]) -> Any:
        """ffmpeg is done: store every output while the scratch folder still holds them."""
        job = active.job
        job.advance(jobs.STORING, self.now())
        self._changed(active)
        yield self._durably("write job record", lambda: self._save(job))
        stored: dict[str, dict[str, Any]] = {}
        for output in produced:
            if active.cancelled:
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
        return list(stored.values())

    def _store_output(self, job_id: str, output: Any) -> Callable[[], Deferred[Any]]:
        key = keys.output(job_id, output.name)
        return lambda: self.store.put_file(key, output.path, content_type=output.content_type)

    def _transcoding(self, active: Active) -> None:
        active.job.advance(jobs.TRANSCODING, self.now())
        self._changed(active)
        self._durably("write job record", lambda: self._save(active.job))

    def _progress(self, active: Active, progress: float) -> None:
        if active.job.set_progress(progress, self.now()):
            self._changed(active)

    def _changed(self, active: Active) -> None:
        for watcher in list(active.watchers):
            try:
                watcher(active.job)
            except Exception:  # noqa: BLE001 - a broken watcher must not break the job
                self._log.failure("job watcher failed")

    def _save(self, job: Job) -> Deferred[Any]:
        return self.store.put_bytes(keys.job_record(job.id), job.dumps(), content_type="application/json")

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

    def watch(self, job_id: str, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``callback`` on every change of a job this node runs; returns the unsubscribe."""
        active = self.active.get(job_id)
        if active is None:
            return lambda: None
        active.watchers.append(callback)

        def unsubscribe() -> None:
            if callback in active.watchers:
                active.watchers.remove(callback)

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
