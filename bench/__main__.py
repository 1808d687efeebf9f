"""
Run every benchmark of the project and print one markdown table.

    .venv/bin/python -m bench                      # the whole suite, <= 10 min on 2 cores
    .venv/bin/python -m bench --quick              # smaller sizes: a smoke run (~2 min)
    .venv/bin/python -m bench --only pool --only membership
    .venv/bin/python -m bench --markdown bench-latest.md

Each benchmark runs as a subprocess with ``--json`` (stdout: JSON objects, one a line; stderr:
progress) under its own time budget, from the repository root, with the same python. The table
has one row per figure: ``figure | goal | measured | ratio | verdict``; the verdict is PASS or
FAIL against the goal of the issue, or ERROR when the benchmark exited non-zero, ran past its
budget or printed something this runner cannot read (the row then carries the tail of its
stderr). A benchmark that fails never stops the others. Exit status: 1 when a row is ERROR,
else 0 (a FAIL is a figure, not a breakage).

On a budget overrun the benchmark's process group gets SIGINT (the scripts unwind through their
``finally`` blocks and stop the servers they started), then SIGTERM, then SIGKILL.

``--only NAME`` takes a benchmark name (``pool``, ``ingest``, ``memory``, ``latency``,
``store_upload``, ``loadbalance``, ``encode``, ``split``, ``membership_detect``, ``membership_fp``,
``membership_scale``, ``membership_join``, ``membership_sync``, ``pool_cost_steady``,
``pool_cost_crash``) or a group (``pipeline``, ``membership``, ``pool_cost``); it is repeatable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

JSON = dict[str, Any]

#: the whole suite stops starting benchmarks, and trims their budgets, to end within this (10 min,
#: less the grace periods of a last overrun)
TOTAL_S = 580.0
GRACE_S = 10.0

#: flatness of per-node figures across N: every N within this fraction of the N=10 figure
FLAT = 0.10


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    figure: str
    goal: str
    measured: str
    ratio: str
    verdict: str  # PASS, FAIL or ERROR


@dataclass(frozen=True)
class Bench:
    """A benchmark: the command lines it runs (in order) and how to read their JSON output."""

    name: str
    group: str
    title: str  # the figure column of an ERROR row
    goal: str  # the goal column of an ERROR row
    commands: tuple[tuple[str, ...], ...]
    budget_s: float  # for all its commands together
    interpret: Callable[[list[JSON]], list[Row]]


@dataclass
class Outcome:
    """What running one command gave."""

    rc: int | None  # None: killed after its budget ran out
    stdout: str
    stderr: str
    seconds: float
    objects: list[JSON] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.rc is None


# -- running


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(argv: Sequence[str], timeout: float, *, cwd: Path = ROOT, grace: float = 10.0) -> Outcome:
    """Run argv in its own process group with stdout and stderr in files (no pipe a grandchild
    could hold open); past ``timeout`` seconds: SIGINT, SIGTERM after ``grace``, SIGKILL after
    ``grace`` / 2 more."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        rc: int | None
        try:
            rc = proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
            for signum, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace / 2), (signal.SIGKILL, None)):
                _signal_group(proc.pid, signum)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            _signal_group(proc.pid, signal.SIGKILL)  # anything left in the group
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    return Outcome(rc, stdout, stderr, seconds, parse_json_lines(stdout))


def parse_json_lines(text: str) -> list[JSON]:
    """The JSON objects of a benchmark's stdout, one a line; other lines are skipped."""
    objects: list[JSON] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return re.sub(r"\s+", " ", text.replace("|", "\\|")).strip()


def tail(text: str, lines: int = 4, chars: int = 400) -> str:
    """The last few non-empty lines of a stream, joined with ' / '."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    joined = " / ".join(kept)
    return joined if len(joined) <= chars else "..." + joined[-chars:]


def error_row(bench: Bench, why: str, stderr: str) -> Row:
    detail = tail(stderr)
    return Row(bench.title, bench.goal, f"{why}" + (f"; stderr: {detail}" if detail else "; no stderr"), "-",
               "ERROR")


def run_bench(bench: Bench, budget_s: float | None = None, *, grace: float = 10.0) -> list[Row]:
    """Run a benchmark's commands within its budget and read their output; never raises."""
    budget = bench.budget_s if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    objects: list[JSON] = []
    for argv in bench.commands:
        try:
            outcome = run_command(argv, deadline - time.monotonic(), grace=grace)
        except OSError as e:
            return [error_row(bench, f"could not start {shlex.join(argv)}: {e}", "")]
        if outcome.timed_out:
            return [error_row(bench, f"timed out after its {budget:.0f} s budget ({shlex.join(argv[1:])})",
                              outcome.stderr)]
        if outcome.rc != 0:
            return [error_row(bench, f"exit status {outcome.rc} ({shlex.join(argv[1:])})", outcome.stderr)]
        if not outcome.objects:
            return [error_row(bench, f"printed no JSON object ({shlex.join(argv[1:])})",
                              outcome.stderr or outcome.stdout)]
        objects.extend(outcome.objects)
    try:
        return bench.interpret(objects)
    except Exception as e:  # noqa: BLE001 - any misreading becomes an ERROR row, not a crash
        return [error_row(bench, f"unreadable output: {type(e).__name__}: {e}", "")]


# -- reading each benchmark's JSON


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def read_pipeline(objects: list[JSON]) -> list[Row]:
    """bench/pipeline.py --json: one object per figure, with its own title, goal and verdict."""
    rows = []
    for o in objects:
        ratio = re.sub(r";?\s*\b(PASS|FAIL)\b", "", str(o["verdict"])).strip() or "-"
        rows.append(Row(str(o["title"]), str(o["goal"]), str(o["measured"]), ratio, verdict(bool(o["pass"]))))
    return rows


def read_store_upload(objects: list[JSON]) -> list[Row]:
    o = objects[-1]
    ratio = float(o["ratio"])
    goal = float(o.get("goal", 0.9))
    return [Row(f"S3 result upload: {o['size_mb']} MiB S3Backend.put_file vs boto3 upload_file, moto on loopback",
                f">= {goal:g}",
                f"store {o['store_mb_s']} MB/s vs boto3 {o['boto3_mb_s']} MB/s ({o['rounds']} rounds)",
                f"{ratio:.3f}", verdict(ratio >= goal))]


def read_encode(objects: list[JSON]) -> list[Row]:
    """bench/encode.py --json: per source, HEVC's and AV1's saving over H.264 at equal SSIM."""
    rows = []
    for o in objects:
        base = o["h264"]
        for codec in ("hevc", "av1"):
            r = o[codec]
            how = "interpolated" if r["interpolated"] else f"crf {r['crf']}"
            rows.append(Row(f"encode: {codec} vs h264, {o['source']} {o['height']}p {o['seconds']:g} s, equal SSIM",
                            f">= {100 * r['goal']:.0f} % smaller",
                            f"{r['bytes']} B ({how}) vs {base['bytes']} B at SSIM {base['ssim']}; "
                            f"{r['fps_per_core']} vs {base['fps_per_core']} fps/core",
                            f"{100 * r['saving']:.0f} %", verdict(r["saving"] >= r["goal"])))
    if not rows:
        raise ValueError("no encode result")
    return rows


def read_split(objects: list[JSON]) -> list[Row]:
    """bench/split.py --json: a job made in chunks against the whole encode (issue 23)."""
    o = objects[-1]
    what = f"{o['seconds']:g} s {o['frame_size']}, {o['chunks']} chunks {o['parallel']} at a time"
    titles = {"wall": "split: wall, whole / chunked", "cpu": "split: CPU, chunked / whole",
              "ssim": "split: SSIM vs source, whole - chunked", "size": "split: size, chunked / whole"}
    return [Row(f"{titles[key]}, {what}", str(o[key]["goal"]), str(o[key]["measured"]), str(o[key]["ratio"]),
                verdict(bool(o[key]["pass"]))) for key in ("wall", "cpu", "ssim", "size")]


def read_loadbalance(objects: list[JSON]) -> list[Row]:
    """bench/loadbalance.py: ``--wait`` (an object with ``wait``) gives the goal rows, the client's
    p99 time to result against the central dispatcher's, per N, with a third of the nodes 2x (the
    first mix present otherwise); the default run (``results``) the max/mean rows."""
    rows: list[Row] = []
    for o in objects:
        if "wait" in o:
            rows += _read_wait(o["wait"])
    results = next((o["results"] for o in reversed(objects) if "results" in o), None)
    if results is not None:
        rows += _read_max_over_mean(results)
    if not rows:
        raise ValueError("no client-choice result")
    return rows


def _read_wait(results: list[JSON]) -> list[Row]:
    """One row per N and per mix of speeds (identical nodes left out: nothing to balance there)."""
    words = {"thirds": "a third of the nodes 2x", "mixed": "speeds 6x1 3x2 1x4", "uniform": "identical nodes"}
    mixes = list(dict.fromkeys(str(r["mix"]) for r in results))
    mixes = [m for m in mixes if m != "uniform"] or mixes
    rows = []
    for mix in mixes:
        by = {(r["policy"], int(r["nodes"])): r for r in results if r["mix"] == mix}
        for n in sorted({n for _, n in by}):
            client, central, rand = by.get(("client", n)), by.get(("central", n)), by.get(("random", n))
            if client is None or central is None:
                continue
            ratio = float(client["p99"]) / float(central["p99"])
            measured = (f"client {float(client['p99']):.0f} s, central dispatcher {float(central['p99']):.0f} s"
                        + (f", random {float(rand['p99']):.0f} s" if rand else "")
                        + f" (means {float(client['mean']):.0f} / {float(central['mean']):.0f} s)")
            rows.append(Row(f"client choice, p99 time to result ÷ a central dispatcher's, N={n}, "
                            f"{words.get(mix, mix)}", "<= 1.5", measured, f"{ratio:.3f}", verdict(ratio <= 1.5)))
    return rows


def _read_max_over_mean(results: list[JSON]) -> list[Row]:
    """The client's rule (two choices, the two loads read live: ``two-choices/probed``; plain
    ``two-choices`` when absent) vs random, for each N, with the mixed speeds (the issue's
    setting) when present; two choices on registry figures as stale as the shortest refresh
    period, and uniform speeds, are shown beside."""
    refresh = min(float(r["refresh"]) for r in results)
    mixes = {str(r["mix"]) for r in results}
    main_mix = "mixed" if "mixed" in mixes else sorted(mixes)[0]

    def find(policy: str, mix: str, n: int) -> JSON | None:
        for r in results:
            if r["policy"] == policy and r["mix"] == mix and r["nodes"] == n and (
                    policy in ("random", "two-choices/probed") or float(r["refresh"]) == refresh):
                return r
        return None

    rows = []
    for n in sorted({int(r["nodes"]) for r in results}):
        probed = find("two-choices/probed", main_mix, n)
        stale = find("two-choices", main_mix, n)
        two = probed or stale
        if two is None:
            continue
        rand = find("random", main_mix, n)
        ratio = float(two["max_over_mean"])
        rule = "two choices, loads read live" if probed else f"two choices, {refresh:g} s stale loads"
        measured = f"{rule}: max/mean {ratio:.3f} (mean {float(two['mean']):.1f} jobs/node)"
        if rand is not None:
            measured += f"; random {float(rand['max_over_mean']):.3f}"
        if probed and stale:
            measured += f"; on {refresh:g} s stale registry loads {float(stale['max_over_mean']):.3f}"
        other = [m for m in sorted(mixes) if m != main_mix]
        for m in other:
            alt = find("two-choices/probed", m, n) if probed else find("two-choices", m, n)
            if alt is not None:
                measured += f"; {m} speeds: {float(alt['max_over_mean']):.3f}"
        rows.append(Row(f"client choice, max/mean jobs per node (a count: the rule balances time), N={n}, "
                        f"{main_mix} speeds", "<= 1.25", measured,
                        f"{ratio:.3f}", verdict(ratio <= 1.25)))
    return rows


def _num(o: JSON, key: str) -> float:
    value = o[key]
    if value is None:
        raise ValueError(f"{key} is null (nothing to measure)")
    return float(value)


def read_membership_detect(objects: list[JSON]) -> list[Row]:
    """Two rows (median, p99) per simulation run: one run per kill mode."""
    rows = []
    for o in objects:
        med, p99 = _num(o, "dead_everywhere_median_s"), _num(o, "dead_everywhere_p99_s")
        missing = int(o.get("kills_not_dead_everywhere", 0))
        modes = {"process": "process killed (its connections closed, new ones refused)",
                 "host": "host vanished (silence)"}
        mode = modes.get(str(o.get("kill_mode", "host")), str(o.get("kill_mode")))
        setting = (f"{mode}, N={o['nodes']}, {float(o['loss']) * 100:g}% loss, {o['kills']} kills, "
                   f"{o['seconds']:g} s simulated")
        extra = (f"detect_first {o.get('detect_first_s')} s, max {o.get('dead_everywhere_max_s')} s, "
                 f"false positives {o.get('false_positives')}")
        if missing:
            extra += f"; {missing} kill(s) never dead everywhere"
        rows += [
            Row(f"membership: kill -> dead everywhere, median ({setting})", "<= 5 s", f"{med:.2f} s; {extra}",
                f"{med / 5.0:.2f}", verdict(med <= 5.0 and not missing)),
            Row(f"membership: kill -> dead everywhere, p99 ({setting})", "<= 8 s", f"{p99:.2f} s",
                f"{p99 / 8.0:.2f}", verdict(p99 <= 8.0 and not missing)),
        ]
    return rows


def read_membership_fp(objects: list[JSON]) -> list[Row]:
    o = objects[-1]
    fp = int(o["false_positives"])
    seconds = float(o["seconds"])
    note = "" if seconds >= 3600 else f" (shorter than the issue's hour: {seconds:g} s simulated)"
    return [Row(f"membership: live nodes declared dead, N={o['nodes']}, {float(o['loss']) * 100:g}% loss, "
                f"{float(o['stall_fraction']) * 100:g}% stalling{note}",
                "= 0", f"{fp} false positives; {o.get('false_suspicions')} false suspicions refuted, "
                f"{o.get('confirmed_false_deaths')} confirmed false deaths",
                f"{fp}", verdict(fp == 0))]


def read_membership_scale(objects: list[JSON]) -> list[Row]:
    """Steady-state msgs and sync bytes per node per second across N (one object per N)."""
    by_n = sorted(objects, key=lambda o: int(o["nodes"]))
    if len(by_n) < 2:
        raise ValueError("need runs at two or more N")
    ns = [int(o["nodes"]) for o in by_n]
    msgs = [_num(o, "msgs_per_node_s") for o in by_n]
    sync = [_num(o, "sync_bytes_per_node_s") for o in by_n]
    spread = max(abs(m / msgs[0] - 1) for m in msgs)
    ok_msgs = max(msgs) <= 4.0 and spread <= FLAT
    listing = ", ".join(f"N={n}: {m:.2f}" for n, m in zip(ns, msgs, strict=True))
    growth = sync[-1] / sync[0] if sync[0] else float("inf")
    sync_listing = ", ".join(f"N={n}: {s:.1f}" for n, s in zip(ns, sync, strict=True))
    ml = by_n[-1].get("memberlist", {}).get("sync_bytes_per_node_s")
    ml_note = f"; memberlist full push-pull at N={ns[-1]}: {ml} B/s" if ml is not None else ""
    loss = float(by_n[0]["loss"]) * 100
    rows = [
        Row(f"membership: messages per node per second, steady state, {loss:g}% loss",
            f"<= 4 and flat (every N within ±{FLAT:.0%} of N={ns[0]})",
            f"{listing}; largest deviation {spread:.1%}", f"{max(msgs) / 4.0:.2f}", verdict(ok_msgs)),
        Row(f"membership: sync bytes per node per second, N={ns[0]} vs N={ns[-1]}",
            f"not growing with N (N={ns[-1]} ÷ N={ns[0]} <= {1 + FLAT:.2f})",
            f"{sync_listing} B/s{ml_note}", f"{growth:.2f}", verdict(growth <= 1 + FLAT)),
    ]
    if all("bytes_per_node_s" in o for o in by_n):
        # every message as the wire frames it (EC2 ids, DNS names), not the syncs alone
        every = [_num(o, "bytes_per_node_s") for o in by_n]
        grown = every[-1] / every[0] if every[0] else float("inf")
        listing = ", ".join(f"N={n}: {b:.0f}" for n, b in zip(ns, every, strict=True))
        rows.append(Row(f"membership: bytes per node per second, all messages, N={ns[0]} vs N={ns[-1]}",
                        f"not growing with N (N={ns[-1]} ÷ N={ns[0]} <= {1 + FLAT:.2f})", f"{listing} B/s",
                        f"{grown:.2f}", verdict(grown <= 1 + FLAT)))
    if all("max_message_bytes" in o for o in by_n):
        largest = max(int(o["max_message_bytes"]) for o in by_n)
        over = sum(int(o.get("oversized_messages", 0)) for o in by_n)
        limit = int(by_n[0].get("max_message_limit", 60_000))
        rows.append(Row("membership: largest message payload, every N", f"<= {limit:,} bytes, none over",
                        f"{largest:,} bytes; {over} over the limit", f"{largest / limit:.2f}",
                        verdict(largest <= limit and over == 0)))
    return rows


def read_membership_sync(objects: list[JSON]) -> list[Row]:
    """bench/membership_sync.py: one row per scenario but the whole table (the comparison)."""
    whole = next((o for o in objects if o["scenario"] == "whole"), None)
    note = f"; the whole table as one message: {int(whole['bytes']):,} B" if whole is not None else ""
    rows = []
    for o in objects:
        if o["scenario"] == "whole":
            continue
        ok = bool(o["converged"]) and not int(o["over_limit"])
        largest, limit = int(o["max_message_bytes"]), int(o["limit"])
        rows.append(Row(f"membership: anti-entropy, {o['scenario']}, N={o['nodes']}, EC2 ids and DNS names",
                        f"level after; every message <= {limit:,} B",
                        f"{'level' if o['converged'] else 'NOT level'}; {o['messages']} messages, "
                        f"{int(o['bytes']):,} B, largest {largest:,} B{note}", f"{largest / limit:.2f}", verdict(ok)))
    return rows


def read_membership_join(objects: list[JSON]) -> list[Row]:
    o = objects[-1]
    t = _num(o, "join_converged_s")
    return [Row(f"membership: join -> known alive by 99.9% of the others (slowest of {o['joins']} joins), "
                f"N={o['nodes']}, {float(o['loss']) * 100:g}% loss",
                "<= 2.5 s", f"{t:.2f} s", f"{t / 2.5:.2f}", verdict(t <= 2.5))]


def read_pool_cost(objects: list[JSON]) -> list[Row]:
    """bench/pool_cost.py --json: a row per goal of each run (N/A ones left out), the steady
    rows carrying the run's requests, dollars and busiest prefix."""
    rows: list[Row] = []
    for o in objects:
        goals = [o["linear"]] if "linear" in o else o.get("goals", [])
        extra = ""
        if "requests_per_s" in o:
            top = o["busiest"]
            extra = (f" ({o['requests_per_s']:g} req/s, ${o['dollars_per_day']:g}/day, busiest {top['busiest_prefix']} "
                     f"{float(top['busiest_share']):.1%} of its S3 limit)")
        for g in goals:
            if g["verdict"] in ("PASS", "FAIL"):
                rows.append(Row(str(g["goal"]), str(g["target"]), f"{g['measured']}{extra}", "-", str(g["verdict"])))
    if not rows:
        raise ValueError("no pool-cost result")
    return rows


# -- the suite


def suite(quick: bool = False, python: str = sys.executable) -> list[Bench]:
    """Every benchmark with its sizes and budget. Full: about 6-7 min on 2 cores; quick: under 2 min.
    The budgets are each benchmark's own limit; the suite's limit (``TOTAL_S``) trims them."""
    pipe = (python, "bench/pipeline.py", "--json") + (("--quick",) if quick else ())
    # (name, budget full, budget quick): defaults take pool ~70 s, ingest ~25 s, memory ~30 s,
    # latency ~15 s on 2 cores (quick: 20, 5, 10, 5 s)
    pipeline_parts = (("pool", "pool overhead (node vs xargs)", "<= 1.03", 150, 60),
                      ("ingest", "upload ingest vs cp", ">= 0.6", 60, 40),
                      ("memory", "node RSS growth while receiving", "<= 64 MiB", 60, 40),
                      ("latency", "upload complete -> ffmpeg spawned", "<= 50 ms", 45, 30))
    benches = [Bench(name, "pipeline", title, goal, (pipe + ("--only", name),), quick_s if quick else full_s,
                     read_pipeline)
               for name, title, goal, full_s, quick_s in pipeline_parts]
    size, rounds = ("128", "2") if quick else ("1024", "3")
    benches.append(Bench("store_upload", "store", "S3 result upload vs boto3", ">= 0.9",
                         ((python, "bench/store_upload.py", "--json", "--size-mb", size, "--rounds", rounds,
                           "--max-seconds", "30" if quick else "75"),),
                         60 if quick else 120, read_store_upload))
    lb = (python, "bench/loadbalance.py", "--json", "--nodes", "10,1000") + (("--arrivals", "10000") if quick else ())
    # Max/mean jobs per node is no longer a goal (a rule that balances time keeps fast nodes
    # fuller on purpose: bench/README.md); `bench/loadbalance.py` still prints it.
    benches.append(Bench("loadbalance", "loadbalance", "client choice: p99 wait", "<= 1.5",
                         (lb + ("--wait", "--mix", "thirds,mixed"),), 60, read_loadbalance))
    sim = (python, "bench/membership_sim.py", "--json", "--seed", "1")
    big = "300" if quick else "1000"
    benches += [
        Bench("membership_detect", "membership", "membership: kill -> dead everywhere", "<= 5 s / <= 8 s",
              tuple(sim + ("--nodes", big, "--loss", "0.01", "--kill", "5", "--seconds", "90", "--kill-mode", mode)
                    for mode in ("process", "host")),
              60, read_membership_detect),
        Bench("membership_fp", "membership", "membership: false positives, 5% loss + 5% stalls", "= 0",
              (sim + ("--nodes", big, "--loss", "0.05", "--stall-fraction", "0.05",
                      "--seconds", "120" if quick else "600"),),
              60 if quick else 220, read_membership_fp),
        Bench("membership_scale", "membership", "membership: msgs and bytes per node across N",
              "<= 4 msgs/s, flat; sync not growing",
              tuple(sim + ("--nodes", str(n), "--loss", "0.01", "--joins", "0", "--seconds", "60")
                    for n in ((10, 100, 300) if quick else (10, 100, 1000))),
              40, read_membership_scale),
        Bench("membership_join", "membership", "membership: join converged, 5% loss", "<= 2.5 s",
              (sim + ("--nodes", big, "--loss", "0.05", "--joins", "5", "--seconds", "90"),),
              40, read_membership_join),
        Bench("membership_sync", "membership", "membership: anti-entropy between tables of N",
              "level; <= 60,000 B a message",
              ((python, "bench/membership_sync.py", "--json", "--nodes", "1000" if quick else "5000"),),
              30, read_membership_sync),
    ]
    # the real registry and job layer on a simulated pool (N=1000 runs take minutes: bench/README.md)
    cost = (python, "bench/pool_cost.py", "--json", "--window", "30")
    benches += [
        Bench("pool_cost_steady", "pool_cost", "S3 requests per node per second, steady state", "<= 0.1",
              (cost + ("--scenario", "steady", "--nodes", "10,100" if quick else "10,100,300"),), 120,
              read_pool_cost),
        Bench("pool_cost_crash", "pool_cost", "S3 requests for one crashed process", "<= 20",
              (cost + ("--scenario", "crash", "--nodes", "100" if quick else "300"),), 90, read_pool_cost),
    ]
    # Small sources: the 10 s at 1080p takes the better part of an hour on 2 cores
    # (bench/encode.py alone, --1080, for those figures).
    enc = (python, "bench/encode.py", "--json") + (("--height", "240", "--seconds", "2", "--sources", "testsrc2")
                                                   if quick else ("--height", "360", "--seconds", "4"))
    benches.append(Bench("encode", "encode", "encode: HEVC and AV1 vs H.264 at equal SSIM", ">= 25 % / >= 35 %",
                         (enc,), 40 if quick else 120, read_encode))
    # The 4 min at 720p takes several minutes a side on 2 cores (bench/split.py alone).
    split = (python, "bench/split.py", "--json") + (("--seconds", "20", "--size", "320x240", "--chunk-seconds", "5")
                                                    if quick else ("--seconds", "60", "--size", "640x360",
                                                                   "--chunk-seconds", "15"))
    benches.append(Bench("split", "split", "split: chunked vs whole encode", ">= 1.8x wall, <= 1.05x CPU",
                         (split,), 60 if quick else 150, read_split))
    return benches


def select(benches: list[Bench], only: Sequence[str] | None) -> list[Bench]:
    if not only:
        return benches
    known = {b.name for b in benches} | {b.group for b in benches}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return [b for b in benches if b.name in only or b.group in only]


def table(rows: Sequence[Row]) -> str:
    lines = ["| figure | goal | measured | ratio | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {cell(r.figure)} | {cell(r.goal)} | {cell(r.measured)} | {cell(r.ratio)} | {r.verdict} |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def header(command: str, now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return (f"{now:%Y-%m-%d %H:%M} UTC · nproc {nproc()} · CPU \"{cpu_model()}\" · "
            f"command: `{command}`")


def command_line() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, "-m", "bench", *sys.argv[1:]]
    return shlex.join(argv)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def unignore_sigint() -> None:
    """Started in the background (sh's `&`), this process ignores SIGINT, and so would every
    benchmark it starts: the SIGINT of an overrun would not reach them, and they would lose
    the chance to clean up before the SIGTERM. A handler is not inherited, so they start clean."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs: a smoke run")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help="run only this benchmark or group (repeatable)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the header and table to FILE")
    ap.add_argument("--total-seconds", type=float, default=TOTAL_S,
                    help=f"the whole suite's time limit (default {TOTAL_S:.0f})")
    args = ap.parse_args(argv)
    try:
        benches = select(suite(args.quick), args.only)
    except ValueError as e:
        ap.error(str(e))
    unignore_sigint()
    command = command_line()
    began = time.monotonic()
    rows: list[Row] = []
    for bench in benches:
        left = began + args.total_seconds - time.monotonic()
        if left < 5:
            rows.append(error_row(bench, f"not run: the suite's {args.total_seconds:.0f} s limit was reached", ""))
            continue
        budget = min(bench.budget_s, left)
        say(f"{bench.name} (budget {budget:.0f} s) ...")
        t = time.monotonic()
        got = run_bench(bench, budget, grace=GRACE_S)
        say(f"{bench.name}: {', '.join(r.verdict for r in got)} in {time.monotonic() - t:.0f} s")
        rows.extend(got)
    text = f"{header(command)}\n\n{table(rows)}\n\nwall time {time.monotonic() - began:.0f} s\n"
    print(text, end="")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 1 if any(r.verdict == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
