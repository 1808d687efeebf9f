"""
What a pool sends its object store, counted on the real code (issue 19): S3
requests per second by class and by prefix, the busiest prefix's share of S3's
per-prefix limits, $/day, beside the membership's messages and bytes per node
and CPU per node, for four scenarios, each goal printed PASS or FAIL.

    .venv/bin/python bench/pool_cost.py --scenario steady --nodes 10,100,1000
    .venv/bin/python bench/pool_cost.py --scenario crash --nodes 1000 --json
    .venv/bin/python bench/pool_cost.py --scenario az --nodes 1000
    .venv/bin/python bench/pool_cost.py --scenario start --nodes 1000 --joiners 500

The pool (bench/pool_sim.py): N nodes with EC2 instance ids and public DNS names,
the real SWIM machines on bench/membership_sim.py's network (1 % loss), and on
each node the real registry, job layer (its own markers' checks, adoption),
succession (node.py's wiring: the dead node's watchers act, in ring order) and
store token bucket, on one virtual clock, writing to one counting in-memory
store (bench/counting_store.py). Each node holds ``--jobs`` jobs (``--running``
of them transcoding, the rest queued), stored as the runner writes them; they
never finish. The nodes boot at random moments of the first 30 s; requests are
counted from ``--warmup`` (60 s) on, for ``--window`` s.

Scenarios and goals:

- ``steady``: no events. Goal: requests not caused by a job's own state change (here: all of
  them) <= 0.1 per node per second; with several N, the per-node rate never grows with N.
- ``crash``: one process killed 5 s into the window (its peers are refused at once). Goal: <= 20
  requests pool-wide caused by the death (the record's delete and finding its jobs: every request
  a confirmed death led to but those on the dead node's own jobs' keys, counted apart); each of
  its jobs claimed once, within 5 s of the death's first confirmation.
- ``az``: ``--vanish`` hosts (300 of 1000) vanish 5 s into the window. Goals: dead everywhere p99
  <= 20 s, no false positive, no prefix above half its S3 limits in any second from the event on,
  every orphaned job claimed exactly once.
- ``start``: ``--joiners`` nodes start 5 s into the window into the pool, whose nodes hold its
  unfinished jobs. Goals: each serves (its job layer recovered: node.py listens only then) within
  10 s; no prefix above half its limits in any second from the event on.

CPU: ``cpu_per_node`` is the whole simulator's process time over the window / (N x window s), an
upper bound; ``cpu_node_code_per_node`` the time inside the nodes' timers (registry, job layer,
succession, bucket; not the membership machines). The adopter's keeper ring is built only by a
node handing on jobs it has no room for, each with its own (real) ring.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the working tree, not an installed copy that may lag

from bench.counting_store import busiest, dollars, per_class  # noqa: E402
from bench.membership_sim import Params, _pct  # noqa: E402
from bench.pool_sim import PoolSim  # noqa: E402

SCENARIOS = ("steady", "crash", "az", "start")
#: the event comes this long into the window
EVENT_AFTER = 5.0
DAY = 86400.0


@dataclass(frozen=True)
class Run:
    scenario: str = "steady"
    nodes: int = 100
    warmup: float = 60.0
    window: float = 60.0
    loss: float = 0.01
    jobs: int = 16
    running: int = 4
    lease: float = 30.0
    heartbeat: float = 30.0
    depth: int = 1
    vanish: int = 300
    joiners: int = 500
    seed: int = 1


def simulate(r: Run) -> dict[str, Any]:
    """One scenario's run: its figures and goals."""
    end = r.warmup + r.window
    event = r.warmup + EVENT_AFTER
    joins = r.joiners if r.scenario == "start" else 0
    p = Params(nodes=r.nodes, loss=r.loss, seconds=end, warmup=r.warmup, kill=0, joins=joins, seed=r.seed,
               kill_mode="host" if r.scenario == "az" else "process")
    sim = PoolSim(p, jobs_per_node=r.jobs, running=r.running, lease=r.lease, heartbeat=r.heartbeat, depth=r.depth)
    sim.p = replace(p, joins=0)  # the joiners start when the scenario says, not at random
    sim.setup()
    sim.p, sim.set_up = p, True
    sim.start_all()
    victims: list[int] = []
    if r.scenario in ("crash", "az"):
        victims = sim.rng.sample(range(r.nodes), 1 if r.scenario == "crash" else min(r.vanish, r.nodes - 2))
        for i in victims:
            sim.kill(i, event)
    elif r.scenario == "start":
        for j in range(r.joiners):
            sim.join(r.nodes + j, event)
    sim.run_to(r.warmup)
    sim.backend.reset()
    sim.backend.log = [] if r.scenario == "crash" else None
    cpu0, wall0, node0 = time.process_time(), time.perf_counter(), sim.clock.busy_s
    sim.run_to(end)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    node_cpu = (sim.clock.busy_s - node0) * cpu / max(wall, 1e-9)  # the nodes' share of the process time
    out = figures(sim, r, cpu, node_cpu)
    goals = {"steady": steady_goals, "crash": crash_goals, "az": az_goals, "start": start_goals}[r.scenario]
    out["goals"] = goals(sim, r, out, victims)
    return out


def figures(sim: PoolSim, r: Run, cpu: float, node_cpu: float) -> dict[str, Any]:
    b, w, n = sim.backend, r.window, r.nodes
    total = b.total()
    m = sim.figures()
    return {
        "scenario": r.scenario, "nodes": n, "jobs_per_node": r.jobs, "window_s": w, "seed": r.seed,
        "requests_per_s": round(total / w, 2),
        "requests_per_node_s": round(total / (n * w), 4),
        "by_class_per_s": {k: round(v / w, 2) for k, v in per_class(b.ops).items()},
        "by_op_per_s": {op: round(c / w, 2) for op, c in sorted(b.ops.items())},
        "by_prefix_per_s": _by_prefix(b.by_prefix, w),
        "by_cause_per_s": _by_cause(b.by_cause, w),
        "busiest": busiest(b, r.warmup, r.warmup + w),
        "dollars_per_day": round(dollars(b.ops) / w * DAY, 2),
        "msgs_per_node_s": m["msgs_per_node_s"],
        "bytes_per_node_s": m["bytes_per_node_s"],
        "sync_bytes_per_node_s": m["sync_bytes_per_node_s"],
        "max_message_bytes": m["max_message_bytes"],
        "cpu_per_node": round(cpu / (n * w), 5),
        "cpu_node_code_per_node": round(node_cpu / (n * w), 5),
        "membership": {k: m[k] for k in ("dead_everywhere_median_s", "dead_everywhere_p99_s", "false_positives",
                                         "kills_not_dead_everywhere", "confirmed_true_deaths")},
    }


def _by_prefix(counts: Any, w: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (prefix, op), c in sorted(counts.items()):
        out.setdefault(prefix, {})[op] = round(c / w, 2)
    return out


def _by_cause(counts: Any, w: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for (why, _), c in counts.items():
        out[why or "other"] = out.get(why or "other", 0.0) + c
    return {k: round(v / w, 2) for k, v in sorted(out.items())}


def goal(what: str, target: str, measured: Any, ok: bool | None) -> dict[str, Any]:
    """A goal's line; ``ok`` None: not measured here (N/A)."""
    return {"goal": what, "target": target, "measured": measured,
            "verdict": "N/A" if ok is None else "PASS" if ok else "FAIL"}


def steady_goals(sim: PoolSim, r: Run, out: dict[str, Any], victims: list[int]) -> list[dict[str, Any]]:
    per = out["requests_per_node_s"]
    return [goal(f"steady, N={r.nodes}: requests not caused by a job's state change, per node per second",
                 "<= 0.1", per, per <= 0.1)]


def crash_goals(sim: PoolSim, r: Run, out: dict[str, Any], victims: list[int]) -> list[dict[str, Any]]:
    victim = sim.nodes[victims[0]].id
    own = set(sim.parts[victims[0]].jobs)
    log = sim.backend.log or []
    death = [(op, key) for _, why, op, key in log if why == "death"]
    on_own = sum(1 for _, key in death if _job_of(key) in own)
    overhead = len(death) - on_own
    confirmed = sim.confirmed_at.get(victim)
    late, unclaimed, twice = _claims(sim, own, confirmed, 5.0)
    out["crash"] = {"victim": victim, "confirmed_after_kill_s": None if confirmed is None else
                    round(confirmed - (r.warmup + EVENT_AFTER), 3),
                    "death_requests": len(death), "death_requests_on_its_jobs": on_own,
                    "death_requests_by_op": _ops(death), "jobs": len(own), "unclaimed": unclaimed,
                    "claimed_twice": twice, "claimed_late": late,
                    "claim_delays_s": sorted(round(sim.claims[j][0][0] - confirmed, 2) for j in own
                                             if j in sim.claims and confirmed is not None)}
    return [goal(f"crash, N={r.nodes}: requests for the death (record delete + finding its jobs), pool-wide",
                 "<= 20", overhead, overhead <= 20),
            goal(f"crash, N={r.nodes}: its {len(own)} jobs claimed once, within 5 s of the confirm",
                 "all", f"{len(own) - unclaimed - late - twice} of {len(own)} (unclaimed {unclaimed}, late {late}, "
                 f"twice {twice})", unclaimed == late == twice == 0 and confirmed is not None),
            goal(f"crash, N={r.nodes}: no node's inbound connection limit overflows", "none",
                 "not modelled by the simulator (it opens no connections)", None)]


def az_goals(sim: PoolSim, r: Run, out: dict[str, Any], victims: list[int]) -> list[dict[str, Any]]:
    m = out["membership"]
    own = {j for i in victims for j in sim.parts[i].jobs}
    _, unclaimed, twice = _claims(sim, own, None, math.inf)
    after = busiest(sim.backend, r.warmup + EVENT_AFTER, r.warmup + r.window)
    p99 = m["dead_everywhere_p99_s"]
    event = r.warmup + EVENT_AFTER
    delays = sorted(sim.claims[j][0][0] - event for j in own if j in sim.claims)
    out["az"] = {"vanished": len(victims), "orphaned_jobs": len(own), "unclaimed": unclaimed, "claimed_twice": twice,
                 "claimed_after_event_s": {q: _pct(delays, f) for q, f in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}
                 | {"max": round(delays[-1], 2) if delays else None},
                 "busiest_after_event": after}
    return [goal(f"az, {len(victims)} of {r.nodes} hosts vanish: dead everywhere p99", "<= 20 s",
                 f"{p99} s ({m['kills_not_dead_everywhere']} not dead everywhere by the end)",
                 p99 is not None and p99 <= 20 and m["kills_not_dead_everywhere"] == 0),
            goal("az: false positives", "0", m["false_positives"], m["false_positives"] == 0),
            goal("az: busiest prefix's busiest second, share of S3's limit", "<= 0.5",
                 f"{after['busiest_share']} ({after['busiest_prefix']})", after["busiest_share"] <= 0.5),
            goal(f"az: the {len(own)} orphaned jobs each claimed exactly once (by the end, "
                 f"{r.window - EVENT_AFTER:g} s)",
                 "all", f"unclaimed {unclaimed}, twice {twice}", unclaimed == twice == 0)]


def start_goals(sim: PoolSim, r: Run, out: dict[str, Any], victims: list[int]) -> list[dict[str, Any]]:
    joiners = [sim.nodes[r.nodes + j].id for j in range(r.joiners)]
    served = [sim.served[j] for j in joiners if j in sim.served]
    after = busiest(sim.backend, r.warmup + EVENT_AFTER, r.warmup + r.window)
    waited = r.window - EVENT_AFTER
    out["start"] = {"joiners": len(joiners), "served": len(served), "served_p99_s": _pct(served, 0.99),
                    "served_max_s": max(served) if served else None, "busiest_after_event": after,
                    "unfinished_jobs": r.nodes * r.jobs}
    slowest = f"{max(served):.2f} s" if len(served) == len(joiners) else \
        f"{len(joiners) - len(served)} of {len(joiners)} not serving after {waited:g} s"
    return [goal(f"start, {r.joiners} nodes into N={r.nodes} with {r.nodes * r.jobs:,} unfinished jobs: "
                 "each serves within", "<= 10 s", slowest, len(served) == len(joiners) and max(served) <= 10),
            goal("start: busiest prefix's busiest second, share of S3's limit", "<= 0.5",
                 f"{after['busiest_share']} ({after['busiest_prefix']})", after["busiest_share"] <= 0.5)]


def _job_of(key: str) -> str:
    """The job id a key is of (``jobs/<id>.json``, ``active/<owner>/<id>``, ``inputs/<id>/...``; an
    old-layout marker ``active/<id>`` too), "" when none: a listing of ``active/<owner>/``."""
    parts = key.split("/")
    if parts[0] == "jobs" and len(parts) == 2:
        return parts[1].removesuffix(".json")
    if parts[0] == "inputs" and len(parts) > 1:
        return parts[1]
    if parts[0] == "active" and len(parts) > 1:
        return parts[-1]
    return ""


def _ops(requests: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, _ in requests:
        out[op] = out.get(op, 0) + 1
    return out


def _claims(sim: PoolSim, jobs: set[str], since: float | None, within: float) -> tuple[int, int, int]:
    """(claimed later than ``within`` s after ``since``, never claimed, claimed more than once)."""
    late = unclaimed = twice = 0
    for j in jobs:
        got = sim.claims.get(j, [])
        if not got:
            unclaimed += 1
            continue
        twice += len(got) > 1
        if since is not None and got[0][0] - since > within:
            late += 1
    return late, unclaimed, twice


def linear_goal(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Across N (steady): the per-node rate at the largest N within 10 % of the smallest N's."""
    if len(results) < 2:
        return None
    a, z = results[0], results[-1]
    ok = z["requests_per_node_s"] <= 1.1 * a["requests_per_node_s"]
    return goal(f"steady: requests grow linearly in N (per node, N={a['nodes']} -> N={z['nodes']})",
                "never faster", f"{a['requests_per_node_s']} -> {z['requests_per_node_s']} per node per s", ok)


def show(o: dict[str, Any]) -> None:
    print(f"== {o['scenario']}, N={o['nodes']}, {o['jobs_per_node']} jobs a node, {o['window_s']:g} s measured")
    print(f"  S3 requests/s {o['requests_per_s']} ({o['requests_per_node_s']} per node); by class "
          f"{o['by_class_per_s']}; ${o['dollars_per_day']}/day")
    for prefix, ops in o["by_prefix_per_s"].items():
        print(f"  {prefix:12} {ops}")
    print(f"  by cause {o['by_cause_per_s']}")
    top = o["busiest"]
    print(f"  busiest prefix {top['busiest_prefix']}: {top['busiest_share']:.1%} of S3's limit in its busiest second")
    print(f"  messages/node/s {o['msgs_per_node_s']}, bytes/node/s {o['bytes_per_node_s']} (sync "
          f"{o['sync_bytes_per_node_s']}), CPU/node {o['cpu_per_node']:.2%} (node code "
          f"{o['cpu_node_code_per_node']:.2%})")
    for g in o["goals"]:
        print(f"  {g['verdict']}  {g['goal']}: {g['measured']} (goal {g['target']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = Run()
    ap.add_argument("--scenario", choices=SCENARIOS, default=d.scenario)
    ap.add_argument("--nodes", default="10,100", help="comma-separated pool sizes")
    for name in ("warmup", "window", "loss", "lease", "heartbeat"):
        ap.add_argument(f"--{name}", type=float, default=getattr(d, name))
    for name in ("jobs", "running", "depth", "vanish", "joiners", "seed"):
        ap.add_argument(f"--{name}", type=int, default=getattr(d, name))
    ap.add_argument("--json", action="store_true", help="one JSON object a run on stdout")
    a = ap.parse_args(argv)
    results = []
    for n in (int(x) for x in a.nodes.split(",")):
        r = Run(a.scenario, n, a.warmup, a.window, a.loss, a.jobs, a.running, a.lease, a.heartbeat, a.depth,
                a.vanish, a.joiners, a.seed)
        o = simulate(r)
        results.append(o)
        print(json.dumps(o)) if a.json else show(o)
        sys.stdout.flush()
    lin = linear_goal(results) if a.scenario == "steady" else None
    if lin is not None:
        print(json.dumps({"scenario": "steady", "linear": lin})) if a.json else \
            print(f"{lin['verdict']}  {lin['goal']}: {lin['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
