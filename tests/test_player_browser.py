"""
The upload page's player on adaptive streams, in Debian's chromium: a CMAF output made by real
ffmpeg as a node makes it (H.264, AV1; HEVC where the browser decodes it) plays to its end
through the vendored hls.js (its HLS master) and through the vendored dash.js (its DASH
manifest): one set of segments, two players. The files are served to the page by a route,
under the node's own origin. And a CMAF and a storyboard the node itself made (a config
template): the page's result view picks the CMAF, plays it through hls.js to its end, dash.js
plays its manifest, and the storyboard's VTT parses as a track whose cues cover the whole
duration. And rung switching: each engine on the node's CMAF switches to a lower rung when the
browser's bandwidth drops, and still plays to the end.
"""

from __future__ import annotations

import dataclasses
import mimetypes
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridnode.media import cmaf
from gridnode.media.finish import write_cmaf_codecs
from gridnode.media.presets import build_argv
from gridnode.media.templates import parse_outputs
from tests.browser import PageErrors, chromium_page, needs_chromium, node_args
from tests.media_samples import FFMPEG, needs_ffmpeg
from tests.nodes import NodeProcess, get_json, upload
from tests.test_media_presets import source

pytestmark = [pytest.mark.browser, pytest.mark.integration, needs_chromium, needs_ffmpeg]

SECONDS = 8


def make_cmaf(out: Path, video: str, seconds: float, container: str = "cmaf") -> Path:
    """A 3-rung CMAF (or ``dash``) output of a ``seconds`` clip with audio, made as a node makes
    it: its argv, then its codec strings written into the manifests."""
    src = out / "source.mkv"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={seconds:g}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds:g}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-qp", "10", "-c:a", "flac", str(src)],
                   check=True, capture_output=True, timeout=120)
    probe = dataclasses.replace(source(640, 360, duration=seconds), frame_rate=25.0, demuxer="matroska")
    presets = parse_outputs([{"name": cmaf.FOLDER, "container": container, "video": video, "audio_kbps": 96, "ladder": [
        {"size": 360, "kbps": 900}, {"size": 240, "kbps": 500}, {"size": 180, "kbps": 250}]}], watermarks=None)
    (out / cmaf.FOLDER).mkdir()
    subprocess.run(build_argv(FFMPEG, probe, str(src), str(out), presets, threads=1), check=True,
                   capture_output=True, timeout=300)
    write_cmaf_codecs(str(out), probe, presets)
    return out / cmaf.FOLDER


@pytest.fixture(scope="module", params=["h264", "av1", "hevc"])
def stream(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A 3-rung CMAF output of an 8 s clip with audio in each ladder codec."""
    video: str = request.param
    return video, make_cmaf(tmp_path_factory.mktemp(f"cmaf-{video}"), video, SECONDS)


TEMPLATE = """
[templates.player]
description = "A CMAF ladder and its storyboard"
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


def video_codecs(folder: Path) -> list[str]:
    return re.findall(r'mimeType="video/mp4" codecs="([^"]+)"', (folder / "manifest.mpd").read_text())


@pytest.mark.parametrize(("manifest", "engine"), [("master.m3u8", "hls.js"), ("manifest.mpd", "dash.js")])
def test_cmaf_plays_to_its_end(node: NodeProcess, stream: tuple[str, Path], manifest: str, engine: str) -> None:
    """H.264 and AV1 ladders play to their end through both engines. HEVC plays where the
    browser decodes it: Debian's chromium has no HEVC decoder (its MediaSource refuses every
    hvc1 string), so there the HEVC case is skipped, saying so."""
    video, folder = stream
    with chromium_page() as page:
        page.goto(f"{node.url}/")
        codecs = video_codecs(folder)
        supported = page.evaluate("cs => cs.map(c => MediaSource.isTypeSupported('video/mp4; codecs=\"' + c + '\"'))",
                                  codecs)
        if video == "hevc" and not any(supported):
            pytest.skip(f"this chromium decodes no HEVC (MediaSource refuses {', '.join(codecs)})")
        assert all(supported), (codecs, supported)  # the strings the node wrote are ones a player accepts
        errors = PageErrors(page)
        serve(page, node.url, folder)
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


def test_a_dash_output_plays_through_dash_js(node: NodeProcess, tmp_path: Path) -> None:
    """A ``dash`` output (the manifest alone, segment timelines, no HLS playlist) plays to its
    end through the page's dash.js."""
    folder = make_cmaf(tmp_path, "h264", SECONDS, container="dash")
    assert not list(folder.glob("*.m3u8"))
    with chromium_page() as page:
        errors = PageErrors(page)
        serve(page, node.url, folder)
        page.goto(f"{node.url}/")
        page.wait_for_function("window.gridnodeUpload !== undefined")
        page.evaluate("([url]) => window.gridnodeUpload.play(url, 'application/dash+xml')",
                      [f"{node.url}/media-under-test/manifest.mpd"])
        page.wait_for_function("document.getElementById('player').dataset.engine === 'dash.js'")
        played = wait_played_to_end(page)
        assert abs(played["duration"] - SECONDS) < 0.3, played
        assert played["ranges"][0][0] < 0.2 and played["ranges"][-1][1] > SECONDS - 0.3, played
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


def node_job(node: NodeProcess, folder: Path, seconds: float) -> dict[str, Any]:
    """The outputs, by name, of a job of the node's "player" template on a ``seconds`` clip."""
    src = folder / "source.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={seconds:g}",
                    "-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds:g}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(src)],
                   check=True, capture_output=True, timeout=120)
    status, _, job = upload(node.url, src, "player")
    assert status == 201, job
    for _ in range(3000):  # a blocking poll: this test runs no reactor
        _, job = get_json(f"{node.url}/jobs/{job['id']}")
        if job["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    return job


def test_the_nodes_own_cmaf_and_storyboard(node: NodeProcess, tmp_path: Path) -> None:
    job = node_job(node, tmp_path, SECONDS)
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


#: what a test records of a player: each rendition switch it reports (when, which width) and
#: each size the video element took (its resize events: the rendition actually shown)
RECORD = """(p) => { window.rec = {switches: [], widths: [], throttled: null};
  p.addEventListener('resize', () => rec.widths.push(p.videoWidth)); }"""
#: the vendored engines, each made to start on the top rung and keep a short buffer ahead (so
#: that a bandwidth drop is felt within a segment or two)
ENGINES = {
    "hls.js": ("/static/vendor/hls.min.js", """([p, url]) => {
      const hls = new Hls({startLevel: 2, abrEwmaDefaultEstimate: 5e6, maxBufferLength: 6, maxMaxBufferLength: 8});
      hls.on(Hls.Events.LEVEL_SWITCHED, (e, d) => rec.switches.push([p.currentTime, hls.levels[d.level].width]));
      hls.loadSource(url); hls.attachMedia(p); p.muted = true; p.play(); }"""),
    "dash.js": ("/static/vendor/dash.mediaplayer.min.js", """([p, url]) => {
      const d = dashjs.MediaPlayer().create();
      d.updateSettings({streaming: {buffer: {bufferTimeAtTopQuality: 6, bufferTimeAtTopQualityLongForm: 6,
                                             bufferTimeDefault: 6}, abr: {initialBitrate: {video: 5000}}}});
      d.on(dashjs.MediaPlayer.events.QUALITY_CHANGE_RENDERED, e => {
        if (e.mediaType === 'video') rec.switches.push([p.currentTime, e.newRepresentation.width]); });
      d.initialize(p, url, false); p.muted = true; p.play(); }"""),
}
#: the bandwidth the test drops to once the top rung plays: under the top rung's 900 kbit/s
#: and the middle one's 500 (+ 64 of audio), well over the bottom one's 250 + 64
THROTTLED_BITS = 400_000


@pytest.fixture(scope="module")
def long_job(node: NodeProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The node's own CMAF of a 20 s clip: five segments per rung, room to switch."""
    return node_job(node, tmp_path_factory.mktemp("long"), 20)


@pytest.mark.parametrize("engine", ["hls.js", "dash.js"])
def test_a_bandwidth_drop_switches_rungs_and_plays_to_the_end(node: NodeProcess, long_job: dict[str, Any],
                                                             engine: str) -> None:
    """The node's CMAF starts on its top rung through the vendored engine; once it plays, the
    browser's network is throttled (Chrome's own emulation, so the engine measures it as a
    viewer's would): the engine switches to a lower rung by its own bandwidth estimate (hls.js
    LEVEL_SWITCHED, dash.js QUALITY_CHANGE_RENDERED), the video element shows the smaller
    picture, and the stream still plays to its end without a gap."""
    stream = next(o for o in long_job["outputs"] if o["preset"] == "stream")
    script, start = ENGINES[engine]
    url = node.url + (stream["url"] if engine == "hls.js" else stream["dash"])
    with chromium_page() as page:
        errors = PageErrors(page)
        page.goto(f"{node.url}/")
        page.wait_for_function("window.gridnodeUpload !== undefined")
        page.add_script_tag(url=node.url + script)
        player = page.query_selector("#player")
        page.evaluate(RECORD, player)
        page.evaluate(start, [player, url])
        page.wait_for_function("document.getElementById('player').currentTime > 0.5 && rec.widths.includes(640)")
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 20, "uploadThroughput": -1,
                                                      "downloadThroughput": THROTTLED_BITS / 8})
        page.evaluate("() => { rec.throttled = document.getElementById('player').currentTime; }")
        page.wait_for_function("(p => p.ended || (p.paused && p.currentTime >= p.duration - 0.05))"
                               "(document.getElementById('player'))", timeout=90_000)
        rec = page.evaluate("rec")
        played = page.evaluate("""() => {
          const p = document.getElementById('player');
          const r = [];
          for (let i = 0; i < p.played.length; i++) r.push([p.played.start(i), p.played.end(i)]);
          return {ranges: r, duration: p.duration};
        }""")
    assert rec["widths"][0] == 640, rec  # the top rung shown first
    assert any(width < 640 for _, width in rec["switches"]), rec  # the engine reported a lower rung...
    assert rec["widths"][-1] < 640, rec  # ...and the picture became that rung's
    assert abs(played["duration"] - 20) < 0.3, played
    assert len(played["ranges"]) == 1 and played["ranges"][0][0] < 0.2, played
    assert played["ranges"][0][1] > 20 - 0.3, played
    assert errors.errors == [], errors.errors


def test_the_page_lists_what_get_presets_lists_and_uploads_a_template(node: NodeProcess, tmp_path: Path) -> None:
    """The upload page's outputs are what ``GET /presets`` lists for the caller (the node's
    template with its description among the built-in presets), the default still checked; a
    template checked there is what the node converts with."""
    _, listing = get_json(f"{node.url}/presets")
    names = [t["name"] for t in listing["presets"] if t["name"] != "poster"]
    assert "player" in names
    clip = tmp_path / "clip.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x180:rate=25:duration=4", "-f", "lavfi", "-i", "sine=duration=4",
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(clip)],
                   check=True, capture_output=True, timeout=60)
    with chromium_page() as page:
        errors = PageErrors(page)
        page.goto(f"{node.url}/")
        page.wait_for_selector("#preset-list[data-loaded='node']", state="attached")
        shown = page.evaluate("window.gridnodeUpload.presetsShown()")
        assert [name for name, _ in shown] == [*names, "poster"], shown
        assert [name for name, checked in shown if checked] == ["mp4-720p", "poster"], shown
        assert "player — A CMAF ladder and its storyboard" in page.inner_text("#preset-list")
        page.set_input_files("#file", str(clip))
        page.check('input[name="preset"][value="player"]')
        page.uncheck('input[name="preset"][value="mp4-720p"]')
        page.click("#submit")
        page.wait_for_selector("#result-section:not([hidden])", timeout=60_000)
        outputs = page.inner_text("#outputs")
        assert "stream" in outputs and "board" in outputs and "mp4-720p" not in outputs, outputs
        page.wait_for_function("document.getElementById('player').dataset.engine === 'hls.js'")
        assert errors.errors == [], errors.errors
