"""Adoption (gridnode/adoption.py): the ring of keepers, and the adopter on a memory store."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from gridnode import jobs, keys
from gridnode.adoption import MAX_ATTEMPTS, Adopter, Claim, KeeperRing
from gridnode.jobs import Job
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend

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

    def run_claimed(self, claim: Claim) -> None:
        self.active[claim.job.id] = claim

    def quarantined(self, job: Job) -> None:
        self.poisoned.append(job)


class AdopterTests:
    @pytest.fixture(autouse=True)
    def setup(self) -> None:
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)

    def orphan(self, attempts: int = 1, lease_until: float = 10.0) -> Job:
        """An unfinished job of node "gone", its input stored and its marker written."""
        job = Job.new(keys.new_id(1.0), name="m.mov", presets=["mp4-720p"], node="gone", size=5, now=1.0)
        job.advance(jobs.PROBING, 1.0)
        job.accept(1.0, lease_until - 1.0)
        for _ in range(attempts - 1):
            job.reclaim("gone", 1.0, lease_until - 1.0)
        self.backend.put_bytes(keys.job_record(job.id), job.dumps())
        self.backend.put_bytes(keys.active_marker(job.id), b"")
        return job

    def adopter(self, node: str, host: FakeHost, now: float = 100.0) -> Adopter:
        return Adopter(self.store, host, node, 30.0, now=lambda: now, rng=random.Random(1))

    def scan(self, adopter: Adopter) -> Any:
        got: list[Any] = []
        adopter.scan().addBoth(got.append)
        return got[0]

    def test_it_hands_back_what_it_claims(self) -> None:
        """An orphan (lease out) is claimed with a conditional write and handed to the host as
        written (ours, queued, one more attempt, with the write's ETag), not run; a second node
        then finds it taken."""
        job = self.orphan()
        host, other = FakeHost(), FakeHost()
        assert self.scan(self.adopter("n2", host)) == 1
        claim = host.active[job.id]
        data, info = self.backend.get_bytes(keys.job_record(job.id))
        assert Job.loads(data) == claim.job and info.etag == claim.etag
        assert (claim.job.node, claim.job.state, claim.job.attempts) == ("n2", jobs.QUEUED, 2)
        assert claim.job.lease_until == 130.0
        assert self.scan(self.adopter("n3", other)) == 0 and other.active == {}

    def test_a_live_lease_a_full_host_or_a_draining_one_claims_nothing(self) -> None:
        """A job whose lease runs is left alone; a host with no room or draining takes nothing."""
        self.orphan(lease_until=200.0)
        assert self.scan(self.adopter("n2", FakeHost())) == 0
        self.orphan()
        assert self.scan(self.adopter("n2", FakeHost(capacity=0))) == 0
        draining = FakeHost()
        draining.draining = True
        assert self.scan(self.adopter("n2", draining)) == 0
        host = FakeHost()
        assert self.scan(self.adopter("n2", host)) == 1 and len(host.active) == 1

    def test_poison_is_quarantined_not_handed_back(self) -> None:
        """A job claimed MAX_ATTEMPTS times already is failed as poison, its marker removed, and
        the host told; nothing is handed back to run."""
        job = self.orphan(attempts=MAX_ATTEMPTS)
        host = FakeHost()
        assert self.scan(self.adopter("n2", host)) == 0
        record = Job.loads(self.backend.get_bytes(keys.job_record(job.id))[0])
        assert record.state == jobs.FAILED and record.error is not None and record.error["code"] == "poison"
        assert [j.id for j in host.poisoned] == [job.id] and host.active == {}
        assert self.backend.list("active/").items == []
