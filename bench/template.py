"""
Template overhead: one job of a six-rung CMAF ladder (a config template) through a real node vs
the same ffmpeg argv run by hand, side by side in one run (the sides alternate, each going
first in turn; the figure is the ratio of the medians). Goal (issue 22): <= 1.03.

    .venv/bin/python bench/template.py [--seconds 20] [--rounds 3] [--sandbox bwrap] [--json]

node  POST /jobs?presets=ladder6 of a 720p clip, until the node's own record of the job
      becoming done (``updated``): upload, ffprobe, the one ffmpeg, the codec strings written
      into the manifests, every file checked and read back, the results stored (file store)
hand  the argv the node runs for that job (``transcode_command``: the same graph, encoders,
      threads, sandbox and limits, ``sandboxed_argv``), at the node's niceness, its CMAF
      folder made and shared first as the node makes it; nothing else
CPU   beside each: the node process with the children it reaped, and the hand side's children
      (user + system): far less moved than wall time by the other work of a shared machine

The ladder: 720p 3000k, 540p 2000k, 480p 1400k, 360p 800k, 240p 400k, 144p 150k, one AAC
rendition, H.264 (``cmaf.video_options``). The clip is testsrc2 + a sine, 30 fps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import _nodes
from _nodes import post_file, reaped_cpu, wait_idle

from gridnode.config import cpu_count
from gridnode.media.ffmpeg import NICENESS, transcode_command
from gridnode.media.presets import folders
from gridnode.media.probe import parse_probe, probe_argv
from gridnode.media.sandbox import Sandbox, let_read, resolve_user, sandboxed_argv, share_with
from gridnode.media.templates import parse_templates

GOAL = 1.03
LADDER = [(720, 3000), (540, 2000), (480, 1400), (360, 800), (240, 400), (144, 150)]
RUNGS = ", ".join(f"{{size = {size}, kbps = {kbps}}}" for size, kbps in LADDER)
CONFIG = f'[templates.ladder6]\noutputs = [{{name = "stream", container = "cmaf", ladder = [{RUNGS}]}}]\n'


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _process_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and of the children it reaped (its ffprobe, its ffmpeg)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sandbox", default="bwrap", choices=("bwrap", "weak"))
    ap.add_argument("--ffmpeg-user", default="")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gridnode-template-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o711)  # ffmpeg-user auto (nobody, when root) must reach the node's folders
        clip = tmp / "clip.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y",
                        "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={args.seconds:g}",
                        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={args.seconds:g}",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                        "-shortest", str(clip)], check=True)
        info = parse_probe(subprocess.run(probe_argv("ffprobe", str(clip)), capture_output=True,
                                          check=True).stdout, size=clip.stat().st_size)
        presets = list(parse_templates(tomllib.loads(CONFIG)["templates"], watermarks=None)["ladder6"].outputs)
        threads = cpu_count()  # --workers 1: the one job gets every core, as the node gives it
        user = resolve_user(args.ffmpeg_user or "auto")
        sandbox = Sandbox(boxed=args.sandbox == "bwrap", user=user)
        let_read(user, str(clip))

        def by_hand(r: int) -> tuple[float, float]:
            out = tmp / f"hand{r}"
            out.mkdir()
            inner = [str(out / name) for name in folders(presets)]
            for folder in inner:
                os.makedirs(folder)
            share_with(user, str(out), *inner)
            argv = sandboxed_argv(*transcode_command(info, str(clip), str(out), presets, threads=threads,
                                                     sandbox=sandbox))
            cpu0 = reaped_cpu()
            began = time.monotonic()
            subprocess.run(["nice", "-n", str(NICENESS), *argv], check=True, stdout=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL)
            took = time.monotonic() - began
            subprocess.run(["rm", "-rf", str(out)], check=True)
            return took, reaped_cpu() - cpu0

        def by_node(server: Any) -> tuple[float, float]:
            cpu0 = _process_cpu(server.pid)
            began = time.time()
            posted = post_file(server.host, server.port, "/jobs?presets=ladder6&name=clip.mp4", clip)
            if posted.status != 201:
                raise RuntimeError(f"upload refused: {posted.status} {posted.body}")
            wait_idle(server.url, every=0.5)
            _, record = _nodes.get_json(f"{server.url}/jobs/{posted.body['id']}")
            if record.get("state") != "done":
                raise RuntimeError(f"the job ended {record.get('state')}: {record.get('error')}")
            return float(record["updated"]) - began, _process_cpu(server.pid) - cpu0

        folder = tmp / "node"
        folder.mkdir()
        (folder / "node.toml").write_text(f'sandbox = "{args.sandbox}"\n' + CONFIG)  # config-file only
        extra = ["--ffmpeg-user", args.ffmpeg_user] if args.ffmpeg_user else []
        times: dict[str, list[float]] = {"node": [], "hand": []}
        cpu: dict[str, list[float]] = {"node": [], "hand": []}
        with _nodes.node(folder, "--config", "node.toml", "--workers", "1", "--min-free", "0", *extra) as server:
            # Untimed: one job first (code imported and threads started on first use).
            by_node(server)
            for r in range(args.rounds):
                order = ["node", "hand"] if r % 2 == 0 else ["hand", "node"]
                for side in order:
                    took, used = by_node(server) if side == "node" else by_hand(r)
                    times[side].append(took)
                    cpu[side].append(used)
                    say(f"  round {r + 1}: {side} {took:.2f} s, CPU {used:.2f} s")
        node, hand = statistics.median(times["node"]), statistics.median(times["hand"])
        paired = [a / b for a, b in zip(times["node"], times["hand"], strict=True)]
        ratio = node / hand
        cpu_ratio = statistics.median(cpu["node"]) / statistics.median(cpu["hand"])
        row = {"figure": f"template overhead: one job of a six-rung CMAF ladder, {args.seconds:g} s 720p clip",
               "goal": f"<= {GOAL}", "node_s": times["node"], "hand_s": times["hand"], "node_median_s": node,
               "hand_median_s": hand, "ratio": ratio, "paired_ratios": paired, "pass": ratio <= GOAL,
               "node_cpu_s": cpu["node"], "hand_cpu_s": cpu["hand"], "cpu_ratio": cpu_ratio,
               "threads": threads, "sandbox": args.sandbox, "ladder": LADDER,
               "argv": shlex.join(transcode_command(info, str(clip), "OUT", presets, threads=threads)[0])}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"node {node:.2f} s vs by hand {hand:.2f} s: {ratio:.3f} ({'PASS' if ratio <= GOAL else 'FAIL'}; "
                  f"per round {', '.join(f'{p:.3f}' for p in paired)}); CPU {cpu_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
