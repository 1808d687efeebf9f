"""
Hostile and broken uploads (ffmpeg's record: CVE-2016-1897/1898 playlists and
concat lists reading local files, CVE-2017-9993 an HLS playlist inside an AVI
GAB2 chunk). Every case ends with a stable error code, nothing from the
machine leaks into any output, and the node stays healthy.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import urllib.parse
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers import free_port, wait_for
from tests.media_samples import FFMPEG, Clips, cut_faststart, late_giant_frames, many_tracks
from tests.nodes import NodeProcess, get_json, request, upload, wait_job

pytestmark = pytest.mark.integration

CODES = {"not_a_video", "needs_video", "unsupported_format", "too_long", "too_large", "too_many_streams",
         "ffmpeg_failed", "timeout", "output_too_large", "input_truncated"}
SECRET = Path("/etc/passwd").read_bytes().split(b"\n")[0]  # "root:x:0:0:..."


def ff(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


def corpus(folder: Path, clips: Clips) -> dict[str, tuple[bytes, str]]:
    """name -> (body, file name sent with it)."""
    mp4 = clips.landscape.read_bytes()
    faststart = folder / "fast.mp4"
    ff("-i", str(clips.landscape), "-c", "copy", "-movflags", "+faststart", str(faststart))
    fast = faststart.read_bytes()
    moov_end = fast.index(b"moov") - 4 + struct.unpack(">I", fast[fast.index(b"moov") - 4:fast.index(b"moov")])[0]
    huge = folder / "huge.mkv"
    ff("-f", "lavfi", "-i", "color=black:size=8208x4320:duration=0.04:rate=25", "-c:v", "libx264", "-preset",
       "ultrafast", str(huge))
    many = folder / "many.mkv"
    ff("-f", "lavfi", "-i", "testsrc2=size=64x64:duration=0.2", "-f", "lavfi", "-i", "sine=duration=0.2",
       *sum((["-map", "1:a"] for _ in range(40)), ["-map", "0:v"]), "-c:v", "libx264", "-preset", "ultrafast",
       "-c:a", "libopus", str(many))
    flv = folder / "long.flv"
    ff("-f", "lavfi", "-i", "testsrc2=size=64x64:duration=0.5", "-c:v", "flv", str(flv))
    long_flv = bytearray(flv.read_bytes())
    at = long_flv.index(b"duration") + len(b"duration") + 1
    long_flv[at:at + 8] = struct.pack(">d", 10 * 24 * 3600.0)
    wav = folder / "a.wav"
    ff("-f", "lavfi", "-i", "sine=duration=0.3", str(wav))
    png = folder / "p.png"
    ff("-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1", str(png))
    gif = folder / "g.gif"
    ff("-f", "lavfi", "-i", "testsrc2=size=64x64:duration=0.3", str(gif))
    y4m = b"YUV4MPEG2 W100000 H100000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + b"\x80" * 1000
    playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
    gab2 = (b"RIFF\x00\x01\x00\x00AVI LIST\x00\x00\x00\x00hdrlavih" + b"\x00" * 64 + b"LIST\x00\x00\x00\x00movi"
            + b"00tx\x00\x01\x00\x00GAB2\x00\x02\x00" + b"\x0a\x00\x00\x00" + b"s\x00u\x00b\x00\x00\x00"
            + b"\x04\x00" + struct.pack("<I", len(playlist)) + playlist)
    return {
        "zero bytes": (b"", "empty.mp4"),
        "one byte": (b"\x00", "one.mp4"),
        "random bytes": (os.urandom(65536), "random.mp4"),
        "truncated mp4": (mp4[: len(mp4) // 3], "truncated.mp4"),
        "mp4 with only moov": (fast[:moov_end], "moov.mp4"),
        "ftyp only": (mp4[:32], "ftyp.mp4"),
        "hls playlist of /etc/passwd": (playlist, "list.m3u8"),
        "hls playlist named mp4": (playlist, "movie.mp4"),
        "hls with key file": (b"#EXTM3U\n#EXT-X-KEY:METHOD=AES-128,URI=\"file:///etc/passwd\"\n#EXTINF:1,\n"
                              b"a.ts\n#EXT-X-ENDLIST\n", "k.m3u8"),
        "concat list": (b"ffconcat version 1.0\nfile /etc/passwd\n", "list.txt"),
        "concat list of the clip": (f"ffconcat version 1.0\nfile {clips.landscape}\n".encode(), "c.mp4"),
        "avi with gab2 hls (CVE-2017-9993)": (gab2, "gab2.avi"),
        "huge dimensions": (huge.read_bytes(), "huge.mkv"),
        "y4m with huge claimed size": (y4m, "huge.y4m"),
        "41 streams (limit 16)": (many.read_bytes(), "many.mkv"),
        "ten days claimed duration": (bytes(long_flv), "long.flv"),
        "audio only wav": (wav.read_bytes(), "a.wav"),
        "audio only mp4": (clips.audio_only.read_bytes(), "a.mp4"),
        "png image": (png.read_bytes(), "p.png"),
        "gif animation": (gif.read_bytes(), "g.gif"),
        "jpeg header": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(500), "j.jpg"),
        "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF\n", "doc.pdf"),
        "html": (b"<!doctype html><video src=file:///etc/passwd>", "x.html"),
        "shell script": (b"#!/bin/sh\ncat /etc/passwd\n", "x.sh"),
        "elf binary": (Path("/bin/true").read_bytes(), "true"),
        "sdp": (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=video 5004 RTP/AVP 96\n", "x.sdp"),
        "ffmetadata": (b";FFMETADATA1\ntitle=x\n", "m.txt"),
        "subtitles": (b"1\n00:00:00,000 --> 00:00:01,000\nhello\n", "s.srt"),
        "mkv header only": (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04", "h.mkv"),
        "flv header only": (b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00", "h.flv"),
        "ogg page garbage": (b"OggS\x00\x02" + os.urandom(2000), "o.ogg"),
        "mpegts sync garbage": (b"".join(b"\x47" + os.urandom(187) for _ in range(50)), "t.ts"),
        "dash manifest": (b"<?xml version='1.0'?><MPD><Period><BaseURL>file:///etc/</BaseURL></Period></MPD>",
                          "m.mpd"),
        "random with ../ name": (os.urandom(4096), "../../../../etc/passwd"),
        "random with NUL and unicode name": (os.urandom(4096), "a\x00b\u202e\U0001f4a9.mp4"),
    }



class HostileInputTests:
    @pytest_twisted.inlineCallbacks
    def test_corpus(self, open_folder: Path, tmp_path: Path, media_clips: Clips) -> None:
        """At least 30 hostile or broken inputs each end with a stable code; /etc/passwd's content is in
        no output; names never become keys; the node stays healthy and keeps no temporary file."""
        cases = corpus(tmp_path, media_clips)
        assert len(cases) >= 30
        node = NodeProcess(open_folder, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                         f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                         "--max-duration", "3600", "--ffmpeg-user", "auto", "--workers", "2",
                                         "--queue", "64"])
        node.start()
        try:
            base = yield node.wait_ready()
            jobs = {}
            for label, (body, name) in cases.items():
                query = urllib.parse.urlencode({"presets": "mp4-480p,poster", "name": name})
                status, _, raw = request("POST", f"{base}/jobs?{query}", body,
                                         {"content-type": "application/octet-stream"})
                answer = json.loads(raw)
                if status == 201:
                    jobs[label] = answer["id"]
                else:
                    assert 400 <= status < 500, (label, status, answer)
                    assert answer["error"]["code"] in CODES, (label, answer)
            for label, job_id in jobs.items():
                job = yield wait_job(base, job_id, timeout=120)
                assert job["state"] == "failed" and job["error"]["code"] in CODES, (label, job)
            status, health = get_json(base + "/health")
            assert status == 200 and health["state"] == "ok"
            store = open_folder / "gridnode-data"
            for path in store.rglob("*"):
                if path.is_file() and "inputs" not in path.parts:
                    assert SECRET not in path.read_bytes(), path
            for path in store.rglob("*"):
                assert "passwd" not in path.name and ".." not in path.name
            assert not (store / "outputs").exists() or not any((store / "outputs").rglob("*.mp4"))
            work = open_folder / "gridnode-work"
            # The spool goes once the last record is written, a moment after the job shows failed.
            yield wait_for(lambda: os.listdir(work / "spool") == [] and os.listdir(work / "scratch") == [], 60)
        finally:
            node.stop()


class ActualLimitsTests:
    @pytest_twisted.inlineCallbacks
    def test_what_the_file_holds_not_what_it_declares(self, open_folder: Path, tmp_path: Path,
                                                      media_clips: Clips) -> None:
        """On a real node (its ffmpeg as nobody when root), each limit holds on what happens:
        an MJPEG AVI declaring 64x64 with later 16000x16000 frames is too_large; an HLS job past
        --max-output is output_too_large; an mp4 of 10,000 tracks is too_many_streams at the
        upload; a faststart mp4 cut to half its bytes is accepted, then failed with
        input_truncated saying how much could be read, and nothing is stored under outputs/."""
        giant, many, half = late_giant_frames(tmp_path), many_tracks(tmp_path), cut_faststart(tmp_path)
        node = NodeProcess(open_folder, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                         f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                         "--ffmpeg-user", "auto", "--workers", "2", "--max-output", "0.3"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, body = upload(base, many, "mp4-480p")
            assert (status, body["error"]["code"]) == (422, "too_many_streams"), body
            jobs = {}
            for label, path, presets in [("giant", giant, "mp4-480p"), ("hls", media_clips.landscape, "hls"),
                                         ("half", half, "mp4-480p,poster")]:
                status, _, body = upload(base, path, presets)
                assert status == 201, (label, body)
                jobs[label] = body
            assert jobs["half"]["input"]["duration"] == pytest.approx(20.0, abs=0.1)
            ended = {}
            for label, job in jobs.items():
                ended[label] = yield wait_job(base, job["id"], timeout=120)
                assert ended[label]["state"] == "failed", (label, ended[label])
            codes = {label: job["error"]["code"] for label, job in ended.items()}
            assert codes == {"giant": "too_large", "hls": "output_too_large", "half": "input_truncated"}
            assert "of the input's 20.0 s" in ended["half"]["error"]["message"]
            assert ended["half"]["outputs"] == []
            store = open_folder / "gridnode-data"
            for job in jobs.values():
                assert not (store / "outputs" / job["id"]).exists()
            status, health = get_json(base + "/health")
            assert status == 200 and health["state"] == "ok"
            work = open_folder / "gridnode-work"
            # The spool goes once the last record is written, a moment after the job shows failed.
            yield wait_for(lambda: os.listdir(work / "spool") == [] and os.listdir(work / "scratch") == [], 60)
        finally:
            node.stop()
