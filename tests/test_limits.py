"""
Limits on the bytes actually received, on a real GridSite driven in memory
(StringTransport, memory store, fake media, task.Clock): chunked bodies over
``--max-upload`` or a token's ``max_size``; a tus PATCH for an upload that is
not there, answered before its body is read (the store's answer awaited with
the transport paused); tus chunks under the node's admission; the free space
watched while a body streams in. The same on real twistd nodes:
tests/test_limits_nodes.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gridnode import jobs as job_states
from gridnode import keys, tokens
from gridnode.config import build_config
from gridnode.errors import GridnodeError
from gridnode.keyring import KeyringFile, parse_keyring
from gridnode.pipeline import JobService
from gridnode.spool import CHECK_EVERY, FreeSpace
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.uploads.store import UploadStore
from gridnode.web.api import api_root
from gridnode.web.upload import DRAIN_REFUSED, GridSite
from gridnode.web.view import NodeView
from tests.fakes import FakeMedia
from tests.test_tus import READ, STREAM, TUS, Pool, Response, create, head, parse_answer, patch, request_bytes

MiB = 1024 * 1024


class Gate:
    """How the store's calls are made: at once while open (as ``ObjectStore.synchronous``), held
    while shut, then made in order by ``open``: a slow store, answering when the test says."""

    def __init__(self) -> None:
        self.shut = False
        self.held: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self.shut:
            self.held.append((d, fn, args, kwargs))
        else:
            self._make(d, fn, args, kwargs)
        return d

    @staticmethod
    def _make(d: Deferred[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed to the caller's errback
            d.errback(e)
        else:
            d.callback(result)

    def open(self) -> None:
        self.shut = False
        held, self.held = self.held, []
        for call in held:
            self._make(*call)


class Connection:
    """One client connection to a site, driven by hand. ``send`` feeds bytes as a socket would:
    only while the server reads (its transport neither paused nor closed)."""

    def __init__(self, site: GridSite) -> None:
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    @property
    def reading(self) -> bool:
        return self.transport.producerState == "producing" and not self.transport.disconnecting

    def send(self, data: bytes) -> int:
        """How much of ``data`` the server read."""
        sent = 0
        while sent < len(data) and self.reading:
            piece = data[sent:sent + READ]
            self.channel.dataReceived(piece)
            sent += len(piece)
        return sent

    def answer(self, method: str = "PATCH") -> Response:
        return parse_answer(self.transport.value(), method)

    def close(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def chunked(path: str, headers: dict[str, str], body: bytes, piece: int = 64 * 1024) -> bytes:
    """A request with a chunked body (no Content-Length: nothing says how long it is)."""
    lines = [f"POST {path} HTTP/1.1", "Host: gridnode", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    out = [("\r\n".join(lines) + "\r\n\r\n").encode()]
    for at in range(0, len(body), piece):
        part = body[at:at + piece]
        out.append(b"%x\r\n" % len(part) + part + b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def spooled_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


class Disk:
    """A work folder of ``size`` bytes: free is what the spool's files leave of it. Counts looks."""

    def __init__(self, folder: str, size: int) -> None:
        self.folder = folder
        self.size = size
        self.looks = 0

    def free_bytes(self) -> int:
        self.looks += 1
        return self.size - spooled_bytes(self.folder)


class Site:
    """A node's whole HTTP side (NodeView, api_root, GridSite) on fakes, as node.py assembles it."""

    def __init__(self, tmp_path: Path, secret: bytes | None = None, max_upload_mb: int = 1,
                 backend: MemoryBackend | None = None) -> None:
        cli: dict[str, Any] = {"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 2, "min-free": 0,
                               "max-upload": max_upload_mb}
        if secret is not None:
            (tmp_path / "upload.secret").write_bytes(secret)
            cli["upload-secret"] = str(tmp_path / "upload.secret")
        config = build_config(cli=cli).with_identity("n1")
        self.clock = Clock()
        self.media = FakeMedia(tmp_path)
        self.backend = backend or MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)
        self.jobs = JobService(self.clock, config, self.store, self.media, now=self.clock.seconds)
        uploads = UploadStore(self.clock, self.jobs, self.store, max_upload_bytes=config.max_upload_bytes)
        ring = KeyringFile(cli["upload-secret"], "upload-secret") if secret is not None else None
        self.view = NodeView(config, self.store, self.jobs, uploads, ring)
        self.site = GridSite(api_root(self.view), self.clock, self.view.route_body, self.view.extra_headers)

    def post(self, data: bytes) -> tuple[Response, Connection]:
        conn = Connection(self.site)
        conn.send(data)
        return conn.answer("POST"), conn

    def spool(self) -> list[str]:
        return sorted(os.listdir(self.jobs.spool.folder))


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def pool(gate: Gate, tmp_path: Path) -> Iterator[Pool]:
    pool = Pool(Clock(), tmp_path)
    pool.store = ObjectStore(pool.backend, gate)  # every node's store calls go through the gate
    yield pool
    pool.close()


def patch_head(upload_id: str, offset: int, length: int, **headers: str) -> bytes:
    return request_bytes("PATCH", f"/files/{upload_id}", {**STREAM, "Upload-Offset": str(offset), **headers}, length)


class ChunkedBodyTests:
    """``--max-upload`` and a token's ``max_size`` count the bytes received, not the ones declared."""

    def test_chunked_body_over_max_upload_is_413_mid_stream(self, tmp_path: Path) -> None:
        """A chunked POST /jobs past --max-upload (1 MiB) is answered 413 too_large as its bytes cross it: its
        spool file is gone, its slot is free, the connection closes once the body is over; the next upload
        under the limit is accepted."""
        node = Site(tmp_path)
        r, conn = node.post(chunked("/jobs?name=big.mov", {}, os.urandom(3 * MiB)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert r.headers["Connection"] == "close"
        assert node.spool() == [] and not node.jobs.uploading
        assert conn.transport.disconnecting
        r, _ = node.post(chunked("/jobs?name=small.mov", {}, os.urandom(MiB // 2)))
        assert r.status_code == 201, r.text

    def test_token_max_size_holds_on_a_chunked_body(self, tmp_path: Path) -> None:
        """A token's max_size is the body's limit: a chunked body past it is 413 mid-stream (nothing kept), one
        under it is accepted; a declared Content-Length past it is refused before the body as before."""
        secret = b"0123456789abcdef0123456789abcdef"
        node = Site(tmp_path, secret=secret, max_upload_mb=4)
        token = tokens.mint(parse_keyring(secret, "test"), sub="t", scopes={"upload"}, ttl=3600, max_size=100_000)
        auth = {"Authorization": "Bearer " + token}
        r, _ = node.post(chunked("/jobs", auth, os.urandom(200_000)))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
        assert node.spool() == [] and not node.jobs.uploading
        r, _ = node.post(request_bytes("POST", "/jobs", auth, 200_000))
        assert r.status_code == 413
        r, _ = node.post(chunked("/jobs", auth, os.urandom(90_000)))
        assert r.status_code == 201, r.text

    def test_chunked_patch_past_the_upload_is_413(self, pool: Pool) -> None:
        """A chunked tus PATCH that runs past the upload's length is 413 as it crosses it; the chunk is
        dropped (not kept as a cut-off chunk), the upload's offset is unchanged and no slot is held."""
        node = pool.node()
        upload_id = create(node, 100_000)
        data = chunked(f"/files/{upload_id}", {**STREAM, "Upload-Offset": "0",
                                               "X-HTTP-Method-Override": "PATCH"}, os.urandom(300_000))
        conn = Connection(node.site)
        conn.send(data)
        r = conn.answer()
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert node.spool_files() == [] and not node.jobs.uploading
        assert head(node, upload_id).headers["Upload-Offset"] == "0"


class UnknownUploadTests:
    """A PATCH is answered before its body is read when its upload is not there to take it."""

    def test_patch_to_an_unknown_upload_reads_no_body(self, pool: Pool, gate: Gate) -> None:
        """The node asks the store whether the upload exists with the transport paused: of a 300 MB body only
        what came with the headers is read (and held in memory, never written). The store says no: 404, and
        what the client still sends is dropped, never written."""
        node = pool.node()
        gate.shut = True
        conn = Connection(node.site)
        read = conn.send(patch_head(keys.new_id(), 0, 300 * MiB) + os.urandom(8 * READ))
        assert read == READ and not conn.reading  # one read, then the transport waits
        assert node.spool_files() == [] and conn.transport.value() == b""
        gate.open()
        r = conn.answer()
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert r.headers["Connection"] == "close" and r.headers["Tus-Resumable"] == "1.0.0"
        sent = conn.send(bytes(DRAIN_REFUSED + 4 * READ))
        assert sent <= DRAIN_REFUSED + READ and conn.transport.disconnecting  # read and dropped, up to a bound
        assert node.spool_files() == [] and not node.jobs.uploading

    def test_an_upload_from_another_node_is_looked_up_first(self, pool: Pool, gate: Gate) -> None:
        """A node that has not seen an upload reads it from the store before the body; "100 Continue" comes
        only once it is found, then the chunk is received and committed."""
        a, b = pool.node("n1"), pool.node("n2")
        upload_id = create(a, 20)
        gate.shut = True
        conn = Connection(b.site)
        conn.send(patch_head(upload_id, 0, 20, Expect="100-continue"))
        assert not conn.reading and conn.transport.value() == b""
        gate.open()
        assert conn.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n" and conn.reading
        conn.send(b"y" * 20)
        r = conn.answer()
        assert r.status_code == 204 and r.headers["Gridnode-Job"] == upload_id

    def test_a_body_that_ends_before_the_store_answers(self, pool: Pool, gate: Gate) -> None:
        """A short chunk, all in with its headers, waits with the request for the store's answer: taken for an
        upload that exists, refused (404, nothing kept) for one that does not."""
        a, b = pool.node("n1"), pool.node("n2")
        upload_id = create(a, 20)
        gate.shut = True
        found, missing = Connection(b.site), Connection(b.site)
        found.send(patch_head(upload_id, 0, 10) + b"x" * 10)
        missing.send(patch_head(keys.new_id(), 0, 10) + b"x" * 10)
        assert found.transport.value() == missing.transport.value() == b""
        gate.open()
        r = found.answer()
        assert r.status_code == 204 and r.headers["Upload-Offset"] == "10"
        assert missing.answer().status_code == 404 and missing.transport.disconnecting
        assert not b.jobs.uploading and not [f for f in b.spool_files() if f.endswith(".chunk")]

    def test_a_client_that_leaves_while_the_store_is_asked(self, pool: Pool, gate: Gate) -> None:
        """A connection lost while the node waits for the store leaves no file and holds no slot, whatever the
        store answers afterwards."""
        a, b = pool.node("n1"), pool.node("n2")
        upload_id = create(a, 20)
        gate.shut = True
        for target in (upload_id, keys.new_id()):
            conn = Connection(b.site)
            conn.send(patch_head(target, 0, 20) + b"x" * 5)
            conn.close()
        gate.open()
        assert b.spool_files() == [] and not b.jobs.uploading
        assert head(b, upload_id).headers["Upload-Offset"] == "0"

    def test_an_expired_upload_is_410_before_its_body(self, pool: Pool, gate: Gate) -> None:
        """An upload past its expiry (in this node's view) is checked in the store before its body: 410."""
        node = pool.node(expiry=60)
        upload_id = create(node, 20)
        pool.reactor.advance(61)
        gate.shut = True
        conn = Connection(node.site)
        conn.send(patch_head(upload_id, 0, 20) + b"x" * 20)
        assert conn.transport.value() == b""
        gate.open()
        r = conn.answer()
        assert r.status_code == 410 and r.json()["error"]["code"] == "upload_expired"
        assert node.spool_files() == []

    def test_a_finished_upload_is_404_at_once(self, pool: Pool, gate: Gate) -> None:
        """An upload this node completed is known to be over without asking the store."""
        node = pool.node()
        upload_id = create(node, 10)
        assert patch(node, upload_id, 0, b"v" * 10).headers["Gridnode-Job"] == upload_id
        gate.shut = True
        conn = Connection(node.site)
        conn.send(patch_head(upload_id, 10, 5) + b"w" * 5)
        r = conn.answer()
        assert r.status_code == 404 and not gate.held
        gate.open()


class TusAdmissionTests:
    """tus chunks pass the admission of POST /jobs: a slot each while in flight, --min-free."""

    def test_a_full_node_refuses_chunks_with_503(self, pool: Pool) -> None:
        """One worker, no queue: a chunk in flight holds the node's slot, so another upload's chunk (and a
        creation) gets 503 busy with Retry-After before its body; once the first chunk is committed the
        slot is free again."""
        node = pool.node(workers=1, queue=0)
        first, second = create(node, 40), create(node, 20)
        conn = Connection(node.site)
        conn.send(patch_head(first, 0, 20) + b"a" * 5)
        assert len(node.jobs.uploading) == 1
        r = patch(node, second, 0, b"b" * 20)
        assert r.status_code == 503 and r.json()["error"]["code"] == "busy" and int(r.headers["Retry-After"]) > 0
        r = node.request("POST", node.base, {**TUS, "Upload-Length": "10"})
        assert r.status_code == 503
        assert len(node.spool_files()) == 1 and node.spool_files()[0].startswith(first)
        conn.send(b"a" * 15)
        assert conn.answer().status_code == 204 and not node.jobs.uploading
        assert patch(node, second, 0, b"b" * 10).status_code == 204

    def test_low_disk_refuses_creation_and_chunks_with_507(self, pool: Pool) -> None:
        """A creation or chunk that would leave less than --min-free is 507 insufficient_storage before its
        body; the upload is untouched and takes chunks again once there is room."""
        node = pool.node()
        upload_id = create(node, 2 * MiB)
        node.jobs.space = FreeSpace(lambda: 3 * MiB, min_free=2 * MiB)
        r = node.request("POST", node.base, {**TUS, "Upload-Length": str(2 * MiB)})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
        r = patch(node, upload_id, 0, b"c" * (MiB + 1))
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
        assert node.spool_files() == [] and not node.jobs.uploading
        r = patch(node, upload_id, 0, b"c" * MiB)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(MiB)


class FreeSpaceWhileStreamingTests:
    """A body of no declared size is refused once the folder crosses --min-free: 507, nothing kept."""

    def test_a_chunked_upload_that_would_cross_min_free(self, tmp_path: Path) -> None:
        """With 24 MiB left over a --min-free of 16, a chunked POST of 64 MiB is 507 after some 8-12 MiB:
        its file is removed and its slot freed; a job accepted before it is untouched and ends done. The
        free space was looked at once per 4 MiB of body, not per read."""
        node = Site(tmp_path, max_upload_mb=128)
        status, job_id = self.accept_a_job(node)
        assert status == 201
        disk = Disk(node.jobs.spool.folder, 24 * MiB + spooled_bytes(node.jobs.spool.folder))
        node.jobs.space = FreeSpace(disk.free_bytes, min_free=16 * MiB)
        r, conn = node.post(chunked("/jobs?name=flood.mov", {}, os.urandom(64 * MiB), piece=256 * 1024))
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert node.spool() == [job_id, f"{job_id}.json"] and node.jobs.uploading == set()
        assert disk.looks <= 1 + 12 * MiB // CHECK_EVERY + 1
        started, _, _ = node.media.hooks[job_id]
        started()
        node.media.finish(job_id)
        job = node.jobs.runner.recent[-1]
        assert (job.id, job.state) == (job_id, job_states.DONE)

    def test_a_chunked_tus_patch_that_would_cross_min_free(self, pool: Pool) -> None:
        """The same for a tus chunk: 507 mid-stream, the chunk dropped (not kept as cut off: the node is short
        of disk), the upload's offset unchanged, so the client resumes elsewhere from there."""
        node = pool.node(max_upload_mb=64)
        upload_id = create(node, 32 * MiB)
        disk = Disk(node.jobs.spool.folder, 10 * MiB)
        node.jobs.space = FreeSpace(disk.free_bytes, min_free=4 * MiB)
        conn = Connection(node.site)
        conn.send(chunked(f"/files/{upload_id}", {**STREAM, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"},
                          os.urandom(32 * MiB), piece=256 * 1024))
        r = conn.answer()
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert node.spool_files() == [] and not node.jobs.uploading
        assert head(node, upload_id).headers["Upload-Offset"] == "0"

    @staticmethod
    def accept_a_job(node: Site) -> tuple[int, str]:
        r, _ = node.post(request_bytes("POST", "/jobs?name=ok.mov", {}, 1000) + os.urandom(1000))
        return r.status_code, r.json().get("id", "")


class MeterTests:
    def test_looks_once_per_interval_and_not_at_reserved_bytes(self) -> None:
        """A body's meter looks at the free space once per ``every`` bytes, whatever the size of the reads, and
        not at all within what was reserved up front; past the line it refuses with 507."""
        looks: list[int] = []
        free = [100 * MiB]

        def free_bytes() -> int:
            looks.append(1)
            return free[0]

        space = FreeSpace(free_bytes, min_free=10 * MiB, every=4 * MiB)
        meter = space.meter()
        for _ in range(64):
            meter.add(256 * 1024)  # 16 MiB in 64 reads
        assert len(looks) == 4
        reserved = space.meter()
        reserved.reserved = 16 * MiB
        for _ in range(64):
            reserved.add(256 * 1024)
        assert len(looks) == 4
        free[0] = 9 * MiB
        with pytest.raises(GridnodeError) as e:
            for _ in range(16):
                meter.add(256 * 1024)
        assert (e.value.code, e.value.status) == ("insufficient_storage", 507)

