"""Upload tokens: minted by an application, checked by every node before the body is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted

from gridnode import tokens
from gridnode.config import build_config
from gridnode.errors import ConfigError, GridnodeError
from tests.helpers import free_port
from tests.media_samples import Clips
from tests.nodes import NodeProcess, upload

SECRET = b"0123456789abcdef0123456789abcdef"


class TokenTests:
    def test_round_trip(self) -> None:
        """A minted token verifies and carries its grant."""
        grant = tokens.verify(SECRET, tokens.mint(SECRET, 60, ["poster"], 1000, now=100), now=120)
        assert grant.presets == {"poster"} and grant.max_size == 1000 and grant.expires == 160

    @pytest.mark.parametrize(("token", "code"), [
        (None, "unauthorized"), ("", "unauthorized"), ("garbage", "unauthorized"), ("a.b", "unauthorized"),
        (tokens.mint(b"another secret, also long enough", 60), "unauthorized"),
        (tokens.mint(SECRET, -10), "token_expired"),
    ])
    def test_refusals(self, token: str | None, code: str) -> None:
        """Missing, malformed, foreign and expired tokens are refused with 401 and a code."""
        with pytest.raises(GridnodeError) as e:
            tokens.verify(SECRET, token)
        assert e.value.code == code and e.value.status == 401

    def test_tampered_payload(self) -> None:
        """Changing the payload breaks the signature."""
        good = tokens.mint(SECRET, 60, ["poster"])
        payload, signature = good.split(".")
        other = tokens.mint(SECRET, 60, None).split(".")[0]
        with pytest.raises(GridnodeError):
            tokens.verify(SECRET, other + "." + signature)

    def test_grant_limits(self) -> None:
        """Presets outside the grant are forbidden; a body over max_size is too large."""
        grant = tokens.verify(SECRET, tokens.mint(SECRET, 60, ["poster"], 100))
        tokens.check(grant, ["poster"], 50)
        with pytest.raises(GridnodeError) as e:
            tokens.check(grant, ["poster", "hls"], 50)
        assert e.value.status == 403
        with pytest.raises(GridnodeError) as e:
            tokens.check(grant, ["poster"], 101)
        assert e.value.code == "too_large"

    def test_network_needs_a_secret(self) -> None:
        """A node listening beyond loopback refuses to start without an upload secret, unless told."""
        with pytest.raises(ConfigError, match="upload-secret"):
            build_config(cli={"http": "tcp:8080"})
        with pytest.raises(ConfigError, match="upload-secret"):
            build_config(cli={"http": "tcp:8080:interface=0.0.0.0"})
        assert build_config(cli={"http": "tcp:8080", "allow-anonymous-uploads": True}).allow_anonymous_uploads
        assert build_config(cli={"http": "tcp:8080", "upload-secret": "/x"}).upload_secret == "/x"
        build_config(cli={"http": "tcp:8080:interface=127.0.0.1"})


@pytest.mark.integration
class TokenNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_node_checks_tokens(self, tmp_path: Path, media_clips: Clips) -> None:
        """With --upload-secret: no token 401, expired 401, a preset the token does not allow 403,
        a good token 201."""
        secret = tmp_path / "upload.secret"
        secret.write_bytes(SECRET + b"\n")
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                      f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                      "--upload-secret", str(secret)])
        node.start()
        try:
            base = yield node.wait_ready()
            clip = media_clips.portrait
            status, _, body = upload(base, clip, "poster")
            assert (status, body["error"]["code"]) == (401, "unauthorized")
            expired = tokens.mint(SECRET, -5)
            status, _, body = upload(base, clip, "poster", authorization=f"Bearer {expired}")
            assert (status, body["error"]["code"]) == (401, "token_expired")
            only_poster = tokens.mint(SECRET, 60, ["poster"])
            status, _, body = upload(base, clip, "mp4-720p", authorization=f"Bearer {only_poster}")
            assert (status, body["error"]["code"]) == (403, "forbidden")
            status, _, body = upload(base, clip, "poster", authorization=f"Bearer {only_poster}")
            assert status == 201, body
        finally:
            node.stop()
