"""
Signed result URLs (gridnode/web/result_urls.py): the signer on an injected
clock, then a whole node's resource tree behind a real GridSite in memory (a
file: store, or a memory store standing for S3), with tokens minted by PyJWT.
The same in a real browser against a real node: tests/test_result_urls_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gridnode import keys
from gridnode.config import build_config
from gridnode.errors import GridnodeError
from gridnode.keyring import KeyringFile, parse_keyring
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.file import FileBackend
from gridnode.store.memory import MemoryBackend
from gridnode.uploads.store import UploadStore
from gridnode.web.access import redact_uri
from gridnode.web.api import api_root
from gridnode.web.result_urls import LEEWAY_SECONDS, ResultUrls, parse_signature, scope_of
from gridnode.web.upload import GridSite
from gridnode.web.view import NodeView
from tests.fakes import FakeMedia
from tests.test_access import ALICE, BOB, SECRET, MemoryNode, code
from tests.test_tus import Response, request_bytes

JOB = "01M877F0V44Q28FN0X7FCX8VXD"
OTHER_JOB = "01M877F0V44Q28FN0X7FCX8VXE"
K2 = "cXV1eGZvb2JhcmJhenF1eHF1dXhmb29iYXJiYXpxdXg="


class Now:
    """An injected clock for the signer."""

    def __init__(self, at: float = 1_764_067_200.0) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def ring(text: str) -> Any:
    parsed = parse_keyring(text.encode(), "test")
    return lambda: parsed


def refusal(fn: Any, *args: Any) -> str:
    """The code of the GridnodeError ``fn(*args)`` raises (every refusal here is a coded 403)."""
    with pytest.raises(GridnodeError) as e:
        fn(*args)
    assert e.value.status == 403, e.value
    return e.value.code


def split(url: str) -> tuple[str, str, str]:
    """(job, signature segment, name) of a signed URL."""
    _, _, job, segment, name = url.split("/", 4)
    return job, segment, name


class SignerTests:
    def test_plain_without_a_keyring(self) -> None:
        """A node with no keyring makes plain URLs, and refuses any signed one (it holds no key)."""
        urls = ResultUrls(None, 3600)
        assert urls.url(JOB, "mp4-720p.mp4") == f"/results/{JOB}/mp4-720p.mp4"
        assert refusal(urls.verify, JOB, "~1.k1." + "A" * 43, "mp4-720p.mp4") == "bad_signature"
        record = {"id": JOB, "outputs": [{"name": "a.mp4", "url": "/results/x/a.mp4"}]}
        assert urls.job_json(record) is record

    def test_valid_until_its_expiry(self) -> None:
        """A URL made now is valid for the ttl, the signature in one path segment before the name;
        at its expiry and after it, url_expired."""
        now = Now()
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, now)
        url = urls.url(JOB, "mp4-720p.mp4")
        job, segment, name = split(url)
        assert (job, name) == (JOB, "mp4-720p.mp4") and re.fullmatch(r"~\d+\.k1\.[A-Za-z0-9_-]{43}", segment)
        assert urls.verify(JOB, segment, name) == 3600
        now.at += 3599.5
        assert urls.verify(JOB, segment, name) == 1
        now.at += 0.5
        assert refusal(urls.verify, JOB, segment, name) == "url_expired"

    def test_fresh_on_every_read(self) -> None:
        """Each read signs anew: a later read's URL lives longer than an earlier one's."""
        now = Now()
        urls = ResultUrls(ring(f"k1 {SECRET}"), 60, now)
        first = urls.url(JOB, "a.mp4")
        now.at += 30
        second = urls.url(JOB, "a.mp4")
        assert first != second
        now.at += 45
        assert refusal(urls.verify, *split(first)) == "url_expired"
        assert urls.verify(*split(second)) == 15

    def test_one_job_one_scope(self) -> None:
        """A signature opens its own file only, or every file under its own top folder (hls/): not
        another job's, another output, a folder that merely starts the same, nor a file below a file."""
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now())
        _, mp4, _ = split(urls.url(JOB, "mp4-720p.mp4"))
        _, hls, _ = split(urls.url(JOB, "hls/master.m3u8"))
        assert urls.verify(JOB, hls, "hls/720p/seg_000.ts") == 3600
        for job, segment, name in [(OTHER_JOB, mp4, "mp4-720p.mp4"), (JOB, mp4, "poster.jpg"),
                                   (JOB, mp4, "mp4-720p.mp4/x"), (JOB, hls, "mp4-720p.mp4"),
                                   (JOB, hls, "hlsx/master.m3u8"), (JOB, hls, "hls"), (OTHER_JOB, hls, "hls/a.ts")]:
            assert refusal(urls.verify, job, segment, name) == "bad_signature", (job, name)
        assert scope_of("hls/720p/seg_000.ts") == "hls/" and scope_of("poster.jpg") == "poster.jpg"

    def test_tampering(self) -> None:
        """Any changed field is bad_signature: the expiry, the key id (another key of the ring, or one
        it does not hold), the MAC; an expiry moved into the past is not 'expired' but forged."""
        urls = ResultUrls(ring(f"k1 {SECRET}\nk2 {K2}"), 3600, Now())
        _, segment, name = split(urls.url(JOB, "a.mp4"))
        sig = parse_signature(segment)
        forged = [f"~{sig.expires + 1}.k1.{sig.mac}", f"~{sig.expires - 7200}.k1.{sig.mac}",
                  f"~{sig.expires}.k2.{sig.mac}", f"~{sig.expires}.k3.{sig.mac}",
                  f"~{sig.expires}.k1.{sig.mac[:-1]}{'A' if sig.mac[-1] != 'A' else 'B'}"]
        for segment in forged:
            assert refusal(urls.verify, JOB, segment, name) == "bad_signature", segment

    def test_key_rotation(self) -> None:
        """The kid in the URL picks the key: a URL signed with k1 stays valid while k1 is in the ring
        (k2 signing first), and ends when k1 is dropped."""
        now = Now()
        first = ResultUrls(ring(f"k1 {SECRET}"), 3600, now)
        old = split(first.url(JOB, "a.mp4"))
        rotated = ResultUrls(ring(f"k2 {K2}\nk1 {SECRET}"), 3600, now)
        new = split(rotated.url(JOB, "a.mp4"))
        assert ".k2." in new[1] and rotated.verify(*old) == 3600 and rotated.verify(*new) == 3600
        dropped = ResultUrls(ring(f"k2 {K2}"), 3600, now)
        assert refusal(dropped.verify, *old) == "bad_signature" and dropped.verify(*new) == 3600

    def test_an_expiry_too_far_ahead(self) -> None:
        """A real signature whose expiry lies further than this node's ttl (+ the pool's clock leeway)
        ahead is refused: a node given a shorter result-url-ttl cuts long-lived URLs short."""
        now = Now()
        generous = ResultUrls(ring(f"k1 {SECRET}"), 7 * 24 * 3600, now)
        url = split(generous.url(JOB, "a.mp4"))
        assert refusal(ResultUrls(ring(f"k1 {SECRET}"), 3600, now).verify, *url) == "bad_signature"
        skewed = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now(now.at + LEEWAY_SECONDS))
        assert skewed.verify(*split(ResultUrls(ring(f"k1 {SECRET}"), 3600, Now(now.at + 2 * LEEWAY_SECONDS))
                                    .url(JOB, "a.mp4"))) == 3600 + LEEWAY_SECONDS

    def test_derived_key(self) -> None:
        """The URL's MAC is keyed by a key derived for this purpose, not by the token secret itself,
        so no URL's MAC can stand for a token signature or the other way round."""
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now())
        _, segment, _ = split(urls.url(JOB, "a.mp4"))
        sig = parse_signature(segment)
        raw = hmac.new(SECRET.encode(), f"{JOB}\na.mp4\n{sig.expires}".encode(), hashlib.sha256).digest()
        assert base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != sig.mac

    @pytest.mark.parametrize("segment", [
        "~", "~.k1." + "A" * 43, "~abc.k1." + "A" * 43, "~-5.k1." + "A" * 43, "~+5.k1." + "A" * 43,
        "~05.k1." + "A" * 43, "~1e9.k1." + "A" * 43, "~1_000.k1." + "A" * 43, "~\u0661\u0662.k1." + "A" * 43,
        "~1234567890123.k1." + "A" * 43, "~5.." + "A" * 43, "~5.k1." + "A" * 42, "~5.k1." + "A" * 44,
        "~5.k1." + "A" * 42 + "=", "~5.k/1." + "A" * 43, "~5." + "k" * 65 + "." + "A" * 43,
        "~" + "9" * 100_000, "~5.k1." + "A" * 43 + "\n", " ~5.k1." + "A" * 43,
    ])
    def test_malformed(self, segment: str) -> None:
        """Anything not exactly ~DIGITS.KID.MAC43 (non-numeric, signed, padded or huge fields, an id
        no keyring holds) is bad_signature, cheaply, before any MAC is computed."""
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now())
        assert refusal(urls.verify, JOB, segment, "a.mp4") == "bad_signature"

    @given(st.text(max_size=200))
    def test_any_segment(self, text: str) -> None:
        """Whatever arrives, verify answers a coded 403 (never another error, never a pass)."""
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now())
        assert refusal(urls.verify, JOB, "~" + text, "a.mp4") in ("bad_signature", "url_expired")

    def test_job_json(self) -> None:
        """A reader's copy: each output's url signed now; the record itself unchanged; a name no key
        can hold keeps its plain URL; the listing's jobs likewise."""
        urls = ResultUrls(ring(f"k1 {SECRET}"), 3600, Now())
        outputs = [{"name": "hls/master.m3u8", "url": f"/results/{JOB}/hls/master.m3u8"},
                   {"name": "../x", "url": "/results/x/../x"}]
        record = {"id": JOB, "state": "done", "outputs": outputs}
        got = urls.job_json(record)
        assert got["outputs"][0]["url"].startswith(f"/results/{JOB}/~") and got["outputs"][1] == outputs[1]
        assert record["outputs"] is outputs and outputs[0]["url"] == f"/results/{JOB}/hls/master.m3u8"
        listed = urls.listing({"active": [], "recent": [record]})
        assert listed["recent"][0]["outputs"][0]["url"].endswith("/hls/master.m3u8")
        assert "/~" in listed["recent"][0]["outputs"][0]["url"]


# -- a whole node's HTTP side, in memory


class FakeS3(MemoryBackend):
    """The memory store with presigned URLs, as S3 makes them (local computation)."""

    url = "s3://bucket/prefix"

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        return f"https://bucket.s3.example.com/prefix/{key}?X-Amz-Expires={expires}&X-Amz-Signature=abc"


class SignedNode(MemoryNode):
    """`MemoryNode` (a token keyring, a real GridSite) on a chosen store, its result URLs on a clock."""

    def __init__(self, tmp_path: Path, backend: Any, ttl: int = 600, keyring: bool = True) -> None:
        clock = Clock()
        clock.advance(1_764_067_200)
        secrets = tmp_path / "tokens"
        secrets.write_text(f"k1 {SECRET}\n")
        cli: dict[str, Any] = {"work-dir": str(tmp_path / "work"), "workers": 2, "queue": 8, "min-free": 0,
                               "max-upload": 4, "result-url-ttl": ttl}
        if keyring:
            cli["upload-secret"] = str(secrets)
        config = build_config(cli=cli).with_identity("n1")
        self.clock = clock
        self.store = ObjectStore.synchronous(backend)
        self.media = FakeMedia(tmp_path)
        self.jobs = JobService(clock, config, self.store, self.media)
        uploads = UploadStore(clock, self.jobs, self.store, max_upload_bytes=config.max_upload_bytes)
        self.view = NodeView(config, self.store, self.jobs, uploads,
                             KeyringFile(str(secrets), "upload-secret") if keyring else None)
        self.view.result_urls.now = clock.seconds
        self.site = GridSite(self.view.cors.wrap(api_root(self.view)), clock, self.view.route_body,
                             self.view.extra_headers)

    def raw(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            data: bytes | None = None) -> bytes:
        """`MemoryNode.raw`, with a file's producer pumped: static.File streams through a pull producer,
        which twisted.web's channel would drive from the global reactor's cooperator."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data if data is not None else request_bytes(method, path, headers or {}, len(body)) + body)
        for _ in range(1000):  # bounded: a result here is a few bytes
            pull = getattr(getattr(channel._channel, "_requestProducer", None), "_producer", None)
            if pull is None:
                break
            pull.resumeProducing()
        answer = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        return bytes(answer)

    def done_job(self, headers: dict[str, str]) -> dict[str, Any]:
        job = self.upload(headers).json()["id"]
        self.media.hooks[job][0]()  # ffmpeg started
        self.media.finish(job)
        got = self.request("GET", f"/jobs/{job}", headers)
        assert got.json()["state"] == "done", got.text
        return dict(got.json())

    def put(self, job: str, name: str, data: bytes) -> None:
        self.store.backend.put_bytes(keys.output(job, name), data)


@pytest.fixture
def file_node(tmp_path: Path) -> SignedNode:
    return SignedNode(tmp_path, FileBackend(str(tmp_path / "store")))


def fetch(node: SignedNode, url: str, headers: dict[str, str] | None = None, method: str = "GET") -> Response:
    return node.request(method, urlsplit(url).path, headers or {})


HLS = {"hls/master.m3u8": b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000\n720p/index.m3u8\n",
       "hls/720p/index.m3u8": b"#EXTM3U\n#EXTINF:6.0,\nseg_000.ts\n#EXT-X-ENDLIST\n",
       "hls/720p/seg_000.ts": b"G" * 188}


def walk_hls(node: SignedNode, master: str) -> dict[str, Response]:
    """Every file an HLS player reaches from ``master``, each URL resolved as a browser resolves a
    relative one (RFC 3986), with no header: {url: answer}."""
    seen: dict[str, Response] = {}
    todo = [master]
    while todo and len(seen) < 10:
        url = todo.pop()
        seen[url] = answer = fetch(node, url)
        if url.endswith(".m3u8") and answer.status_code == 200:
            todo += [urljoin(url, line) for line in answer.text.splitlines() if line and not line.startswith("#")]
    return seen


class FileStoreTests:
    def test_plays_with_no_header(self, file_node: SignedNode) -> None:
        """The job's url, fetched with no header and no token: 200 and the bytes, ranges too, a private
        cache no longer than the URL lives; the job's JSON and the listing sign anew on every read,
        and the record in the store keeps the plain path."""
        job = file_node.done_job(ALICE)
        url = job["outputs"][0]["url"]
        assert url.startswith(f"/results/{job['id']}/~") and url.endswith("/video.mp4")
        r = fetch(file_node, url)
        assert r.status_code == 200 and r.content == b"converted" and r.headers["content-type"] == "video/mp4"
        assert r.headers["cache-control"] == "private, max-age=600, immutable"
        part = fetch(file_node, url, {"Range": "bytes=0-3"})
        assert part.status_code == 206 and part.content == b"conv"
        assert fetch(file_node, url, method="HEAD").status_code == 200
        file_node.clock.advance(1)
        again = file_node.request("GET", f"/jobs/{job['id']}", ALICE).json()["outputs"][0]["url"]
        listed = file_node.request("GET", "/jobs", ALICE).json()["jobs"][0]["outputs"][0]["url"]
        assert again != url and listed == again
        stored = json.loads(file_node.store.backend.get_bytes(keys.job_record(job["id"]))[0])
        assert stored["outputs"][0]["url"] == f"/results/{job['id']}/video.mp4"

    def test_events_carry_signed_urls(self, file_node: SignedNode) -> None:
        """The done event's job has signed URLs too."""
        job = file_node.done_job(ALICE)
        stream = file_node.raw("GET", f"/jobs/{job['id']}/events", ALICE)
        data = json.loads(stream.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        assert data["state"] == "done" and "/~" in data["outputs"][0]["url"]
        assert fetch(file_node, data["outputs"][0]["url"]).status_code == 200

    def test_a_replayed_answer_signs_its_urls(self, file_node: SignedNode) -> None:
        """The retry of a finished job's POST (same Idempotency-Key) answers its JSON as a read does:
        result URLs signed now, playable with no header."""
        keyed = {**ALICE, "Idempotency-Key": "clip-1"}
        job = file_node.upload(keyed).json()["id"]
        file_node.media.hooks[job][0]()
        file_node.media.finish(job)
        again = file_node.upload(keyed)
        assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
        url = again.json()["outputs"][0]["url"]
        assert again.json()["id"] == job and "/~" in url
        assert fetch(file_node, url).status_code == 200

    def test_expires(self, file_node: SignedNode) -> None:
        """Once its ttl has passed the URL answers 403 url_expired as JSON; a fresh read works."""
        job = file_node.done_job(ALICE)
        url = job["outputs"][0]["url"]
        file_node.clock.advance(600)
        r = fetch(file_node, url)
        assert code(r) == (403, "url_expired") and f"GET /jobs/{job['id']}" in r.json()["error"]["message"]
        fresh = file_node.request("GET", f"/jobs/{job['id']}", ALICE).json()["outputs"][0]["url"]
        assert fetch(file_node, fresh).status_code == 200

    def test_hostile(self, file_node: SignedNode) -> None:
        """With a real signature in hand: another job, another output, a walk out of the signed folder
        (plain or percent-encoded), a changed field, a huge path: each a coded 403 or 404, nothing
        served, the node answering afterwards. A token does not stand in for a bad signature."""
        job = file_node.done_job(ALICE)["id"]
        other = file_node.done_job(BOB)["id"]
        file_node.put(job, "poster.jpg", b"jpeg")
        for name, data in HLS.items():
            file_node.put(job, name, data)
        hls = file_node.view.result_urls.url(job, "hls/master.m3u8")
        mp4 = file_node.view.result_urls.url(job, "video.mp4")
        sig = hls.split("/")[3]
        cases = {
            mp4.replace(job, other): (403, "bad_signature"),
            mp4.replace("video.mp4", "poster.jpg"): (403, "bad_signature"),
            f"/results/{job}/{sig}/poster.jpg": (403, "bad_signature"),
            f"/results/{job}/{sig}/hls/../poster.jpg": (404, "not_found"),
            f"/results/{job}/{sig}/hls/%2E%2E/poster.jpg": (404, "not_found"),
            f"/results/{job}/{sig}/hls%2F..%2Fposter.jpg": (404, "not_found"),
            f"/results/{job}/{sig}/hls/": (404, "not_found"),
            f"/results/{job}/{sig}/hls/nothing.ts": (404, "not_found"),
            f"/results/{job}/{sig.replace('.k1.', '.k9.')}/hls/master.m3u8": (403, "bad_signature"),
            f"/results/{job}/~{'9' * 10000}/video.mp4": (403, "bad_signature"),
            f"/results/{job}/{sig}/hls/{'a' * 10000}.ts": (404, "not_found"),
            f"/results/{job}/%7E{sig[1:]}/hls/master.m3u8": (200, ""),
        }
        for url, expected in cases.items():
            assert code(fetch(file_node, url)) == expected, url[:200]
            assert code(fetch(file_node, url, BOB)) == expected, url[:200]
        assert fetch(file_node, f"/results/{job}/video.mp4", ALICE).status_code == 200  # the token route stays
        refused = file_node.jobs.metrics.registry.get_sample_value("gridnode_auth_refusals_total",
                                                                   {"code": "bad_signature"})
        assert refused == 2 * sum(1 for c in cases.values() if c[1] == "bad_signature")  # what operators watch

    def test_hls_from_relative_urls(self, file_node: SignedNode) -> None:
        """An HLS player starts at the master playlist's URL and follows its relative URLs: each
        inherits the signature (it sits in the path), so every playlist and segment answers 200."""
        job = file_node.done_job(ALICE)["id"]
        for name, data in HLS.items():
            file_node.put(job, name, data)
        seen = walk_hls(file_node, file_node.view.result_urls.url(job, "hls/master.m3u8"))
        statuses = {url: r.status_code for url, r in seen.items()}
        assert len(seen) == 3 and set(statuses.values()) == {200}, statuses
        assert any(r.content == HLS["hls/720p/seg_000.ts"] for r in seen.values())

    def test_without_a_keyring(self, tmp_path: Path) -> None:
        """A node with no keyring (the laptop) keeps plain URLs, and refuses a signed one."""
        node = SignedNode(tmp_path, FileBackend(str(tmp_path / "store")), keyring=False)
        job = node.done_job({})
        url = job["outputs"][0]["url"]
        assert url == f"/results/{job['id']}/video.mp4" and fetch(node, url).content == b"converted"
        assert code(fetch(node, f"/results/{job['id']}/~1.k1.{'A' * 43}/video.mp4")) == (403, "bad_signature")


class S3StoreTests:
    def test_media_redirects_playlists_pass(self, tmp_path: Path) -> None:
        """On S3 a signed URL's media file is a 302 to a presigned URL that lives no longer than the
        signed one has left; a playlist is passed on by the node (a redirect would lose the
        signature for its relative URLs), so an HLS player walks the whole ladder through the node."""
        node = SignedNode(tmp_path, FakeS3())
        job = node.done_job(ALICE)["id"]
        for name, data in HLS.items():
            node.put(job, name, data)
        node.clock.advance(100)
        url = node.view.result_urls.url(job, "video.mp4")
        node.clock.advance(200)
        r = fetch(node, url)
        assert r.status_code == 302 and r.headers["location"].endswith(
            f"/outputs/{job}/video.mp4?X-Amz-Expires=400&X-Amz-Signature=abc")
        seen = walk_hls(node, node.view.result_urls.url(job, "hls/master.m3u8"))
        playlists = {u: r for u, r in seen.items() if u.endswith(".m3u8")}
        assert len(playlists) == 2 and all(r.status_code == 200 and r.headers["content-type"] ==
                                           "application/vnd.apple.mpegurl" for r in playlists.values())
        segment = next(r for u, r in seen.items() if u.endswith(".ts"))
        assert segment.status_code == 302 and "/hls/720p/seg_000.ts?" in segment.headers["location"]
        node.clock.advance(600)
        assert code(fetch(node, url)) == (403, "url_expired")

    def test_oversized_playlist(self, tmp_path: Path) -> None:
        """A playlist larger than the node passes on is a coded 413, not a node's memory."""
        node = SignedNode(tmp_path, FakeS3())
        job = node.done_job(ALICE)["id"]
        node.put(job, "hls/master.m3u8", b"#" * (1024 * 1024 + 1))
        assert code(fetch(node, node.view.result_urls.url(job, "hls/master.m3u8"))) == (413, "too_large")


class LogTests:
    @pytest.mark.parametrize(("uri", "logged"), [
        (b"/results/J/~1764.k1.MAC-_x/mp4-720p.mp4", b"/results/J/~1764.k1.REDACTED/mp4-720p.mp4"),
        (b"/results/J/~1764.k.1.MAC/hls/720p/seg_000.ts?token=t", b"/results/J/~1764.k.1.REDACTED/hls/720p/seg_000.ts"
                                                                  b"?token=REDACTED"),
        (b"/results/J/%7E1764.k1.MAC/a.mp4", b"/results/J/%7E1764.k1.REDACTED/a.mp4"),
        (b"/results/J/a.mp4", b"/results/J/a.mp4"),
        (b"/jobs/J/~1.k1.MAC/x", b"/jobs/J/~1.k1.MAC/x"),
    ])
    def test_the_mac_is_not_logged(self, uri: bytes, logged: bytes) -> None:
        """The access log keeps a signed URL's expiry and key id, never its MAC (which opens the
        result to whoever reads the log)."""
        assert redact_uri(uri) == logged


class OptionTests:
    @pytest.mark.parametrize(("value", "ok"), [(None, 3600), (1, 1), ("90", 90), (604800, 604800), (0, None),
                                              (-5, None), (604801, None), ("1h", None), (1.5, None), (True, None)])
    def test_result_url_ttl(self, value: Any, ok: int | None) -> None:
        """--result-url-ttl: whole seconds from 1 to 7 days (an S3 presigned URL's longest life);
        anything else is one line naming the key."""
        cli = {} if value is None else {"result-url-ttl": value}
        if ok is None:
            with pytest.raises(GridnodeError) as e:
                build_config(cli=cli)
            assert e.value.code == "bad_config" and "result-url-ttl" in e.value.message
        else:
            assert build_config(cli=cli).result_url_ttl == ok
