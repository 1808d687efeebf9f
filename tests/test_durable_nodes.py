"""
Acknowledged means stored, on real parts: three twistd nodes on a real S3-compatible server; one
takes four uploads and is killed with kill -9 right after the fourth 201, its work folder deleted
(its disk is gone with its instance). Every job ends done on the others, each exactly once.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import sleep
from tests.media_samples import FFMPEG
from tests.nodes import stored_record, upload, wait_job
from tests.test_chaos import kill_machine, node

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A large clip (lossless noise, over two 8 MiB parts: its body streams into a multipart upload
    as it arrives), then three small ones (one request each), long enough that the node is still
    on the first when the last is accepted."""
    folder = tmp_path_factory.mktemp("durable")
    made = []
    for name, noise, quality in (("big", 60, "0"), ("a", 0, "23"), ("b", 0, "23"), ("c", 0, "23")):
        path = folder / f"{name}.mp4"
        subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25",
                        "-f", "lavfi", "-i", "sine=frequency=330", "-t", "3" if noise else "10",
                        "-vf", f"noise=alls={noise}:allf=t", "-c:v", "libx264", "-preset", "ultrafast",
                        "-qp", quality, "-c:a", "aac", "-shortest", "-y", str(path)], check=True, timeout=120)
        made.append(path)
    assert made[0].stat().st_size > 16 * 1024 * 1024, made[0].stat().st_size
    return made


class AcknowledgedMeansStoredTests:
    @pytest_twisted.inlineCallbacks
    def test_kill_nine_and_lost_disk_after_the_201s(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                    s3_client: Any, clips: list[Path]) -> None:
        """Four uploads to one node of three, the node killed right after the fourth 201 and its
        work folder deleted: all four jobs end done on the survivors, each converted exactly once,
        their outputs in the bucket, and no multipart upload left behind."""
        nodes = [node(tmp_path, s3_endpoint, s3_bucket, f"d{i}") for i in range(3)]
        for n in nodes:
            n.start()
        try:
            for n in nodes:
                yield n.wait_ready()
            victim, survivors = nodes[0], nodes[1:]
            ids = []
            for path in clips:
                status, _, job = upload(victim.url, path, "mp4-480p")
                assert status == 201, job
                ids.append(job["id"])
            kill_machine(victim)
            shutil.rmtree(victim.folder / "gridnode-work")
            finals = []
            for job_id in ids:
                job = yield wait_job(survivors[0].url, job_id, timeout=240)
                finals.append(job)
            assert [j["state"] for j in finals] == ["done"] * 4, [(j["id"], j["state"], j["error"]) for j in finals]
            assert {j["node"] for j in finals} <= {"d1", "d2"}
            logs = "".join(n.text() for n in survivors)
            for j, path in zip(finals, clips, strict=True):
                assert len(re.findall(rf"job {j['id']} adopted from d0", logs)) == 1, j["id"]
                assert len(re.findall(rf"job {j['id']} done: ", logs)) == 1, j["id"]
                assert j["input"]["size"] == path.stat().st_size
                head = s3_client.head_object(Bucket=s3_bucket, Key=f"grid/outputs/{j['id']}/mp4-480p.mp4")
                assert head["ContentLength"] == j["outputs"][0]["size"] > 1000
                record = stored_record(s3_client, s3_bucket, f"grid/jobs/{j['id']}.json")
                assert record["state"] == "done"
            assert s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        finally:
            for n in nodes:
                n.stop()

    @pytest_twisted.inlineCallbacks
    def test_a_cut_upload_leaves_nothing(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                         s3_client: Any, clips: list[Path]) -> None:
        """A large body cut off half-way (its parts already streaming into the bucket): its
        multipart upload is aborted, no object and no spool file are left."""
        n = node(tmp_path, s3_endpoint, s3_bucket, "e0")
        n.start()
        try:
            yield n.wait_ready()
            host, port = n.url.split("//", 1)[1].split(":")
            data = clips[0].read_bytes()
            with socket.create_connection((host, int(port))) as s:
                s.sendall((f"POST /jobs?presets=mp4-480p HTTP/1.1\r\nHost: {host}\r\n"
                           f"Content-Length: {len(data)}\r\n\r\n").encode())
                s.sendall(data[:len(data) * 2 // 3])
                for _ in range(600):  # bounded: until a part is in the bucket, at least begun
                    if s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"):
                        break
                    yield sleep(0.05)
                else:
                    raise AssertionError("no multipart upload begun: nothing was cut mid-way")
            for _ in range(600):  # bounded: the abort is a request to the store, the spool a moment after
                uploads = s3_client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
                spool = list((n.folder / "gridnode-work" / "spool").iterdir())
                if not uploads and not spool:
                    break
                yield sleep(0.05)
            assert uploads == [] and spool == []
            assert s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="grid/inputs/").get("KeyCount", 0) == 0
        finally:
            n.stop()

    @pytest_twisted.inlineCallbacks
    def test_tus_completion_copies_the_stored_chunks(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                     s3_client: Any, clips: list[Path]) -> None:
        """A tus upload in 6 MiB chunks on S3: the completing PATCH is answered with the job's input
        in the bucket, made of the committed chunks copied inside the store and the last chunk."""
        from tusclient import client as tus

        n = node(tmp_path, s3_endpoint, s3_bucket, "t0")
        n.start()
        try:
            yield n.wait_ready()
            uploader = tus.TusClient(n.url + "/files/").uploader(
                str(clips[0]), chunk_size=6 * 1024 * 1024, metadata={"filename": "big.mp4", "presets": "poster"})
            yield deferToThread(uploader.upload)
            upload_id = uploader.url.rstrip("/").rsplit("/", 1)[1]
            stored = s3_client.get_object(Bucket=s3_bucket, Key=f"grid/inputs/{upload_id}/source")["Body"].read()
            assert stored == clips[0].read_bytes()
            assert f"inputs/{upload_id}/source: {clips[0].stat().st_size // (6 * 1024 * 1024)} stored parts copied" \
                in n.text()
            job = yield wait_job(n.url, upload_id)
            assert job["state"] == "done", job
        finally:
            n.stop()
