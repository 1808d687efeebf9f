"""
Authorization on real ``twistd -n gridnode`` nodes, tried as an attacker would: tenants alice
and bob with tokens minted by PyJWT (not gridnode's code), real ffmpeg, a ``file:`` store; and a
pool of three moving its token and peer keys from k1 to k2 one node at a time.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gridnode.keyring import RELOAD_SECONDS
from tests.helpers import free_port, poll
from tests.media_samples import Clips
from tests.nodes import BIN, NodeProcess, request

pytestmark = pytest.mark.integration

K1 = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="
K2 = "7Q0f3cX0nOa2y7mJ0w8rS6uY4hB1vK9dE5tZ2pL3qM8="
TUS = {"Tus-Resumable": "1.0.0"}


#: a test token's life: modules mint theirs at import, and the suite runs for longer than 10 minutes
TTL = 4 * 3600


def mint(sub: str, scope: str, ttl: float = TTL, secret: str = K1, kid: str = "k1") -> str:
    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time() + ttl)}, secret, algorithm="HS256",
                      headers={"kid": kid})


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
         ) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw bytes)."""
    status, head, data = request(method, url, body, headers or {}, timeout=30)
    try:
        return status, head, json.loads(data)
    except ValueError:
        return status, head, data


def error(answer: tuple[int, dict[str, str], Any]) -> tuple[int, str]:
    status, _, body = answer
    return status, body["error"]["code"] if isinstance(body, dict) and "error" in body else ""


def post_clip(base: str, clip: Path, headers: dict[str, str], path: str = "/jobs") -> tuple[int, dict[str, str], Any]:
    return call("POST", f"{base}{path}?presets=poster&name={clip.name}",
                {"Content-Type": "application/octet-stream", **headers}, clip.read_bytes())


def done(base: str, job: str, headers: dict[str, str]) -> dict[str, Any]:
    def finished() -> Any:
        status, _, body = call("GET", f"{base}/jobs/{job}", headers)
        return body if status == 200 and body["state"] in ("done", "failed", "cancelled") else None

    body: dict[str, Any] = poll(finished, 120, f"job {job} to end")
    return body


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    keyring = tmp_path / "tokens.keys"
    keyring.write_text(f"# the pool's token keys\nk1 {K1}\n")  # ends in a newline
    n = NodeProcess(tmp_path / "node", ["--store", f"file:{tmp_path / 'store'}", "--min-free", "0",
                                        "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--upload-secret", str(keyring)])
    n.start()
    try:
        n.block_until_ready(30)
        yield n
    finally:
        n.stop()


class TenantTests:
    def test_alice_and_bob(self, node: NodeProcess, media_clips: Clips) -> None:
        """bob cannot list, read, watch, download or cancel alice's job, nor HEAD/PATCH/DELETE her tus
        upload (404 each); no token 401; read-only cannot cancel (403); expired 401 token_expired; admin
        sees both; ?token= on /events and /results works and the access log never shows it."""
        base = node.url
        alice, bob = auth(mint("alice", "upload read cancel")), auth(mint("bob", "upload read cancel"))
        status, _, body = post_clip(base, media_clips.portrait, alice)
        assert status == 201, body
        job = body["id"]
        status, _, theirs = post_clip(base, media_clips.portrait, bob)
        assert status == 201, theirs
        finished = done(base, job, alice)
        assert finished["state"] == "done" and finished["tenant"] == "alice", finished
        result = f"/results/{job}/poster.jpg"

        for method, path in [("GET", f"/jobs/{job}"), ("GET", f"/jobs/{job}/events"), ("GET", result),
                             ("DELETE", f"/jobs/{job}")]:
            assert error(call(method, base + path, bob)) == (404, "not_found"), path
            assert error(call(method, base + path)) == (401, "unauthorized"), path
        listing = call("GET", f"{base}/jobs", bob)[2]
        assert job not in json.dumps(listing) and theirs["id"] in json.dumps(listing)
        admin = call("GET", f"{base}/jobs", auth(mint("ops-team", "admin")))[2]
        assert job in json.dumps(admin) and theirs["id"] in json.dumps(admin)
        assert error(call("DELETE", f"{base}/jobs/{theirs['id']}", auth(mint("bob", "read")))) == (403, "forbidden")
        expired = auth(mint("alice", "read", ttl=-3600))
        assert error(call("GET", f"{base}/jobs/{job}", expired)) == (401, "token_expired")

        status, head, poster = call("GET", base + result, alice)
        assert status == 200 and head["content-type"] == "image/jpeg" and "private" in head["cache-control"]
        token = alice["Authorization"].split()[1]
        status, _, again = call("GET", f"{base}{result}?token={urllib.parse.quote(token)}")
        assert status == 200 and again == poster
        status, head, events = call("GET", f"{base}/jobs/{job}/events?token={token}")
        assert status == 200 and b"event: done" in events
        assert error(call("GET", f"{base}/jobs/{job}?token={token}")) == (401, "unauthorized")

        # tus: alice's upload is hers alone
        status, head, _ = call("POST", f"{base}/files/", {**TUS, **alice, "Upload-Length": "100"})
        assert status == 201
        upload = head["location"]
        stream = {**TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
        assert call("HEAD", base + upload, {**TUS, **bob})[0] == 404
        assert error(call("PATCH", base + upload, {**stream, **bob}, b"x" * 10)) == (404, "not_found")
        assert error(call("DELETE", base + upload, {**TUS, **bob})) == (404, "not_found")
        assert call("HEAD", base + upload, {**TUS, **alice})[1]["upload-offset"] == "0"
        assert call("DELETE", base + upload, {**TUS, **alice})[0] == 204

        # the access log has a line for each ?token= request, and no token in it
        log = node.text()
        assert "?token=REDACTED" in log and token not in log and token[:40] not in log

    def test_ops_and_hostile_paths(self, node: NodeProcess) -> None:
        """/metrics with an ops token is Prometheus text (GET alone); without one 401; POST /%6Aobs is a coded error
        (401 without a token, 422 not_a_video with one), never a 500; the node stays healthy."""
        base = node.url
        assert error(call("GET", f"{base}/metrics")) == (401, "unauthorized")
        status, _, text = call("GET", f"{base}/metrics", auth(mint("prometheus", "ops")))
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text)}
        assert any(n.startswith("gridnode_") for n in names), names
        for method in ("POST", "DELETE"):  # the exposition's WSGI app would answer any method
            assert error(call(method, f"{base}/metrics", auth(mint("prometheus", "ops")))) == (
                405, "method_not_allowed")
        assert call("GET", f"{base}/peers", auth(mint("prometheus", "ops")))[0] == 200
        assert error(call("GET", f"{base}/peers", auth(mint("alice", "read")))) == (403, "forbidden")
        hostile = {"Content-Type": "application/octet-stream"}
        assert error(call("POST", f"{base}/%6Aobs", hostile, b"not a video")) == (401, "unauthorized")
        uploader = auth(mint("alice", "upload"))
        assert error(call("POST", f"{base}/%6Aobs", {**hostile, **uploader}, b"not a video")) == (422, "not_a_video")
        assert error(call("POST", f"{base}/jobs", {**hostile, **auth(mint("a", "upload", secret=K2))}, b"x")) == (
            401, "unauthorized")
        assert call("GET", f"{base}/health")[0] == 200
        assert "Traceback" not in node.text()


def gridnode(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "gridnode"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


class CommandLineTests:
    def test_token_and_upload(self, node: NodeProcess, media_clips: Clips, tmp_path: Path) -> None:
        """`gridnode token` mints from the keyring file; `gridnode upload --token` uploads, follows and
        fetches with it; without one the client stops with one line saying unauthorized."""
        minted = gridnode("token", "--secret-file", str(tmp_path / "tokens.keys"), "--sub", "carol",
                          "--scope", "upload read", "--ttl", "10m", cwd=tmp_path)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert jwt.decode(token, K1, algorithms=["HS256"])["sub"] == "carol"
        refused = gridnode("upload", str(media_clips.portrait), "--node", node.url, "--preset", "poster",
                           cwd=tmp_path)
        assert refused.returncode == 1 and "unauthorized" in refused.stderr, refused.stderr
        out = gridnode("upload", str(media_clips.portrait), "--node", node.url, "--preset", "poster",
                       "--token", token, "--output", str(tmp_path / "out"), "--json", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert list((tmp_path / "out").rglob("poster.jpg")), out.stdout
        assert token not in node.text()


def ring(path: Path, *keys: str) -> None:
    """Replace a keyring file at once (write, then rename), as docs/operations.md says to."""
    text = "".join(f"{kid} {dict(k1=K1, k2=K2)[kid]}\n" for kid in keys)
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


class RotationTests:
    def test_a_pool_moves_to_a_new_key_node_by_node(self, tmp_path: Path, media_clips: Clips) -> None:
        """Three nodes move their token and peer keys from k1 to k2 one node at a time (add k2 second,
        move it first, drop k1): uploads with a token of the key in use succeed on every node at every
        step, no peer message fails its MAC, and no peer is ever seen anything but alive."""
        store = tmp_path / "store"
        names = ["r0", "r1", "r2"]
        files: dict[str, tuple[Path, Path]] = {}
        nodes: dict[str, NodeProcess] = {}
        for name in names:
            folder = tmp_path / name
            folder.mkdir()
            files[name] = (folder / "tokens.keys", folder / "peer.keys")
            for f in files[name]:
                ring(f, "k1")
            nodes[name] = NodeProcess(folder, [
                "--store", f"file:{store}", "--node-id", name, "--heartbeat", "1", "--min-free", "0",
                "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
                "--upload-secret", str(files[name][0]), "--secret-file", str(files[name][1])])
        for n in nodes.values():
            n.start()
        ops = {"k1": auth(mint("ops", "ops")), "k2": auth(mint("ops", "ops", secret=K2, kid="k2"))}
        seen_states: set[str] = set()

        def views(key: str) -> list[dict[str, Any]]:
            out = []
            for n in nodes.values():
                status, _, view = call("GET", n.url + "/peers", ops[key])
                assert status == 200, view
                seen_states.update(p["state"] for p in view["peers"])
                out.append(view)
            return out

        def uploads_pass(where: Any, *keys: str) -> None:
            for key in keys:
                uploader = auth(mint("alice", "upload", secret=dict(k1=K1, k2=K2)[key], kid=key))
                for n in where:
                    status, _, body = post_clip(n.url, media_clips.portrait, uploader)
                    assert status == 201, (n.url, key, body)

        try:
            for n in nodes.values():
                n.block_until_ready(30)
            poll(lambda: all(len(v["peers"]) == 3 and {p["state"] for p in v["peers"]} == {"alive"}
                             for v in views("k1")), 30, "three alive nodes")
            seen_states.clear()  # from here on, nobody may be anything but alive
            uploads_pass(nodes.values(), "k1")
            # (the ring, the token keys valid while nodes differ, those valid once all read it, ops key)
            steps = [(("k1", "k2"), ("k1",), ("k1", "k2"), "k1"), (("k2", "k1"), ("k1", "k2"), ("k1", "k2"), "k2"),
                     (("k2",), ("k2",), ("k2",), "k2")]
            for keys, meanwhile, after, ops_key in steps:
                for name in names:  # one node at a time
                    for f in files[name]:
                        ring(f, *keys)
                    uploads_pass([nodes[name]], *meanwhile)
                    views(ops_key)
                # Every node has read its files again: its token file at its next use (the uploads
                # below, past RELOAD_SECONDS); its peer file at a peer message in the meantime, which
                # a stalled node may not have had: waited for, before the next step signs with it.
                time.sleep(RELOAD_SECONDS + 1)
                peer_keys = f"secret-file: keyring read again, keys {' '.join(keys)} ("
                poll(lambda line=peer_keys: all(line in n.text() for n in nodes.values()), 30,
                     f"every node to read {' '.join(keys)} from its peer file")
                uploads_pass(nodes.values(), *after)
                views(ops_key)
            old = auth(mint("alice", "upload"))
            status, _, body = post_clip(nodes["r0"].url, media_clips.portrait, old)
            assert (status, body["error"]["code"]) == (401, "unauthorized")  # k1 is gone
            assert seen_states == {"alive"}, seen_states
            for view in views("k2"):
                assert view["dropped"].get("bad_mac", 0) == 0, view["dropped"]
        finally:
            for n in nodes.values():
                n.stop()


TENANT_TEMPLATE = """
[templates.alice-small]
description = "alice's own"
tenants = ["alice"]
outputs = [{container = "jpeg", size = 120}]
"""


def test_a_tenants_template_on_a_real_node(tmp_path: Path, media_clips: Clips) -> None:
    """A template of alice's: bob's GET /presets does not list it, and bob naming it (tus or
    POST /jobs) gets 400 unknown_preset before the body, nothing queued; alice's job with it is
    made (its one output named as the template)."""
    keyring = tmp_path / "tokens.keys"
    keyring.write_text(f"k1 {K1}\n")
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "node.toml").write_text(TENANT_TEMPLATE)
    n = NodeProcess(tmp_path / "node", ["--store", f"file:{tmp_path / 'store'}", "--min-free", "0",
                                        "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
                                        "--upload-secret", str(keyring), "--config", "node.toml"])
    n.start()
    try:
        base = n.block_until_ready(30)
        alice, bob = auth(mint("alice", "upload read")), auth(mint("bob", "upload read"))
        listed = [t["name"] for t in call("GET", f"{base}/presets", bob)[2]["presets"]]
        assert "alice-small" not in listed and "mp4-720p" in listed
        assert "alice-small" in [t["name"] for t in call("GET", f"{base}/presets", alice)[2]["presets"]]
        clip = media_clips.portrait
        refused = call("POST", f"{base}/jobs?presets=alice-small&name=x.mp4",
                       {"Content-Type": "application/octet-stream", **bob}, clip.read_bytes())
        assert error(refused) == (400, "unknown_preset"), refused
        meta = "presets " + base64.b64encode(b"alice-small").decode()
        tus = call("POST", f"{base}/files/", {**TUS, **bob, "Upload-Length": "10", "Upload-Metadata": meta})
        assert error(tus) == (400, "unknown_preset"), tus
        assert call("GET", f"{base}/jobs", bob)[2]["jobs"] == []  # nothing queued
        status, _, body = call("POST", f"{base}/jobs?presets=alice-small&name=x.mp4",
                               {"Content-Type": "application/octet-stream", **alice}, clip.read_bytes())
        assert status == 201, body
        finished = done(base, body["id"], alice)
        assert finished["state"] == "done" and [o["preset"] for o in finished["outputs"]] == ["alice-small"]
    finally:
        n.stop()
