"""Consistent hashing of jobs to the nodes that watch them for adoption (gridnode/watchers.py)."""

from __future__ import annotations

from collections import Counter

from gridnode.watchers import WatchRing

JOBS = [f"job{i:05d}" for i in range(10_000)]
MEMBERS = [f"i-{i:04x}" for i in range(20)]


def test_watchers_are_distinct_and_the_same_for_everyone() -> None:
    """k distinct members per job; any node with the same view computes the same ones."""
    ring, again = WatchRing(MEMBERS), WatchRing(reversed(MEMBERS))
    for job in JOBS[:500]:
        got = ring.watchers(job, 2)
        assert len(set(got)) == 2 and set(got) <= set(MEMBERS)
        assert again.watchers(job, 2) == got
    assert WatchRing(["a"]).watchers("j", 2) == ["a"]
    assert WatchRing([]).watchers("j", 2) == []


def test_every_member_watches_about_its_share() -> None:
    """Each of 20 members watches 2/20 of 10,000 jobs, within 30 % either way."""
    ring = WatchRing(MEMBERS)
    counts = Counter(m for job in JOBS for m in ring.watchers(job, 2))
    share = 2 * len(JOBS) / len(MEMBERS)
    assert set(counts) == set(MEMBERS)
    assert share * 0.7 <= min(counts.values()) and max(counts.values()) <= share * 1.3


def test_a_member_leaving_moves_only_what_it_watched() -> None:
    """Without one member, a job it did not watch keeps its watchers; the ones it watched are
    spread over many others, not handed to one neighbour."""
    ring, without = WatchRing(MEMBERS), WatchRing(MEMBERS[1:])
    gone = MEMBERS[0]
    inherited = Counter()
    for job in JOBS:
        before, after = ring.watchers(job, 2), without.watchers(job, 2)
        if gone in before:
            inherited.update(set(after) - set(before))
        else:
            assert after == before
    assert len(inherited) >= 8
