"""
Adoption: claiming the unfinished jobs whose owner is gone.

A job's owner does not renew it: the job is orphaned when its owner is gone,
which the membership and the registry already know (`Adopter.gone`: held
dead on two members' word, left, or unknown to the membership with no fresh registry record), or
when its owner released it. A frozen or throttled store therefore never makes
a healthy job look orphaned: nothing here compares a record's time with a clock.

Nothing scans the pool. Unfinished jobs are marked under their owner
(``active/<owner>/<id>``, gridnode/job_records.py), and the adopter reads one
owner's prefix at a time (`Adopter.take_over`):

- a dead or departed member's, when this node is the one to act on that event
  (gridnode/succession.py: its watchers, in ring order);
- its own, at start and every ``2 x lease`` (`Adopter.check_own`): jobs an
  earlier life of this node left, and jobs handed to it (a watcher with no room
  hands the rest on to each job's keeper on the ring; a node short of scratch
  space hands a job to its first watcher);
- the old layout's (``active/<id>``), by the pool's registry writer alone,
  every `LEGACY_EVERY` s, while a pool is upgraded in place (`Adopter.migrate`).

A gone owner's jobs are claimed through the store's `EVENT` lane
(gridnode/store/rate.py), whose bucket is shared by the events in progress
rather than by the pool's members, so a death's jobs are claimed within a
second or two however large the pool; our own prefix and the old layout go
through the store's own lane (the node gives `BACKGROUND`).

Each job is claimed with a write conditional on the ETag of the record just
read, so of several nodes claiming it exactly one wins; the claimant marks it
under its own id first. The adopter only claims: it hands each job it won to
its `Host` (the node's `JobService`), which runs it again from the stored input.
A job claimed `MAX_ATTEMPTS` times already is quarantined as ``poison`` instead.
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
from gridnode.store.rate import EVENT

#: tries of one job (first run and adoptions) before it is quarantined as poison
MAX_ATTEMPTS = 3
#: seconds between the registry writer's reads of the old marker layout (``active/<id>``)
LEGACY_EVERY = 300.0
#: points per member on the ring: enough to even out the arcs between them
POINTS = 64


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class KeeperRing:
    """Which nodes keep which job, by consistent hashing over the live members.

    A watcher taking over a dead node's jobs with no room for some hands each of those to its
    keeper, so they spread over the pool instead of piling onto one node: on a ring of points, a
    few per member, a job's keepers are the first ``k`` distinct members after the job's own point. Every node computes
    the ring from its own membership view, so views that differ for a moment only make a job kept
    by one node more or less; claims are conditional writes, so two nodes never both win.

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

    def holds(self, job_id: str) -> bool: ...  # works on it, or is accepting it right now

    def run_claimed(self, claim: Claim) -> None: ...

    def quarantined(self, job: Job) -> None: ...


#: `Adopter.claim`'s ``under`` for the old layout's marker
LEGACY = None


class Adopter:
    """Claims orphaned jobs for its host. Entry points: `take_over` (one owner's jobs: a death or
    a leave this node acts on), `check_own` (our own prefix), `migrate` (the old layout), `claim`
    (one job), `hand_on` (a job this node releases while it stays)."""

    _log = Logger()

    def __init__(self, store: ObjectStore, host: Host, node_id: str, lease: float, *,
                 now: Callable[[], float], rng: random.Random) -> None:
        self.store = store
        #: the same store in the EVENT lane: taking over a gone owner's jobs
        self.acting = store.in_lane(EVENT)
        self.host = host
        self.node_id = node_id
        self.lease = lease
        self.now = now
        self.rng = rng
        #: whether a node is gone (held dead, left, unknown with no fresh registry record);
        #: the node wires it to its membership and registry. Until then nobody is.
        self.gone: Callable[[str], bool] = lambda node: False
        #: the live members' ids (ourselves included): whom leftovers are handed to
        self.members: Callable[[], list[str]] = lambda: [node_id]
        #: the live member a job we release while we stay goes to (our first watcher); None: none
        self.heir: Callable[[], str | None] = lambda: None
        #: whether this node reads the old layout (the pool's registry writer does)
        self.reads_legacy: Callable[[], bool] = lambda: False
        #: old-layout jobs of live owners marked under them already, this life
        self._copied: set[str] = set()
        self._ring: KeeperRing | None = None
        self._taking = DeferredLock()
        #: jobs found claimed by another node since the listing they were found in (a collision)
        self._lost = 0
        #: a final job found still marked (its owner stopped before unmarking it), or one
        #: quarantined: what its end owes (webhooks) is seen to before the marker goes
        self.on_ended: Callable[[Job], Deferred[Any]] | None = None

    def take_over(self, owner: str, *, hand_on: bool = True) -> Deferred[int]:
        """Claim what fits of the jobs marked under ``owner`` (gone, or ourselves) and hand the rest
        on (``hand_on``; else they stay for the owner's next watcher in turn, whose look comes
        within seconds, where a keeper's comes within a minute); fires with how many this node won.
        One prefix at a time: two passes of ours in flight could both claim one job (the second
        reading the first's claim as an earlier life's)."""
        return self._taking.run(self._take_over, owner, hand_on)

    def check_own(self) -> Deferred[int]:
        """Our own prefix: jobs an earlier life left and jobs handed to us."""
        return self.take_over(self.node_id)

    def migrate(self) -> Deferred[int]:
        """The old layout (``active/<id>``), read by the registry writer alone: a gone owner's job is
        claimed, a final one unmarked, a live owner's marked under that owner too (once a life), so
        that its `check_own` or its watchers find it; nodes of the earlier version go on reading
        the old markers their way. Fires with how many this node won."""
        return self._taking.run(self._migrate)

    @inlineCallbacks
    def _take_over(self, owner: str, hand_on: bool = True) -> Any:
        if self.host.draining:
            return 0
        store = self.store if owner == self.node_id else self.acting
        try:
            ids = yield job_records.marked(store, owner)
        except GridnodeError as e:
            self._log.warn("cannot list the jobs of {owner}: {reason}", owner=owner, reason=e.message)
            return 0
        self.rng.shuffle(ids)  # watchers taking over in turn start at different jobs
        won, left, gone_since = 0, [], set()
        for job_id in ids:
            if self.host.holds(job_id) or job_id in gone_since:
                continue
            if len(self.host.active) >= self.host.capacity:
                left.append(job_id)
                continue
            lost = self._lost
            try:
                won += int((yield self.claim(job_id, owner, store=store)))
            except GridnodeError as e:
                self._log.warn("could not adopt job {job}: {reason}", job=job_id, reason=e.message)
            if self._lost != lost and owner != self.node_id:
                # another heir is at work on this prefix (it claimed that one since our listing):
                # list again rather than read each job it has claimed since
                try:
                    gone_since = set(ids) - set((yield job_records.marked(store, owner)))
                except GridnodeError:
                    pass
        if left and owner != self.node_id and hand_on:
            yield self._hand_leftovers(left, owner)
        return won

    @inlineCallbacks
    def claim(self, job_id: str, under: str | None, *, store: ObjectStore | None = None) -> Any:
        """Claim one job if its owner is gone, released it, or was an earlier life of ours; True
        when we won it and handed it to the host. ``under``: whose prefix its marker was found in
        (`LEGACY`: the old layout's); that marker goes once the job is ours, or final. ``store``:
        the lane to claim through (ours by default)."""
        store = store or self.store
        try:
            job, info = yield job_records.read(store, job_id)
        except NotFound:
            yield job_records.unmark(store, under, job_id)  # its record is gone: nothing to run
            return False
        if job.final:
            if self.on_ended is not None:
                yield self.on_ended(job)
            yield job_records.unmark(store, under, job_id)
            return False
        if self.host.holds(job_id):
            return False  # ours in this life (the listing and this read are not atomic)
        orphaned = job.node == self.node_id or job.released or self.gone(job.node)
        if not orphaned and under == self.node_id and job.node:
            # handed to us by a watcher acting on its owner's death, which we may hold dead but not
            # confirmed (a node confirms what it checked itself): an owner always has a marker, so
            # one whose marker was moved away is gone
            orphaned = not (yield job_records.is_marked(store, job.node, job_id))
        if not orphaned:
            if under not in (None, job.node, self.node_id) and self.gone(under):
                # a marker under a gone node for a job whose owner is not gone to us: a stale copy
                # when the owner has its own; else the job was handed on to that node after its
                # owner's death, which we have not heard of yet (many deaths at once): deleting it
                # would lose the job, so it moves under us, and our own look claims it once its
                # owner is gone to us too (or drops it once it is final)
                if job.node and (yield job_records.is_marked(store, job.node, job_id)):
                    self._lost += 1
                    yield job_records.unmark(store, under, job_id)
                else:
                    yield job_records.move_marker(store, job_id, under, self.node_id)
            return False
        if job.attempts >= MAX_ATTEMPTS:
            yield self._quarantine(job, info, under, store)
            return False
        previous, foreign = job.node, under != self.node_id
        if foreign:
            yield job_records.mark(store, self.node_id, job_id)  # an owner always has a marker
        job.reclaim(self.node_id, self.now(), self.lease)
        try:
            info = yield store.put_bytes(keys.job_record(job_id), job.dumps(), if_match=info.etag,
                                         content_type="application/json")
        except (PreconditionFailed, NotFound):
            if foreign:
                yield job_records.unmark(store, self.node_id, job_id)
            return False  # another node was faster
        self._log.info("job {job} adopted from {previous} (attempt {attempts})", job=job_id, previous=previous,
                       attempts=job.attempts, state=job.state)
        self.host.run_claimed(Claim(job, info.etag))
        if foreign:
            try:
                yield job_records.unmark(store, under, job_id)
            except GridnodeError:
                pass  # a stale copy: whoever reads it next finds the job ours
        return True

    @inlineCallbacks
    def _quarantine(self, job: Job, info: ObjectInfo, under: str | None, store: ObjectStore) -> Any:
        job.fail("poison", f"the job failed {job.attempts} times on nodes that then stopped; it is "
                 "quarantined. Check the input, then submit it again", self.now())
        try:
            yield job_records.write(store, job.id, job.dumps(), info.etag, self.node_id)
        except job_records.Lost:
            return
        if self.on_ended is not None:
            yield self.on_ended(job)
        yield job_records.unmark(store, under, job.id)
        self.host.quarantined(job)
        self._log.warn("job {job} quarantined as poison after {attempts} attempts", job=job.id,
                       attempts=job.attempts, code="poison")

    @inlineCallbacks
    def _hand_leftovers(self, ids: list[str], owner: str) -> Any:
        """What did not fit here goes to each job's keeper among the other live members, its
        marker moved to their prefix: that node claims it at its next `check_own`, room allowing."""
        members = frozenset(self.members()) - {owner, self.node_id}
        if self._ring is None or self._ring.members != sorted(members):
            self._ring = KeeperRing(members)
        for job_id in ids:
            keepers = self._ring.keepers(job_id, 1)
            if not keepers:
                continue  # no one else: it waits under the gone owner for the standby watchers
            try:
                yield job_records.move_marker(self.acting, job_id, owner, keepers[0])
            except GridnodeError as e:
                self._log.warn("could not hand job {job} on: {reason}", job=job_id, reason=e.message)
                continue
            self._log.info("job {job} of {owner} handed on to {keeper}", job=job_id, owner=owner, keeper=keepers[0])

    @inlineCallbacks
    def hand_on(self, job_id: str) -> Any:
        """A job this node released while it stays (no scratch space for it): its marker goes to
        our heir, who claims it at its next `check_own`. A drain hands nothing on this way: its
        watchers take its jobs when it leaves."""
        heir = self.heir()
        if heir is None or heir == self.node_id or self.host.draining:
            return
        yield job_records.move_marker(self.store, job_id, self.node_id, heir)
        self._log.info("job {job} handed on to {heir}", job=job_id, heir=heir)

    @inlineCallbacks
    def _migrate(self) -> Any:
        if not self.reads_legacy() or self.host.draining:
            return 0
        try:
            ids = yield job_records.legacy_marked(self.store)
        except GridnodeError as e:
            self._log.warn("cannot list the old markers: {reason}", reason=e.message)
            return 0
        won = 0
        for job_id in ids:
            try:
                won += int((yield self._migrate_one(job_id)))
            except GridnodeError as e:
                self._log.warn("could not move the old marker of job {job}: {reason}", job=job_id, reason=e.message)
        return won

    @inlineCallbacks
    def _migrate_one(self, job_id: str) -> Any:
        try:
            job, _ = yield job_records.read(self.store, job_id)
        except NotFound:
            yield job_records.unmark(self.store, LEGACY, job_id)
            return False
        if job.final:
            yield job_records.unmark(self.store, LEGACY, job_id)
            return False
        orphaned = job.node == self.node_id or job.released or self.gone(job.node)
        if orphaned and not self.host.holds(job_id) and len(self.host.active) < self.host.capacity:
            won = yield self.claim(job_id, LEGACY)
            return won
        owner = self.node_id if orphaned else job.node
        if job_id not in self._copied and owner:
            # no room here: under us, `check_own` takes it once there is
            yield job_records.mark(self.store, owner, job_id)
            self._copied.add(job_id)
        return False


