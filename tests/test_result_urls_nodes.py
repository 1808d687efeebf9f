"""
Signed result URLs on a real node whose store is S3 (moto_server on loopback):
an HLS player (ffprobe) starts at the signed master URL with no header; the
node passes the playlists on itself, so their relative URLs keep the
signature, and redirects each segment to a presigned URL no longer-lived than
the signed one. The file: store's case is in tests/test_result_urls_browser.py.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port
from tests.media_samples import FFPROBE, Clips
from tests.nodes import NodeProcess
from tests.test_auth_nodes import K1, auth, call, done, error, mint

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

TTL = 120


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def head_of(url: str) -> tuple[int, dict[str, str]]:
    """(status, headers) of a GET that does not follow a redirect."""
    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


class SignedOnS3Tests:
    def test_hls_through_the_node(self, tmp_path: Path, s3_endpoint: str, s3_bucket: str,
                                  media_clips: Clips) -> None:
        """ffprobe reads the whole ladder from the signed master URL; playlists come from the node
        (200, the HLS type), segments and the mp4 as 302s to presigned URLs of at most the signed
        URL's remaining life; a changed signature is 403 bad_signature."""
        keyring = tmp_path / "tokens.keys"
        keyring.write_text(f"k1 {K1}\n")
        node = NodeProcess(tmp_path / "node", [
            "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint", s3_endpoint, "--min-free", "0",
            "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
            "--upload-secret", str(keyring), "--result-url-ttl", str(TTL)])
        node.start()
        try:
            base = node.block_until_ready(30.0)
            alice = auth(mint("alice", "upload read"))
            clip = media_clips.landscape
            status, _, body = call("POST", f"{base}/jobs?presets=mp4-480p,hls&name={clip.name}",
                                   {"Content-Type": "application/octet-stream", **alice}, clip.read_bytes())
            assert status == 201, body
            job = done(base, body["id"], alice)
            assert job["state"] == "done", job
            urls = {o["preset"]: base + o["url"] for o in job["outputs"]}

            probe = subprocess.run([FFPROBE, "-v", "error", "-show_entries", "format=format_name,duration",
                                    "-of", "json", urls["hls"]], capture_output=True, text=True, timeout=60)
            assert probe.returncode == 0, probe.stderr
            assert json.loads(probe.stdout)["format"]["format_name"] == "hls"

            status, head = head_of(urls["hls"])
            assert status == 200 and head["content-type"] == "application/vnd.apple.mpegurl"
            master = call("GET", urls["hls"])[2].decode()
            rung = urllib.parse.urljoin(urls["hls"], next(x for x in master.splitlines() if x and x[0] != "#"))
            playlist = call("GET", rung)[2].decode()
            segment = urllib.parse.urljoin(rung, next(x for x in playlist.splitlines() if x and x[0] != "#"))
            assert "/~" in segment
            for url in (segment, urls["mp4-480p"]):
                status, head = head_of(url)
                assert status == 302 and head["location"].startswith(s3_endpoint), (url, status)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(head["location"]).query)
                assert 0 < int(query["X-Amz-Expires"][0]) <= TTL, query
                assert call("GET", head["location"])[0] == 200
            sig = urls["mp4-480p"].split("/")[5]
            assert error(call("GET", urls["mp4-480p"].replace(sig, sig[:-2] + "AA"))) == (403, "bad_signature")
        finally:
            node.stop()
