"""
Split-and-stitch, the join: a chunked job's outputs made of its chunks' video and its audio
pass, without encoding anything again. Plain data (file texts and argv), no I/O but
``write_concat`` and ``join_cmaf``, which write small text files and rename segments.

- mp4, webm, mkv: ffmpeg's concat demuxer reads the chunks' files one after the other, each
  starting where the list says the one before ends (``duration``: the chunk's slots at the
  rate, in the microseconds the demuxer counts in, from the cut times themselves so no error
  adds up); the stream is copied, the audio pass's file copied beside it.
- CMAF: each chunk's segments carry the whole's timestamps already (``-output_ts_offset``),
  and every chunk starts on a segment boundary (``chunks.py``), so the joined output is the
  chunks' segments renamed in order, the audio pass's segments beside them, and the playlists
  and manifest written again to list them all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from gridnode.media.chunks import AUDIO_FILES, Chunk, audio_file
from gridnode.media.presets import COMMON_OPTIONS, MUXERS, Preset

#: the concat list a stitch reads, in the job's work folder
LIST = "concat-{name}.ffconcat"
#: what each demuxer of a stitch may be: the list's and the chunks' (our own ffmpeg's output)
_DEMUXERS = {"mp4": "mov", "mkv": "matroska", "webm": "matroska"}
#: an output's name as templates.py allows it: nothing a concat list would read as a directive
_SAFE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}\Z")


def chunk_dir(index: int) -> str:
    """The folder (under the job's work folder) a chunk's outputs are written to."""
    return f"chunk-{index:03d}"


def _micros(seconds: Fraction) -> int:
    return round(seconds * 1_000_000)


def concat_list(preset: Preset, chunks: Sequence[Chunk]) -> str:
    """The ffconcat list of ``preset``'s chunk files, relative to the work folder: each but the
    last with its duration, so the next starts exactly at its cut."""
    if not _SAFE_NAME.match(preset.name):  # templates.py checks names: a bug, not an input
        raise ValueError(f"an output named {preset.name!r} cannot be listed")
    ext = {"mp4": ".mp4", "webm": ".webm", "mkv": ".mkv"}[preset.container]
    lines = ["ffconcat version 1.0"]
    for i, chunk in enumerate(chunks):
        lines.append(f"file {chunk_dir(chunk.index)}/{preset.name}{ext}")
        if i + 1 < len(chunks):
            us = _micros(chunks[i + 1].start) - _micros(chunk.start)
            lines.append(f"duration {us // 1_000_000}.{us % 1_000_000:06d}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Stitch:
    """One output's join: the list to write and the argv that reads it."""

    preset: Preset
    list_name: str
    list_text: str
    argv: list[str]


def stitch(ffmpeg: str, work_dir: str, out_dir: str, preset: Preset, chunks: Sequence[Chunk],
           *, audio: bool, max_output_bytes: int) -> Stitch:
    """The join of an mp4, webm or mkv output: its chunks' video, and (``audio``) the audio
    pass's file, copied into ``out_dir/NAME.ext``."""
    name = LIST.format(name=preset.name)
    demuxer = _DEMUXERS[preset.container]
    ext = {"mp4": ".mp4", "webm": ".webm", "mkv": ".mkv"}[preset.container]
    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error",
            # The chunks are our own ffmpeg's files; still only the list's and theirs may open.
            "-protocol_whitelist", "file", "-format_whitelist", f"concat,{demuxer}",
            "-f", "concat", "-safe", "1", "-i", "file:" + os.path.join(os.path.abspath(work_dir), name)]
    if audio:
        _ext, muxer = AUDIO_FILES[preset.container]
        argv += ["-protocol_whitelist", "file", "-format_whitelist", demuxer, "-f", demuxer,
                 "-i", "file:" + os.path.join(os.path.abspath(work_dir), audio_file(preset))]
    argv += ["-map", "0:v:0", *(["-map", "1:a:0"] if audio else []), "-c", "copy"]
    if preset.container == "mp4":
        argv += ["-movflags", "+faststart"]
    argv += ["-f", MUXERS[preset.container], "-fs", str(max_output_bytes),
             os.path.join(out_dir, preset.name + ext)]
    return Stitch(preset, name, concat_list(preset, chunks), argv)


def write_concat(work_dir: str, item: Stitch) -> None:
    """Write ``item``'s list into the work folder (the node's own folder: no link followed)."""
    path = os.path.join(work_dir, item.list_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(item.list_text)
