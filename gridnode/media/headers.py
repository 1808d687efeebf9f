"""
How long an mp4 or a webm says it lasts, and an mp4's video codec string, read from its
container header in Python.

``verify.measure_outputs`` reads every output back after ffmpeg exits; an ffprobe for
it would cost ~50-100 ms of CPU (mostly its start-up: the dynamic loader binding
Debian's 215 shared libraries), 2-5 % of a short job, for the number the muxer
wrote into the header anyway:

- ``mp4_duration``: the movie header (``moov/mvhd``), duration / timescale: the
  longest track as presented, which ffmpeg's mov muxer computes from what it wrote;
- ``webm_duration``: the segment's ``Info``, ``Duration`` x ``TimecodeScale`` ns, which
  ffmpeg's matroska muxer rewrites at the end from the last timestamp;
- ``codec_string``: the RFC 6381 ``codecs`` value of an mp4's (a CMAF init segment's) first
  track, from its sample entry's decoder configuration (``avcC``, ``hvcC``, ``av1C``): what
  a player asks ``MediaSource.isTypeSupported`` before it fetches a segment.

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


#: the sample entry's fields before its child boxes: SampleEntry (8) and VisualSampleEntry (70)
_VISUAL_ENTRY = 78
_CONFIG = {b"avc1": b"avcC", b"avc3": b"avcC", b"hvc1": b"hvcC", b"hev1": b"hvcC", b"av01": b"av1C"}


def codec_string(f: BinaryIO, size: int) -> str | None:
    """The ``codecs`` value of the first track's first sample entry (H.264, HEVC or AV1);
    None if there is none readable."""
    at: tuple[int, int] | None = (0, size)
    for kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd"):
        at = _box(f, *at, kind) if at else None
    if at is None or at[1] - at[0] < 8 + 8 + _VISUAL_ENTRY:
        return None
    f.seek(at[0] + 8)  # the full box's version and flags, and the entry count
    head = f.read(8)
    if len(head) < 8:
        return None
    entry_size, entry = struct.unpack(">I4s", head)
    config = _CONFIG.get(entry)
    start = at[0] + 8
    if config is None or entry_size < 8 + _VISUAL_ENTRY or start + entry_size > at[1]:
        return None
    box = _box(f, start + 8 + _VISUAL_ENTRY, start + entry_size, config)
    if box is None:
        return None
    f.seek(box[0])
    body = f.read(min(box[1] - box[0], 16))
    return _from_config(entry.decode("ascii"), body)


def _from_config(entry: str, body: bytes) -> str | None:
    if entry.startswith("avc") and len(body) >= 4 and body[0] == 1:
        # AVCDecoderConfigurationRecord: profile, constraint flags, level (ISO/IEC 14496-15 5.3.3)
        return f"{entry}.{body[1:4].hex()}"
    if entry.startswith("h") and len(body) >= 13 and body[0] == 1:
        # HEVCDecoderConfigurationRecord, as ISO/IEC 14496-15 annex E spells it out
        space, tier, profile = body[1] >> 6, (body[1] >> 5) & 1, body[1] & 0x1F
        compatible = int(f"{int.from_bytes(body[2:6], 'big'):032b}"[::-1], 2)  # bits in reverse order
        constraints = body[6:12].rstrip(b"\0")
        tail = "".join(f".{b:02X}" for b in constraints)
        return f"{entry}.{['', 'A', 'B', 'C'][space]}{profile}.{compatible:X}.{'HL'[tier == 0]}{body[12]}{tail}"
    if entry == "av01" and len(body) >= 3 and body[0] == 0x81:
        # AV1CodecConfigurationRecord (AV1 in ISOBMFF 2.3): profile, level, tier, bit depth
        profile, level, tier = body[1] >> 5, body[1] & 0x1F, body[2] >> 7
        high, twelve = (body[2] >> 6) & 1, (body[2] >> 5) & 1
        depth = 12 if twelve else 10 if high else 8
        return f"av01.{profile}.{level:02d}{'MH'[tier]}.{depth:02d}"
    return None


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


#: how far from an Ogg file's end its last page starts, at most (a page is under 64 KiB)
OGG_TAIL = 65536 + 27


def opus_duration(f: BinaryIO, size: int) -> float | None:
    """An Ogg Opus file's length: its last page's granule position (48 kHz samples) less the
    ``OpusHead``'s pre-skip; None when either is missing."""
    f.seek(0)
    head = f.read(4096)
    at = head.find(b"OpusHead")
    if at < 0 or len(head) < at + 12:
        return None
    pre_skip = int.from_bytes(head[at + 10:at + 12], "little")
    start = max(0, size - OGG_TAIL)
    f.seek(start)
    tail = f.read(size - start)
    page = tail.rfind(b"OggS")
    if page < 0 or len(tail) < page + 14:
        return None
    granule = int.from_bytes(tail[page + 6:page + 14], "little", signed=True)
    return (granule - pre_skip) / 48000 if granule >= pre_skip else None
