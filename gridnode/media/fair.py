"""
The order a node's queue is served in: `FairQueue`, a plain object with no I/O and no clock.

Highest priority first (rank 0 before 1 before 2: gridnode/priority.py), strictly: a lower
priority waits while higher work is queued. Within a priority, the tenants with queued work
take turns (round robin), each tenant's own entries first in, first out: a tenant that queued
a thousand jobs gets one start per round like a tenant that queued one, so neither waits
behind the other's backlog. A tenant that empties its queue leaves the round; when it queues
again it joins at the end of the round.

Generic over the entry: the pool queues jobs (gridnode/media/pool.py); anything else that
shares the workers by tenant (a job's chunks, say) queues the same way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

E = TypeVar("E")


class FairQueue(Generic[E]):
    """Entries by (priority rank, tenant): `peek` says which is served next, `pop` serves it."""

    def __init__(self) -> None:
        #: rank -> tenant -> its entries, oldest first; a rank's tenants in turn order (the next first)
        self._levels: dict[int, dict[str, deque[E]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[E]:
        """Every entry, highest priority first (within one, not in the order served)."""
        for rank in sorted(self._levels):
            for entries in self._levels[rank].values():
                yield from entries

    def push(self, rank: int, tenant: str, entry: E) -> None:
        """Queue ``entry`` of ``tenant`` at priority ``rank`` (lower is served first)."""
        level = self._levels.setdefault(rank, {})
        level.setdefault(tenant, deque()).append(entry)  # a tenant new to the round joins at its end
        self._count += 1

    def peek(self) -> E | None:
        """The entry served next, or None when the queue is empty. It stays next until it is
        popped, unless an entry of a higher priority is pushed meanwhile."""
        if not self._levels:
            return None
        level = self._levels[min(self._levels)]
        return next(iter(level.values()))[0]

    def pop(self) -> E:
        """Serve the next entry; its tenant goes to the end of its priority's round."""
        if not self._levels:
            raise IndexError("pop from an empty FairQueue")
        rank = min(self._levels)
        level = self._levels[rank]
        tenant = next(iter(level))
        entries = level.pop(tenant)
        entry = entries.popleft()
        if entries:
            level[tenant] = entries  # re-inserted: last in the turn order
        elif not level:
            del self._levels[rank]
        self._count -= 1
        return entry

    def remove(self, entry: E) -> bool:
        """Take ``entry`` out wherever it is (a cancelled job); False when it is not queued. Its
        tenant keeps its place in the round."""
        for rank, level in self._levels.items():
            for tenant, entries in level.items():
                if entry in entries:
                    entries.remove(entry)
                    if not entries:
                        del level[tenant]
                        if not level:
                            del self._levels[rank]
                    self._count -= 1
                    return True
        return False

    def counts(self) -> dict[tuple[int, str], int]:
        """Entries queued by (rank, tenant)."""
        return {(rank, tenant): len(entries) for rank, level in self._levels.items()
                for tenant, entries in level.items()}
