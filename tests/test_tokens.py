"""Access tokens: JWTs an application mints with any JWT library, checked against the keyring."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from gridnode import tokens
from gridnode.client.cli import duration, main, size
from gridnode.config import build_config
from gridnode.errors import ConfigError, GridnodeError
from gridnode.keyring import parse_keyring

K1 = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="
K2 = "7Q0f3cX0nOa2y7mJ0w8rS6uY4hB1vK9dE5tZ2pL3qM8="
RING = parse_keyring(f"k1 {K1}\n".encode(), "test")
ROTATED = parse_keyring(f"k2 {K2}\nk1 {K1}\n".encode(), "test")
NOW = 1_700_000_000


def token(claims: dict[str, Any] | None = None, secret: str = K1, kid: str | None = "k1", alg: str = "HS256",
          **extra: Any) -> str:
    """A token as an application mints it: PyJWT, not gridnode's code."""
    body = {"sub": "alice", "scope": "upload read", "exp": NOW + 60, **(claims or {}), **extra}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, secret, algorithm=alg, headers={"kid": kid} if kid else None)


def refused(ring: Any, text: str | None, now: float = NOW) -> GridnodeError:
    with pytest.raises(GridnodeError) as e:
        tokens.verify(ring, text, now)
    return e.value


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class VerifyTests:
    def test_a_pyjwt_token_verifies(self) -> None:
        """A token minted with PyJWT and the secret as written in the file carries its grant."""
        grant = tokens.verify(RING, token(presets=["poster"], max_size=1000), NOW)
        assert grant == tokens.Grant("alice", frozenset({"upload", "read"}), NOW + 60, frozenset({"poster"}), 1000)

    def test_mint_round_trip(self) -> None:
        """gridnode's own mint signs with the first key and names it in kid."""
        text = tokens.mint(ROTATED, sub="bob", scopes={"read"}, ttl=60, now=NOW)
        assert jwt.get_unverified_header(text)["kid"] == "k2"
        grant = tokens.verify(ROTATED, text, NOW + 1)
        assert (grant.tenant, grant.scopes, grant.expires) == ("bob", frozenset({"read"}), NOW + 60)

    def test_expired_is_its_own_code(self) -> None:
        """Past exp (beyond the leeway): 401 token_expired; within the leeway it still passes."""
        e = refused(RING, token(exp=NOW - tokens.LEEWAY - 1))
        assert (e.status, e.code) == (401, "token_expired")
        tokens.verify(RING, token(exp=NOW - tokens.LEEWAY + 1), NOW)

    @pytest.mark.parametrize("claim", ["nbf", "iat"])
    def test_not_yet_valid(self, claim: str) -> None:
        """nbf or iat in the future beyond the leeway: 401; within it: accepted (clocks differ)."""
        e = refused(RING, token(**{claim: NOW + tokens.LEEWAY + 5}))
        assert (e.status, e.code) == (401, "unauthorized") and "not valid yet" in e.message
        tokens.verify(RING, token(**{claim: NOW + tokens.LEEWAY - 5}), NOW)

    def test_rotation(self) -> None:
        """A ring (k2, k1) takes tokens of both keys; once k1 is dropped its tokens are refused by
        kid, and a token whose kid is unknown is refused with a message saying so."""
        for t in (token(), token(secret=K2, kid="k2")):
            assert tokens.verify(ROTATED, t, NOW).tenant == "alice"
        only_k2 = parse_keyring(f"k2 {K2}".encode(), "test")
        e = refused(only_k2, token())
        assert e.code == "unauthorized" and "'k1'" in e.message and "does not hold" in e.message

    def test_no_kid_tries_every_key(self) -> None:
        """A token without kid is checked against each key of the ring."""
        assert tokens.verify(ROTATED, token(kid=None), NOW).tenant == "alice"
        assert tokens.verify(ROTATED, token(secret=K2, kid=None), NOW).tenant == "alice"
        assert "signature is wrong" in refused(RING, token(secret=K2, kid=None)).message

    def test_a_kid_with_the_wrong_key_is_refused(self) -> None:
        """kid k1 but signed with k2's secret: the signature is wrong (no fallback to other keys)."""
        assert "signature is wrong" in refused(ROTATED, token(secret=K2, kid="k1")).message

    def test_other_algorithms_are_refused(self) -> None:
        """alg none, HS512 (same secret) and a forged header claiming HS256 over nothing: refused."""
        unsigned = b64({"alg": "none", "typ": "JWT", "kid": "k1"}) + "." + b64(
            {"sub": "alice", "scope": "admin", "exp": NOW + 60}) + "."
        for text in (unsigned, token(alg="HS512"), token(alg="HS384")):
            e = refused(RING, text)
            assert (e.status, e.code) == (401, "unauthorized")
        forged = b64({"alg": "HS256", "kid": "k1"}) + "." + b64({"sub": "x", "scope": "admin", "exp": NOW + 60}) + "."
        assert refused(RING, forged).code == "unauthorized"

    @pytest.mark.parametrize(("claims", "says"), [
        ({"exp": None}, "no exp"),
        ({"exp": "tomorrow"}, "exp must be a number"),
        ({"exp": True}, "exp must be a number"),
        ({"sub": None}, "sub"),
        ({"sub": ""}, "sub"),
        ({"sub": 42}, "sub"),
        ({"sub": "x" * 300}, "sub"),
        ({"scope": None}, "scope"),
        ({"scope": ["upload"]}, "scope"),
        ({"scope": "upload root"}, "unknown scope root"),
        ({"presets": "poster"}, "presets"),
        ({"max_size": -1}, "max_size"),
        ({"max_size": 1.5}, "max_size"),
    ])
    def test_bad_claims(self, claims: dict[str, Any], says: str) -> None:
        """Each claim of the wrong form is a 401 that names it."""
        e = refused(RING, token(claims))
        assert (e.status, e.code) == (401, "unauthorized") and says in e.message, e.message

    @pytest.mark.parametrize("text", [None, "", "garbage", "a.b", "a.b.c", "x" * 10_000,
                                      token()[:-3], token() + "x", token().replace(".", "", 1)])
    def test_malformed(self, text: str | None) -> None:
        """Missing, malformed, truncated and tampered tokens are 401 unauthorized, never a crash."""
        assert refused(RING, text).code == "unauthorized"

    def test_tampered_payload(self) -> None:
        """Swapping in another payload (admin) under a valid signature fails."""
        head, _, sig = token().split(".")
        other = token(scope="admin").split(".")[1]
        assert refused(RING, f"{head}.{other}.{sig}").code == "unauthorized"

    def test_admin_holds_every_scope(self) -> None:
        """admin: every scope, every tenant."""
        grant = tokens.verify(RING, token(scope="admin"), NOW)
        assert all(grant.allows(s) for s in tokens.SCOPES) and grant.every_tenant
        reader = tokens.verify(RING, token(scope="read"), NOW)
        assert reader.allows("read") and not reader.allows("cancel") and not reader.every_tenant

    def test_upload_limits(self) -> None:
        """Presets outside the grant are 403 forbidden; a declared body over max_size is 413."""
        grant = tokens.verify(RING, token(presets=["poster"], max_size=100), NOW)
        tokens.check_upload(grant, ["poster"], 50)
        with pytest.raises(GridnodeError) as e:
            tokens.check_upload(grant, ["poster", "hls"], 50)
        assert (e.value.status, e.value.code) == (403, "forbidden")
        with pytest.raises(GridnodeError) as e:
            tokens.check_upload(grant, ["poster"], 101)
        assert e.value.code == "too_large"


class ConfigTests:
    def test_network_needs_a_secret(self) -> None:
        """A node listening beyond loopback refuses to start without a token keyring, unless told that
        anyone may upload, read and cancel; loopback stays open."""
        with pytest.raises(ConfigError, match="upload-secret") as e:
            build_config(cli={"http": "tcp:8080"})
        assert "read" in e.value.message and "cancel" in e.value.message
        with pytest.raises(ConfigError, match="upload-secret"):
            build_config(cli={"http": "tcp:8080:interface=0.0.0.0"})
        assert build_config(cli={"http": "tcp:8080", "allow-anonymous-uploads": True}).allow_anonymous_uploads
        assert build_config(cli={"http": "tcp:8080", "upload-secret": "/x"}).upload_secret == "/x"
        build_config(cli={"http": "tcp:8080:interface=127.0.0.1"})

    def test_the_help_says_what_anonymous_means(self) -> None:
        """--allow-anonymous-uploads says that reads and cancels are open too."""
        from gridnode.config import BY_KEY

        text = BY_KEY["allow-anonymous-uploads"].help
        assert "read" in text and "cancel" in text


class BearerTests:
    def test_every_request_carries_the_token(self) -> None:
        """The client's HTTP wrapper adds the bearer header to each call, beside the caller's headers."""
        from gridnode.client.api import BearerHTTP

        calls: list[tuple[str, dict[str, Any]]] = []

        class Recorder:
            def __getattr__(self, method: str) -> Any:
                return lambda *args, **kwargs: calls.append((method, kwargs))

        http = BearerHTTP(Recorder(), "T")
        http.get("u", timeout=3)
        http.post("u", data=b"x", headers={"content-type": "video/mp4"})
        http.delete("u")
        http.request("HEAD", "u", headers=None)
        assert [m for m, _ in calls] == ["get", "post", "delete", "request"]
        assert all(kw["headers"]["Authorization"] == "Bearer T" for _, kw in calls)
        assert calls[1][1]["headers"]["content-type"] == "video/mp4" and calls[0][1]["timeout"] == 3


class TokenCommandTests:
    def test_prints_a_token(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`gridnode token` prints a JWT that PyJWT verifies with the file's first key, as asked."""
        keyring = tmp_path / "tokens"
        keyring.write_text(f"k2 {K2}\nk1 {K1}\n")
        main(["token", "--secret-file", str(keyring), "--sub", "alice", "--scope", "upload read",
              "--ttl", "1h", "--presets", "poster,mp4-720p", "--max-size", "500M"])
        text = capsys.readouterr().out.strip()
        assert jwt.get_unverified_header(text)["kid"] == "k2"
        claims = jwt.decode(text, K2, algorithms=["HS256"])
        assert claims["sub"] == "alice" and claims["scope"] == "upload read"
        assert claims["presets"] == ["poster", "mp4-720p"] and claims["max_size"] == 500 * 1024 * 1024
        assert 3590 <= claims["exp"] - time.time() <= 3600
        assert "priority" not in claims

    def test_a_priority_cap(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``--priority normal`` puts the cap in the token, which the node reads back as its grant;
        a priority that is not one is refused by the command line."""
        keyring = tmp_path / "tokens"
        keyring.write_text(f"k1 {K1}\n")
        main(["token", "--secret-file", str(keyring), "--sub", "alice", "--scope", "upload", "--priority", "normal"])
        text = capsys.readouterr().out.strip()
        assert jwt.decode(text, K1, algorithms=["HS256"])["priority"] == "normal"
        assert tokens.verify(parse_keyring(f"k1 {K1}\n".encode(), "f"), text).priority == "normal"
        with pytest.raises(SystemExit):
            main(["token", "--secret-file", str(keyring), "--sub", "a", "--scope", "upload", "--priority", "urgent"])

    @pytest.mark.parametrize(("args", "says"), [
        (["--scope", "upload root"], "unknown scope root"),
        (["--scope", " "], "at least one"),
        (["--sub", ""], "tenant"),
    ])
    def test_refusals(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str) -> None:
        """A bad scope or tenant exits 1 with one line."""
        keyring = tmp_path / "tokens"
        keyring.write_text(f"k1 {K1}\n")
        base = {"--secret-file": str(keyring), "--sub": "alice", "--scope": "read"}
        base.update(dict(zip(args[::2], args[1::2], strict=True)))
        with pytest.raises(SystemExit) as e:
            main(["token", *[x for kv in base.items() for x in kv]])
        assert e.value.code == 1 and says in capsys.readouterr().err

    def test_units(self) -> None:
        """Durations and sizes as people write them."""
        assert [duration(t) for t in ("90", "90s", "15m", "1h", "7d")] == [90, 90, 900, 3600, 7 * 86400]
        assert [size(t) for t in ("1048576", "500M", "2G", "2GiB")] == [1048576, 500 << 20, 2 << 30, 2 << 30]
        for bad in ("0", "1y", "-5", "h"):
            with pytest.raises(Exception, match="duration"):
                duration(bad)
