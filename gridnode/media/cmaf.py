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
would skip or repeat media: the encoder is told to put a keyframe at every multiple of the
segment length and nowhere it would start a segment early (``keyframe_options``), and the
muxer cuts at the first keyframe past each segment length.
"""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class CmafRung:
    """One video rung: its output label in the filter graph, size and bitrate (the manifests
    must state a bandwidth for every representation)."""

    label: str
    width: int
    height: int
    video_kbps: int


def keyframe_options(encoder: str, segment: float = SEGMENT_SECONDS) -> list[str]:
    """Encoder options that put a keyframe exactly at every segment boundary and no scene-cut
    keyframe that could cut a segment elsewhere (segments are closed GOPs either way)."""
    opts = ["-force_key_frames", f"expr:gte(t,n_forced*{segment:g})"]
    if encoder == "libx264":
        opts += ["-sc_threshold", "0"]
    elif encoder == "libx265":
        opts += ["-x265-params", "scenecut=0:open-gop=0"]
    return opts


def audio_chain(video_seconds: float) -> str:
    """The filter chain for the audio track: cut ``AUDIO_MARGIN`` before the video's end."""
    return f"atrim=end={max(video_seconds - AUDIO_MARGIN, 0.001):.3f},asetpts=PTS-STARTPTS"


def output_options(out_dir: str, rungs: Sequence[CmafRung], *, video: Sequence[str], audio: Sequence[str] | None,
                   audio_label: str = "", audio_kbps: int = 128, segment: float = SEGMENT_SECONDS,
                   folder: str = FOLDER) -> list[str]:
    """The output options (maps, codecs, bitrates, muxer) writing ``rungs`` (none: audio alone) and, when ``audio``
    (the audio encoder's options) is given, the graph's ``audio_label`` (made with
    ``audio_chain``), under ``out_dir/folder/`` (which must exist: the muxer makes no folder).
    ``video``: the video encoder's options, ``keyframe_options`` included."""
    opts: list[str] = []
    for rung in rungs:
        opts += ["-map", rung.label]
    if audio is not None and audio_label:  # none: the caller maps the audio (a split job's audio pass)
        opts += ["-map", audio_label]
    opts += [*video]
    for i, rung in enumerate(rungs):
        opts += [f"-b:v:{i}", f"{rung.video_kbps}k", f"-maxrate:v:{i}", f"{rung.video_kbps}k",
                 f"-bufsize:v:{i}", f"{2 * rung.video_kbps}k"]
    if audio is not None:
        opts += [*audio, "-b:a", f"{audio_kbps}k", "-ac", "2"]
    # Set ids count from 0: an audio-only output's one set is 0.
    sets = [*(["streams=v"] if rungs else []), *(["streams=a"] if audio is not None else [])]
    sets_text = " ".join(f"id={i},{s}" for i, s in enumerate(sets))
    opts += ["-f", "dash", "-seg_duration", f"{segment:g}", "-use_template", "1", "-use_timeline", "0",
             "-adaptation_sets", sets_text, "-hls_playlist", "1", "-hls_master_name", os.path.basename(MASTER),
             "-init_seg_name", "init-$RepresentationID$.m4s",
             "-media_seg_name", "seg-$RepresentationID$-$Number%05d$.m4s",
             os.path.join(out_dir, folder, os.path.basename(MANIFEST))]
    return opts


def files(rungs: int, audio: bool, folder: str = FOLDER) -> list[tuple[str, str]]:
    """(name or glob, content type) of every file the output makes, the DASH manifest first."""
    streams = rungs + (1 if audio else 0)
    names = [(f"{folder}/{os.path.basename(MANIFEST)}", CONTENT_TYPES[".mpd"]),
             (f"{folder}/{os.path.basename(MASTER)}", "application/vnd.apple.mpegurl")]
    for n in range(streams):
        names += [(f"{folder}/media_{n}.m3u8", "application/vnd.apple.mpegurl"),
                  (f"{folder}/init-{n}.m4s", CONTENT_TYPES[".m4s"]),  # as a node serves any .m4s
                  (f"{folder}/seg-{n}-*.m4s", CONTENT_TYPES[".m4s"])]
    return names
