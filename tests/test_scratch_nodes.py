"""
A job that fills a small scratch filesystem, on a real twistd node with a real ffmpeg: its
scratch folder is a 32 MiB tmpfs holding a ballast file, so the conversion (about 8 MB of
noise, more than the estimate of an ordinary 10 s clip) runs out of space. The job is not
failed: it waits, says so, and ends done with whole outputs once the ballast is deleted.
The decisions alone, on fakes: tests/test_scratch.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from tests.helpers import free_port
from tests.media_samples import FFMPEG, ffprobe_json
from tests.nodes import NodeProcess, get_json, request, upload, wait_job

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
#: what the ballast leaves free: room for the estimate, not for the outputs
LEFT = 4 * MiB


@pytest.fixture
def small_scratch(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted where the node's scratch folder is (``WORK/scratch``)."""
    folder = tmp_path / "work" / "scratch"
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as the scratch folder")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(folder)],
                             capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def noise_clip(folder: Path) -> Path:
    """10 s of 320x240 noise with a tone: its H.264 at CRF 23 is about 8 MB, ten times what an
    ordinary clip of that size makes (and what the estimate expects)."""
    if not os.access(FFMPEG, os.X_OK):
        pytest.skip("ffmpeg is needed")
    path = folder / "noise.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y",
                    "-f", "lavfi", "-i", "nullsrc=s=320x240:r=25,geq=random(1)*255:128:128",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
                    "-t", "10", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "30", "-c:a", "aac",
                    "-shortest", str(path)], check=True, timeout=120)
    return path


def fill(folder: Path, leave: int) -> Path:
    """A ballast file in ``folder`` that leaves ``leave`` bytes free on its filesystem."""
    st = os.statvfs(folder)
    size = st.f_bavail * st.f_frsize - leave
    ballast = folder / "ballast"
    block = bytes(MiB)
    with open(ballast, "wb") as f:
        while size > 0:
            size -= f.write(block[:min(size, MiB)])
    return ballast


def metric(base: str, line: str) -> float:
    status, _, text = request("GET", f"{base}/metrics")
    assert status == 200
    for row in text.decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


class ScratchFullTests:
    @pytest_twisted.inlineCallbacks
    def test_a_job_that_fills_scratch_waits_and_completes_once_space_is_freed(
            self, tmp_path: Path, small_scratch: Path) -> None:
        """ffmpeg runs out of space: the job is queued again, ``waiting: scratch_space``, not failed
        and no attempt counted; its partial outputs are gone, and the metrics count it. The ballast
        deleted, the job ends done with whole outputs."""
        from twisted.internet import reactor

        clip = noise_clip(tmp_path)
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "s1",
                                      "--work-dir", str(tmp_path / "work"), "--workers", "1", "--min-free", "0"])
        node.start()
        try:
            base = yield node.wait_ready()
            ballast = fill(small_scratch, LEFT)
            status, _, job = upload(base, clip, "mp4-720p")
            assert status == 201, job
            seen: list[Any] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                _, job = get_json(f"{base}/jobs/{job['id']}")
                seen.append((job["state"], job["waiting"]))
                assert job["state"] not in ("failed", "done", "cancelled"), job
                # counted as a run that ran out: it was not only held at its start
                if job["waiting"] == "scratch_space" and metric(base, 'gridnode_scratch_full_total{when="run"}'):
                    break
                yield deferLater(reactor, 0.1, lambda: None)
            assert job["state"] == "queued" and job["waiting"] == "scratch_space", seen
            assert job["error"] is None and job["attempts"] == 1
            assert metric(base, "gridnode_jobs_waiting_scratch") == 1
            assert os.listdir(small_scratch) == ["ballast"]  # the partial outputs are gone

            ballast.unlink()
            final = yield wait_job(base, job["id"], timeout=120)
            assert final["state"] == "done" and final["waiting"] == "" and final["attempts"] == 1, final
            (output,) = final["outputs"]
            assert abs(output["duration"] - 10.0) < 0.5 and output["size"] > LEFT, output
            status, _, data = request("GET", f"{base}{output['url']}")
            assert status == 200 and len(data) == output["size"]
            (tmp_path / "got.mp4").write_bytes(data)
            assert abs(float(ffprobe_json(tmp_path / "got.mp4")["format"]["duration"]) - 10.0) < 0.5
            assert metric(base, "gridnode_jobs_waiting_scratch") == 0
            assert os.listdir(small_scratch) == []
        finally:
            assert node.stop() == 0
