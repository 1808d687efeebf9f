"""Real nodes on a real S3-compatible server (moto_server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import free_port, sleep, wait_for
from tests.nodes import BIN, NodeProcess, get_json, heard_from

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration


def registry(s3: Any, bucket: str) -> tuple[list[str], list[str]]:
    prefix = "grid/registry/dev/east/nodes/"
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    records = sorted(o["Key"][len(prefix):-5] for o in listed if "/" not in o["Key"][len(prefix):])
    try:
        body = s3.get_object(Bucket=bucket, Key="grid/registry/dev/east/nodes.json")["Body"].read()
        names = [n["id"] for n in json.loads(body)["nodes"]]
    except s3.exceptions.NoSuchKey:
        names = []
    return records, names


def s3_node(tmp_path: Path, endpoint: str, bucket: str, name: str, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--pool", "east", "--node-id", name,
        "--heartbeat", "1", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
        "--peer", f"tcp:{free_port()}:interface=127.0.0.1", *extra])


class S3RegistryTests:
    @pytest_twisted.inlineCallbacks
    def test_three_nodes(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
        """3 records and 3 entries in nodes.json; SIGTERM removes one at once (its leave reaches the
        writer, which republishes without waiting for its heartbeat); a restart
        brings it back; garbage in the registry prefix is ignored; `gridnode nodes` lists them."""
        nodes = [s3_node(tmp_path, s3_endpoint, s3_bucket, f"n{i}") for i in range(3)]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                yield node.wait_ready()
            all3 = (["n0", "n1", "n2"], ["n0", "n1", "n2"])
            yield wait_for(lambda: registry(s3_client, s3_bucket) == all3, 60)

            s3_client.put_object(Bucket=s3_bucket, Key="grid/registry/dev/east/nodes/evil.json", Body=b"\x00{{")
            s3_client.put_object(Bucket=s3_bucket, Key="grid/registry/dev/east/nodes/n9.json",
                                 Body=json.dumps({"id": "n9"}).encode())
            # a heartbeat (1 s) has read both records: each is named as ignored (an accepted n9
            # would never be), and nodes.json still lists the three
            ignored = [f"ignoring registry record registry/dev/east/nodes/{name}.json" for name in ("evil", "n9")]
            yield wait_for(lambda: all(line in nodes[0].text() for line in ignored), 60)
            assert registry(s3_client, s3_bucket)[1] == ["n0", "n1", "n2"]
            for node in nodes:
                assert get_json(node.url + "/health")[0] == 200

            out = subprocess.run(
                [os.path.join(BIN, "gridnode"), "nodes", "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint",
                 s3_endpoint, "--pool", "east", "--json"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert sorted(json.loads(line)["id"] for line in out.stdout.splitlines()) == ["n0", "n1", "n2"]

            yield wait_for(lambda: all(len(heard_from(node)) == 2 for node in nodes), 60)  # n0 hears n1's leave
            assert nodes[1].stop() == 0
            yield wait_for(lambda: registry(s3_client, s3_bucket)[1] == ["n0", "n2"], 60)
            yield wait_for(lambda: "n1 left or was confirmed dead: publishing the live list now" in nodes[0].text(), 30)
            assert registry(s3_client, s3_bucket)[0][:2] == ["evil", "n0"]

            nodes[1].start()
            yield nodes[1].wait_ready()
            yield wait_for(lambda: registry(s3_client, s3_bucket)[1] == ["n0", "n1", "n2"], 60)
        finally:
            for node in nodes:
                node.stop()

    @pytest_twisted.inlineCallbacks
    def test_bucket_unreachable_at_start(self, tmp_path: Path, s3_endpoint: str) -> None:
        """A node whose bucket cannot be reached keeps serving and says so in /health."""
        node = s3_node(tmp_path, f"http://127.0.0.1:{free_port()}", "nobucket", "lonely")
        node.start()
        try:
            yield node.wait_ready()

            seen: list[Any] = []

            def failed_once() -> bool:  # its first attempt to register has been answered
                status, health = get_json(node.url + "/health")
                seen.append(health)
                return status == 200 and bool(health["registry"]["error"])

            yield wait_for(failed_once, 60)
            assert seen[-1]["registry"]["registered"] is False
        finally:
            assert node.stop() == 0


class S3JobTests:
    @pytest_twisted.inlineCallbacks
    def test_job_in_the_bucket(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_client: Any,
                               media_clips: Any) -> None:
        """A job on an S3-backed node leaves its input, outputs and record in the bucket, and
        /results answers 302 to a presigned URL that serves the bytes."""
        import urllib.error
        import urllib.request

        from tests.nodes import request, stored_record, upload, wait_job

        node = s3_node(tmp_path, s3_endpoint, s3_bucket, "s3job", "--min-free", "0")
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, media_clips.landscape, "mp4-480p,poster")
            assert status == 201, job
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
            keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="grid/").get("Contents", [])}
            jid = job["id"]
            assert {f"grid/inputs/{jid}/source", f"grid/jobs/{jid}.json", f"grid/outputs/{jid}/mp4-480p.mp4",
                    f"grid/outputs/{jid}/poster.jpg"} <= keys
            stored = stored_record(s3_client, s3_bucket, f"grid/jobs/{jid}.json")
            assert stored["state"] == "done"

            class NoRedirect(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, *args: Any) -> None:
                    return None

            opener = urllib.request.build_opener(NoRedirect)
            try:
                opener.open(base + job["outputs"][0]["url"], timeout=10)
                raise AssertionError("expected a redirect")
            except urllib.error.HTTPError as e:
                assert e.code == 302
                location = e.headers["location"]
            assert location.startswith(s3_endpoint) and "Signature=" in location
            status, _, data = request("GET", location)
            expected = s3_client.get_object(Bucket=s3_bucket, Key=f"grid/outputs/{jid}/mp4-480p.mp4")["Body"].read()
            assert status == 200 and data == expected
            status, _, data = request("GET", base + job["outputs"][0]["url"])  # followed
            assert status == 200 and data == expected
            status, missing = get_json(base + f"/results/{jid}/nothing.mp4")
            assert status == 404 and missing["error"]["code"] == "not_found"
        finally:
            assert node.stop() == 0


class S3OutageTests:
    @pytest_twisted.inlineCallbacks
    def test_upload_refused_during_an_outage(self, tmp_path: Path, media_clips: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """With the bucket unreachable, an upload is refused with 503 storage_unavailable and a
        Retry-After (nothing kept on the node's disk alone); once S3 is back, the same upload is
        accepted, its input already in the bucket at the answer, and converted."""
        from tests.nodes import upload, wait_job
        from tests.s3server import CREDENTIALS, MotoServer, client

        for name, value in CREDENTIALS.items():  # as the s3_endpoint fixture does for the other tests
            monkeypatch.setenv(name, value)
        server = MotoServer(tmp_path / "moto.log")
        endpoint = server.start()
        client(endpoint).create_bucket(Bucket="outage")
        node = s3_node(tmp_path, endpoint, "outage", "o1", "--min-free", "0")
        node.start()
        try:
            base = yield node.wait_ready()
            server.stop()
            status, headers, refused = upload(base, media_clips.landscape, "poster")
            assert status == 503 and refused["error"]["code"] == "storage_unavailable", refused
            assert int(headers["retry-after"]) > 0
            spool = tmp_path / "o1" / "gridnode-work" / "spool"
            assert list(spool.iterdir()) == []

            port = endpoint.rsplit(":", 1)[1]
            import subprocess as sp

            from tests.s3server import answers, moto_server_command
            with open(tmp_path / "moto2.log", "ab") as out:
                again = sp.Popen(moto_server_command() + ["-H", "127.0.0.1", "-p", port], stdout=out,
                                 stderr=sp.STDOUT, start_new_session=True)
            try:
                for _ in range(600):  # bounded: moto_server takes seconds to start (MotoServer allows 30)
                    if answers(endpoint + "/"):
                        break
                    yield sleep(0.1)
                client(endpoint).create_bucket(Bucket="outage")
                status, _, job = upload(base, media_clips.landscape, "poster")
                assert status == 201, job
                body = client(endpoint).get_object(Bucket="outage", Key=f"grid/inputs/{job['id']}/source")["Body"]
                assert body.read() == media_clips.landscape.read_bytes()
                final = yield wait_job(base, job["id"], timeout=90)
                assert final["state"] == "done", final
            finally:
                again.terminate()
                again.wait(10)
        finally:
            node.stop()
            server.stop()


class S3ThrottlingTests:
    @pytest_twisted.inlineCallbacks
    def test_a_throttled_store_ends_the_job_here(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                                 s3_client: Any, media_clips: Any) -> None:
        """S3 answers every other write of a job record with 503 SlowDown (a prefix scaling): the
        node's writes are retried with jittered backoff and counted, its job ends done on that node
        (attempts 1), and its peer, past what was once its lease, adopts nothing."""
        from tests.nodes import upload, wait_job
        from tests.s3server import SlowDownProxy

        writes = [0]

        def throttle(method: str, path: str) -> bool:
            if method != "PUT" or f"/{s3_bucket}/grid/jobs/" not in path:
                return False
            writes[0] += 1
            return writes[0] % 2 == 1

        proxy = SlowDownProxy(s3_endpoint, throttle)
        lease = ("--job-lease", "6", "--min-free", "0")
        nodes = [s3_node(tmp_path, proxy.endpoint, s3_bucket, name, *lease) for name in ("t1", "t2")]
        for node in nodes:
            node.start()
        try:
            base = yield nodes[0].wait_ready()
            yield nodes[1].wait_ready()
            status, _, job = upload(base, media_clips.landscape, "poster")
            assert status == 201, job
            final = yield wait_job(base, job["id"], timeout=90)
            assert final["state"] == "done", final
            yield sleep(4)  # past the old lease: once, a peer's scan would have adopted it
            record = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=f"grid/jobs/{job['id']}.json")["Body"]
                                .read())
            assert record["state"] == "done" and record["node"] == "t1" and record["attempts"] == 1
            assert proxy.slowed >= 2
            assert "adopted" not in nodes[1].text()
            import urllib.request

            with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
                metrics = r.read().decode()
            counted = [line for line in metrics.splitlines()
                       if line.startswith('gridnode_store_throttled_total{operation="PutObject"}')]
            assert counted and float(counted[0].split()[-1]) >= 1, metrics[-2000:]
            assert 'gridnode_store_token_wait_seconds_count{lane="keep"}' in metrics
        finally:
            for node in nodes:
                node.stop()
            proxy.close()
