"""
Upload tokens: an application server lets its users upload to the pool
without sharing the pool's secret. A token is ``PAYLOAD.SIGNATURE``, both
base64url: the payload is JSON ``{"exp": unix time, "presets": [...] or
null, "max_size": bytes or null}``, the signature HMAC-SHA256 of the payload
text with the upload secret. Minting one takes a few lines in any language::

    import base64, hashlib, hmac, json, time
    def mint(secret: bytes, seconds=3600, presets=None, max_size=None) -> str:
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        payload = b64(json.dumps({"exp": int(time.time()) + seconds, "presets": presets,
                                  "max_size": max_size}).encode())
        return payload + "." + b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())

Clients send it as ``Authorization: Bearer <token>`` (or ``?token=``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from gridnode.errors import GridnodeError


@dataclass(frozen=True)
class Grant:
    expires: float
    presets: frozenset[str] | None
    max_size: int | None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(secret: bytes, seconds: float = 3600, presets: list[str] | None = None, max_size: int | None = None,
         now: float | None = None) -> str:
    payload = _b64(json.dumps({"exp": int((time.time() if now is None else now) + seconds),
                               "presets": presets, "max_size": max_size}).encode())
    return payload + "." + _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def unauthorized(message: str) -> GridnodeError:
    return GridnodeError(message, code="unauthorized", status=401)


def verify(secret: bytes, token: str | None, now: float | None = None) -> Grant:
    """The grant a token carries, or a 401 saying what is wrong with it."""
    if not token:
        raise unauthorized("this node needs an upload token: send 'Authorization: Bearer <token>' "
                           "minted by your application with the pool's upload secret")
    try:
        payload, signature = token.strip().split(".")
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature)):
            raise unauthorized("the upload token's signature is wrong: mint it with this pool's upload secret")
        body = json.loads(_unb64(payload))
        expires = float(body["exp"])
        presets = body.get("presets")
        max_size = body.get("max_size")
    except GridnodeError:
        raise
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise unauthorized("the upload token is malformed: expected PAYLOAD.SIGNATURE in base64url") from None
    if expires < (time.time() if now is None else now):
        raise GridnodeError("the upload token has expired: ask your application for a new one",
                            code="token_expired", status=401)
    if presets is not None and not (isinstance(presets, list) and all(isinstance(p, str) for p in presets)):
        raise unauthorized("the upload token's presets must be a list of names")
    if max_size is not None and not isinstance(max_size, int):
        raise unauthorized("the upload token's max_size must be a whole number of bytes")
    return Grant(expires, frozenset(presets) if presets is not None else None, max_size)


def check(grant: Grant, presets: list[str], length: int | None) -> None:
    """Refuse what the grant does not allow (before the body is read)."""
    if grant.presets is not None:
        extra = sorted(set(presets) - grant.presets)
        if extra:
            raise GridnodeError(f"the upload token does not allow presets {', '.join(extra)}",
                                code="forbidden", status=403)
    if grant.max_size is not None and length is not None and length > grant.max_size:
        raise GridnodeError(f"the upload token allows at most {grant.max_size} bytes", code="too_large", status=413)
