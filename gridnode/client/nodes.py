"""
Finding and choosing nodes, Lei Zhu's way: no load balancer; the client
reads the live list from the bucket (or the public nodes.json) and picks a
node itself by the power of two choices on the load figures.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound
from gridnode.registry import MAX_RECORD_BYTES, BadRecord, live_list, parse_record
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
    """The fresh node records under the registry prefix (blocking: run it in a thread)."""
    prefix = keys.node_records_prefix(env, pool)
    records = []
    for info in list_all(backend, prefix):
        name = info.key[len(prefix):]
        if "/" in name or not name.endswith(".json"):
            continue
        try:
            data, _ = backend.get_bytes(info.key, max_size=MAX_RECORD_BYTES)
            records.append(parse_record(data, name[:-5]))
        except (NotFound, BadRecord):
            continue
        except GridnodeError as e:
            if e.code in ("too_large", "invalid_key"):
                continue
            raise
    fresh = live_list(records, time.time() if now is None else now, stale)
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
    candidates = [n for n in nodes if n.id not in exclude]
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    if a.busy == b.busy:
        return a
    return a if a.busy < b.busy else b


def order_for_failover(nodes: list[NodeInfo], rng: random.Random) -> list[NodeInfo]:
    """The order to try nodes in: two-choices picks first, the rest after."""
    order: list[NodeInfo] = []
    tried: set[str] = set()
    while True:
        pick = two_choices(nodes, rng, tried)
        if pick is None:
            return order
        order.append(pick)
        tried.add(pick.id)


def describe(nodes: list[NodeInfo]) -> list[dict[str, Any]]:
    return [{"id": n.id, "http_url": n.http_url, "load": n.load, "heartbeat": n.heartbeat} for n in nodes]
