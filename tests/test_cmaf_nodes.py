"""
CMAF and storyboards on a real node: a config template of an HEVC mp4, an AV1 mp4, a 3-rung
H.264 CMAF ladder, a 3-rung AV1 one, a storyboard and a poster, run by twistd and real ffmpeg
on a generated 12 s clip in one job, and everything read back over HTTP as a player would:
every output probed, both manifests, the segments they name (the same files), the codec
strings they state, the rungs' keyframe times, the VTT's cues over the whole duration and the
sheet they point into.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.media.headers import codec_string
from tests.helpers import free_port
from tests.media_samples import ffprobe_json
from tests.nodes import BIN, NodeProcess, request, upload, wait_job
from tests.test_cmaf_storyboard import _keyframes
from tests.test_templates_nodes import make_source

pytestmark = pytest.mark.integration

CONFIG = """
[templates.player]
description = "HEVC and AV1 files, CMAF ladders in H.264 and AV1, a storyboard and a poster"
outputs = [
  {name = "hevc", container = "mp4", video = "hevc", size = 240, audio_kbps = 64},
  {name = "av1", container = "mp4", video = "av1", size = 240, audio_kbps = 64},
  {name = "stream-av1", container = "cmaf", video = "av1", audio = "none", ladder = [
    {size = 360, kbps = 600}, {size = 240, kbps = 300}, {size = 144, kbps = 150}]},
  {name = "dash", container = "dash", audio_kbps = 64, ladder = [{size = 240, kbps = 400}, {size = 144, kbps = 150}]},
  {name = "stream", container = "cmaf", audio_kbps = 64, ladder = [
    {size = 360, kbps = 900}, {size = 240, kbps = 500}, {size = 144, kbps = 200}]},
  {name = "board", container = "storyboard", interval = 2.5, width = 96},
  {name = "poster", container = "jpeg", size = 240},
]
"""
DASH = {"d": "urn:mpeg:dash:schema:mpd:2011"}


def get(base: str, url: str, folder: Path, kind: str) -> Path:
    """GET a result; it is kept under ``folder`` by its name after ``/results/<job>/``."""
    status, headers, data = request("GET", base + url)
    assert status == 200 and data, url
    assert headers["content-type"] == kind, (url, headers["content-type"])
    path = folder / url.split("/", 3)[3]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


class CmafNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_cmaf_storyboard_and_poster_in_one_job(self, tmp_path: Path) -> None:
        (tmp_path / "node.toml").write_text(CONFIG)
        source = make_source(tmp_path)
        node = NodeProcess(tmp_path, ["--config", "node.toml", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "c1",
                                      "--min-free", "0"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, source, "player")
            assert status == 201, job
            job = yield wait_job(base, job["id"], timeout=300)
            assert job["state"] == "done", job
            outputs: dict[str, Any] = {o["preset"]: o for o in job["outputs"]}
            assert sorted(outputs) == ["av1", "board", "dash", "hevc", "poster", "stream", "stream-av1"]
            stream, board = outputs["stream"], outputs["board"]
            prefix = f"/results/{job['id']}/"
            assert stream["url"] == prefix + "stream/master.m3u8" and stream["dash"] == prefix + "stream/manifest.mpd"
            assert stream["content_type"] == "application/vnd.apple.mpegurl"
            assert stream["duration"] == pytest.approx(12.0, abs=0.1)
            got = tmp_path / "got"
            m3u8 = "application/vnd.apple.mpegurl"

            # HLS: the master names three rungs and one audio rendition; their playlists name segments
            master = get(base, stream["url"], got, "application/vnd.apple.mpegurl").read_text()
            assert master.count("#EXT-X-STREAM-INF") == 3 and "TYPE=AUDIO" in master
            hls: dict[int, list[str]] = {}
            for n in range(4):
                playlist = get(base, prefix + f"stream/media_{n}.m3u8", got, m3u8).read_text()
                assert f'#EXT-X-MAP:URI="init-{n}.m4s"' in playlist and "#EXT-X-ENDLIST" in playlist
                hls[n] = re.findall(r"^(seg-\d+-\d+\.m4s)$", playlist, re.M)
                assert hls[n]
                get(base, prefix + f"stream/init-{n}.m4s", got, "video/iso.segment")
                for name in hls[n]:
                    get(base, prefix + "stream/" + name, got, "video/iso.segment")

            # DASH: the same representations, whose templates expand to exactly those files
            mpd = ET.parse(get(base, stream["dash"], got, "application/dash+xml")).getroot()
            reps = mpd.findall(".//d:Representation", DASH)
            assert sorted(r.get("id") or "" for r in reps) == ["0", "1", "2", "3"]
            for rep in reps:
                n = int(rep.get("id") or -1)
                template = rep.find("d:SegmentTemplate", DASH)
                assert template is not None
                assert template.get("initialization") == "init-$RepresentationID$.m4s"
                names = [template.get("media", "").replace("$RepresentationID$", str(n))
                         .replace("$Number%05d$", f"{k:05d}") for k in range(1, len(hls[n]) + 1)]
                assert names == hls[n]
            assert len(list((got / "stream").glob("seg-*.m4s"))) == sum(len(v) for v in hls.values())
            assert stream["files"] == 2 + 4 * 2 + sum(len(v) for v in hls.values())

            # every rung: H.264 at its size, keyframes at the same times (the segment boundaries)
            times = []
            for n, size in enumerate([(640, 360), (426, 240), (256, 144)]):
                joined = [got / "stream" / f"init-{n}.m4s", *[got / "stream" / s for s in hls[n]]]
                times.append(_keyframes(joined))
                video = ffprobe_json(got / "stream" / f"init-{n}.joined.mp4")["streams"][0]
                assert (video["codec_name"], video["width"], video["height"]) == ("h264", *size)
            assert times[0] == times[1] == times[2] == [0.0, 4.0, 8.0], times

            # the storyboard: cues from 0 to the end without gaps, each inside the one sheet
            assert board["url"] == prefix + "board/storyboard.vtt" and board["files"] == 2
            vtt = get(base, board["url"], got, "text/vtt").read_text()
            cues = re.findall(r"(\S+) --> (\S+)\n(sheet-\d+\.jpg)#xywh=(\d+),(\d+),(\d+),(\d+)", vtt)
            assert len(cues) == 5 and seconds(cues[0][0]) == 0
            assert all(a[1] == b[0] for a, b in zip(cues, cues[1:], strict=False))
            assert seconds(cues[-1][1]) == pytest.approx(12.0, abs=0.1)
            sheet = ffprobe_json(get(base, prefix + "board/sheet-001.jpg", got, "image/jpeg"))["streams"][0]
            assert (sheet["width"], sheet["height"]) == (5 * 96, 54)
            assert all(int(x) + int(w) <= sheet["width"] and int(y) + int(h) <= sheet["height"]
                       for *_, x, y, w, h in cues)

            # the HEVC (tagged hvc1, as Apple's players need) and AV1 files, as ffprobe sees them
            for name, codec, tag in (("hevc", "hevc", "hvc1"), ("av1", "av1", "av01")):
                doc = ffprobe_json(get(base, outputs[name]["url"], got, "video/mp4"))
                video, audio = doc["streams"]
                assert (video["codec_name"], video["codec_tag_string"], video["width"], video["height"]) == (
                    codec, tag, 426, 240), video
                assert audio["codec_name"] == "aac"
                assert float(doc["format"]["duration"]) == pytest.approx(12.0, abs=0.1)
                assert outputs[name]["duration"] == pytest.approx(12.0, abs=0.1)

            # the AV1 ladder: keyframes at the same times on every rung, the codec each init
            # segment carries stated in both manifests, the same segment files under both
            av1 = outputs["stream-av1"]
            master = get(base, av1["url"], got, m3u8).read_text()
            mpd_text = get(base, av1["dash"], got, "application/dash+xml").read_text()
            assert "TYPE=AUDIO" not in master
            times, codecs = [], []
            for n in range(3):
                playlist = get(base, prefix + f"stream-av1/media_{n}.m3u8", got, m3u8).read_text()
                names = re.findall(r"^(seg-\d+-\d+\.m4s)$", playlist, re.M)
                assert names == [f"seg-{n}-{k:05d}.m4s" for k in range(1, 4)], names  # the DASH template's
                init = get(base, prefix + f"stream-av1/init-{n}.m4s", got, "video/iso.segment")
                segs = [get(base, prefix + "stream-av1/" + name, got, "video/iso.segment") for name in names]
                times.append(_keyframes([init, *segs]))
                video = ffprobe_json(got / "stream-av1" / f"init-{n}.joined.mp4")["streams"][0]
                codecs.append(codec_string(io.BytesIO(init.read_bytes()), init.stat().st_size))
                assert video["codec_name"] == "av1" and codecs[-1] and codecs[-1].startswith("av01.0.")
            assert times[0] == times[1] == times[2] == [0.0, 4.0, 8.0], times
            assert re.findall(r'codecs="([^"]+)"', mpd_text) == codecs
            assert re.findall(r'CODECS="([^"]+)"', master) == codecs
            assert 'media="seg-$RepresentationID$-$Number%05d$.m4s"' in mpd_text

            # DASH alone: the manifest is the output, no HLS playlist; its timelines name every segment
            dash = outputs["dash"]
            assert dash["url"] == prefix + "dash/manifest.mpd" and dash["content_type"] == "application/dash+xml"
            assert dash["duration"] == pytest.approx(12.0, abs=0.1) and "dash" not in dash
            dash_mpd = get(base, dash["url"], got, "application/dash+xml").read_text()
            assert "<SegmentTimeline>" in dash_mpd
            assert re.findall(r'mimeType="video/mp4" codecs="([^"]+)"', dash_mpd)[0].startswith("avc1.")

            poster = ffprobe_json(get(base, outputs["poster"]["url"], got, "image/jpeg"))["streams"][0]
            assert (poster["codec_name"], poster["width"], poster["height"]) == ("mjpeg", 426, 240)

            # `gridnode fetch` downloads every file of both: the sizes the job states, checked
            fetched = subprocess.run([os.path.join(BIN, "gridnode"), "fetch", job["id"], str(tmp_path / "dl"),
                                      "--node", base], capture_output=True, text=True, timeout=120,
                                     stdin=subprocess.DEVNULL)
            assert fetched.returncode == 0, fetched.stdout + fetched.stderr
            dl = tmp_path / "dl" / job["id"]
            want = {"master.m3u8", "manifest.mpd", *(f"media_{n}.m3u8" for n in range(4)),
                    *(f"init-{n}.m4s" for n in range(4)), *(name for names in hls.values() for name in names)}
            assert {p.name for p in (dl / "stream").iterdir()} == want
            assert {p.name for p in (dl / "board").iterdir()} == {"storyboard.vtt", "sheet-001.jpg"}
            assert sum(p.stat().st_size for p in (dl / "stream").iterdir()) == stream["size"]
            assert sum(p.stat().st_size for p in (dl / "board").iterdir()) == board["size"]
            # (the audio's segments are cut by AAC frames: a last one of a few ms may follow)
            fetched_dash = {p.name for p in (dl / "dash").iterdir()}
            audio_segments = {name for name in fetched_dash if name.startswith("seg-2-")}
            assert fetched_dash - audio_segments == {"manifest.mpd", *(f"init-{n}.m4s" for n in range(3)),
                                                     *(f"seg-{n}-{k:05d}.m4s" for n in range(2) for k in range(1, 4))}
            assert len(audio_segments) in (3, 4) and len(fetched_dash) == dash["files"]
            assert sum(p.stat().st_size for p in (dl / "dash").iterdir()) == dash["size"]
        finally:
            assert node.stop() == 0
