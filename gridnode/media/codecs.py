"""
The encoders an output may name and the ffmpeg options each takes. Plain data, no I/O.

Every encoder gets at most ``threads`` threads (the converter's share of the cores per
job): x264 and libvpx take ``-threads``; x265 and SVT-AV1 keep thread pools of their own
that ``-threads`` does not reach, so they are told through their own parameters
(``pools``/``frame-threads``, ``lp``). Speeds name each encoder's presets from the fastest
a small node can afford to the slowest worth its time.

Loudness is normalised in ONE pass (``loudnorm`` in its dynamic mode): a two-pass
normalisation measures the whole input first, which is a second decode of it, and a job
decodes its input once. One pass reaches the target within about 1 LU on programme
material; the true-peak limit holds either way.
"""

from __future__ import annotations

from typing import Protocol

VIDEO_CODECS = ("h264", "hevc", "av1", "vp9")
AUDIO_CODECS = ("aac", "opus")
SPEEDS = ("fastest", "fast", "medium", "slow")
#: the CRF scale of each codec, and its default: about the same quality at 720p
CRF_RANGE = {"h264": (0, 51), "hevc": (0, 51), "av1": (1, 63), "vp9": (0, 63)}
DEFAULT_CRF = {"h264": 23, "hevc": 28, "av1": 35, "vp9": 36}
#: x264's and x265's preset names for each speed
_X26X = {"fastest": "ultrafast", "fast": "veryfast", "medium": "medium", "slow": "slow"}
#: SVT-AV1's preset numbers (0 slowest .. 13 fastest)
_SVT = {"fastest": "12", "fast": "10", "medium": "8", "slow": "6"}
#: libvpx-vp9: deadline and cpu-used
_VPX = {"fastest": ("realtime", "8"), "fast": ("realtime", "8"), "medium": ("good", "4"), "slow": ("good", "2")}
#: loudnorm's loudness range target; the EBU default
LOUDNESS_RANGE = 11
#: what loudnorm's dynamic mode resamples to (it runs at 192 kHz inside)
LOUDNORM_RATE = 48000


class VideoSpec(Protocol):
    @property
    def video(self) -> str: ...
    @property
    def crf(self) -> int | None: ...
    @property
    def speed(self) -> str: ...
    @property
    def max_kbps(self) -> int: ...
    @property
    def keyint(self) -> float: ...
    @property
    def fps(self) -> float: ...


class AudioSpec(Protocol):
    @property
    def loudness(self) -> float | None: ...
    @property
    def true_peak(self) -> float: ...
    @property
    def clipped(self) -> bool: ...


def _frames(seconds: float, spec: VideoSpec, frame_rate: float | None) -> int | None:
    rate = min(frame_rate, spec.fps) if frame_rate and spec.fps else frame_rate or spec.fps or None
    return max(1, round(seconds * rate)) if rate else None


def video_options(spec: VideoSpec, threads: int | None, frame_rate: float | None) -> list[str]:
    """The ``-c:v`` and its options for ``spec`` (an output's video fields)."""
    crf = spec.crf if spec.crf is not None else DEFAULT_CRF[spec.video]
    cap = spec.max_kbps
    thread_opts = ["-threads", str(threads)] if threads else []
    if spec.video == "h264":
        opts = ["-c:v", "libx264", "-preset", _X26X[spec.speed], "-crf", str(crf), "-profile:v", "high",
                *thread_opts]
    elif spec.video == "hevc":
        params = ["log-level=error"] + ([f"pools={threads}", "frame-threads=1"] if threads else [])
        # hvc1: the parameter sets in the sample entry, as Apple's players require.
        opts = ["-c:v", "libx265", "-preset", _X26X[spec.speed], "-crf", str(crf), "-tag:v", "hvc1",
                "-x265-params", ":".join(params)]
    elif spec.video == "av1":
        params = [f"lp={threads}"] if threads else []
        if cap:
            params.append(f"mbr={cap}")  # capped CRF
        opts = ["-c:v", "libsvtav1", "-preset", _SVT[spec.speed], "-crf", str(crf)]
        if params:
            opts += ["-svtav1-params", ":".join(params)]
    else:
        deadline, cpu_used = _VPX[spec.speed]
        # Constrained quality: -b:v is the cap, 0 for none.
        opts = ["-c:v", "libvpx-vp9", "-deadline", deadline, "-cpu-used", cpu_used, "-row-mt", "1",
                "-crf", str(crf), "-b:v", f"{cap}k" if cap else "0", *thread_opts]
    if cap and spec.video in ("h264", "hevc"):
        opts += ["-maxrate", f"{cap}k", "-bufsize", f"{2 * cap}k"]
    if spec.keyint:
        frames = _frames(spec.keyint, spec, frame_rate)
        opts += ["-force_key_frames", f"expr:gte(t,n_forced*{spec.keyint:g})"]
        if frames:
            opts += ["-g", str(frames)]
    return opts


def audio_options(codec: str, kbps: int) -> list[str]:
    """The ``-c:a`` and its options: stereo at ``kbps``."""
    return ["-c:a", "aac" if codec == "aac" else "libopus", "-b:a", f"{kbps}k", "-ac", "2"]


def audio_chain(spec: AudioSpec, start: float, end: float) -> str:
    """The audio filters an output needs (the clip, the loudness target), or "" for none."""
    chain = []
    if spec.clipped:
        chain += ["asetpts=PTS-STARTPTS", f"atrim=start={start:.3f}:end={end:.3f}", "asetpts=PTS-STARTPTS"]
    if spec.loudness is not None:
        chain += [f"loudnorm=I={spec.loudness:g}:TP={spec.true_peak:g}:LRA={LOUDNESS_RANGE}",
                  f"aresample={LOUDNORM_RATE}"]
    return ",".join(chain)
