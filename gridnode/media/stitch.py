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

import contextlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from gridnode.errors import GridnodeError
from gridnode.media import storyboard
from gridnode.media.chunks import Chunk, audio_file
from gridnode.media.presets import COMMON_OPTIONS, MUXERS, Preset, hls_muxer

#: the concat list a stitch reads, in the job's work folder
LIST = "concat-{name}.ffconcat"
#: what each demuxer of a stitch may be: the list's and the chunks' (our own ffmpeg's output)
_DEMUXERS = {"mp4": "mov", "mkv": "matroska", "webm": "matroska", "hls": "mov"}
#: a chunk's file of each output (an HLS ladder's: an mp4 of its rungs' video)
_EXTENSIONS = {"mp4": ".mp4", "webm": ".webm", "mkv": ".mkv", "hls": ".mp4"}
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
    ext = _EXTENSIONS[preset.container]
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
           *, audio: bool, max_output_bytes: int, rungs: Sequence[str] = ()) -> Stitch:
    """The join of an mp4, webm or mkv output: its chunks' video, and (``audio``) the audio
    pass's file, copied into ``out_dir/NAME.ext``; of an HLS ladder (``rungs``: their names):
    each rung's video joined and its audio, copied into the whole's segments and playlists."""
    name = LIST.format(name=preset.name)
    demuxer = _DEMUXERS[preset.container]
    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error",
            # The chunks are our own ffmpeg's files; still only the list's and theirs may open.
            "-protocol_whitelist", "file", "-format_whitelist", f"concat,{demuxer}",
            "-f", "concat", "-safe", "1", "-i", "file:" + os.path.join(os.path.abspath(work_dir), name)]
    if audio:
        argv += ["-protocol_whitelist", "file", "-format_whitelist", demuxer, "-f", demuxer,
                 "-i", "file:" + os.path.join(os.path.abspath(work_dir), audio_file(preset))]
    if preset.container == "hls":
        for i in range(len(rungs)):
            argv += ["-map", f"0:v:{i}", *(["-map", f"1:a:{i}"] if audio else [])]
        var_map = [f"v:{i},a:{i},name:{r}" if audio else f"v:{i},name:{r}" for i, r in enumerate(rungs)]
        argv += ["-c", "copy", *hls_muxer(os.path.join(out_dir, preset.name), var_map, str(max_output_bytes))]
        return Stitch(preset, name, concat_list(preset, chunks), argv)
    argv += ["-map", "0:v:0", *(["-map", "1:a:0"] if audio else []), "-c", "copy"]
    if preset.container == "mp4":
        argv += ["-movflags", "+faststart"]
    argv += ["-f", MUXERS[preset.container], "-fs", str(max_output_bytes),
             os.path.join(out_dir, preset.name + _EXTENSIONS[preset.container])]
    return Stitch(preset, name, concat_list(preset, chunks), argv)


def stitch_storyboard(ffmpeg: str, work_dir: str, out_dir: str, preset: Preset, chunks: Sequence[Chunk],
                      board: storyboard.Plan) -> Stitch:
    """The sheets of a storyboard: the chunks' tiles (those that hold some), in order, laid out as
    the whole lays them out."""
    if not _SAFE_NAME.match(preset.name):  # templates.py checks names: a bug, not an input
        raise ValueError(f"an output named {preset.name!r} cannot be listed")
    holding = [c for c in chunks if storyboard.tiles_of(board, float(c.start), _stop(c))[1]]
    text = "\n".join(["ffconcat version 1.0", *(f"file {chunk_dir(c.index)}/{preset.name}.mkv" for c in holding)])
    name = LIST.format(name=preset.name)
    argv = [ffmpeg, *COMMON_OPTIONS, "-v", "error", "-protocol_whitelist", "file",
            "-format_whitelist", "concat,matroska", "-f", "concat", "-safe", "1",
            "-i", "file:" + os.path.join(os.path.abspath(work_dir), name),
            "-filter_complex", f"[0:v:0]{storyboard.join(board)}[s]",
            *storyboard.output_options(out_dir, "[s]", preset.name)]
    return Stitch(preset, name, text + "\n", argv)


def _stop(chunk: Chunk) -> float | None:
    return None if chunk.end is None else float(chunk.end / chunk.rate)


def write_concat(work_dir: str, item: Stitch) -> None:
    """Write ``item``'s list into the work folder (the node's own folder: no link followed)."""
    path = os.path.join(work_dir, item.list_name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(item.list_text)


#: what a chunk's playlists, manifests and the audio pass's may be read up to (ffmpeg writes a few
#: kB; more is not ffmpeg's)
_MAX_TEXT = 4 * 1024 * 1024
_EXTINF = re.compile(r"#EXTINF:(\d{1,6}(?:\.\d{1,9})?),\Z")
_DURATION = re.compile(r'mediaPresentationDuration="PT(?:(\d+)H)?(?:(\d+)M)?(\d+(?:\.\d+)?)S"')
_ADAPTATION = re.compile(r"\s*<AdaptationSet .*?</AdaptationSet>\n", re.S)
_STREAM_INF = re.compile(r'#EXT-X-STREAM-INF:BANDWIDTH=(\d+),(.*)CODECS="([^"]*)"\Z')


def _failed(what: str) -> GridnodeError:
    return GridnodeError(f"the chunks of this job could not be joined: {what}", code="ffmpeg_failed", status=422)


def _read(path: str) -> str:
    """A text file a child wrote, never through a link it planted, bounded."""
    return _read_bytes(path).decode("utf-8", "replace")


def _write(path: str, text: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _segments(folder: str, stream: int) -> list[str]:
    """The EXTINF durations of ``media_<stream>.m3u8`` in ``folder``, in order; each entry must
    name the segment its place says (seg-<stream>-00001.m4s, ...)."""
    lines = [line.strip() for line in _read(os.path.join(folder, f"media_{stream}.m3u8")).splitlines()]
    durations: list[str] = []
    for i, line in enumerate(lines):
        m = _EXTINF.match(line)
        if m is None:
            continue
        name = next((x for x in lines[i + 1:] if x and not x.startswith("#")), "")
        if name != _segment(stream, len(durations) + 1):
            raise _failed(f"media_{stream}.m3u8 names {name[:80]!r}")
        durations.append(m.group(1))
    if not durations:
        raise _failed(f"media_{stream}.m3u8 lists no segment")
    return durations


def _segment(stream: int, number: int) -> str:
    return f"seg-{stream}-{number:05d}.m4s"


def _playlist(stream: int, durations: Sequence[str]) -> str:
    # RFC 8216: each EXTINF, rounded to the nearest second, at most the target (as ffmpeg's)
    target = max(math.floor(float(d) + 0.5) for d in durations)
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:1",
             f'#EXT-X-MAP:URI="init-{stream}.m4s"']
    for n, d in enumerate(durations, 1):
        lines += [f"#EXTINF:{d},", _segment(stream, n)]
    return "\n".join([*lines, "#EXT-X-ENDLIST", ""])


def _seconds(manifest: str) -> float:
    m = _DURATION.search(manifest)
    if m is None:
        raise _failed("a manifest states no duration")
    return int(m.group(1) or 0) * 3600 + int(m.group(2) or 0) * 60 + float(m.group(3))


def _mpd_time(seconds: float) -> str:
    """As ffmpeg's dash muxer writes a duration: hours and minutes when there are, tenths of a
    second cut."""
    tenths = int(seconds * 10 + 1e-6)
    h, rest = divmod(tenths, 36000)
    m, rest = divmod(rest, 600)
    return "PT" + (f"{h}H" if h else "") + (f"{m}M" if h or m else "") + f"{rest // 10}.{rest % 10}S"


def join_cmaf(work_dir: str, out_dir: str, preset: Preset, chunks: Sequence[Chunk], rungs: int,
              audio: bool) -> None:
    """Join a CMAF output: every rung's segments from the chunks in order, renumbered and moved
    (never read: they carry the whole's timestamps already), the audio pass's rendition beside
    them as the stream after the rungs, and the playlists and DASH manifest written to list them
    all. Each chunk's init segment must be the first's, byte for byte (same encoder, same
    parameters: the same parameter sets)."""
    target = os.path.join(out_dir, preset.name)
    os.makedirs(target, exist_ok=True)
    folders = [os.path.join(work_dir, chunk_dir(c.index), preset.name) for c in chunks]
    for stream in range(rungs):
        init = _read_bytes(os.path.join(folders[0], f"init-{stream}.m4s"))
        durations: list[str] = []
        for folder in folders:
            if _read_bytes(os.path.join(folder, f"init-{stream}.m4s")) != init:
                raise _failed(f"{os.path.basename(os.path.dirname(folder))}'s init-{stream}.m4s differs")
            listed = _segments(folder, stream)
            for n in range(1, len(listed) + 1):
                os.replace(os.path.join(folder, _segment(stream, n)),
                           os.path.join(target, _segment(stream, len(durations) + n)))
            durations += listed
        os.replace(os.path.join(folders[0], f"init-{stream}.m4s"), os.path.join(target, f"init-{stream}.m4s"))
        _write(os.path.join(target, f"media_{stream}.m3u8"), _playlist(stream, durations))
    last = _read(os.path.join(folders[-1], "manifest.mpd"))
    seconds = float(chunks[-1].start) + _seconds(last)
    manifest = _read(os.path.join(folders[0], "manifest.mpd"))
    master = _master([_read(os.path.join(f, "master.m3u8")) for f in folders])
    if audio:
        src = os.path.join(work_dir, audio_file(preset))
        durations = _segments(src, 0)
        for n in range(1, len(durations) + 1):
            os.replace(os.path.join(src, _segment(0, n)), os.path.join(target, _segment(rungs, n)))
        os.replace(os.path.join(src, "init-0.m4s"), os.path.join(target, f"init-{rungs}.m4s"))
        _write(os.path.join(target, f"media_{rungs}.m3u8"), _playlist(rungs, durations))
        sound = _read(os.path.join(src, "manifest.mpd"))
        found = _ADAPTATION.search(sound)
        if found is None:
            raise _failed("the audio manifest has no adaptation set")
        block = (found.group(0).replace('<AdaptationSet id="0"', '<AdaptationSet id="1"', 1)
                 .replace('<Representation id="0"', f'<Representation id="{rungs}"', 1))
        end = manifest.rfind("\t</Period>")
        if end < 0:
            raise _failed("the manifest has no period")
        manifest = manifest[:end] + block.lstrip("\n") + manifest[end:]
        seconds = max(seconds, _seconds(sound))
        master = _with_audio(master, _read(os.path.join(src, "master.m3u8")), rungs)
    _write(os.path.join(target, "manifest.mpd"),
           _DURATION.sub(f'mediaPresentationDuration="{_mpd_time(seconds)}"', manifest, count=1))
    _write(os.path.join(target, "master.m3u8"), master)


def _read_bytes(path: str) -> bytes:
    """A file a child wrote, never through a link it planted, bounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise _failed(f"{os.path.basename(path)} is missing or not a file") from e
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_TEXT + 1)
    if len(data) > _MAX_TEXT:
        raise _failed(f"{os.path.basename(path)} is too long")
    return data


def _master(texts: Sequence[str]) -> str:
    """The first chunk's master playlist, each rung's BANDWIDTH the highest any chunk measured."""
    peaks: dict[int, int] = {}
    for text in texts:
        rung = 0
        for line in text.splitlines():
            m = _STREAM_INF.match(line.strip())
            if m:
                peaks[rung] = max(peaks.get(rung, 0), int(m.group(1)))
                rung += 1
    out, rung = [], 0
    for line in texts[0].splitlines():
        m = _STREAM_INF.match(line.strip())
        if m:
            line = f'#EXT-X-STREAM-INF:BANDWIDTH={peaks[rung]},{m.group(2)}CODECS="{m.group(3)}"'
            rung += 1
        out.append(line)
    return "\n".join(out) + "\n"


def _with_audio(master: str, audio_master: str, stream: int) -> str:
    """``master`` with the audio rendition (stream ``stream``) as the whole's dash muxer lists
    it: an EXT-X-MEDIA line, every variant's bandwidth and codecs counting it."""
    found = next((m for m in map(_STREAM_INF.match, (x.strip() for x in audio_master.splitlines())) if m), None)
    if found is None:
        raise _failed("the audio master playlist lists no stream")
    bandwidth, codecs = int(found.group(1)), found.group(3)
    out = []
    for line in master.splitlines():
        m = _STREAM_INF.match(line.strip())
        if m:
            line = (f'#EXT-X-STREAM-INF:BANDWIDTH={int(m.group(1)) + bandwidth},{m.group(2)}'
                    f'CODECS="{m.group(3)},{codecs}",AUDIO="group_A1"')
        out.append(line)
        if line.startswith("#EXT-X-VERSION"):
            out.append(f'#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="group_A1",NAME="audio_{stream}",DEFAULT=YES,'
                       f'URI="media_{stream}.m3u8"')
    return "\n".join(out) + "\n"
