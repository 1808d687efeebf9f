"""Finding and choosing nodes on the client side."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode.client.nodes import (
    SPREAD,
    TYPICAL_INPUT_S,
    Candidates,
    NodeInfo,
    nodes_from_json,
    nodes_from_store,
    order_for_failover,
    rank_checked,
    ranked,
    two_choices,
    with_live_load,
    with_sending,
)
from gridnode.errors import GridnodeError, StorageUnavailable
from gridnode.registry.records import MAX_RECORD_BYTES, MAX_SPEED
from gridnode.store.memory import MemoryBackend


def node(i: int, running: float = 0, queued: float = 0, workers: float = 2, **more: float) -> NodeInfo:
    return NodeInfo(f"n{i}", f"http://127.0.0.1:{8000 + i}",
                    {"running": running, "queued": queued, "workers": workers, **more})


#: /health or record load figures no reader may take
HOSTILE_FIGURES: list[Any] = [float("nan"), float("inf"), -float("inf"), -1, True, "4", None, [2], {"x": 1}]


class LiveCheckTests:
    def test_live_load_replaces_the_registry_figures(self) -> None:
        """A /health answer's running/queued/workers/work/speed win over the heartbeat's; junk is ignored."""
        stale = node(0, running=0, queued=0, workers=2)
        live = with_live_load(stale, {"running": 2, "queued": 6, "workers": 4, "state": "ok", "uptime": 5})
        assert live.load == {"running": 2.0, "queued": 6.0, "workers": 4.0} and live.busy == 2.0
        live = with_live_load(stale, {"work": 90.5, "speed": 2.5})
        assert live.load["work"] == 90.5 and live.speed == 2.5
        assert with_live_load(stale, {"running": "lots", "queued": True}).load == stale.load
        assert with_live_load(stale, ["not", "a", "dict"]).load == stale.load

    def test_answered_least_busy_first_silent_last(self) -> None:
        """Candidates that answered come first, least busy first; one that did not answer goes last."""
        busy, idle, frozen = node(0, 4, 4), node(1, 0, 0), node(2, 0, 0)
        for seed in range(10):
            ranked = rank_checked([(frozen, False), (busy, True), (idle, True)], random.Random(seed))
            assert [n.id for n in ranked] == ["n1", "n0", "n2"]

    def test_ties_are_broken_at_random(self) -> None:
        """Two candidates equally busy: either may come first."""
        a, b = node(0, 1), node(1, 1)
        firsts = {rank_checked([(a, True), (b, True)], random.Random(seed))[0].id for seed in range(20)}
        assert firsts == {"n0", "n1"}


class ExpectedWaitTests:
    """Candidates are ranked by when a new job would be done, not by how many jobs they hold."""

    def test_a_busy_fast_node_beats_an_idle_slow_one(self) -> None:
        """A 4x node with every worker busy and a queue finishes a new job sooner than a 1x node
        with a free worker: (150/2 + 60)/4 = 34 s against 60 s; the count says the opposite."""
        slow = node(0, 1, 0, speed=1.0, work=30.0)
        fast = node(1, 2, 1, speed=4.0, work=150.0)
        assert fast.busy > slow.busy
        assert fast.expected_wait(4.0) == pytest.approx(33.75)
        assert slow.expected_wait(1.0) == pytest.approx(TYPICAL_INPUT_S)
        for seed in range(10):
            assert [n.id for n in rank_checked([(slow, True), (fast, True)], random.Random(seed))] == ["n1", "n0"]

    def test_a_long_queue_loses_to_an_idle_slow_node(self) -> None:
        """Time, not speed alone: the fast node's queue of 20 minutes of input makes it wait longer."""
        slow = node(0, 0, 0, speed=1.0, work=0.0)
        fast = node(1, 2, 8, speed=4.0, work=1200.0)
        assert all(rank_checked([(fast, True), (slow, True)], random.Random(s))[0].id == "n0" for s in range(10))

    def test_queued_work_of_lower_priority_does_not_count(self) -> None:
        """A node whose queue is all low-priority work beats one with a little normal work for a
        normal job (its queue waits behind it), loses for a low one; the live figures a client reads
        carry the figures by priority."""
        from dataclasses import replace

        from gridnode.priority import load_figures

        lows = node(0, 2, 8, speed=1.0, work=8 * 60.0 + 100.0)
        lows = replace(lows, load={**lows.load, **load_figures([("low", 60.0)] * 8)})
        normal = node(1, 2, 2, speed=1.0, work=220.0)
        normal = replace(normal, load={**normal.load, **load_figures([("normal", 60.0)] * 2)})
        for s in range(10):
            assert ranked([normal, lows], random.Random(s), "normal")[0].id == "n0"
            assert ranked([normal, lows], random.Random(s), "low")[0].id == "n1"
        assert lows.expected_wait(1.0, "normal") == pytest.approx(100.0 / 2 + TYPICAL_INPUT_S)
        assert normal.expected_wait(1.0, "normal") == pytest.approx(220.0 / 2 + TYPICAL_INPUT_S)
        health = {"running": 2, "queued": 8, "workers": 2, "work": 580.0, "queued_low": 8, "work_low": 480.0}
        assert with_live_load(node(2, 0, 0), health).load["queued_low"] == 8.0

    def test_work_is_seconds_of_input_not_jobs(self) -> None:
        """Same speed, same job count: the node with less input left wins; without a ``work``
        figure (a node older than it) each job counts as a typical one."""
        short = node(0, 2, 2, speed=1.0, work=40.0)
        long = node(1, 2, 2, speed=1.0, work=900.0)
        assert all(ranked([long, short], random.Random(s))[0].id == "n0" for s in range(10))
        old = node(2, 2, 2)
        assert old.expected_wait(1.0) == pytest.approx(4 * TYPICAL_INPUT_S / 2 + TYPICAL_INPUT_S)

    def test_equal_waits_go_to_the_less_busy_then_at_random(self) -> None:
        """Two nodes with free workers and the same speed wait alike: the less busy one wins; equally
        busy, either may."""
        a, b = node(0, 1, 0, speed=2.0, work=10.0), node(1, 0, 0, speed=2.0, work=0.0)
        assert all(ranked([a, b], random.Random(s))[0].id == "n1" for s in range(10))
        c = node(2, 0, 0, speed=2.0, work=0.0)
        assert {ranked([b, c], random.Random(s))[0].id for s in range(30)} == {"n1", "n2"}

    def test_a_node_without_a_speed_is_taken_at_the_others(self) -> None:
        """A node that has not finished a job yet is neither starved among fast nodes nor flooded
        among slow ones: it is compared at the other candidate's speed, so its idle workers win over
        a busy fast node's queue, and lose to an idle fast node of the same load."""
        new = node(0, 0, 0, work=0.0)
        assert new.speed is None
        busy_fast = node(1, 2, 2, speed=8.0, work=240.0)
        assert all(ranked([busy_fast, new], random.Random(s))[0].id == "n0" for s in range(10))
        idle_fast = node(2, 1, 0, speed=8.0, work=30.0)
        assert all(ranked([new, idle_fast], random.Random(s))[0].id == "n0" for s in range(10))  # less busy
        both_new = [node(3, 4, 0), node(4, 0, 0)]
        assert all(ranked(both_new, random.Random(s))[0].id == "n4" for s in range(10))

    @pytest.mark.parametrize("bad", HOSTILE_FIGURES)
    def test_hostile_figures_in_health_are_left_out(self, bad: Any) -> None:
        """A /health answer with a speed or work that is not a finite number >= 0 keeps the
        registry's figure: the ranking never sees NaN, infinity or a negative wait."""
        stale = node(0, 1, 0, speed=2.0, work=30.0)
        live = with_live_load(stale, {"running": 1, "queued": 0, "speed": bad, "work": bad})
        assert live.speed == 2.0 and live.load["work"] == 30.0
        assert [n.expected_wait(n.speed or 1.0) for n in ranked([live, node(1, speed=4.0)], random.Random(1))] == [
            15.0, 30.0]

    @pytest.mark.parametrize("bad", [0, 0.0009, 1001, 1e9, float("nan"), float("inf"), -2.0, "4", None])
    def test_a_speed_out_of_range_is_no_speed(self, bad: float) -> None:
        """A speed outside what readers take (a bug or a lie: one huge speed would draw every
        upload) is no speed, even on a NodeInfo built without the reader."""
        assert with_live_load(node(0), {"speed": bad}).speed is None
        raw = NodeInfo("n9", "http://n9", {"running": 1.0, "speed": bad})
        assert raw.speed is None
        assert ranked([raw, node(1, 0, 0, speed=1.0)], random.Random(1))[0].id == "n1"

    def test_uploads_in_flight_count_as_typical_work(self) -> None:
        """This client's own uploads to a node count as queued jobs of typical length."""
        n = with_sending(node(0, 2, 0, speed=1.0, work=100.0), 3)
        assert n.load["queued"] == 3.0 and n.load["work"] == 100.0 + 3 * TYPICAL_INPUT_S
        assert with_sending(node(1), 0) == node(1)
        assert "work" not in with_sending(node(1), 2).load

    @given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(1, 16),
                              st.floats(0, 5000), st.one_of(st.none(), st.floats(0.001, MAX_SPEED))),
                    min_size=1, max_size=6), st.integers(0, 2**32))
    def test_ranking_is_a_permutation_least_wait_first(self, figures: list[tuple[int, int, int, float, float | None]],
                                                        seed: int) -> None:
        """Whatever the figures: every candidate is ranked once, and the first has the least expected
        wait, at the speeds the ranking takes."""
        nodes = [NodeInfo(f"n{i}", f"http://n{i}", {"running": float(r), "queued": float(q), "workers": float(w),
                                                    "work": work, **({} if s is None else {"speed": s})})
                 for i, (r, q, w, work, s) in enumerate(figures)]
        out = ranked(nodes, random.Random(seed))
        assert sorted(n.id for n in out) == sorted(n.id for n in nodes)
        known = sorted(n.speed for n in nodes if n.speed is not None)
        default = known[len(known) // 2] if known else 1.0
        waits = [n.expected_wait(n.speed or default) for n in out]
        assert waits[0] == min(waits)

    @given(st.integers(0, 20), st.integers(0, 20), st.floats(0, 5000), st.floats(0.01, 100), st.floats(1.01, 10))
    def test_a_faster_node_never_waits_longer(self, running: int, queued: int, work: float, speed: float,
                                              faster: float) -> None:
        """Same figures, more speed: never a longer expected wait."""
        n = node(0, running, queued, workers=4, work=work)
        assert n.expected_wait(speed * faster) <= n.expected_wait(speed)


class CandidateTests:
    def test_two_distinct_nodes(self) -> None:
        """A draw gives two different nodes; two or fewer nodes give them all."""
        nodes = [node(i, speed=float(1 + i % 3)) for i in range(7)]
        draw = Candidates(nodes)
        for seed in range(50):
            a, b = draw.draw(random.Random(seed))
            assert a.id != b.id
        assert [n.id for n in Candidates(nodes[:2]).draw(random.Random())] == ["n0", "n1"]
        assert Candidates([]).draw(random.Random()) == []

    def test_a_faster_node_is_asked_in_proportion(self) -> None:
        """A 4x node among 1x nodes is drawn first about 4/7 of the time (4 of 1+1+1+4), and a node
        without a speed counts as the median of the others'."""
        nodes = [node(0, speed=1.0), node(1, speed=1.0), node(2, speed=1.0), node(3, speed=4.0)]
        rng = random.Random(5)
        firsts = [Candidates(nodes).draw(rng)[0].id for _ in range(4000)]
        assert 0.52 < firsts.count("n3") / 4000 < 0.62
        unknown = [node(0, speed=1.0), node(1), node(2, speed=1.0)]
        firsts = [Candidates(unknown).draw(rng)[0].id for _ in range(3000)]
        assert 0.28 < firsts.count("n1") / 3000 < 0.39

    def test_an_outlandish_speed_is_asked_at_most_spread_times_as_often(self) -> None:
        """One node claiming the highest speed readers take among 19 at 1x is drawn first about
        8 times in 27 (its weight capped at SPREAD times the median), not 98 times in 100."""
        nodes = [node(i, speed=1.0) for i in range(19)] + [node(19, speed=MAX_SPEED)]
        rng = random.Random(2)
        firsts = [Candidates(nodes).draw(rng)[0].id for _ in range(3000)]
        assert SPREAD == 8.0 and 0.25 < firsts.count("n19") / 3000 < 0.35

    def test_a_lopsided_pool_still_draws_two(self) -> None:
        """One node with nearly all the weight: the second draw leaves it out instead of retrying."""
        nodes = [node(0, speed=MAX_SPEED), node(1, speed=0.001), node(2, speed=0.001)]
        for seed in range(20):
            a, b = Candidates(nodes).draw(random.Random(seed))
            assert a.id != b.id


class ChoiceTests:
    def test_prefers_less_busy(self) -> None:
        """Of the two sampled nodes the one with fewer jobs per worker wins."""
        nodes = [node(0, 2, 5), node(1, 0, 0)]
        assert all(two_choices(nodes, random.Random(s)).id == "n1" for s in range(20))

    def test_busy_is_per_worker(self) -> None:
        """A node with more workers carries more jobs at the same busyness."""
        assert node(0, 4, 0, workers=8).busy < node(1, 2, 0, workers=2).busy

    def test_failover_order_covers_all_once(self) -> None:
        """The failover order lists every node exactly once, a node listed twice included."""
        nodes = [node(i, i) for i in range(7)]
        order = order_for_failover(nodes, random.Random(3))
        assert sorted(n.id for n in order) == sorted(n.id for n in nodes)
        twice = order_for_failover([*nodes, node(2, 9)], random.Random(3))
        assert sorted(n.id for n in twice) == sorted(n.id for n in nodes)
        assert order_for_failover([], random.Random()) == []
        assert [n.id for n in order_for_failover([node(5)], random.Random())] == ["n5"]

    def test_failover_order_is_two_choices_at_every_place(self) -> None:
        """Each place is the less busy of two nodes drawn from those not placed yet: of two nodes
        the idle one comes first every time; over many orders the first place carries about the
        expected minimum of two distinct draws from 0..5 jobs (4/3, a random order: 2.5), and
        the busiest node, which wins no draw, always comes last."""
        assert all(order_for_failover([node(0, 3), node(1, 0)], random.Random(s))[0].id == "n1"
                   for s in range(20))
        nodes = [node(i, i) for i in range(6)]
        orders = [order_for_failover(nodes, random.Random(s)) for s in range(400)]
        first = sum(o[0].load["running"] for o in orders) / len(orders)
        assert first < 1.7
        assert all(o[-1].id == "n5" for o in orders)

    def test_exclude(self) -> None:
        """Excluded nodes are never chosen; nothing left gives None."""
        nodes = [node(0, 0), node(1, 5), node(2, 5)]
        picks = {two_choices(nodes, random.Random(s), {"n0"}).id for s in range(30)}  # type: ignore[union-attr]
        assert picks == {"n1", "n2"}
        assert two_choices(nodes, random.Random(), {"n0", "n1", "n2"}) is None

    def test_empty_and_single(self) -> None:
        """No node gives None; one node is always chosen."""
        assert two_choices([], random.Random()) is None
        assert two_choices([node(0)], random.Random()).id == "n0"  # type: ignore[union-attr]


class DiscoveryTests:
    def test_nodes_json(self) -> None:
        """The public list is read; junk entries are skipped, and so are load figures that are not
        sane numbers (NaN, infinite, negative, a speed out of range)."""
        data = json.dumps({"nodes": [{"id": "a", "http_url": "http://a/", "load": {"running": 1, "speed": 2}},
                                     {"id": "b", "http_url": "http://b", "heartbeat": "x",
                                      "load": {"running": float("nan"), "queued": -1, "speed": 1e9,
                                               "work": float("inf"), "workers": 4}},
                                     {"id": 3}, "junk"]}).encode()
        nodes = nodes_from_json(data)
        assert [(n.id, n.http_url, n.load) for n in nodes] == [("a", "http://a", {"running": 1.0, "speed": 2.0}),
                                                               ("b", "http://b", {"workers": 4.0})]
        with pytest.raises(GridnodeError):
            nodes_from_json(b"<html>")

    def test_records_in_store(self) -> None:
        """Fresh records are read from the registry prefix; stale and broken ones are not."""
        b = MemoryBackend()
        rec = {"id": "a", "http_url": "http://a", "peer_addr": "", "started": 1, "incarnation": 1,
               "heartbeat": 1000, "load": {"running": 1}}
        b.put_bytes("registry/dev/p/nodes/a.json", json.dumps(rec).encode())
        b.put_bytes("registry/dev/p/nodes/b.json", json.dumps({**rec, "id": "b", "heartbeat": 1}).encode())
        b.put_bytes("registry/dev/p/nodes/c.json", b"garbage")
        assert [n.id for n in nodes_from_store(b, "dev", "p", stale=300, now=1100)] == ["a"]

    def test_records_in_store_are_read_as_the_node_reads_them(self) -> None:
        """The client shares the node's reader: a record too large is skipped without a GET, one
        stored under another node's name or deleted between list and get is skipped, and any other
        store error is raised."""
        b = MemoryBackend()
        rec = {"id": "a", "http_url": "http://a", "peer_addr": "", "started": 1, "incarnation": 1,
               "heartbeat": 1000, "load": {"running": 1}}
        b.put_bytes("registry/dev/p/nodes/a.json", json.dumps(rec).encode())
        b.put_bytes("registry/dev/p/nodes/big.json", b" " * (MAX_RECORD_BYTES + 1))
        b.put_bytes("registry/dev/p/nodes/c.json", json.dumps({**rec, "id": "d"}).encode())
        b.put_bytes("registry/dev/p/nodes/e.json", json.dumps({**rec, "id": "e"}).encode())
        real_get = b.get_bytes
        gets: list[str] = []

        def get(key: str, **kw: Any) -> Any:
            gets.append(key.rsplit("/", 1)[-1])
            if key.endswith("e.json"):
                b.delete(key)
            return real_get(key, **kw)

        b.get_bytes = get  # type: ignore[method-assign]
        assert [n.id for n in nodes_from_store(b, "dev", "p", stale=300, now=1100)] == ["a"]
        assert gets == ["a.json", "c.json", "e.json"]

        def down(key: str, **kw: Any) -> Any:
            raise StorageUnavailable("bucket unreachable")

        b.get_bytes = down  # type: ignore[method-assign]
        with pytest.raises(StorageUnavailable):
            nodes_from_store(b, "dev", "p", stale=300, now=1100)
