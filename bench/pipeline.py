"""
The pipeline's four figures, each measured side by side in one run (the two
sides alternate, round after round; the figure is the ratio of the medians).
Nothing is compared with a number measured at another time.

    .venv/bin/python bench/pipeline.py                  # all four, defaults (~2-3 min on 2 cores)
    .venv/bin/python bench/pipeline.py --quick          # smaller sizes (~30 s)
    .venv/bin/python bench/pipeline.py --only ingest --json
    .venv/bin/python bench/pipeline.py --only pool --ffprobe /opt/ffmpeg-static/ffprobe

Figures (see bench/README.md for exactly what is timed):

  pool      8 jobs of a 10 s 720p clip through a node with --workers 2 (POST /jobs,
            mp4-720p, until /health shows no job) vs the same ffmpeg argv run by
            `xargs -P 2`; node wall / xargs wall, goal <= 1.03. A third side runs
            the node's own two children per job (sandboxed ffprobe, then sandboxed
            ffmpeg) under the same xargs: the overhead of a node that cost nothing
  ingest    a 1 GiB POST /jobs on loopback (until the client handed the last byte
            to the kernel) vs `cp` of the file on the same filesystem;
            cp time / upload time (throughput ratio), goal >= 0.6
  memory    peak RSS growth of the node's twistd process over its idle baseline
            while it receives a 2 GiB upload, goal <= 64 MiB; reference: a stock
            twisted.web Site receiving the same body
  latency   upload complete -> ffmpeg spawned, probe excluded, median of ~10
            uploads of a small clip, from the node's JSON log, goal <= 50 ms

Run it with the virtualenv's python (the node is `.venv/bin/twistd gridnode`,
the installed package, and the ffmpeg argv comes from the same package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _nodes
from _nodes import ServerProcess, memory, post_file, reaped_cpu, wait_idle

from gridnode.config import cpu_count
from gridnode.media.ffmpeg import NICENESS, transcode_command
from gridnode.media.probe import parse_probe, probe_argv, probe_command
from gridnode.media.sandbox import Sandbox, resolve_user, sandboxed_argv, share_with
from gridnode.media.templates import parse_presets

MiB = 1024 * 1024
FIGURES = ("pool", "ingest", "memory", "latency")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Figure:
    name: str
    title: str
    goal: str
    measured: str
    ratio: str
    passed: bool | None
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"figure": self.name, "title": self.title, "goal": self.goal, "measured": self.measured,
                "verdict": self.ratio, "pass": self.passed, **self.data}


def median(values: list[float]) -> float:
    return statistics.median(values)


def make_clip(path: Path, seconds: float, size: str) -> None:
    """A test clip: lavfi testsrc2 + sine, H.264 (veryfast) + AAC in mp4."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
         str(path)], check=True)


def make_body(path: Path, size: int) -> None:
    """Random-ish bytes (an 8 MiB random block, rotated per block): not a video."""
    block = os.urandom(8 * MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[4097:] + block[:4097]


def node_args(args: argparse.Namespace) -> list[str]:
    """Options every node of the run gets besides the figure's own."""
    extra = ["--ffmpeg-user", args.ffmpeg_user] if args.ffmpeg_user else []
    return extra + ["--sandbox", args.sandbox] + (["--ffprobe", args.ffprobe] if args.ffprobe != "ffprobe" else [])


def drop_dirty() -> None:
    """Untimed: write back what the last step left dirty, so it does not tax the next one."""
    os.sync()


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


# -- 1. pool overhead


def _process_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and of the children it reaped (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "(comm)": state is field 3; utime, stime, cutime, cstime are fields 14-17
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def fig_pool(tmp: Path, args: argparse.Namespace) -> Figure:
    clip = tmp / "clip720.mp4"
    make_clip(clip, args.clip_seconds, "1280x720")
    probed = subprocess.run(probe_argv(args.ffprobe, str(clip)), capture_output=True, check=True).stdout
    info = parse_probe(probed, size=clip.stat().st_size)
    presets = parse_presets("mp4-720p")
    # What gridnode.converter.Converter passes: each ffmpeg gets its share of the cores.
    threads = max(1, cpu_count() // args.workers)
    user = resolve_user(args.ffmpeg_user or "auto")  # whom the node runs its children as
    sandbox = Sandbox(boxed=args.sandbox == "bwrap", user=user)  # and how (--sandbox)
    jobs = args.jobs

    def bare(out: Path) -> str:
        argv, _ = transcode_command(info, str(clip), str(out), presets, threads=threads)  # not sandboxed
        # At the node's priority (it starts ffmpeg at nice NICENESS): on a shared machine a
        # niced ffmpeg loses more CPU to other work than an un-niced one would.
        return f"exec nice -n {NICENESS} " + shlex.join(argv) + " >/dev/null\n"

    def children(out: Path) -> str:
        # Exactly the two children the node starts per job, sandbox and limits included:
        # what the node's overhead would be if the node itself cost nothing.
        probe = shlex.join(probe_command(args.ffprobe, str(clip), sandbox=sandbox))
        transcode = shlex.join(sandboxed_argv(*transcode_command(info, str(clip), str(out), presets,
                                                                 threads=threads, sandbox=sandbox)))
        return f"{probe} >/dev/null && exec {transcode} >/dev/null\n"

    def by_xargs(k: int, script_for: Callable[[Path], str], name: str, cpu: list[float]) -> float:
        folder = tmp / f"{name}{k}"
        folder.mkdir()
        share_with(user, str(folder))
        scripts = []
        for i in range(jobs):
            out = folder / f"job{i}"
            out.mkdir()
            share_with(user, str(out))
            script = folder / f"job{i}.sh"
            script.write_text(script_for(out))
            scripts.append(str(script))
        cpu0 = reaped_cpu()
        began = time.monotonic()
        proc = subprocess.Popen(["xargs", "-P", str(args.workers), "-n", "1", "sh"], stdin=subprocess.PIPE,
                                start_new_session=True)
        try:
            proc.communicate("\n".join(scripts).encode(), timeout=600)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        took = time.monotonic() - began
        if proc.returncode != 0:
            raise RuntimeError(f"xargs {name} failed ({proc.returncode})")
        cpu.append(reaped_cpu() - cpu0)
        shutil.rmtree(folder)
        return took

    def by_node(server: ServerProcess) -> float:
        cpu0 = _process_cpu(server.pid)
        # The end is the node's own record of its last job becoming done (``updated``, its
        # time.time() on this machine), not when a poll saw it: polling every 50 ms would cost
        # the node CPU (a /health answer each time) and add up to 50 ms of granularity.
        began = time.time()
        ids = []
        for _ in range(jobs):
            p = post_file(server.host, server.port, "/jobs?presets=mp4-720p&name=clip.mp4", clip)
            if p.status != 201:
                raise RuntimeError(f"upload refused: {p.status} {p.body}")
            ids.append(p.body["id"])
        wait_idle(server.url, every=0.5)
        ended = began
        for job in ids:
            _, record = _nodes.get_json(f"{server.url}/jobs/{job}")
            if record.get("state") != "done":
                raise RuntimeError(f"job {job} ended {record.get('state')}: {record.get('error')}")
            ended = max(ended, float(record["updated"]))
        node_cpu.append(_process_cpu(server.pid) - cpu0)
        return ended - began

    node_cpu: list[float] = []
    xargs_cpu: list[float] = []
    children_cpu: list[float] = []
    node_s: list[float] = []
    xargs_s: list[float] = []
    children_s: list[float] = []
    with _nodes.node(tmp / "node-pool", "--workers", str(args.workers), "--min-free", "0", *node_args(args)) as server:
        # Untimed: one job first. A node is a long-running server; its first job also pays for
        # code it imports on first use and threads it starts then, which is not the pool's cost.
        post_file(server.host, server.port, "/jobs?presets=mp4-720p&name=warm-up.mp4", clip)
        wait_idle(server.url, every=0.5)
        sides: dict[str, tuple[Callable[[int], float], list[float]]] = {
            "node": (lambda r: by_node(server), node_s),
            "xargs": (lambda r: by_xargs(r, bare, "xargs", xargs_cpu), xargs_s),
            "children": (lambda r: by_xargs(r, children, "children", children_cpu), children_s)}
        names = list(sides)
        for r in range(args.pool_rounds):
            first = r % len(names)
            for side in names[first:] + names[:first]:  # each side goes first in turn
                run, times = sides[side]
                times.append(run(r))
                say(f"  pool round {r + 1}: {side} {times[-1]:.2f}s")
    n, x, f = median(node_s), median(xargs_s), median(children_s)
    ratio = n / x
    per_job = (n - x) * args.workers / jobs
    # Per round (node and xargs back to back): how far the machine's noise moves the ratio.
    paired = [a / b for a, b in zip(node_s, xargs_s, strict=True)]
    # CPU seconds (user + system) are far less moved by other work on the machine than wall
    # time: the node process with every child it reaped (ffprobe, ffmpeg) vs xargs' children.
    nc, xc, fc = median(node_cpu), median(xargs_cpu), median(children_cpu)
    cpu_ratio = nc / xc
    # Wall time on a shared machine: flag a verdict the rounds do not agree on.
    noisy = " (noisy: rounds disagree)" if min(paired) <= 1.03 < max(paired) else ""
    return Figure(
        "pool", f"pool overhead: {jobs} jobs of a {args.clip_seconds:g} s 720p clip, --workers {args.workers}",
        "<= 1.03",
        f"node {n:.2f} s vs xargs -P {args.workers} {x:.2f} s; overhead {per_job:+.3f} s/job (threads={threads}); "
        f"per-round ratios {min(paired):.2f}..{max(paired):.2f}; CPU node {nc:.1f} s vs xargs {xc:.1f} s "
        f"= {cpu_ratio:.3f}; the node's two children alone (sandboxed ffprobe + ffmpeg under xargs) {f:.2f} s "
        f"= {f / x:.3f} (CPU {fc / xc:.3f}), the node vs them {n / f:.3f} (CPU {nc / fc:.3f})",
        f"{ratio:.3f} {'PASS' if ratio <= 1.03 else 'FAIL'}{noisy} (CPU {cpu_ratio:.3f})", ratio <= 1.03,
        {"node_s": node_s, "xargs_s": xargs_s, "node_median_s": n, "xargs_median_s": x, "ratio": ratio,
         "paired_ratios": paired, "noisy": bool(noisy), "node_cpu_s": node_cpu, "xargs_cpu_s": xargs_cpu,
         "cpu_ratio": cpu_ratio, "children_s": children_s, "children_cpu_s": children_cpu, "children_ratio": f / x,
         "children_cpu_ratio": fc / xc, "node_vs_children": n / f, "node_vs_children_cpu": nc / fc,
         "overhead_s_per_job": per_job, "jobs": jobs, "workers": args.workers, "threads": threads,
         "clip_seconds": args.clip_seconds})


# -- 2. upload ingest


def fig_ingest(tmp: Path, args: argparse.Namespace) -> Figure:
    size = args.ingest_mib * MiB
    body = tmp / "body.bin"
    make_body(body, size)
    copy = tmp / "copy.bin"
    up_s: list[float] = []
    answer_s: list[float] = []
    cp_s: list[float] = []
    cat_s: list[float] = []
    bare_s: list[float] = []
    limit = str(args.ingest_mib + 64)
    with _nodes.node(tmp / "node-ingest", "--workers", "1", "--max-upload", limit, "--min-free", "0",
                     *node_args(args)) as server, _nodes.bare_server(tmp / "bare-ingest") as bare:
        # Warm up both paths (untimed).
        post_file(server.host, server.port, "/jobs?name=warmup.bin", body, size=8 * MiB)
        post_file(bare.host, bare.port, "/", body, size=8 * MiB)
        drop_dirty()
        for r in range(args.ingest_rounds):
            order = ["upload", "cp", "cat", "bare"] if r % 2 == 0 else ["bare", "cat", "cp", "upload"]
            for side in order:
                if side == "bare":
                    # the ceiling of a Python receiver: no HTTP parser, no hash (bench/_nodes.py)
                    p = post_file(bare.host, bare.port, "/", body)
                    if p.status != 200 or p.body.get("received") != size:
                        raise RuntimeError(f"bare receiver: {p.status} {p.body}")
                    bare_s.append(p.sent - p.started)
                    say(f"  ingest round {r + 1}: bare receiver {bare_s[-1]:.2f}s")
                elif side == "upload":
                    p = post_file(server.host, server.port, "/jobs?name=body.bin", body)
                    if p.status != 422 or p.body.get("error", {}).get("code") != "not_a_video":
                        raise RuntimeError(f"expected 422 not_a_video, got {p.status} {p.body}")
                    up_s.append(p.sent - p.started)
                    answer_s.append(p.answered - p.started)
                    say(f"  ingest round {r + 1}: upload {up_s[-1]:.2f}s (answer {answer_s[-1]:.2f}s)")
                elif side == "cp":
                    # coreutils 9 cp: copy_file_range, an in-kernel page-cache copy
                    began = time.monotonic()
                    subprocess.run(["cp", str(body), str(copy)], check=True)
                    cp_s.append(time.monotonic() - began)
                    copy.unlink()
                    say(f"  ingest round {r + 1}: cp {cp_s[-1]:.2f}s")
                else:
                    # a copy through user space (read/write, 128 KiB): the second reference
                    began = time.monotonic()
                    with open(body, "rb") as src, open(copy, "wb") as dst:
                        subprocess.run(["cat"], stdin=src, stdout=dst, check=True)
                    cat_s.append(time.monotonic() - began)
                    copy.unlink()
                    say(f"  ingest round {r + 1}: cat {cat_s[-1]:.2f}s")
                drop_dirty()
    body.unlink()
    u, a, c, k, b = median(up_s), median(answer_s), median(cp_s), median(cat_s), median(bare_s)
    ratio = c / u
    return Figure(
        "ingest", f"upload ingest: {args.ingest_mib} MiB POST /jobs on loopback vs cp",
        ">= 0.6",
        f"upload {size / u / MiB:.0f} MiB/s ({u:.2f} s; answer after {a:.2f} s) vs cp {size / c / MiB:.0f} MiB/s "
        f"({c:.2f} s); cat > file {size / k / MiB:.0f} MiB/s ({k:.2f} s); bare Python receiver (no HTTP, "
        f"no hash) {size / b / MiB:.0f} MiB/s ({b:.2f} s) = {c / b:.2f} of cp",
        f"{ratio:.2f} {'PASS' if ratio >= 0.6 else 'FAIL'} (vs cat: {k / u:.2f}; vs bare receiver: {b / u:.2f})",
        ratio >= 0.6,
        {"upload_s": up_s, "answer_s": answer_s, "cp_s": cp_s, "cat_s": cat_s, "bare_s": bare_s,
         "upload_median_s": u, "answer_median_s": a, "cp_median_s": c, "cat_median_s": k, "bare_median_s": b,
         "ratio": ratio, "ratio_vs_cat": k / u, "ratio_vs_bare": b / u, "bare_vs_cp": c / b,
         "bytes": size, "client": "python socket.sendfile"})


# -- 3. memory while receiving


def _peak_growth(server: ServerProcess, body: Path, size: int, target: str) -> tuple[int, int, int]:
    """(baseline RSS, peak RSS, answer status) of ``server`` receiving ``size`` bytes."""
    # Warm the code paths with a small body first, then settle.
    post_file(server.host, server.port, target, body, size=MiB)
    time.sleep(0.5)
    baseline, hwm0 = memory(server.pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, memory(server.pid)[0])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        p = post_file(server.host, server.port, target, body, size=size)
    finally:
        stop.set()
        sampler.join()
    rss, hwm = memory(server.pid)
    if hwm > hwm0:  # the high-water mark moved during the upload: it saw a peak we may have missed
        peak = max(peak, hwm)
    return baseline, max(peak, rss), p.status


def fig_memory(tmp: Path, args: argparse.Namespace) -> Figure:
    size = args.memory_mib * MiB
    chunk = tmp / "chunk.bin"
    make_body(chunk, min(size, 256 * MiB))  # sent repeatedly to make up the body
    grid: list[int] = []
    stock: list[int] = []
    for r in range(args.memory_rounds):
        order = ["gridnode", "stock"] if r % 2 == 0 else ["stock", "gridnode"]
        for side in order:
            folder = tmp / f"mem-{side}-{r}"
            if side == "gridnode":
                server = _nodes.node(folder, "--workers", "1", "--max-upload", str(args.memory_mib + 64),
                                     "--min-free", "0", *node_args(args))
            else:
                server = _nodes.stock_server(folder)
            with server:
                base, peak, status = _peak_growth(server, chunk, size, "/jobs?name=body.bin")
            shutil.rmtree(folder, ignore_errors=True)
            (grid if side == "gridnode" else stock).append(peak - base)
            say(f"  memory round {r + 1}: {side} baseline {mib(base)}, peak {mib(peak)}, growth "
                f"{mib(peak - base)} (answer {status})")
            drop_dirty()
    chunk.unlink()
    g, s = median([float(x) for x in grid]), median([float(x) for x in stock])
    ratio = g / s if s > 0 else None
    ok = g <= 64 * MiB
    return Figure(
        "memory", f"node RSS growth receiving a {args.memory_mib} MiB upload",
        "<= 64 MiB",
        f"gridnode +{mib(g)} vs stock twisted.web Site +{mib(s)}",
        f"{'n/a (stock grew 0)' if ratio is None else f'{ratio:.2f}x'} stock; {'PASS' if ok else 'FAIL'}", ok,
        {"gridnode_growth_bytes": grid, "stock_growth_bytes": stock, "gridnode_median_bytes": g,
         "stock_median_bytes": s, "ratio": ratio, "bytes": size})


# -- 4. upload complete -> ffmpeg spawned


def _events(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                out.append(event)
    return out


def _marks(events: list[dict[str, Any]], job: str) -> dict[str, float]:
    """Times (time.time()) of the job's logged steps that exist today."""
    marks: dict[str, float] = {}
    for e in events:
        message = str(e.get("message", ""))
        t = e.get("time")
        if not isinstance(t, float):
            continue
        if e.get("job") == job:
            for step, prefix in (("received", f"job {job} received"), ("probed", f"job {job} probed"),
                                 ("accepted", f"job {job} accepted"), ("pool_queued", f"job {job} queued"),
                                 ("pool_started", f"job {job} started")):
                if message.startswith(prefix):
                    marks.setdefault(step, t)
                    if step == "probed" and isinstance(e.get("elapsed"), (int, float)):
                        marks.setdefault("probe_elapsed", float(e["elapsed"]))
        if e.get("label") == f"ffmpeg {job}" and " started as pid " in message:
            marks.setdefault("spawned", t)
    return marks


def fig_latency(tmp: Path, args: argparse.Namespace) -> Figure:
    clip = tmp / "small.mp4"
    make_clip(clip, 2, "320x240")
    argv = probe_argv(args.ffprobe, str(clip))
    rows: list[dict[str, float]] = []
    probe_alone: list[float] = []
    with _nodes.node(tmp / "node-latency", "--workers", str(args.workers), "--min-free", "0", *node_args(args),
                     json_log=True) as server:
        target = "/jobs?presets=mp4-720p&name=small.mp4"
        for i in range(args.latency_uploads + 1):
            p = post_file(server.host, server.port, target, clip)
            if p.status != 201:
                raise RuntimeError(f"upload refused: {p.status} {p.body}")
            job = p.body["id"]
            wait_idle(server.url, every=0.05)
            _, record = _nodes.get_json(f"{server.url}/jobs/{job}")
            if record.get("state") != "done":
                raise RuntimeError(f"job {job} ended {record.get('state')}: {record.get('error')}")
            # The reference, alternating with the uploads: ffprobe of the same clip on its own.
            began = time.monotonic()
            subprocess.run(argv, capture_output=True, check=True)
            took = time.monotonic() - began
            if i == 0:
                continue  # warm-up
            probe_alone.append(took)
            deadline = time.monotonic() + 10
            while True:
                marks = _marks(_events(server.log), job)
                if "spawned" in marks or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            if "accepted" not in marks or "spawned" not in marks:
                raise RuntimeError(f"job {job}: log lines missing ({sorted(marks)}); see {server.log}")
            marks["sent"] = p.wall_started + (p.sent - p.started)
            rows.append(marks)
    spawn = [m["spawned"] - m["accepted"] for m in rows]
    store = [m["pool_queued"] - m["accepted"] for m in rows if "pool_queued" in m]
    start = [m["spawned"] - m["pool_queued"] for m in rows if "pool_queued" in m]
    through = [m["spawned"] - m["sent"] for m in rows]
    if all("received" in m and "probe_elapsed" in m for m in rows):
        # With the log lines proposed in bench/README.md: body complete -> spawned, less the probe.
        primary = [m["spawned"] - m["received"] - m["probe_elapsed"] for m in rows]
        label = "body complete -> ffmpeg spawned, minus the probe's own time (node log)"
    else:
        primary = spawn
        label = ("'accepted' (after probe) -> ffmpeg spawned (node log; the node logs no 'body complete' "
                 "event yet, so body complete -> probe start is not in it)")
    med = median(primary)
    pa = median(probe_alone)
    ok = med <= 0.050
    return Figure(
        "latency", f"upload complete -> ffmpeg spawned, probe excluded ({len(rows)} uploads)",
        "<= 50 ms",
        f"{med * 1000:.1f} ms: {label}; of which accepted -> pool queued {median(store) * 1000:.1f} ms, "
        f"pool queued -> spawned {median(start) * 1000:.1f} ms; client sent -> spawned (incl. probe) "
        f"{median(through) * 1000:.1f} ms, ffprobe alone {pa * 1000:.1f} ms",
        f"absolute (no side-by-side reference) {'PASS' if ok else 'FAIL'}", ok,
        {"median_s": med, "what": label, "primary_s": primary, "accepted_to_spawned_s": spawn,
         "accepted_to_pool_queued_s": store, "pool_queued_to_spawned_s": start, "sent_to_spawned_s": through,
         "ffprobe_alone_s": probe_alone})


# -- main


def table(figures: list[Figure]) -> str:
    lines = ["| figure | goal | measured | ratio/verdict |", "|---|---|---|---|"]
    for f in figures:
        lines.append(f"| {f.title} | {f.goal} | {f.measured} | {f.ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=FIGURES, action="append", help="run only this figure (repeatable)")
    ap.add_argument("--json", action="store_true", help="one JSON object per figure instead of the table")
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    ap.add_argument("--tmp", default=None, help="folder for temporary files (default: the system's)")
    ap.add_argument("--workers", type=int, default=2, help="node --workers and xargs -P (default 2)")
    ap.add_argument("--ffmpeg-user", default=None,
                    help="pass --ffmpeg-user to every node (default: the node's own default)")
    ap.add_argument("--sandbox", choices=("bwrap", "weak"), default="bwrap",
                    help="--sandbox of every node and of the children side (default bwrap, the node's default)")
    ap.add_argument("--ffprobe", default="ffprobe",
                    help="the ffprobe binary of every node and of the children side (default: ffprobe on PATH)")
    ap.add_argument("--jobs", type=int, default=None, help="pool: jobs per side and round (default 8; quick 4)")
    ap.add_argument("--clip-seconds", type=float, default=None, help="pool: clip length (default 10; quick 5)")
    ap.add_argument("--pool-rounds", type=int, default=None, help="pool: rounds (default 3; quick 2)")
    ap.add_argument("--ingest-mib", type=int, default=None, help="ingest: body size (default 1024; quick 256)")
    ap.add_argument("--ingest-rounds", type=int, default=None, help="ingest: rounds (default 5; quick 3)")
    ap.add_argument("--memory-mib", type=int, default=None, help="memory: body size (default 2048; quick 512)")
    ap.add_argument("--memory-rounds", type=int, default=None, help="memory: rounds (default 2; quick 2)")
    ap.add_argument("--latency-uploads", type=int, default=None, help="latency: uploads (default 10; quick 5)")
    args = ap.parse_args(argv)
    defaults = {"jobs": (8, 4), "clip_seconds": (10.0, 5.0), "pool_rounds": (3, 2), "ingest_mib": (1024, 256),
                "ingest_rounds": (5, 3), "memory_mib": (2048, 512), "memory_rounds": (2, 2),
                "latency_uploads": (10, 5)}
    for key, (normal, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else normal)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers

    signal.signal(signal.SIGTERM, terminated)
    runners: dict[str, Callable[[Path, argparse.Namespace], Figure]] = {
        "pool": fig_pool, "ingest": fig_ingest, "memory": fig_memory, "latency": fig_latency}
    chosen = args.only or list(FIGURES)
    tmp = Path(tempfile.mkdtemp(prefix="gridnode-bench-", dir=args.tmp))
    # The node runs ffmpeg and ffprobe as an unprivileged user (--ffmpeg-user auto), who must
    # reach the work folders inside.
    tmp.chmod(0o711)
    figures: list[Figure] = []
    began = time.monotonic()
    try:
        for name in FIGURES:
            if name not in chosen:
                continue
            say(f"{name} ...")
            t = time.monotonic()
            figure = runners[name](tmp, args)
            figure.data["seconds"] = round(time.monotonic() - t, 1)
            figures.append(figure)
            if args.json:
                print(json.dumps(figure.as_json()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.json:
        print(table(figures))
    say(f"total {time.monotonic() - began:.0f} s; nproc {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
