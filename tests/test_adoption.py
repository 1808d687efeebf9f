"""Consistent hashing of jobs to the nodes that keep them for adoption (gridnode/adoption.py)."""

from __future__ import annotations

from collections import Counter

from gridnode.adoption import KeeperRing

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
