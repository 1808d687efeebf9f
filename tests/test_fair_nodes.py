"""
Priorities and fair share on a real ``twistd -n gridnode`` node with one worker, its store a bucket
on a real S3-compatible server (moto on loopback), tokens minted by PyJWT, real ffmpeg.

The worker is held by a long job while the queue fills, so the order the queue is served in does
not depend on how fast anything runs: then the long job is cancelled, and the start order is read
from the node's own account of it (its log's "job X started", one line per start, in order).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import free_port, poll
from tests.media_samples import Clips
from tests.nodes import NodeProcess
from tests.test_auth_nodes import K1, auth, call, mint

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

OPS, ALICE, BOB, CAROL = (auth(mint(sub, "upload read cancel")) for sub in ("ops", "alice", "bob", "carol"))
ADMIN = auth(mint("ops-team", "admin"))
STARTED = re.compile(r"job ([0-9A-Z]{26}) started")


@pytest.fixture
def node(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> Iterator[NodeProcess]:
    keyring = tmp_path / "tokens.keys"
    keyring.write_text(f"k1 {K1}\n")
    n = NodeProcess(tmp_path / "n0", [
        "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint", s3_endpoint, "--node-id", "n0", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        "--upload-secret", str(keyring), "--workers", "1", "--queue", "64", "--drain-timeout", "1"])
    n.start()
    try:
        n.block_until_ready(30)
        yield n
    finally:
        n.stop()


def submit(node: NodeProcess, clip: Path, headers: dict[str, str], priority: str, presets: str = "poster") -> str:
    status, _, body = call("POST", f"{node.url}/jobs?presets={presets}&priority={priority}&name={clip.name}",
                           {"Content-Type": "application/octet-stream", **headers}, clip.read_bytes())
    assert status == 201, body
    assert body["priority"] == priority
    return str(body["id"])


def starts(node: NodeProcess) -> list[str]:
    return STARTED.findall(node.text())


class FairShareTests:
    def test_priority_first_then_tenants_in_turn(self, node: NodeProcess, media_clips: Clips, long_clip: Path,
                                                 s3_client: Any, s3_bucket: str) -> None:
        """While a long job holds the one worker: alice queues 40 low jobs, bob 2 normal ones,
        carol 1 low, then alice 1 high. Freed, the worker serves alice's high job first, then bob's
        two (before alice's third, and her first), then the low ones with carol's in turn after
        alice's first, not behind her 40; every job's record keeps its priority."""
        blocker = submit(node, long_clip, OPS, "normal", presets="mp4-720p,webm-480p")

        def transcoding() -> bool:
            status, _, body = call("GET", f"{node.url}/jobs/{blocker}", OPS)
            return status == 200 and body["state"] == "transcoding"

        poll(transcoding, 60, "the long job to hold the worker")
        lows = [submit(node, media_clips.portrait, ALICE, "low") for _ in range(40)]
        normals = [submit(node, media_clips.portrait, BOB, "normal") for _ in range(2)]
        carol = submit(node, media_clips.portrait, CAROL, "low")
        high = submit(node, media_clips.portrait, ALICE, "high")
        status, _, health = call("GET", f"{node.url}/health")
        assert (health["queued_low"], health["queued_normal"], health["queued_high"]) == (41, 2, 1)
        assert starts(node) == [blocker]  # it held the worker all along: nothing else started yet
        status, _, body = call("DELETE", f"{node.url}/jobs/{blocker}", OPS)
        assert status == 200 and body["state"] == "cancelled", body

        poll(lambda: len(starts(node)) >= 7, 120, "the first six queued jobs to start")
        order = starts(node)[1:7]
        assert order == [high, *normals, lows[0], carol, lows[1]], order
        status, _, record = call("GET", f"{node.url}/jobs/{carol}", CAROL)
        assert status == 200 and record["priority"] == "low" and record["tenant"] == "carol"
        stored = s3_client.get_object(Bucket=s3_bucket, Key=f"grid/jobs/{high}.json")["Body"].read()
        assert b'"priority": "high"' in stored
        metrics = call("GET", f"{node.url}/metrics", ADMIN)[2]
        text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
        tenants = {(s.labels["tenant"], s.labels["state"]): s.value for f in text_string_to_metric_families(text)
                   if f.name == "gridnode_tenant_jobs" for s in f.samples}
        assert tenants[("alice", "queued")] >= 30 and tenants.get(("bob", "queued"), 0) == 0  # both started
        assert not any(t == "ops" for t, _ in tenants)  # its last job ended: its series went with it
