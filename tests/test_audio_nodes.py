"""
Audio alone on a real ``twistd -n gridnode`` node with real ffmpeg, as a podcaster sees it: the
node cuts every video in chunks (``--chunk-over 0``) and takes videos of a minute at most, yet an
mp3 with cover art becomes ``audio.m4a`` and a loudness-normalised Opus file in one piece, as
long as its input within a frame of audio; an hour-long recording converts whole; a job asking
an audio file for video outputs, a file of subtitles alone and an m4a claiming weeks are refused
before the 201 with their codes.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port
from tests.media_samples import FFMPEG, ffprobe_json, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, request, upload
from tests.test_chunked_nodes import wait_done

pytestmark = [pytest.mark.integration, needs_ffmpeg]

CONFIG = """
[templates.podcast]
description = "Opus at -16 LUFS"
outputs = [{container = "opus", audio_kbps = 48, loudness = -16}]

[templates.speech]
description = "Opus, 32 kb/s"
outputs = [{container = "opus", audio_kbps = 32}]
"""
#: the long recording's seconds: an hour in the suite; the issue's 6 hours take ffmpeg minutes on
#: one core, so they run on request (GRIDNODE_TEST_AUDIO_HOURS=6)
LONG = round(3600 * float(os.environ.get("GRIDNODE_TEST_AUDIO_HOURS", "1")))


def ffmpeg(*args: str) -> str:
    return subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-y", "-v", "error", *args], check=True,
                          capture_output=True, text=True, timeout=120 * max(1, LONG / 3600)).stderr


def loudness(path: Path) -> float:
    out = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-nostats", "-i", str(path), "-af", "ebur128",
                          "-f", "null", "-"], check=True, capture_output=True, text=True, timeout=60).stderr
    return float(re.findall(r"I:\s+(-?[\d.]+) LUFS", out)[-1])


def stream_seconds(path: Path) -> float:
    return float(ffprobe_json(path)["format"]["duration"])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("audio-node")
    (folder / "node.toml").write_text(CONFIG)
    made = NodeProcess(folder, ["--config", "node.toml", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "a1",
                                "--min-free", "0", "--chunk-over", "0", "--chunk-seconds", "3",
                                "--max-duration", "60"])
    made.start()
    try:
        made.block_until_ready(30)
        yield made
    finally:
        made.stop()


def fetch(node: NodeProcess, job: dict[str, Any], preset: str, folder: Path) -> Path:
    output = next(o for o in job["outputs"] if o["preset"] == preset)
    status, _, data = request("GET", node.url + output["url"])
    assert status == 200 and len(data) == output["size"]
    path = folder / output["name"]
    path.write_bytes(data)
    return path


def refused(node: NodeProcess, path: Path, presets: str) -> tuple[int, str, str]:
    status, _, body = upload(node.url, path, presets)
    return status, body["error"]["code"], body["error"]["message"]


def test_mp3_with_cover_art(node: NodeProcess, tmp_path: Path) -> None:
    """An mp3 with cover art (an attached picture) is audio alone: video outputs are refused
    whole (needs_video, naming them); ``audio`` and a loudness template make an m4a and an
    Opus file, each as long as the input within a frame of audio, in one piece (no chunks)."""
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1", str(tmp_path / "cover.png"))
    src = tmp_path / "episode.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=20,volume=-8.2dB",
           "-i", str(tmp_path / "cover.png"), "-map", "0", "-map", "1", "-c:a", "libmp3lame", "-b:a", "64k",
           "-c:v", "png", "-disposition:v", "attached_pic", "-id3v2_version", "3", str(src))
    _, listing = get_json(node.url + "/presets")
    assert "audio" in [t["name"] for t in listing["presets"]]
    for presets, named in [("mp4-720p", "mp4-720p"), ("audio,poster", "poster")]:
        status, code, message = refused(node, src, presets)
        assert (status, code) == (422, "needs_video") and named in message, message
    status, _, job = upload(node.url, src, "audio,podcast")
    assert status == 201, job
    assert (job["input"]["format"], job["input"]["video_codec"], job["input"]["width"]) == ("mp3", None, 0)
    job = wait_done(node, job["id"], 120)
    assert job["chunks"] == [] and job["progress"] == 1
    assert {o["preset"]: o["content_type"] for o in job["outputs"]} == {"audio": "audio/mp4", "podcast": "audio/ogg"}
    source = stream_seconds(src)
    m4a, opus = fetch(node, job, "audio", tmp_path), fetch(node, job, "podcast", tmp_path)
    assert ffprobe_json(m4a)["streams"][0]["codec_name"] == "aac" and len(ffprobe_json(m4a)["streams"]) == 1
    assert stream_seconds(m4a) == pytest.approx(source, abs=1024 / 44100 + 0.03)  # an AAC frame, an mp3 padding
    assert stream_seconds(opus) == pytest.approx(source, abs=0.02 + 0.03)
    assert {o["preset"]: o["duration"] for o in job["outputs"]}["podcast"] == pytest.approx(source, abs=0.1)
    assert loudness(src) == pytest.approx(-30, abs=0.5)
    assert loudness(opus) == pytest.approx(-16, abs=1.0)


def test_hour_long_recording(node: NodeProcess, tmp_path: Path) -> None:
    """An hour (or ``LONG``) of mono speech-rate audio on a node taking videos of a minute at most: accepted
    (audio alone has its own limit), made whole, as long as its input."""
    src = tmp_path / "lecture.m4a"
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=8000:duration={LONG}", "-ac", "1",
           "-c:a", "aac", "-b:a", "12k", str(src))
    status, _, job = upload(node.url, src, "speech")
    assert status == 201, job
    job = wait_done(node, job["id"], 300 * max(1, LONG / 3600))
    assert job["chunks"] == [] and job["input"]["duration"] == pytest.approx(LONG, abs=0.1)
    out = fetch(node, job, "speech", tmp_path)
    assert stream_seconds(out) == pytest.approx(stream_seconds(src), abs=0.02 + 0.03)


def test_hostile_audio(node: NodeProcess, tmp_path: Path) -> None:
    """Subtitles alone are not_a_video; an m4a whose header claims 24 days is too_long (413);
    an audio output of a silent video is needs_audio; nothing is accepted."""
    (tmp_path / "s.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    ffmpeg("-i", str(tmp_path / "s.srt"), "-c:s", "srt", str(tmp_path / "subs.mkv"))
    assert refused(node, tmp_path / "subs.mkv", "audio")[:2] == (422, "not_a_video")
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=2", "-c:a", "aac", str(tmp_path / "short.m4a"))
    data = bytearray((tmp_path / "short.m4a").read_bytes())
    for box in (b"mvhd", b"mdhd"):  # version 0: the duration is 20 bytes past the box's type
        at = data.find(box)
        data[at + 20:at + 24] = struct.pack(">I", 0x7FFFFFFF)
    (tmp_path / "huge.m4a").write_bytes(bytes(data))
    assert refused(node, tmp_path / "huge.m4a", "audio")[:2] == (413, "too_long")
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10:duration=2", "-c:v", "libx264",
           "-preset", "ultrafast", str(tmp_path / "silent.mp4"))
    status, code, message = refused(node, tmp_path / "silent.mp4", "mp4-480p,audio")
    assert (status, code) == (422, "needs_audio") and "audio" in message
    _, listing = get_json(node.url + "/jobs")
    assert all(j["input"].get("name") not in ("subs.mkv", "huge.m4a", "silent.mp4") for j in listing["jobs"])
