"""
The tus endpoint on a real GridSite driven in memory: each request is written
as bytes into a connection on a StringTransport and its answer parsed back,
with an in-memory store, fake media (no ffmpeg) and a task.Clock. No sockets,
no threads: the official client (tuspy) over real HTTP is in
tests/test_tus_nodes.py.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from requests.structures import CaseInsensitiveDict
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from gridnode import jobs as job_states
from gridnode import keys
from gridnode.config import build_config
from gridnode.errors import GridnodeError, StorageUnavailable
from gridnode.metrics import Metrics
from gridnode.notify.service import Webhooks
from gridnode.notify.signing import Signer
from gridnode.notify.targets import AddressRule
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.uploads.store import UploadStore
from gridnode.uploads.sweep import UploadSweep
from gridnode.web.tus import EXPOSE_HEADERS, TusHandler, parse_count, parse_metadata
from gridnode.web.upload import GridSite
from tests.test_notify import PUBLIC, RING
from tests.test_pipeline import FakeMedia

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}
#: what a socket read hands the channel at a time
READ = 64 * 1024


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {b64(v)}" for k, v in values.items())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checksum(data: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(data).digest()).decode()


def video(tmp_path: Path, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"clip-{seed}.mov"
    path.write_bytes(data)
    return path, data


def result(d: Deferred[Any]) -> Any:
    """What a Deferred that already fired gave (everything here is synchronous); its error is raised."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@dataclass
class Response:
    """An HTTP answer as a client reads it (the parts of `requests.Response` the tests use)."""

    status_code: int
    headers: CaseInsensitiveDict[str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _Received:
    """What a connection's transport received, as the socket http.client reads an answer from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse_answer(data: bytes, method: str) -> Response:
    answer = http.client.HTTPResponse(_Received(data), method=method)  # type: ignore[arg-type]
    answer.begin()
    return Response(answer.status, CaseInsensitiveDict(answer.getheaders()), answer.read())


def request_bytes(method: str, path: str, headers: dict[str, str], length: int) -> bytes:
    """A request's head as `requests` writes it: a length on everything but GET and HEAD."""
    lines = [f"{method} {path} HTTP/1.1", "Host: gridnode"] + [f"{k}: {v}" for k, v in headers.items()]
    if method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Node:
    """One node: its own spool, job service and upload store, the pool's shared store, a site."""

    uploads: UploadStore
    tus: TusHandler
    sweep: UploadSweep
    jobs: JobService
    media: FakeMedia
    site: GridSite
    base: str = "/files/"

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.jobs.spool.folder))

    def _connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Response:
        """One request on a connection of its own, closed once the answer is in."""
        channel, transport = self._connect()
        data = request_bytes(method, path, headers or {}, len(body)) + body
        for at in range(0, len(data), READ):
            channel.dataReceived(data[at:at + READ])
        answer = parse_answer(transport.value(), method)
        channel.connectionLost(Failure(ConnectionDone()))
        return answer

    def cut_off_patch(self, upload_id: str, offset: int, data: bytes, sent: int) -> None:
        """A PATCH announcing ``len(data)`` bytes whose connection drops after ``sent`` of them."""
        channel, _ = self._connect()
        headers = {**STREAM, "Upload-Offset": str(offset)}
        channel.dataReceived(request_bytes("PATCH", self.base + upload_id, headers, len(data)) + data[:sent])
        channel.connectionLost(Failure(ConnectionLost()))


class Pool:
    """Nodes sharing one in-memory store. ``reactor`` is a Clock here; tests/test_tus_nodes.py
    passes the real one and serves the sites over loopback."""

    def __init__(self, reactor: Any, tmp_path: Path) -> None:
        self.reactor = reactor
        self.tmp_path = tmp_path
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)
        self.nodes: list[Node] = []

    def node(self, name: str = "n1", expiry: float = 3600.0, max_upload_mb: int = 4, workers: int = 2,
             queue: int = 8) -> Node:
        config = build_config(cli={"work-dir": str(self.tmp_path / name), "workers": workers, "queue": queue,
                                   "min-free": 0, "max-upload": max_upload_mb}).with_identity(name)
        media = FakeMedia(self.tmp_path)
        jobs = JobService(self.reactor, config, self.store, media)
        uploads = UploadStore(self.reactor, jobs, self.store, max_upload_bytes=config.max_upload_bytes,
                              expiry_seconds=expiry)
        tus = TusHandler(uploads)
        root = Resource()
        root.putChild(b"files", tus.resource())
        site = GridSite(root, self.reactor, tus.route_body, tus.extra_headers)
        node = Node(uploads, tus, UploadSweep(uploads), jobs, media, site)
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            if node.sweep.running:
                node.sweep.stopService()

    def keys(self, prefix: str = "") -> list[str]:
        return [item.key for item in self.backend.list(prefix).items]

    def stored_input(self, job_id: str) -> bytes:
        return self.backend.get_bytes(f"inputs/{job_id}/source")[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock, tmp_path: Path) -> Any:
    pool = Pool(clock, tmp_path)
    yield pool
    pool.close()


def create(node: Node, length: int, **meta: str) -> str:
    headers = {**TUS, "Upload-Length": str(length)}
    if meta:
        headers["Upload-Metadata"] = metadata(**meta)
    r = node.request("POST", node.base, headers)
    assert r.status_code == 201, r.text
    location: str = r.headers["Location"]
    assert location.startswith("/files/")
    return location.rsplit("/", 1)[1]


def patch(node: Node, upload_id: str, offset: int, data: bytes, **headers: str) -> Response:
    return node.request("PATCH", node.base + upload_id, {**STREAM, "Upload-Offset": str(offset), **headers}, data)


def head(node: Node, upload_id: str) -> Response:
    return node.request("HEAD", node.base + upload_id, TUS)


def send_in_chunks(node: Node, upload_id: str, data: bytes, offset: int, chunk_size: int) -> Response:
    """PATCH the rest of ``data`` from ``offset`` with sha256 checksums, as a tus client resumes."""
    while True:
        piece = data[offset:offset + chunk_size]
        r = patch(node, upload_id, offset, piece, **{"Upload-Checksum": checksum(piece)})
        assert r.status_code == 204, r.text
        offset += len(piece)
        assert r.headers["Upload-Offset"] == str(offset)
        if offset == len(data):
            return r


class ProtocolTests:
    """Core, creation, checksum, termination: one request at a time."""

    def test_options_advertises_the_server(self, pool: Pool) -> None:
        """OPTIONS lists version, extensions (no creation-defer-length), max size and sha256."""
        node = pool.node()
        r = node.request("OPTIONS", node.base)
        assert r.status_code == 204
        assert r.headers["Tus-Version"] == "1.0.0" and r.headers["Tus-Resumable"] == "1.0.0"
        extensions = r.headers["Tus-Extension"].split(",")
        assert set(extensions) == {"creation", "creation-with-upload", "termination", "checksum", "expiration"}
        assert r.headers["Tus-Max-Size"] == str(4 * 1024 * 1024)
        assert r.headers["Tus-Checksum-Algorithm"] == "sha256"

    def test_wrong_version_is_412(self, pool: Pool) -> None:
        """A request without Tus-Resumable: 1.0.0 is refused with 412 and Tus-Version, before any body."""
        node = pool.node()
        r = node.request("POST", node.base, {"Tus-Resumable": "0.2.2", "Upload-Length": "10"})
        assert r.status_code == 412 and r.headers["Tus-Version"] == "1.0.0"
        assert r.json()["error"]["code"] == "unsupported_version"
        upload_id = create(node, 10)
        r = node.request("PATCH", node.base + upload_id,
                         {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}, b"x" * 10)
        assert r.status_code == 412 and r.headers["Tus-Resumable"] == "1.0.0"
        assert head(node, upload_id).headers["Upload-Offset"] == "0"

    def test_creation_then_head(self, pool: Pool) -> None:
        """POST makes an upload (Location, Upload-Expires); HEAD answers offset 0, length, metadata, no-store;
        the state is an info object in the store."""
        node = pool.node()
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "1000",
                                              "Upload-Metadata": metadata(filename="holiday.mov")})
        assert r.status_code == 201 and r.headers["Tus-Resumable"] == "1.0.0"
        upload_id = r.headers["Location"].rsplit("/", 1)[1]
        assert keys.is_id(upload_id)
        assert parsedate_to_datetime(r.headers["Upload-Expires"]).timestamp() > 0
        r = head(node, upload_id)
        assert r.status_code == 200
        assert (r.headers["Upload-Offset"], r.headers["Upload-Length"]) == ("0", "1000")
        assert r.headers["Upload-Metadata"] == metadata(filename="holiday.mov")
        assert r.headers["Cache-Control"] == "no-store"
        assert "Gridnode-Job" not in r.headers
        assert pool.keys("uploads/") == [f"uploads/{upload_id}/info"]

    def test_chunks_complete_into_a_job(self, pool: Pool, tmp_path: Path) -> None:
        """PATCHes append; the last one's answer carries Gridnode-Job, so does a later HEAD; the job's input is
        the file, its name and presets come from the metadata, and no upload object or spool part remains."""
        node = pool.node()
        _, data = video(tmp_path, 300_000)
        upload_id = create(node, len(data), filename="holiday.mov", presets="mp4-720p,poster")
        offset = 0
        for size in (100_000, 150_000, 50_000):
            r = patch(node, upload_id, offset, data[offset:offset + size])
            offset += size
            assert r.status_code == 204 and r.headers["Upload-Offset"] == str(offset)
        assert r.headers["Gridnode-Job"] == upload_id
        job = node.jobs.active[upload_id].job
        assert job.state == job_states.QUEUED and job.name == "holiday.mov"
        assert job.presets == ["mp4-720p", "poster"] and job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []
        assert node.spool_files() == [upload_id, f"{upload_id}.json"]  # the job's own input and journal
        r = head(node, upload_id)
        assert r.status_code == 200 and r.headers["Gridnode-Job"] == upload_id
        assert r.headers["Upload-Offset"] == r.headers["Upload-Length"] == str(len(data))

    def test_parts_are_durable_in_the_store(self, pool: Pool) -> None:
        """Each PATCH that does not finish the upload is a numbered part in the store, listed by the info."""
        node = pool.node()
        upload_id = create(node, 30)
        patch(node, upload_id, 0, b"a" * 10)
        patch(node, upload_id, 10, b"b" * 10)
        stored = pool.keys(f"uploads/{upload_id}/")
        assert stored[0] == f"uploads/{upload_id}/info"
        parts = stored[1:]
        assert [p.split("/")[-1][:10] for p in parts] == ["part-00001", "part-00002"]
        assert [pool.backend.get_bytes(p)[0] for p in parts] == [b"a" * 10, b"b" * 10]

    def test_creation_with_upload(self, pool: Pool, tmp_path: Path) -> None:
        """A POST with the whole file as body creates, uploads and completes in one request."""
        node = pool.node()
        _, data = video(tmp_path, 70_000)
        r = node.request("POST", node.base, {**STREAM, "Upload-Length": str(len(data)),
                                              "Upload-Checksum": checksum(data)}, data)
        assert r.status_code == 201 and r.headers["Upload-Offset"] == str(len(data))
        job_id = r.headers["Gridnode-Job"]
        assert r.headers["Location"] == f"/files/{job_id}"
        assert sha(pool.stored_input(job_id)) == sha(data) and pool.keys("uploads/") == []

    def test_creation_with_partial_upload(self, pool: Pool) -> None:
        """A POST with the first bytes as body answers their offset; PATCH goes on from there."""
        node = pool.node()
        r = node.request("POST", node.base, {**STREAM, "Upload-Length": "20"}, b"c" * 8)
        assert r.status_code == 201 and r.headers["Upload-Offset"] == "8" and "Gridnode-Job" not in r.headers
        upload_id = r.headers["Location"].rsplit("/", 1)[1]
        r = patch(node, upload_id, 8, b"d" * 12)
        assert r.headers["Gridnode-Job"] == upload_id
        assert pool.stored_input(upload_id) == b"c" * 8 + b"d" * 12

    def test_wrong_offset_is_409(self, pool: Pool) -> None:
        """A PATCH at another offset than the upload's is 409 and stores nothing."""
        node = pool.node()
        upload_id = create(node, 20)
        patch(node, upload_id, 0, b"x" * 5)
        for offset in (0, 7):  # behind (known locally: before the body) and ahead (checked at commit)
            r = patch(node, upload_id, offset, b"y" * 5)
            assert r.status_code == 409 and r.json()["error"]["code"] == "offset_mismatch"
        assert head(node, upload_id).headers["Upload-Offset"] == "5"
        assert len(pool.keys(f"uploads/{upload_id}/")) == 2  # info and one part

    def test_wrong_content_type_is_415(self, pool: Pool) -> None:
        """A PATCH that is not application/offset+octet-stream is 415."""
        node = pool.node()
        upload_id = create(node, 20)
        r = node.request("PATCH", node.base + upload_id,
                         {**TUS, "Content-Type": "application/octet-stream", "Upload-Offset": "0"}, b"x" * 5)
        assert r.status_code == 415 and r.headers["Tus-Resumable"] == "1.0.0"

    def test_checksum_mismatch_is_460(self, pool: Pool) -> None:
        """A chunk whose sha256 differs from Upload-Checksum is 460, discarded, the offset unchanged; the same
        chunk with the right checksum is then accepted."""
        node = pool.node()
        upload_id = create(node, 20)
        r = patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": checksum(b"not this")})
        assert r.status_code == 460 and r.json()["error"]["code"] == "checksum_mismatch"
        assert head(node, upload_id).headers["Upload-Offset"] == "0"
        assert pool.keys(f"uploads/{upload_id}/") == [f"uploads/{upload_id}/info"]
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []
        r = patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": checksum(b"z" * 10)})
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "10"

    def test_unsupported_checksum_algorithm_is_400(self, pool: Pool) -> None:
        """Only sha256 is spoken: another algorithm is 400 before the body."""
        node = pool.node()
        upload_id = create(node, 20)
        r = patch(node, upload_id, 0, b"z" * 10, **{"Upload-Checksum": "md5 " + b64("0123456789abcdef")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_checksum"

    def test_bad_metadata_is_400(self, pool: Pool) -> None:
        """Upload-Metadata with a value that is not base64 is a coded 400; nothing is created."""
        node = pool.node()
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": "filename ***"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_metadata"
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "10",
                                              "Upload-Metadata": f"filename {b64('a')},filename {b64('b')}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_metadata"
        assert pool.keys() == []

    def test_notify_in_the_metadata_reaches_the_job_and_its_webhook(self, pool: Pool, tmp_path: Path) -> None:
        """Upload-Metadata ``notify``: kept with the upload, checked again when the last chunk makes
        the job, which names it; its job.queued entry is owed in the store."""
        node = pool.node()
        posted: list[str] = []
        node.jobs.webhooks = Webhooks(pool.reactor, pool.store, "n1", Signer(lambda: RING), AddressRule(),
                                      lambda host, port: succeed([PUBLIC]),
                                      lambda reactor, target, *_: posted.append(target.url) or succeed(500),
                                      metrics=Metrics())
        _, data = video(tmp_path, 100_000)
        upload_id = create(node, len(data), filename="a.mov", notify="https://hooks.example.com/in")
        r = patch(node, upload_id, 0, data)
        assert r.status_code == 204, r.text
        assert node.jobs.active[upload_id].job.notify == ["https://hooks.example.com/in"]
        pool.reactor.advance(0)
        assert posted == ["https://hooks.example.com/in"]
        assert pool.keys("webhooks/") == [f"webhooks/n1/msg_{upload_id}_queued_0.json"]

    def test_notify_urls_are_checked_at_creation(self, pool: Pool) -> None:
        """A notify URL that cannot be one (not http, a user in it) is 400 notify_refused; a node
        without a webhook secret refuses any (webhooks_off); nothing is created."""
        node = pool.node()
        for url, code in (("file:///etc/passwd", "notify_refused"), ("http://u:p@example.com/", "notify_refused"),
                          ("https://hooks.example.com/in", "webhooks_off")):
            r = node.request("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": metadata(notify=url)})
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert pool.keys() == []

    def test_unknown_preset_is_refused_at_creation(self, pool: Pool) -> None:
        """An unknown preset in the metadata is refused before any byte is uploaded."""
        node = pool.node()
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "10",
                                              "Upload-Metadata": metadata(presets="gif")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_preset"

    def test_creation_refusals(self, pool: Pool) -> None:
        """Upload-Defer-Length (not supported) and a missing length are 400; past --max-upload is 413; a draining
        node answers 503 with Retry-After, like a plain upload."""
        node = pool.node()
        r = node.request("POST", node.base, {**TUS, "Upload-Defer-Length": "1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "defer_length_unsupported"
        r = node.request("POST", node.base, TUS)
        assert r.status_code == 400
        r = node.request("POST", node.base, {**TUS, "Upload-Length": str(5 * 1024 * 1024)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        node.jobs.draining = True
        r = node.request("POST", node.base, {**STREAM, "Upload-Length": "10"}, b"x" * 10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        assert r.headers["Tus-Resumable"] == "1.0.0"
        assert pool.keys() == [] and node.spool_files() == []

    def test_chunk_past_the_length_is_413(self, pool: Pool) -> None:
        """A PATCH longer than what is left of the upload is refused before its body."""
        node = pool.node()
        upload_id = create(node, 10)
        r = patch(node, upload_id, 0, b"x" * 11)
        assert r.status_code == 413
        assert head(node, upload_id).headers["Upload-Offset"] == "0"

    def test_unknown_and_malformed_ids_are_404(self, pool: Pool) -> None:
        """HEAD of an unknown id, or of a path that is no id, is 404 without Upload-Offset."""
        node = pool.node()
        for path in (keys.new_id(), "not-an-id", "..%2F..%2Fjobs"):
            r = node.request("HEAD", node.base + path, TUS)
            assert r.status_code == 404 and "Upload-Offset" not in r.headers
        r = node.request("PATCH", node.base + "not-an-id", {**STREAM, "Upload-Offset": "0"}, b"x")
        assert r.status_code == 404

    def test_termination(self, pool: Pool) -> None:
        """DELETE ends an upload: 204, then 404; its store objects and local files are gone."""
        node = pool.node()
        upload_id = create(node, 30)
        patch(node, upload_id, 0, b"x" * 10)
        assert any(f.startswith(upload_id) for f in node.spool_files())
        r = node.request("DELETE", node.base + upload_id, TUS)
        assert r.status_code == 204
        assert head(node, upload_id).status_code == 404
        assert node.request("DELETE", node.base + upload_id, TUS).status_code == 404
        assert pool.keys() == [] and node.spool_files() == []

    def test_not_a_video_on_completion(self, pool: Pool) -> None:
        """A completed upload the probe refuses: the final PATCH answers the coded error, and nothing is left
        in the store or the spool."""
        node = pool.node()
        node.media.probe_error = GridnodeError("not a video", code="not_a_video", status=422)
        upload_id = create(node, 20, filename="notes.txt")
        patch(node, upload_id, 0, b"x" * 10)
        r = patch(node, upload_id, 10, b"y" * 10)
        assert r.status_code == 422 and r.json()["error"]["code"] == "not_a_video"
        assert "Gridnode-Job" not in r.headers
        assert pool.keys() == [] and node.spool_files() == []
        assert head(node, upload_id).status_code == 404

    def test_store_down_on_completion_keeps_the_upload(self, pool: Pool) -> None:
        """The store cannot take the completed upload's input: the last PATCH answers 503
        storage_unavailable with Retry-After, the upload stays at its offset before that chunk (its
        parts are in the store) and no job exists; sent again once the store is back, the chunk
        completes it, and the answer comes with the input and the job record stored."""
        node = pool.node()
        upload_id = create(node, 20, filename="m.mov")
        patch(node, upload_id, 0, b"x" * 10)
        real = pool.backend.put_file

        def down(key: str, *a: Any, **kw: Any) -> Any:
            if key.startswith("inputs/"):
                raise StorageUnavailable("bucket unreachable")
            return real(key, *a, **kw)

        pool.backend.put_file = down  # type: ignore[method-assign]
        r = patch(node, upload_id, 10, b"y" * 10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        assert int(r.headers["Retry-After"]) > 0 and "Gridnode-Job" not in r.headers
        assert head(node, upload_id).headers["Upload-Offset"] == "10"
        assert not node.jobs.active and pool.keys("jobs/") == [] and pool.keys("inputs/") == []
        pool.backend.put_file = real  # type: ignore[method-assign]
        r = patch(node, upload_id, 10, b"y" * 10)
        assert r.status_code == 204 and r.headers["Gridnode-Job"] == upload_id
        assert pool.stored_input(upload_id) == b"x" * 10 + b"y" * 10
        assert pool.keys("jobs/") == [f"jobs/{upload_id}.json"] and pool.keys("active/") == [f"active/n1/{upload_id}"]

    def test_method_override(self, pool: Pool) -> None:
        """A client that can only POST says PATCH in X-HTTP-Method-Override."""
        node = pool.node()
        upload_id = create(node, 10)
        r = node.request("POST", node.base + upload_id, {**STREAM, "Upload-Offset": "0",
                                                         "X-HTTP-Method-Override": "PATCH"}, b"x" * 4)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "4"

    def test_draining_node_refuses_patch(self, pool: Pool) -> None:
        """A draining node sends a resuming client elsewhere (503, Retry-After); the upload is untouched."""
        node = pool.node()
        upload_id = create(node, 20)
        node.jobs.draining = True
        r = patch(node, upload_id, 0, b"x" * 10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        node.jobs.draining = False
        assert head(node, upload_id).headers["Upload-Offset"] == "0"

    def test_creation_is_authorized(self, pool: Pool) -> None:
        """The node's authorization sees the presets and length at creation, and its refusal is the
        answer; the tenant it names owns the upload, and another tenant's HEAD, PATCH and DELETE
        answer 404 as for an upload that never was."""
        node = pool.node()
        seen: list[tuple[list[str], int | None]] = []

        class Access:
            def creator(self, request: Any, presets: list[str], length: int | None) -> str:
                seen.append((presets, length))
                if request.getHeader(b"authorization") is None:
                    raise GridnodeError("an upload token is needed", code="unauthorized", status=401)
                return self.owner_filter(request) or ""

            def owner_filter(self, request: Any) -> str | None:
                header = request.getHeader(b"authorization")
                return header.decode().split()[-1] if header else None

            def priority(self, request: Any, asked: str) -> str:
                return asked

        node.tus.access = Access()
        meta = metadata(presets="poster")
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "10", "Upload-Metadata": meta})
        assert r.status_code == 401 and pool.keys() == []
        r = node.request("POST", node.base, {**STREAM, "Upload-Length": "10", "Upload-Metadata": meta,
                                              "Authorization": "Bearer alice"}, b"x" * 4)
        assert r.status_code == 201
        assert seen == [(["poster"], 10), (["poster"], 10)]
        upload_id = r.headers["Location"].rsplit("/", 1)[1]
        bob = {"Authorization": "Bearer bob"}
        assert node.request("HEAD", node.base + upload_id, {**TUS, **bob}).status_code == 404
        r = node.request("PATCH", node.base + upload_id, {**STREAM, **bob, "Upload-Offset": "4"}, b"y" * 6)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert node.request("DELETE", node.base + upload_id, {**TUS, **bob}).status_code == 404
        alice = {"Authorization": "Bearer alice"}
        assert node.request("HEAD", node.base + upload_id, {**TUS, **alice}).headers["Upload-Offset"] == "4"

    def test_expose_headers(self) -> None:
        """The headers a browser must be able to read include the offset, location and job."""
        assert {"Upload-Offset", "Location", "Upload-Expires", "Gridnode-Job", "Tus-Resumable"} <= set(EXPOSE_HEADERS)


class ExpiryTests:
    def test_sweep_deletes_expired_uploads(self, pool: Pool, clock: Clock) -> None:
        """Upload-Expires is creation (or last PATCH) + expiry; the periodic sweep, on an injected clock,
        deletes an expired partial upload from the store and the spool."""
        clock.advance(1_000_000)
        node = pool.node(expiry=100)
        node.sweep.startService()
        upload_id = create(node, 30)
        clock.advance(50)
        r = patch(node, upload_id, 0, b"x" * 10)
        expires = parsedate_to_datetime(r.headers["Upload-Expires"]).timestamp()
        assert expires == 1_000_000 + 50 + 100
        fresh = create(node, 30)
        clock.advance(60)  # the first is still alive: its PATCH renewed it
        assert f"uploads/{upload_id}/info" in pool.keys()
        clock.advance(100)
        assert pool.keys() == []
        assert not any(f.startswith((upload_id, fresh)) for f in node.spool_files())
        assert head(node, upload_id).status_code == 404

    def test_sweep_service_stops_its_loop(self, pool: Pool, clock: Clock) -> None:
        """The sweep is a Twisted service: it sweeps every quarter of the expiry while running, and
        not at all once stopped."""
        node = pool.node(expiry=100)
        assert node.sweep.interval == 25
        node.sweep.startService()
        assert node.sweep.running and clock.getDelayedCalls()
        node.sweep.stopService()
        assert not node.sweep.running and not clock.getDelayedCalls()
        upload_id = create(node, 30)
        clock.advance(1000)
        assert pool.keys() == [f"uploads/{upload_id}/info"]

    def test_expired_before_the_sweep_is_410(self, pool: Pool, clock: Clock) -> None:
        """An upload past its expiry is gone (410) even before a sweep, and is deleted then."""
        node = pool.node(expiry=100)
        upload_id = create(node, 30)
        clock.advance(101)
        r = patch(node, upload_id, 0, b"x" * 10)
        assert r.status_code == 410 and r.json()["error"]["code"] == "upload_expired"
        assert pool.keys() == []

    def test_sweep_removes_orphans_on_second_sight(self, pool: Pool) -> None:
        """A part no info lists (a writer died between part and info), or an unreadable info, is removed by
        the second sweep that sees it, never the first (it may be a commit in progress)."""
        node = pool.node()
        upload_id = create(node, 30)
        stray = f"uploads/{upload_id}/part-00001-{keys.new_id()}"
        dead = f"uploads/{keys.new_id()}/part-00001-{keys.new_id()}"
        corrupt = f"uploads/{keys.new_id()}/info"
        pool.backend.put_bytes(stray, b"x")
        pool.backend.put_bytes(dead, b"x")
        pool.backend.put_bytes(corrupt, b"{not json")
        result(node.uploads.sweep())
        assert {stray, dead, corrupt} <= set(pool.keys())
        result(node.uploads.sweep())
        assert pool.keys() == [f"uploads/{upload_id}/info"]


class ResumeTests:
    """Uploads cut off and resumed, on one node or across nodes sharing the store. (The same with
    the official client, over real HTTP: tests/test_tus_nodes.py.)"""

    def test_interrupted_upload_resumes(self, pool: Pool, tmp_path: Path) -> None:
        """A PATCH whose connection drops at a random offset keeps what arrived; the client resumes from
        the offset HEAD answers, and the job's input has the file's sha256."""
        node = pool.node()
        _, data = video(tmp_path, 400_000, seed=7)
        upload_id = create(node, len(data), filename="clip.mov")
        cut = random.Random(7).randrange(1, len(data))
        node.cut_off_patch(upload_id, 0, data, cut)
        assert head(node, upload_id).headers["Upload-Offset"] == str(cut)
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []
        send_in_chunks(node, upload_id, data, cut, 100_000)
        assert node.jobs.active[upload_id].job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)

    def test_resume_on_another_node(self, pool: Pool, tmp_path: Path) -> None:
        """An upload begun on one node (cut off mid-PATCH) resumes on another sharing the store: that node
        reads the info, fetches the parts and completes the job."""
        first, second = pool.node("n1"), pool.node("n2")
        _, data = video(tmp_path, 500_000, seed=3)
        upload_id = create(first, len(data), filename="a.mov")
        send_in_chunks(first, upload_id, data[:128 * 1024], 0, 64 * 1024)
        cut = random.Random(3).randrange(128 * 1024 + 1, len(data))
        first.cut_off_patch(upload_id, 128 * 1024, data[128 * 1024:], cut - 128 * 1024)
        assert head(first, upload_id).headers["Upload-Offset"] == str(cut)
        assert head(second, upload_id).headers["Upload-Offset"] == str(cut)
        send_in_chunks(second, upload_id, data, cut, 64 * 1024)
        job = second.jobs.active[upload_id].job
        assert job.node == "n2" and job.name == "a.mov" and job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert pool.keys("uploads/") == []
        r = head(first, upload_id)  # the first node learns it from the job record
        assert r.status_code == 200 and r.headers["Gridnode-Job"] == upload_id

    def test_upload_bounces_between_nodes(self, pool: Pool, tmp_path: Path) -> None:
        """A -> B -> A: the first node's local copy lags the store; it fetches the part it missed and
        completes with the right bytes."""
        a, b = pool.node("n1"), pool.node("n2")
        _, data = video(tmp_path, 90_000, seed=5)
        upload_id = create(a, len(data))
        assert patch(a, upload_id, 0, data[:30_000]).status_code == 204
        assert patch(b, upload_id, 30_000, data[30_000:60_000]).status_code == 204
        r = patch(a, upload_id, 60_000, data[60_000:])
        assert r.status_code == 204 and r.headers["Gridnode-Job"] == upload_id
        assert a.jobs.active[upload_id].job.sha256 == sha(data)
        assert sha(pool.stored_input(upload_id)) == sha(data)
        assert b.spool_files() == [f"{upload_id}.partial"]  # B's copy of its part, until it learns
        result(b.uploads.sweep())  # B forgets its copy of an upload that ended elsewhere
        assert b.spool_files() == []


class CommitRaceTests:
    def test_two_chunks_at_one_offset(self, pool: Pool) -> None:
        """Two requests with the same offset (a retry racing a half-open one): the first commit wins, the
        second is 409 and its bytes are dropped."""
        node = pool.node()
        upload_id = create(node, 20)
        chunks = []
        for fill in (b"a", b"b"):
            request = DummyRequest([b"files", upload_id.encode()])
            for name, value in {**STREAM, "Upload-Offset": "0"}.items():
                request.requestHeaders.setRawHeaders(name, [value])
            chunk = node.tus.route_body(b"PATCH", f"/files/{upload_id}".encode(), request, 5)
            assert chunk is not None
            chunk.write(fill * 5)
            chunk.end()
            chunks.append(chunk)
        outcome = result(node.uploads.commit(chunks[0]))
        assert outcome.info.offset == 5
        with pytest.raises(GridnodeError) as e:
            result(node.uploads.commit(chunks[1]))
        assert e.value.status == 409
        assert head(node, upload_id).headers["Upload-Offset"] == "5"
        assert [f for f in node.spool_files() if f.endswith(".chunk")] == []


class CountTests:
    @pytest.mark.parametrize("value", [b"", b"-1", b"+5", b"1e3", b"0x10", b"1 0", b"\xb2", b"\xb9\xb3",
                                       "\u0663".encode(), b"9" * 20])
    def test_only_ascii_digits_count(self, value: bytes) -> None:
        """Upload-Length and Upload-Offset are ASCII digits only: a superscript or another script's digit,
        which str.isdigit() takes and int() then chokes on or reads, is a coded 400, never a 500."""
        for header in ("Upload-Length", "Upload-Offset"):
            with pytest.raises(GridnodeError) as e:
                parse_count(value, header)
            assert e.value.status == 400 and e.value.code == f"bad_{header.lower().replace('-', '_')}"

    def test_plain_counts(self) -> None:
        assert [parse_count(v, "Upload-Length") for v in (b"0", b" 42 ", b"9" * 19)] == [0, 42, int("9" * 19)]


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
