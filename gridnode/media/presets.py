"""
Outputs (``Preset``: one output a job makes, validated from typed fields by
``templates.py``) and the ffmpeg command line built from them. Plain data, no I/O.

``build_argv(ffmpeg, probe, input_path, out_dir, presets)`` returns ONE argv
that makes every requested output in a single ffmpeg process: the input is
decoded once and split in a filter graph, one branch per output (one per HLS
rung), and its audio likewise where an output trims or normalises it. On small
machines decoding is a large share of the work, and a single process gives one
progress figure and one thing to cancel.

Sizes follow these rules:

- a target is named by its short side (``720p`` means 1280x720 landscape or
  720x1280 portrait), computed from the display size (after rotation: ffmpeg
  autorotates while decoding, so filters see the displayed picture);
- never upscale: a source smaller than the target keeps its own size, and HLS
  rungs above the source's short side are dropped (the lowest rung is always
  kept, at the source size when the source is smaller still);
- the aspect ratio is kept and both sides are even (x264 and VP9 need it).

A clip without audio gets no audio map and no audio encoder. An audio output (``AUDIO_ONLY``:
m4a, opus) maps the audio alone, capped at its window's length (a header that lies short
is not believed); it is the only kind an input without video takes. The encoder options
per codec are in ``codecs.py``; a CMAF ladder's muxer options in ``cmaf.py``, a
storyboard's frames and sheets in ``storyboard.py``. Both write into a folder named as
the output, which must exist before ffmpeg starts (``folders``): the dash muxer and
image2 make none.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from gridnode.errors import GridnodeError
from gridnode.media import cmaf, storyboard
from gridnode.media.codecs import audio_chain, audio_options, video_options
from gridnode.media.grid import Cut, rate_filter
from gridnode.media.probe import FORMAT_WHITELIST, Limits, ProbeResult, input_options

Container = Literal["mp4", "webm", "mkv", "hls", "cmaf", "dash", "jpeg", "storyboard", "m4a", "opus"]
#: the containers of audio alone
AUDIO_ONLY = ("m4a", "opus")
#: the containers of a fragmented-MP4 ladder (``cmaf.py``): under HLS and DASH, or DASH alone
LADDERS = ("cmaf", "dash")

HLS_SEGMENT_SECONDS = 6
CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".jpg": "image/jpeg",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    **cmaf.CONTENT_TYPES,
    ".vtt": "text/vtt",
    ".m4a": "audio/mp4",
    ".opus": "audio/ogg",
}
EXTENSIONS = {"mp4": ".mp4", "webm": ".webm", "mkv": ".mkv", "jpeg": ".jpg", "m4a": ".m4a", "opus": ".opus"}
MUXERS = {"mp4": "mp4", "webm": "webm", "mkv": "matroska", "m4a": "ipod", "opus": "ogg"}
#: the only watermark images: one frame of PNG, read by its own demuxer and nothing else
WATERMARK_DEMUXER = "png_pipe"

# Options every argv starts with: no stdin, machine-readable progress on stdout.
COMMON_OPTIONS = ["-nostdin", "-hide_banner", "-y", "-progress", "pipe:1", "-nostats"]


@dataclass(frozen=True)
class OutputFile:
    """A file an output writes. ``name`` is relative to the output folder and
    may hold one ``*`` (HLS segments, whose count depends on the duration)."""

    name: str
    content_type: str


@dataclass(frozen=True)
class Rung:
    """One HLS variant."""

    name: str  # folder under the output's, e.g. "720p"
    short_side: int
    video_kbps: int
    audio_kbps: int = 96


@dataclass(frozen=True)
class Watermark:
    """An image laid over the picture: ``image`` as the spec names it (a file of the node's
    watermark folder), ``path`` where ``templates`` found it."""

    image: str
    path: str
    corner: str = "bottom-right"
    margin: int = 16


@dataclass(frozen=True)
class Preset:
    """One output of a job, every field checked (``templates.parse_output``)."""

    name: str
    container: Container
    video: str = "h264"  # h264, hevc, av1, vp9 (jpeg: unused)
    short_side: int = 720  # every container but hls: the target's short side
    ladder: tuple[Rung, ...] = ()  # hls only
    crf: int | None = None  # None: the codec's default (codecs.DEFAULT_CRF)
    max_kbps: int = 0  # a cap on the video's rate (0: none)
    fps: float = 0.0  # a cap on the frame rate (0: the source's)
    keyint: float = 0.0  # seconds between keyframes (0: the encoder's choice)
    speed: str = "fast"  # fastest, fast, medium, slow
    audio: str = "aac"  # aac, opus, or "" for none
    audio_kbps: int = 128
    loudness: float | None = None  # EBU R128 target, LUFS (None: left as it is)
    true_peak: float = -1.5  # dBTP, with a loudness target
    start: float = 0.0  # the clip's start and end in the input, seconds
    end: float | None = None
    at: float = 0.1  # jpeg: the frame at this fraction of the (clipped) duration
    interval: float = 0.0  # storyboard: seconds between tiles (0: by the duration)
    width: int = 160  # storyboard: a tile's width (a portrait video's: its height)
    watermark: Watermark | None = None
    #: the preset or template name a caller asked for ("" for an inline spec)
    template: str = ""

    def outputs(self, probe: ProbeResult) -> list[OutputFile]:
        """The files this output writes for ``probe``'s source."""
        if self.container == "hls":
            files = [OutputFile(f"{self.name}/master.m3u8", CONTENT_TYPES[".m3u8"])]
            for rung, _size in hls_rungs(probe, self.ladder):
                files.append(OutputFile(f"{self.name}/{rung.name}/index.m3u8", CONTENT_TYPES[".m3u8"]))
                files.append(OutputFile(f"{self.name}/{rung.name}/seg_*.ts", CONTENT_TYPES[".ts"]))
            return files
        if self.container in LADDERS:
            hls = self.container == "cmaf"
            named = cmaf.files(len(hls_rungs(probe, self.ladder)), probe.has_audio and bool(self.audio), self.name,
                               hls)
            if hls:
                named[:2] = named[1::-1]  # the HLS master first: the job lists it, and the manifest beside
            return [OutputFile(name, kind) for name, kind in named]
        if self.container == "storyboard":
            return [OutputFile(f"{self.name}/{os.path.basename(storyboard.VTT)}", CONTENT_TYPES[".vtt"]),
                    OutputFile(f"{self.name}/{os.path.basename(storyboard.SHEET).replace('%03d', '*')}",
                               CONTENT_TYPES[".jpg"])]
        ext = EXTENSIONS[self.container]
        return [OutputFile(self.name + ext, CONTENT_TYPES[ext])]

    def window(self, probe: ProbeResult) -> tuple[float, float]:
        """Start and end of what this output takes of the input, in seconds."""
        whole = probe.converted_duration
        end = whole if self.end is None else min(self.end, whole)
        return min(self.start, whole), end

    def expected_duration(self, probe: ProbeResult) -> float | None:
        """How long this output should last (None for an image)."""
        if self.container in ("jpeg", "storyboard"):
            return None
        start, end = self.window(probe)
        return max(0.0, end - start)

    @property
    def clipped(self) -> bool:
        return self.start > 0 or self.end is not None

    @property
    def needs_video(self) -> bool:
        return self.container not in AUDIO_ONLY


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


def storyboard_plan(probe: ProbeResult, preset: Preset) -> storyboard.Plan:
    """The storyboard ``preset`` makes of ``probe``'s source: ffmpeg's sheets and the node's
    VTT both follow it."""
    return storyboard.plan(probe.converted_duration, (probe.display_width, probe.display_height),
                           interval=preset.interval, width=preset.width)


def poster_time(probe: ProbeResult, preset: Preset) -> float:
    """Where a jpeg output's frame is: the first at or after this time, seconds."""
    start, end = preset.window(probe)
    return start + preset.at * (end - start)


def folders(presets: Iterable[Preset]) -> list[str]:
    """The sub-folders of the output folder to make before ffmpeg starts (CMAF, storyboards)."""
    return [p.name for p in dict.fromkeys(presets) if p.container in (*LADDERS, "storyboard")]


def default_output_limit(probe: ProbeResult) -> int:
    """``-fs`` per output: generous next to any sane encode of this input."""
    return max(256 * 1024 * 1024, 4 * probe.size)


def job_output_limit(probe: ProbeResult, presets: Iterable[Preset], per_output: int | None = None) -> int:
    """What a job's outputs may hold together: ``per_output`` (default ``default_output_limit``)
    for each output, an HLS rung counting as one. ``-fs`` bounds each mp4, webm, mkv and jpeg
    file but no HLS segment list, so this total is what bounds HLS."""
    limit = per_output if per_output is not None else default_output_limit(probe)
    count = sum(len(hls_rungs(probe, p.ladder)) if p.container in ("hls", *LADDERS) else 1
                for p in dict.fromkeys(presets))
    return limit * count


def output_too_large(limit: int, total: int | None = None, files: int | None = None) -> GridnodeError:
    """A job's outputs passed ``job_output_limit``: ``total`` bytes or ``files`` files written."""
    what = f"; {files} files written" if files is not None else f"; {total} bytes written" if total else ""
    return GridnodeError(f"the outputs of this job passed their limit ({limit} bytes together{what}); "
                         "convert a shorter video or fewer presets",
                         code="output_too_large", status=413)


def _num(x: float) -> str:
    """A number for a filter argument: fixed point, no exponent, millisecond precision."""
    r = round(x, 3)
    return f"{int(r)}.0" if r == int(r) else f"{r:.3f}".rstrip("0")


def _scale(w: int, h: int) -> str:
    return f"scale={w}:{h}:flags=bicubic,setsar=1"


_CORNERS = {
    "top-left": ("{m}", "{m}"),
    "top-right": ("W-w-{m}", "{m}"),
    "bottom-left": ("{m}", "H-h-{m}"),
    "bottom-right": ("W-w-{m}", "H-h-{m}"),
}


class _Graph:
    """The filter graph under construction: video branches off one split of the decoded
    input, audio branches off one split of its first audio stream, one -i per watermark."""

    def __init__(self, probe: ProbeResult, cut: Cut | None = None) -> None:
        self.probe = probe
        self.cut = cut
        self.video: list[list[str]] = []  # per branch: statements, "{src}" for its split label
        self.audio: list[str] = []  # per branch: a chain
        self.images: list[str] = []  # watermark paths, input 1, 2, ...

    def video_branch(self, preset: Preset, size: tuple[int, int], *, frame_at: float | None = None,
                     dar: tuple[int, int] | None = None, rate: float | None = None) -> str:
        """Add a branch for ``preset`` at ``size`` (shown at ``dar``, width/height, if given; made
        at the constant frame ``rate`` if given); its output label."""
        i = len(self.video)
        start, end = preset.window(self.probe)
        # The frame rate first, on the input's own timestamps (after a trim, ffmpeg 5.1's fps
        # filter would pad the clip to where its input ended), then a chunk's slots of its grid.
        if preset.container == "jpeg":
            chain = []
        elif rate is not None:  # an AV1 ladder's own rate: SVT-AV1 counts its keyframe interval in frames
            chain = [f"fps={_num(rate)}"]
        else:
            chain = rate_filter(self.probe, preset.fps)
        if self.cut is not None and chain:
            chain.append(self.cut.trim())
        # Rebase timestamps first so clip times hold for streams that do not start at 0.
        # (a chunk's frames carry the whole's timestamps already: its first is not the whole's)
        chain += ["setpts=PTS-STARTPTS"] if (preset.clipped or frame_at is not None) and self.cut is None else []
        if frame_at is not None:
            chain.append(f"trim=start={_num(frame_at)}")
        elif preset.clipped:
            chain += [f"trim=start={_num(start)}:end={_num(end)}", "setpts=PTS-STARTPTS"]
        chain.append(_scale(*size))
        if dar is not None:
            chain.append(f"setdar={dar[0]}/{dar[1]}")
        if preset.watermark is None:
            if preset.container != "jpeg":
                chain.append("format=yuv420p")
            self.video.append(["{src}" + ",".join(chain) + f"[v{i}]"])
            return f"[v{i}]"
        mark = preset.watermark
        self.images.append(mark.path)
        x, y = (c.format(m=mark.margin) for c in _CORNERS[mark.corner])
        tail = "" if preset.container == "jpeg" else ",format=yuv420p"
        statements = ["{src}" + ",".join(chain) + f"[p{i}]",
                      f"[p{i}][{len(self.images)}:v:0]overlay=x={x}:y={y}{tail}[v{i}]"]
        self.video.append(statements)
        return f"[v{i}]"

    def branch(self, chain: str) -> str:
        """Add a video branch of its own ``chain`` (a storyboard's); its output label."""
        self.video.append(["{src}" + chain + f"[v{len(self.video)}]"])
        return f"[v{len(self.video) - 1}]"

    def audio_source(self, preset: Preset, tail: str = "") -> str:
        """What an output maps for its audio: the input's stream as it is, or a branch trimmed
        and normalised as ``preset`` asks, then ``tail``."""
        chain = ",".join(c for c in (audio_chain(preset, *preset.window(self.probe)), tail) if c)
        if not chain:
            return "0:a:0"
        self.audio.append(chain)
        return f"[a{len(self.audio) - 1}]"

    def text(self) -> str:
        parts = []
        video = "[0:v:0]" if self.cut is None or not self.cut.seek else f"[0:v:0]setpts=PTS+{self.cut.seek}/TB,"
        for source, branches, name in ((video, [b[0] for b in self.video], "split"),
                                       ("[0:a:0]", self.audio, "asplit")):
            if not branches:
                continue
            if len(branches) == 1:
                labels = [source]
            else:
                prefix = "s" if name == "split" else "t"
                labels = [f"[{prefix}{i}]" for i in range(len(branches))]
                parts.append(f"{source}{name}={len(branches)}{''.join(labels)}")
            if name == "split":
                for label, statements in zip(labels, self.video, strict=True):
                    parts.append(statements[0].replace("{src}", label, 1))
                    parts.extend(statements[1:])
            else:
                parts.extend(f"{label}{chain}[a{i}]" for i, (label, chain) in enumerate(zip(labels, branches,
                                                                                           strict=True)))
        return ";".join(parts)


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
    cut: Cut | None = None,
) -> list[str]:
    """One ffmpeg argv writing every output under ``out_dir`` (of a chunk's frames alone with
    ``cut``: video outputs only, and each must go through a ``rate_filter``).

    ``out_dir`` and its ``folders`` must exist (HLS sub-folders are made by ffmpeg). Outputs are
    named as ``Preset.outputs`` says. ``max_output_bytes`` is ``-fs`` for each
    output (default ``default_output_limit``); ``threads`` caps each encoder's
    threads (``-threads``, and x265's and SVT-AV1's own pools), for nodes running
    several jobs at once. The decoder stops at a frame over ``input_limits.max_pixels``,
    the demuxer at a stream past ``input_limits.max_streams`` (``probe.input_options``).
    A clip that starts past the input's end is ``bad_spec``.
    """
    chosen = list(dict.fromkeys(presets))
    if not chosen:
        raise GridnodeError("no preset chosen", code="unknown_preset", status=400)
    limit = str(max_output_bytes if max_output_bytes is not None else default_output_limit(probe))
    audio = probe.has_audio
    graph = _Graph(probe, cut)
    outputs: list[list[str]] = []
    for preset in chosen:
        start, end = preset.window(probe)
        if preset.clipped and end - start < 0.05:
            raise GridnodeError(f"{preset.name}: the clip {_num(preset.start)}-{_num(end)} s holds nothing of the "
                                f"input's {probe.converted_duration:.1f} s; clip within it", code="bad_spec",
                                status=400)
        if preset.container == "hls":
            outputs.append(_hls(graph, preset, out_dir, limit, threads, audio))
            continue
        if preset.container in LADDERS:
            outputs.append(_cmaf(graph, preset, out_dir, threads, audio))
            continue
        if preset.container == "storyboard":
            board = storyboard_plan(probe, preset)
            if cut is None:
                label = graph.branch(storyboard.chain(board))
                outputs.append(storyboard.output_options(out_dir, label, preset.name))
            elif (tiles := storyboard.tiles_of(board, cut.start, cut.stop))[1]:  # a chunk's tiles alone
                label = graph.branch(storyboard.chunk_chain(board, *tiles, last=cut.end is None))
                outputs.append(storyboard.tiles_options(os.path.join(out_dir, preset.name + ".mkv"), label))
            continue
        target = os.path.join(out_dir, preset.outputs(probe)[0].name)
        if preset.container in AUDIO_ONLY:
            outputs.append(["-map", graph.audio_source(preset), *audio_options(preset.audio, preset.audio_kbps),
                            *(["-movflags", "+faststart"] if preset.container == "m4a" else []),
                            "-t", _num(end - start + 1), "-f", MUXERS[preset.container], "-fs", limit, target])
            continue
        size = target_size(probe, preset.short_side)
        if preset.container == "jpeg":
            at = poster_time(probe, preset)
            if cut is not None and not cut.holds(at):  # made by the chunk that holds its frame
                continue
            label = graph.video_branch(preset, size, frame_at=at)
            outputs.append(["-map", label, "-frames:v", "1", "-c:v", "mjpeg", "-q:v", "3",
                            "-f", "image2", "-update", "1", "-fs", limit, target])
            continue
        opts = ["-map", graph.video_branch(preset, size)]
        if audio and preset.audio:
            opts += ["-map", graph.audio_source(preset)]
        opts += video_options(preset, threads, probe.frame_rate)
        if audio and preset.audio:
            opts += audio_options(preset.audio, preset.audio_kbps)
        if preset.container == "mp4":
            opts += ["-movflags", "+faststart"]
        outputs.append([*opts, "-f", MUXERS[preset.container], "-fs", limit, target])

    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error",
            # Nested demuxers (an HLS playlist hidden in an AVI GAB2 chunk, CVE-2017-9993)
            # inherit this list: only the allowlisted containers may ever open.
            "-protocol_whitelist", "file", "-format_whitelist", FORMAT_WHITELIST,
            *input_options(input_limits, probe),
            *(["-ss", str(cut.seek), "-noaccurate_seek"] if cut is not None and cut.seek else []),
            "-f", probe.demuxer, "-i", "file:" + os.path.abspath(input_path)]
    for image in graph.images:
        # An operator's file, yet read as any input is: one demuxer, the file protocol.
        argv += ["-protocol_whitelist", "file", "-format_whitelist", WATERMARK_DEMUXER,
                 "-f", WATERMARK_DEMUXER, "-i", "file:" + image]
    text = graph.text()
    argv += ["-filter_complex", text] if text else []
    for opts in outputs:
        argv += opts
    return argv


def _hls(graph: _Graph, preset: Preset, out_dir: str, limit: str, threads: int | None, audio: bool) -> list[str]:
    """A TS HLS ladder: one video branch per rung, bitrates per rung, keyframes on segment
    boundaries so every rung cuts at the same times."""
    rungs = hls_rungs(graph.probe, preset.ladder)
    opts: list[str] = []
    var_map = []
    for i, (rung, size) in enumerate(rungs):
        opts += ["-map", graph.video_branch(preset, size)]
        if audio and preset.audio:
            opts += ["-map", graph.audio_source(preset)]
        var_map.append(f"v:{i},a:{i},name:{rung.name}" if audio and preset.audio else f"v:{i},name:{rung.name}")
    opts += ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main",
             *(["-threads", str(threads)] if threads else [])]
    for i, (rung, _size) in enumerate(rungs):
        # A bitrate per variant: ffmpeg 5.1 leaves a variant out of the
        # master playlist when it cannot state its BANDWIDTH.
        opts += [f"-b:v:{i}", f"{rung.video_kbps}k", f"-maxrate:v:{i}", f"{rung.video_kbps}k",
                 f"-bufsize:v:{i}", f"{2 * rung.video_kbps}k"]
        if audio and preset.audio:
            opts += [f"-b:a:{i}", f"{rung.audio_kbps}k"]
    opts += ["-force_key_frames", f"expr:gte(t,n_forced*{HLS_SEGMENT_SECONDS})"]
    if audio and preset.audio:
        opts += ["-c:a", "aac", "-ac", "2"]
    return opts + hls_muxer(os.path.join(out_dir, preset.name), var_map, limit)


def hls_muxer(hls_dir: str, var_map: Sequence[str], limit: str) -> list[str]:
    """The HLS muxer's options: ``var_map`` the variants (``v:0,a:0,name:720p``), segments and
    playlists under ``hls_dir`` (a split job's stitch muxes the same way)."""
    return ["-f", "hls", "-hls_time", str(HLS_SEGMENT_SECONDS), "-hls_playlist_type", "vod",
            "-var_stream_map", " ".join(var_map), "-master_pl_name", "master.m3u8",
            "-hls_segment_filename", os.path.join(hls_dir, "%v", "seg_%03d.ts"),
            "-fs", limit, os.path.join(hls_dir, "%v", "index.m3u8")]


def _cmaf(graph: _Graph, preset: Preset, out_dir: str, threads: int | None, audio: bool) -> list[str]:
    """A CMAF ladder (``dash``: under the DASH manifest alone): one video branch per rung,
    keyframes on every segment boundary, one audio rendition cut just before the video's end
    (``cmaf.audio_chain``). AV1 rungs are made at a constant rate: SVT-AV1 places its
    keyframes by frame count."""
    kept = hls_rungs(graph.probe, preset.ladder)
    rate = cmaf.ladder_rate(graph.probe.frame_rate, preset.fps) if preset.video == "av1" else None
    # Rounded to even sides, rungs differ in aspect by a hair, and the dash muxer refuses that
    # in one adaptation set: every rung is shown at the top rung's aspect (a pixel a hair wide).
    top = kept[0][1]
    rungs = [cmaf.CmafRung(graph.video_branch(preset, size, dar=top, rate=rate), *size, rung.video_kbps)
             for rung, size in kept]
    video = cmaf.video_options(preset.video, threads, rate)
    segment = cmaf.segment_length(rate)
    hls = preset.container == "cmaf"
    if not (audio and preset.audio):
        return cmaf.output_options(out_dir, rungs, video=video, audio=None, segment=segment, folder=preset.name,
                                   hls=hls)
    start, end = preset.window(graph.probe)
    label = graph.audio_source(preset, cmaf.audio_chain(end - start))
    return cmaf.output_options(out_dir, rungs, video=video, audio=["-c:a", "aac"], audio_label=label,
                               audio_kbps=preset.audio_kbps, segment=segment, folder=preset.name, hls=hls)
