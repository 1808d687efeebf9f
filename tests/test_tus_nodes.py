"""Resumable uploads on real nodes with the official tus client (tuspy)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.media_samples import Clips
from tests.nodes import NodeProcess, free_port, wait_job

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration


def partial_then_resume(first: str, second: str, path: Path, seed: int) -> tuple[str, dict[str, str]]:
    """Upload some chunks to ``first``, stop at a random offset, finish on ``second``."""
    from tusclient import client

    rng = random.Random(seed)
    size = path.stat().st_size
    chunk = rng.randrange(64 * 1024, size // 3)
    a = client.TusClient(first + "/files/").uploader(str(path), chunk_size=chunk,
                                                     metadata={"filename": path.name, "presets": "poster"})
    a.upload_chunk()
    a.upload_chunk()
    assert 0 < a.offset < size
    url = a.url
    upload_id = url.rstrip("/").rsplit("/", 1)[1]
    b = client.TusClient(second + "/files/").uploader(str(path), chunk_size=1024 * 1024,
                                                      url=f"{second}/files/{upload_id}")
    assert b.get_offset() == a.offset
    b.upload()
    return upload_id, dict(b.request.response_headers) if b.request is not None else {}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TusNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_resume_on_the_same_node(self, tmp_path: Path, media_clips: Clips) -> None:
        """An upload stopped at a random offset resumes; the stored input is the file, byte for byte."""
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                      f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0"])
        node.start()
        try:
            base = yield node.wait_ready()
            upload_id, _ = yield deferToThread(partial_then_resume, base, base, media_clips.landscape, 1)
            job = yield wait_job(base, upload_id)
            assert job["state"] == "done", job
            stored = (tmp_path / "gridnode-data" / "inputs" / upload_id / "source").read_bytes()
            assert sha256(stored) == sha256(media_clips.landscape.read_bytes())
        finally:
            node.stop()

    @pytest_twisted.inlineCallbacks
    def test_resume_on_another_node(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_client: Any,
                                    media_clips: Clips) -> None:
        """With an S3 store, an upload started on one node finishes on another; the input is intact."""
        nodes = [NodeProcess(tmp_path / f"t{i}", [
            "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint", s3_endpoint, "--node-id", f"t{i}",
            "--min-free", "0", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]) for i in range(2)]
        for n in nodes:
            n.start()
        try:
            a = yield nodes[0].wait_ready()
            b = yield nodes[1].wait_ready()
            upload_id, _ = yield deferToThread(partial_then_resume, a, b, media_clips.landscape, 2)
            job = yield wait_job(b, upload_id)
            assert job["state"] == "done" and job["node"] == "t1", job
            stored = s3_client.get_object(Bucket=s3_bucket, Key=f"grid/inputs/{upload_id}/source")["Body"].read()
            assert sha256(stored) == sha256(media_clips.landscape.read_bytes())
            left = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="grid/uploads/").get("KeyCount", 0)
            assert left == 0
        finally:
            for n in nodes:
                n.stop()
