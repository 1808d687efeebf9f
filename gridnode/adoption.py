"""
Adoption: finding the unfinished jobs whose owner is gone, and claiming them.

``active/<id>`` marks the unfinished jobs whose input is stored, so a pass
scans only those; and of those a node reads only the records of the jobs it
keeps (`KEEPERS` per job, see `KeeperRing`) and `SAMPLE` others: not N x M
reads a round. Its first pass reads them all if an earlier life of its own may
have left some (the registry found that life's record).

A job whose owner's lease ran out, or whose owner the membership confirmed
dead, is claimed with a write conditional on the ETag of the record just read,
so of several nodes claiming it exactly one wins. The adopter only claims: it
hands each job it won to its `Host` (the node's `JobService`), which runs it
again from the stored input. A job claimed `MAX_ATTEMPTS` times already is
quarantined as ``poison`` instead.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.logger import Logger

from gridnode import job_records, keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.jobs import Job
from gridnode.store.base import ObjectInfo, ObjectStore

#: tries of one job (first run and adoptions) before it is quarantined as poison
MAX_ATTEMPTS = 3
#: nodes that keep each unfinished job (read its record on every pass), see `KeeperRing`
KEEPERS = 2
#: jobs kept by others that a pass reads too, at random: found even when their keepers are full or
#: gone
SAMPLE = 8
#: points per member on the ring: enough to even out the arcs between them
POINTS = 64


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class KeeperRing:
    """Which nodes keep which job, by consistent hashing over the live members.

    A node looking for orphaned jobs must read each candidate's record (its owner and lease are
    in it), so every node reading every unfinished job each pass costs the store N x M GETs.
    Instead each job is kept by ``k`` nodes: on a ring of points, a few per member, a job's
    keepers are the first ``k`` distinct members after the job's own point. Every node computes
    the ring from its own membership view, so views that differ for a moment only make a job kept
    by one node more or less; claims are conditional writes, so two keepers never both win.

    When a member leaves the ring, only the jobs it kept move, each to the next member on the
    ring: the dead node's own jobs are spread over many nodes.
    """

    def __init__(self, members: Iterable[str], points: int = POINTS) -> None:
        self.members = sorted(set(members))
        self._ring = sorted((_point(f"{m}#{i}"), m) for m in self.members for i in range(points))
        self._keys = [p for p, _ in self._ring]

    def keepers(self, job_id: str, k: int) -> list[str]:
        """The ``k`` members (fewer if there are fewer) that keep ``job_id``, first one first."""
        found: list[str] = []
        if not self._ring:
            return found
        start = bisect.bisect(self._keys, _point(job_id))
        for j in range(len(self._ring)):
            member = self._ring[(start + j) % len(self._ring)][1]
            if member not in found:
                found.append(member)
                if len(found) == min(k, len(self.members)):
                    break
        return found


@dataclass(frozen=True)
class Claim:
    """A job this node has just won: its record as written (queued, ours, one more attempt) and
    the ETag of that write."""

    job: Job
    etag: str


class Host(Protocol):
    """What the adopter asks of the job service it claims for."""

    @property
    def draining(self) -> bool: ...

    @property
    def active(self) -> Collection[str]: ...  # the ids of the jobs it works on

    @property
    def capacity(self) -> int: ...

    def run_claimed(self, claim: Claim) -> None: ...

    def quarantined(self, job: Job) -> None: ...


class Adopter:
    _log = Logger()

    def __init__(self, store: ObjectStore, host: Host, node_id: str, lease: float, *,
                 now: Callable[[], float], rng: random.Random) -> None:
        self.store = store
        self.host = host
        self.node_id = node_id
        self.lease = lease
        self.now = now
        self.rng = rng
        #: the live members' ids (ourselves included), when there is a membership
        self.members: Callable[[], list[str]] | None = None
        #: whether an earlier life of ours may have left jobs (None: not known): the registry found
        #: its record at start. One that left cleanly deleted it, its jobs released to its peers.
        self.earlier_life: Callable[[], bool | None] = lambda: None
        self._first_pass = True
        self._ring: KeeperRing | None = None
        self._scanning = DeferredLock()
        #: a final job found still marked (its owner stopped before unmarking it), or one
        #: quarantined: what its end owes (webhooks) is seen to before the marker goes
        self.on_ended: Callable[[Job], Deferred[Any]] | None = None

    def scan(self, dead: frozenset[str] = frozenset()) -> Deferred[int]:
        """Claim the unfinished jobs whose owner's lease ran out (or whose owner is in ``dead``);
        fires with how many were won.

        One pass at a time: a pass started by a confirmed death while the periodic one runs would
        read a job the first has just claimed, take it for one of our earlier lives, and claim it
        again (two runs of one job)."""
        return self._scanning.run(self._pass, dead)

    @inlineCallbacks
    def _pass(self, dead: frozenset[str]) -> Any:
        if self.host.draining:
            return 0
        try:
            markers = yield self.store.list_all(keys.active_prefix())
        except GridnodeError as e:
            self._log.warn("cannot scan for orphaned jobs: {reason}", reason=e.message)
            return 0
        claimed = 0
        for job_id in self._to_read(_ids(markers), dead):
            active = self.host.active
            if job_id in active or not keys.is_id(job_id) or len(active) >= self.host.capacity:
                continue
            try:
                won = yield self.claim(job_id, dead)
                claimed += int(won)
            except GridnodeError as e:
                self._log.warn("could not adopt job {job}: {reason}", job=job_id, reason=e.message)
        return claimed

    def _to_read(self, ids: list[str], dead: frozenset[str]) -> list[str]:
        """The jobs whose records a pass reads: all of them without a membership, or on our first
        pass unless we know no earlier life of ours left any; else those we keep, then a few others."""
        self.rng.shuffle(ids)  # peers scanning at once start at different jobs
        first, self._first_pass = self._first_pass, False
        if self.members is None or (first and self.earlier_life() is not False):
            return ids
        members = frozenset(self.members()) - dead | {self.node_id}
        if self._ring is None or self._ring.members != sorted(members):
            self._ring = KeeperRing(members)
        ring = self._ring
        mine = [j for j in ids if self.node_id in ring.keepers(j, KEEPERS)]
        kept = set(mine)
        others = [j for j in ids if j not in kept]
        return mine + others[:SAMPLE]

    @inlineCallbacks
    def claim(self, job_id: str, dead: frozenset[str] = frozenset()) -> Any:
        """Claim one job if its owner is gone (lease out, or in ``dead``) or was an earlier life of
        ours; True when we won it and handed it to the host. A final job loses its marker."""
        try:
            job, info = yield job_records.read(self.store, job_id)
        except NotFound:
            return False
        if job.final:
            if self.on_ended is not None:
                yield self.on_ended(job)
            yield self.store.delete(keys.active_marker(job_id))
            return False
        if job_id in self.host.active:
            return False  # ours in this life (the scan and this read are not atomic)
        earlier_life = job.node == self.node_id
        if not (earlier_life or job.node in dead or job.lease_until < self.now()):
            return False
        if job.attempts >= MAX_ATTEMPTS:
            yield self._quarantine(job, info)
            return False
        previous = job.node
        job.reclaim(self.node_id, self.now(), self.lease)
        try:
            info = yield self.store.put_bytes(keys.job_record(job_id), job.dumps(), if_match=info.etag,
                                              content_type="application/json")
        except (PreconditionFailed, NotFound):
            return False  # another node was faster
        self._log.info("job {job} adopted from {previous} (attempt {attempts})", job=job_id, previous=previous,
                       attempts=job.attempts, state=job.state)
        self.host.run_claimed(Claim(job, info.etag))
        return True

    @inlineCallbacks
    def _quarantine(self, job: Job, info: ObjectInfo) -> Any:
        job.fail("poison", f"the job failed {job.attempts} times on nodes that then stopped; it is "
                 "quarantined. Check the input, then submit it again", self.now())
        try:
            yield job_records.write(self.store, job.id, job.dumps(), info.etag, self.node_id)
        except job_records.Lost:
            return
        if self.on_ended is not None:
            yield self.on_ended(job)
        yield self.store.delete(keys.active_marker(job.id))
        self.host.quarantined(job)
        self._log.warn("job {job} quarantined as poison after {attempts} attempts", job=job.id,
                       attempts=job.attempts, code="poison")

    @inlineCallbacks
    def claim_mine(self) -> Any:
        """At start: claim the unfinished jobs that the store says an earlier life of ours owns."""
        try:
            markers = yield self.store.list_all(keys.active_prefix())
        except GridnodeError:
            return
        for job_id in _ids(markers):
            if job_id not in self.host.active and keys.is_id(job_id):
                try:
                    job, _ = yield job_records.read(self.store, job_id)
                    if job.node == self.node_id:
                        yield self.claim(job_id)
                except GridnodeError:
                    continue


def _ids(markers: list[ObjectInfo]) -> list[str]:
    return [m.key[len(keys.active_prefix()):] for m in markers]
