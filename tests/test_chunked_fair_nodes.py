"""
Fair share covers chunks, on a real ``twistd -n gridnode`` node with one worker (tokens minted by
PyJWT, its store a bucket on moto, real ffmpeg): while a job that is made whole holds the worker,
bob queues 10 short jobs, then alice a long one that is cut in chunks. Freed, the worker serves
bob's short jobs in turn with alice's chunks, each chunk a start of its own: none of bob's jobs
waits for all of alice's chunks, and alice's job does not wait for all of bob's. The start order
is the node's own account of it (its log's "job X started", one line per start, in order; a
chunk's is "job X.chunk-N started"). While the long job runs, its events carry its chunk list
as it changes.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, poll
from tests.media_samples import FFMPEG, Clips, needs_ffmpeg
from tests.nodes import NodeProcess
from tests.test_auth_nodes import K1, auth, call, mint

pytest_plugins = ["tests.s3server"]
pytestmark = [pytest.mark.integration, needs_ffmpeg]

OPS, ALICE, BOB = (auth(mint(sub, "upload read cancel")) for sub in ("ops", "alice", "bob"))
#: a start: the job's id, and the task's key for a chunked job's task
STARTED = re.compile(r"job ([0-9A-Z]{26})(?:\.([a-z]+-\d+))? started")


@pytest.fixture
def node(tmp_path: Path, s3_endpoint: str, s3_bucket: str) -> Iterator[NodeProcess]:
    keyring = tmp_path / "tokens.keys"
    keyring.write_text(f"k1 {K1}\n")
    n = NodeProcess(tmp_path / "n0", [
        "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint", s3_endpoint, "--node-id", "n0", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        "--upload-secret", str(keyring), "--workers", "1", "--queue", "64", "--drain-timeout", "1",
        "--chunk-over", "10", "--chunk-seconds", "3"])
    n.start()
    try:
        n.block_until_ready(30)
        yield n
    finally:
        n.stop()


def clip(path: Path, seconds: int, *extra: str) -> Path:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=640x360:rate=25:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=330:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", *extra, str(path)], check=True, timeout=120)
    return path


def submit(node: NodeProcess, path: Path, headers: dict[str, str], presets: str) -> str:
    status, _, body = call("POST", f"{node.url}/jobs?presets={presets}&name={path.name}",
                           {"Content-Type": "application/octet-stream", **headers}, path.read_bytes())
    assert status == 201, body
    return str(body["id"])


def starts(node: NodeProcess) -> list[tuple[str, str]]:
    return STARTED.findall(node.text())


def follow(url: str, headers: dict[str, str], into: list[dict[str, Any]]) -> threading.Thread:
    """Read a job's events in a thread until the stream ends, each event's job into ``into``."""
    def read() -> None:
        req = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback
        with urllib.request.urlopen(req, timeout=240) as stream:  # noqa: S310 - loopback
            for line in stream:
                if line.startswith(b"data: "):
                    into.append(json.loads(line[6:]))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_short_jobs_take_turns_with_a_long_jobs_chunks(node: NodeProcess, media_clips: Clips,
                                                       tmp_path: Path) -> None:
    """bob's 10 short jobs, queued first, start in turn with alice's chunks: between two of his
    starts one of hers, between two of her chunks' one of his, while both have some queued; her
    events list her chunks, running on the node and done, and her job is done with progress 1."""
    # MPEG-TS has no keyframe index: a job of it is made whole, a single start
    blocker = submit(node, clip(tmp_path / "blocker.ts", 40, "-f", "mpegts"), OPS, "webm-480p")
    poll(lambda: starts(node) == [(blocker, "")], 60, "the blocker to hold the worker")
    shorts = [submit(node, media_clips.portrait, BOB, "poster") for _ in range(10)]
    long = submit(node, clip(tmp_path / "long.mp4", 18), ALICE, "mp4-480p")
    events: list[dict[str, Any]] = []
    reader = follow(f"{node.url}/jobs/{long}/events", ALICE, events)
    status, _, body = call("GET", f"{node.url}/jobs/{long}", ALICE)
    assert status == 200 and body["state"] == "queued" and len(body["chunks"]) == 6, body
    assert all(c["state"] == "queued" and c["tries"] == 0 for c in body["chunks"]), body["chunks"]
    status, _, body = call("DELETE", f"{node.url}/jobs/{blocker}", OPS)
    assert status == 200 and body["state"] == "cancelled", body

    def ended() -> bool:
        return all(call("GET", f"{node.url}/jobs/{j}", h)[2]["state"] in ("done", "failed")
                   for j, h in [(long, ALICE), *((s, BOB) for s in shorts)])

    poll(ended, 240, "every job to end")
    order = starts(node)[1:]
    chunk_at = [i for i, (job, task) in enumerate(order) if job == long and task.startswith("chunk-")]
    short_at = [i for i, (job, _task) in enumerate(order) if job in shorts]
    assert len(chunk_at) == 6 and len(short_at) == 10, order
    alice_at = [i for i, (job, task) in enumerate(order) if job == long and not task.startswith("stitch")]
    # the tenants take turns while both have work queued (her stitch waits for her other tasks to
    # end): one of hers between two of his, and one of his between two of her chunks
    turns = [(a, b) for a, b in zip(short_at, short_at[1:], strict=False) if b < alice_at[-1]]
    assert len(turns) >= 6 and all(any(a < c < b for c in alice_at) for a, b in turns), order
    both = [(a, b) for a, b in zip(chunk_at, chunk_at[1:], strict=False) if b < short_at[-1]]
    assert len(both) >= 3 and all(any(a < s < b for s in short_at) for a, b in both), order
    assert sum(s < chunk_at[-1] for s in short_at) >= 5, order  # not after all of them
    reader.join(30)
    status, _, body = call("GET", f"{node.url}/jobs/{long}", ALICE)
    assert body["state"] == "done" and body["progress"] == 1, body
    assert [c["state"] for c in body["chunks"]] == ["done"] * 6 and {c["node"] for c in body["chunks"]} == {"n0"}
    seen = {(c["index"], c["state"]) for e in events for c in e.get("chunks", [])}
    assert {(i, "running") for i in range(6)} <= seen and {(i, "done") for i in range(6)} <= seen, events[-1]
    assert events[-1]["state"] == "done"
