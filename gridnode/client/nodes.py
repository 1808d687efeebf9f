"""
Finding and choosing nodes, Lei Zhu's way: no load balancer; the client
reads the live list from the bucket (or the public nodes.json) and picks a
node itself by the power of two choices. The registry's load figures are as
old as the last heartbeat, so for an upload the client reads the two
candidates' loads live (``GridClient``; ``rank_checked`` decides here).

A pool mixes instance types, so the two candidates are drawn by speed
(``Candidates``) and compared by expected wait, not by job count: an idle slow
node can finish a job later than a busy fast one (bench/loadbalance.py
``--wait``: p99 time to result against a central dispatcher that sees every
node).
"""

from __future__ import annotations

import bisect
import json
import random
import time
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

from gridnode import keys
from gridnode.errors import GridnodeError
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.priority import PRIORITIES, figure, seen_by
from gridnode.registry.records import MAX_RECORD_BYTES, MAX_SPEED, MIN_SPEED, RecordReader, clean_load, live_list
from gridnode.store.base import Backend, list_all


@dataclass(frozen=True)
class NodeInfo:
    id: str
    http_url: str
    load: dict[str, float] = field(default_factory=dict)
    heartbeat: float = 0.0

    @property
    def jobs(self) -> float:
        return self.load.get("running", 0.0) + self.load.get("queued", 0.0)

    @property
    def busy(self) -> float:
        """Jobs per worker: where expected waits tie, the less busy node wins (0 when unknown)."""
        return self.jobs / (self.load.get("workers") or 1.0)

    @property
    def speed(self) -> float | None:
        """Seconds of input the node converts per second, per worker (None: not measured yet)."""
        value = self.load.get("speed")
        return value if isinstance(value, (int, float)) and MIN_SPEED <= value <= MAX_SPEED else None

    def expected_wait(self, speed: float, level: str = DEFAULT_PRIORITY) -> float:
        """Seconds until a new job of typical length and priority ``level`` would be done here at
        ``speed``: the work ahead of it (``work``, else a typical job per job held; queued work of
        lower priorities left out: it waits behind the new job) shared by the workers when none is
        free, then its own run."""
        load = seen_by(level, self.load)
        workers = max(1.0, load.get("workers") or 1.0)
        jobs = load.get("running", 0.0) + load.get("queued", 0.0)
        work = load.get("work", jobs * TYPICAL_INPUT_S)
        ahead = work / workers if jobs >= workers else 0.0
        return (ahead + TYPICAL_INPUT_S) / speed


#: how much more (or less) often than a typical node a node may be drawn, whatever its speed says:
#: per worker, instance types of one pool differ by a few times, not by a hundred
SPREAD = 8.0
#: seconds of input of a typical job: what a job stands for where a node does not say its
#: ``work`` (one older than the figure), and the new job's own length, which the client does not know
TYPICAL_INPUT_S = 60.0


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
            heartbeat = e.get("heartbeat")
            out.append(NodeInfo(e["id"], e["http_url"].rstrip("/"), clean_load(e.get("load")),
                                float(heartbeat) if isinstance(heartbeat, (int, float)) else 0.0))
    return out


def _speeds(nodes: list[NodeInfo]) -> list[float]:
    """Each node's speed; one that has not measured it yet is taken at the median of the others'
    (1.0 when none has): a fixed guess would starve a new node among fast ones or flood it among
    slow ones, and its first job measures it."""
    speeds = [n.speed for n in nodes]
    known = sorted(s for s in speeds if s is not None)
    default = known[len(known) // 2] if known else 1.0
    return [default if s is None else s for s in speeds]


def ranked(nodes: list[NodeInfo], rng: random.Random, level: str = DEFAULT_PRIORITY) -> list[NodeInfo]:
    """Least expected wait for a job of priority ``level`` first (speeds as `_speeds` takes them), the
    less busy first where waits tie, in random order where both tie."""
    pairs = list(zip(nodes, _speeds(nodes), strict=True))
    rng.shuffle(pairs)
    return [n for n, _ in sorted(pairs, key=lambda p: (p[0].expected_wait(p[1], level), p[0].busy))]  # stable


class Candidates:
    """The two nodes an upload asks live, drawn from ``nodes`` (distinct ids), each with a chance in
    proportion to its speed (`_speeds`): a node that converts twice as fast can take twice the
    work, so it is asked twice as often. Drawn uniformly, two slow candidates would come up often
    (4 times in 9 when two nodes in three are slow), and then the job runs slowly however idle
    the fast nodes are. A weight stays within ``SPREAD`` times the median's either way: a node
    whose figure is wrong (a bug, a lie, a run of odd files) is asked at most that many times as
    often as a typical one, not in nearly every pair. Built once per node list, O(n); a draw is
    O(log n)."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes
        speeds = _speeds(nodes)
        median = sorted(speeds)[len(speeds) // 2] if speeds else 1.0
        self._weights = [min(max(s, median / SPREAD), median * SPREAD) for s in speeds]
        self._cumulative = list(accumulate(self._weights))

    def draw(self, rng: random.Random) -> list[NodeInfo]:
        """Two distinct nodes (all of them when there are fewer), in the order drawn."""
        if len(self.nodes) <= 2:
            return list(self.nodes)
        total = self._cumulative[-1]
        a = min(bisect.bisect_right(self._cumulative, rng.random() * total), len(self.nodes) - 1)
        # the second draw leaves the first node's share out: no retry loop, however lopsided
        w = self._weights[a]
        u = rng.random() * (total - w)
        if u >= self._cumulative[a] - w:
            u += w
        b = min(bisect.bisect_right(self._cumulative, u), len(self.nodes) - 1)
        if b == a:  # float rounding at a share's edge
            b = (a + 1) % len(self.nodes)
        return [self.nodes[a], self.nodes[b]]


def two_choices(nodes: list[NodeInfo], rng: random.Random, exclude: set[str] | frozenset[str] = frozenset(),
                ) -> NodeInfo | None:
    """Sample two candidates, keep the better one by `ranked`."""
    candidates = [n for n in nodes if n.id not in exclude] if exclude else nodes
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    return ranked(rng.sample(candidates, 2), rng)[0]


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
        k = i if ranked([pool[i], pool[j]], rng)[0] is pool[i] else j
        order.append(pool[k])
        pool[k] = pool[-1]
        pool.pop()
    return order + pool


def with_live_load(node: NodeInfo, health: Any) -> NodeInfo:
    """``node`` with the load figures of its ``GET /health`` answer (others kept)."""
    figures = clean_load({k: health.get(k) for k in LIVE_FIGURES} if isinstance(health, dict) else {})
    return replace(node, load={**node.load, **figures})


#: what a node's ``/health`` says of its load that choosing reads
LIVE_FIGURES = ("running", "queued", "workers", "work", "speed",
                *(figure(kind, p) for p in PRIORITIES for kind in ("queued", "work")))


def with_sending(node: NodeInfo, sending: int) -> NodeInfo:
    """``node`` with ``sending`` more jobs queued: this client's uploads to it in flight, which the
    node counts only once it has answered."""
    if not sending:
        return node
    load = {**node.load, "queued": node.load.get("queued", 0.0) + sending}
    if "work" in load:
        load["work"] += sending * TYPICAL_INPUT_S
    return replace(node, load=load)


def rank_checked(checked: list[tuple[NodeInfo, bool]], rng: random.Random,
                 level: str = DEFAULT_PRIORITY) -> list[NodeInfo]:
    """The sampled candidates after a live check: those that answered by `ranked` (for a job of
    ``level``), then those that did not answer (frozen, draining, gone) in random order."""
    answered = ranked([n for n, ok in checked if ok], rng, level)
    others = [n for n, ok in checked if not ok]
    rng.shuffle(others)
    return answered + others


def describe(nodes: list[NodeInfo]) -> list[dict[str, Any]]:
    return [{"id": n.id, "http_url": n.http_url, "load": n.load, "heartbeat": n.heartbeat} for n in nodes]
