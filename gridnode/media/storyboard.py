"""
Storyboards: sprite sheets of small frames at a fixed interval and the WebVTT file of
``#xywh=`` cues that players (video.js, Plyr, JW Player, Shaka) use for hover previews.
Plain data, no I/O.

The frames come from the job's one decode, as a branch of its filter graph (``chain``).
The VTT is written by the node, not by ffmpeg, so its cues must name exactly the tiles
ffmpeg makes: the branch pads the video's end with copies of its last frame and keeps
exactly ``Plan.count`` frames, one at or after every multiple of the interval, whatever
the video's frame rate or where its last frame falls.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

FOLDER = "storyboard"
VTT = f"{FOLDER}/storyboard.vtt"
SHEET = f"{FOLDER}/sheet-%03d.jpg"
#: most tiles a storyboard holds: the interval grows for long videos
MAX_TILES = 300
COLUMNS = ROWS = 10


@dataclass(frozen=True)
class Plan:
    """What a storyboard of one video is: a tile every ``interval`` seconds, ``count`` tiles of
    ``width`` x ``height`` laid ``columns`` x ``rows`` to a sheet."""

    interval: float
    count: int
    width: int
    height: int
    columns: int
    rows: int
    duration: float

    @property
    def sheets(self) -> int:
        return math.ceil(self.count / (self.columns * self.rows))


def plan(duration: float, display: tuple[int, int], *, interval: float = 0.0, width: int = 160) -> Plan:
    """The storyboard of a video of ``duration`` seconds shown at ``display`` (w, h): a tile
    every ``interval`` seconds (0: 2 s, longer when that would pass ``MAX_TILES``), each
    ``width`` pixels wide (the short side of a portrait video) with the video's aspect."""
    duration = max(duration, 0.001)
    if interval <= 0:
        interval = max(2.0, math.ceil(duration / MAX_TILES))
    count = max(1, math.ceil(duration / interval - 1e-9))
    w, h = display
    if w >= h:
        tw, th = width, round(width * h / w / 2) * 2
    else:
        tw, th = round(width * w / h / 2) * 2, width
    columns = min(COLUMNS, count)
    rows = min(ROWS, math.ceil(count / columns))
    return Plan(interval, count, max(2, tw), max(2, th), columns, rows, duration)


def chain(p: Plan) -> str:
    """The filter chain (after the decoder's split) that makes the sheets."""
    return (f"setpts=PTS-STARTPTS,tpad=stop_mode=clone:stop_duration={2 * p.interval:g},"
            f"select='gte(t\\,selected_n*{p.interval:g})',trim=end_frame={p.count},"
            f"scale={p.width}:{p.height}:flags=bicubic,setsar=1,tile={p.columns}x{p.rows}")


def tiles_of(p: Plan, start: float, stop: float | None) -> tuple[int, int]:
    """The tiles (first, how many) whose times fall in ``[start, stop)`` s (a chunk of a split
    job: None, to the end)."""
    first = min(p.count, math.ceil(start / p.interval - 1e-9))
    end = p.count if stop is None else min(p.count, math.ceil(stop / p.interval - 1e-9))
    return first, max(0, end - first)


def chunk_chain(p: Plan, first: int, count: int, last: bool) -> str:
    """A chunk's share of ``chain``: the same frames (the first at or after each tile's time, on
    the whole's timestamps), tiles ``first`` on, scaled, not laid out (``join``, once every chunk
    made its own); the last chunk pads the end as the whole does."""
    pad = f"tpad=stop_mode=clone:stop_duration={2 * p.interval:g}," if last else ""
    return (f"{pad}select='gte(t\\,(selected_n+{first})*{p.interval:g})',trim=end_frame={count},"
            f"scale={p.width}:{p.height}:flags=bicubic,setsar=1,format=yuvj420p")


def tiles_options(path: str, label: str) -> list[str]:
    """A chunk's tiles, losslessly, in one file for the join (matroska keeps their full range)."""
    return ["-map", label, "-c:v", "rawvideo", "-f", "matroska", path]


def join(p: Plan) -> str:
    """The filters laying the chunks' tiles out in sheets, as ``chain`` ends: in the JPEG's full
    range first, so a last sheet's empty places are the whole's black."""
    return f"format=yuvj420p,tile={p.columns}x{p.rows}"


def output_options(out_dir: str, label: str, folder: str = FOLDER) -> list[str]:
    """Output options writing the sheets ``folder/sheet-001.jpg``... under ``out_dir`` (the
    folder must exist: image2 makes none)."""
    return ["-map", label, "-c:v", "mjpeg", "-q:v", "4", "-f", "image2", "-start_number", "1",
            os.path.join(out_dir, folder, os.path.basename(SHEET))]


def _stamp(t: float) -> str:
    ms = round(t * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def vtt(p: Plan) -> str:
    """The WebVTT file: one cue per tile, covering 0 to the video's end, each naming its sheet
    (relative to the VTT file) and its rectangle."""
    lines = ["WEBVTT", ""]
    per_sheet = p.columns * p.rows
    for i in range(p.count):
        start, end = i * p.interval, min((i + 1) * p.interval, p.duration)
        if i == p.count - 1:
            end = p.duration
        sheet, k = divmod(i, per_sheet)
        x, y = (k % p.columns) * p.width, (k // p.columns) * p.height
        name = SHEET.split("/", 1)[1] % (sheet + 1)
        lines += [f"{_stamp(start)} --> {_stamp(end)}", f"{name}#xywh={x},{y},{p.width},{p.height}", ""]
    return "\n".join(lines)
