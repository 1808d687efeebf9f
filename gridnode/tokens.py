"""
Access tokens: standard JWTs (RFC 7519), HS256, so an application mints them
with its own language's JWT library and the pool's token keyring
(gridnode/keyring.py). Claims:

- ``exp`` (required), ``nbf`` and ``iat`` (optional): seconds since the epoch,
  honoured with `LEEWAY` seconds for clocks that differ;
- ``sub`` (required): the tenant, any string; a job belongs to the ``sub``
  that created it;
- ``scope`` (required): space-separated, among `SCOPES`; ``admin`` holds every
  other scope, over every tenant's jobs;
- ``presets`` (optional): the presets an upload may ask for;
  ``max_size`` (optional): the largest upload in bytes;
  ``priority`` (optional): the highest priority its jobs may ask (``high``, ``normal``,
  ``low``: gridnode/priority.py).

The header's ``kid`` names the key that signed it; a token without one is
tried with every key of the ring. Any other algorithm, ``none`` included,
is refused. Minting in Python (PyJWT)::

    jwt.encode({"sub": "alice", "scope": "upload read", "exp": int(time.time()) + 3600},
               "SECRET AS WRITTEN IN THE FILE", algorithm="HS256", headers={"kid": "k1"})

Only the standard library and PyJWT here: the command line client mints too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt

from gridnode.errors import GridnodeError
from gridnode.keyring import Keyring
from gridnode.priority import RANK as PRIORITY_RANK

ALGORITHM = "HS256"
UPLOAD, READ, CANCEL, OPS, ADMIN = "upload", "read", "cancel", "ops", "admin"
SCOPES = (UPLOAD, READ, CANCEL, OPS, ADMIN)
#: seconds of clock difference forgiven on exp, nbf and iat
LEEWAY = 30.0
#: a longer Authorization header is not a token of ours
MAX_TOKEN_BYTES = 8 * 1024
MAX_TENANT = 256


@dataclass(frozen=True)
class Grant:
    """What a verified token allows."""

    tenant: str
    scopes: frozenset[str]
    expires: float
    presets: frozenset[str] | None = None
    max_size: int | None = None
    #: the highest priority its jobs may ask (None: any)
    priority: str | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def every_tenant(self) -> bool:
        return ADMIN in self.scopes


def unauthorized(message: str) -> GridnodeError:
    return GridnodeError(message, code="unauthorized", status=401)


def missing_token() -> GridnodeError:
    return unauthorized("this node needs an access token: send 'Authorization: Bearer <token>', a JWT minted "
                        "by your application with a key of the pool's token keyring")


def forbidden(message: str) -> GridnodeError:
    return GridnodeError(message, code="forbidden", status=403)


def parse_scope(text: str) -> frozenset[str]:
    """``"upload read"`` -> the set; an unknown word is refused, never ignored."""
    words = text.split()
    unknown = sorted(set(words) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {', '.join(unknown)}; known: {' '.join(SCOPES)}")
    return frozenset(words)


def mint(ring: Keyring, *, sub: str, scopes: frozenset[str] | set[str] | list[str], ttl: float,
         presets: list[str] | None = None, max_size: int | None = None, priority: str | None = None,
         now: float | None = None) -> str:
    """A token signed with the ring's first key (what `gridnode token` prints)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "scope": " ".join(s for s in SCOPES if s in set(scopes)),
                              "iat": issued, "exp": issued + int(ttl)}
    if presets is not None:
        claims["presets"] = list(presets)
    if max_size is not None:
        claims["max_size"] = int(max_size)
    if priority is not None:
        claims["priority"] = priority
    key = ring.signer
    return jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.id})


def verify(ring: Keyring, token: str | None, now: float | None = None) -> Grant:
    """The grant a token carries, or a coded 401 that says what is wrong with it."""
    if not token:
        raise missing_token()
    if len(token) > MAX_TOKEN_BYTES:
        raise unauthorized(f"the access token is longer than {MAX_TOKEN_BYTES} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise unauthorized("the access token is not a JWT (header.payload.signature, base64url)") from None
    if header.get("alg") != ALGORITHM:
        raise unauthorized(f"the access token must be signed with {ALGORITHM}")
    kid = header.get("kid")
    if kid is None:
        keys = list(ring.keys)
    else:
        found = ring.find(kid) if isinstance(kid, str) else None
        if found is None:
            raise unauthorized(f"the access token names key {str(kid)[:64]!r}, which this pool does not hold "
                               "(retired, or not yet added here): mint it with a current key")
        keys = [found]
    claims = _decode(token, keys)
    return _grant(claims, time.time() if now is None else now)


def _decode(token: str, keys: list[Any]) -> dict[str, Any]:
    # Times are checked by _grant, on the clock it is given; PyJWT checks the signature and the form.
    options: Any = {"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                    "verify_iss": False, "verify_sub": False, "verify_jti": False}
    for key in keys:
        try:
            return jwt.decode(token, key.secret, algorithms=[ALGORITHM], options=options)
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError:
            raise unauthorized("the access token is malformed: a JWT is header.payload.signature in base64url, "
                               "its payload a JSON object") from None
    raise unauthorized("the access token's signature is wrong: mint it with a key of this pool's token keyring")


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise unauthorized(f"the access token's {name} must be a number of seconds since 1970")
    return float(value)


def _grant(claims: dict[str, Any], now: float) -> Grant:
    expires = _number(claims, "exp")
    if expires is None:
        raise unauthorized("the access token has no exp: every token must expire")
    not_before = [t for t in (_number(claims, "nbf"), _number(claims, "iat")) if t is not None]
    if any(t > now + LEEWAY for t in not_before):
        raise unauthorized("the access token is not valid yet (nbf or iat is in the future): check the clocks")
    if expires <= now - LEEWAY:
        raise GridnodeError("the access token has expired: ask your application for a new one",
                            code="token_expired", status=401)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > MAX_TENANT:
        raise unauthorized(f"the access token's sub (the tenant) must be a string of 1-{MAX_TENANT} characters")
    scope = claims.get("scope")
    if not isinstance(scope, str):
        raise unauthorized(f"the access token's scope must be a string of space-separated words: {' '.join(SCOPES)}")
    try:
        scopes = parse_scope(scope)
    except ValueError as e:
        raise unauthorized(f"the access token's scope: {e}") from None
    presets = claims.get("presets")
    if presets is not None and not (isinstance(presets, list) and all(isinstance(p, str) for p in presets)):
        raise unauthorized("the access token's presets must be a list of names")
    max_size = claims.get("max_size")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0):
        raise unauthorized("the access token's max_size must be a whole number of bytes")
    most = claims.get("priority")
    if most is not None and (not isinstance(most, str) or most not in PRIORITY_RANK):
        raise unauthorized(f"the access token's priority must be one of {', '.join(PRIORITY_RANK)}")
    return Grant(sub, scopes, expires, frozenset(presets) if presets is not None else None, max_size, most)


def check_priority(grant: Grant, asked: str) -> None:
    """Refuse a job priority above the grant's ``priority``."""
    if grant.priority is not None and PRIORITY_RANK[asked] < PRIORITY_RANK[grant.priority]:
        raise forbidden(f"the access token allows priority {grant.priority} at most, not {asked}")


def check_upload(grant: Grant, presets: list[str], length: int | None, *, inline: bool = False) -> None:
    """Refuse what the grant does not allow an upload (before the body is read). A grant that
    names its presets allows no inline outputs: those could be anything."""
    if grant.presets is not None and inline:
        raise forbidden(f"the access token allows only the presets {', '.join(sorted(grant.presets))}; "
                        "send presets, not outputs")
    if grant.presets is not None:
        extra = sorted(set(presets) - grant.presets)
        if extra:
            raise forbidden(f"the access token does not allow presets {', '.join(extra)}")
    if grant.max_size is not None and length is not None and length > grant.max_size:
        raise GridnodeError(f"the access token allows at most {grant.max_size} bytes", code="too_large", status=413)
