"""
A chunked job made by the whole pool, on three real ``twistd -n gridnode`` nodes of one pool on a
bucket of a real S3-compatible server (moto on loopback), real ffmpeg, a worker or two each, every
job cut in chunks of about 4 s (``--chunk-over 0 --chunk-seconds 4``): the job uploaded to one
node has chunks made by the others too (its chunk list says by whom), and its progress grows as
they finish theirs. ``kill -9`` of a node (and its ffmpegs) holding chunks: the job ends done,
frame-exact against a one-piece encode, only the chunks the dead node held made again. ``kill
-9`` of the owner: its adopter ends the job done, frame-exact, keeping the chunks its peers had
made (listed done, no try of its own) and making the rest: the chunks the owner ran itself
(their files died with it) and those not done yet.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode import keys
from gridnode.chunk_grid import FIGURE
from gridnode.media.probe import probe
from gridnode.media.templates import Catalog
from tests.helpers import free_port
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, heard_from, request, upload
from tests.s3server import client, make_bucket
from tests.test_chaos import kill_machine
from tests.test_chunked_nodes import fetch
from tests.test_split_media import frames, whole

pytest_plugins = ["tests.s3server"]
pytestmark = [pytest.mark.integration, needs_ffmpeg]

SECONDS = 20
PRESET = "mp4-720p"
NAMES = ("na", "nb", "nc")
TERMINAL = ("done", "failed", "cancelled")


def make_source(path: Path, seconds: int = SECONDS) -> Path:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=640x360:rate=25:duration={seconds},"
                    "drawtext=text='%{n}':fontsize=48:x=20:y=20:fontcolor=white:box=1",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(path)], check=True, timeout=120)
    return path


class Pool(dict[str, NodeProcess]):
    """The nodes by name, and their bucket's chunk records."""

    s3: Any
    bucket: str

    def held(self, job_id: str, node: str) -> set[int]:
        """The chunks of ``job_id`` whose records say ``node`` is making them."""
        found = set()
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="grid/" + keys.chunks_prefix(job_id))
        for item in listing.get("Contents", []):
            if item["Key"].endswith(".json"):
                try:
                    record = json.loads(self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read())
                except self.s3.exceptions.NoSuchKey:
                    continue
                if record["state"] == "claimed" and record["holder"] == node:
                    found.add(record["index"])
        return found


@pytest.fixture
def pool(tmp_path: Path, s3_endpoint: str) -> Iterator[Pool]:
    """Three nodes of one pool, the owner-to-be ``na`` with two workers (one for the audio pass,
    one for chunks), the others one, all listed idle in nodes.json and alive to each other."""
    bucket = make_bucket(s3_endpoint, "chunkpool")
    nodes = Pool({name: NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", s3_endpoint, "--node-id", name, "--min-free", "0",
        "--workers", "2" if name == "na" else "1", "--heartbeat", "1", "--chunk-over", "0", "--chunk-seconds", "4",
        "--drain-timeout", "1",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
        for name in NAMES})
    try:
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            node.block_until_ready(30)
        s3 = nodes.s3 = client(s3_endpoint)
        nodes.bucket = bucket

        def idle() -> dict[str, Any]:
            try:
                body = s3.get_object(Bucket=bucket, Key="grid/" + keys.nodes_list("dev", "default"))["Body"].read()
            except s3.exceptions.NoSuchKey:
                return {}
            return {n["id"]: n["load"].get(FIGURE) for n in json.loads(body)["nodes"]}

        poll(lambda: idle() == {"na": 2, "nb": 1, "nc": 1} or None, 60, "every node listed idle")
        for name, node in nodes.items():  # each holds the others alive: offers reach them
            others = sorted(set(NAMES) - {name})
            poll(lambda n=node, o=others: sorted(heard_from(n)) == o, 60, f"peers of {name}")
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """``check()`` until it gives something; bounded (these tests run no reactor of their own)."""
    for _ in range(int(timeout / interval)):
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"no {what} in {timeout} s")


def job_of(node: NodeProcess, job_id: str) -> dict[str, Any]:
    status, job = get_json(f"{node.url}/jobs/{job_id}")
    assert status == 200, job
    return job


def nodes_of(job: dict[str, Any]) -> dict[int, tuple[str, str, int]]:
    return {c["index"]: (c["state"], c["node"], c["tries"]) for c in job["chunks"]}


async def frame_exact(reactor: Any, node: NodeProcess, job: dict[str, Any], src: Path, tmp: Path,
                      seconds: int = SECONDS) -> None:
    """The stitched mp4 has the one-piece encode's frames, each at its timestamp."""
    info = await probe(reactor, str(src), ffprobe=FFPROBE)
    await whole(reactor, info, src, tmp / "whole", Catalog().parse(PRESET))
    expected = frames(tmp / "whole" / f"{PRESET}.mp4")
    assert len(expected) == 25 * seconds
    assert frames(fetch(node, job, PRESET, tmp)) == expected


@pytest_twisted.ensureDeferred
async def test_a_holder_killed_mid_chunk(pool: Pool, real_reactor: Any, tmp_path: Path) -> None:
    """A peer (nb or nc) holds a chunk of na's job: kill -9 of it (and its ffmpeg); the job ends
    done on na with chunks made by more than one node, the chunks the dead node's records held
    made again elsewhere (two tries), every other chunk once; the job's progress grew while
    peers' chunks came in."""
    src = make_source(tmp_path / "src.mp4")
    status, _, job = upload(pool["na"].url, src, PRESET)
    assert status == 201 and len(job["chunks"]) == SECONDS // 4, job
    job_id = job["id"]
    seen: list[tuple[float, bool]] = []  # (progress, a chunk done by a peer then)

    def a_peer_holding() -> str | None:
        now = job_of(pool["na"], job_id)
        assert now["state"] not in TERMINAL, nodes_of(now)
        seen.append((now["progress"], any(s == "done" and n != "na" for s, n, _t in nodes_of(now).values())))
        return next((peer for peer in ("nb", "nc") if pool.held(job_id, peer)), None)

    victim = poll(a_peer_holding, 120, "chunk held by a peer", interval=0.05)
    kill_machine(pool[victim])
    held = pool.held(job_id, victim)  # as the victim left them: the chunks lost with it
    assert held

    def ended() -> dict[str, Any] | None:
        now = job_of(pool["na"], job_id)
        seen.append((now["progress"], any(s == "done" and n != "na" for s, n, _t in nodes_of(now).values())))
        return now if now["state"] in TERMINAL else None

    final = poll(ended, 300, "end of the job", interval=0.2)
    assert final["state"] == "done", final
    listed = nodes_of(final)
    assert all(state == "done" for state, _n, _t in listed.values()), listed
    assert len({node for _s, node, _t in listed.values()}) > 1, listed
    redone = {i for i, (_s, _n, tries) in listed.items() if tries > 1}
    assert redone == held, (held, listed)
    assert all(listed[i][1] != victim and listed[i][2] == 2 for i in redone), listed
    assert all(tries == 1 for i, (_s, _n, tries) in listed.items() if i not in redone), listed
    progress = [p for p, _peer in seen]
    assert progress == sorted(progress), progress
    assert any(0 < p < 1 for p, peer in seen if peer), seen  # a peer's chunk done: the job moved on
    await frame_exact(real_reactor, pool["na"], final, src, tmp_path)


@pytest_twisted.ensureDeferred
async def test_the_owner_killed_mid_job(pool: Pool, real_reactor: Any, tmp_path: Path) -> None:
    """Some chunks of na's job done by peers while na makes one itself: kill -9 of na; its adopter
    (nb or nc) ends the job done, frame-exact. Kept: the chunks peers had done, and those they
    finish meanwhile (listed done by their maker, no try of the adopter's run). Redone: the
    chunks na was making itself (their files died with it), and any nobody had taken yet."""
    src = make_source(tmp_path / "src.mp4", 2 * SECONDS)  # long enough to be cut short
    status, _, job = upload(pool["na"].url, src, PRESET)
    assert status == 201, job
    job_id = job["id"]

    def peers_done() -> dict[int, str]:
        now = job_of(pool["na"], job_id)
        assert now["state"] not in TERMINAL, nodes_of(now)
        done = {i: node for i, (state, node, _t) in nodes_of(now).items() if state == "done" and node != "na"}
        return done if done and pool.held(job_id, "na") else {}

    kept = poll(peers_done, 120, "chunk done by a peer while na makes one", interval=0.05)
    kill_machine(pool["na"])
    own = pool.held(job_id, "na")  # its files died with na

    def ended() -> dict[str, Any] | None:
        now = job_of(pool["nb"], job_id)
        return now if now["state"] in TERMINAL else None

    final = poll(ended, 300, "end of the adopted job", interval=0.2)
    assert final["state"] == "done" and final["node"] in ("nb", "nc") and final["attempts"] == 2, final
    listed = nodes_of(final)
    assert all(state == "done" for state, _n, _t in listed.values()), listed
    for index, maker in kept.items():
        assert listed[index] == ("done", maker, 0), (kept, listed)  # kept: not made again
    redone = {i for i, (_s, _n, tries) in listed.items() if tries}
    assert own and own <= redone and not redone & set(kept), (own, kept, listed)
    assert all(listed[i][1] != "na" for i in own), listed
    adopter = final["node"]
    await frame_exact(real_reactor, pool[adopter], final, src, tmp_path, 2 * SECONDS)


def test_a_cancelled_job_stops_and_leaves_no_chunks(pool: Pool, tmp_path: Path) -> None:
    """DELETE of na's job while a peer makes one of its chunks: it ends cancelled, and its chunk
    records and archives are gone from the bucket (the job's end, not its run's, removes them)."""
    src = make_source(tmp_path / "src.mp4", 2 * SECONDS)
    status, _, job = upload(pool["na"].url, src, PRESET)
    assert status == 201, job
    job_id = job["id"]

    def peer_holding() -> bool:
        assert job_of(pool["na"], job_id)["state"] not in TERMINAL
        return bool(pool.held(job_id, "nb") or pool.held(job_id, "nc"))

    poll(peer_holding, 120, "chunk held by a peer", interval=0.05)
    status, _, body = request("DELETE", f"{pool['na'].url}/jobs/{job_id}")
    assert status in (200, 202), body
    final = poll(lambda: (now := job_of(pool["na"], job_id))["state"] in TERMINAL and now, 30, "cancelled job")
    assert final["state"] == "cancelled", final
    prefix = "grid/" + keys.chunks_prefix(job_id)
    poll(lambda: not pool.s3.list_objects_v2(Bucket=pool.bucket, Prefix=prefix).get("Contents"), 30,
         "chunk records removed")
