"""
Nothing lost: real nodes on a real S3-compatible server, a node killed with
kill -9 mid-transcode, and a node drained with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import free_port, sleep, wait_for
from tests.media_samples import work_clip
from tests.nodes import NodeProcess, get_json, heard_from, stored_record, upload, wait_job

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 s of 640x360 with audio: a couple of seconds of work per job on two cores."""
    return work_clip(tmp_path_factory.mktemp("chaos") / "clip.mp4", 30)


def node(tmp_path: Path, endpoint: str, bucket: str, name: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--pool", "chaos", "--node-id", name,
        "--heartbeat", "1", "--job-lease", "3", "--workers", "1", "--queue", "8", "--min-free", "0",
        "--drain-timeout", "20", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
        "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])


def kill_machine(n: NodeProcess) -> None:
    """kill -9 the node and every ffmpeg it started, as when its instance dies."""
    assert n.process is not None
    os.kill(n.process.pid, signal.SIGKILL)
    n.process.wait()
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "ffmpeg" in line and str(n.folder) in line:
            os.kill(int(line.split()[0]), signal.SIGKILL)


def scratch_files(tmp_path: Path) -> list[str]:
    found = []
    for folder in tmp_path.glob("*/gridnode-work/scratch"):
        found += [str(p) for p in folder.rglob("*")]
    return found


class ChaosTests:
    @pytest_twisted.inlineCallbacks
    def test_kill_nine_loses_nothing(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, s3_client: Any,
                                     clip: Path) -> None:
        """12 jobs on 3 nodes; one node is killed with kill -9 while transcoding and restarted later.
        Every job ends done exactly once with valid outputs; adopted jobs show attempts >= 2."""
        nodes = [node(tmp_path, s3_endpoint, s3_bucket, f"c{i}") for i in range(3)]
        for n in nodes:
            n.start()
        try:
            for n in nodes:
                yield n.wait_ready()
            ids = []
            for i in range(12):
                status, _, job = upload(nodes[i % 3].url, clip, "mp4-480p")
                assert status == 201, job
                ids.append(job["id"])
            victim = nodes[1]
            for _ in range(600):  # until one of the victim's jobs is half-way through ffmpeg
                states = [get_json(f"{victim.url}/jobs/{i}")[1] for i in ids[1::3]]
                if any(j["state"] == "transcoding" and j["progress"] > 0.05 for j in states):
                    break
                yield sleep(0.05)
            else:
                raise AssertionError(f"the victim never transcoded: {states}")
            kill_machine(victim)
            yield sleep(4)
            victim.start()
            yield victim.wait_ready()
            finals = []
            for job_id in ids:
                job = yield wait_job(nodes[0].url, job_id, timeout=240)
                finals.append(job)
            assert [j["state"] for j in finals] == ["done"] * 12, [(j["id"], j["state"], j["error"]) for j in finals]
            victims_jobs = [j for j in finals if j["id"] in ids[1::3]]
            assert any(j["attempts"] >= 2 for j in victims_jobs)
            # A job that ended on another node than the one it was uploaded to was adopted.
            assert all(j["attempts"] >= 2 for j in finals if j["node"] != f"c{ids.index(j['id']) % 3}")
            for j in finals:
                key = f"grid/outputs/{j['id']}/mp4-480p.mp4"
                head = s3_client.head_object(Bucket=s3_bucket, Key=key)
                assert head["ContentLength"] == j["outputs"][0]["size"] > 1000
                record = stored_record(s3_client, s3_bucket, f"grid/jobs/{j['id']}.json")
                assert record["state"] == "done" and len(record["outputs"]) == 1
            # a done job's owner marker and scratch folder go a moment after its done record
            yield wait_for(lambda: s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="grid/active/")
                           .get("KeyCount", 0) == 0, 30)
            yield wait_for(lambda: scratch_files(tmp_path) == [], 30)
        finally:
            for n in nodes:
                n.stop()

    @pytest_twisted.inlineCallbacks
    def test_sigterm_drains(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str, clip: Path) -> None:
        """SIGTERM on a node with running and queued jobs: /health says draining and uploads get
        503; it exits 0; its jobs all end done (there or adopted); it is gone from the registry."""
        a, b = node(tmp_path, s3_endpoint, s3_bucket, "d0"), node(tmp_path, s3_endpoint, s3_bucket, "d1")
        a.start()
        b.start()
        try:
            yield a.wait_ready()
            yield b.wait_ready()
            # both have heard from each other before the drain (so a's leave reaches b)
            yield wait_for(lambda: heard_from(a) == ["d1"] and heard_from(b) == ["d0"], 60)
            ids = []
            for _ in range(3):
                status, _, job = upload(a.url, clip, "mp4-480p")
                assert status == 201
                ids.append(job["id"])
            yield wait_job(a.url, ids[0], {"transcoding"}, min_progress=0.05)
            a.signal(signal.SIGTERM)

            def draining() -> bool:
                status, health = get_json(a.url + "/health")
                return status == 503 and health["state"] == "draining"

            # the signal is handled on a's reactor: a moment, or more on a loaded machine
            yield wait_for(draining, 30)
            status, head, body = upload(a.url, clip)
            assert (status, body["error"]["code"]) == (503, "busy") and int(head["retry-after"]) > 0
            assert a.process is not None
            for _ in range(600):  # bounded: its drain (--drain-timeout 20), then its parts' stop
                if a.process.poll() is not None:
                    break
                yield sleep(0.1)
            assert a.process.returncode == 0
            for job_id in ids:
                job = yield wait_job(b.url, job_id, timeout=120)
                assert job["state"] == "done", job
            # b republishes at a's leave (or its next heartbeat): the list it has written by now
            yield wait_for(lambda: [n["id"] for n in get_json(b.url + "/registry/nodes.json")[1].get("nodes", [])]
                           == ["d1"], 30)
            status, view = get_json(b.url + "/peers")
            assert {p["id"]: p["state"] for p in view["peers"]}["d0"] == "left"
        finally:
            a.stop()
            b.stop()
