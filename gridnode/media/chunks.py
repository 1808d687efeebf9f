"""
Split-and-stitch, the plan: whether a job's video is made in chunks, where each chunk starts
and ends, and the ffmpeg argv of each chunk and of the job's audio. Plain data,
no I/O.

Cuts. Every video output goes through an fps filter (``grid.rate_filter``), so an output's
frames sit on a grid of slots, one per 1/rate s, and which source frame fills a slot depends on
timestamps alone. A chunk is a range of slots ``[first, end)``. Cut points are taken on the
outputs' keyframe grid: the least common multiple of every HLS/CMAF segment length and every
``keyint`` (whole seconds where no output asks for one), about ``chunk_seconds`` apart; a cut
at ``g`` s is the slot the whole encode forces a keyframe on (the first slot whose time, as
ffmpeg computes it, is at least ``g``), so no HLS or CMAF segment straddles a seam.

Why frame-exact. A chunk's ffmpeg seeks its input to a whole second at least ``PREROLL`` s
before the cut (``-noaccurate_seek``: from the keyframe at or before it, every frame kept, so
open GOPs and B-frames decode as they would have), puts the whole's timestamps back
(``setpts=PTS+seek/TB``), runs the whole's filter chain (the same fps filter sees the same
timestamps and fills the same slots), and keeps its slots alone (``trim`` on the slot numbers,
integers in the fps filter's time base). Its keyframes are forced on the same slots as the
whole's, from the chunk's start: the chunk's own first frame is one (a closed GOP), the rest
are listed. The encoder and its options are the whole's: the argv is ``presets.build_argv``'s
with a ``Cut``. Audio is made once for the whole job (``audio_argv``); a poster is made by
the chunk that holds its frame, a storyboard's tiles by the chunks that hold theirs (laid out in
sheets by the stitch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction

from gridnode.media import cmaf
from gridnode.media.codecs import audio_chain, audio_options
from gridnode.media.grid import Cut
from gridnode.media.presets import (
    COMMON_OPTIONS,
    HLS_SEGMENT_SECONDS,
    MUXERS,
    Preset,
    build_argv,
    default_output_limit,
    hls_rungs,
    poster_time,
)
from gridnode.media.probe import FORMAT_WHITELIST, Limits, ProbeResult, input_options

#: seconds decoded before a chunk's first slot, at least: the fps filter needs a frame before
#: the cut to fill a slot that falls in a gap of a variable-rate source
PREROLL = 1
#: default chunk length and threshold (the node's flags, once wired: --chunk-seconds, --chunk-over)
CHUNK_SECONDS = 60.0
CHUNK_OVER = 300.0
#: the outputs made in chunks and stitched (``stitch.py``)
CHUNKED = ("mp4", "webm", "mkv", "hls", "cmaf", "storyboard", "jpeg")
#: what a chunk makes beside video: the images of the frames it holds
IMAGES = ("storyboard", "jpeg")
#: the demuxers that seek to the keyframe at or before a time by an index (mp4/mov's sample
#: table, matroska's cues): others estimate, and a seek landing past its target would lose frames
SEEKABLE = ("mov", "matroska")
#: the audio file the audio pass writes per output, by container: one the stitch can copy from
AUDIO_FILES = {"mp4": ("m4a", "mp4"), "mkv": ("mka", "matroska"), "webm": ("webm", "webm")}


@dataclass(frozen=True)
class Chunk:
    """Slots ``first`` to ``end`` (exclusive; None: to the end of the video) at ``rate``."""

    index: int
    first: int
    end: int | None
    rate: Fraction

    @property
    def start(self) -> Fraction:
        """The chunk's first slot's time, seconds from the video's start."""
        return self.first / self.rate

    @property
    def seek(self) -> int:
        """Where its decoder starts: a whole second at least ``PREROLL`` before the cut (whole
        seconds shift every time base's timestamps by whole ticks)."""
        return max(0, math.floor(self.start) - PREROLL)

    @property
    def cut(self) -> Cut:
        stop = None if self.end is None else float(self.end / self.rate)
        return Cut(self.seek, self.first, self.end, float(self.start), stop)

    @property
    def frames(self) -> int | None:
        """How many frames each of its outputs holds (None: to the end, not known here)."""
        return None if self.end is None else self.end - self.first

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else float((self.end - self.first) / self.rate)

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "first": self.first, "end": self.end, "start": round(float(self.start), 6)}


@dataclass(frozen=True)
class Plan:
    """A job's chunks (one: made whole), the slot rate, the seconds between allowed cuts, and
    why it is not chunked ("" when it is)."""

    chunks: tuple[Chunk, ...]
    rate: Fraction | None
    step: Fraction
    reason: str = ""

    @property
    def chunked(self) -> bool:
        return len(self.chunks) > 1

    def to_json(self) -> dict[str, object]:
        return {"chunked": self.chunked, "reason": self.reason, "step": float(self.step),
                "chunks": [c.to_json() for c in self.chunks]}


def cut_step(presets: Iterable[Preset]) -> Fraction:
    """Seconds between the cut points every output allows: the least common multiple of their
    segment lengths and keyframe intervals (1 s where none asks for one)."""
    steps = [keyframe_step(p) for p in presets]
    return _lcm([s for s in steps if s is not None] or [Fraction(1)])


def keyframe_step(preset: Preset) -> Fraction | None:
    """Seconds between the keyframes the whole forces on ``preset``'s output; None: none forced."""
    if preset.container == "hls":
        return Fraction(HLS_SEGMENT_SECONDS)
    if preset.container == "cmaf":
        return Fraction(cmaf.SEGMENT_SECONDS)
    if preset.container in ("mp4", "webm", "mkv") and preset.keyint:
        return Fraction(format(preset.keyint, "g"))
    return None


def _lcm(values: Sequence[Fraction]) -> Fraction:
    out = values[0]
    for v in values[1:]:
        num = out.numerator * v.numerator // math.gcd(out.numerator, v.numerator)
        out = Fraction(num, math.gcd(out.denominator, v.denominator))
    return out


def keyframe_slot(seconds: Fraction, rate: Fraction) -> int:
    """The first slot whose time, as ffmpeg's ``force_key_frames`` expression sees it (the slot
    number times the time base, in doubles), is at least ``seconds``."""
    tick = rate.denominator / rate.numerator  # av_q2d of the encoder's time base, 1/rate
    target = float(seconds)
    n = math.ceil(seconds * rate)
    while n > 0 and (n - 1) * tick >= target:
        n -= 1
    while n * tick < target:
        n += 1
    return n


def plan(probe: ProbeResult, presets: Sequence[Preset], *, chunk_seconds: float = CHUNK_SECONDS,
         chunk_over: float | None = CHUNK_OVER) -> Plan:
    """Chunks of about ``chunk_seconds`` for a job of ``presets`` on ``probe``'s source, when it
    lasts longer than ``chunk_over`` s (0: always; None: never); one chunk otherwise."""
    chosen = list(dict.fromkeys(presets))
    video = [p for p in chosen if p.container in CHUNKED]
    step = cut_step(video)
    rate = probe.rate
    duration = probe.converted_duration

    def whole(reason: str) -> Plan:
        return Plan((Chunk(0, 0, None, rate or Fraction(1)),), rate, step, reason)

    if chunk_over is None:
        return whole("chunking is off")
    if duration <= chunk_over:
        return whole(f"the video is not longer than {chunk_over:g} s")
    if not probe.has_video:
        return whole("an input without video is made whole (its audio is one pass anyway)")
    if rate is None:
        return whole("the video's frame rate is unknown")
    if probe.demuxer not in SEEKABLE:
        return whole(f"a {probe.container} input is made whole (no keyframe index to seek by)")
    if not any(p.container not in IMAGES for p in video):
        return whole("no output is a video")
    if any(p.clipped for p in video):
        return whole("a clipped output is made whole")
    if any(p.video == "av1" and p.container in ("cmaf", "dash") for p in presets):
        return whole("an AV1 ladder is made whole (SVT-AV1 places its keyframes by count, not on the cuts)")
    if any(p.container not in CHUNKED for p in presets):
        return whole("an output of this container is made whole")
    spacing = step * max(1, round(Fraction(chunk_seconds) / step))
    # The last cut leaves at least half a chunk (and a second) of video after it: a probe's
    # duration may run past the video's last frame.
    last = Fraction(duration) - max(spacing / 2, Fraction(1))
    cuts = []
    g = spacing
    while g <= last:
        cuts.append(keyframe_slot(g, rate))
        g += spacing
    bounds = [0, *cuts]
    chunks = tuple(Chunk(i, first, bounds[i + 1] if i + 1 < len(bounds) else None, rate)
                   for i, first in enumerate(bounds))
    return Plan(chunks, rate, step, "" if len(chunks) > 1 else "the video is shorter than two chunks")


def video_presets(presets: Iterable[Preset]) -> list[Preset]:
    """The outputs a chunk makes: each video output without its audio, storyboard tiles, posters."""
    return [replace(p, audio="") for p in dict.fromkeys(presets) if p.container in CHUNKED]


def chunk_argv(ffmpeg: str, probe: ProbeResult, input_path: str, out_dir: str, presets: Iterable[Preset],
               chunk: Chunk, *, threads: int | None = None, max_output_bytes: int | None = None,
               input_limits: Limits = Limits()) -> list[str]:
    """The argv making ``chunk``'s video of every video output under ``out_dir`` (named as the
    whole names them; ``presets.folders`` made first). Its keyframes: the chunk's first frame,
    and the slots the whole forces one on, listed from the chunk's start."""
    chosen = video_presets(presets)
    argv = build_argv(ffmpeg, probe, input_path, out_dir, chosen, max_output_bytes=max_output_bytes,
                      threads=threads, input_limits=input_limits, cut=chunk.cut)
    forced = [p for p in chosen if keyframe_step(p) is not None]
    at = [i for i, a in enumerate(argv) if a == "-force_key_frames"]
    if len(at) != len(forced):  # build_argv's outputs and ours disagree: a bug, not an input
        raise AssertionError(f"{len(at)} -force_key_frames for {len(forced)} outputs")
    for i, preset in zip(at, forced, strict=True):
        step = keyframe_step(preset)
        assert step is not None
        argv[i + 1] = chunk_keyframes(chunk, step)
    # An HLS ladder's chunk is one mp4 of its rungs' video: the stitch muxes the joined rungs
    # with the audio into the whole's segments (MPEG-TS segments hold the audio too).
    at = [i for i, a in enumerate(argv) if a == "-f" and argv[i + 1] == "hls"]
    for i, preset in reversed(list(zip(at, [p for p in chosen if p.container == "hls"], strict=True))):
        end = argv.index("-fs", i)
        argv[i:end + 3] = ["-f", "mp4", "-fs", argv[end + 1], os.path.join(out_dir, preset.name + ".mp4")]
    # CMAF segments keep the whole's timestamps, so they join as they are.
    for i in reversed([i for i, a in enumerate(argv) if a == "-f" and argv[i + 1] == "dash"]):
        argv[i:i] = ["-output_ts_offset", f"{float(chunk.start):.6f}",
                     # each fragment's tfdt from its first frame's time, as the whole's has it, and
                     # no edit list that would shift the chunk's start instead
                     "-format_options", "movflags=+frag_discont"]
    return argv


def chunk_keyframes(chunk: Chunk, step: Fraction) -> str:
    """``-force_key_frames``' list for ``chunk``: the times, from its start, of the slots the
    whole forces a keyframe on every ``step`` s (microseconds: ffmpeg rounds each to its slot)."""
    rate = chunk.rate
    slots = []
    n = math.floor(chunk.start / step)
    while True:
        slot = keyframe_slot(n * step, rate)
        if chunk.end is not None and slot >= chunk.end:
            break
        if slot >= chunk.first:
            slots.append(slot - chunk.first)
        n += 1
        if chunk.end is None and n * step > chunk.start + 4 * 3600:  # bounded; a probe's limit
            break
    return ",".join(f"{float(s / rate):.6f}" for s in slots or [0])


def audio_file(preset: Preset) -> str:
    """The name of ``preset``'s audio, made by the audio pass, in the job's work folder: a file,
    or for CMAF a folder of segments under its own manifest."""
    if preset.container == "cmaf":
        return f"audio-{preset.name}"
    if preset.container == "hls":
        return f"audio-{preset.name}.m4a"
    ext, _muxer = AUDIO_FILES[preset.container]
    return f"audio-{preset.name}.{ext}"


def audio_presets(probe: ProbeResult, presets: Iterable[Preset]) -> list[Preset]:
    """The outputs whose audio the audio pass makes: every video output with audio."""
    return [p for p in dict.fromkeys(presets)
            if probe.has_audio and p.audio and (p.container in AUDIO_FILES or p.container in ("cmaf", "hls"))]


def audio_argv(ffmpeg: str, probe: ProbeResult, input_path: str, work_dir: str, presets: Iterable[Preset],
               *, threads: int | None = None, input_limits: Limits = Limits()) -> list[str] | None:
    """One argv encoding the audio of every output that has some, as the whole would (its chain,
    encoder and rate), one file each (``audio_file``); None when no output has audio."""
    chosen = audio_presets(probe, presets)
    if not chosen:
        return None
    limit = str(default_output_limit(probe))
    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error", "-protocol_whitelist", "file",
            "-format_whitelist", FORMAT_WHITELIST, *input_options(input_limits, probe),
            "-f", probe.demuxer, "-i", "file:" + os.path.abspath(input_path)]
    for p in chosen:
        start, end = p.window(probe)
        chain = ",".join(c for c in (audio_chain(p, start, end),
                                     cmaf.audio_chain(end - start) if p.container == "cmaf" else "") if c)
        opts = ["-map", "0:a:0", "-vn", *(["-af", chain] if chain else [])]
        if p.container == "cmaf":  # the whole's audio rendition, in a manifest of its own
            argv += [*opts, *cmaf.output_options(work_dir, [], video=[], audio=["-c:a", "aac"], audio_kbps=p.audio_kbps,
                                                 folder=audio_file(p))]
            continue
        if p.container == "hls":  # one audio stream per rung, at the rung's rate, as the whole's
            rungs = hls_rungs(probe, p.ladder)
            argv += [x for _ in rungs for x in ("-map", "0:a:0")]
            for i, (rung, _size) in enumerate(rungs):
                argv += [*([f"-filter:a:{i}", chain] if chain else []), f"-b:a:{i}", f"{rung.audio_kbps}k"]
            argv += ["-vn", "-c:a", "aac", "-ac", "2", "-f", "mp4", "-fs", limit, os.path.join(work_dir, audio_file(p))]
            continue
        _ext, muxer = AUDIO_FILES[p.container]
        argv += [*opts, *audio_options(p.audio, p.audio_kbps), "-f", muxer, "-fs", limit,
                 os.path.join(work_dir, audio_file(p))]
    return argv


def poster_chunk(probe: ProbeResult, preset: Preset, chunks: Sequence[Chunk]) -> Chunk:
    """The chunk that makes a jpeg output: the one whose time range holds its frame's time."""
    at = poster_time(probe, preset)
    return next((c for c in chunks if c.cut.holds(at)), chunks[-1])


def muxer_of(preset: Preset) -> str:
    return MUXERS[preset.container]


def chunk_over_setting(value: object) -> float | None:
    """``--chunk-over``: seconds of input a job must pass to be made in chunks (0: every job),
    or ``off`` (None: none)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    seconds = _seconds(value, "must be 'off' or a number of seconds, 0 or more, such as 300")
    if not 0 <= seconds <= 7 * 24 * 3600:
        raise ValueError("must be 'off' or between 0 and 604800 seconds")
    return seconds


def chunk_seconds_setting(value: object) -> float:
    """``--chunk-seconds``: about how long each chunk is (cuts fall on the outputs' keyframe grid)."""
    seconds = _seconds(value, "must be a number of seconds, such as 60")
    if not 1 <= seconds <= 24 * 3600:
        raise ValueError("must be between 1 and 86400 seconds (a chunk is at least a second of video)")
    return seconds


def _seconds(value: object, message: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(message)
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(message) from None
    if not math.isfinite(seconds):
        raise ValueError(message)
    return seconds
