"""
What setting up a child costs: the CPU of one ``ffprobe -version`` (a child
whose cost is all start-up) started three ways, side by side in one run:

  bare      ffprobe itself
  chain     behind the util-linux chain the node uses on Linux
            (setsid, prlimit, nice, setpriv; gridnode.media.sandbox)
  wrapper   behind the Python wrapper it falls back to elsewhere

each with the limits, niceness and user the node gives ffmpeg (``--ffmpeg-user
auto``: nobody when root). The sides alternate, round after round; the figure
is CPU seconds (user + system of the reaped children), which other work on the
machine moves far less than wall time.

    .venv/bin/python bench/sandbox.py [--children 40] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys

from gridnode.media.sandbox import ChildLimits, resolve_user, sandboxed_argv


def reaped_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_per_child(argv: list[str], children: int) -> float:
    before = reaped_cpu()
    for _ in range(children):
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return (reaped_cpu() - before) / children


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=40, help="children per side and round (default 40)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = ap.parse_args(argv)

    binary = [shutil.which("ffprobe") or "ffprobe", "-version"]
    limits = ChildLimits(cpu_seconds=300, file_size=1024**3, user=resolve_user("auto"))
    sides = {"bare": binary, "chain": sandboxed_argv(binary, limits),
             "wrapper": sandboxed_argv(binary, limits, chain=False)}
    if sides["chain"] == sides["wrapper"]:
        print("the chain's programs (setsid, prlimit, nice, setpriv) are not on PATH", file=sys.stderr)
        return 1
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    cpu_per_child(binary, 3)  # untimed: the page cache
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # each side goes first in turn
            cpu[name].append(cpu_per_child(sides[name], args.children))
    bare, chain, wrapper = (statistics.median(cpu[name]) for name in names)
    result = {"figure": "sandbox", "children": args.children, "rounds": args.rounds,
              "bare_ms": bare * 1000, "chain_ms": chain * 1000, "wrapper_ms": wrapper * 1000,
              "chain_extra_ms": (chain - bare) * 1000, "wrapper_extra_ms": (wrapper - bare) * 1000,
              "chain_ratio": chain / bare, "wrapper_ratio": wrapper / bare, "chain_vs_wrapper": chain / wrapper}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"CPU per child of `ffprobe -version` (median of {args.rounds} rounds x {args.children}):\n"
              f"  bare    {bare * 1000:6.2f} ms\n"
              f"  chain   {chain * 1000:6.2f} ms  (+{(chain - bare) * 1000:.2f} ms, {chain / bare:.3f} of bare)\n"
              f"  wrapper {wrapper * 1000:6.2f} ms  (+{(wrapper - bare) * 1000:.2f} ms, {wrapper / bare:.3f} of bare)\n"
              f"  chain / wrapper {chain / wrapper:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
