"""
Templates on a real node: a config file's templates (HEVC mp4, AV1 mp4, a poster, a loudness
target, a clip, a watermark) run by twistd and real ffmpeg on a generated 12 s clip, in one job,
and every output probed: codecs, the hvc1 tag, sizes, durations, loudness, the watermark's corner;
GET /presets and uploads held to a token's presets claim.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode import tokens
from gridnode.keyring import parse_keyring
from tests.helpers import free_port
from tests.media_samples import ffprobe_json
from tests.nodes import NodeProcess, get_json, request, upload, wait_job

pytestmark = pytest.mark.integration

#: the sine's level that ffmpeg's ebur128 measures at -30 LUFS (lavfi's sine is ~-21.8 LUFS)
QUIET_DB = "-8.2dB"
CONFIG = """
watermark-dir = "marks"

[templates.ship]
description = "HEVC and AV1 for players that take them, and a poster"
outputs = [
  {name = "hevc", container = "mp4", video = "hevc", size = 240, speed = "fastest"},
  {name = "av1", container = "mp4", video = "av1", size = 240, speed = "fastest"},
  {name = "poster", container = "jpeg", size = 240},
]

[templates.loud]
outputs = [{container = "mp4", size = 144, speed = "fastest", loudness = -16}]

[templates.cut]
outputs = [
  {name = "cut", container = "mp4", size = 144, speed = "fastest", clip = {start = 2, end = 5}},
  {name = "marked", container = "jpeg", size = 240, watermark = {image = "logo.png", corner = "top-right", margin = 8}},
  {name = "plain", container = "jpeg", size = 240},
]

[templates.late]
outputs = [{name = "late", container = "mp4", size = 144, speed = "fastest", clip = {start = 60}}]
"""


def ffmpeg(*args: str) -> str:
    return subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-y", *args], check=True, capture_output=True,
                          text=True, timeout=120).stderr


def make_source(folder: Path) -> Path:
    """12 s of 640x360 testsrc2 at 25 fps, and a sine at -30 LUFS."""
    path = folder / "source.mp4"
    ffmpeg("-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25:duration=12",
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration=12,volume={QUIET_DB}",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path))
    return path


def loudness(path: Path) -> float:
    """Integrated loudness in LUFS, as ffmpeg's ebur128 measures it."""
    out = ffmpeg("-nostats", "-i", str(path), "-af", "ebur128", "-f", "null", "-")
    found = re.findall(r"I:\s+(-?[\d.]+) LUFS", out)
    return float(found[-1])


def rgb_at(path: Path, width: int, x: int, y: int) -> tuple[int, ...]:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True, timeout=60).stdout
    i = (y * width + x) * 3
    return tuple(raw[i:i + 3])


def fetch(base: str, output: dict[str, Any], folder: Path) -> Path:
    status, _, data = request("GET", base + output["url"])
    assert status == 200 and len(data) == output["size"]
    path = folder / output["name"]
    path.write_bytes(data)
    return path


class TemplateNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_config_templates_end_to_end(self, tmp_path: Path) -> None:
        """One job of three config templates: every output made by one ffmpeg, each as its spec says."""
        (tmp_path / "marks").mkdir()
        ffmpeg("-v", "error", "-f", "lavfi", "-i", "color=c=0xff00ff:s=48x48", "-frames:v", "1",
               str(tmp_path / "marks" / "logo.png"))
        (tmp_path / "node.toml").write_text(CONFIG)
        source = make_source(tmp_path)
        assert loudness(source) == pytest.approx(-30, abs=0.5)
        node = NodeProcess(tmp_path, ["--config", "node.toml", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "t1",
                                      "--min-free", "0"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, listing = get_json(base + "/presets")
            names = [t["name"] for t in listing["presets"]]
            assert status == 200 and {"ship", "loud", "cut", "mp4-720p", "poster"} <= set(names)
            ship = next(t for t in listing["presets"] if t["name"] == "ship")
            assert [o["video"] for o in ship["outputs"][:2]] == ["hevc", "av1"]

            status, _, refused = upload(base, source, "ship,nope")
            assert status == 400 and refused["error"]["code"] == "unknown_preset"
            status, _, refused = upload(base, source, "ship,late")  # a clip from 60 s of a 12 s video
            assert status == 400 and refused["error"]["code"] == "bad_spec", refused
            assert refused["error"]["message"].startswith("late.clip.start: 60 s is past the end")

            status, _, job = upload(base, source, "ship,cut,loud")
            assert status == 201, job
            assert job["presets"] == ["ship", "cut", "loud"]
            job = yield wait_job(base, job["id"], timeout=300)
            assert job["state"] == "done", job
            outputs = {o["preset"]: o for o in job["outputs"]}
            assert sorted(outputs) == ["av1", "cut", "hevc", "loud", "marked", "plain", "poster"]
            files = {name: fetch(base, o, tmp_path) for name, o in outputs.items()}

            for name, codec, tag in (("hevc", "hevc", "hvc1"), ("av1", "av1", "av01")):
                info = ffprobe_json(files[name])
                video = next(s for s in info["streams"] if s["codec_type"] == "video")
                audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
                assert (video["codec_name"], video["codec_tag_string"]) == (codec, tag)
                assert (video["width"], video["height"]) == (426, 240)
                assert float(video["duration"]) == pytest.approx(12.0, abs=0.1)
                assert float(info["format"]["duration"]) == pytest.approx(12.0, abs=0.1)
                assert audio["codec_name"] == "aac"
                assert outputs[name]["duration"] == pytest.approx(12.0, abs=0.1)
            poster = ffprobe_json(files["poster"])["streams"][0]
            assert (poster["codec_name"], poster["width"], poster["height"]) == ("mjpeg", 426, 240)

            assert loudness(files["loud"]) == pytest.approx(-16, abs=1.0)

            cut = ffprobe_json(files["cut"])
            frame = 1 / 25
            for stream in cut["streams"]:
                assert float(stream["duration"]) == pytest.approx(3.0, abs=frame + 0.001), stream
            counted = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                                      "-show_entries", "stream=nb_read_frames", "-of", "json", str(files["cut"])],
                                     check=True, capture_output=True, timeout=60).stdout
            assert abs(int(json.loads(counted)["streams"][0]["nb_read_frames"]) - 75) <= 1
            assert outputs["cut"]["duration"] == pytest.approx(3.0, abs=frame + 0.001)

            # The watermark's middle, 8 px in from the top right corner: magenta on "marked"
            # only; the other corners of both posters are alike.
            x, y = 426 - 8 - 24, 8 + 24
            r, g, b = rgb_at(files["marked"], 426, x, y)
            assert r > 200 and g < 60 and b > 200, (r, g, b)
            assert rgb_at(files["plain"], 426, x, y) != (r, g, b)
            for corner in ((32, 32), (32, 208), (394, 208)):
                marked, plain = rgb_at(files["marked"], 426, *corner), rgb_at(files["plain"], 426, *corner)
                assert all(abs(m - p) < 24 for m, p in zip(marked, plain, strict=True)), corner
        finally:
            assert node.stop() == 0

    @pytest_twisted.inlineCallbacks
    def test_presets_list_follows_the_token(self, tmp_path: Path) -> None:
        """With tokens, GET /presets wants one, and lists what its presets claim allows; an upload
        naming a template outside the claim is 403 before its body."""
        secret = b"templates-test-secret-0123456789abcdef"
        (tmp_path / "upload.secret").write_bytes(secret)
        (tmp_path / "marks").mkdir()
        (tmp_path / "marks" / "logo.png").write_bytes(b"\x89PNG")
        (tmp_path / "node.toml").write_text(CONFIG)
        node = NodeProcess(tmp_path, ["--config", "node.toml", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "t2",
                                      "--upload-secret", "upload.secret"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, answer = get_json(base + "/presets")
            assert status == 401 and answer["error"]["code"] == "unauthorized"
            token = tokens.mint(parse_keyring(secret, "test"), sub="t", scopes={"upload", "read"}, ttl=600,
                                presets=["loud", "poster"])
            status, _, body = request("GET", base + "/presets", headers={"authorization": f"Bearer {token}"})
            assert status == 200
            assert [t["name"] for t in json.loads(body)["presets"]] == ["poster", "loud"]
            status, _, body = request("POST", base + "/jobs?presets=ship", b"x" * 100,
                                      {"authorization": f"Bearer {token}", "content-type": "video/mp4"})
            assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
        finally:
            assert node.stop() == 0
