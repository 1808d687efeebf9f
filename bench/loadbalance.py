"""
Client-side load balancing: uniform random choice against the power of two
choices (``two_choices`` from gridnode/client/nodes.py, imported, not copied),
when clients only see load figures as stale as the registry and gossip make
them. A seeded discrete-event simulation: no network, no sleeps, no threads.

    .venv/bin/python bench/loadbalance.py                  # N=10,1000; R=2,30; both mixes
    .venv/bin/python bench/loadbalance.py --nodes 1000 --refresh 2 --mix mixed --json

The model
---------
- N nodes. Speeds follow a fixed, documented mix by node index: of every ten
  nodes six have speed 1, three speed 2 and one speed 4 (N=10 gives exactly
  6/3/1). A job of base duration ``d`` holds its node for ``d / speed``. Every
  node publishes the same ``workers`` figure (same instance size, different CPU
  generations), so ``NodeInfo.busy`` compares job counts.
- Jobs arrive as one Poisson stream for the whole pool; base durations are
  exponential with mean ``--mean-duration`` (60 s). The arrival rate is set so
  that under random choice the expected number of jobs per node in the system
  is ``--jobs-per-node`` (10): ``rate = J * N / (mean_duration * mean(1/speed))``.
  Two choices sends more work to the fast nodes, so its measured mean is lower;
  the table prints the measured mean of each run.
- Each node serves every job it holds at once (``--workers 0``, the default):
  the dynamic balls-into-bins setting (bins = nodes, balls = jobs that leave
  when done). With ``--workers K`` a node runs K jobs at a time and queues the
  rest FIFO (the "supermarket model"); see "Finite workers" below.
- ``--mix uniform`` gives every node speed 1: the textbook setting, in which
  random choice must land near the reference 2.2. Both mixes run by default.
- Staleness: node i publishes ``{"running", "queued", "workers"}`` at
  ``phase_i + k * R`` with a uniform random phase in [0, R). Clients build
  ``NodeInfo`` objects from the last published figures only. R=2 s stands for
  gossip on top of the 30 s registry heartbeat; R=30 is the heartbeat alone.
- The same job stream (arrival times and durations) and the same phases are
  used for every policy of a given N and R (common random numbers).

The figure: max/mean
--------------------
The standard figure from the balls-into-bins literature (Azar, Broder, Karlin,
Upfal 1994; Berenbrink, Czumaj, Steger, Vöcking 2000 for the heavily loaded
case m >> n; Mitzenmacher's supermarket model for the dynamic one) is the
maximum load at a typical moment: the expectation of max over nodes, taken in
equilibrium. Here that is the time average, over the measured window, of the
maximum queue length (queued + running) over nodes, divided by the time average
of the mean queue length over nodes. The peak over the whole window is not
used: it grows with the length of the window, so it measures the run, not the
policy. For m = 10n balls into n = 1000 bins at random the expected maximum is
about m/n + sqrt(2 (m/n) ln n) = 10 + 11.8, a ratio near 2.2 (the issue's
reference figure); in equilibrium the dynamic model with unlimited workers has
Poisson(10) node loads under random choice, which gives the same figure. Two
choices give m/n + ln ln n / ln 2 + O(1) instead. A warm-up of
``--warmup-durations`` mean durations (from an empty pool) is not measured.

Speed-aware variant
-------------------
``two-choices/speed`` is the same ``two_choices`` function fed with
``SpeedNodeInfo``, a ``NodeInfo`` whose ``busy`` divides by ``workers * speed``
(``speed`` a figure the node would publish in its load record, 1.0 when
absent). It is labelled as a variant; gridnode/client/nodes.py is unchanged.
It does not help this figure: balancing jobs per unit of speed deliberately
piles jobs on the fast nodes, which raises the maximum queue length (it is the
right rule for waiting time on nodes that queue, not for max/mean).

What it shows (seed 1, defaults; figures move by a few hundredths with the seed)
---------------------------------------------------------------------------------
- The metric reproduces the reference: random choice on identical nodes gives
  about 2.1-2.2 at N=1000 (about 1.5 at N=10). With the mixed speeds random
  is worse (about 2.5): slow nodes hold 10 / mean(1/speed) = 12.9 jobs each.
- Two choices reach the goal (<= 1.25) only at N=10 on identical nodes with the
  2 s refresh (about 1.19; 1.27 with the speed mix, 1.25 there with fresh
  figures). At N=1000 they do not, even with fresh figures on identical nodes (about 1.31
  at R=0.01 s): the gap max - mean of d=2 is about ln ln n / ln 2 = 2.8 jobs,
  which on a mean of 10 is already 1.28. The 2 s staleness adds about 0.06 and
  the speed mix about 0.1 more; with R=30 every client herds onto the nodes
  that looked idle at the last refresh and two choices are barely better than
  random. No change to ``busy`` alone reaches 1.25 at N=1000.

The horizon is a fixed number of measured arrivals (``--arrivals``), so the
event count is bounded whatever N is; ``two_choices`` scans the whole node list
on every call, which is most of the running time at N=1000.

Finite workers
--------------
With ``--workers K`` a node's queue has a geometric tail once all K workers are
busy (the supermarket model: max = O(log n) under random choice, against
O(log log n)); at N=1000 and K=16 random choice measures about 2.9 on identical
nodes. Small K with the default load overloads the slow nodes under random
choice. The defaults keep the issue's setting.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gridnode.client.nodes import NodeInfo, two_choices  # noqa: E402

MIXES: dict[str, tuple[float, ...]] = {
    "mixed": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0),
    "uniform": (1.0,),
}
"""Speed of node i is mix[i % len(mix)]; "mixed": 60 % at 1x, 30 % at 2x, 10 % at 4x."""

POLICIES: tuple[str, ...] = ("random", "two-choices", "two-choices/speed")
PUBLISHED_WORKERS = 8.0
"""The workers figure every node publishes when --workers is 0 (unlimited)."""


@dataclass(frozen=True)
class SpeedNodeInfo(NodeInfo):
    """The proposed change, as a variant: jobs per unit of capacity, workers * speed."""

    @property
    def busy(self) -> float:
        workers = self.load.get("workers") or 1.0
        speed = self.load.get("speed") or 1.0
        return (self.load.get("running", 0.0) + self.load.get("queued", 0.0)) / (workers * speed)


@dataclass(frozen=True)
class Params:
    nodes: int
    refresh: float
    mix: str = "mixed"
    seed: int = 1
    jobs_per_node: float = 10.0
    mean_duration: float = 60.0
    workers: int = 0
    arrivals: int = 40_000
    warmup_durations: float = 5.0


@dataclass(frozen=True)
class Result:
    policy: str
    mix: str
    nodes: int
    refresh: float
    mean: float
    max: float
    max_over_mean: float
    peak: int
    arrivals: int
    events: int


def speeds(n: int, mix: str = "mixed") -> list[float]:
    """The documented speed mix for n nodes."""
    m = MIXES[mix]
    return [m[i % len(m)] for i in range(n)]


def arrival_rate(p: Params) -> float:
    """Jobs per second that give ``jobs_per_node`` jobs per node under random choice."""
    inv = sum(1.0 / s for s in speeds(p.nodes, p.mix)) / p.nodes
    return p.jobs_per_node * p.nodes / (p.mean_duration * inv)


def simulate(p: Params, policy: str) -> Result:
    """One run of one policy; deterministic for ``p`` (seed included)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    n = p.nodes
    speed = speeds(n, p.mix)
    rate = arrival_rate(p)
    warmup = p.warmup_durations * p.mean_duration
    jobs_rng = random.Random(f"{p.seed}/{p.mix}/{n}/jobs")
    phase_rng = random.Random(f"{p.seed}/{p.mix}/{n}/phases")
    choose_rng = random.Random(f"{p.seed}/{p.mix}/{n}/{p.refresh}/choose/{policy}")

    workers = p.workers
    pub_workers = float(workers) if workers else PUBLISHED_WORKERS
    make: Callable[..., NodeInfo] = SpeedNodeInfo if policy == "two-choices/speed" else NodeInfo
    ids = [f"n{i}" for i in range(n)]

    def info(i: int, running: int, queued: int) -> NodeInfo:
        load = {"running": float(running), "queued": float(queued), "workers": pub_workers}
        if make is SpeedNodeInfo:
            load["speed"] = speed[i]
        return make(ids[i], f"http://{ids[i]}", load)

    running = [0] * n
    queues: list[deque[float]] = [deque() for _ in range(n)]
    count = [0] * n                     # running + queued, the measured queue length
    hist = [n]                          # hist[c]: how many nodes hold c jobs
    cur_max = 0
    total = 0
    peak = 0

    published = [info(i, 0, 0) for i in range(n)]
    pub_count = [0] * n
    phases = [phase_rng.uniform(0.0, p.refresh) for _ in range(n)]
    order = sorted(range(n), key=phases.__getitem__)
    ref_k, ref_cycle = 0, 0
    next_ref = phases[order[0]]
    stale = policy != "random"

    departures: list[tuple[float, int]] = []
    t_last = 0.0
    area_max = area_total = 0.0
    measured = events = 0
    next_arrival = jobs_rng.expovariate(rate)
    mean_d = p.mean_duration

    while measured < p.arrivals:
        if departures and departures[0][0] < next_arrival:
            t, node = departures[0]
            arrival = False
        else:
            t, node = next_arrival, -1
            arrival = True
        if t > warmup:                  # integrate the step functions up to t
            dt = t - (t_last if t_last > warmup else warmup)
            area_max += cur_max * dt
            area_total += total * dt
        t_last = t
        if stale:                       # every publication due by t, in phase order
            while next_ref <= t:
                i = order[ref_k]
                if count[i] != pub_count[i]:
                    pub_count[i] = count[i]
                    published[i] = info(i, running[i], count[i] - running[i])
                ref_k += 1
                if ref_k == n:
                    ref_k = 0
                    ref_cycle += 1
                next_ref = phases[order[ref_k]] + ref_cycle * p.refresh
        events += 1
        if arrival:
            d = jobs_rng.expovariate(1.0 / mean_d)
            next_arrival = t + jobs_rng.expovariate(rate)
            if t > warmup:
                measured += 1
            if stale:
                pick = two_choices(published, choose_rng)
                assert pick is not None
                node = int(pick.id[1:])
            else:
                node = choose_rng.randrange(n)
            if workers == 0 or running[node] < workers:
                running[node] += 1
                heapq.heappush(departures, (t + d / speed[node], node))
            else:
                queues[node].append(d)
            c = count[node]
            hist[c] -= 1
            c += 1
            count[node] = c
            if c == len(hist):
                hist.append(0)
            hist[c] += 1
            total += 1
            if c > cur_max:
                cur_max = c
                if t > warmup and c > peak:
                    peak = c
        else:
            heapq.heappop(departures)
            q = queues[node]
            if q:
                heapq.heappush(departures, (t + q.popleft() / speed[node], node))
            else:
                running[node] -= 1
            c = count[node]
            hist[c] -= 1
            if c == cur_max and hist[c] == 0:
                cur_max -= 1
            c -= 1
            count[node] = c
            hist[c] += 1
            total -= 1

    span = t_last - warmup
    mean = area_total / span / n
    avg_max = area_max / span
    return Result(policy, p.mix, n, p.refresh, mean, avg_max, avg_max / mean, peak, measured, events)


def plan(nodes: Sequence[int], refreshes: Sequence[float], mixes: Sequence[str]) -> list[tuple[str, int, float, str]]:
    """(mix, N, refresh, policy) of every run: random once per mix and N (it never reads the
    published figures), the speed variant only where speeds differ (it equals two-choices otherwise)."""
    out = []
    for mix in mixes:
        for n in nodes:
            out.append((mix, n, refreshes[0], "random"))
            for r in refreshes:
                out.append((mix, n, r, "two-choices"))
                if len(set(MIXES[mix])) > 1:
                    out.append((mix, n, r, "two-choices/speed"))
    return out


def run_all(nodes: Sequence[int], refreshes: Sequence[float], mixes: Sequence[str], base: Params) -> list[Result]:
    return [simulate(replace(base, nodes=n, refresh=r, mix=mix), policy)
            for mix, n, r, policy in plan(nodes, refreshes, mixes)]


def table(results: list[Result]) -> str:
    """Markdown: one row per run; random's row stands for every refresh period."""
    rand = {(r.mix, r.nodes): r.max_over_mean for r in results if r.policy == "random"}
    lines = ["| policy | speeds | N | refresh s | mean jobs/node | avg max | max/mean | random ÷ this |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        refresh = "any" if r.policy == "random" else f"{r.refresh:g}"
        ratio = rand[(r.mix, r.nodes)] / r.max_over_mean
        lines.append(f"| {r.policy} | {r.mix} | {r.nodes} | {refresh} | {r.mean:.2f} | {r.max:.2f} "
                     f"| {r.max_over_mean:.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Random choice against two choices on stale load figures.")
    ap.add_argument("--nodes", default="10,1000", help="comma-separated node counts (default 10,1000)")
    ap.add_argument("--refresh", default="2,30", help="comma-separated publish periods in s (default 2,30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs-per-node", type=float, default=10.0)
    ap.add_argument("--mix", default="mixed,uniform", help="comma-separated speed mixes: mixed, uniform")
    ap.add_argument("--mean-duration", type=float, default=60.0, help="mean base job duration, s")
    ap.add_argument("--workers", type=int, default=0, help="jobs a node runs at once; 0 = unlimited (default)")
    ap.add_argument("--arrivals", type=int, default=40_000, help="measured arrivals per run")
    ap.add_argument("--warmup-durations", type=float, default=5.0, help="warm-up, in mean durations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    try:
        nodes = [int(x) for x in a.nodes.split(",") if x]
        refreshes = [float(x) for x in a.refresh.split(",") if x]
    except ValueError:
        ap.error("--nodes and --refresh take comma-separated numbers")
    mixes = [x for x in a.mix.split(",") if x]
    if not nodes or min(nodes) < 2 or not refreshes or min(refreshes) <= 0:
        ap.error("need node counts >= 2 and refresh periods > 0")
    if not mixes or any(m not in MIXES for m in mixes):
        ap.error(f"--mix takes {', '.join(MIXES)}")
    if a.arrivals < 1 or a.jobs_per_node <= 0 or a.mean_duration <= 0 or a.workers < 0:
        ap.error("--arrivals, --jobs-per-node and --mean-duration must be positive, --workers >= 0")
    base = Params(2, 1.0, mixes[0], a.seed, a.jobs_per_node, a.mean_duration, a.workers, a.arrivals,
                  a.warmup_durations)
    started = time.perf_counter()
    results = run_all(nodes, refreshes, mixes, base)
    wall = time.perf_counter() - started
    if a.json:
        params = {k: v for k, v in asdict(base).items() if k not in ("nodes", "refresh", "mix")}
        params |= {"nodes": nodes, "refresh": refreshes, "mix": {m: list(MIXES[m]) for m in mixes}}
        print(json.dumps({"params": params, "results": [asdict(r) for r in results], "wall_s": round(wall, 2)}))
    else:
        print(f"seed {a.seed}, {a.jobs_per_node:g} jobs/node offered, mean duration {a.mean_duration:g} s, "
              f"workers {a.workers or 'unlimited'}, {a.arrivals} measured arrivals per run; "
              f"speeds: mixed = 6x1 3x2 1x4 per 10 nodes, uniform = all 1")
        print(table(results))
        print(f"\nwall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
