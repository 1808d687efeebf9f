"""
Waiting with mixed instance types: how long a job waits for its result under
random choice, the client's rule and a central dispatcher, when some nodes
convert faster than others. Run by ``bench/loadbalance.py --wait``; a seeded
discrete-event simulation (no network, no sleeps, no threads).

The model
---------
- N nodes, each with ``workers`` ffmpeg slots (default 4) and a FIFO queue, as
  a gridnode node runs them. Speeds by node index from a mix: ``thirds`` (the
  default) makes every third node 2x (1, 1, 2); ``mixed`` is loadbalance.py's
  6x1 3x2 1x4. A job of ``d`` seconds of input holds a slot for ``d / speed``.
- One Poisson stream of jobs for the pool, ``d`` exponential with mean 60 s, at
  a rate that fills ``--utilization`` (0.7) of the pool's capacity
  (``workers * sum(speed) / mean d``). Under random choice the slow nodes get
  the same share as the fast ones: ``0.7 * 4/3 = 0.93`` of their capacity
  with ``thirds``.
- A node publishes what a real one says in ``/health``: ``running``,
  ``queued``, ``workers``, ``work`` (seconds of input left: the rest of the
  running jobs plus the queued ones) and ``speed``, smoothed by the node's own
  `gridnode.speed.Speed` from each finished job (absent before its first job).
- The figure is the time from a job's arrival to its end (queue + conversion:
  what the user waits for); p99 and mean over ``--arrivals`` jobs that arrive
  after a warm-up of ``--warmup-durations`` mean durations. The run goes on,
  with arrivals, until every measured job has ended. ``queue_p99`` is the part
  before ffmpeg starts.

Policies
--------
- ``random``: a uniform random node.
- ``client``: **the client's rule**, imported from gridnode/client/nodes.py:
  two distinct nodes drawn by ``Candidates`` (a chance in proportion to the
  speed in each node's registry record, the median for a node that has not
  published one yet), their live figures ranked by ``rank_checked`` (least
  expected wait, ``NodeInfo.expected_wait``). Optimistic as loadbalance.py's
  probed rows: no probe delay, no upload time.
- ``central``: one dispatcher that sees every node at once and sends each job
  to the node with the least expected wait (the same estimate, on every node,
  with each node's true speed; ties to the less busy, then at random). It is the
  reference the client's two samples are held to.

What it shows (``--seeds 5``, 2026-12-03)
-----------------------------------------
p99 time to result in seconds, N=10 / N=1000 (÷ the central dispatcher's at N=1000)::

                 thirds                    mixed (1/2/4)             uniform
    random       681 / 447 (2.14)          7183 / 601 (3.64)         331 / 326 (1.18)
    client       229 / 222 (1.06)          192 / 191 (1.16)          281 / 278 (1.01)
    central      217 / 209                 169 / 165                 279 / 276

- The goal (client ≤ 1.5 × central at N=1000) is met in every mix. Ranking by job
  count, with the pair drawn uniformly (the client until 2026-12-03), measured 247
  (1.18) with thirds and 243 (1.47) with the 1/2/4 mix; ranking by time alone 236
  and 228; drawing the pair by speed is the rest: with uniform draws both
  candidates are slow 4 times in 9 (thirds), 9 times in 25 (mixed), and such a
  job runs slowly however idle the fast nodes are.
- Random overloads the slow nodes: 0.93 of their capacity with thirds, 1.12 with
  the 1/2/4 mix (its figure there grows with the run, as at N=10).
- The central dispatcher keeps a lower p99 but not a lower mean: it sends each job
  where that job finishes first, which queues later jobs on the fast nodes.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gridnode.client.nodes import TYPICAL_INPUT_S, Candidates, NodeInfo, rank_checked
from gridnode.speed import Speed

WAIT_MIXES: dict[str, tuple[float, ...]] = {
    "thirds": (1.0, 1.0, 2.0),
    "mixed": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0),
    "uniform": (1.0,),
}
WAIT_POLICIES = ("random", "client", "central")


@dataclass(frozen=True)
class WaitParams:
    nodes: int
    mix: str = "thirds"
    seed: int = 1
    workers: int = 4
    utilization: float = 0.7
    mean_duration: float = 60.0
    arrivals: int = 40_000
    warmup_durations: float = 10.0


@dataclass(frozen=True)
class WaitResult:
    policy: str
    mix: str
    nodes: int
    workers: int
    utilization: float
    p99: float
    mean: float
    queue_p99: float
    arrivals: int
    events: int
    #: the measured jobs that ran on a node faster than the slowest
    on_fast: float


def p99(values: list[float]) -> float:
    """The nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class Pool:
    """The nodes' state, and the figures each would publish at time ``t``."""

    def __init__(self, p: WaitParams) -> None:
        mix = WAIT_MIXES[p.mix]
        self.n = p.nodes
        self.k = p.workers
        self.speed = [mix[i % len(mix)] for i in range(p.nodes)]
        self.ids = [f"s{p.seed}-n{i}" for i in range(p.nodes)]
        self.running = [0] * p.nodes
        self.finishes = [0.0] * p.nodes      # sum of the running jobs' end times
        self.queued_work = [0.0] * p.nodes   # sum of the queued jobs' durations
        self.queues: list[deque[tuple[float, int]]] = [deque() for _ in range(p.nodes)]
        self.measured = [Speed() for _ in range(p.nodes)]

    def jobs(self, i: int) -> int:
        return self.running[i] + len(self.queues[i])

    def info(self, i: int, t: float) -> NodeInfo:
        """Node i's ``/health`` load at ``t``."""
        s = self.speed[i]
        load = {"running": float(self.running[i]), "queued": float(len(self.queues[i])), "workers": float(self.k),
                "work": self.queued_work[i] + s * (self.finishes[i] - self.running[i] * t)}
        if self.measured[i].value is not None:
            load["speed"] = self.measured[i].value
        return NodeInfo(self.ids[i], f"http://{self.ids[i]}", load)

    def central_key(self, i: int) -> tuple[float, float]:
        """``NodeInfo.expected_wait`` of node i at its true speed, less the time: a node with a free
        worker waits TYPICAL / speed whenever it is asked; a full one (``running == workers``) has
        work ``queued_work + speed * (finishes - workers * t)``, so its wait is this key minus t.
        Keys that do not move with time let one heap per kind find the least wait in O(log n)."""
        s, k = self.speed[i], self.k
        busy = self.jobs(i) / k
        if self.jobs(i) < k:
            return TYPICAL_INPUT_S / s, busy
        return self.queued_work[i] / (k * s) + self.finishes[i] / k + TYPICAL_INPUT_S / s, busy


class Central:
    """The least expected wait over all nodes: a heap of free nodes and one of full nodes, stale
    entries dropped when they surface (each change of a node pushes its new key)."""

    def __init__(self, pool: Pool, rng: random.Random) -> None:
        self.pool = pool
        self.rng = rng
        self.version = [0] * pool.n
        self.free: list[tuple[float, float, float, int, int]] = []
        self.full: list[tuple[float, float, float, int, int]] = []
        for i in range(pool.n):
            self.changed(i)

    def changed(self, i: int) -> None:
        self.version[i] += 1
        key, busy = self.pool.central_key(i)
        heap = self.free if self.pool.jobs(i) < self.pool.k else self.full
        heapq.heappush(heap, (key, busy, self.rng.random(), i, self.version[i]))

    def _top(self, heap: list[tuple[float, float, float, int, int]]) -> tuple[float, float, float, int, int] | None:
        while heap and heap[0][4] != self.version[heap[0][3]]:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def choose(self, t: float) -> int:
        free, full = self._top(self.free), self._top(self.full)
        if full is None or (free is not None and (free[0], free[1]) <= (full[0] - t, full[1])):
            assert free is not None
            return free[3]
        return full[3]


def simulate_wait(p: WaitParams, policy: str) -> WaitResult:
    """One run of one policy; deterministic for ``p`` (seed included)."""
    if policy not in WAIT_POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    pool = Pool(p)
    n, k = pool.n, pool.k
    rate = p.utilization * k * sum(pool.speed) / p.mean_duration
    jobs_rng = random.Random(f"{p.seed}/{p.mix}/{n}/wait-jobs")
    choose_rng = random.Random(f"{p.seed}/{p.mix}/{n}/wait-choose/{policy}")
    central = Central(pool, choose_rng) if policy == "central" else None
    index = {x: i for i, x in enumerate(pool.ids)}
    slowest = min(pool.speed)
    warmup = p.warmup_durations * p.mean_duration

    arrived: list[float] = []           # by job number; measured jobs only (others: -1)
    waits: list[float] = []
    queue_waits: list[float] = []
    fast = 0
    departures: list[tuple[float, int, int]] = []
    pending = measured = events = 0
    drawn: Candidates | None = None
    t = 0.0
    next_arrival = jobs_rng.expovariate(rate)

    def start(i: int, d: float, job: int, now: float) -> None:
        end = now + d / pool.speed[i]
        pool.running[i] += 1
        pool.finishes[i] += end
        heapq.heappush(departures, (end, i, job))
        if arrived[job] >= 0:
            queue_waits.append(now - arrived[job])

    while measured < p.arrivals or pending:
        events += 1
        if departures and departures[0][0] < next_arrival:
            t, i, job = heapq.heappop(departures)
            pool.running[i] -= 1
            pool.finishes[i] -= t
            if arrived[job] >= 0:
                waits.append(t - arrived[job])
                pending -= 1
            if pool.queues[i]:
                d, nxt = pool.queues[i].popleft()
                pool.queued_work[i] -= d
                start(i, d, nxt, t)
        else:
            t = next_arrival
            next_arrival = t + jobs_rng.expovariate(rate)
            d = jobs_rng.expovariate(1.0 / p.mean_duration)
            job = len(arrived)
            if t > warmup and measured < p.arrivals:
                measured += 1
                pending += 1
                arrived.append(t)
            else:
                arrived.append(-1.0)
            if policy == "random":
                i = choose_rng.randrange(n)
            elif central is not None:
                i = central.choose(t)
            else:                        # the client's rule, imported
                if drawn is None:        # the registry's speeds changed: the client reads them again
                    drawn = Candidates([NodeInfo(x, f"http://{x}", {} if m.value is None else {"speed": m.value})
                                        for x, m in zip(pool.ids, pool.measured, strict=True)])
                pair = [pool.info(index[c.id], t) for c in drawn.draw(choose_rng)]
                i = index[rank_checked([(c, True) for c in pair], choose_rng)[0].id]
            if arrived[job] >= 0 and pool.speed[i] > slowest:
                fast += 1
            if pool.running[i] < k:
                start(i, d, job, t)
            else:
                pool.queues[i].append((d, job))
                pool.queued_work[i] += d
            if central is not None:
                central.changed(i)
            continue
        if pool.measured[i].value is None:
            drawn = None
        pool.measured[i].observe(pool.speed[i])  # a finished job measures its node's speed exactly
        if central is not None:
            central.changed(i)
    return WaitResult(policy, p.mix, n, k, p.utilization, p99(waits), sum(waits) / len(waits), p99(queue_waits),
                      measured, events, fast / measured)


def averaged_wait(p: WaitParams, policy: str, seeds: int = 1) -> WaitResult:
    """``simulate_wait`` over seeds ``p.seed`` .. ``p.seed + seeds - 1``: the mean of each figure."""
    runs = [simulate_wait(replace(p, seed=p.seed + k), policy) for k in range(seeds)]

    def mean(name: str) -> float:
        return sum(float(getattr(r, name)) for r in runs) / seeds

    return replace(runs[0], p99=mean("p99"), mean=mean("mean"), queue_p99=mean("queue_p99"), on_fast=mean("on_fast"),
                   arrivals=sum(r.arrivals for r in runs), events=sum(r.events for r in runs))


def run_waits(nodes: Sequence[int], mixes: Sequence[str], base: WaitParams, seeds: int = 1) -> list[WaitResult]:
    return [averaged_wait(replace(base, nodes=n, mix=mix), policy, seeds)
            for mix in mixes for n in nodes for policy in WAIT_POLICIES]


def wait_table(results: list[WaitResult]) -> str:
    """Markdown: one row per run, with the client's p99 over the central dispatcher's."""
    central = {(r.mix, r.nodes): r.p99 for r in results if r.policy == "central"}
    lines = ["| policy | speeds | N | p99 s | mean s | queue p99 s | jobs on fast nodes | p99 ÷ central's |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ref = central.get((r.mix, r.nodes))
        lines.append(f"| {r.policy} | {r.mix} | {r.nodes} | {r.p99:.1f} | {r.mean:.1f} | {r.queue_p99:.1f} "
                     f"| {r.on_fast:.0%} | {f'{r.p99 / ref:.2f}' if ref else '-'} |")
    return "\n".join(lines)
