"""
Output presets and the ffmpeg command line built from them. Plain data, no I/O.

``build_argv(ffmpeg, probe, input_path, out_dir, presets)`` returns ONE argv
that makes every requested preset in a single ffmpeg process: the input is
decoded once and split in a filter graph, one branch per output (one per HLS
rung). On small machines decoding is a large share of the work, and a single
process gives one progress figure and one thing to cancel.

Sizes follow these rules:

- a target is named by its short side (``720p`` means 1280x720 landscape or
  720x1280 portrait), computed from the display size (after rotation: ffmpeg
  autorotates while decoding, so filters see the displayed picture);
- never upscale: a source smaller than the target keeps its own size, and HLS
  rungs above the source's short side are dropped (the lowest rung is always
  kept, at the source size when the source is smaller still);
- the aspect ratio is kept and both sides are even (x264 and VP9 need it).

A clip without audio gets no audio map and no audio encoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gridnode.errors import GridnodeError
from gridnode.media.probe import FORMAT_WHITELIST, Limits, ProbeResult, input_options

PresetKind = Literal["mp4", "webm", "poster", "hls"]

HLS_SEGMENT_SECONDS = 6
CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".jpg": "image/jpeg",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
}

# Options every argv starts with: no stdin, machine-readable progress on stdout.
COMMON_OPTIONS = ["-nostdin", "-hide_banner", "-y", "-progress", "pipe:1", "-nostats"]


@dataclass(frozen=True)
class OutputFile:
    """A file a preset writes. ``name`` is relative to the output folder and
    may hold one ``*`` (HLS segments, whose count depends on the duration)."""

    name: str
    content_type: str


@dataclass(frozen=True)
class Rung:
    """One HLS variant."""

    name: str  # folder under hls/, e.g. "720p"
    short_side: int
    video_kbps: int
    audio_kbps: int = 96


@dataclass(frozen=True)
class Preset:
    name: str
    kind: PresetKind
    description: str
    short_side: int = 0  # mp4, webm, poster: the target's short side
    video_kbps: int = 0  # 0: constant quality (CRF)
    audio_kbps: int = 128
    ladder: tuple[Rung, ...] = ()  # hls only

    def outputs(self, probe: ProbeResult) -> list[OutputFile]:
        """The files this preset writes for ``probe``'s source."""
        if self.kind == "hls":
            files = [OutputFile("hls/master.m3u8", CONTENT_TYPES[".m3u8"])]
            for rung, _size in hls_rungs(probe, self.ladder):
                files.append(OutputFile(f"hls/{rung.name}/index.m3u8", CONTENT_TYPES[".m3u8"]))
                files.append(OutputFile(f"hls/{rung.name}/seg_*.ts", CONTENT_TYPES[".ts"]))
            return files
        ext = {"mp4": ".mp4", "webm": ".webm", "poster": ".jpg"}[self.kind]
        name = "poster.jpg" if self.kind == "poster" else self.name + ext
        return [OutputFile(name, CONTENT_TYPES[ext])]


DEFAULT_PRESET = "mp4-720p"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("mp4-720p", "mp4", "H.264 + AAC, up to 720p, fast start", short_side=720, audio_kbps=128),
        Preset("mp4-480p", "mp4", "H.264 + AAC, up to 480p, fast start", short_side=480, audio_kbps=96),
        Preset("webm-480p", "webm", "VP9 + Opus, up to 480p", short_side=480, audio_kbps=96),
        Preset("poster", "poster", "JPEG of the frame at 10% of the duration, up to 720p", short_side=720),
        Preset("hls", "hls", "HLS ladder 720p/480p/360p, 6 s segments, hls/master.m3u8",
               ladder=(Rung("720p", 720, 2800, 128), Rung("480p", 480, 1400, 96), Rung("360p", 360, 800, 64))),
    ]
}


def parse_presets(text: str | None) -> list[Preset]:
    """``"a,b"`` -> presets, in order, without repeats; None (not given) -> the default.

    Unknown names, and a value given empty (``presets=``: a form left blank, a script's empty
    variable), fail with ``unknown_preset`` (400) listing the known ones.
    """
    names = [n.strip() for n in (text if text is not None else DEFAULT_PRESET).split(",") if n.strip()]
    if not names:
        raise GridnodeError(f"presets is empty; leave it out for the default ({DEFAULT_PRESET}) or name some of: "
                            f"{', '.join(PRESETS)}", code="unknown_preset", status=400)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise GridnodeError(
            f"unknown preset {', '.join(repr(n[:40]) for n in unknown[:5])}; known presets: {', '.join(PRESETS)}",
            code="unknown_preset", status=400)
    return [PRESETS[n] for n in dict.fromkeys(names)]


def _even(x: float) -> int:
    # Round down so an odd source never grows by a pixel.
    return max(2, int(x) // 2 * 2)


def target_size(probe: ProbeResult, short_side: int) -> tuple[int, int]:
    """Display size scaled so its short side is at most ``short_side``; even sides."""
    w, h = probe.display_width, probe.display_height
    factor = min(1.0, short_side / min(w, h))
    return _even(w * factor), _even(h * factor)


def hls_rungs(probe: ProbeResult, ladder: Sequence[Rung]) -> list[tuple[Rung, tuple[int, int]]]:
    """The rungs kept for this source with their sizes, highest first."""
    short = min(probe.display_width, probe.display_height)
    kept = [r for r in ladder if r.short_side <= short]
    if not kept and ladder:
        kept = [min(ladder, key=lambda r: r.short_side)]
    return [(r, target_size(probe, r.short_side)) for r in kept]


def default_output_limit(probe: ProbeResult) -> int:
    """``-fs`` per output: generous next to any sane encode of this input."""
    return max(256 * 1024 * 1024, 4 * probe.size)


def job_output_limit(probe: ProbeResult, presets: Iterable[Preset], per_output: int | None = None) -> int:
    """What a job's outputs may hold together: ``per_output`` (default ``default_output_limit``)
    for each output, an HLS rung counting as one. ``-fs`` bounds each mp4, webm and poster
    file but no HLS segment list, so this total is what bounds HLS."""
    limit = per_output if per_output is not None else default_output_limit(probe)
    count = sum(len(hls_rungs(probe, p.ladder)) if p.kind == "hls" else 1 for p in dict.fromkeys(presets))
    return limit * count


def output_too_large(limit: int, total: int | None = None, files: int | None = None) -> GridnodeError:
    """A job's outputs passed ``job_output_limit``: ``total`` bytes or ``files`` files written."""
    what = f"; {files} files written" if files is not None else f"; {total} bytes written" if total else ""
    return GridnodeError(f"the outputs of this job passed their limit ({limit} bytes together{what}); "
                         "convert a shorter video or fewer presets",
                         code="output_too_large", status=413)


def _scale(w: int, h: int) -> str:
    return f"scale={w}:{h}:flags=bicubic,setsar=1"


def build_argv(
    ffmpeg: str,
    probe: ProbeResult,
    input_path: str,
    out_dir: str,
    presets: Iterable[Preset],
    *,
    max_output_bytes: int | None = None,
    threads: int | None = None,
    input_limits: Limits = Limits(),
) -> list[str]:
    """One ffmpeg argv writing every preset's outputs under ``out_dir``.

    ``out_dir`` must exist (HLS sub-folders are made by ffmpeg). Outputs are
    named as ``Preset.outputs`` says. ``max_output_bytes`` is ``-fs`` for each
    output (default ``default_output_limit``); ``threads`` caps each encoder's
    threads (``-threads``), for nodes running several jobs at once. The decoder
    stops at a frame over ``input_limits.max_pixels``, the demuxer at a stream past
    ``input_limits.max_streams`` (``probe.input_options``).
    """
    chosen = list(dict.fromkeys(presets))
    if not chosen:
        raise GridnodeError("no preset chosen", code="unknown_preset", status=400)
    limit = str(max_output_bytes if max_output_bytes is not None else default_output_limit(probe))
    thread_opts = ["-threads", str(threads)] if threads else []
    audio = probe.has_audio

    # One filter branch per video output; ffmpeg decodes once.
    branches: list[str] = []  # filter chain after the split, per branch
    outputs: list[list[str]] = []
    for preset in chosen:
        if preset.kind == "hls":
            rungs = hls_rungs(probe, preset.ladder)
            first = len(branches)
            opts: list[str] = []
            var_map = []
            for i, (rung, (w, h)) in enumerate(rungs):
                branches.append(f"{_scale(w, h)},format=yuv420p")
                opts += ["-map", f"[v{first + i}]"]
                if audio:
                    opts += ["-map", "0:a:0"]
                var_map.append(f"v:{i},a:{i},name:{rung.name}" if audio else f"v:{i},name:{rung.name}")
            opts += ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main", *thread_opts]
            for i, (rung, _size) in enumerate(rungs):
                # A bitrate per variant: ffmpeg 5.1 leaves a variant out of the
                # master playlist when it cannot state its BANDWIDTH.
                opts += [f"-b:v:{i}", f"{rung.video_kbps}k", f"-maxrate:v:{i}", f"{rung.video_kbps}k",
                         f"-bufsize:v:{i}", f"{2 * rung.video_kbps}k"]
                if audio:
                    opts += [f"-b:a:{i}", f"{rung.audio_kbps}k"]
            # Keyframes on segment boundaries so every rung cuts at the same times.
            opts += ["-force_key_frames", f"expr:gte(t,n_forced*{HLS_SEGMENT_SECONDS})"]
            if audio:
                opts += ["-c:a", "aac", "-ac", "2"]
            hls_dir = os.path.join(out_dir, "hls")
            opts += ["-f", "hls", "-hls_time", str(HLS_SEGMENT_SECONDS), "-hls_playlist_type", "vod",
                     "-var_stream_map", " ".join(var_map), "-master_pl_name", "master.m3u8",
                     "-hls_segment_filename", os.path.join(hls_dir, "%v", "seg_%03d.ts"),
                     "-fs", limit, os.path.join(hls_dir, "%v", "index.m3u8")]
            outputs.append(opts)
            continue
        w, h = target_size(probe, preset.short_side)
        label = f"[v{len(branches)}]"
        target = os.path.join(out_dir, preset.outputs(probe)[0].name)
        if preset.kind == "poster":
            at = round(probe.duration * 0.10, 3)
            # Rebase timestamps first so the 10% mark holds for streams that do not start at 0.
            branches.append(f"setpts=PTS-STARTPTS,trim=start={at},{_scale(w, h)}")
            outputs.append(["-map", label, "-frames:v", "1", "-c:v", "mjpeg", "-q:v", "3",
                            "-f", "image2", "-update", "1", "-fs", limit, target])
            continue
        branches.append(f"{_scale(w, h)},format=yuv420p")
        opts = ["-map", label]
        if audio:
            opts += ["-map", "0:a:0"]
        if preset.kind == "mp4":
            opts += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-profile:v", "high", *thread_opts]
            if audio:
                opts += ["-c:a", "aac", "-b:a", f"{preset.audio_kbps}k", "-ac", "2"]
            opts += ["-movflags", "+faststart", "-f", "mp4"]
        else:
            # Realtime deadline and cpu-used 8: VP9 at a speed small machines can afford.
            opts += ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
                     "-crf", "36", "-b:v", "0", *thread_opts]
            if audio:
                opts += ["-c:a", "libopus", "-b:a", f"{preset.audio_kbps}k", "-ac", "2"]
            opts += ["-f", "webm"]
        outputs.append([*opts, "-fs", limit, target])

    if len(branches) == 1:
        graph = f"[0:v:0]{branches[0]}[v0]"
    else:
        split = "".join(f"[s{i}]" for i in range(len(branches)))
        graph = ";".join([f"[0:v:0]split={len(branches)}{split}"]
                         + [f"[s{i}]{chain}[v{i}]" for i, chain in enumerate(branches)])
    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error",
            # Nested demuxers (an HLS playlist hidden in an AVI GAB2 chunk, CVE-2017-9993)
            # inherit this list: only the allowlisted containers may ever open.
            "-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST,
            *input_options(input_limits, probe),
            "-f", probe.demuxer, "-i", "file:" + os.path.abspath(input_path),
            "-filter_complex", graph]
    for opts in outputs:
        argv += opts
    return argv
