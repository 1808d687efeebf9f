"""
What starting a child costs: the CPU of one ``true`` (a child that is nothing but its start;
``--binary ffprobe`` runs ``ffprobe -version``, which adds its own 50-80 ms and their noise)
started four ways, side by side in one run:

  bare      the binary itself
  box       as the node starts it (``--sandbox bwrap``, the default): perl (process group,
            nice, user), bwrap (the box), prlimit (limits), the binary
  weak      as ``--sandbox weak`` starts it: perl, prlimit, the binary
  python    the first step in Python instead of perl (what the node ran until the box came:
            its wrapper did group, nice, limits and user, then the binary)

each with the limits, niceness and user (``--ffmpeg-user auto``: nobody when root) the node
gives ffmpeg. The sides alternate, round after round; the figure is CPU seconds (user +
system of the reaped children: in a box the binary is its pid 1, which bwrap waits for), which
other work on the machine moves far less than wall time. Ending a network namespace costs
kernel-worker CPU that no process is billed for; the kworker threads' CPU over each side is
measured too and the box's excess over bare is added to its figure.

Goal: box <= bare + 8 ms.

    .venv/bin/python bench/sandbox.py [--children 40] [--rounds 5] [--binary ffprobe] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

from _nodes import reaped_cpu

from gridnode.media.sandbox import ChildLimits, Sandbox, child_env, find_host, resolve_user, sandboxed_argv

GOAL_MS = 8.0

#: the node's wrapper until the box came (gridnode/media/sandbox.py before issue 18)
PYTHON_WRAPPER = (
    "import os, sys, resource\n"
    "os.setpgid(0, 0)\n"
    "os.nice(int(sys.argv[1]))\n"
    "for item in filter(None, sys.argv[2].split(',')):\n"
    "    name, value = item.split('=')\n"
    "    resource.setrlimit(getattr(resource, 'RLIMIT_' + name), (int(value), int(value)))\n"
    "if sys.argv[3]:\n"
    "    uid, gid = map(int, sys.argv[3].split(':'))\n"
    "    os.setgroups([])\n"
    "    os.setgid(gid)\n"
    "    os.setuid(uid)\n"
    "os.execv(sys.argv[4], sys.argv[4:])\n"
)


def kworker_cpu() -> float:
    """CPU seconds of the kernel's worker threads so far (network namespaces end there)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if text[text.find("(") + 1:].startswith("kworker"):
            fields = text[text.rfind(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_child(argv: list[str], children: int) -> tuple[float, float]:
    """(CPU of the process tree, kernel-worker CPU) per child, in seconds."""
    before, workers = reaped_cpu(), kworker_cpu()
    env = child_env()
    for _ in range(children):
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, env=env, cwd="/")
    return (reaped_cpu() - before) / children, (kworker_cpu() - workers) / children


def python_argv(binary: list[str], limits: ChildLimits) -> list[str]:
    spec = ",".join(f"{name.upper()}={value}" for name, value in limits.rlimits())
    return [sys.executable, "-I", "-S", "-c", PYTHON_WRAPPER, str(limits.niceness), spec, limits.user or "",
            *binary]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--children", type=int, default=40, help="children per side and round (default 40)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ap.add_argument("--binary", default="true",
                    help="the child, run with -version (default true: the set-up alone; ffprobe: a real one)")
    args = ap.parse_args(argv)

    binary = [os.path.realpath(shutil.which(args.binary) or args.binary), "-version"]
    user = resolve_user("auto")
    base = ChildLimits(cpu_seconds=300, file_size=1024**3)
    host = find_host(user, trial_binary=binary[0])
    boxed = host.bwrap is not None and host.refused is None and host.missing is None
    sides: dict[str, list[str]] = {
        "bare": binary,
        "weak": sandboxed_argv(binary, Sandbox(boxed=False, user=user).limits(base)),
        "python": python_argv(binary, Sandbox(boxed=False, user=user).limits(base))}
    if boxed:
        sides["box"] = sandboxed_argv(binary, Sandbox(boxed=True, user=user).limits(base), cwd="/")
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    workers: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    cpu_per_child(binary, 3)  # untimed: the page cache
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each side goes first in turn
            used, kernel = cpu_per_child(sides[name], args.children)
            cpu[name].append(used)
            workers[name].append(kernel)

    def ms(name: str, of: dict[str, list[float]] = cpu) -> float:
        return statistics.median(of[name]) * 1000

    def kernel(name: str) -> float:
        """Kernel-worker CPU per child over bare's."""
        return ms(name, workers) - ms("bare", workers)

    bare = ms("bare")
    box = ms("box") + kernel("box") if boxed else None
    result = {
        "figure": "sandbox", "children": args.children, "rounds": args.rounds, "user": user,
        "bare_ms": bare, "weak_ms": ms("weak"), "python_ms": ms("python"), "box_ms": box,
        "box_process_ms": ms("box") if boxed else None, "box_kworker_ms": kernel("box") if boxed else None,
        "weak_extra_ms": ms("weak") - bare, "python_extra_ms": ms("python") - bare,
        "box_extra_ms": None if box is None else box - bare, "box_ratio": None if box is None else box / bare,
        "weak_ratio": ms("weak") / bare, "goal_ms": GOAL_MS, "unboxed_reason": None if boxed else
        (host.missing or host.refused or "bubblewrap is not installed"),
        "met": None if box is None else box - bare <= GOAL_MS}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"CPU per child of `{os.path.basename(binary[0])} -version` (median of {args.rounds} rounds "
          f"x {args.children}; as {user or 'the node user'}):\n  bare    {bare:6.2f} ms")
    if box is not None:
        print(f"  box     {box:6.2f} ms  (+{box - bare:.2f} ms, {box / bare:.3f} of bare; of which "
              f"{kernel('box'):.2f} ms in kernel workers; what the node uses) "
              f"{'PASS' if result['met'] else 'FAIL'} (goal +{GOAL_MS:g} ms)")
    else:
        print(f"  box     -- no box here: {result['unboxed_reason']}")
    print(f"  weak    {ms('weak'):6.2f} ms  (+{ms('weak') - bare:.2f} ms, {ms('weak') / bare:.3f} of bare; "
          f"--sandbox weak)\n"
          f"  python  {ms('python'):6.2f} ms  (+{ms('python') - bare:.2f} ms; the first step in Python, "
          f"the node's wrapper before the box)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
