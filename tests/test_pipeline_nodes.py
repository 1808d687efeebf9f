"""The conversion pipeline on a real node: twistd, ffmpeg, the file: store."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers import free_port
from tests.media_samples import Clips, ffprobe_json
from tests.nodes import NodeProcess, get_json, request, spool_emptied, upload, wait_job

pytestmark = pytest.mark.integration


def start(tmp_path: Path, *extra: str) -> NodeProcess:
    node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                  "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "p1",
                                  "--min-free", "0", *extra])
    node.start()
    return node


def ffmpeg_children(job_id: str) -> list[str]:
    """ffmpeg processes working on this job (its id is in their output paths)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "ffmpeg" in line and job_id in line]


class ConversionTests:
    @pytest_twisted.inlineCallbacks
    def test_four_presets(self, tmp_path: Path, media_clips: Clips) -> None:
        """A 4 s clip with mp4-720p, webm-480p, poster and hls ends done with 4 outputs that play."""
        node = start(tmp_path)
        try:
            base = yield node.wait_ready()
            status, head, job = upload(base, media_clips.landscape, "mp4-720p,webm-480p,poster,hls")
            assert status == 201, job
            assert head["location"] == f"/jobs/{job['id']}"
            assert job["input"]["width"] == 640 and job["input"]["duration"] == pytest.approx(4.0, abs=0.1)
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
            assert job["progress"] == 1.0
            outputs = {o["preset"]: o for o in job["outputs"]}
            assert sorted(outputs) == ["hls", "mp4-720p", "poster", "webm-480p"]
            for preset in ("hls", "mp4-720p", "webm-480p"):  # as measured, each
                assert outputs[preset]["duration"] == pytest.approx(4.0, abs=0.2), outputs[preset]
            assert "duration" not in outputs["poster"]
            codecs = {}
            for preset in ("mp4-720p", "webm-480p"):
                status, _, data = request("GET", base + outputs[preset]["url"])
                assert status == 200 and len(data) == outputs[preset]["size"]
                target = tmp_path / outputs[preset]["name"]
                target.write_bytes(data)
                info = ffprobe_json(target)
                assert float(info["format"]["duration"]) == pytest.approx(4.0, abs=0.2)
                codecs[preset] = info["streams"][0]["codec_name"]
            assert codecs == {"mp4-720p": "h264", "webm-480p": "vp9"}
            status, head, data = request("GET", base + outputs["mp4-720p"]["url"], headers={"range": "bytes=0-99"})
            assert status == 206 and len(data) == 100 and head["content-type"] == "video/mp4"
            assert head["content-range"].startswith("bytes 0-99/")
            assert head["etag"]
            status, head, data = request("GET", base + outputs["poster"]["url"])
            assert status == 200 and data[:2] == b"\xff\xd8" and head["content-type"] == "image/jpeg"
            status, head, master = request("GET", base + outputs["hls"]["url"])
            assert status == 200 and master.startswith(b"#EXTM3U")
            variant = next(line for line in master.decode().splitlines() if line.endswith(".m3u8"))
            status, _, playlist = request("GET", base + outputs["hls"]["url"].rsplit("/", 1)[0] + "/" + variant)
            assert status == 200 and b".ts" in playlist
            store = tmp_path / "gridnode-data"
            assert (store / "inputs" / job["id"] / "source").read_bytes() == media_clips.landscape.read_bytes()
            assert (store / "jobs" / f"{job['id']}.json").exists()
            # "done" shows while the last record is written; the spool file goes a moment after
            assert (yield spool_emptied(tmp_path / "gridnode-work" / "spool")) == []
            assert os.listdir(tmp_path / "gridnode-work" / "scratch") == []
            check_metrics(base)
        finally:
            assert node.stop() == 0

    @pytest_twisted.inlineCallbacks
    def test_portrait_without_audio(self, tmp_path: Path, media_clips: Clips) -> None:
        """A rotated clip with no audio track converts, shown upright (taller than wide)."""
        node = start(tmp_path)
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, media_clips.portrait, "mp4-480p")
            assert status == 201, job
            assert job["input"]["audio_codec"] is None
            assert job["sha256"] == hashlib.sha256(media_clips.portrait.read_bytes()).hexdigest()
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
            status, _, data = request("GET", base + job["outputs"][0]["url"])
            out = tmp_path / "portrait-out.mp4"
            out.write_bytes(data)
            streams = ffprobe_json(out)["streams"]
            assert [s["codec_type"] for s in streams] == ["video"]
            assert streams[0]["height"] > streams[0]["width"]
        finally:
            node.stop()


class RefusalTests:
    @pytest_twisted.inlineCallbacks
    def test_bad_uploads(self, tmp_path: Path, media_clips: Clips) -> None:
        """Random bytes, a playlist, a wrong checksum, an unknown preset and a too-large body are
        refused with stable codes, nothing is kept, and the node stays healthy."""
        node = start(tmp_path, "--max-upload", "1")
        try:
            base = yield node.wait_ready()
            status, _, body = upload(base, media_clips.random)
            assert (status, body["error"]["code"]) == (422, "not_a_video")
            status, _, body = upload(base, media_clips.playlist)
            assert status in (415, 422) and body["error"]["code"] in ("unsupported_format", "not_a_video")
            wrong = base64.b64encode(hashlib.sha256(b"something else").digest()).decode()
            status, _, body = upload(base, media_clips.portrait, **{"upload-checksum": f"sha256 {wrong}"})
            assert body["error"]["code"] == "checksum_mismatch" and status >= 400
            right = base64.b64encode(hashlib.sha256(media_clips.portrait.read_bytes()).digest()).decode()
            status, _, body = upload(base, media_clips.portrait, "poster", **{"upload-checksum": f"sha256 {right}"})
            assert status == 201, body
            status, _, body = upload(base, media_clips.portrait, "gif-party")
            assert (status, body["error"]["code"]) == (400, "unknown_preset")
            big = tmp_path / "big.bin"
            big.write_bytes(os.urandom(2 * 1024 * 1024))
            status, _, body = upload(base, big)
            assert (status, body["error"]["code"]) == (413, "too_large")
            status, health = get_json(base + "/health")
            assert status == 200 and health["state"] == "ok"
            yield wait_job(base, body_id(tmp_path))
            inputs = tmp_path / "gridnode-data" / "inputs"
            assert len(os.listdir(inputs)) == 1  # only the accepted upload
            assert (yield spool_emptied(tmp_path / "gridnode-work" / "spool")) == []
        finally:
            node.stop()

    @pytest_twisted.inlineCallbacks
    def test_full_queue_and_cancel(self, tmp_path: Path, long_clip: Path, media_clips: Clips) -> None:
        """One worker, no queue: a second upload gets 503 + Retry-After; cancelling the running job
        kills ffmpeg, removes its scratch folder and leaves it cancelled."""
        node = start(tmp_path, "--workers", "1", "--queue", "0")
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, long_clip, "mp4-720p,webm-480p")
            assert status == 201, job
            yield wait_job(base, job["id"], {"transcoding"}, min_progress=0.01)
            status, head, body = upload(base, media_clips.landscape)
            assert (status, body["error"]["code"]) == (503, "busy")
            assert int(head["retry-after"]) > 0
            scratch = tmp_path / "gridnode-work" / "scratch"
            assert ffmpeg_children(job["id"])
            status, _, data = request("DELETE", f"{base}/jobs/{job['id']}")
            assert status == 200
            final = yield wait_job(base, job["id"])
            assert final["state"] == "cancelled"
            assert ffmpeg_children(job["id"]) == []
            assert not (scratch / job["id"]).exists()
            assert os.listdir(tmp_path / "gridnode-work" / "spool") == []
            # 24 MB: the body is spliced from the socket to the spool file (gridnode/web/splice.py)
            data = long_clip.read_bytes()
            right = base64.b64encode(hashlib.sha256(data).digest()).decode()
            status, _, job2 = upload(base, long_clip, "poster", **{"upload-checksum": f"sha256 {right}"})
            assert status == 201, job2
            assert job2["sha256"] == hashlib.sha256(data).hexdigest() and job2["input"]["size"] == len(data)
            job2 = yield wait_job(base, job2["id"])
            assert job2["state"] == "done", job2
            assert (tmp_path / "gridnode-data" / "inputs" / job2["id"] / "source").read_bytes() == data
        finally:
            node.stop()


def check_metrics(base: str) -> None:
    """/metrics parses with prometheus-client's own parser and has the families of a finished job."""
    from prometheus_client.parser import text_string_to_metric_families

    status, head, text = request("GET", base + "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    for name in ["gridnode_jobs_finished", "gridnode_jobs_accepted", "gridnode_jobs_active",
                 "gridnode_job_duration_seconds", "gridnode_job_phase_duration_seconds", "gridnode_ffmpeg_speed_ratio",
                 "gridnode_queue_length", "gridnode_workers_busy", "gridnode_upload_bytes",
                 "gridnode_upload_rejections", "gridnode_store_operation_duration_seconds", "gridnode_store_errors"]:
        assert name in families, name
    done = [s for s in families["gridnode_jobs_finished"].samples
            if s.name == "gridnode_jobs_finished_total" and s.labels == {"state": "done", "preset": "webm-480p"}]
    assert done and done[0].value == 1
    phases = {s.labels["phase"] for s in families["gridnode_job_phase_duration_seconds"].samples if "phase" in s.labels}
    assert {"probe", "store_input", "queue", "transcode", "store_outputs"} <= phases
    puts = [s for s in families["gridnode_store_operation_duration_seconds"].samples
            if s.name.endswith("_count") and s.labels.get("operation") == "put_file"]
    assert puts and puts[0].value >= 5


def body_id(tmp_path: Path) -> str:
    jobs = sorted((tmp_path / "gridnode-data" / "jobs").glob("*.json"))
    return jobs[-1].stem


