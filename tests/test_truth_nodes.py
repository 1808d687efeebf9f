"""
A node tells the truth about itself (real twistd nodes; moto for S3): /health is degraded while
its bucket is missing or its store is down; a drain with the store down still ends within
--drain-timeout; a second SIGTERM stops at once.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import free_port, sleep, wait_for
from tests.media_samples import Clips
from tests.nodes import NodeProcess, get_json, upload, wait_job
from tests.s3server import MotoServer, make_bucket

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

#: what a stopping node may take beyond --drain-timeout (the acceptance's bound)
STOP_SLACK = 5.0


def s3_node(folder: Path, endpoint: str, bucket: str, *extra: str) -> NodeProcess:
    return NodeProcess(folder, ["--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--node-id", "t1",
                                "--heartbeat", "1", "--min-free", "0",
                                "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                "--peer", f"tcp:{free_port()}:interface=127.0.0.1", *extra])


@pytest_twisted.inlineCallbacks
def exited_within(node: NodeProcess, seconds: float) -> Any:
    """Wait (bounded) for ``node`` to exit; its exit status, or None if it still runs."""
    assert node.process is not None
    for _ in range(int(seconds / 0.1)):
        if node.process.poll() is not None:
            return node.process.returncode
        yield sleep(0.1)
    return node.process.poll()


class HealthTests:
    @pytest_twisted.inlineCallbacks
    def test_missing_bucket_is_degraded(self, tmp_path: Path, s3_endpoint: str) -> None:
        """A node whose bucket does not exist says degraded, naming the bucket, not ok."""
        node = s3_node(tmp_path, s3_endpoint, "no-such-bucket-here")
        node.start()
        try:
            base = yield node.wait_ready()

            def degraded() -> bool:
                status, health = get_json(base + "/health")
                return status == 200 and health["state"] == "degraded"

            yield wait_for(degraded, timeout=60)
            health = get_json(base + "/health")[1]
            assert "no-such-bucket-here" in health["reasons"][0] and "does not exist" in health["reasons"][0]
        finally:
            node.stop()


class DrainTests:
    @pytest_twisted.inlineCallbacks
    def test_sigterm_with_the_store_down_ends_in_time(self, tmp_path: Path, s3_endpoint: str,
                                                      media_clips: Clips) -> None:
        """A job accepted, then the store goes away: /health turns degraded, and SIGTERM still ends
        the node (exit 0) within --drain-timeout + 5 s, its log saying what the drain waited for."""
        moto = MotoServer(tmp_path / "moto.log")
        endpoint = moto.start()
        bucket = make_bucket(endpoint)
        node = s3_node(tmp_path / "node", endpoint, bucket, "--drain-timeout", "3")
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, media_clips.landscape)
            assert status == 201, job
            moto.stop()

            def degraded() -> bool:
                return bool(get_json(base + "/health")[1]["state"] == "degraded")

            yield wait_for(degraded, timeout=60)
            node.signal(signal.SIGTERM)
            code = yield exited_within(node, 3 + STOP_SLACK)
            assert code == 0, node.text()[-3000:]
            log = node.text()
            assert f"draining: waiting up to 3.0s for 1 jobs: {job['id']}" in log, log[-3000:]
            assert "released to the pool" in log
        finally:
            node.stop()
            moto.stop()

    @pytest_twisted.inlineCallbacks
    def test_a_second_sigterm_stops_at_once(self, tmp_path: Path, long_clip: Path) -> None:
        """Draining with a long --drain-timeout and a job running: a second SIGTERM ends the node
        within seconds, exit 0."""
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "t2",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                      "--drain-timeout", "600"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, long_clip)
            assert status == 201, job
            yield wait_job(base, job["id"], {"transcoding"})
            node.signal(signal.SIGTERM)
            yield wait_for(lambda: "a second SIGTERM stops at once" in node.text(), timeout=30)
            node.signal(signal.SIGTERM)
            code = yield exited_within(node, STOP_SLACK)
            assert code == 0, node.text()[-3000:]
            assert "second SIGTERM: stopping now" in node.text()
        finally:
            node.stop()
