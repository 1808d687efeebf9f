"""
A chunked job's streams in Debian's chromium: a node that cuts every job in chunks of about 4 s
(``--chunk-over 0``) makes a 16 s clip's CMAF ladder (a config template) and its HLS ladder (the
``hls`` preset); the upload page's player plays each through the vendored hls.js from its start
to its end, across every seam, in one continuous played range and without an error.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import PageErrors, chromium_page, needs_chromium, node_args
from tests.media_samples import FFMPEG, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, request, upload

pytestmark = [pytest.mark.browser, pytest.mark.integration, needs_chromium, needs_ffmpeg]

SECONDS = 16
TEMPLATE = """
[templates.stream]
description = "A CMAF ladder"
outputs = [
  {name = "stream", container = "cmaf", audio_kbps = 64, ladder = [{size = 360, kbps = 900}, {size = 240, kbps = 500}]},
]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("chunked-browser")
    (root / "node").mkdir()
    (root / "node" / "node.toml").write_text(TEMPLATE)
    n = NodeProcess(root / "node", node_args(root / "store", "--config", "node.toml", "--workers", "2",
                                             "--chunk-over", "0", "--chunk-seconds", "4"))
    n.start()
    try:
        n.block_until_ready(20.0)
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("chunked-clip") / "source.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={SECONDS}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(src)],
                   check=True, capture_output=True, timeout=120)
    return src


def chunked_job(node: NodeProcess, src: Path, presets: str) -> dict[str, Any]:
    status, _, job = upload(node.url, src, presets)
    assert status == 201, job
    for _ in range(3000):  # a blocking poll: this test runs no reactor
        _, job = get_json(f"{node.url}/jobs/{job['id']}")
        if job["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    return job


@pytest.mark.parametrize(("presets", "seams"), [("stream", 3), ("hls", 2)])
def test_a_chunked_stream_plays_across_its_seams(node: NodeProcess, clip: Path, presets: str, seams: int) -> None:
    """The job was made in chunks (its list: one more than its seams, all done), and its stream
    plays through hls.js from 0 to its end in one played range: no seam stalls or skips."""
    job = chunked_job(node, clip, presets)
    assert len(job["chunks"]) == seams + 1 and all(c["state"] == "done" for c in job["chunks"]), job["chunks"]
    url = node.url + job["outputs"][0]["url"]
    assert url.endswith(".m3u8"), job["outputs"]
    with chromium_page() as page:
        errors = PageErrors(page)
        page.goto(f"{node.url}/")
        page.wait_for_function("window.gridnodeUpload !== undefined")
        page.evaluate("([url]) => window.gridnodeUpload.play(url, 'application/vnd.apple.mpegurl')", [url])
        page.wait_for_function("document.getElementById('player').dataset.engine === 'hls.js'")
        page.wait_for_function("document.getElementById('player').readyState >= 1")
        page.evaluate("() => { const p = document.getElementById('player'); p.muted = true; p.playbackRate = 2;"
                      " return p.play(); }")
        page.wait_for_function("(p => p.ended || (p.paused && p.currentTime >= p.duration - 0.05))"
                               "(document.getElementById('player'))", timeout=60_000)
        played = page.evaluate("""() => {
          const p = document.getElementById('player');
          const r = [];
          for (let i = 0; i < p.played.length; i++) r.push([p.played.start(i), p.played.end(i)]);
          return {ranges: r, duration: p.duration, frames: p.getVideoPlaybackQuality().totalVideoFrames};
        }""")
        assert abs(played["duration"] - SECONDS) < 0.3, played
        assert len(played["ranges"]) == 1, played  # a seam hls.js had to jump over would split it
        assert played["ranges"][0][0] < 0.2 and played["ranges"][0][1] > SECONDS - 0.3, played
        assert errors.errors == [], errors.errors


def test_the_status_page_shows_a_jobs_chunks(node: NodeProcess, tmp_path: Path) -> None:
    """A 30 s 720p upload made in chunks: the status page lists its chunks in the job's row,
    one running on a worker at some point and, later, more of them done."""
    src = tmp_path / "long.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=1280x720:rate=25:duration=30", "-f", "lavfi", "-i", "sine=duration=30",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(src)], check=True, capture_output=True, timeout=120)
    status, _, job = upload(node.url, src, "mp4-720p")
    assert status == 201 and len(job["chunks"]) == 8, job
    try:
        with chromium_page() as page:
            errors = PageErrors(page)
            page.goto(f"{node.url}/status")
            items = f'#jobs tr[data-job="{job["id"]}"] ol.chunks li'
            page.wait_for_function(f"document.querySelectorAll('{items}').length === 8", timeout=20_000)
            page.wait_for_selector(f'{items}[data-state="running"]', timeout=30_000)
            title = page.get_attribute(f'{items}[data-state="running"]', "title") or ""
            assert title.startswith("chunk ") and " running on " in title, title
            page.wait_for_function(f"document.querySelectorAll('{items}[data-state=\"done\"]').length >= 2",
                                   timeout=60_000)
            label = page.get_attribute(f'#jobs tr[data-job="{job["id"]}"] ol.chunks', "aria-label") or ""
            assert label.endswith(" of 8 chunks done"), label
            assert errors.errors == [], errors.errors
    finally:  # a job still running would hold up the node's stop
        request("DELETE", f"{node.url}/jobs/{job['id']}", timeout=10)
