"""
The queue's order (gridnode/media/fair.py) and the priority rules (gridnode/priority.py):
highest priority first, tenants in turn within one, each tenant's entries in order; who a node
admits at which priority; what a new job of a priority sees of a node's load.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridnode import priority
from gridnode.errors import GridnodeError
from gridnode.media.fair import FairQueue

TENANTS = st.sampled_from(["a", "b", "c", "d"])
RANKS = st.integers(min_value=0, max_value=2)
#: a run of operations: ("push", rank, tenant), ("pop",), ("remove", index among the queued)
OPS = st.lists(st.one_of(st.tuples(st.just("push"), RANKS, TENANTS), st.tuples(st.just("pop")),
                         st.tuples(st.just("remove"), st.integers(min_value=0, max_value=50))), max_size=120)


def run(ops: list[tuple[Any, ...]]) -> tuple[list[tuple[int, str, int]], list[list[tuple[int, str, int]]]]:
    """Apply ``ops``; the entries popped (rank, tenant, serial), and what was queued before each pop."""
    queue: FairQueue[tuple[int, str, int]] = FairQueue()
    popped: list[tuple[int, str, int]] = []
    before: list[list[tuple[int, str, int]]] = []
    for serial, op in enumerate(ops):
        if op[0] == "push":
            queue.push(op[1], op[2], (op[1], op[2], serial))
        elif op[0] == "pop" and len(queue):
            before.append(list(queue))
            assert queue.peek() is not None
            head = queue.peek()
            popped.append(queue.pop())
            assert popped[-1] == head  # peek says what pop serves
        elif op[0] == "remove" and len(queue):
            entries = list(queue)
            assert queue.remove(entries[op[1] % len(entries)])
    return popped, before


class FairQueueTests:
    @given(OPS)
    @settings(max_examples=300, deadline=None)
    def test_the_highest_priority_queued_is_served_first(self, ops: list[tuple[Any, ...]]) -> None:
        """Each entry served is of the highest priority queued when it is served."""
        popped, before = run(ops)
        for entry, queued in zip(popped, before, strict=True):
            assert entry[0] == min(rank for rank, _, _ in queued)

    @given(OPS)
    @settings(max_examples=300, deadline=None)
    def test_a_tenants_entries_are_served_in_order(self, ops: list[tuple[Any, ...]]) -> None:
        """Within one priority, one tenant's entries come out first in, first out."""
        popped, _ = run(ops)
        for rank in range(3):
            for tenant in "abcd":
                serials = [s for r, t, s in popped if (r, t) == (rank, tenant)]
                assert serials == sorted(serials)

    @given(OPS)
    @settings(max_examples=300, deadline=None)
    def test_no_tenant_waits_more_than_a_round(self, ops: list[tuple[Any, ...]]) -> None:
        """While a tenant has work queued at a priority, each other tenant is served at most once at
        that priority before it is served again: one round per other tenant, whatever their backlog."""
        queue: FairQueue[tuple[int, str]] = FairQueue()
        #: (rank, tenant) -> the tenants served at that rank since it last was, while it had work queued
        since: dict[tuple[int, str], list[str]] = {}
        for op in ops:
            if op[0] == "push":
                queue.push(op[1], op[2], (op[1], op[2]))
                since.setdefault((op[1], op[2]), [])
            elif op[0] == "pop" and len(queue):
                rank, tenant = queue.pop()
                for (r, t), served in since.items():
                    if r == rank and t != tenant:
                        assert tenant not in served, (t, served, tenant)
                        served.append(tenant)
                since[(rank, tenant)] = []
                for key in [k for k in since if k not in queue.counts()]:
                    del since[key]  # no work queued: it waits for nothing
            elif op[0] == "remove" and len(queue):
                entries = list(queue)
                queue.remove(entries[op[1] % len(entries)])
                for key in [k for k in since if k not in queue.counts()]:
                    del since[key]
        assert len(queue) == sum(queue.counts().values())

    def test_a_thousand_uploads_do_not_starve_one(self) -> None:
        """One tenant's backlog of 1,000 and another's single entry: the single one is served second."""
        queue: FairQueue[str] = FairQueue()
        for i in range(1000):
            queue.push(1, "big", f"big{i}")
        queue.push(1, "small", "small0")
        assert [queue.pop(), queue.pop(), queue.pop()] == ["big0", "small0", "big1"]

    def test_a_higher_priority_goes_before_the_one_held_next(self) -> None:
        """`peek` stays on an entry until it is popped, unless a higher priority arrives; an emptied
        queue pops nothing."""
        queue: FairQueue[str] = FairQueue()
        assert queue.peek() is None
        queue.push(2, "a", "low")
        queue.push(2, "b", "low-b")
        assert queue.peek() == "low"
        queue.push(0, "c", "high")
        assert queue.peek() == "high" and queue.pop() == "high"
        assert [queue.pop(), queue.pop()] == ["low", "low-b"]
        assert not queue.remove("low")
        with pytest.raises(IndexError):
            queue.pop()


class PriorityTests:
    @pytest.mark.parametrize("text", ["", "urgent", "HIGH ", "high,low", "0", "normal\x00", "n" * 1000])
    def test_a_bad_priority_is_a_coded_400(self, text: str) -> None:
        """Anything but high, normal or low (any case, spaces around) is refused, saying the choices."""
        if text.strip().lower() in priority.RANK:
            assert priority.parse(text) == text.strip().lower()
            return
        with pytest.raises(GridnodeError) as e:
            priority.parse(text)
        assert e.value.code == "bad_priority" and e.value.status == 400 and "high, normal, low" in e.value.message

    def test_none_is_normal(self) -> None:
        """A job that names no priority is normal."""
        assert priority.parse(None) == priority.NORMAL

    def test_a_node_full_of_low_work_admits_higher_up_to_the_bound(self) -> None:
        """workers 2, queue 4: 6 low jobs fill the node for low; normal and high still come in until
        every job together reaches workers + 2 x queue = 10; high passes normal's limit too."""
        held = {"high": 0, "normal": 0, "low": 6}
        assert not priority.admits("low", held, 0, 2, 4)
        assert priority.admits("normal", held, 0, 2, 4) and priority.admits("high", held, 0, 2, 4)
        held = {"high": 0, "normal": 4, "low": 6}
        assert not priority.admits("normal", held, 0, 2, 4) and not priority.admits("high", held, 0, 2, 4)
        held = {"high": 0, "normal": 6, "low": 0}
        assert not priority.admits("normal", held, 0, 2, 4) and priority.admits("high", held, 0, 2, 4)
        assert not priority.admits("high", held, 4, 2, 4)  # uploads in flight count at every priority

    @given(st.dictionaries(st.sampled_from(priority.PRIORITIES), st.integers(0, 40)), st.integers(0, 10),
           st.integers(1, 8), st.integers(0, 16))
    def test_the_bound_holds_whatever_the_mix(self, held: dict[str, int], uploading: int, workers: int,
                                              queue: int) -> None:
        """A job is admitted only under workers + 2 x queue in all; a higher priority is admitted
        wherever a lower one is."""
        for level in priority.PRIORITIES:
            if priority.admits(level, held, uploading, workers, queue):
                assert sum(held.values()) + uploading < workers + 2 * queue
                higher = priority.PRIORITIES[:priority.RANK[level]]
                assert all(priority.admits(h, held, uploading, workers, queue) for h in higher)

    def test_a_new_job_sees_only_the_work_ahead_of_it(self) -> None:
        """Lower priorities' queued jobs and work are left out of what a new job sees; a load
        without the figures (an older node) is taken whole."""
        load = {"running": 2.0, "queued": 10.0, "workers": 2.0, "work": 700.0,
                **priority.load_figures([("low", 60.0)] * 8 + [("normal", 30.0), ("high", 10.0)])}
        assert priority.seen_by("low", load) == load
        normal = priority.seen_by("normal", load)
        assert normal["queued"] == 2.0 and normal["work"] == pytest.approx(700.0 - 480.0)
        high = priority.seen_by("high", load)
        assert high["queued"] == 1.0 and high["work"] == pytest.approx(700.0 - 480.0 - 30.0)
        old = {"running": 2.0, "queued": 10.0, "workers": 2.0, "work": 700.0}
        assert priority.seen_by("high", old) == old
