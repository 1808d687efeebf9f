"""Adoption (gridnode/adoption.py): the ring of keepers, and the adopter on a memory store: who
claims what, from which prefix, and the move from the old marker layout."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from twisted.internet.task import Clock

from gridnode import jobs, keys
from gridnode.adoption import MAX_ATTEMPTS, Adopter, Claim, KeeperRing
from gridnode.jobs import Job
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.store.rate import BACKGROUND, EVENT, Gate

JOBS = [f"job{i:05d}" for i in range(10_000)]
MEMBERS = [f"i-{i:04x}" for i in range(20)]


def test_keepers_are_distinct_and_the_same_for_everyone() -> None:
    """k distinct members per job; any node with the same view computes the same ones."""
    ring, again = KeeperRing(MEMBERS), KeeperRing(reversed(MEMBERS))
    for job in JOBS[:500]:
        got = ring.keepers(job, 2)
        assert len(set(got)) == 2 and set(got) <= set(MEMBERS)
        assert again.keepers(job, 2) == got
    assert KeeperRing(["a"]).keepers("j", 2) == ["a"]
    assert KeeperRing([]).keepers("j", 2) == []


def test_every_member_keeps_about_its_share() -> None:
    """Each of 20 members keeps 2/20 of 10,000 jobs, within 30 % either way."""
    ring = KeeperRing(MEMBERS)
    counts = Counter(m for job in JOBS for m in ring.keepers(job, 2))
    share = 2 * len(JOBS) / len(MEMBERS)
    assert set(counts) == set(MEMBERS)
    assert share * 0.7 <= min(counts.values()) and max(counts.values()) <= share * 1.3


def test_a_member_leaving_moves_only_what_it_kept() -> None:
    """Without one member, a job it did not keep keeps its keepers; the ones it kept are
    spread over many others, not handed to one neighbour."""
    ring, without = KeeperRing(MEMBERS), KeeperRing(MEMBERS[1:])
    gone = MEMBERS[0]
    inherited = Counter()
    for job in JOBS:
        before, after = ring.keepers(job, 2), without.keepers(job, 2)
        if gone in before:
            inherited.update(set(after) - set(before))
        else:
            assert after == before
    assert len(inherited) >= 8


class FakeHost:
    """A job service as the adopter sees it: it records what it is handed and runs nothing."""

    def __init__(self, capacity: int = 4) -> None:
        self.draining = False
        self.capacity = capacity
        self.active: dict[str, Claim] = {}
        self.poisoned: list[Job] = []
        self.accepting: set[str] = set()

    def holds(self, job_id: str) -> bool:
        return job_id in self.active or job_id in self.accepting

    def run_claimed(self, claim: Claim) -> None:
        self.active[claim.job.id] = claim

    def quarantined(self, job: Job) -> None:
        self.poisoned.append(job)


class AdopterFixture:
    @pytest.fixture(autouse=True)
    def setup(self) -> None:
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)
        self.gone = {"gone"}

    def orphan(self, attempts: int = 1, owner: str = "gone", legacy: bool = False) -> Job:
        """An unfinished job of ``owner``, its input stored and its marker written (the old
        layout's, ``legacy``)."""
        job = Job.new(keys.new_id(1.0), name="m.mov", presets=["mp4-720p"], node=owner, size=5, now=1.0)
        job.advance(jobs.PROBING, 1.0)
        job.accept(1.0, 30.0)
        for _ in range(attempts - 1):
            job.reclaim(owner, 1.0, 30.0)
        self.backend.put_bytes(keys.job_record(job.id), job.dumps())
        marker = keys.legacy_marker(job.id) if legacy else keys.active_marker(owner, job.id)
        self.backend.put_bytes(marker, b"")
        return job

    def adopter(self, node: str, host: FakeHost, now: float = 100.0) -> Adopter:
        adopter = Adopter(self.store, host, node, 30.0, now=lambda: now, rng=random.Random(1))
        adopter.gone = self.gone.__contains__
        return adopter

    def take(self, adopter: Adopter, owner: str = "gone") -> Any:
        got: list[Any] = []
        adopter.take_over(owner).addBoth(got.append)
        return got[0]

    def markers(self) -> list[str]:
        return sorted(i.key for i in self.backend.list("active/").items)


class AdopterTests(AdopterFixture):
    def test_it_hands_back_what_it_claims(self) -> None:
        """A gone owner's job is claimed with a conditional write, marked under the claimant (the
        gone owner's marker removed) and handed to the host as written (ours, queued, one more
        attempt, with the write's ETag), not run; a second node then finds nothing there."""
        job = self.orphan()
        host, other = FakeHost(), FakeHost()
        assert self.take(self.adopter("n2", host)) == 1
        claim = host.active[job.id]
        data, info = self.backend.get_bytes(keys.job_record(job.id))
        assert Job.loads(data) == claim.job and info.etag == claim.etag
        assert (claim.job.node, claim.job.state, claim.job.attempts) == ("n2", jobs.QUEUED, 2)
        assert self.markers() == [f"active/n2/{job.id}"]
        assert self.take(self.adopter("n3", other)) == 0 and other.active == {}

    def test_a_live_owner_a_full_host_or_a_draining_one_claims_nothing(self) -> None:
        """A live owner's job is left alone, however old its record; a host with no room or
        draining takes nothing."""
        live = self.orphan(owner="alive")
        assert self.take(self.adopter("n2", FakeHost()), "alive") == 0
        assert self.markers() == [f"active/alive/{live.id}"]
        self.orphan()
        assert self.take(self.adopter("n2", FakeHost(capacity=0))) == 0
        draining = FakeHost()
        draining.draining = True
        assert self.take(self.adopter("n2", draining)) == 0
        host = FakeHost()
        assert self.take(self.adopter("n2", host)) == 1 and len(host.active) == 1

    def test_a_job_being_accepted_here_is_not_taken_for_an_earlier_lifes(self) -> None:
        """Our own prefix lists a job whose upload we are still answering (its record and marker
        written, the job not active yet): not claimed. Once gone from the host, it is (an
        earlier life's)."""
        job = self.orphan(owner="n2")
        host = FakeHost()
        host.accepting.add(job.id)
        adopter = self.adopter("n2", host)
        got: list[Any] = []
        adopter.check_own().addBoth(got.append)
        assert got == [0] and host.active == {}
        host.accepting.clear()
        adopter.check_own().addBoth(got.append)
        assert got == [0, 1] and host.active[job.id].job.attempts == 2

    def test_a_job_being_accepted_here_keeps_its_marker_before_its_record(self) -> None:
        """Our own prefix lists a job whose upload we are still answering, its marker written and
        its record not yet: the marker stays. Once the job is gone from the host with no record,
        the marker goes (its acceptance failed, or died with an earlier life)."""
        job = self.orphan(owner="n2")
        self.backend.delete(keys.job_record(job.id))
        host = FakeHost()
        host.accepting.add(job.id)
        adopter = self.adopter("n2", host)
        got: list[Any] = []
        adopter.check_own().addBoth(got.append)
        assert got == [0] and self.markers() == [keys.active_marker("n2", job.id)]
        host.accepting.clear()
        adopter.check_own().addBoth(got.append)
        assert got == [0, 0] and self.markers() == [] and host.active == {}

    def test_a_released_job_handed_on_is_claimed_by_its_heir(self) -> None:
        """A live node releases a job (no scratch space) and hands it to its heir: the marker moves
        to the heir's prefix, and the heir's look at its own prefix claims it."""
        job = self.orphan(owner="alive")
        record = Job.loads(self.backend.get_bytes(keys.job_record(job.id))[0])
        record.release(50.0)
        self.backend.put_bytes(keys.job_record(job.id), record.dumps())
        giver = self.adopter("alive", FakeHost())
        giver.heir = lambda: "heir"
        giver.hand_on(job.id)
        assert self.markers() == [f"active/heir/{job.id}"]
        host = FakeHost()
        got: list[Any] = []
        self.adopter("heir", host).check_own().addBoth(got.append)
        assert got == [1] and host.active[job.id].job.node == "heir"

    def test_a_second_heir_lists_again_once_it_finds_another_at_work(self) -> None:
        """Two heirs of one gone node at work at once: the second's listing is older than the
        first's claims. At its first collision (a job the first claimed since) it lists again and
        reads none of the other jobs the first has claimed: one LIST instead of a GET, a HEAD and a
        DELETE each."""
        made = [self.orphan() for _ in range(4)]
        snapshot = self.backend.list("active/gone/")
        first = self.adopter("n2", FakeHost(capacity=8))
        assert self.take(first) == 4
        second = self.adopter("n3", FakeHost(capacity=8))
        real_list = self.backend.list
        reads: list[str] = []
        lists = iter([snapshot])

        def stale_then_real(prefix: str, **kw: Any) -> Any:
            return next(lists, None) or real_list(prefix, **kw)

        real_get = self.backend.get_bytes

        def counted(key: str, **kw: Any) -> Any:
            reads.append(key)
            return real_get(key, **kw)

        self.backend.list = stale_then_real  # type: ignore[method-assign]
        self.backend.get_bytes = counted  # type: ignore[method-assign]
        assert self.take(second) == 0
        job_reads = [k for k in reads if k.startswith("jobs/")]
        assert len(job_reads) == 1 and job_reads[0] in {keys.job_record(j.id) for j in made}
        assert [m for m in self.markers() if m.startswith("active/gone/")] == []

    def test_a_job_handed_on_after_a_death_we_did_not_confirm_is_claimed(self) -> None:
        """A watcher of a dead node hands us a job it had no room for; we hold the owner dead but
        not confirmed (only the nodes that checked it confirm), so it is not gone to us. Its owner
        has no marker of its own any more (it was moved to us): the job is claimed. A job of a live
        owner marked under us as well (a copy) is not: its owner still has its own marker."""
        self.gone = set()  # nobody is gone to this node
        handed = self.orphan(owner="dead")
        self.backend.delete(keys.active_marker("dead", handed.id))
        self.backend.put_bytes(keys.active_marker("keeper", handed.id), b"")
        live = self.orphan(owner="alive")
        self.backend.put_bytes(keys.active_marker("keeper", live.id), b"")
        host = FakeHost()
        assert self.take(self.adopter("keeper", host), "keeper") == 1
        assert list(host.active) == [handed.id]
        assert self.markers() == sorted([f"active/keeper/{handed.id}", f"active/alive/{live.id}",
                                         f"active/keeper/{live.id}"])

    def test_a_handed_on_marker_under_a_dead_keeper_is_never_dropped(self) -> None:
        """Many deaths at once: a job of X was handed on to K, then K died too. K's watcher holds K
        gone but not yet X. The marker under K is not a stale copy (X has none of its own): it moves
        under the watcher, whose own look claims the job; the job is never left unmarked."""
        self.gone = {"K"}
        job = self.orphan(owner="X")
        self.backend.delete(keys.active_marker("X", job.id))
        self.backend.put_bytes(keys.active_marker("K", job.id), b"")
        host = FakeHost()
        assert self.take(self.adopter("w", host), "K") == 0
        assert self.markers() == [f"active/w/{job.id}"]
        assert self.take(self.adopter("w", host), "w") == 1 and host.active[job.id].job.node == "w"

    def test_odd_markers_are_ignored_and_stale_copies_removed(self) -> None:
        """Keys under a prefix that are not a job id (or nest deeper) are never read; a marker left
        under a gone node for a job a live node owns is a stale copy, removed; one under a live
        node's prefix is left to that node; a marker whose record is gone is removed."""
        nested = f"active/gone/{keys.new_id(1.0)}/extra"
        for odd in ("active/gone/not-an-id", "active/gone/x/y", nested):
            self.backend.put_bytes(odd, b"")
        live = self.orphan(owner="alive")
        self.backend.put_bytes(keys.active_marker("gone", live.id), b"")
        self.backend.put_bytes(keys.active_marker("gone", keys.new_id(2.0)), b"")  # no record
        reads: list[str] = []
        real = self.backend.get_bytes
        self.backend.get_bytes = lambda key, **kw: reads.append(key) or real(key, **kw)  # type: ignore
        assert self.take(self.adopter("n2", FakeHost())) == 0
        # job records, and the live owner's own marker (is the copy under "gone" stale?)
        assert all((k.startswith("jobs/") and k.count("/") == 1) or k == keys.active_marker("alive", live.id)
                   for k in reads), reads
        assert self.markers() == sorted(["active/gone/not-an-id", "active/gone/x/y", nested,
                                         f"active/alive/{live.id}"])

    def test_poison_is_quarantined_not_handed_back(self) -> None:
        """A job claimed MAX_ATTEMPTS times already is failed as poison, its marker removed, and
        the host told; nothing is handed back to run."""
        job = self.orphan(attempts=MAX_ATTEMPTS)
        host = FakeHost()
        assert self.take(self.adopter("n2", host)) == 0
        record = Job.loads(self.backend.get_bytes(keys.job_record(job.id))[0])
        assert record.state == jobs.FAILED and record.error is not None and record.error["code"] == "poison"
        assert [j.id for j in host.poisoned] == [job.id] and host.active == {}
        assert self.markers() == []


class LaneTests(AdopterFixture):
    """A gone owner's jobs are taken over through the store's EVENT lane (a bucket shared by the
    events in progress, gridnode/store/rate.py); our own prefix through the store's own lane."""

    def gated(self) -> list[str]:
        lanes: list[str] = []

        class Recording(Gate):
            def run(self, lane: str, send: Any) -> Any:
                lanes.append(lane)
                return super().run(lane, send)

        self.store = ObjectStore.synchronous(self.backend).gated(Recording(Clock(), rate=1000.0, slots=8))
        self.store = self.store.in_lane(BACKGROUND)
        return lanes

    def test_a_takeover_spends_the_event_lane_and_our_own_look_does_not(self) -> None:
        lanes = self.gated()
        self.orphan()
        host = FakeHost()
        assert self.take(self.adopter("n2", host)) == 1
        assert len(lanes) == 5 and set(lanes) == {EVENT}  # the listing, then a claim's 4
        lanes.clear()
        assert self.take(self.adopter("n2", host), "n2") == 0
        assert lanes == [BACKGROUND]  # our own markers: one listing, in our lane

    def test_leftovers_are_handed_on_in_the_event_lane(self) -> None:
        lanes = self.gated()
        for _ in range(3):
            self.orphan()
        adopter = self.adopter("n2", FakeHost(capacity=1))
        adopter.members = lambda: ["n2", "n3", "gone"]
        assert self.take(adopter) == 1
        assert set(lanes) == {EVENT}
        assert len([m for m in self.markers() if m.startswith("active/n3/")]) == 2


    def test_a_watcher_not_last_leaves_what_does_not_fit_for_the_next(self) -> None:
        """A watcher with another after it (``hand_on`` False) claims what fits and leaves the rest
        under the gone owner, where the next one's look finds it within seconds; the last one in
        turn claims what fits and hands the rest on to keepers."""
        for _ in range(4):
            self.orphan()
        first = self.adopter("n2", FakeHost(capacity=1))
        first.members = lambda: ["n2", "n3", "n4", "gone"]
        got: list[Any] = []
        first.take_over("gone", hand_on=False).addBoth(got.append)
        assert got == [1] and len([m for m in self.markers() if m.startswith("active/gone/")]) == 3
        last = self.adopter("n3", FakeHost(capacity=1))
        last.members = first.members
        assert self.take(last) == 1
        assert [m for m in self.markers() if m.startswith("active/gone/")] == []
        # n2's claim, n3's claim, and the two handed on to keepers among n2 and n4
        assert len([m for m in self.markers() if m.startswith("active/n3/")]) == 1
        assert len([m for m in self.markers() if m.startswith(("active/n2/", "active/n4/"))]) == 3


class MigrationTests(AdopterFixture):
    """The old layout (``active/<id>``), read by the registry writer alone."""

    def migrate(self, adopter: Adopter) -> Any:
        got: list[Any] = []
        adopter.migrate().addBoth(got.append)
        return got[0]

    def test_only_the_writer_reads_the_old_layout(self) -> None:
        """A node that is not the registry writer lists nothing."""
        self.orphan(legacy=True)
        listed: list[str] = []
        real = self.backend.list
        self.backend.list = lambda prefix, **kw: listed.append(prefix) or real(prefix, **kw)  # type: ignore
        assert self.migrate(self.adopter("n2", FakeHost())) == 0 and listed == []

    def test_old_markers_move_to_the_new_layout(self) -> None:
        """A gone owner's job is claimed (its old marker replaced by ours), a final one's marker
        removed, a live owner's job marked under that owner as well and left to it (its old
        marker stays: nodes of the earlier version read it); a second pass writes nothing new."""
        orphan = self.orphan(legacy=True)
        live = self.orphan(owner="alive", legacy=True)
        done = self.orphan(legacy=True)
        record = Job.loads(self.backend.get_bytes(keys.job_record(done.id))[0])
        record.fail("ffmpeg_failed", "bad", 5.0)
        self.backend.put_bytes(keys.job_record(done.id), record.dumps())
        host = FakeHost()
        adopter = self.adopter("w", host)
        adopter.reads_legacy = lambda: True
        assert self.migrate(adopter) == 1 and list(host.active) == [orphan.id]
        assert self.markers() == sorted([f"active/w/{orphan.id}", f"active/alive/{live.id}", f"active/{live.id}"])
        puts: list[str] = []
        real = self.backend.put_bytes
        self.backend.put_bytes = lambda key, data, **kw: puts.append(key) or real(key, data, **kw)  # type: ignore
        assert self.migrate(adopter) == 0 and puts == []
