"""
How long an mp4 or a webm says it lasts, read from its container header in Python.

``verify.measure_outputs`` reads every output back after ffmpeg exits; an ffprobe for
it would cost ~50-100 ms of CPU (mostly its start-up: the dynamic loader binding
Debian's 215 shared libraries), 2-5 % of a short job, for the number the muxer
wrote into the header anyway:

- ``mp4_duration``: the movie header (``moov/mvhd``), duration / timescale: the
  longest track as presented, which ffmpeg's mov muxer computes from what it wrote;
- ``webm_duration``: the segment's ``Info``, ``Duration`` x ``TimecodeScale`` ns, which
  ffmpeg's matroska muxer rewrites at the end from the last timestamp.

The files are ffmpeg's, but ffmpeg read a hostile input: every size is checked against
the file, reads are small and few (at most ``MAX_ELEMENTS`` boxes or elements, an
``Info`` of at most 64 KiB), and anything unexpected is None (``verify`` then fails the
job with ``ffmpeg_failed``).
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

#: boxes or elements walked before giving up (an mp4 has ~5 at the top, a webm ~5 in its segment)
MAX_ELEMENTS = 64
MAX_INFO = 64 * 1024

_EBML, _SEGMENT, _INFO = 0x1A45DFA3, 0x18538067, 0x1549A966
_TIMECODE_SCALE, _DURATION = 0x2AD7B1, 0x4489


def _box(f: BinaryIO, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    """(body start, body end) of the first ISO BMFF box of type ``kind`` in ``[start, end)``."""
    at = start
    for _ in range(MAX_ELEMENTS):
        f.seek(at)
        head = f.read(16)
        if len(head) < 8:
            return None
        size, box = struct.unpack(">I4s", head[:8])
        header = 8
        if size == 1:  # a 64-bit size follows
            if len(head) < 16:
                return None
            size, header = struct.unpack(">Q", head[8:16])[0], 16
        elif size == 0:  # to the end
            size = end - at
        if size < header or at + size > end:
            return None
        if box == kind:
            return at + header, at + size
        at += size
    return None


def mp4_duration(f: BinaryIO, size: int) -> float | None:
    """Seconds an mp4 of ``size`` bytes lasts by its movie header; None if it has none readable."""
    moov = _box(f, 0, size, b"moov")
    mvhd = _box(f, *moov, b"mvhd") if moov else None
    if mvhd is None:
        return None
    f.seek(mvhd[0])
    body = f.read(min(mvhd[1] - mvhd[0], 32))
    if len(body) >= 20 and body[0] == 0:
        timescale, duration = struct.unpack(">II", body[12:20])
        unknown = 0xFFFFFFFF
    elif len(body) >= 32 and body[0] == 1:
        timescale, duration = struct.unpack(">IQ", body[20:32])
        unknown = 0xFFFFFFFFFFFFFFFF
    else:
        return None
    if timescale == 0 or duration == unknown:
        return None
    return duration / timescale


def _vint_length(head: bytes, at: int, most: int) -> int | None:
    """Bytes of the EBML variable-size integer at ``head[at]``: one more than its leading zeros."""
    if at >= len(head) or head[at] == 0:
        return None
    length = 9 - head[at].bit_length()
    return length if length <= most and at + length <= len(head) else None


def _element(f: BinaryIO, at: int, end: int) -> tuple[int, int, int] | None:
    """(id, body start, body end) of the EBML element at ``at``, which must end by ``end``."""
    f.seek(at)
    head = f.read(12)
    id_length = _vint_length(head, 0, 4)
    size_length = _vint_length(head, id_length, 8) if id_length else None
    if id_length is None or size_length is None:
        return None
    ident = int.from_bytes(head[:id_length], "big")
    all_ones = (1 << (7 * size_length)) - 1
    size = int.from_bytes(head[id_length:id_length + size_length], "big") & all_ones
    start = at + id_length + size_length
    if size == all_ones or start + size > end:  # an unknown size cannot be walked past
        return None
    return ident, start, start + size


def _children(f: BinaryIO, start: int, end: int) -> list[tuple[int, int, int]]:
    found: list[tuple[int, int, int]] = []
    at = start
    while at < end and len(found) < MAX_ELEMENTS:
        element = _element(f, at, end)
        if element is None:
            break
        found.append(element)
        at = element[2]
    return found


def webm_duration(f: BinaryIO, size: int) -> float | None:
    """Seconds a webm (matroska) of ``size`` bytes lasts by its segment's ``Info``; None if it
    has none readable."""
    header = _element(f, 0, size)
    segment = _element(f, header[2], size) if header and header[0] == _EBML else None
    if segment is None or segment[0] != _SEGMENT:
        return None
    info = next((e for e in _children(f, segment[1], segment[2]) if e[0] == _INFO), None)
    if info is None or info[2] - info[1] > MAX_INFO:
        return None
    f.seek(info[1])
    body = io.BytesIO(f.read(info[2] - info[1]))
    scale, duration = 1_000_000, None  # TimecodeScale's default: milliseconds
    for ident, start, end in _children(body, 0, info[2] - info[1]):
        raw = body.getvalue()[start:end]
        if ident == _TIMECODE_SCALE and 1 <= len(raw) <= 8:
            scale = int.from_bytes(raw, "big")
        elif ident == _DURATION and len(raw) in (4, 8):
            duration = struct.unpack(">f" if len(raw) == 4 else ">d", raw)[0]
    if duration is None or scale <= 0 or not 0 <= duration < float("inf"):
        return None
    return duration * scale / 1e9
