"""
The tus endpoint on a real GridSite over loopback TCP, with an in-memory
store and fake media (no ffmpeg), driven by plain HTTP requests and by the
official tuspy client. Blocking clients run in threads while the test
reactor serves.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import requests
from hypothesis import given
from hypothesis import strategies as st
from tusclient.client import TusClient
from tusclient.uploader import Uploader
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from gridnode import jobs as job_states
from gridnode import keys
from gridnode.config import build_config
from gridnode.errors import GridnodeError
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.web.tus import EXPOSE_HEADERS, TusService, parse_metadata
from gridnode.web.upload import GridSite
from tests.test_pipeline import FakeMedia

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {b64(v)}" for k, v in values.items())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checksum(data: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(data).digest()).decode()


class Sha256Uploader(Uploader):
    """tuspy sends sha1 checksums by default; this node speaks sha256."""

    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)


@dataclass
class Node:
    """One node: its own spool and job service, the pool's shared store, a real HTTP port."""

    tus: TusService
    jobs: JobService
    media: FakeMedia
    port: Any

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/files/"

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.jobs.spool.folder))


class Pool:
    def __init__(self, reactor: Any, tmp_path: Path) -> None:
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)
        self.nodes: list[Node] = []

    def node(self, name: str = "n1", clock: Any = None, expiry: float = 3600.0, max_upload_mb: int = 4) -> Node:
        config = build_config(cli={"work-dir": str(self.tmp_path / name), "workers": 2, "queue": 8,
                                   "min-free": 0, "max-upload": max_upload_mb}).with_identity(name)
        media = FakeMedia(self.tmp_path)
        jobs = JobService(self.reactor, config, self.store, media)
        tus = TusService(clock or self.reactor, jobs, self.store, max_upload_bytes=config.max_upload_bytes,
                         expiry_seconds=expiry)
        root = Resource()
        root.putChild(b"files", tus.resource())
        site = GridSite(root, self.reactor, tus.route_body, tus.extra_headers)
        port = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        node = Node(tus, jobs, media, port)
        self.nodes.append(node)
        return node

    def keys(self, prefix: str = "") -> list[str]:
        return [item.key for item in self.backend.list(prefix).items]

    def stored_input(self, job_id: str) -> bytes:
        return self.backend.get_bytes(f"inputs/{job_id}/source")[0]


@pytest.fixture
def pool(real_reactor: Any, tmp_path: Path) -> Iterator[Pool]:
    pool = Pool(real_reactor, tmp_path)
    yield pool
    for node in pool.nodes:
        node.tus.stop()
        node.port.stopListening()


async def http(method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Any:
    """One request with `requests`, in a thread, so the test reactor serves meanwhile."""
    return await deferToThread(requests.request, method, url, headers=headers or {}, data=body or None,
                               timeout=10, allow_redirects=False)


async def create(node: Node, length: int, **meta: str) -> str:
    headers = {**TUS, "Upload-Length": str(length)}
    if meta:
        headers["Upload-Metadata"] = metadata(**meta)
    r = await http("POST", node.base, headers)
    assert r.status_code == 201, r.text
    location: str = r.headers["Location"]
    assert location.startswith("/files/")
    return location.rsplit("/", 1)[1]


async def patch(node: Node, upload_id: str, offset: int, data: bytes, **headers: str) -> Any:
    return await http("PATCH", node.base + upload_id, {**STREAM, "Upload-Offset": str(offset), **headers}, data)


async def head(node: Node, upload_id: str) -> Any:
    return await http("HEAD", node.base + upload_id, TUS)


async def cut_off_patch(node: Node, upload_id: str, offset: int, data: bytes, sent: int) -> None:
    """A PATCH announcing ``len(data)`` bytes whose connection closes after ``sent`` of them."""

    def send() -> None:
        head_lines = (f"PATCH /files/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                      f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n")
        with socket.create_connection(("127.0.0.1", node.port.getHost().port), timeout=5) as s:
            s.sendall(head_lines.encode() + data[:sent])

    await deferToThread(send)


async def wait_for_offset(reactor: Any, node: Node, upload_id: str, offset: int) -> Any:
    """The server notices a dropped connection a moment after the client closed it."""
    for _ in range(200):
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


def video(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"clip-{seed}.mov"
    path.write_bytes(data)
    return path, data


class ProtocolTests:
    """Core, creation, checksum, termination: one request at a time."""

    @pytest_twisted.ensureDeferred
    async def test_options_advertises_the_server(self, pool: Pool) -> None:
        """OPTIONS lists version, extensions (no creation-defer-length), max size and sha256."""
        node = pool.node()
        r = await http("OPTIONS", node.base)
        assert r.status_code == 204
        assert r.headers["Tus-Version"] == "1.0.0" and r.headers["Tus-Resumable"] == "1.0.0"
        extensions = r.headers["Tus-Extension"].split(",")
        assert set(extensions) == {"creation", "creation-with-upload", "termination", "checksum", "expiration"}
        assert r.headers["Tus-Max-Size"] == str(4 * 1024 * 1024)
        assert r.headers["Tus-Checksum-Algorithm"] == "sha256"

    @pytest_twisted.ensureDeferred
    async def test_wrong_version_is_412(self, pool: Pool) -> None:
        """A request without Tus-Resumable: 1.0.0 is refused with 412 and Tus-Version, before any body."""
        node = pool.node()
        r = await http("POST", node.base, {"Tus-Resumable": "0.2.2", "Upload-Length": "10"})
        assert r.status_code == 412 and r.headers["Tus-Version"] == "1.0.0"
        assert r.json()["error"]["code"] == "unsupported_version"
        upload_id = await create(node, 10)
        r = await http("PATCH", node.base + upload_id,
                       {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}, b"x" * 10)
        assert r.status_code == 412 and r.headers["Tus-Resumable"] == "1.0.0"
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "0"

    @pytest_twisted.ensureDeferred
    async def test_creation_then_head(self, pool: Pool) -> None:
        """POST makes an upload (Location, Upload-Expires); HEAD answers offset 0, length, metadata, no-store;
        the state is an info object in the store."""
        node = pool.node()
        r = await http("POST", node.base, {**TUS, "Upload-Length": "1000",
                                            "Upload-Metadata": metadata(filename="holiday.mov")})
        assert r.status_code == 201 and r.headers["Tus-Resumable"] == "1.0.0"
        upload_id = r.headers["Location"].rsplit("/", 1)[1]
        assert keys.is_id(upload_id)
        assert parsedate_to_datetime(r.headers["Upload-Expires"]).timestamp() > 0
        r = await head(node, upload_id)
        assert r.status_code == 200
        assert (r.headers["Upload-Offset"], r.headers["Upload-Length"]) == ("0", "1000")
        assert r.headers["Upload-Metadata"] == metadata(filename="holiday.mov")
        assert r.headers["Cache-Control"] == "no-store"
        assert "Gridnode-Job" not in r.headers
        assert pool.keys("uploads/") == [f"uploads/{upload_id}/info"]

    @pytest_twisted.ensureDeferred
    async def test_chunks_complete_into_a_job(self, pool: Pool, tmp_path: Path) -> None:
        """PATCHes append; the last one's answer carries Gridnode-Job, so does a later HEAD; the job's input is
        the file, its name and presets come from the metadata, and no upload object or spool part remains."""
        node = pool.node()
        _, data = video(tmp_path, 300_000)
        upload_id = await create(node, len(data), filename="holiday.mov", presets="mp4-720p,poster")
        offset = 0
        for size in (100_000, 150_000, 50_000):
            r = await patch(node, upload_id, offset, data[offset:offset + size])
            offset += size
            assert r.status_code == 204 and r.headers["Upload-Offset"] == str(offset)
        assert r.headers["Gridnode-Job"] == upload_id
        job = node.jobs.active[upload_id].job
        assert job.state == job_states.QUEUED and job.name == "holiday.mov"
        assert job.presets == ["mp4-720p", "poster"] and job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []
        assert node.spool_files() == [upload_id, f"{upload_id}.json"]  # the job's own input and journal
        r = await head(node, upload_id)
        assert r.status_code == 200 and r.headers["Gridnode-Job"] == upload_id
        assert r.headers["Upload-Offset"] == r.headers["Upload-Length"] == str(len(data))

    @pytest_twisted.ensureDeferred
    async def test_parts_are_durable_in_the_store(self, pool: Pool) -> None:
        """Each PATCH that does not finish the upload is a numbered part in the store, listed by the info."""
        node = pool.node()
        upload_id = await create(node, 30)
        await patch(node, upload_id, 0, b"a" * 10)
        await patch(node, upload_id, 10, b"b" * 10)
        stored = pool.keys(f"uploads/{upload_id}/")
        assert stored[0] == f"uploads/{upload_id}/info"
        parts = stored[1:]
        assert [p.split("/")[-1][:10] for p in parts] == ["part-00001", "part-00002"]
        assert [pool.backend.get_bytes(p)[0] for p in parts] == [b"a" * 10, b"b" * 10]

    @pytest_twisted.ensureDeferred
    async def test_creation_with_upload(self, pool: Pool, tmp_path: Path) -> None:
        """A POST with the whole file as body creates, uploads and completes in one request."""
        node = pool.node()
        _, data = video(tmp_path, 70_000)
        r = await http("POST", node.base, {**STREAM, "Upload-Length": str(len(data)),
                                            "Upload-Checksum": checksum(data)}, data)
        assert r.status_code == 201 and r.headers["Upload-Offset"] == str(len(data))
        job_id = r.headers["Gridnode-Job"]
        assert r.headers["Location"] == f"/files/{job_id}"
        assert sha(pool.stored_input(job_id)) == sha(data) and pool.keys("uploads/") == []

    @pytest_twisted.ensureDeferred
    async def test_creation_with_partial_upload(self, pool: Pool) -> None:
        """A POST with the first bytes as body answers their offset; PATCH goes on from there."""
        node = pool.node()
        r = await http("POST", node.base, {**STREAM, "Upload-Length": "20"}, b"c" * 8)
        assert r.status_code == 201 and r.headers["Upload-Offset"] == "8" and "Gridnode-Job" not in r.headers
        upload_id = r.headers["Location"].rsplit("/", 1)[1]
        r = await patch(node, upload_id, 8, b"d" * 12)
        assert r.headers["Gridnode-Job"] == upload_id
        assert pool.stored_input(upload_id) == b"c" * 8 + b"d" * 12

    @pytest_twisted.ensureDeferred
    async def test_wrong_offset_is_409(self, pool: Pool) -> None:
        """A PATCH at another offset than the upload's is 409 and stores nothing."""
        node = pool.node()
        upload_id = await create(node, 20)
        await patch(node, upload_id, 0, b"x" * 5)
        for offset in (0, 7):  # behind (known locally: before the body) and ahead (checked at commit)
            r = await patch(node, upload_id, offset, b"y" * 5)
            assert r.status_code == 409 and r.json()["error"]["code"] == "offset_mismatch"
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "5"
        assert len(pool.keys(f"uploads/{upload_id}/")) == 2  # info and one part

    @pytest_twisted.ensureDeferred
    async def test_wrong_content_type_is_415(self, pool: Pool) -> None:
        """A PATCH that is not application/offset+octet-stream is 415."""
        node = pool.node()
        upload_id = await create(node, 20)
        r = await http("PATCH", node.base + upload_id,
                       {**TUS, "Content-Type": "application/octet-stream", "Upload-Offset": "0"}, b"x" * 5)
        assert r.status_code == 415 and r.headers["Tus-Resumable"] == "1.0.0"

    @pytest_twisted.ensureDeferred
    async def test_checksum_mismatch_is_460(self, pool: Pool) -> None:
        """A chunk whose sha256 differs from Upload-Checksum is 460, discarded, the offset unchanged; the same
        chunk with the right checksum is then accepted."""
        node = pool.node()
        upload_id = await create(node, 20)
        r = await patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": checksum(b"not this")})
        assert r.status_code == 460 and r.json()["error"]["code"] == "checksum_mismatch"
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "0"
        assert pool.keys(f"uploads/{upload_id}/") == [f"uploads/{upload_id}/info"]
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []
        r = await patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": checksum(b"z" * 10)})
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "10"

    @pytest_twisted.ensureDeferred
    async def test_unsupported_checksum_algorithm_is_400(self, pool: Pool) -> None:
        """Only sha256 is spoken: another algorithm is 400 before the body."""
        node = pool.node()
        upload_id = await create(node, 20)
        r = await patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": "md5 " + b64("0123456789abcdef")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_checksum"

    @pytest_twisted.ensureDeferred
    async def test_bad_metadata_is_400(self, pool: Pool) -> None:
        """Upload-Metadata with a value that is not base64 is a coded 400; nothing is created."""
        node = pool.node()
        r = await http("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": "filename ***"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_metadata"
        r = await http("POST", node.base, {**TUS, "Upload-Length": "10",
                                            "Upload-Metadata": f"filename {b64('a')},filename {b64('b')}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_metadata"
        assert pool.keys() == []

    @pytest_twisted.ensureDeferred
    async def test_unknown_preset_is_refused_at_creation(self, pool: Pool) -> None:
        """An unknown preset in the metadata is refused before any byte is uploaded."""
        node = pool.node()
        r = await http("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": metadata(presets="gif")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_preset"

    @pytest_twisted.ensureDeferred
    async def test_creation_refusals(self, pool: Pool) -> None:
        """Upload-Defer-Length (not supported) and a missing length are 400; past --max-upload is 413; a draining
        node answers 503 with Retry-After, like a plain upload."""
        node = pool.node()
        r = await http("POST", node.base, {**TUS, "Upload-Defer-Length": "1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "defer_length_unsupported"
        r = await http("POST", node.base, TUS)
        assert r.status_code == 400
        r = await http("POST", node.base, {**TUS, "Upload-Length": str(5 * 1024 * 1024)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        node.jobs.draining = True
        r = await http("POST", node.base, {**STREAM, "Upload-Length": "10"}, b"x" * 10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert pool.keys() == [] and node.spool_files() == []

    @pytest_twisted.ensureDeferred
    async def test_chunk_past_the_length_is_413(self, pool: Pool) -> None:
        """A PATCH longer than what is left of the upload is refused before its body."""
        node = pool.node()
        upload_id = await create(node, 10)
        r = await patch(node, upload_id, 0, b"x" * 11)
        assert r.status_code == 413
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "0"

    @pytest_twisted.ensureDeferred
    async def test_unknown_and_malformed_ids_are_404(self, pool: Pool) -> None:
        """HEAD of an unknown id, or of a path that is no id, is 404 without Upload-Offset."""
        node = pool.node()
        for path in (keys.new_id(), "not-an-id", "..%2F..%2Fjobs"):
            r = await http("HEAD", node.base + path, TUS)
            assert r.status_code == 404 and "Upload-Offset" not in r.headers
        r = await http("PATCH", node.base + "not-an-id", {**STREAM, "Upload-Offset": "0"}, b"x")
        assert r.status_code == 404

    @pytest_twisted.ensureDeferred
    async def test_termination(self, pool: Pool) -> None:
        """DELETE ends an upload: 204, then 404; its store objects and local files are gone."""
        node = pool.node()
        upload_id = await create(node, 30)
        await patch(node, upload_id, 0, b"x" * 10)
        assert any(f.startswith(upload_id) for f in node.spool_files())
        r = await http("DELETE", node.base + upload_id, TUS)
        assert r.status_code == 204
        assert (await head(node, upload_id)).status_code == 404
        assert (await http("DELETE", node.base + upload_id, TUS)).status_code == 404
        assert pool.keys() == [] and node.spool_files() == []

    @pytest_twisted.ensureDeferred
    async def test_not_a_video_on_completion(self, pool: Pool) -> None:
        """A completed upload the probe refuses: the final PATCH answers the coded error, and nothing is left
        in the store or the spool."""
        node = pool.node()
        node.media.probe_error = GridnodeError("not a video", code="not_a_video", status=422)
        upload_id = await create(node, 20, filename="notes.txt")
        await patch(node, upload_id, 0, b"x" * 10)
        r = await patch(node, upload_id, 10, b"y" * 10)
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_a_video"
        assert "Gridnode-Job" not in r.headers
        assert pool.keys() == [] and node.spool_files() == []
        assert (await head(node, upload_id)).status_code == 404

    @pytest_twisted.ensureDeferred
    async def test_method_override(self, pool: Pool) -> None:
        """A client that can only POST says PATCH in X-HTTP-Method-Override."""
        node = pool.node()
        upload_id = await create(node, 10)
        r = await http("POST", node.base + upload_id, {**STREAM, "Upload-Offset": "0",
                                                       "X-HTTP-Method-Override": "PATCH"}, b"x" * 4)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "4"

    @pytest_twisted.ensureDeferred
    async def test_draining_node_refuses_patch(self, pool: Pool) -> None:
        """A draining node sends a resuming client elsewhere (503, Retry-After); the upload is untouched."""
        node = pool.node()
        upload_id = await create(node, 20)
        node.jobs.draining = True
        r = await patch(node, upload_id, 0, b"x" * 10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        node.jobs.draining = False
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "0"

    @pytest_twisted.ensureDeferred
    async def test_creation_is_authorized(self, pool: Pool) -> None:
        """The node's token check sees the presets and length at creation, and its refusal is the answer."""
        node = pool.node()
        seen: list[tuple[list[str], int | None]] = []

        def authorize(request: Any, presets: list[str], length: int | None) -> None:
            seen.append((presets, length))
            if request.getHeader(b"authorization") != b"Bearer ok":
                raise GridnodeError("an upload token is needed", code="unauthorized", status=401)

        node.tus.authorize = authorize
        meta = metadata(presets="poster")
        r = await http("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": meta})
        assert r.status_code == 401 and pool.keys() == []
        r = await http("POST", node.base, {**STREAM, "Upload-Length": "10", "Upload-Metadata": meta,
                                            "Authorization": "Bearer ok"}, b"x" * 4)
        assert r.status_code == 201
        assert seen == [(["poster"], 10), (["poster"], 10)]

    def test_expose_headers(self) -> None:
        """The headers a browser must be able to read include the offset, location and job."""
        assert {"Upload-Offset", "Location", "Upload-Expires", "Gridnode-Job", "Tus-Resumable"} <= set(EXPOSE_HEADERS)


class ExpiryTests:
    @pytest_twisted.ensureDeferred
    async def test_sweep_deletes_expired_uploads(self, pool: Pool) -> None:
        """Upload-Expires is creation (or last PATCH) + expiry; the periodic sweep, on an injected clock,
        deletes an expired partial upload from the store and the spool."""
        clock = Clock()
        clock.advance(1_000_000)
        node = pool.node(clock=clock, expiry=100)
        node.tus.start()
        upload_id = await create(node, 30)
        clock.advance(50)
        r = await patch(node, upload_id, 0, b"x" * 10)
        expires = parsedate_to_datetime(r.headers["Upload-Expires"]).timestamp()
        assert expires == 1_000_000 + 50 + 100
        fresh = await create(node, 30)
        clock.advance(60)  # the first is still alive: its PATCH renewed it
        assert f"uploads/{upload_id}/info" in pool.keys()
        clock.advance(100)
        assert pool.keys() == []
        assert not any(f.startswith((upload_id, fresh)) for f in node.spool_files())
        assert (await head(node, upload_id)).status_code == 404

    @pytest_twisted.ensureDeferred
    async def test_expired_before_the_sweep_is_410(self, pool: Pool) -> None:
        """An upload past its expiry is gone (410) even before a sweep, and is deleted then."""
        clock = Clock()
        node = pool.node(clock=clock, expiry=100)
        upload_id = await create(node, 30)
        clock.advance(101)
        r = await patch(node, upload_id, 0, b"x" * 10)
        assert r.status_code == 410 and r.json()["error"]["code"] == "upload_expired"
        assert pool.keys() == []

    @pytest_twisted.ensureDeferred
    async def test_sweep_removes_orphans_on_second_sight(self, pool: Pool) -> None:
        """A part no info lists (a writer died between part and info), or an unreadable info, is removed by
        the second sweep that sees it, never the first (it may be a commit in progress)."""
        clock = Clock()
        node = pool.node(clock=clock)
        upload_id = await create(node, 30)
        stray = f"uploads/{upload_id}/part-00001-{keys.new_id()}"
        dead = f"uploads/{keys.new_id()}/part-00001-{keys.new_id()}"
        corrupt = f"uploads/{keys.new_id()}/info"
        pool.backend.put_bytes(stray, b"x")
        pool.backend.put_bytes(dead, b"x")
        pool.backend.put_bytes(corrupt, b"{not json")
        await node.tus.sweep()
        assert {stray, dead, corrupt} <= set(pool.keys())
        await node.tus.sweep()
        assert pool.keys() == [f"uploads/{upload_id}/info"]


class TuspyTests:
    @pytest_twisted.ensureDeferred
    async def test_tuspy_uploads_in_chunks(self, pool: Pool, tmp_path: Path) -> None:
        """The official client creates, sends 64 kB chunks with sha256 checksums, and ends with a job whose
        input is the file."""
        node = pool.node()
        path, data = video(tmp_path, 333_333)
        url = await deferToThread(upload_with_tuspy, node.base, path, 64 * 1024, filename="clip.mov")
        upload_id = url.rsplit("/", 1)[1]
        r = await head(node, upload_id)
        assert r.headers["Gridnode-Job"] == upload_id
        assert node.jobs.active[upload_id].job.name == "clip.mov"
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []

    @pytest_twisted.ensureDeferred
    async def test_interrupted_upload_resumes(self, pool: Pool, real_reactor: Any, tmp_path: Path) -> None:
        """A PATCH whose connection drops at a random offset keeps what arrived; tuspy resumes from the offset
        HEAD answers, and the job's input has the file's sha256."""
        node = pool.node()
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
    async def test_resume_on_another_node(self, pool: Pool, real_reactor: Any, tmp_path: Path) -> None:
        """An upload begun on one node (cut off mid-PATCH) resumes on another sharing the store: that node
        reads the info, fetches the parts and completes the job."""
        first, second = pool.node("n1"), pool.node("n2")
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

    @pytest_twisted.ensureDeferred
    async def test_upload_bounces_between_nodes(self, pool: Pool, tmp_path: Path) -> None:
        """A -> B -> A: the first node's local copy lags the store; it fetches the part it missed and
        completes with the right bytes."""
        a, b = pool.node("n1"), pool.node("n2")
        _, data = video(tmp_path, 90_000, seed=5)
        upload_id = await create(a, len(data))
        assert (await patch(a, upload_id, 0, data[:30_000])).status_code == 204
        assert (await patch(b, upload_id, 30_000, data[30_000:60_000])).status_code == 204
        r = await patch(a, upload_id, 60_000, data[60_000:])
        assert r.status_code == 204 and r.headers["Gridnode-Job"] == upload_id
        assert a.jobs.active[upload_id].job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert b.spool_files() == [f"{upload_id}.partial"]  # B's copy of its part, until it learns
        await b.tus.sweep()  # B forgets its copy of an upload that ended elsewhere
        assert b.spool_files() == []


class CommitRaceTests:
    @pytest_twisted.ensureDeferred
    async def test_two_chunks_at_one_offset(self, pool: Pool) -> None:
        """Two requests with the same offset (a retry racing a half-open one): the first commit wins, the
        second is 409 and its bytes are dropped."""
        node = pool.node()
        upload_id = await create(node, 20)
        sinks = []
        for fill in (b"a", b"b"):
            request = DummyRequest([b"files", upload_id.encode()])
            for name, value in {**STREAM, "Upload-Offset": "0"}.items():
                request.requestHeaders.setRawHeaders(name, [value])
            sink = node.tus.route_body(b"PATCH", f"/files/{upload_id}".encode(), request, 5)
            assert sink is not None
            sink.write(fill * 5)
            sink.end()
            sinks.append(sink)
        outcome = await node.tus.commit(sinks[0])
        assert outcome.info.offset == 5
        with pytest.raises(GridnodeError) as e:
            await node.tus.commit(sinks[1])
        assert e.value.status == 409
        assert (await head(node, upload_id)).headers["Upload-Offset"] == "5"
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []


class MetadataTests:
    @given(st.dictionaries(st.text("abcdefghijklmnopqrstuvwxyz_-.", min_size=1, max_size=12),
                           st.binary(max_size=40), max_size=6))
    def test_round_trip(self, values: dict[str, bytes]) -> None:
        """Whatever a client encodes per the spec (key, space, base64; comma-separated) decodes back."""
        header = ",".join(f"{k} {base64.b64encode(v).decode()}" if v else k for k, v in values.items())
        assert parse_metadata(header) == values

    @pytest.mark.parametrize("header", ["a b c", "a  YQ==", "k !!!", "k YQ", "a YQ==,a YQ=="])
    def test_malformed(self, header: str) -> None:
        """Three fields, an empty key, bad or unpadded base64, a repeated key: each is bad_metadata."""
        with pytest.raises(GridnodeError) as e:
            parse_metadata(header)
        assert e.value.code == "bad_metadata" and e.value.status == 400
