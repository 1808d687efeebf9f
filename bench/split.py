"""
Split-and-stitch against the whole encode, side by side in one run on one machine (issue 23):
one long input made by one ffmpeg (the node's one argv, ``presets.build_argv``) against the
same job made in chunks, ``--parallel`` at a time, plus its audio pass and stitch
(``gridnode.media.split.SplitJob``, the argv the node will run). Each encoder gets the thread
share a node with ``--workers`` = ``--parallel`` gives it (``cpu_count // workers``, at least 1).

    .venv/bin/python bench/split.py                      # 4 min at 1280x720, 2 at a time
    .venv/bin/python bench/split.py --seconds 40 --size 640x360 --json   # a quick run

Figures (the ratio of the medians over ``--rounds``, the two sides alternating, the order
flipped each round):

  wall   whole wall time / chunked wall time                    goal >= 1.8 (2 at a time)
  cpu    chunked CPU / whole CPU (children's rusage: every ffmpeg)  goal <= 1.05
  ssim   SSIM against the source of each (ffmpeg's ssim "All"; the source at the output's rate
         and size): chunked within 0.002 of whole
  size   chunked bytes / whole bytes                            goal within 3 %

The source is made once (lavfi testsrc2 + sine, x264 veryfast CRF 12 + AAC), so the figures
carry no generator; ``--keep DIR`` keeps the files.

``--node``: through real nodes instead, as a user sees it: the same upload to a ``twistd -n
gridnode`` with ``--workers`` = ``--parallel`` and ``--chunk-over off`` and to one with
``--chunk-over 0 --chunk-seconds`` (each its own file store), one job at a time, the sides
alternating; wall is from the upload's first byte to the job's last record (``updated``)::

  node   whole node's wall / chunked node's wall               goal >= 1.8 (--workers 2)

    .venv/bin/python bench/split.py --node --seconds 20 --size 640x360 --chunk-seconds 5   # a quick run

``--pool``: the issue's second 2-core goal, "two single-worker nodes vs one": a node with
``--workers 1`` pinned to core 0 (``taskset``: it sizes its encoder by its affinity, as a 1-core
machine would) making the upload whole, against a pool of two such nodes, on cores 0 and 1,
sharing a ``file:`` store, with ``--chunk-over 0``. Each pool round starts when the pool's
``nodes.json`` lists both nodes idle, as an upload to an idle pool does::

  node   one node's wall / the pool's wall                    goal >= 1.8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gridnode import keys  # noqa: E402
from gridnode.media import chunks  # noqa: E402
from gridnode.media.presets import build_argv  # noqa: E402
from gridnode.media.probe import ProbeResult, parse_probe, probe_argv  # noqa: E402
from gridnode.media.split import SplitJob, Task  # noqa: E402
from gridnode.media.templates import Catalog  # noqa: E402

GOALS = {"wall": 1.8, "cpu": 1.05, "ssim": 0.002, "size": 0.03, "node": 1.8}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_source(path: Path, seconds: float, size: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size={size}:rate=30:duration={seconds:g}", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds:g}", "-c:v", "libx264", "-preset", "veryfast",
                    "-crf", "12", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True)


def quiet(argv: list[str]) -> list[str]:
    """The node's argv without its progress pipe (nothing reads it here)."""
    out = list(argv)
    i = out.index("-progress")
    del out[i:i + 2]
    return out


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def whole(probe: ProbeResult, src: Path, out: Path, presets: list[Any], threads: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = quiet(build_argv("ffmpeg", probe, str(src), str(out), presets, threads=threads))
    c0, t0 = cpu(), time.monotonic()
    subprocess.run(argv, check=True)
    return time.monotonic() - t0, cpu() - c0


def chunked(probe: ProbeResult, src: Path, work: Path, presets: list[Any], threads: int, parallel: int,
            chunk_seconds: float) -> tuple[float, float, int]:
    from twisted.internet import threads as twisted_threads

    shutil.rmtree(work, ignore_errors=True)
    plan = chunks.plan(probe, presets, chunk_seconds=chunk_seconds, chunk_over=0)

    def run_task(t: Task, _progress: Any) -> Any:
        return twisted_threads.deferToThread(subprocess.run, quiet(t.argv), check=True)

    job = SplitJob(plan, probe, str(src), presets, str(work / "work"), str(work / "out"), run_task,
                   threads=threads, parallel=parallel)
    c0, t0 = cpu(), time.monotonic()
    _run(job)
    return time.monotonic() - t0, cpu() - c0, len(plan.chunks)


def _run(job: SplitJob) -> None:
    """Run the job's Deferreds on a reactor of their own, once (the reactor cannot restart: each
    round runs in a child Python, see ``side``)."""
    from twisted.internet import reactor

    failure: list[Any] = []

    def start() -> None:
        d = job.run()
        d.addErrback(failure.append)
        d.addBoth(lambda _r: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if failure:
        failure[0].raiseException()


def ssim(made: Path, src: Path, probe: ProbeResult) -> float:
    assert probe.rate is not None
    out = subprocess.run(["ffmpeg", "-nostdin", "-i", str(made), "-i", str(src), "-lavfi",
                          f"[1:v]fps={probe.rate.numerator}/{probe.rate.denominator},scale={probe.display_width}:"
                          f"{probe.display_height},format=yuv420p[ref];[0:v][ref]ssim", "-f", "null", "-"],
                         capture_output=True, text=True, check=True).stderr
    m = re.search(r"All:([0-9.]+)", out)
    if m is None:
        raise RuntimeError("ffmpeg's ssim printed no figure")
    return float(m.group(1))


def side(args: argparse.Namespace, which: str, src: Path, work: Path) -> dict[str, Any]:
    """One side of one round in a child Python (a Twisted reactor runs once per process)."""
    out = subprocess.run([sys.executable, __file__, "--side", which, "--source", str(src), "--work", str(work),
                          "--parallel", str(args.parallel), "--chunk-seconds", str(args.chunk_seconds),
                          "--presets", args.presets], check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_side(args: argparse.Namespace) -> None:
    src = Path(args.source)
    probe = parse_probe(subprocess.run(probe_argv("ffprobe", str(src)), capture_output=True, check=True).stdout,
                        size=src.stat().st_size)
    presets = Catalog().parse(args.presets)
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    work = Path(args.work)
    if args.side == "whole":
        wall, used = whole(probe, src, work / "out", presets, threads)
        n = 1
    else:
        wall, used, n = chunked(probe, src, work, presets, threads, args.parallel, args.chunk_seconds)
    made = work / "out" / presets[0].outputs(probe)[0].name
    print(json.dumps({"wall": wall, "cpu": used, "chunks": n, "bytes": made.stat().st_size,
                      "ssim": ssim(made, src, probe)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="the input's length (default 240)")
    parser.add_argument("--size", default="1280x720", help="the input's size (default 1280x720)")
    parser.add_argument("--parallel", type=int, default=2, help="chunks at once, and the node's workers (default 2)")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="default 30")
    parser.add_argument("--presets", default="mp4-720p", help="the job's presets (default mp4-720p)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--keep", help="a folder to keep the source and outputs in")
    parser.add_argument("--node", action="store_true", help="through real nodes, --workers = --parallel")
    parser.add_argument("--pool", action="store_true",
                        help="through real nodes: two 1-core single-worker nodes chunking vs one making it whole")
    parser.add_argument("--side", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return 0
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gridnode-split-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        src = folder / "source.mp4"
        log(f"making a {args.seconds:g} s {args.size} source")
        make_source(src, args.seconds, args.size)
        if args.node or args.pool:
            result = node_rounds(args, src, folder)
            print(json.dumps(result) if args.json else
                  f"node  {result['node']['measured']:>40}  ratio {result['node']['ratio']}  "
                  f"{'PASS' if result['node']['pass'] else 'FAIL'}")
            return 0
        samples: dict[str, list[dict[str, Any]]] = {"whole": [], "chunked": []}
        for r in range(args.rounds):
            order = ["whole", "chunked"] if r % 2 == 0 else ["chunked", "whole"]
            for which in order:
                log(f"round {r + 1}: {which}")
                samples[which].append(side(args, which, src, folder / which))
        result = summary(args, samples)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("wall", "cpu", "ssim", "size"):
            print(f"{key:5} {result[key]['measured']:>40}  ratio {result[key]['ratio']}  "
                  f"{'PASS' if result[key]['pass'] else 'FAIL'}")
    return 0


def node_rounds(args: argparse.Namespace, src: Path, folder: Path) -> dict[str, Any]:
    """``--node``: the same upload to a node that makes it whole and to one that chunks it.
    ``--pool``: to one single-worker node on one core making it whole, and to a pool of two such
    nodes, each on a core of its own, sharing a ``file:`` store, that chunks it."""
    import _nodes  # bench/, on the path when this file runs as a script

    folder.chmod(0o755)  # a root node's children run as nobody and pass through it to the work folders
    sides = {"whole": ["--chunk-over", "off"],
             "chunked": ["--chunk-over", "0", "--chunk-seconds", str(args.chunk_seconds)]}
    with contextlib.ExitStack() as stack:
        def started(name: str, which: str, store: Path, cpus: str | None, workers: int) -> Any:
            home = folder / name
            home.mkdir(exist_ok=True)
            return stack.enter_context(_nodes.node(
                home, "--node-id", name, "--store", f"file:{store}", "--workers", str(workers), "--min-free", "0",
                *sides[which], cpus=cpus))

        if args.pool:
            servers = {"whole": started("one", "whole", folder / "store-one", "0", 1)}
            servers["chunked"] = started("pa", "chunked", folder / "store-pool", "0", 1)
            started("pb", "chunked", folder / "store-pool", "1", 1)
            pool_list = folder / "store-pool" / keys.nodes_list("dev", "default")
        else:
            servers = {which: started(f"node-{which}", which, folder / f"store-{which}", None, args.parallel)
                       for which in sides}
        samples: dict[str, list[dict[str, Any]]] = {"whole": [], "chunked": []}
        for r in range(args.rounds):
            for which in (["whole", "chunked"] if r % 2 == 0 else ["chunked", "whole"]):
                if args.pool and which == "chunked":
                    both_idle(pool_list)
                samples[which].append(by_node(args, src, servers[which]))
                log(f"round {r + 1}: {which} {samples[which][-1]['wall']:.1f} s")
    whole_s = statistics.median(s["wall"] for s in samples["whole"])
    chunked_s = statistics.median(s["wall"] for s in samples["chunked"])
    ratio = whole_s / chunked_s
    n = samples["chunked"][0]["chunks"]
    how = "two 1-core nodes" if args.pool else "chunked"
    return {"seconds": args.seconds, "frame_size": args.size, "workers": 1 if args.pool else args.parallel,
            "pool": bool(args.pool), "chunks": n, "rounds": args.rounds, "samples": samples,
            "node": {"measured": f"{whole_s:.1f} s whole vs {chunked_s:.1f} s {how}, {n} chunks",
                     "ratio": round(ratio, 3), "goal": f">= {GOALS['node']}", "pass": ratio >= GOALS["node"]}}


def by_node(args: argparse.Namespace, src: Path, server: Any) -> dict[str, Any]:
    """One upload to ``server`` and its wait: from the first byte to the job's last record."""
    import _nodes

    began = time.time()
    posted = _nodes.post_file(server.host, server.port, f"/jobs?presets={args.presets}&name=source.mp4", src)
    if posted.status != 201:
        raise RuntimeError(f"upload refused: {posted.status} {posted.body}")
    record: dict[str, Any] = {}
    for _ in range(100_000):  # bounded: the wait below ends it first
        _, record = _nodes.get_json(f"{server.url}/jobs/{posted.body['id']}")
        if record.get("state") in ("done", "failed", "cancelled"):
            break
        time.sleep(0.2)
    if record.get("state") != "done":
        raise RuntimeError(f"the job ended {record.get('state')}: {record.get('error')}")
    made_by = sorted({c["node"] for c in record.get("chunks") or [] if c.get("node")})
    return {"wall": float(record["updated"]) - began, "chunks": len(record.get("chunks") or []), "nodes": made_by}


def both_idle(nodes_list: Path, timeout: float = 120.0) -> None:
    """Wait until the pool's ``nodes.json`` lists both nodes idle: a round starts as a user's
    upload to an idle pool does, not while a heartbeat still reports the last round's work."""
    for _ in range(int(timeout / 0.5)):
        try:
            listed = json.loads(nodes_list.read_text()).get("nodes", [])
        except (OSError, ValueError):
            listed = []
        if sorted(n["id"] for n in listed if n.get("load", {}).get("chunk_idle", 0) >= 1) == ["pa", "pb"]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the pool's nodes are not both listed idle in {nodes_list} after {timeout:g} s")


def summary(args: argparse.Namespace, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(which: str, key: str) -> float:
        return float(statistics.median(s[key] for s in samples[which]))

    wall = med("whole", "wall") / med("chunked", "wall")
    used = med("chunked", "cpu") / med("whole", "cpu")
    ssim_gap = med("whole", "ssim") - med("chunked", "ssim")
    size = med("chunked", "bytes") / med("whole", "bytes")
    chunks_n = samples["chunked"][0]["chunks"]
    return {
        "seconds": args.seconds, "frame_size": args.size, "parallel": args.parallel, "chunks": chunks_n,
        "rounds": args.rounds, "samples": samples,
        "wall": {"measured": f"{med('whole', 'wall'):.1f} s whole vs {med('chunked', 'wall'):.1f} s in {chunks_n}",
                 "ratio": round(wall, 3), "goal": f">= {GOALS['wall']}", "pass": wall >= GOALS["wall"]},
        "cpu": {"measured": f"{med('chunked', 'cpu'):.1f} s chunked vs {med('whole', 'cpu'):.1f} s whole",
                "ratio": round(used, 3), "goal": f"<= {GOALS['cpu']}", "pass": used <= GOALS["cpu"]},
        "ssim": {"measured": f"{med('chunked', 'ssim'):.5f} chunked vs {med('whole', 'ssim'):.5f} whole",
                 "ratio": round(ssim_gap, 5), "goal": f"within {GOALS['ssim']}",
                 "pass": abs(ssim_gap) <= GOALS["ssim"]},
        "size": {"measured": f"{med('chunked', 'bytes'):.0f} B chunked vs {med('whole', 'bytes'):.0f} B whole",
                 "ratio": round(size, 4), "goal": f"within {100 * GOALS['size']:g} %",
                 "pass": abs(size - 1) <= GOALS["size"]},
    }


if __name__ == "__main__":
    sys.exit(main())
