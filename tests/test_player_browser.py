"""
The upload page's player on adaptive streams, in Debian's chromium: a CMAF output made by real
ffmpeg (gridnode.media.cmaf) plays to its end through the vendored hls.js (its HLS master) and
through the vendored dash.js (its DASH manifest): one set of segments, two players.
The files are served to the page by a route, under the node's own origin.
"""

from __future__ import annotations

import mimetypes
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridnode.media import cmaf
from tests.browser import PageErrors, chromium_page, needs_chromium, node_args
from tests.media_samples import FFMPEG, needs_ffmpeg
from tests.nodes import NodeProcess

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


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("node")
    n = NodeProcess(root / "node", node_args(root / "store"))
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
