"""
Retention: a finished job's input after ``--retain-inputs`` days, and its outputs after
``--retain-outputs`` days, deleted by a sweep that one node of the pool runs at a time. Either
may name days for one tenant (``TENANT=DAYS``) beside or instead of the pool's.

Every ``--retention-sweep`` seconds (jittered) each node tries to take the sweep's lease
(``retention/lease.json``: the holder and until when), by a conditional write: a create when
there is none, else over the ETag it read of one that ran out (or is its own). The loser of a
race is refused (412) and skips this round; a holder that dies stops holding it when it runs
out, one period later. The holder then walks ``inputs/`` and ``outputs/`` oldest first (ids sort
by time) up to the first job made after the shortest retention's cutoff: a job that ended before
its tenant's cutoff has its input (or outputs) deleted; one not final (queued, running), kept by
its tenant's longer retention, or without a record is left alone (and read again next round).
A round reads at most `MAX_JOBS` records and goes on where it stopped at the next round.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from gridnode import job_records, keys, purge
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore
from gridnode.timers import JitteredLoop

#: the most job records one round reads (each prefix): bounds a round's requests
MAX_JOBS = 500
DAY = 86400.0
#: the most days a retention may be (100 years)
MAX_DAYS = 36500
_TENANT_DAYS = re.compile(r"([^\s=]{1,128})=(\d{1,6})")


@dataclass(frozen=True)
class Retention:
    """Days a finished job's input (or outputs) are kept: the pool's (None: for ever) and, by
    tenant, days that replace it for that tenant's jobs."""

    pool: int | None = None
    tenants: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, value: Retention | int | None) -> Retention:
        return value if isinstance(value, Retention) else cls(value)

    @classmethod
    def parse(cls, items: Iterable[str]) -> Retention:
        """``--retain-inputs`` values, each whitespace-separated ``DAYS`` (the pool's) or
        ``TENANT=DAYS``; ValueError names the item that is neither, or a tenant named twice."""
        pool: int | None = None
        tenants: dict[str, int] = {}
        for item in (part for value in items for part in value.split()):
            named = _TENANT_DAYS.fullmatch(item)
            text = named[2] if named else item
            if not (text.isascii() and text.isdigit()) or int(text) > MAX_DAYS:
                raise ValueError(f"{item[:80]!r} is neither DAYS (0-{MAX_DAYS}) nor TENANT=DAYS")
            if named is None:
                if pool is not None:
                    raise ValueError("gives the pool's days twice")
                pool = int(text)
            elif named[1] in tenants:
                raise ValueError(f"gives tenant {named[1]!r}'s days twice")
            else:
                tenants[named[1]] = int(text)
        return cls(pool, tuple(sorted(tenants.items())))

    def days(self, tenant: str) -> int | None:
        """The days a job of ``tenant`` is kept (None: for ever)."""
        return dict(self.tenants).get(tenant, self.pool)

    def shortest(self) -> int | None:
        """The fewest days any job is kept: how far back a sweep must look (None: nothing expires)."""
        every = [d for d in (self.pool, *dict(self.tenants).values()) if d is not None]
        return min(every) if every else None

    def __bool__(self) -> bool:
        return self.shortest() is not None


class RetentionSweep(Service):
    """A service: every ``period`` s, the lease then a round, on the node that holds it."""

    _log = Logger()

    def __init__(self, reactor: Any, store: ObjectStore, node_id: str, *, retain_inputs: Retention | int | None,
                 retain_outputs: Retention | int | None, period: float, now: Callable[[], float] = time.time,
                 rng: random.Random | None = None, metrics: Metrics | None = None) -> None:
        self.reactor = reactor
        self.metrics = metrics or Metrics()
        self.store = store
        self.node_id = node_id
        self.retain = {keys.inputs_prefix(): Retention.of(retain_inputs),
                       keys.outputs_root(): Retention.of(retain_outputs)}
        self.period = period
        self.now = now
        self.rng = rng or random.Random()
        self._loop: JitteredLoop | None = None
        self._done: Deferred[Any] | None = None
        #: where each prefix's walk goes on (the last id it passed), for a round cut short
        self._resume: dict[str, str | None] = {}

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._loop = JitteredLoop(self.reactor, self.round, self.period, self.rng)
        self._done = self._loop.start(now=False)
        self._done.addErrback(lambda f: self._log.failure("retention sweep stopped", f))

    def stopService(self) -> Deferred[Any] | None:  # noqa: N802 - Twisted's name
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._done

    @inlineCallbacks
    def round(self) -> Any:
        """Take the lease, then sweep; a store that cannot be reached waits for the next round."""
        try:
            held = yield self.take_lease()
            if held:
                yield self.sweep()
        except GridnodeError as e:
            self._log.warn("retention sweep skipped: {reason}", reason=e.message)

    @inlineCallbacks
    def take_lease(self) -> Any:
        """Hold the sweep's lease until past our next round; False when another node holds it."""
        now = self.now()
        # held a little past the next round (at most 1.25 periods away), which renews it
        body = json.dumps({"node": self.node_id, "until": now + 1.5 * self.period}).encode()
        key = keys.retention_lease()
        try:
            data, info = yield self.store.get_bytes(key, max_size=4096)
        except NotFound:
            data, info = None, None
        try:
            if info is None:
                yield self.store.put_bytes(key, body, if_none_match="*", content_type="application/json")
                return True
            try:
                lease = json.loads(data)
                held_by, until = str(lease["node"]), float(lease["until"])
            except (ValueError, KeyError, TypeError):
                held_by, until = "", 0.0  # unreadable: taken over as if it had run out
            if held_by != self.node_id and until > now:
                return False
            yield self.store.put_bytes(key, body, if_match=info.etag, content_type="application/json")
            return True
        except PreconditionFailed:
            return False  # another node took it between our read and our write

    @inlineCallbacks
    def sweep(self) -> Any:
        """One round over each prefix that has a retention; fires with the jobs it deleted from."""
        count = 0
        for prefix, retention in self.retain.items():
            if retention:
                count += yield self._sweep(prefix, retention)
        return count

    @inlineCallbacks
    def _sweep(self, prefix: str, retention: Retention) -> Any:
        shortest = retention.shortest()
        assert shortest is not None
        cutoff = self.now() - shortest * DAY
        after, read, deleted = self._resume.get(prefix), 0, 0
        while True:
            page = yield self.store.list(prefix, start_after=None if after is None else prefix + after + "0",
                                         limit=100)
            ids: list[str] = []
            for info in page.items:
                job_id = info.key[len(prefix):].split("/", 1)[0]
                if keys.is_id(job_id) and (not ids or ids[-1] != job_id):
                    ids.append(job_id)
            for job_id in ids:
                if keys.id_seconds(job_id) > cutoff:
                    self._resume[prefix] = None  # the newer ones are not due: start over next round
                    return deleted
                if read >= MAX_JOBS:
                    self._resume[prefix] = after  # the next round goes on from here
                    return deleted
                read += 1
                after = job_id
                deleted += (yield self._expire(prefix, job_id, retention))
            if page.next_after is None:
                self._resume[prefix] = None
                return deleted
            if not ids:
                after = page.items[-1].key[len(prefix):].split("/", 1)[0]  # past keys that are not a job's

    @inlineCallbacks
    def _expire(self, prefix: str, job_id: str, retention: Retention) -> Any:
        try:
            job, _ = yield job_records.read(self.store, job_id)
        except NotFound:
            return 0  # no record (yet, or any more): not ours to judge
        days = retention.days(job.tenant)
        if not job.final or days is None or job.updated > self.now() - days * DAY:
            return 0
        if prefix == keys.inputs_prefix():
            yield self.store.delete(keys.input_source(job_id))
            what = "inputs"
        else:
            yield purge.delete_outputs(self.store, job_id)
            what = "outputs"
        self.metrics.retention_deleted.labels(what).inc()
        self._log.info("retention: job {job}'s {what} deleted", job=job_id, what=prefix.rstrip("/"))
        return 1
