"""
``Idempotency-Key`` on real nodes: a POST /jobs whose connection is cut before its answer, retried
with the same key on another node of the pool (the file: store shared by both, and S3 on moto):
one job. And the client library: one key for every try of an upload.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gridnode.client.api import GridClient, default_http
from gridnode.client.nodes import NodeInfo
from tests.helpers import free_port
from tests.media_samples import Clips
from tests.nodes import NodeProcess, get_json, request, wait_job

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration


def cut_off_post(base: str, path: Path, key: str) -> None:
    """Send a whole POST /jobs and close the connection without reading a byte of the answer."""
    host, port = base.removeprefix("http://").split(":")
    body = path.read_bytes()
    head = (f"POST /jobs?presets=poster&name={path.name} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\nIdempotency-Key: {key}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)  # the request is whole; the answer is never read


def post(base: str, path: Path, key: str) -> tuple[int, dict[str, str], Any]:
    """POST /jobs with ``key``; while the node says the first try is being accepted, again (bounded)."""
    for _ in range(30):
        status, head, body = request("POST", f"{base}/jobs?presets=poster&name={path.name}", path.read_bytes(),
                                     {"content-type": "application/octet-stream", "idempotency-key": key})
        doc = json.loads(body)
        if status != 409:
            return status, head, doc
        assert doc["error"]["code"] == "idempotency_key_in_use", doc
        time.sleep(int(head["retry-after"]))
    raise AssertionError("the key stayed in use")


def jobs_of(base: str) -> set[str]:
    status, listing = get_json(f"{base}/jobs?view=node")
    assert status == 200
    return {j["id"] for j in listing["active"] + listing["recent"]}


def store_args(kind: str, tmp_path: Path, request_: pytest.FixtureRequest) -> list[str]:
    if kind == "file":
        return ["--store", f"file:{tmp_path / 'shared'}"]
    endpoint, bucket = request_.getfixturevalue("s3_endpoint"), request_.getfixturevalue("s3_bucket")
    return ["--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint]


@pytest.mark.parametrize("store", ["file", "s3"])
@pytest_twisted.inlineCallbacks
def test_cut_connection_retried_on_another_node_makes_one_job(tmp_path: Path, media_clips: Clips, store: str,
                                                              request: pytest.FixtureRequest) -> None:
    """A POST /jobs cut off before its answer, retried with the same key on the other node of the pool (and
    again on the first): 201 each time, the same job; it ends done; the pool holds one job and one input.
    Another key makes another job."""
    shared = store_args(store, tmp_path, request)
    nodes = [NodeProcess(tmp_path / f"n{i}", [*shared, "--node-id", f"n{i}", "--min-free", "0",
                                              "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                              "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        a = yield nodes[0].wait_ready()
        b = yield nodes[1].wait_ready()
        clip = media_clips.landscape
        yield deferToThread(cut_off_post, a, clip, "retry-me")
        for _ in range(600):  # bounded: the cut-off request is accepted all the same (its input stored)
            if jobs_of(a):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        (first,) = jobs_of(a)
        status, head, job = yield deferToThread(post, b, clip, "retry-me")
        assert status == 201, job
        assert job["id"] == first and head["location"] == f"/jobs/{first}"
        assert head["idempotent-replayed"] == "true"
        status, _, again = yield deferToThread(post, a, clip, "retry-me")
        assert (status, again["id"]) == (201, first)
        done = yield wait_job(a, first)
        assert done["state"] == "done", done
        assert jobs_of(a) == {first} and jobs_of(b) == set()  # one job in the pool: b made none
        status, _, other = yield deferToThread(post, b, clip, "another-key")
        assert status == 201 and other["id"] != first
        inputs = yield deferToThread(stored_inputs, store, tmp_path, request)
        assert inputs == sorted([first, other["id"]]) or inputs == [first]  # other's may not be stored yet
        assert first in inputs
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.parametrize("store", ["file", "s3"])
@pytest_twisted.inlineCallbacks
def test_two_nodes_racing_with_one_key_make_one_job(tmp_path: Path, media_clips: Clips, store: str,
                                                    request: pytest.FixtureRequest) -> None:
    """The same keyed POST /jobs sent to both nodes at once, five keys in a row: each key's two answers are
    201 with one job (the loser's answer is the winner's job), and the pool holds five jobs."""
    shared = store_args(store, tmp_path, request)
    nodes = [NodeProcess(tmp_path / f"n{i}", [*shared, "--node-id", f"n{i}", "--min-free", "0",
                                              "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                              "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        bases = []
        for n in nodes:
            bases.append((yield n.wait_ready()))
        clip = media_clips.portrait
        made = set()
        for i in range(5):
            answers = yield DeferredList([deferToThread(post, base, clip, f"race-{i}") for base in bases],
                                         consumeErrors=True)
            results = [r for ok, r in answers if ok]
            assert len(results) == 2, answers
            assert [status for status, _, _ in results] == [201, 201], results
            ids = {job["id"] for _, _, job in results}
            assert len(ids) == 1, results
            made |= ids
        assert len(made) == 5
        assert jobs_of(bases[0]) | jobs_of(bases[1]) == made
        assert not jobs_of(bases[0]) & jobs_of(bases[1])
    finally:
        for n in nodes:
            n.stop()


def tus_create(base: str, size: int, key: str) -> tuple[int, dict[str, str]]:
    status, head, _ = request("POST", f"{base}/files/", None, {"Tus-Resumable": "1.0.0", "Upload-Length": str(size),
                                                              "Upload-Metadata": "presets cG9zdGVy",
                                                              "Idempotency-Key": key})
    return status, head


def tus_patch(base: str, location: str, offset: int, data: bytes) -> tuple[int, dict[str, str]]:
    status, head, _ = request("PATCH", base + location, data, {
        "Tus-Resumable": "1.0.0", "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
    return status, head


@pytest.mark.parametrize("store", ["file", "s3"])
@pytest_twisted.inlineCallbacks
def test_tus_creation_retried_on_another_node(tmp_path: Path, media_clips: Clips, store: str,
                                              request: pytest.FixtureRequest) -> None:
    """A tus creation retried with its key on the other node: the same upload, at its offset; finished there,
    a retry names its job; one job."""
    shared = store_args(store, tmp_path, request)
    nodes = [NodeProcess(tmp_path / f"n{i}", [*shared, "--node-id", f"n{i}", "--min-free", "0",
                                              "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                              "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        a = yield nodes[0].wait_ready()
        b = yield nodes[1].wait_ready()
        data = media_clips.landscape.read_bytes()
        half = len(data) // 2
        status, head = yield deferToThread(tus_create, a, len(data), "tus-key")
        assert status == 201
        location = head["location"]
        status, _ = yield deferToThread(tus_patch, a, location, 0, data[:half])
        assert status == 204
        status, again = yield deferToThread(tus_create, b, len(data), "tus-key")
        assert status == 201 and again["location"] == location and again["upload-offset"] == str(half), again
        status, done = yield deferToThread(tus_patch, b, location, half, data[half:])
        assert status == 204 and "gridnode-job" in done
        status, last = yield deferToThread(tus_create, a, len(data), "tus-key")
        assert status == 201 and last["gridnode-job"] == done["gridnode-job"], last
        job = yield wait_job(b, done["gridnode-job"])
        assert job["state"] == "done", job
        assert jobs_of(a) == set() and jobs_of(b) == {job["id"]}
    finally:
        for n in nodes:
            n.stop()


def stored_inputs(store: str, tmp_path: Path, request_: pytest.FixtureRequest) -> list[str]:
    if store == "file":
        return sorted(p.name for p in (tmp_path / "shared" / "inputs").iterdir())
    s3, bucket = request_.getfixturevalue("s3_client"), request_.getfixturevalue("s3_bucket")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="grid/inputs/").get("Contents", [])
    return sorted({item["Key"].split("/")[2] for item in listed})


class CuttingNode(Resource):
    """Takes POST /jobs, but cuts the connection of the first one the pool gets once its body is in, as a
    dying node does; ``seen`` (shared by the pool) lists the keys of every try, in order."""

    isLeaf = True

    def __init__(self, name: str, seen: list[str | None]) -> None:
        super().__init__()
        self.name = name
        self.seen = seen

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/health":
            return json.dumps({"node": self.name, "state": "ok", "running": 0, "queued": 0, "workers": 1}).encode()
        key = request.getHeader(b"idempotency-key")
        self.seen.append(key.decode() if key is not None else None)
        if len(self.seen) == 1:
            request.transport.abortConnection()
            return NOT_DONE_YET
        request.setResponseCode(201)
        return json.dumps({"id": "01" + "0" * 24, "state": "queued"}).encode()


@pytest_twisted.ensureDeferred
async def test_the_client_sends_one_key_for_every_try(tmp_path: Path) -> None:
    """An upload whose first node cuts the connection moves to the next with the same Idempotency-Key; the
    client's next upload has a key of its own."""
    seen: list[str | None] = []
    resources = [CuttingNode("n0", seen), CuttingNode("n1", seen)]
    ports = [reactor.listenTCP(0, Site(r), interface="127.0.0.1") for r in resources]
    nodes = [NodeInfo(r.name, f"http://127.0.0.1:{p.getHost().port}") for r, p in zip(resources, ports, strict=True)]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 1000)
    client = GridClient(reactor, default_http(reactor), nodes, check_timeout=0)
    try:
        first, _ = await client.upload(str(clip), presets=["poster"])
        second, _ = await client.upload(str(clip), presets=["poster"])
        assert len(seen) == 3 and all(seen), seen
        assert seen[0] == seen[1] != seen[2]  # the cut try's key went on to the next node; a new upload, a new key
    finally:
        for p in ports:
            await p.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_client_reads_a_replay_sent_while_its_body_streams(tmp_path: Path, long_clip: Path) -> None:
    """The retry of a ~24 MB upload through the client library: the node answers before reading the body,
    the client takes that answer (the same job), and its body producer ends without an error."""
    from twisted.logger import globalLogPublisher

    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    node = NodeProcess(tmp_path / "n", ["--min-free", "0", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
    node.start()
    try:
        base = await node.wait_ready()
        client = GridClient(reactor, default_http(reactor), [NodeInfo("n", base)], check_timeout=0)
        _, first = await client.upload(str(long_clip), presets=["poster"], idempotency_key="big")
        _, again = await client.upload(str(long_clip), presets=["poster"], idempotency_key="big")
        assert again["id"] == first["id"]
        assert jobs_of(base) == {first["id"]}
        await deferLater(reactor, 0.2, lambda: None)  # the body producer's next turns, should it fail
        assert failures == []
    finally:
        globalLogPublisher.removeObserver(observe)
        node.stop()


@pytest_twisted.inlineCallbacks
def test_the_command_run_again_with_its_key_makes_no_new_jobs(tmp_path: Path, media_clips: Clips) -> None:
    """`gridnode upload A B --idempotency-key K` run twice: the same two jobs (K-1, K-2); a bad key is the node's
    coded refusal, on one line."""
    from tests.nodes import BIN

    node = NodeProcess(tmp_path / "n", ["--store", f"file:{tmp_path / 'store'}", "--min-free", "0",
                                        "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
    node.start()
    try:
        base = yield node.wait_ready()

        def run(*args: str) -> Any:
            import subprocess

            return subprocess.run([f"{BIN}/gridnode", "upload", "--node", base, "--json", "--preset", "poster",
                                   *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)

        files = [str(media_clips.portrait), str(media_clips.webm)]
        runs = []
        for _ in range(2):
            out = yield deferToThread(run, *files, "--idempotency-key", "nightly-42")
            assert out.returncode == 0, out.stderr
            # files are uploaded in parallel: their events come in any order, each naming its file
            runs.append({json.loads(line)["file"]: json.loads(line)["job"]["id"] for line in out.stdout.splitlines()
                         if json.loads(line)["event"] == "uploaded"})
        assert runs[0] == runs[1] and len(set(runs[0].values())) == 2
        assert jobs_of(base) == set(runs[0].values())
        out = yield deferToThread(run, files[0], "--idempotency-key", "bad\tkey")
        # --json: the failure is one JSON object on stdout, nothing on stderr
        errors = [json.loads(line) for line in out.stdout.splitlines() if json.loads(line)["event"] == "error"]
        assert out.returncode != 0 and out.stderr == ""
        assert [e["error"]["code"] for e in errors] == ["bad_idempotency_key"]
    finally:
        node.stop()
