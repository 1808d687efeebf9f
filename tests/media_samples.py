"""
Small test clips made with ffmpeg's lavfi sources (testsrc2 + sine), generated
once per test session into a temporary folder.

Use the ``media_clips`` fixture (session scope, exported through
tests/conftest.py; ``long_clip`` is a 30 s clip for jobs that must run a
while) or call ``make_clips(folder)`` directly. Everything else is small and
short so the media tests stay fast on two cores.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from tests import helpers

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFPROBE = shutil.which("ffprobe") or "/usr/bin/ffprobe"

needs_ffmpeg = pytest.mark.skipif(
    not (os.access(FFMPEG, os.X_OK) and os.access(FFPROBE, os.X_OK)), reason="ffmpeg and ffprobe are needed"
)


@dataclass(frozen=True)
class Clips:
    folder: Path
    landscape: Path  # 640x360, 4 s, H.264 + AAC, mp4
    portrait: Path  # coded 320x180 with rotate=90 (shown 180x320), 2 s, no audio, mp4
    webm: Path  # 320x240, 2 s, VP9 + Opus
    mpegts: Path  # 320x240, 2 s, H.264 + AAC in MPEG-TS
    audio_only: Path  # 1 s of sine in an mp4
    random: Path  # 64 kB of random bytes
    playlist: Path  # an HLS playlist naming the landscape clip
    concat: Path  # an ffconcat list naming the landscape clip


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60)


def lavfi_video(size: str, seconds: float, rate: int = 25) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def lavfi_audio(seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]


def work_clip(path: Path, seconds: int) -> Path:
    """``seconds`` of 640x360 H.264 + AAC at ``path``: a job with a few seconds of work on two
    cores (the chaos and succession tests)."""
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                    "-f", "lavfi", "-i", "sine=frequency=330", "-t", str(seconds), "-c:v", "libx264",
                    "-preset", "ultrafast", "-c:a", "aac", "-shortest", "-y", str(path)], check=True, timeout=120)
    return path


def make_clips(folder: Path) -> Clips:
    folder.mkdir(parents=True, exist_ok=True)
    x264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    landscape = folder / "landscape.mp4"
    _ffmpeg(*lavfi_video("640x360", 4), *lavfi_audio(4), *x264, "-c:a", "aac", "-shortest", str(landscape))
    # ffmpeg 5.1 writes the rotate tag into the display matrix only on a stream copy.
    upright = folder / "upright.mp4"
    _ffmpeg(*lavfi_video("320x180", 2), *x264, str(upright))
    portrait = folder / "portrait.mp4"
    _ffmpeg("-i", str(upright), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(portrait))
    upright.unlink()
    webm = folder / "clip.webm"
    _ffmpeg(*lavfi_video("320x240", 2), *lavfi_audio(2), "-c:v", "libvpx-vp9", "-deadline", "realtime",
            "-cpu-used", "8", "-c:a", "libopus", "-shortest", str(webm))
    mpegts = folder / "clip.ts"
    _ffmpeg(*lavfi_video("320x240", 2), *lavfi_audio(2), *x264, "-c:a", "aac", "-shortest", str(mpegts))
    audio_only = folder / "audio.mp4"
    _ffmpeg(*lavfi_audio(1), "-c:a", "aac", str(audio_only))
    random = folder / "random.mp4"
    random.write_bytes(os.urandom(64 * 1024))
    playlist = folder / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4.0,\nlandscape.mp4\n#EXT-X-ENDLIST\n")
    concat = folder / "list.txt"
    concat.write_text("ffconcat version 1.0\nfile landscape.mp4\n")
    return Clips(folder, landscape, portrait, webm, mpegts, audio_only, random, playlist, concat)


def late_giant_frames(folder: Path, small: int = 10, giant: int = 2, side: int = 16000) -> Path:
    """An AVI of MJPEG whose header and first ``small`` frames say 64x64, followed by
    ``giant`` frames whose JPEG headers say ``side`` x ``side`` (16000: 7 times the default
    --max-pixels). Each giant frame is the small one's scan padded with comments to 1 MB:
    ffmpeg's MJPEG decoder refuses a frame far larger than its packet before allocating it,
    and allocates (~400 MB each) one that is not."""
    raw = folder / "small.mjpeg"
    _ffmpeg(*lavfi_video("64x64", small / 25), "-c:v", "mjpeg", "-f", "mjpeg", str(raw))
    frames = raw.read_bytes()
    first = frames[:frames.index(b"\xff\xd9") + 2]
    sof = first.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width
    padding = (b"\xff\xfe" + struct.pack(">H", 65535) + bytes(65533)) * ((side // 8) ** 2 // 4 // 65537 + 1)
    big = first[:2] + padding + first[2:sof + 5] + struct.pack(">HH", side, side) + first[sof + 9:]
    raw.write_bytes(frames + big * giant)
    out = folder / "late-giant.avi"
    _ffmpeg("-f", "mjpeg", "-framerate", "25", "-i", str(raw), "-c", "copy", str(out))
    raw.unlink()
    return out


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of the ISO BMFF boxes in ``data[start:end]`` (32-bit sizes only)."""
    end = len(data) if end is None else end
    found = []
    while start + 8 <= end:
        size = struct.unpack(">I", data[start:start + 4])[0]
        found.append((data[start + 4:start + 8], start, start + size))
        start += size
    return found


def many_tracks(folder: Path, tracks: int = 10_000) -> Path:
    """An mp4 of ``tracks`` video tracks: one frame's track, copied into its moov under new
    track ids (all its copies share the one frame's data). ~5 MB for 10,000."""
    one = folder / "one-track.mp4"
    _ffmpeg(*lavfi_video("16x16", 0.04), "-c:v", "libx264", "-preset", "ultrafast", str(one))
    data = one.read_bytes()
    top = {kind: (a, b) for kind, a, b in _boxes(data)}
    a, b = top[b"moov"]
    assert b == len(data), "moov last: growing it moves no sample"
    trak_a, trak_b = next((x, y) for kind, x, y in _boxes(data, a + 8, b) if kind == b"trak")
    trak = data[trak_a:trak_b]
    tkhd = trak.index(b"tkhd") - 4
    version = trak[tkhd + 8]
    at = tkhd + 12 + (16 if version == 1 else 8)  # track_ID after creation and modification times
    copies = [trak[:at] + struct.pack(">I", i + 2) + trak[at + 4:] for i in range(tracks - 1)]
    body = data[a + 8:b] + b"".join(copies)
    out = folder / "many-tracks.mp4"
    out.write_bytes(data[:a] + struct.pack(">I", 8 + len(body)) + b"moov" + body)
    one.unlink()
    return out


def cut_faststart(folder: Path, seconds: float = 20.0) -> Path:
    """A faststart mp4 (index first) of ``seconds`` of 160x90 video (10 fps) and audio, cut to
    half its bytes: its header still says ``seconds``, its data holds about half."""
    whole = folder / "whole.mp4"
    _ffmpeg(*lavfi_video("160x90", seconds, rate=10), *lavfi_audio(seconds), "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", "-movflags", "+faststart", str(whole))
    data = whole.read_bytes()
    half = folder / "half.mp4"
    half.write_bytes(data[:len(data) // 2])
    whole.unlink()
    return half


@pytest.fixture(scope="session")
def media_clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    """The sample clips, made once per session."""
    if not (os.access(FFMPEG, os.X_OK) and os.access(FFPROBE, os.X_OK)):
        pytest.skip("ffmpeg and ffprobe are needed")
    return make_clips(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="session")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 s of 1280x720 (~24 MB): long enough to cancel mid-way and to keep a worker busy."""
    if not os.access(FFMPEG, os.X_OK):
        pytest.skip("ffmpeg is needed")
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25",
                    "-t", "30", "-c:v", "libx264", "-preset", "ultrafast", "-y", str(path)], check=True, timeout=120)
    return path


def ffprobe_json(path: Path | str) -> dict[str, Any]:
    """ffprobe's view of an output file, for assertions."""
    import json

    out = subprocess.run([FFPROBE, "-v", "error", "-of", "json", "-show_format", "-show_streams", str(path)],
                         check=True, capture_output=True, timeout=30)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


@pytest.fixture
def real_reactor() -> Any:
    """The global reactor pytest-twisted runs, for tests that start real processes."""
    from twisted.internet import reactor as global_reactor

    return global_reactor


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(alive(int(p)) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def wait_for(reactor: Any, check: Callable[[], object], timeout: float = 30.0) -> Deferred[float]:
    """``tests.helpers.wait_for`` every 50 ms, spelt as test_media_ffmpeg.py and test_media_pool.py
    (other branches) call it; new tests call tests.helpers. What they wait for (an ffmpeg's first
    progress line, a second job's start) takes seconds on a loaded machine."""
    return helpers.wait_for(check, timeout, interval=0.05, reactor=reactor)


def group_gone(reactor: Any, pgid: int) -> Deferred[float]:
    """Fires once no process of group ``pgid`` is left; fails after 10 s. A group killed with
    SIGKILL takes a moment to go (a member freeing a large decode), after its leader is reaped."""
    return wait_for(reactor, lambda: not group_alive(pgid), timeout=10.0)
