"""Finding and choosing nodes on the client side."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gridnode.client.nodes import (
    NodeInfo,
    nodes_from_json,
    nodes_from_store,
    order_for_failover,
    rank_checked,
    two_choices,
    with_live_load,
)
from gridnode.errors import GridnodeError, StorageUnavailable
from gridnode.registry.records import MAX_RECORD_BYTES
from gridnode.store.memory import MemoryBackend


def node(i: int, running: float = 0, queued: float = 0, workers: float = 2) -> NodeInfo:
    return NodeInfo(f"n{i}", f"http://127.0.0.1:{8000 + i}",
                    {"running": running, "queued": queued, "workers": workers})


class LiveCheckTests:
    def test_live_load_replaces_the_registry_figures(self) -> None:
        """A /health answer's running/queued/workers win over the heartbeat's; junk is ignored."""
        stale = node(0, running=0, queued=0, workers=2)
        live = with_live_load(stale, {"running": 2, "queued": 6, "workers": 4, "state": "ok"})
        assert live.load == {"running": 2.0, "queued": 6.0, "workers": 4.0} and live.busy == 2.0
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
        """The public list is read; junk entries are skipped."""
        data = json.dumps({"nodes": [{"id": "a", "http_url": "http://a/", "load": {"running": 1}},
                                     {"id": 3}, "junk"]}).encode()
        nodes = nodes_from_json(data)
        assert [(n.id, n.http_url, n.load) for n in nodes] == [("a", "http://a", {"running": 1.0})]
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
