"""
Chunked jobs on real ``twistd -n gridnode`` nodes, their store a bucket on a real S3-compatible
server (moto on loopback), real ffmpeg, as a user sees them: the same upload to a node that cuts
every job in chunks (``--chunk-over 0 --chunk-seconds 3``, two workers) and to one that makes
every job whole (``--chunk-over off``), each in a pool of its own on one bucket. For a burned-in
frame counter, an open-GOP x264 source with B-frames and a variable-frame-rate phone-style clip:
the chunked job's mp4 has the whole's frame count and every frame's timestamp, each frame its
source frame (PSNR >= 30 dB), audio and video as long as the whole's within a frame; its JSON
lists its chunks (each made once, on the node). Edge sources: a 2-frame video and one keyframe
a minute are made as the plan says; audio alone is never chunked. Hostile inputs fail with the
codes a whole job's would; a root node's children make chunks as nobody; a node killed while its
chunked job runs makes it again from its first chunk once restarted.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.media.probe import probe
from tests.helpers import free_port
from tests.media_samples import FFMPEG, FFPROBE, Clips, cut_faststart, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, upload
from tests.s3server import make_bucket
from tests.test_chaos import kill_machine
from tests.test_sandbox import root_node
from tests.test_split_media import duration, frames, psnr_per_frame

pytest_plugins = ["tests.s3server"]
pytestmark = [pytest.mark.integration, needs_ffmpeg]

SECONDS = 12


def sources(seconds: float) -> dict[str, list[str]]:
    """The ffmpeg arguments of each kind of source, ``seconds`` long."""
    return {
        "counter": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={seconds},"
                    "drawtext=text='%{n}':fontsize=48:x=20:y=20:fontcolor=white:box=1",
                    "-c:v", "libx264", "-preset", "ultrafast"],
        "opengop": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30000/1001:duration={seconds}",
                    "-c:v", "libx264", "-preset", "fast",
                    "-x264-params", "open-gop=1:bframes=3:b-pyramid=normal:keyint=90"],
        "vfr": ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=30:duration={seconds},"
                "setpts='N/30/TB+if(mod(N,7),0,0.011/TB)+if(gt(N,200),N*0.003/TB,0)'",
                "-c:v", "libx264", "-preset", "ultrafast", "-fps_mode", "vfr", "-video_track_timescale", "90000"],
    }


SOURCES = sources(SECONDS)
TERMINAL = ("done", "failed", "cancelled")


def make_source(folder: Path, name: str, seconds: float = SECONDS) -> Path:
    path = folder / f"{name}.mp4"
    args = sources(seconds)[name]
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *args[:4],
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}", *args[4:],
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True, timeout=120)
    return path


def node_argv(bucket: str, endpoint: str, node_id: str, *extra: str) -> list[str]:
    return ["--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--node-id", node_id, "--pool", node_id,
            "--min-free", "0", "--http", f"tcp:{free_port()}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--drain-timeout", "1", *extra]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[dict[str, NodeProcess]]:
    """``chunked`` (every job in chunks of about 3 s, two workers) and ``whole`` (none)."""
    root = tmp_path_factory.mktemp("chunked-nodes")
    bucket = make_bucket(s3_endpoint, "chunked")
    made = {"chunked": NodeProcess(root / "chunked", node_argv(bucket, s3_endpoint, "chunked", "--workers", "2",
                                                               "--chunk-over", "0", "--chunk-seconds", "3")),
            "whole": NodeProcess(root / "whole", node_argv(bucket, s3_endpoint, "whole", "--workers", "1",
                                                           "--chunk-over", "off"))}
    try:
        for n in made.values():
            n.start()
        for n in made.values():
            n.block_until_ready(30)
        yield made
    finally:
        for n in made.values():
            n.stop()


def run_job(node: NodeProcess, src: Path, presets: str = "mp4-720p", timeout: float = 240) -> dict[str, Any]:
    status, _, job = upload(node.url, src, presets)
    assert status == 201, job
    return wait_done(node, job["id"], timeout)


def wait_done(node: NodeProcess, job_id: str, timeout: float = 240) -> dict[str, Any]:
    job: dict[str, Any] = {}
    for _ in range(int(timeout * 10)):  # a blocking poll: these tests run no reactor
        _, job = get_json(f"{node.url}/jobs/{job_id}")
        if job["state"] in TERMINAL:
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    return job


def fetch(node: NodeProcess, job: dict[str, Any], preset: str, folder: Path) -> Path:
    output = next(o for o in job["outputs"] if o["preset"] == preset)
    path = folder / f"{job['id']}-{output['name']}"
    with urllib.request.urlopen(node.url + output["url"], timeout=30) as r:  # noqa: S310 - loopback
        path.write_bytes(r.read())
    return path


@pytest.mark.parametrize(("name", "seconds"), [*((n, SECONDS) for n in SOURCES), ("counter", 180)])
@pytest_twisted.ensureDeferred
async def test_chunked_mp4_is_the_wholes(name: str, seconds: float, nodes: dict[str, NodeProcess], real_reactor: Any,
                                         tmp_path: Path) -> None:
    """The chunked node's mp4 has the whole node's frames at the whole's timestamps, each its
    source frame, and the whole's audio; its job lists its chunks, each made once on the node,
    and ends at progress 1; the whole job lists none. The issue's own case too: a 3-minute
    source with a frame counter burned in (60 chunks)."""
    src = make_source(tmp_path, name, seconds)
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    chunked = run_job(nodes["chunked"], src, timeout=600)
    whole = run_job(nodes["whole"], src, timeout=600)
    assert whole["chunks"] == []
    listed = chunked["chunks"]
    assert len(listed) >= 3, listed
    assert [c["index"] for c in listed] == list(range(len(listed)))
    assert all(c["state"] == "done" and c["node"] == "chunked" and c["tries"] == 1 for c in listed), listed
    assert listed[0]["start"] == 0 and all(a["start"] < b["start"] for a, b in zip(listed, listed[1:], strict=False))
    assert abs(sum(c["seconds"] for c in listed) - chunked["input"]["duration"]) < 0.5, listed
    assert chunked["progress"] == 1

    made = fetch(nodes["chunked"], chunked, "mp4-720p", tmp_path)
    one = fetch(nodes["whole"], whole, "mp4-720p", tmp_path)
    expected = frames(one)
    assert frames(made) == expected and len(expected) > 200 * seconds / SECONDS
    assert frames(made, "a:0") == frames(one, "a:0")
    tick = 1 / 25 if name == "counter" else 1 / 30
    assert abs(duration(made, "a:0") - duration(one, "a:0")) < tick
    assert abs(duration(made, "v:0") - duration(one, "v:0")) < tick
    scores = psnr_per_frame(made, src, info, tmp_path)
    assert len(scores) == len(expected) and min(scores) >= 30, [i for i, s in enumerate(scores) if s < 30][:10]



def test_a_two_frame_video_is_made_whole(nodes: dict[str, NodeProcess], tmp_path: Path) -> None:
    """A 2-frame video on the node that cuts every job: too short for two chunks, made whole,
    its two frames at the whole node's timestamps."""
    src = tmp_path / "two.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25",
                    "-frames:v", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(src)], check=True, timeout=60)
    chunked, whole = run_job(nodes["chunked"], src), run_job(nodes["whole"], src)
    assert chunked["chunks"] == [] and whole["chunks"] == []
    made = fetch(nodes["chunked"], chunked, "mp4-720p", tmp_path)
    assert frames(made) == frames(fetch(nodes["whole"], whole, "mp4-720p", tmp_path)) and len(frames(made)) == 2


@pytest_twisted.ensureDeferred
async def test_keyframes_a_minute_apart_are_cut_frame_exact(nodes: dict[str, NodeProcess], real_reactor: Any,
                                                            tmp_path: Path) -> None:
    """A source whose keyframes are 60 s apart (one in its 15 s, as a screen recording's): each
    chunk decodes from that keyframe, and the stitched mp4 is the whole's frame for frame."""
    src = tmp_path / "sparse.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=15", "-f", "lavfi", "-i", "sine=duration=15",
                    "-c:v", "libx264", "-preset", "ultrafast", "-x264-params", "keyint=1500:min-keyint=1500",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src)], check=True, timeout=60)
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    chunked, whole = run_job(nodes["chunked"], src), run_job(nodes["whole"], src)
    assert len(chunked["chunks"]) >= 4 and all(c["state"] == "done" for c in chunked["chunks"])
    made = fetch(nodes["chunked"], chunked, "mp4-720p", tmp_path)
    expected = frames(fetch(nodes["whole"], whole, "mp4-720p", tmp_path))
    assert frames(made) == expected and len(expected) == 375
    scores = psnr_per_frame(made, src, info, tmp_path)
    assert len(scores) == len(expected) and min(scores) >= 30


def test_audio_alone_is_never_chunked(nodes: dict[str, NodeProcess], tmp_path: Path) -> None:
    """An audio-only input on the node that cuts every job: the default mp4 is refused at its
    probe (``needs_video``), as on any node; the ``audio`` preset is made in one piece, as long
    as the input."""
    src = tmp_path / "talk.m4a"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=300:duration=15",
                    "-c:a", "aac", str(src)], check=True, timeout=60)
    status, _, body = upload(nodes["chunked"].url, src)
    assert status == 422 and body["error"]["code"] == "needs_video", body
    job = run_job(nodes["chunked"], src, "audio")
    assert job["chunks"] == [] and job["outputs"][0]["name"] == "audio.m4a"
    assert job["outputs"][0]["duration"] == pytest.approx(duration(src, "a:0"), abs=0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_root_node_makes_chunks_as_nobody(open_folder: Path, media_clips: Clips) -> None:
    """A node run as root, its children as nobody in their boxes: a chunked job of an mp4, a
    webm and a poster is done (the chunks written by nobody, the stitches reading them and
    the node's concat lists), every output served."""
    node = root_node(open_folder, "rootchunks", "--chunk-over", "0", "--chunk-seconds", "1", "--workers", "2")
    node.start()
    try:
        node.block_until_ready(30)
        job = run_job(node, media_clips.landscape, "mp4-480p,webm-480p,poster")
        assert len(job["chunks"]) >= 2 and all(c["state"] == "done" for c in job["chunks"]), job["chunks"]
        for output in job["outputs"]:
            with urllib.request.urlopen(node.url + output["url"], timeout=30) as r:  # noqa: S310 - loopback
                assert r.status == 200 and len(r.read()) > 0
    finally:
        node.stop()


def test_hostile_inputs_fail_a_chunked_job_with_their_codes(tmp_path: Path, media_clips: Clips) -> None:
    """On a node that cuts every job, with --max-output 0.3 MB: a faststart mp4 cut to half its
    bytes (its header says 20 s) fails with input_truncated, its chunks not redone, an mp4 past the output limit with
    output_too_large, as they would made whole; nothing is stored under outputs/, the node's
    scratch is empty again and it still converts."""
    half = cut_faststart(tmp_path)
    node = NodeProcess(tmp_path / "node", ["--store", f"file:{tmp_path / 'store'}", "--min-free", "0",
                                           "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                           "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--workers", "2",
                                           "--chunk-over", "0", "--chunk-seconds", "2", "--max-output", "0.3"])
    node.start()
    try:
        node.block_until_ready(30)
        ended = {}
        for label, path, presets in [("half", half, "mp4-480p"), ("big", media_clips.landscape, "mp4-720p")]:
            status, _, job = upload(node.url, path, presets)
            assert status == 201 and len(job["chunks"]) >= 2, (label, job)
            for _ in range(1200):  # bounded: 120 s
                _, job = get_json(f"{node.url}/jobs/{job['id']}")
                if job["state"] in TERMINAL:
                    break
                time.sleep(0.1)
            ended[label] = job
        codes = {label: (job["state"], (job["error"] or {}).get("code")) for label, job in ended.items()}
        assert codes == {"half": ("failed", "input_truncated"), "big": ("failed", "output_too_large")}, ended
        assert "of the input's 20.0 s could be read" in ended["half"]["error"]["message"]
        listed = ended["half"]["chunks"]  # not redone: the input will not grow
        assert "failed" in {c["state"] for c in listed} and max(c["tries"] for c in listed) == 1, listed
        for job in ended.values():
            assert job["outputs"] == [] and not (tmp_path / "store" / "outputs" / job["id"]).exists()
        assert run_job(node, media_clips.portrait, "mp4-480p")["state"] == "done"
    finally:
        node.stop()


def test_a_restarted_node_makes_its_chunked_job_again(tmp_path: Path) -> None:
    """kill -9 of a node (and its ffmpegs) while its chunked job runs, some chunks done: started
    again, the node runs the job again from its first chunk (a second attempt, every chunk listed
    afresh and made once more), and it ends done with every frame of the input."""
    src = tmp_path / "src.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=640x360:rate=25:duration=20", "-f", "lavfi", "-i", "sine=duration=20",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(src)], check=True, timeout=60)
    args = ["--store", f"file:{tmp_path / 'store'}", "--node-id", "again", "--min-free", "0", "--workers", "1",
            "--chunk-over", "0", "--chunk-seconds", "2", "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]
    first = NodeProcess(tmp_path / "node", [*args, "--http", f"tcp:{free_port()}:interface=127.0.0.1"])
    first.start()
    try:
        first.block_until_ready(30)
        status, _, job = upload(first.url, src, "mp4-720p")
        assert status == 201 and len(job["chunks"]) == 10, job
        for _ in range(1200):  # bounded: 120 s
            _, job = get_json(f"{first.url}/jobs/{job['id']}")
            if sum(c["state"] == "done" for c in job["chunks"]) >= 2:
                break
            time.sleep(0.1)
        assert job["state"] == "transcoding" and sum(c["state"] == "done" for c in job["chunks"]) >= 2, job
        kill_machine(first)
    finally:
        first.stop()
    again = NodeProcess(tmp_path / "node", [*args, "--http", f"tcp:{free_port()}:interface=127.0.0.1"])
    again.start()
    try:
        again.block_until_ready(30)
        done = wait_done(again, job["id"])
        assert done["attempts"] == 2 and done["node"] == "again", done
        assert [(c["state"], c["tries"]) for c in done["chunks"]] == [("done", 1)] * 10, done["chunks"]
        assert len(frames(fetch(again, done, "mp4-720p", tmp_path))) == 500
    finally:
        again.stop()
