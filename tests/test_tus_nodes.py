"""
Resumable uploads with the official tus client (tuspy) over real HTTP: on in-process nodes
(tests/test_tus.py's pool, fake media) serving on loopback, and on real node processes. The
blocking clients run in threads while the test reactor serves.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import requests
from tusclient.client import TusClient
from tusclient.uploader import Uploader
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.helpers import free_port
from tests.media_samples import Clips
from tests.nodes import NodeProcess, wait_job
from tests.test_tus import TUS, Node, Pool, metadata, sha, video

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


class Sha256Uploader(Uploader):
    """tuspy sends sha1 checksums by default; this node speaks sha256."""

    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)


class Served:
    """An in-process node of the pool serving HTTP on a loopback port."""

    def __init__(self, node: Node, reactor: Any) -> None:
        self.node = node
        self.jobs = node.jobs
        self.port = reactor.listenTCP(0, node.site, interface="127.0.0.1")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/files/"

    def spool_files(self) -> list[str]:
        return self.node.spool_files()


class LoopbackPool(Pool):
    """tests/test_tus.py's pool on the real reactor."""

    def __init__(self, reactor: Any, tmp_path: Path) -> None:
        super().__init__(reactor, tmp_path)
        self.served: list[Served] = []

    def serve(self, name: str = "n1") -> Served:
        served = Served(self.node(name), self.reactor)
        self.served.append(served)
        return served


@pytest.fixture
def pool(real_reactor: Any, tmp_path: Path) -> Iterator[LoopbackPool]:
    pool = LoopbackPool(real_reactor, tmp_path)
    yield pool
    pool.close()
    for served in pool.served:
        served.port.stopListening()


async def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
    """One request with `requests`, in a thread, so the test reactor serves meanwhile."""
    return await deferToThread(requests.request, method, url, headers=headers or {}, data=body or None,
                               timeout=10, allow_redirects=False)


async def create(node: Served, length: int, **meta: str) -> str:
    headers = {**TUS, "Upload-Length": str(length)}
    if meta:
        headers["Upload-Metadata"] = metadata(**meta)
    r = await http("POST", node.base, headers)
    assert r.status_code == 201, r.text
    location: str = r.headers["Location"]
    assert location.startswith("/files/")
    return location.rsplit("/", 1)[1]


async def head(node: Served, upload_id: str) -> Any:
    return await http("HEAD", node.base + upload_id, TUS)


async def cut_off_patch(node: Served, upload_id: str, offset: int, data: bytes, sent: int) -> None:
    """A PATCH announcing ``len(data)`` bytes whose connection closes after ``sent`` of them."""

    def send() -> None:
        head_lines = (f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                      f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", node.port.getHost().port), timeout=5) as s:
            s.sendall(head_lines.encode() + data[:sent])

    await deferToThread(send)


async def wait_for_offset(reactor: Any, node: Served, upload_id: str, offset: int) -> Any:
    """The server notices a dropped connection a moment after the client closed it."""
    for _ in range(1000):  # bounded
        r = await head(node, upload_id)
        if r.headers.get("Upload-Offset") == str(offset):
            return r
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"offset stayed at {r.headers.get('Upload-Offset')}, expected {offset}")


def upload_with_tuspy(url: str, path: Path, chunk_size: int, stop_at: int | None = None, **meta: str) -> str:
    """tuspy, blocking: create (or resume, with a full upload URL) and send chunks; returns the upload URL."""
    if url.endswith("/files/"):
        uploader = Sha256Uploader(str(path), client=TusClient(url), chunk_size=chunk_size, metadata=meta,
                                  upload_checksum=True)
    else:
        uploader = Sha256Uploader(str(path), url=url, chunk_size=chunk_size, upload_checksum=True)
    uploader.upload(stop_at=stop_at)
    return str(uploader.url)


class TuspyTests:
    """tuspy against in-process nodes with fake media (the same without a real client: tests/test_tus.py)."""

    @pytest_twisted.ensureDeferred
    async def test_tuspy_uploads_in_chunks(self, pool: LoopbackPool, tmp_path: Path) -> None:
        """The official client creates, sends 64 kB chunks with sha256 checksums, and ends with a job whose
        input is the file."""
        node = pool.serve()
        path, data = video(tmp_path, 333_333)
        url = await deferToThread(upload_with_tuspy, node.base, path, 64 * 1024, filename="clip.mov")
        upload_id = url.rsplit("/", 1)[1]
        r = await head(node, upload_id)
        assert r.headers["Gridnode-Job"] == upload_id
        assert node.jobs.active[upload_id].job.name == "clip.mov"
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []

    @pytest_twisted.ensureDeferred
    async def test_interrupted_upload_resumes(self, pool: LoopbackPool, real_reactor: Any, tmp_path: Path) -> None:
        """A PATCH whose connection drops at a random offset keeps what arrived; tuspy resumes from the offset
        HEAD answers, and the job's input has the file's sha256."""
        node = pool.serve()
        path, data = video(tmp_path, 400_000, seed=7)
        upload_id = await create(node, len(data), filename="clip.mov")
        cut = random.Random(7).randrange(1, len(data))
        await cut_off_patch(node, upload_id, 0, data, cut)
        await wait_for_offset(real_reactor, node, upload_id, cut)
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []
        await deferToThread(upload_with_tuspy, node.base + upload_id, path, 100_000)
        assert node.jobs.active[upload_id].job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)

    @pytest_twisted.ensureDeferred
    async def test_resume_on_another_node(self, pool: LoopbackPool, real_reactor: Any, tmp_path: Path) -> None:
        """An upload begun on one node (cut off mid-PATCH) resumes on another sharing the store: that node
        reads the info, fetches the parts and completes the job."""
        first, second = pool.serve("n1"), pool.serve("n2")
        path, data = video(tmp_path, 500_000, seed=3)
        url = await deferToThread(upload_with_tuspy, first.base, path, 64 * 1024, 128 * 1024, filename="a.mov")
        upload_id = url.rsplit("/", 1)[1]
        cut = random.Random(3).randrange(128 * 1024 + 1, len(data))
        await cut_off_patch(first, upload_id, 128 * 1024, data[128 * 1024:], cut - 128 * 1024)
        await wait_for_offset(real_reactor, first, upload_id, cut)
        await deferToThread(upload_with_tuspy, second.base + upload_id, path, 64 * 1024)
        job = second.jobs.active[upload_id].job
        assert job.node == "n2" and job.name == "a.mov" and job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []
        r = await head(first, upload_id)  # the first node learns it from the job record
        assert r.status_code == 200 and r.headers["Gridnode-Job"] == upload_id
