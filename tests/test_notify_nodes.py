"""
Webhooks on real parts: two twistd nodes on an S3-compatible server, a receiver on loopback
(allowed by --webhook-allow 127.0.0.0/8) that standardwebhooks verifies every POST of. It answers
500 twice, then 200: three deliveries of job.done with one webhook-id. The owner killed with
kill -9 after a job is done but before its job.done is delivered: the peer delivers it. A notify
URL to the metadata address is refused at submission.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standardwebhooks import Webhook

from tests.helpers import free_port, wait_for
from tests.media_samples import FFMPEG
from tests.nodes import NodeProcess, heard_from, request, upload
from tests.test_chaos import kill_machine

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class Receiver:
    """A webhook receiver in a thread of its own: every POST verified and kept; each path answers
    from its script (the last status repeats)."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    job = Webhook(SECRET).verify(body, headers)
                except Exception as e:  # noqa: BLE001 - recorded: the test fails on it
                    job = {"unverified": repr(e)}
                with receiver.lock:
                    script = receiver.scripts.setdefault(self.path, [200])
                    status = script.pop(0) if len(script) > 1 else script[0]
                    receiver.got.append({"path": self.path, "id": headers.get("webhook-id"), "job": job,
                                         "status": status})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def seen(self, path: str, state: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [g for g in self.got if g["path"] == path and (state is None or g["job"].get("state") == state)]


@pytest.fixture
def receiver() -> Any:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("notify") / "clip.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25",
                    "-t", "3", "-c:v", "libx264", "-preset", "ultrafast", "-y", str(path)], check=True, timeout=120)
    return path


def hook_node(tmp_path: Path, endpoint: str, bucket: str, name: str) -> NodeProcess:
    secret = tmp_path / "webhook.keys"
    secret.write_text(f"k1 {SECRET}\n")
    return NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--pool", "hooks", "--node-id", name,
        "--heartbeat", "1", "--job-lease", "3", "--workers", "1", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        "--webhook-secret", str(secret), "--webhook-allow", "127.0.0.0/8"])


class WebhookNodesTests:
    @pytest_twisted.inlineCallbacks
    def test_signed_retried_and_delivered_by_a_peer(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                    s3_client: Any, receiver: Receiver, clip: Path) -> None:
        nodes = [hook_node(tmp_path, s3_endpoint, s3_bucket, f"h{i}") for i in range(2)]
        for n in nodes:
            n.start()
        try:
            for n in nodes:
                yield n.wait_ready()
            owner, peer = nodes
            yield wait_for(lambda: set(heard_from(owner)) == {"h1"} and set(heard_from(peer)) == {"h0"}, 30)

            # the metadata address, without an allow rule for it: refused before anything is stored
            status, _, body = request("POST", f"{owner.url}/jobs?presets=mp4-480p&notify="
                                      "http://169.254.169.254/latest/meta-data/", clip.read_bytes(),
                                      {"content-type": "application/octet-stream"})
            assert status == 400 and json.loads(body)["error"]["code"] == "notify_refused", body

            # 500, 500, then 200: three POSTs of job.done, one webhook-id, each verified
            receiver.scripts["/a"] = [200, 500, 500, 200]  # job.queued first
            status, _, job = upload(owner.url, clip, "mp4-480p", Notify=f"{receiver.url}/a")
            assert status == 201, job
            assert job["notify"] == [f"{receiver.url}/a"]
            yield wait_for(lambda: any(g["status"] == 200 for g in receiver.seen("/a", "done")), 90)
            done = receiver.seen("/a", "done")
            assert [g["status"] for g in done] == [500, 500, 200]
            assert {g["id"] for g in done} == {f"msg_{job['id']}_done_0"}
            assert [g["job"]["state"] for g in receiver.seen("/a")] == ["queued", "done", "done", "done"]
            assert all(g["job"]["id"] == job["id"] and "notify" not in g["job"] for g in receiver.seen("/a"))

            # the owner dies with job.done owed: the peer delivers it, with the same id
            receiver.scripts["/b"] = [200, 503]
            status, _, job = upload(owner.url, clip, "mp4-480p", Notify=f"{receiver.url}/b")
            assert status == 201, job
            yield wait_for(lambda: receiver.seen("/b", "done"), 90)
            kill_machine(owner)
            with receiver.lock:
                receiver.scripts["/b"] = [200]
            yield wait_for(lambda: any(g["status"] == 200 for g in receiver.seen("/b", "done")), 90)
            done = receiver.seen("/b", "done")
            assert {g["id"] for g in done} == {f"msg_{job['id']}_done_0"}
            assert "unverified" not in json.dumps(receiver.got)
            assert f"webhook msg_{job['id']}_done_0 (job.done) taken over from h0" in peer.text()

            def owed() -> list[str]:
                listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="grid/webhooks/")
                return [o["Key"] for o in listed.get("Contents", [])]

            yield wait_for(lambda: owed() == [], 30)

            metrics = request("GET", f"{peer.url}/metrics")[2].decode()
            assert 'gridnode_webhook_deliveries_total{event="job.done",result="delivered"} 1.0' in metrics
        finally:
            for n in nodes:
                n.stop()
