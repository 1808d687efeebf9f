"""Real nodes on a real S3-compatible server (moto_server on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.nodes import BIN, NodeProcess, free_port, get_json, sleep

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


@pytest_twisted.inlineCallbacks
def wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return True
        yield sleep(0.1)
    raise AssertionError("condition not reached in time")


def s3_node(tmp_path: Path, endpoint: str, bucket: str, name: str, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--pool", "east", "--node-id", name,
        "--heartbeat", "1", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
        "--peer", f"tcp:{free_port()}:interface=127.0.0.1", *extra])


class S3RegistryTests:
    @pytest_twisted.inlineCallbacks
    def test_three_nodes(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_client: Any) -> None:
        """3 records and 3 entries in nodes.json; SIGTERM removes one within a heartbeat; a restart
        brings it back; garbage in the registry prefix is ignored; `gridnode nodes` lists them."""
        nodes = [s3_node(tmp_path, s3_endpoint, s3_bucket, f"n{i}") for i in range(3)]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                yield node.wait_ready()
            all3 = (["n0", "n1", "n2"], ["n0", "n1", "n2"])
            yield wait_for(lambda: registry(s3_client, s3_bucket) == all3)

            s3_client.put_object(Bucket=s3_bucket, Key="grid/registry/dev/east/nodes/evil.json", Body=b"\x00{{")
            s3_client.put_object(Bucket=s3_bucket, Key="grid/registry/dev/east/nodes/n9.json",
                                 Body=json.dumps({"id": "n9"}).encode())
            yield sleep(2.5)
            assert registry(s3_client, s3_bucket)[1] == ["n0", "n1", "n2"]
            for node in nodes:
                assert get_json(node.url + "/health")[0] == 200
            assert "ignoring registry record" in nodes[0].text()

            out = subprocess.run(
                [os.path.join(BIN, "gridnode"), "nodes", "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint",
                 s3_endpoint, "--pool", "east", "--json"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert sorted(json.loads(line)["id"] for line in out.stdout.splitlines()) == ["n0", "n1", "n2"]

            assert nodes[1].stop() == 0
            yield wait_for(lambda: registry(s3_client, s3_bucket)[1] == ["n0", "n2"], timeout=2.5)
            assert registry(s3_client, s3_bucket)[0][:2] == ["evil", "n0"]

            nodes[1].start()
            yield nodes[1].wait_ready()
            yield wait_for(lambda: registry(s3_client, s3_bucket)[1] == ["n0", "n1", "n2"])
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
            yield sleep(1.5)
            status, health = get_json(node.url + "/health")
            assert status == 200
            assert health["registry"]["registered"] is False and health["registry"]["error"]
        finally:
            assert node.stop() == 0
