"""
Client-side load balancing, in seeded discrete-event simulations (no network,
no sleeps, no threads) that call the client's own choice code, imported from
gridnode/client/nodes.py, not copied: ``Candidates`` (the pair to ask),
``rank_checked`` (the pair ranked on live figures) and ``two_choices`` (the
same ranking on the registry's figures). Two figures:

- ``--wait``: **the goal figure** (issue 19). How long a job waits for its
  result when instance types differ, under random choice, the client's rule
  and a central dispatcher that sees every node; p99 and mean. Model and
  policies: bench/loadwait.py.
- the default: max/mean jobs per node, the balls-into-bins figure, on load
  figures fresh or as stale as the registry makes them (below).

    .venv/bin/python bench/loadbalance.py --wait                # N=10,1000, a third of the nodes 2x (~4 s)
    .venv/bin/python bench/loadbalance.py --wait --mix thirds,mixed,uniform --seeds 5
    .venv/bin/python bench/loadbalance.py                       # max/mean: N=10,1000; R=2,30; both mixes (~10 s)
    .venv/bin/python bench/loadbalance.py --seeds 10            # each figure averaged over seeds 1-10 (~3 min)
    .venv/bin/python bench/loadbalance.py --nodes 1000 --refresh 2 --mix mixed --json

The max/mean model
------------------
- N nodes. Speeds follow a fixed, documented mix by node index: of every ten
  nodes six have speed 1, three speed 2 and one speed 4 (N=10 gives exactly
  6/3/1). A job of base duration ``d`` holds its node for ``d / speed``. Every
  node publishes the same ``workers`` figure (same instance size, different CPU
  generations), its ``work`` (seconds of input left) and its ``speed``.
- Jobs arrive as one Poisson stream for the whole pool; base durations are
  exponential with mean ``--mean-duration`` (60 s). The arrival rate is set so
  that under random choice the expected number of jobs per node in the system
  is ``--jobs-per-node`` (10): ``rate = J * N / (mean_duration * mean(1/speed))``.
  Rules that send more work to the fast nodes measure a lower mean; the table
  prints the measured mean of each run.
- Each node serves every job it holds at once (``--workers 0``, the default):
  the dynamic balls-into-bins setting (bins = nodes, balls = jobs that leave
  when done). With ``--workers K`` a node runs K jobs at a time and queues the
  rest FIFO (the "supermarket model"; max = O(log n) under random choice).
- ``--mix uniform`` gives every node speed 1: the textbook setting, in which
  random choice must land near the reference 2.2. Both mixes run by default.
- Staleness: node i publishes its figures at ``phase_i + k * R`` with a
  uniform random phase in [0, R). Clients build ``NodeInfo`` objects from the
  last published figures only. R=2 s stands for gossip on top of the 30 s
  registry heartbeat; R=30 is the heartbeat alone.
- The same job stream (arrival times and durations) and the same phases are
  used for every policy of a given N and R (common random numbers).

Policies (all sample two nodes per job)
---------------------------------------
- ``random``: a uniform random node (reads no figure).
- ``two-choices``: ``two_choices`` imported, the client's ranking on the published figures (its
  failover order ranks the same way): two distinct nodes drawn uniformly, the one with the
  least expected wait wins (``NodeInfo.expected_wait``: work ahead ÷ speed, then the job's own
  run), then the less busy, then either at random.
- ``two-choices/left``: Vöcking's asymmetric "always go left" (Vöcking 2003, "How asymmetry
  helps load balancing"), *not* the client's: the nodes are split into two halves by a hash of
  their id (``left_right``), one candidate is drawn from each half, the less busy (by count)
  wins and a tie goes to the left one. Node ids carry the seed, so the seeds also vary how the
  split falls on the speeds.
- ``two-choices/probed``: **the client's upload rule** (``GridClient._upload_order``): two
  distinct nodes drawn by ``Candidates`` (a chance in proportion to speed), each asked
  ``GET /health``, ranked by ``rank_checked`` on those figures. Modelled optimistically: no
  probe delay, and a job counts on its node from the moment it is placed. The published
  figures are not read, so the refresh period does not matter (the row says "any").
- ``two-choices/left+probed``: "always go left" on live figures.

The figure: max/mean
--------------------
The standard figure from the balls-into-bins literature (Azar, Broder, Karlin,
Upfal 1994; Berenbrink, Czumaj, Steger, Vöcking 2000; Mitzenmacher's
supermarket model for the dynamic case) is the maximum load at a typical
moment: here the time average, over the measured window, of the maximum queue
length (queued + running) over nodes, divided by the time average of the mean.
For m = 10n balls into n = 1000 bins at random the expected maximum is about
m/n + sqrt(2 (m/n) ln n) = 10 + 11.8, a ratio near 2.2; two choices give
m/n + ln ln n / ln 2 + O(1) instead. A warm-up of ``--warmup-durations`` mean
durations (from an empty pool) is not measured.

What it shows (``--seeds 10``, 2026-12-03; per-seed range in brackets)
----------------------------------------------------------------------
max/mean at R=2 s (R=30 s in brackets where it differs)::

                            mixed N=10     mixed N=1000   uniform N=10   uniform N=1000
    random                  1.757          2.516          1.514          2.148
    two-choices             1.377 (1.493)  1.898 (2.146)  1.341 (1.407)  1.770 (1.932)
    two-choices/left        1.277 (1.541)  1.500 (2.160)  1.194 (1.405)  1.375 (1.922)
    two-choices/probed      1.939          2.954          1.339          1.765
    two-choices/left+probed 1.248          1.414          1.171          1.306

- The metric reproduces the reference: random choice on identical nodes gives
  about 2.15 at N=1000. With the mixed speeds random is worse (about 2.5):
  slow nodes hold 10 / mean(1/speed) = 12.9 jobs each.
- No two-sample rule reaches 1.25 at N=1000. When the client ranked by job
  count (until 2026-12-03) its rule measured 1.245 at N=10 and 1.443 at N=1000
  (mixed; 1.312 on identical nodes), and the best rule tried, left+probed by
  count, measures 1.414. The floor is the static two-choice gap: the busiest
  node sits about ln ln n / ln 2 = 2.8 jobs above a mean of 10 (~1.28); jobs
  that leave add to it; with mixed speeds a node wins at most the arrivals it
  is sampled for, twice its even share, while a 4x node would need 2.5 times
  its share to hold as many jobs as a 1x node.
- The client now ranks by expected wait and draws its pair by speed, and this
  figure doubles (1.443 -> 2.954 at N=1000, mixed): on purpose. A job on a 4x
  node is done 4 times sooner, so the rule keeps the fast nodes fuller; the
  count of jobs is the wrong yardstick for a mixed pool, the wait is
  (``--wait``: p99 1.06 times a central dispatcher's at N=1000, against 1.18
  when ranking by count). On identical nodes it rises too (1.312 -> 1.765):
  in this model every job runs at once, so only the count matters, while the
  rule compares seconds of input left (``work``), which is what a node with
  finite workers makes a new job wait for.
- "Always go left" helps only on live figures and only at N=1000; on stale
  figures a tie lasts until the next publication, and every client sends it to
  the same (left) side.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.loadwait import WAIT_MIXES, WAIT_POLICIES, WaitParams, WaitResult, run_waits, wait_table  # noqa: E402
from gridnode.client.nodes import Candidates, NodeInfo, rank_checked, two_choices  # noqa: E402

MIXES: dict[str, tuple[float, ...]] = {
    "mixed": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0),
    "uniform": (1.0,),
}
"""Speed of node i is mix[i % len(mix)]; "mixed": 60 % at 1x, 30 % at 2x, 10 % at 4x."""

POLICIES: tuple[str, ...] = ("random", "two-choices", "two-choices/left", "two-choices/probed",
                             "two-choices/left+probed")
DEFAULT_POLICIES = POLICIES
PUBLISHED_WORKERS = 8.0
"""The workers figure every node publishes when --workers is 0 (unlimited)."""


def left_right(ids: Sequence[str]) -> tuple[list[int], list[int]]:
    """Vöcking's two groups for ``two-choices/left``, as indices into ``ids``: the ids ordered
    by a hash (blake2b) of the id, the first half "left" (it takes the odd one). A stable
    function of the membership, so independent clients agree on it."""
    def key(i: int) -> tuple[bytes, str]:
        return hashlib.blake2b(ids[i].encode(), digest_size=8).digest(), ids[i]

    ordered = sorted(range(len(ids)), key=key)
    mid = (len(ordered) + 1) // 2
    return ordered[:mid], ordered[mid:]


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
    seeds: int = 1
    """How many seeds (``seed``, ``seed + 1``, ...) the figures average; ``peak`` is their
    highest, ``arrivals`` and ``events`` their totals, the range that of max/mean."""
    max_over_mean_lo: float = 0.0
    max_over_mean_hi: float = 0.0


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
    ids = [f"s{p.seed}-n{i}" for i in range(n)]    # the seed moves the hash split of "left" as well
    index = {x: i for i, x in enumerate(ids)}
    left, right = left_right(ids)
    asymmetric = policy.startswith("two-choices/left")
    probed = policy.endswith("probed")

    running = [0] * n
    queues: list[deque[float]] = [deque() for _ in range(n)]
    ends = [0.0] * n                    # sum of the running jobs' end times
    queued_work = [0.0] * n             # sum of the queued jobs' durations

    def info(i: int, t: float) -> NodeInfo:
        """Node i's figures at t, as /health gives them (its speed measured)."""
        load = {"running": float(running[i]), "queued": float(count[i] - running[i]), "workers": pub_workers,
                "work": queued_work[i] + speed[i] * (ends[i] - running[i] * t), "speed": speed[i]}
        return NodeInfo(ids[i], f"http://{ids[i]}", load)

    drawn = Candidates([NodeInfo(x, f"http://{x}", {"speed": s}) for x, s in zip(ids, speed, strict=True)])
    count = [0] * n                     # running + queued, the measured queue length
    hist = [n]                          # hist[c]: how many nodes hold c jobs
    cur_max = 0
    total = 0
    peak = 0

    published = [info(i, 0.0) for i in range(n)]
    pub_count = [0] * n
    phases = [phase_rng.uniform(0.0, p.refresh) for _ in range(n)]
    order = sorted(range(n), key=phases.__getitem__)
    ref_k, ref_cycle = 0, 0
    next_ref = phases[order[0]]
    stale = policy in ("two-choices", "two-choices/left")

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
                    published[i] = info(i, next_ref)
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
            if policy == "random":
                node = choose_rng.randrange(n)
            elif not (asymmetric or probed):    # the product's rule, imported
                pick = two_choices(published, choose_rng)
                assert pick is not None
                node = index[pick.id]
            else:
                if asymmetric:                  # one candidate from each half
                    i = left[choose_rng.randrange(len(left))]
                    j = right[choose_rng.randrange(len(right))]
                else:                           # as the client draws them, by speed (imported)
                    i, j = (index[c.id] for c in drawn.draw(choose_rng))
                if probed:                      # the two candidates' figures, current
                    a, b = info(i, t), info(j, t)
                else:
                    a, b = published[i], published[j]
                if asymmetric:
                    node = j if b.busy < a.busy else i    # a tie: the "left" one
                else:                           # the product's ranking, imported
                    node = index[rank_checked([(a, True), (b, True)], choose_rng)[0].id]
            if workers == 0 or running[node] < workers:
                running[node] += 1
                ends[node] += t + d / speed[node]
                heapq.heappush(departures, (t + d / speed[node], node))
            else:
                queues[node].append(d)
                queued_work[node] += d
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
            ends[node] -= t
            q = queues[node]
            if q:
                d = q.popleft()
                queued_work[node] -= d
                ends[node] += t + d / speed[node]
                heapq.heappush(departures, (t + d / speed[node], node))
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
    ratio = avg_max / mean
    return Result(policy, p.mix, n, p.refresh, mean, avg_max, ratio, peak, measured, events, 1, ratio, ratio)


def reads_published(policy: str) -> bool:
    """Whether the policy reads the published (stale) figures, so depends on the refresh period."""
    return policy != "random" and not policy.endswith("probed")


def plan(nodes: Sequence[int], refreshes: Sequence[float], mixes: Sequence[str],
         policies: Sequence[str] = DEFAULT_POLICIES) -> list[tuple[str, int, float, str]]:
    """(mix, N, refresh, policy) of every run: random and the probed policies once per mix and N
    (they never read the published figures), the others once per refresh period; the speed
    variant only where speeds differ (it equals two-choices otherwise)."""
    out = []
    for mix in mixes:
        for n in nodes:
            for policy in policies:
                if policy == "two-choices/speed" and len(set(MIXES[mix])) == 1:
                    continue
                for r in refreshes if reads_published(policy) else refreshes[:1]:
                    out.append((mix, n, r, policy))
    return out


def averaged(p: Params, policy: str, seeds: int = 1) -> Result:
    """``simulate`` over seeds ``p.seed`` .. ``p.seed + seeds - 1``: the mean of each figure
    (max/mean: the mean of the per-seed ratios) and the per-seed range of max/mean."""
    runs = [simulate(replace(p, seed=p.seed + k), policy) for k in range(seeds)]
    if seeds == 1:
        return runs[0]
    ratios = [r.max_over_mean for r in runs]
    return replace(runs[0], mean=sum(r.mean for r in runs) / seeds, max=sum(r.max for r in runs) / seeds,
                   max_over_mean=sum(ratios) / seeds, peak=max(r.peak for r in runs),
                   arrivals=sum(r.arrivals for r in runs), events=sum(r.events for r in runs), seeds=seeds,
                   max_over_mean_lo=min(ratios), max_over_mean_hi=max(ratios))


def run_all(nodes: Sequence[int], refreshes: Sequence[float], mixes: Sequence[str], base: Params,
            policies: Sequence[str] = DEFAULT_POLICIES, seeds: int = 1) -> list[Result]:
    return [averaged(replace(base, nodes=n, refresh=r, mix=mix), policy, seeds)
            for mix, n, r, policy in plan(nodes, refreshes, mixes, policies)]


def table(results: list[Result]) -> str:
    """Markdown: one row per run; the rows of random and the probed policies stand for every
    refresh period."""
    rand = {(r.mix, r.nodes): r.max_over_mean for r in results if r.policy == "random"}
    spread = any(r.seeds > 1 for r in results)
    lines = ["| policy | speeds | N | refresh s | mean jobs/node | avg max | max/mean | random ÷ this |"
             + (" seeds' range |" if spread else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if spread else "")]
    for r in results:
        refresh = f"{r.refresh:g}" if reads_published(r.policy) else "any"
        ratio = f"{rand[(r.mix, r.nodes)] / r.max_over_mean:.2f}" if (r.mix, r.nodes) in rand else "-"
        lines.append(f"| {r.policy} | {r.mix} | {r.nodes} | {refresh} | {r.mean:.2f} | {r.max:.2f} "
                     f"| {r.max_over_mean:.3f} | {ratio} |"
                     + (f" {r.max_over_mean_lo:.3f}-{r.max_over_mean_hi:.3f} |" if spread else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Client choice: max/mean jobs per node, or (--wait) p99 wait.")
    ap.add_argument("--wait", action="store_true",
                    help="time to result of random, the client's rule and a central dispatcher (bench/loadwait.py)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help=f"comma-separated, of: {', '.join(POLICIES)} (default: all)")
    ap.add_argument("--nodes", default="10,1000", help="comma-separated node counts (default 10,1000)")
    ap.add_argument("--refresh", default="2,30", help="comma-separated publish periods in s (default 2,30)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1,
                    help="average each figure over this many seeds, from --seed on (default 1)")
    ap.add_argument("--jobs-per-node", type=float, default=10.0)
    ap.add_argument("--mix", help="comma-separated speed mixes: mixed, uniform (default both); --wait: thirds, "
                    "mixed, uniform (default thirds)")
    ap.add_argument("--mean-duration", type=float, default=60.0, help="mean base job duration, s")
    ap.add_argument("--workers", type=int, default=0,
                    help="jobs a node runs at once; 0 = unlimited (default; --wait: 0 = 4)")
    ap.add_argument("--utilization", type=float, default=0.7, help="--wait: share of the pool's capacity offered")
    ap.add_argument("--arrivals", type=int, default=40_000, help="measured arrivals per run")
    ap.add_argument("--warmup-durations", type=float, default=5.0, help="warm-up, in mean durations")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    try:
        nodes = [int(x) for x in a.nodes.split(",") if x]
        refreshes = [float(x) for x in a.refresh.split(",") if x]
    except ValueError:
        ap.error("--nodes and --refresh take comma-separated numbers")
    mixes = [x for x in (a.mix or ("thirds" if a.wait else "mixed,uniform")).split(",") if x]
    if a.wait:
        return _main_wait(ap, a, nodes, mixes)
    policies = [x for x in a.policies.split(",") if x]
    if not policies or any(x not in POLICIES for x in policies):
        ap.error(f"--policies takes {', '.join(POLICIES)}")
    if not nodes or min(nodes) < 2 or not refreshes or min(refreshes) <= 0:
        ap.error("need node counts >= 2 and refresh periods > 0")
    if not mixes or any(m not in MIXES for m in mixes):
        ap.error(f"--mix takes {', '.join(MIXES)}")
    if a.arrivals < 1 or a.jobs_per_node <= 0 or a.mean_duration <= 0 or a.workers < 0 or a.seeds < 1:
        ap.error("--arrivals, --jobs-per-node, --mean-duration and --seeds must be positive, --workers >= 0")
    base = Params(2, 1.0, mixes[0], a.seed, a.jobs_per_node, a.mean_duration, a.workers, a.arrivals,
                  a.warmup_durations)
    started = time.perf_counter()
    results = run_all(nodes, refreshes, mixes, base, policies, a.seeds)
    wall = time.perf_counter() - started
    if a.json:
        params = {k: v for k, v in asdict(base).items() if k not in ("nodes", "refresh", "mix")}
        params |= {"nodes": nodes, "refresh": refreshes, "mix": {m: list(MIXES[m]) for m in mixes},
                   "policies": policies, "seeds": a.seeds}
        print(json.dumps({"params": params, "results": [asdict(r) for r in results], "wall_s": round(wall, 2)}))
    else:
        seeds = f"seed {a.seed}" if a.seeds == 1 else f"seeds {a.seed}-{a.seed + a.seeds - 1} (averaged)"
        print(f"{seeds}, {a.jobs_per_node:g} jobs/node offered, mean duration {a.mean_duration:g} s, "
              f"workers {a.workers or 'unlimited'}, {a.arrivals} measured arrivals per run; "
              f"speeds: mixed = 6x1 3x2 1x4 per 10 nodes, uniform = all 1")
        print(table(results))
        print(f"\nwall {wall:.1f} s")
    return 0


def _main_wait(ap: argparse.ArgumentParser, a: argparse.Namespace, nodes: list[int], mixes: list[str]) -> int:
    if not nodes or min(nodes) < 2 or not mixes or any(m not in WAIT_MIXES for m in mixes):
        ap.error(f"--wait needs node counts >= 2 and --mix of {', '.join(WAIT_MIXES)}")
    if a.arrivals < 1 or a.mean_duration <= 0 or a.workers < 0 or a.seeds < 1 or not 0 < a.utilization < 1:
        ap.error("--arrivals, --mean-duration and --seeds must be positive, --workers >= 0, 0 < --utilization < 1")
    base = WaitParams(2, mixes[0], a.seed, a.workers or 4, a.utilization, a.mean_duration, a.arrivals,
                      2 * a.warmup_durations)
    started = time.perf_counter()
    results: list[WaitResult] = run_waits(nodes, mixes, base, a.seeds)
    wall = time.perf_counter() - started
    if a.json:
        params = {k: v for k, v in asdict(base).items() if k not in ("nodes", "mix")}
        params |= {"nodes": nodes, "mix": {m: list(WAIT_MIXES[m]) for m in mixes}, "policies": list(WAIT_POLICIES),
                   "seeds": a.seeds}
        print(json.dumps({"params": params, "wait": [asdict(r) for r in results], "wall_s": round(wall, 2)}))
    else:
        seeds = f"seed {a.seed}" if a.seeds == 1 else f"seeds {a.seed}-{a.seed + a.seeds - 1} (averaged)"
        print(f"{seeds}, {base.workers} workers a node, {base.utilization:g} of the pool's capacity offered, "
              f"mean duration {base.mean_duration:g} s, {base.arrivals} measured arrivals per run; speeds: "
              f"thirds = 1 1 2, mixed = 6x1 3x2 1x4 per 10 nodes; wait = arrival to result")
        print(wait_table(results))
        print(f"\nwall {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
