"""
Finding and choosing nodes, Lei Zhu's way: no load balancer; the client
reads the live list from the bucket (or the public nodes.json) and picks a
node itself by the power of two choices. The registry's load figures are as
old as the last heartbeat, so for an upload the client reads the two
candidates' loads live (``GridClient``; ``rank_checked`` decides here).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

from gridnode import keys
from gridnode.errors import GridnodeError
from gridnode.registry.records import MAX_RECORD_BYTES, RecordReader, live_list
from gridnode.store.base import Backend, list_all


@dataclass(frozen=True)
class NodeInfo:
    id: str
    http_url: str
    load: dict[str, float] = field(default_factory=dict)
    heartbeat: float = 0.0

    @property
    def busy(self) -> float:
        """Jobs per worker: the figure two choices compare (0 when unknown)."""
        workers = self.load.get("workers") or 1.0
        return (self.load.get("running", 0.0) + self.load.get("queued", 0.0)) / workers


def nodes_from_store(backend: Backend, env: str, pool: str, stale: float = 300.0,
                     now: float | None = None) -> list[NodeInfo]:
    """The fresh node records under the registry prefix, read as the node reads them; malformed
    ones are skipped (blocking: run it in a thread)."""
    prefix = keys.node_records_prefix(env, pool)
    now = time.time() if now is None else now
    read = RecordReader(prefix).begin(list_all(backend, prefix), now)
    for key in read.fetch:
        try:
            data, info = backend.get_bytes(key, max_size=MAX_RECORD_BYTES)
        except GridnodeError as e:
            read.failed(key, e)
        else:
            read.got(key, data, info.etag)
    fresh = live_list(read.done(), now, stale)
    return [NodeInfo(r.id, r.http_url, r.load, r.heartbeat) for r in fresh]


def nodes_from_json(data: bytes) -> list[NodeInfo]:
    """The public nodes.json; entries that are not nodes are skipped."""
    try:
        raw = json.loads(data)
        entries = raw["nodes"]
    except (ValueError, KeyError, TypeError):
        raise GridnodeError("the registry URL did not answer a gridnode nodes.json", code="bad_registry") from None
    out = []
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("http_url"), str):
            load: dict[str, Any] = e["load"] if isinstance(e.get("load"), dict) else {}
            out.append(NodeInfo(e["id"], e["http_url"].rstrip("/"),
                                {k: float(v) for k, v in load.items() if isinstance(v, (int, float))},
                                float(e.get("heartbeat") or 0)))
    return out


def two_choices(nodes: list[NodeInfo], rng: random.Random, exclude: set[str] | frozenset[str] = frozenset(),
                ) -> NodeInfo | None:
    """Sample two candidates, keep the less busy one (random where loads tie or are unknown)."""
    candidates = [n for n in nodes if n.id not in exclude] if exclude else nodes
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    if a.busy == b.busy:
        return a
    return a if a.busy < b.busy else b


def order_for_failover(nodes: list[NodeInfo], rng: random.Random) -> list[NodeInfo]:
    """The order to try nodes in: two-choices picks first, the rest after. Each place is the
    two-choices pick among the nodes not placed yet (a node listed twice under one id counts
    once); O(n): a placed node is swapped out of the pool instead of the pool being rebuilt."""
    seen: set[str] = set()
    pool: list[NodeInfo] = []
    for n in nodes:
        if n.id not in seen:
            seen.add(n.id)
            pool.append(n)
    order: list[NodeInfo] = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        k = j if pool[j].busy < pool[i].busy else i
        order.append(pool[k])
        pool[k] = pool[-1]
        pool.pop()
    return order + pool


def with_live_load(node: NodeInfo, health: Any) -> NodeInfo:
    """``node`` with the load figures of its ``GET /health`` answer (others kept)."""
    load = dict(node.load)
    if isinstance(health, dict):
        for key in ("running", "queued", "workers"):
            value = health.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                load[key] = float(value)
    return replace(node, load=load)


def rank_checked(checked: list[tuple[NodeInfo, bool]], rng: random.Random) -> list[NodeInfo]:
    """The sampled candidates after a live check: those that answered, least busy first (in random
    order where loads tie), then those that did not answer (frozen, draining, gone)."""
    shuffled = list(checked)
    rng.shuffle(shuffled)
    answered = sorted((n for n, ok in shuffled if ok), key=lambda n: n.busy)  # stable: ties stay shuffled
    return answered + [n for n, ok in shuffled if not ok]


def describe(nodes: list[NodeInfo]) -> list[dict[str, Any]]:
    return [{"id": n.id, "http_url": n.http_url, "load": n.load, "heartbeat": n.heartbeat} for n in nodes]
