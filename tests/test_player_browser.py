"""
The upload page's player on adaptive streams, in Debian's chromium: a CMAF output made by real
ffmpeg (gridnode.media.cmaf) plays to its end through the vendored hls.js (its HLS master) and
through the vendored dash.js (its DASH manifest): one set of segments, two players.
The files are served to the page by a route, under the node's own origin. And a CMAF and a
storyboard the node itself made (a config template): the page's result view picks the CMAF,
plays it through hls.js to its end, dash.js plays its manifest, and the storyboard's VTT parses
as a track whose cues cover the whole duration.
"""

from __future__ import annotations

import mimetypes
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridnode.media import cmaf
from tests.browser import PageErrors, chromium_page, needs_chromium, node_args
from tests.media_samples import FFMPEG, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, upload

pytestmark = [pytest.mark.browser, pytest.mark.integration, needs_chromium, needs_ffmpeg]

SECONDS = 8


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-rung CMAF output of an 8 s clip with audio, as the node would make it."""
    out = tmp_path_factory.mktemp("cmaf")
    (out / cmaf.FOLDER).mkdir()
    sizes = [(640, 360, 900), (426, 240, 500), (320, 180, 250)]
    graph = ";".join([f"[0:v]split={len(sizes)}" + "".join(f"[s{i}]" for i in range(len(sizes)))]
                     + [f"[s{i}]scale={w}:{h},format=yuv420p[v{i}]" for i, (w, h, _) in enumerate(sizes)]
                     + [f"[1:a:0]{cmaf.audio_chain(SECONDS)}[a]"])
    rungs = [cmaf.CmafRung(f"[v{i}]", w, h, k) for i, (w, h, k) in enumerate(sizes)]
    video = ["-c:v", "libx264", "-preset", "veryfast", "-threads", "1", *cmaf.keyframe_options("libx264")]
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={SECONDS}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
                    "-filter_complex", graph,
                    *cmaf.output_options(str(out), rungs, video=video, audio=["-c:a", "aac"], audio_label="[a]",
                                         audio_kbps=96)],
                   check=True, capture_output=True, timeout=300)
    return out / cmaf.FOLDER


TEMPLATE = """
[templates.player]
outputs = [
  {name = "stream", container = "cmaf", audio_kbps = 64, ladder = [
    {size = 360, kbps = 900}, {size = 240, kbps = 500}, {size = 180, kbps = 250}]},
  {name = "board", container = "storyboard", interval = 2},
]
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("node")
    (root / "node").mkdir()
    (root / "node" / "node.toml").write_text(TEMPLATE)
    n = NodeProcess(root / "node", node_args(root / "store", "--config", "node.toml"))
    n.start()
    try:
        n.block_until_ready(20.0)
        yield n
    finally:
        n.stop()


def serve(page: Any, base: str, folder: Path) -> None:
    types = {".mpd": cmaf.CONTENT_TYPES[".mpd"], ".m4s": "video/iso.segment", ".m3u8": "application/vnd.apple.mpegurl"}

    def handle(route: Any) -> None:
        name = route.request.url.split("/media-under-test/", 1)[1].split("?")[0]
        path = folder / name
        if "/" in name or not path.is_file():
            route.fulfill(status=404, body="")
            return
        ctype = types.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        route.fulfill(status=200, content_type=ctype, body=path.read_bytes())

    page.route(f"{base}/media-under-test/**", handle)


@pytest.mark.parametrize(("manifest", "engine"), [("master.m3u8", "hls.js"), ("manifest.mpd", "dash.js")])
def test_cmaf_plays_to_its_end(node: NodeProcess, stream: Path, manifest: str, engine: str) -> None:
    with chromium_page() as page:
        errors = PageErrors(page)
        serve(page, node.url, stream)
        page.goto(f"{node.url}/")
        page.wait_for_function("window.gridnodeUpload !== undefined")
        ctype = "application/dash+xml" if manifest.endswith(".mpd") else "application/vnd.apple.mpegurl"
        page.evaluate("([url, type]) => window.gridnodeUpload.play(url, type)",
                      [f"{node.url}/media-under-test/{manifest}", ctype])
        page.wait_for_function(f"document.getElementById('player').dataset.engine === '{engine}'")
        page.wait_for_function("document.getElementById('player').readyState >= 1")
        page.evaluate("() => { const p = document.getElementById('player'); p.muted = true; return p.play(); }")
        # the end: hls.js ends the media; dash.js stops on the last frame without "ended"
        page.wait_for_function("(p => p.ended || (p.paused && p.currentTime >= p.duration - 0.05))"
                               "(document.getElementById('player'))", timeout=40_000)
        played = page.evaluate("""() => {
          const p = document.getElementById('player');
          const r = [];
          for (let i = 0; i < p.played.length; i++) r.push([p.played.start(i), p.played.end(i)]);
          return {ranges: r, duration: p.duration, width: p.videoWidth};
        }""")
        assert abs(played["duration"] - SECONDS) < 0.3, played
        assert played["ranges"][0][0] < 0.2 and played["ranges"][-1][1] > SECONDS - 0.3, played
        assert played["width"] in (640, 426, 320), played
        assert errors.errors == [], errors.errors


def wait_played_to_end(page: Any) -> dict[str, Any]:
    page.wait_for_function("document.getElementById('player').readyState >= 1")
    page.evaluate("() => { const p = document.getElementById('player'); p.muted = true; return p.play(); }")
    page.wait_for_function("(p => p.ended || (p.paused && p.currentTime >= p.duration - 0.05))"
                           "(document.getElementById('player'))", timeout=40_000)
    played: dict[str, Any] = page.evaluate("""() => {
      const p = document.getElementById('player');
      const r = [];
      for (let i = 0; i < p.played.length; i++) r.push([p.played.start(i), p.played.end(i)]);
      return {ranges: r, duration: p.duration, width: p.videoWidth};
    }""")
    return played


def test_the_nodes_own_cmaf_and_storyboard(node: NodeProcess, tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={SECONDS}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={SECONDS}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(source)],
                   check=True, capture_output=True, timeout=120)
    status, _, job = upload(node.url, source, "player")
    assert status == 201, job
    for _ in range(3000):  # a blocking poll: this test runs no reactor
        _, job = get_json(f"{node.url}/jobs/{job['id']}")
        if job["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    outputs = {o["preset"]: o for o in job["outputs"]}
    with chromium_page() as page:
        errors = PageErrors(page)
        page.goto(f"{node.url}/")
        page.wait_for_function("window.gridnodeUpload !== undefined")
        # the result view prefers the CMAF output: its HLS master, through hls.js
        page.evaluate("([base, job]) => window.gridnodeUpload.showResult({base: base}, job)", [node.url, job])
        page.wait_for_function("document.getElementById('player').dataset.engine === 'hls.js'")
        assert page.evaluate("document.getElementById('player').dataset.engine") == "hls.js"
        played = wait_played_to_end(page)
        assert abs(played["duration"] - SECONDS) < 0.3, played
        assert played["ranges"][0][0] < 0.2 and played["ranges"][-1][1] > SECONDS - 0.3, played

        # the same segments through dash.js, by the job's "dash" URL
        page.evaluate("([url]) => window.gridnodeUpload.play(url, 'application/dash+xml')",
                      [node.url + outputs["stream"]["dash"]])
        page.wait_for_function("document.getElementById('player').dataset.engine === 'dash.js'")
        played = wait_played_to_end(page)
        assert played["ranges"][-1][1] > SECONDS - 0.3, played

        # the storyboard's VTT as the browser parses it: cues from 0 to the end, each a sheet's tile
        cues = page.evaluate("""(url) => new Promise((ok, fail) => {
          const p = document.getElementById('player');
          const t = document.createElement('track');
          t.kind = 'metadata'; t.src = url;
          t.addEventListener('load', () => ok(Array.from(t.track.cues).map(c => [c.startTime, c.endTime, c.text])));
          t.addEventListener('error', () => fail(new Error('the VTT did not load')));
          p.appendChild(t);
          t.track.mode = 'hidden';
        })""", node.url + outputs["board"]["url"])
        assert len(cues) == 4 and cues[0][0] == 0 and abs(cues[-1][1] - SECONDS) < 0.1, cues
        assert all(a[1] == b[0] for a, b in zip(cues, cues[1:], strict=False)), cues
        assert all(c[2].startswith("sheet-001.jpg#xywh=") for c in cues), cues
        assert errors.errors == [], errors.errors
