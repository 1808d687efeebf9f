"""
What setting up a child costs: the CPU of one ``ffprobe -version`` (a child
whose cost is all start-up) started three ways, side by side in one run:

  bare      ffprobe itself
  wrapper   behind the Python wrapper the node uses (gridnode.media.sandbox):
            process group, limits, nice, user
  chain     behind util-linux programs doing the same (setsid, prlimit, nice,
            setpriv): the cheaper way the node does not take, because setsid
            makes a session, and under autogroup scheduling a session of its
            own makes the child's nice level count for nothing against the node

each with the limits, niceness and user the node gives ffmpeg (``--ffmpeg-user
auto``: nobody when root). The sides alternate, round after round; the figure
is CPU seconds (user + system of the reaped children), which other work on the
machine moves far less than wall time.

    .venv/bin/python bench/sandbox.py [--children 40] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys

from _nodes import reaped_cpu

from gridnode.media.sandbox import ChildLimits, resolve_user, sandboxed_argv


def cpu_per_child(argv: list[str], children: int) -> float:
    before = reaped_cpu()
    for _ in range(children):
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return (reaped_cpu() - before) / children


def util_linux_chain(limits: ChildLimits) -> list[str] | None:
    """setsid, prlimit, nice and setpriv doing what the wrapper does (each execs the next)."""
    limit_options = [f"--{name.lower()}={value}" for name, value in limits.rlimits()]
    steps = [["setsid"], ["prlimit", *limit_options], ["nice", "-n", str(limits.niceness)]]
    if limits.user:
        uid, gid = limits.user.split(":")
        steps.append(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"])
    chain: list[str] = []
    for program, *options in steps:
        path = shutil.which(program)
        if path is None:
            return None
        chain += [path, *options]
    return chain


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=40, help="children per side and round (default 40)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = ap.parse_args(argv)

    binary = [shutil.which("ffprobe") or "ffprobe", "-version"]
    limits = ChildLimits(cpu_seconds=300, file_size=1024**3, user=resolve_user("auto"))
    chain_argv = util_linux_chain(limits)
    if chain_argv is None:
        print("setsid, prlimit, nice or setpriv is not on PATH", file=sys.stderr)
        return 1
    sides = {"bare": binary, "chain": chain_argv + binary, "wrapper": sandboxed_argv(binary, limits)}
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
              f"  wrapper {wrapper * 1000:6.2f} ms  (+{(wrapper - bare) * 1000:.2f} ms, {wrapper / bare:.3f} of bare;"
              f" what the node uses)\n"
              f"  chain   {chain * 1000:6.2f} ms  (+{(chain - bare) * 1000:.2f} ms, {chain / bare:.3f} of bare;"
              f" not used: a session of its own)\n"
              f"  chain / wrapper {chain / wrapper:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
