"""
Rate and quality per codec, as the node encodes (gridnode/media/codecs.py's options, one
encoder thread: a job's share of the cores on a busy node), on three generated sources of
different difficulty:

  testsrc2    lavfi's test pattern: flat colours, sharp edges, slow motion
  mandelbrot  a zoom into the Mandelbrot set: fine detail everywhere, all of it moving
  noise       testsrc2 under temporal noise: what no encoder predicts
  camera      closer to footage: a still fractal panned slowly (a camera move), softened (a
              lens) and under light temporal grain (a sensor)
  pan         camera without the grain

Each source is made once, losslessly (x264 -qp 0), and is the reference every encode's SSIM is
measured against (ffmpeg's ssim filter, "All"). H.264 at its default CRF (23) sets the quality;
HEVC and AV1 are stepped through CRF to the same SSIM (+-0.002): the size of the step that comes
within it, or, where no whole CRF does, the size interpolated (in log size) between the two
that bracket it. Goals: HEVC >= 25 % smaller than H.264, AV1 >= 35 % smaller. Speed: frames a
second per core (CPU seconds of the ffmpeg, its reference decode included, which is small).

    .venv/bin/python bench/encode.py [--height 720 | --1080] [--seconds 10] [--speed fast] [--tune-ssim]
                                     [--sources testsrc2,mandelbrot,noise,camera] [--json]

``--tune-ssim`` gives x264 and x265 ``-tune ssim`` (their psycho-visual tools off: they spend
bits on what looks sharp, which SSIM does not reward); SVT-AV1 1.4 is tuned for PSNR already.

1080p is the issue's size; on a 2-core machine a full run at 1080p takes the better part of an
hour, so 720p is the default and ``--1080`` asks for 1080p.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gridnode.media.codecs import CRF_RANGE, DEFAULT_CRF, video_options

TOLERANCE = 0.002
GOALS = {"hevc": 0.25, "av1": 0.35}
RATE = 25
SOURCES = {
    "testsrc2": "testsrc2=size={w}x{h}:rate={r}:duration={d}",
    "mandelbrot": "mandelbrot=size={w}x{h}:rate={r}:end_scale=0.001,trim=duration={d}",
    "noise": "testsrc2=size={w}x{h}:rate={r}:duration={d},noise=alls=24:allf=t+u",
    # (one fractal frame, rendered once and looped: a mandelbrot frame costs seconds)
    "camera": "mandelbrot=size={pw}x{ph}:rate={r}:start_scale=0.02:end_scale=0.02:start_x=-0.745:start_y=0.11,"
              "trim=end_frame=1,loop=loop=-1:size=1,trim=duration={d},"
              "crop={w}:{h}:x='t*{w}/40':y='t*{h}/60',gblur=sigma=1.2,noise=alls=6:allf=t",
    # camera without its grain: how much of the newer codecs' lead the grain makes
    "pan": "mandelbrot=size={pw}x{ph}:rate={r}:start_scale=0.02:end_scale=0.02:start_x=-0.745:start_y=0.11,"
           "trim=end_frame=1,loop=loop=-1:size=1,trim=duration={d},"
           "crop={w}:{h}:x='t*{w}/40':y='t*{h}/60',gblur=sigma=1.2",
}


@dataclass(frozen=True)
class Spec:
    """The video fields codecs.video_options reads."""

    video: str
    crf: int | None
    speed: str
    max_kbps: int = 0
    keyint: float = 0.0
    fps: float = 0.0


@dataclass(frozen=True)
class Encode:
    codec: str
    crf: int
    size: int
    ssim: float
    fps_per_core: float


def run(argv: list[str]) -> tuple[str, float]:
    """Run ffmpeg; its stderr and the CPU seconds it took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done.stderr, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_source(folder: Path, name: str, height: int, seconds: float) -> Path:
    width = int(height * 16 / 9) // 2 * 2
    path = folder / f"{name}.mkv"
    graph = SOURCES[name].format(w=width, h=height, r=RATE, d=seconds, pw=width * 5 // 4 // 2 * 2,
                                 ph=height * 5 // 4 // 2 * 2)
    run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", graph, "-c:v", "libx264", "-qp", "0",
         "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)])
    return path


def ssim(encoded: Path, reference: Path) -> float:
    out, _ = run(["ffmpeg", "-nostats", "-i", str(encoded), "-i", str(reference), "-lavfi", "[0:v][1:v]ssim",
                  "-f", "null", "-"])
    found = re.findall(r"All:([0-9.]+)", out)
    if not found:
        raise RuntimeError(f"no SSIM in ffmpeg's output: {out[-300:]}")
    return float(found[-1])


def encode(source: Path, folder: Path, codec: str, crf: int, speed: str, frames: int, tune: bool = False) -> Encode:
    out = folder / f"{source.stem}-{codec}-{crf}.mp4"
    options = video_options(Spec(codec, crf, speed), 1, float(RATE))
    if tune and codec in ("h264", "hevc"):
        options += ["-tune", "ssim"]
    _, cpu = run(["ffmpeg", "-v", "error", "-y", "-i", str(source), "-an", *options, "-f", "mp4", str(out)])
    result = Encode(codec, crf, out.stat().st_size, ssim(out, source), frames / max(cpu, 1e-6))
    out.unlink()
    return result


def matched(source: Path, folder: Path, codec: str, target: float, speed: str, frames: int,
            log: list[Encode], tune: bool = False) -> tuple[float, Encode | None]:
    """The size of ``codec`` at ``target`` SSIM: (size, the encode within TOLERANCE, or None
    when interpolated between the two whole CRFs that bracket it)."""
    lo, hi = CRF_RANGE[codec]
    tried: dict[int, Encode] = {}

    def at(crf: int) -> Encode:
        if crf not in tried:
            tried[crf] = encode(source, folder, codec, crf, speed, frames, tune)
            log.append(tried[crf])
            print(f"  {source.stem} {codec} crf {crf}: {tried[crf].size} B, SSIM {tried[crf].ssim:.4f}",
                  file=sys.stderr)
        return tried[crf]

    # SSIM falls as CRF rises: bisect for the highest CRF still at or above the target.
    low, high = lo, hi
    crf = DEFAULT_CRF[codec]
    while low <= high:
        e = at(crf)
        if abs(e.ssim - target) <= TOLERANCE / 4:
            break
        if e.ssim > target:
            low = crf + 1
        else:
            high = crf - 1
        crf = (low + high) // 2
        if crf in tried or low > high:
            break
    best = min(tried.values(), key=lambda e: abs(e.ssim - target))
    if abs(best.ssim - target) <= TOLERANCE:
        return float(best.size), best
    above = [e for e in tried.values() if e.ssim > target]
    below = [e for e in tried.values() if e.ssim < target]
    if not above or not below:
        return float(best.size), None
    a = min(above, key=lambda e: e.ssim)
    b = max(below, key=lambda e: e.ssim)
    share = (a.ssim - target) / (a.ssim - b.ssim)
    return math.exp(math.log(a.size) + share * (math.log(b.size) - math.log(a.size))), None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--1080", dest="full", action="store_true", help="1080p sources (slow on 2 cores)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--speed", default="fast", choices=("fastest", "fast", "medium", "slow"))
    ap.add_argument("--sources", default="testsrc2,mandelbrot,noise", help=f"of {','.join(SOURCES)}")
    ap.add_argument("--tune-ssim", action="store_true", help="x264 and x265 with -tune ssim")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    height = 1080 if args.full else args.height
    frames = int(args.seconds * RATE)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gridnode-encode-") as tmp:
        folder = Path(tmp)
        for name in args.sources.split(","):
            source = make_source(folder, name, height, args.seconds)
            log: list[Encode] = []
            anchor = encode(source, folder, "h264", DEFAULT_CRF["h264"], args.speed, frames, args.tune_ssim)
            log.append(anchor)
            row = {"source": name, "height": height, "seconds": args.seconds, "speed": args.speed,
                   "tune_ssim": args.tune_ssim,
                   "h264": {"crf": anchor.crf, "bytes": anchor.size, "ssim": round(anchor.ssim, 4),
                            "fps_per_core": round(anchor.fps_per_core, 1)}}
            for codec in ("hevc", "av1"):
                size, hit = matched(source, folder, codec, anchor.ssim, args.speed, frames, log, args.tune_ssim)
                speeds = [e.fps_per_core for e in log if e.codec == codec]
                row[codec] = {"crf": hit.crf if hit else None, "bytes": round(size),
                              "ssim": round(hit.ssim, 4) if hit else round(anchor.ssim, 4),
                              "interpolated": hit is None, "saving": round(1 - size / anchor.size, 3),
                              "goal": GOALS[codec], "fps_per_core": round(sum(speeds) / len(speeds), 1)}
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            source.unlink()
    if not args.json:
        print(f"{'source':<11} {'codec':<5} {'crf':>4} {'bytes':>10} {'SSIM':>7} {'smaller':>8} {'goal':>5} "
              f"{'fps/core':>8}")
        for row in rows:
            for codec in ("h264", "hevc", "av1"):
                r = row[codec]
                saving = f"{100 * r['saving']:.0f} %" if "saving" in r else ""
                goal = f"{100 * r['goal']:.0f} %" if "goal" in r else ""
                crf = "~" if r["crf"] is None else str(r["crf"])
                print(f"{row['source']:<11} {codec:<5} {crf:>4} {r['bytes']:>10} {r['ssim']:>7.4f} {saving:>8} "
                      f"{goal:>5} {r['fps_per_core']:>8.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("SVT_LOG", "1")
    sys.exit(main())
