"""
Signed result URLs on a real ``twistd -n gridnode`` node with a token keyring
(tokens minted by PyJWT), real ffmpeg: the URL from the job's JSON plays in
headless chromium (Debian's, via playwright) with no header and no token,
the HLS ladder plays in ffprobe (an HLS client resolving the playlists'
relative URLs), and the URL stops working once it expires.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium_page, needs_chromium, node_args
from tests.helpers import poll
from tests.media_samples import FFPROBE, Clips
from tests.nodes import NodeProcess
from tests.test_auth_nodes import K1, auth, call, done, error, mint

pytestmark = [pytest.mark.browser, pytest.mark.integration, needs_chromium]

#: seconds a result URL lives on this node: long enough to load a video, short enough to wait out
TTL = 20


def read_outputs(base: str, job: str, headers: dict[str, str]) -> dict[str, str]:
    """{preset: absolute URL} from the job's JSON, read now (each read signs anew)."""
    status, _, body = call("GET", f"{base}/jobs/{job}", headers)
    assert status == 200, body
    return {o["preset"]: base + o["url"] for o in body["outputs"]}


class SignedUrlTests:
    def test_plays_without_a_header_until_it_expires(self, tmp_path: Path, media_clips: Clips) -> None:
        """A page with no token (about:blank) puts the mp4 URL from the job's JSON in a plain
        <video src>: chromium loads and plays it, sending no Authorization header and no token. ffprobe
        reads the HLS master URL, following its relative URLs to rungs and segments. Once the URL's
        ttl has passed it answers 403 url_expired, and the same <video src> fails to load; a fresh
        read of the job gives a URL that works again. The access log never shows a URL's MAC."""
        keyring = tmp_path / "tokens.keys"
        keyring.write_text(f"k1 {K1}\n")
        node = NodeProcess(tmp_path / "node", node_args(tmp_path / "store", "--upload-secret", str(keyring),
                                                         "--result-url-ttl", str(TTL)))
        node.start()
        try:
            base = node.block_until_ready(20.0)
            token = mint("alice", "upload read")
            alice = auth(token)
            clip = media_clips.landscape
            status, _, body = call("POST", f"{base}/jobs?presets=mp4-720p,hls&name={clip.name}",
                                   {"Content-Type": "application/octet-stream", **alice}, clip.read_bytes())
            assert status == 201, body
            job = done(base, body["id"], alice)
            assert job["state"] == "done", job

            with chromium_page() as page:
                sent: list[tuple[str, str | None]] = []
                page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
                mp4 = read_outputs(base, job["id"], alice)["mp4-720p"]
                assert "/~" in mp4 and "token" not in mp4, mp4
                page.set_content(f'<video id="v" muted playsinline preload="auto" src="{mp4}"></video>')
                page.wait_for_function("document.getElementById('v').readyState >= 2")
                page.evaluate("document.getElementById('v').play()")
                page.wait_for_function("document.getElementById('v').currentTime > 0")
                assert page.evaluate("document.getElementById('v').videoWidth") == 640
                loads = [(url, auth_) for url, auth_ in sent if url.startswith(base)]
                assert loads and all(url == mp4 and auth_ is None for url, auth_ in loads), loads

                hls = read_outputs(base, job["id"], alice)["hls"]
                probe = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "format=format_name,duration",
                                        "-of", "json", hls], capture_output=True, text=True, timeout=60)
                assert probe.returncode == 0, probe.stderr
                fmt = json.loads(probe.stdout)["format"]
                assert fmt["format_name"] == "hls" and float(fmt["duration"]) > 3, fmt

                def expired() -> Any:
                    answer = error(call("GET", mp4))
                    return answer if answer != (200, "") else None

                assert poll(expired, TTL + 30, "the URL to expire", interval=0.5) == (403, "url_expired")

            with chromium_page() as page:  # a browser that has not cached it
                page.set_content(f'<video id="w" muted preload="auto" src="{mp4}"></video>')
                page.wait_for_function("document.getElementById('w').error !== null")
                assert page.evaluate("document.getElementById('w').readyState") == 0

            fresh = read_outputs(base, job["id"], alice)["mp4-720p"]
            assert fresh != mp4 and call("GET", fresh)[0] == 200
            elsewhere = fresh.replace(job["id"], body["id"][:-1] + ("0" if body["id"][-1] != "0" else "1"))
            assert error(call("GET", elsewhere)) == (403, "bad_signature")
            log = node.text()
            assert token not in log and urllib.parse.quote(token) not in log
            mac = mp4.split("/")[5].rsplit(".", 1)[1]
            assert mac not in log and ".k1.REDACTED/mp4-720p.mp4" in log
        finally:
            node.stop()
