"""
The upload page and the status page in a real browser (Debian's chromium via
playwright) against real ``twistd -n gridnode`` nodes and real ffmpeg.

Screenshots go to the test's tmp_path (upload.png, upload-phone.png,
status.png, status-phone.png) for a person to look at.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import PageErrors, chromium_page, needs_chromium, node_args
from tests.helpers import free_port, poll
from tests.media_samples import FFMPEG, Clips, lavfi_audio, lavfi_video
from tests.nodes import NodeProcess, get_json, request, upload

pytestmark = [pytest.mark.browser, pytest.mark.integration, needs_chromium]

#: records every value the page's meters and job line take, from the first paint on
RECORDER = """
window.__seen = {upload: [], convert: [], states: []};
document.addEventListener("DOMContentLoaded", function () {
  function track(id, list, read) {
    var el = document.getElementById(id);
    new MutationObserver(function () {
      var v = read(el);
      if (list[list.length - 1] !== v) list.push(v);
    }).observe(el, {attributes: true, childList: true, characterData: true, subtree: true});
  }
  track("upload-percent", window.__seen.upload, function (el) { return Number(el.dataset.value); });
  track("convert-percent", window.__seen.convert, function (el) { return Number(el.dataset.value); });
  track("job-state", window.__seen.states, function (el) { return el.textContent.split(": ").pop(); });
});
"""


def fetch(url: str, method: str = "GET") -> tuple[int, str, int]:
    """(status, content type, body length) of a blocking request."""
    req = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("content-type", ""), len(r.read())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path / "node", node_args(tmp_path / "store"))
    n.start()
    try:
        n.block_until_ready(20.0)
        yield n
    finally:
        n.stop()


def submit_on_page(page: Any, clip: Path, presets: list[str]) -> None:
    page.wait_for_function("document.getElementById('node-info').textContent.indexOf('chosen:') >= 0")
    page.wait_for_selector("#preset-list[data-loaded]", state="attached")  # GET /presets answered (or not)
    page.set_input_files("#file", str(clip))
    for box in page.query_selector_all('input[name="preset"]:not([disabled])'):
        value = box.get_attribute("value")
        if (value in presets) != box.is_checked():
            box.click()
    page.click("#submit")


def registry_with_idle_gone(dead: str) -> Callable[[Any], None]:
    """A nodes.json route: the real nodes made busy, and a node "gone" at ``dead`` listed idle."""

    def nodes_json(route: Any) -> None:
        doc = json.loads(route.fetch().text())
        for n in doc["nodes"]:
            n["load"] = {**n.get("load", {}), "running": 2, "workers": 2}
        doc["nodes"].insert(0, {"id": "gone", "http_url": dead, "heartbeat": time.time(),
                                "load": {"running": 0, "queued": 0, "workers": 2}})
        route.fulfill(status=200, content_type="application/json", body=json.dumps(doc))

    return nodes_json


def check_result(page: Any, base: str) -> dict[str, Any]:
    """The result <video> plays from the node: its <source> and poster answer 200."""
    page.wait_for_selector("#result-section:not([hidden])", timeout=40_000)
    seen: dict[str, Any] = page.evaluate("window.__seen")
    assert seen["upload"] and seen["upload"][-1] == 100, seen
    assert seen["convert"][-1] == 100 and any(0 < v for v in seen["convert"]), seen
    assert seen["states"][-1] == "done", seen
    assert page.is_hidden("#error"), page.inner_text("#error")

    src = page.get_attribute("#player source", "src")
    poster = page.get_attribute("#player", "poster")
    # (with a token, a node's result URL carries it as ?token=: a <video> sends no header)
    assert src and src.startswith(f"{base}/results/") and src.split("?")[0].endswith("/mp4-720p.mp4"), src
    assert poster and poster.startswith(f"{base}/results/") and poster.split("?")[0].endswith("/poster.jpg"), poster
    status, ctype, size = fetch(src)
    assert (status, ctype) == (200, "video/mp4") and size > 0
    status, ctype, size = fetch(poster)
    assert (status, ctype) == (200, "image/jpeg") and size > 0
    # The browser itself decodes the output (Debian's chromium plays H.264 through the system ffmpeg).
    page.wait_for_function("document.getElementById('player').readyState >= 1")
    width = page.evaluate("document.getElementById('player').videoWidth")
    assert width == 640, width  # never upscaled
    return seen


class UploadPageTests:
    @pytest.mark.parametrize("transport", ["tus", "post"])
    def test_upload_convert_and_play(self, node: NodeProcess, media_clips: Clips, tmp_path: Path,
                                     transport: str) -> None:
        """Upload with a progress bar, watch the conversion, get a playable result with a poster.
        ``post``: the node's OPTIONS /files/ answers no Tus-Version (as before tus was mounted)."""
        base = node.url
        with chromium_page() as page:
            errors = PageErrors(page)
            page.add_init_script(RECORDER)
            if transport == "post":
                page.route(f"{base}/files/", lambda route: route.fulfill(status=404, body="")
                           if route.request.method == "OPTIONS" else route.continue_())
            page.goto(f"{base}/")
            submit_on_page(page, media_clips.landscape, ["mp4-720p", "webm-480p"])
            seen = check_result(page, base)
            log = page.inner_text("#log")
            assert ("(resumable, tus)" if transport == "tus" else "(POST /jobs)") in log, log
            links = [a.get_attribute("href") for a in page.query_selector_all("#outputs a")]
            assert sorted(str(h).rsplit("/", 1)[-1] for h in links) == ["mp4-720p.mp4", "poster.jpg",
                                                                      "webm-480p.webm"], links
            page.screenshot(path=str(tmp_path / f"upload-{transport}.png"), full_page=True)
            if transport == "tus":
                page.set_viewport_size({"width": 390, "height": 844})
                page.screenshot(path=str(tmp_path / "upload-phone.png"), full_page=True)
                # nothing is wider than a phone's screen
                assert page.evaluate("document.documentElement.scrollWidth") <= 390
            # In "post" mode the routed OPTIONS /files/ answers 404, which the console reports.
            expected = [e for e in errors.errors if transport == "post" and "status of 404" in e]
            assert errors.errors == expected[:1], errors.errors
        job_id = str(links[0]).split("/results/", 1)[1].split("/", 1)[0]
        _, job = get_json(f"{base}/jobs/{job_id}")
        assert job["state"] == "done" and set(job["presets"]) == {"mp4-720p", "webm-480p", "poster"}, job
        assert seen["states"], seen
        # The page sent an Idempotency-Key with the upload (one per file): its entry names the job.
        entries = list((tmp_path / "store" / "idempotency").iterdir())
        assert [json.loads(e.read_bytes())["target"] for e in entries] == [job_id], entries

    def test_moves_to_another_node(self, node: NodeProcess, media_clips: Clips, tmp_path: Path) -> None:
        """The registry lists a node that looks idler, and its /health says so too, but its upload
        endpoint is dead: the page tries it, fails, uploads to the live one."""
        base = node.url
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

        def gone_health(route: Any) -> None:
            route.fulfill(status=200, content_type="application/json", headers={"Access-Control-Allow-Origin": "*"},
                          body=json.dumps({"node": "gone", "state": "ok", "running": 0, "queued": 0, "workers": 2}))

        def busy_health(route: Any) -> None:  # the live node says it is busier, so no tie
            doc = json.loads(route.fetch().text())
            route.fulfill(status=200, content_type="application/json", body=json.dumps({**doc, "running": 2}))

        with chromium_page() as page:
            page.add_init_script(RECORDER)
            page.route(f"{base}/registry/nodes.json", registry_with_idle_gone(dead))
            page.route(f"{dead}/health", gone_health)
            page.route(f"{base}/health", busy_health)
            page.goto(f"{base}/")
            page.wait_for_function("document.getElementById('node-info').textContent.indexOf('chosen:') >= 0")
            assert "node gone" in page.inner_text("#node-info")  # the power of two choices took the idler one
            submit_on_page(page, media_clips.landscape, ["mp4-720p"])
            check_result(page, base)
            log = page.inner_text("#log")
            assert "Node gone failed" in log and "Moving to node" in log, log

    def test_live_check_passes_a_node_that_does_not_answer(self, node: NodeProcess, media_clips: Clips,
                                                          tmp_path: Path) -> None:
        """The registry says a dead node is idler, but it does not answer its health check: the page
        uploads to the live node without trying the dead one."""
        base = node.url
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there

        with chromium_page() as page:
            page.add_init_script(RECORDER)
            page.route(f"{base}/registry/nodes.json", registry_with_idle_gone(dead))
            page.goto(f"{base}/")
            page.wait_for_function("document.getElementById('node-info').textContent.indexOf('chosen:') >= 0")
            submit_on_page(page, media_clips.landscape, ["mp4-720p"])
            check_result(page, base)
            log = page.inner_text("#log")
            assert "Uploading to" in log and "gone" not in log, log

    def test_hls_result_plays_through_hls_js_to_its_end(self, node: NodeProcess, media_clips: Clips) -> None:
        """An HLS ladder is played with the vendored hls.js (chromium has Media Source Extensions),
        loaded only then, from the first segment to the end of the last."""
        with chromium_page() as page:
            errors = PageErrors(page)
            page.goto(f"{node.url}/")
            assert page.evaluate("typeof window.Hls") == "undefined"  # not loaded up front
            submit_on_page(page, media_clips.landscape, ["hls", "poster"])
            page.wait_for_selector("#result-section:not([hidden])", timeout=40_000)
            page.wait_for_function("document.getElementById('player').dataset.engine === 'hls.js'")
            page.evaluate("() => { const p = document.getElementById('player'); p.muted = true; p.play(); }")
            page.wait_for_function("document.getElementById('player').ended", timeout=30_000)
            played = page.evaluate("""() => {
              const p = document.getElementById('player');
              const ranges = [];
              for (let i = 0; i < p.played.length; i++) ranges.push([p.played.start(i), p.played.end(i)]);
              return {ranges: ranges, duration: p.duration, hls_loaded: typeof window.Hls === "function"};
            }""")
            assert played["hls_loaded"]
            assert abs(played["duration"] - 4.0) < 0.3, played
            start, end = played["ranges"][0][0], played["ranges"][-1][1]
            assert start < 0.2 and end > played["duration"] - 0.2, played
            assert errors.errors == [], errors.errors

    def test_page_chooses_by_expected_wait_and_draws_by_speed(self, node: NodeProcess) -> None:
        """The page's rule is the command line client's: a fast node with a job beats an idle slow
        one (it would finish a new job sooner), a node twice as fast is drawn more often than
        a uniform draw would (0.7 of choices among one 2x and three 1x idle nodes, against 0.5), and
        a node's queued low work is left out for the page's normal jobs."""
        with chromium_page() as page:
            errors = PageErrors(page)
            page.goto(f"{node.url}/")
            page.wait_for_function("window.gridnodeUpload !== undefined")
            picks = page.evaluate("""() => {
              const up = window.gridnodeUpload;
              const fast = {id: "fast", load: {running: 1, queued: 0, workers: 2, work: 60, speed: 4}};
              const slow = {id: "slow", load: {running: 0, queued: 0, workers: 2, work: 0, speed: 0.25}};
              const pair = [];
              for (let k = 0; k < 50; k++) pair.push(up.chooseNode([slow, fast], new Set()).id);
              const idle = (id, speed) => ({id: id, load: {running: 0, queued: 0, workers: 2, work: 0, speed: speed}});
              const four = [idle("a", 1), idle("b", 1), idle("c", 1), idle("fast", 2)];
              let fastChosen = 0;
              for (let k = 0; k < 1000; k++) if (up.chooseNode(four, new Set()).id === "fast") fastChosen += 1;
              // the page's jobs are normal: queued low work waits behind them (as priority.seen_by)
              const lows = {id: "lows", load: {running: 2, queued: 8, workers: 2, work: 580, speed: 1,
                                                queued_high: 0, queued_normal: 0, queued_low: 8, work_low: 480}};
              const normals = {id: "normals", load: {running: 2, queued: 2, workers: 2, work: 220, speed: 1,
                                                     queued_high: 0, queued_normal: 2, queued_low: 0, work_low: 0}};
              const byPriority = [];
              for (let k = 0; k < 20; k++) byPriority.push(up.chooseNode([normals, lows], new Set()).id);
              return {pair: pair, fastShare: fastChosen / 1000, byPriority: byPriority};
            }""")
            assert set(picks["pair"]) == {"fast"}, picks["pair"]
            assert set(picks["byPriority"]) == {"lows"}, picks["byPriority"]
            assert 0.6 < picks["fastShare"] < 0.8, picks["fastShare"]
            assert errors.errors == []

    def test_coded_error_is_shown(self, node: NodeProcess, media_clips: Clips, tmp_path: Path) -> None:
        """A file that is not a video: the node's error code and message appear in the alert."""
        with chromium_page() as page:
            page.goto(f"{node.url}/")
            submit_on_page(page, media_clips.random, ["mp4-720p"])
            page.wait_for_selector("#error:not([hidden])", timeout=30_000)
            assert page.inner_text("#error-code") == "not_a_video", page.inner_text("#error")
            assert page.inner_text("#error-message").strip()
            assert page.is_hidden("#result-section")
            page.screenshot(path=str(tmp_path / "upload-error.png"), full_page=True)


K1 = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="


def mint(sub: str, scope: str) -> str:
    """A token as the application that links to the page mints it (PyJWT)."""
    import jwt

    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time()) + 600}, K1, algorithm="HS256",
                      headers={"kid": "k1"})


class TokenPageTests:
    def test_token_in_the_fragment(self, tmp_path: Path, media_clips: Clips) -> None:
        """A pool with a token keyring: the application links to /#token=JWT. The page drops the token
        from the address bar, uploads (tus) with it as a bearer header, follows and plays the result;
        ?token= appears only on /events and /results, and the node's log never shows the token. The
        status page takes its token the same way. Without a token the page shows unauthorized."""
        keyring = tmp_path / "tokens.keys"
        keyring.write_text(f"k1 {K1}\n")
        node = NodeProcess(tmp_path / "node", node_args(tmp_path / "store", "--upload-secret", str(keyring)))
        node.start()
        try:
            base = node.block_until_ready(20.0)
            token = mint("alice", "upload read")
            with chromium_page() as page:
                errors = PageErrors(page)
                sent: list[tuple[str, str, str | None]] = []
                page.on("request", lambda r: sent.append((r.method, r.url, r.headers.get("authorization"))))
                page.add_init_script(RECORDER)
                page.goto(f"{base}/#token={token}")
                page.wait_for_function("location.hash === ''")
                submit_on_page(page, media_clips.landscape, ["mp4-720p"])
                check_result(page, base)
                assert "(resumable, tus)" in page.inner_text("#log")
                assert errors.errors == [], errors.errors
            in_urls = {urllib.parse.urlsplit(url).path.split("/")[1] + ("/events" if url.split("?")[0].endswith(
                "/events") else "") for _, url, _ in sent if token in url}
            assert in_urls and in_urls <= {"jobs/events", "results"}, in_urls
            tus = [auth for method, url, auth in sent if "/files/" in url and method in ("POST", "PATCH")]
            assert tus and all(auth == f"Bearer {token}" for auth in tus), tus
            assert token not in node.text() and "token=REDACTED" in node.text()

            with chromium_page() as page:
                page.goto(f"{base}/status#token={mint('ops-team', 'ops read')}")
                page.wait_for_function("document.querySelectorAll('#members tbody tr').length === 1")
                page.wait_for_selector('#jobs tr[data-job], #jobs-empty:not([hidden])')
                assert page.is_hidden("#error"), page.inner_text("#error")

            with chromium_page() as page:
                page.goto(f"{base}/")
                submit_on_page(page, media_clips.landscape, ["mp4-720p"])
                page.wait_for_selector("#error:not([hidden])", timeout=30_000)
                assert page.inner_text("#error-code") == "unauthorized", page.inner_text("#error")
        finally:
            node.stop()


def make_long_clip(folder: Path) -> Path:
    """30 s of 1280x720: long enough to watch its conversion rise on the status page."""
    clip = folder / "long-720p.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *lavfi_video("1280x720", 30), *lavfi_audio(30),
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(clip)], check=True, timeout=60)
    return clip


def alive_peers(base: str) -> int:
    _, doc = get_json(f"{base}/peers", timeout=5)
    return sum(1 for p in doc["peers"] if p["state"] == "alive")


class StatusPageTests:
    def test_members_and_live_progress(self, tmp_path: Path, media_clips: Clips) -> None:
        """Three members with their state, and a running job's progress rising on the page."""
        clip = make_long_clip(tmp_path)
        store = tmp_path / "store"
        nodes = [NodeProcess(tmp_path / f"n{i}", node_args(store, "--node-id", f"n{i}", "--heartbeat", "1"))
                 for i in range(3)]
        job_id = ""
        try:
            for n in nodes:
                n.start()
            for n in nodes:
                n.block_until_ready(20.0)
            base = nodes[0].url
            poll(lambda: all(alive_peers(n.url) == 3 for n in nodes), 60, "3 alive members everywhere")
            poll(lambda: len(get_json(f"{base}/registry/nodes.json", timeout=5)[1].get("nodes", [])) == 3, 60,
                 "3 nodes in nodes.json")
            status, _, job = upload(base, clip, presets="mp4-720p")
            assert status == 201, job
            job_id = job["id"]

            with chromium_page() as page:
                errors = PageErrors(page)
                page.goto(f"{base}/status")
                page.wait_for_function(
                    "document.querySelectorAll('#members tbody tr').length === 3 && "
                    "Array.from(document.querySelectorAll('#members tbody tr .state'))"
                    ".every(function (td) { return td.textContent === 'alive'; })")
                names = sorted(str(r.get_attribute("data-node")) for r in page.query_selector_all("#members tbody tr"))
                assert names == ["n0", "n1", "n2"], names

                percent = f'#jobs tr[data-job="{job_id}"] .percent'
                page.wait_for_selector(percent, timeout=60_000)

                def shown() -> int:
                    return int(page.get_attribute(percent, "data-value") or "0")

                first = poll(lambda: shown() > 0 and shown(), 60, "conversion progress above 0 %")
                later = poll(lambda: shown() > first and shown(), 60, f"conversion progress above {first} %")
                assert 0 < first < later <= 100
                assert "transcoding" in page.inner_text(f'#jobs tr[data-job="{job_id}"]')
                # this node's row shows its live load (its /health), not nodes.json's heartbeat-old one
                own = [c.inner_text() for c in page.query_selector_all('#members tr[data-node="n0"] td')]
                assert own[2] == "1" and "(heartbeat)" not in own[5], own
                other = [c.inner_text() for c in page.query_selector_all('#members tr[data-node="n1"] td')]
                assert "(heartbeat)" in other[5], other
                page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
                page.set_viewport_size({"width": 390, "height": 844})
                page.screenshot(path=str(tmp_path / "status-phone.png"), full_page=True)
                assert errors.errors == [], errors.errors
        finally:
            if job_id:  # a running job would hold up the nodes' shutdown
                request("DELETE", f"{nodes[0].url}/jobs/{job_id}", timeout=10)
            for n in nodes:
                n.stop()
