"""
CMAF: one set of fragmented-MP4 segments under both an HLS master playlist and a DASH
manifest. Plain data, no I/O.

ffmpeg's ``dash`` muxer writes the segments, ``manifest.mpd`` and (``-hls_playlist``) an HLS
master and one media playlist per stream, all naming the same ``init-N.m4s`` and
``seg-N-NNNNN.m4s`` files: no media is written twice. Video rungs are one adaptation set, the
audio a separate rendition (its own adaptation set; ``EXT-X-MEDIA`` in the master), so every
rung shares one audio track.

The audio is cut to end a little before the video (``audio_chain``): hls.js ends a stream
only once every track's last fragment is buffered, and audio past the video's end lies past
the media's duration, where it is never buffered, so the player would stall a frame before
the end.

Segment boundaries must fall at the same times on every rung, or a player switching rungs
would skip or repeat media. x264 and x265 are told to put a keyframe at every multiple of the
segment length and nowhere it would start a segment early (``keyframe_options``), and the
muxer cuts at the first keyframe past each segment length. SVT-AV1 1.4 ignores forced
keyframes: it gets a fixed keyframe interval in frames (closed GOPs, no scene cuts) on rungs
made constant-rate (``ladder_rate``), and the muxer is told the segment length that interval
makes (``segment_length``: 4.004 s at 29.97 fps).

The dash muxer of ffmpeg 5.1 states an HEVC stream's codec as a bare ``hvc1``, which players'
codec checks refuse: once ffmpeg is done, the node reads each rung's codec string (RFC 6381)
from its init segment (``headers.codec_string``) and writes it into both manifests
(``mpd_with_codecs``, ``master_with_codecs``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

#: seconds per segment: short enough for a quick start and rung switches, long enough that
#: a two-hour video stays under a few thousand files per rung
SEGMENT_SECONDS = 4
FOLDER = "cmaf"
MANIFEST = f"{FOLDER}/manifest.mpd"
MASTER = f"{FOLDER}/master.m3u8"
CONTENT_TYPES = {".mpd": "application/dash+xml", ".m4s": "video/iso.segment"}
#: how much sooner than the video the audio ends: two AAC frames at 44.1 kHz (the encoder's
#: priming shifts the audio by one), inaudible at the end of a video
AUDIO_MARGIN = 0.05
#: the video codecs a ladder may use and their encoders
ENCODERS = {"h264": "libx264", "hevc": "libx265", "av1": "libsvtav1"}
#: SVT-AV1's preset for ladders: near x264's veryfast in speed
AV1_PRESET = "10"
#: the frame rate of AV1 rungs when the source states none
DEFAULT_RATE = 25.0
#: the most a manifest may hold for the node to rewrite its codecs (a few KiB for 8 rungs)
MAX_MANIFEST = 256 * 1024


@dataclass(frozen=True)
class CmafRung:
    """One video rung: its output label in the filter graph, size and bitrate (the manifests
    must state a bandwidth for every representation)."""

    label: str
    width: int
    height: int
    video_kbps: int


def keyframe_options(encoder: str, segment: float = SEGMENT_SECONDS) -> list[str]:
    """x264's options that put a keyframe exactly at every segment boundary and no scene-cut
    keyframe that could cut a segment elsewhere (segments are closed GOPs either way); x265's
    scene cuts are off in its own parameters (``video_options``)."""
    opts = ["-force_key_frames", f"expr:gte(t,n_forced*{segment:g})"]
    if encoder == "libx264":
        opts += ["-sc_threshold", "0"]
    return opts


def ladder_rate(source: float | None, cap: float = 0.0) -> float:
    """The constant frame rate of AV1 rungs: the source's (``cap`` at most), to the millisecond
    as the ``fps`` filter is given it."""
    rate = source if source and source > 0 else DEFAULT_RATE
    return round(min(rate, cap) if cap else rate, 3)


def keyframe_interval(rate: float, segment: float = SEGMENT_SECONDS) -> int:
    """Frames between AV1 keyframes: the segment length's worth."""
    return max(1, round(segment * rate))


def segment_length(rate: float | None, segment: float = SEGMENT_SECONDS) -> float:
    """Seconds the muxer is told per segment: ``segment`` where keyframes are forced by time
    (``rate`` None); else the keyframe interval's length, rounded DOWN to 0.1 ms so that every
    keyframe lies at or past its boundary (the muxer cuts at the first keyframe at or past
    each multiple). The manifests state this length: a 2-hour video drifts by under 0.2 s."""
    if rate is None:
        return float(segment)
    return math.floor(keyframe_interval(rate, segment) / rate * 10_000) / 10_000


def video_options(codec: str, threads: int | None, rate: float | None = None,
                  segment: float = SEGMENT_SECONDS) -> list[str]:
    """The encoder and its options for a ladder of ``codec``: keyframes on the segment
    boundaries only, closed GOPs. ``rate``: AV1's constant frame rate (``ladder_rate``)."""
    if codec == "h264":
        return ["-c:v", "libx264", "-preset", "veryfast", "-profile:v", "main",
                *(["-threads", str(threads)] if threads else []), *keyframe_options("libx264", segment)]
    if codec == "hevc":
        params = ["log-level=error", "scenecut=0", "open-gop=0"]
        params += [f"pools={threads}", "frame-threads=1"] if threads else []
        return ["-c:v", "libx265", "-preset", "veryfast", "-tag:v", "hvc1", "-x265-params", ":".join(params),
                *keyframe_options("libx265", segment)]
    if codec == "av1":
        # irefresh-type=2: every keyframe a KEY frame (closed GOP); scd=0: no scene-cut keyframes
        params = [f"keyint={keyframe_interval(rate or DEFAULT_RATE, segment)}", "irefresh-type=2", "scd=0"]
        params += [f"lp={threads}"] if threads else []
        return ["-c:v", "libsvtav1", "-preset", AV1_PRESET, "-svtav1-params", ":".join(params)]
    raise ValueError(f"no CMAF encoder for {codec!r}")


def audio_chain(video_seconds: float) -> str:
    """The filter chain for the audio track: cut ``AUDIO_MARGIN`` before the video's end."""
    return f"atrim=end={max(video_seconds - AUDIO_MARGIN, 0.001):.3f},asetpts=PTS-STARTPTS"


def output_options(out_dir: str, rungs: Sequence[CmafRung], *, video: Sequence[str], audio: Sequence[str] | None,
                   audio_label: str = "", audio_kbps: int = 128, segment: float = SEGMENT_SECONDS,
                   folder: str = FOLDER, hls: bool = True) -> list[str]:
    """The output options (maps, codecs, bitrates, muxer) writing ``rungs`` (none: audio alone)
    and, when ``audio`` (the audio encoder's options) is given, the graph's ``audio_label`` (made
    with ``audio_chain``), under ``out_dir/folder/`` (which must exist: the muxer makes no folder).
    ``video``: the video encoder's options (``video_options``); ``segment``: as
    ``segment_length`` says; ``hls``: the HLS playlists too (the ``cmaf`` container), or
    the DASH manifest alone (``dash``)."""
    opts: list[str] = []
    for rung in rungs:
        opts += ["-map", rung.label]
    if audio is not None and audio_label:  # none: the caller maps the audio (a split job's audio pass)
        opts += ["-map", audio_label]
    opts += [*video]
    for i, rung in enumerate(rungs):
        opts += [f"-b:v:{i}", f"{rung.video_kbps}k"]
        if "libsvtav1" not in video:  # SVT-AV1 takes a maxrate as asking for CBR, which it refuses
            opts += [f"-maxrate:v:{i}", f"{rung.video_kbps}k", f"-bufsize:v:{i}", f"{2 * rung.video_kbps}k"]
    if audio is not None:
        opts += [*audio, "-b:a", f"{audio_kbps}k", "-ac", "2"]
    # Set ids count from 0: an audio-only output's one set is 0.
    sets = [*(["streams=v"] if rungs else []), *(["streams=a"] if audio is not None else [])]
    sets_text = " ".join(f"id={i},{s}" for i, s in enumerate(sets))
    seconds = f"{segment:.4f}".rstrip("0").rstrip(".")
    # DASH alone: segment timelines, which name every segment exactly (the presented duration
    # is stated to 0.1 s only); with HLS, its playlists do that.
    opts += ["-f", "dash", "-seg_duration", seconds, "-use_template", "1", "-use_timeline", "0" if hls else "1",
             "-adaptation_sets", sets_text,
             *(["-hls_playlist", "1", "-hls_master_name", os.path.basename(MASTER)] if hls else []),
             "-init_seg_name", "init-$RepresentationID$.m4s",
             "-media_seg_name", "seg-$RepresentationID$-$Number%05d$.m4s",
             os.path.join(out_dir, folder, os.path.basename(MANIFEST))]
    return opts


def files(rungs: int, audio: bool, folder: str = FOLDER, hls: bool = True) -> list[tuple[str, str]]:
    """(name or glob, content type) of every file the output makes, the DASH manifest first
    (``hls``: the HLS master and playlists too)."""
    streams = rungs + (1 if audio else 0)
    names = [(f"{folder}/{os.path.basename(MANIFEST)}", CONTENT_TYPES[".mpd"])]
    if hls:
        names.append((f"{folder}/{os.path.basename(MASTER)}", "application/vnd.apple.mpegurl"))
    for n in range(streams):
        if hls:
            names.append((f"{folder}/media_{n}.m3u8", "application/vnd.apple.mpegurl"))
        names += [(f"{folder}/init-{n}.m4s", CONTENT_TYPES[".m4s"]),  # as a node serves any .m4s
                  (f"{folder}/seg-{n}-*.m4s", CONTENT_TYPES[".m4s"])]
    return names


_REPRESENTATION = re.compile(r'<Representation\b[^>]*>')
_STREAM_INF = re.compile(r'^(#EXT-X-STREAM-INF:[^\n]*?CODECS=")([^",\n]*)([^"\n]*"[^\n]*\n+)media_(\d+)\.m3u8$',
                         re.M)


def mpd_with_codecs(mpd: str, codecs: Sequence[str]) -> str | None:
    """The DASH manifest with video rung N's ``codecs`` attribute ``codecs[N]`` in place of the
    muxer's; None unless it names every rung exactly once (what the muxer writes)."""
    done: list[int] = []

    def representation(m: re.Match[str]) -> str:
        tag = m.group(0)
        n = re.search(r'\bid="(\d+)"', tag)
        if n is None or 'mimeType="video/' not in tag or 'codecs="' not in tag or int(n.group(1)) >= len(codecs):
            return tag
        done.append(int(n.group(1)))
        return re.sub(r'\bcodecs="[^"]*"', f'codecs="{codecs[int(n.group(1))]}"', tag, count=1)

    mpd = _REPRESENTATION.sub(representation, mpd)
    return mpd if sorted(done) == list(range(len(codecs))) else None


def master_with_codecs(master: str, codecs: Sequence[str]) -> str | None:
    """The HLS master with the first of variant N's CODECS (its video) ``codecs[N]``; None
    unless it names every rung exactly once."""
    done: list[int] = []

    def variant(m: re.Match[str]) -> str:
        n = int(m.group(4))
        if n >= len(codecs):
            return m.group(0)
        done.append(n)
        return f"{m.group(1)}{codecs[n]}{m.group(3)}media_{n}.m3u8"

    master = _STREAM_INF.sub(variant, master)
    return master if sorted(done) == list(range(len(codecs))) else None
