"""
Who watches which job for adoption.

A node looking for orphaned jobs must read each candidate's record (its owner
and lease are in it), so every node reading every unfinished job each pass
costs the store N x M GETs. Instead each job is watched by ``k`` nodes, chosen
by consistent hashing over the live members: a ring of points, a few per
member, and a job's watchers are the first ``k`` distinct members after the
job's own point. Every node computes the ring from its own membership view, so
views that differ for a moment only make a job watched by one node more or
less; claims are conditional writes, so two watchers never both win.

When a member leaves the ring, only the jobs it watched move, each to the
next member on the ring: the dead node's own jobs are spread over many nodes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

#: points per member: enough to even out the arcs between them
POINTS = 64


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class WatchRing:
    def __init__(self, members: Iterable[str], points: int = POINTS) -> None:
        self.members = sorted(set(members))
        self._ring = sorted((_point(f"{m}#{i}"), m) for m in self.members for i in range(points))
        self._keys = [p for p, _ in self._ring]

    def watchers(self, job_id: str, k: int) -> list[str]:
        """The ``k`` members (fewer if there are fewer) that watch ``job_id``, first one first."""
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
