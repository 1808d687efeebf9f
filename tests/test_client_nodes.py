"""Finding and choosing nodes on the client side."""

from __future__ import annotations

import json
import random

import pytest

from gridnode.client.nodes import NodeInfo, nodes_from_json, nodes_from_store, order_for_failover, two_choices
from gridnode.errors import GridnodeError
from gridnode.store.memory import MemoryBackend


def node(i: int, running: float = 0, queued: float = 0, workers: float = 2) -> NodeInfo:
    return NodeInfo(f"n{i}", f"http://127.0.0.1:{8000 + i}",
                    {"running": running, "queued": queued, "workers": workers})


class ChoiceTests:
    def test_prefers_less_busy(self) -> None:
        """Of the two sampled nodes the one with fewer jobs per worker wins."""
        nodes = [node(0, 2, 5), node(1, 0, 0)]
        assert all(two_choices(nodes, random.Random(s)).id == "n1" for s in range(20))

    def test_busy_is_per_worker(self) -> None:
        """A node with more workers carries more jobs at the same busyness."""
        assert node(0, 4, 0, workers=8).busy < node(1, 2, 0, workers=2).busy

    def test_failover_order_covers_all_once(self) -> None:
        """The failover order lists every node exactly once."""
        nodes = [node(i, i) for i in range(7)]
        order = order_for_failover(nodes, random.Random(3))
        assert sorted(n.id for n in order) == sorted(n.id for n in nodes)

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
