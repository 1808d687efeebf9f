"""
Who may do what over HTTP: the one place the web layer authorizes a request.

With a token keyring (``--upload-secret``) every request but the public ones
(the pages, /static, /health, /registry, /openapi.yaml, CORS preflights) needs a JWT
(gridnode/tokens.py) whose scope fits its route (`need`). It is decided
once the headers are in, before any body byte is read (`Access.authorize`,
called by the body router for every request), on the path as the resource
tree will see it: each segment percent-decoded as twisted.web does, so
``/%6Aobs`` is ``/jobs``. Resources then ask for the `Caller` and keep a
tenant to its own jobs and uploads (`Caller.sees`): another tenant's answer
404 as if they did not exist.

A token comes as ``Authorization: Bearer <token>``; ``?token=`` only on
GETs a browser makes without a script's headers (an ``EventSource`` of
/events, a ``<video src>`` of /results), and the access log never shows it
(`redacted_log_line`; nor a signed URL's MAC). A signed result URL (web/result_urls.py) needs no
token: its resource checks its signature. Without a keyring everyone may do
everything.
"""

from __future__ import annotations

import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.web.http import combinedLogFormatter, unquote

from gridnode import tokens
from gridnode.keyring import Keyring
from gridnode.media.templates import unknown_preset
from gridnode.tokens import CANCEL, OPS, READ, UPLOAD, Grant
from gridnode.web.result_urls import is_signature

#: "any valid token": a route with no scope of its own (unknown paths answer 404 after it)
ANY = "any"
#: routes that need no token: the pages and what they load, the live check, the public node list,
#: the API's OpenAPI document
_PUBLIC = frozenset({b"", b"status", b"static", b"health", b"registry", b"openapi.yaml"})
#: job owners remembered for result requests (an owner never changes)
_OWNERS_KEPT = 10_000
#: a signed result URL's MAC (web/result_urls.py): what follows the last "." of its segment
_SIGNED_MAC = re.compile(rb"(/results/[^/?]*/(?:~|%7[Ee])[^/?]*\.)[^/?.]+")


@dataclass(frozen=True)
class Need:
    """What a route needs: a scope (None: nothing), and whether ``?token=`` may carry it."""

    scope: str | None
    query_token: bool = False


def segments(path: bytes) -> list[bytes]:
    """The path's segments as twisted.web's resource tree sees them (each one percent-decoded)."""
    return [unquote(s) for s in path[1:].split(b"/")]


def need(method: bytes, parts: list[bytes]) -> Need:
    """The scope a request needs, from its method and decoded path segments."""
    first = parts[0] if parts else b""
    reading = method in (b"GET", b"HEAD")
    if method == b"OPTIONS" or first in _PUBLIC:
        return Need(None)
    if first == b"jobs":
        if len(parts) == 1:
            return Need(UPLOAD if method == b"POST" else READ if reading else ANY)
        if len(parts) == 2 and method == b"DELETE":
            return Need(CANCEL)
        return Need(READ, query_token=reading and parts[2:] == [b"events"]) if reading else Need(ANY)
    if first == b"results":
        if reading and len(parts) > 3 and is_signature(parts[2].decode("latin-1")):
            return Need(None)  # the URL's own signature is its authority (web/result_urls.py)
        return Need(READ, query_token=True) if reading else Need(ANY)
    if first == b"files":
        return Need(UPLOAD)
    if first == b"presets":
        return Need(ANY)  # any token: the list is cut to what its own presets claim allows
    if first in (b"metrics", b"peers"):
        return Need(OPS)
    return Need(ANY)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a verified grant, or None where the node has no keyring (anyone)."""

    grant: Grant | None
    #: came by a public route of a node with a keyring: whatever asks who it is gets 401
    anonymous: bool = False

    @property
    def tenant(self) -> str:
        """What a job or upload this caller creates records as its owner."""
        return self.grant.tenant if self.grant is not None else ""

    @property
    def tenant_filter(self) -> str | None:
        """Whose jobs and uploads this caller reaches: its own tenant's, or None for every one."""
        return None if self.grant is None or self.grant.every_tenant else self.grant.tenant

    def sees(self, owner: str) -> bool:
        return self.tenant_filter in (None, owner)


OPEN = Caller(None)
ANONYMOUS = Caller(None, anonymous=True)


def token_of(request: Any, query: bytes, allowed_in_query: bool) -> str | None:
    """The bearer token of a request, or None; a ``?token=`` where none is allowed is refused."""
    header = request.getHeader(b"authorization") or b""
    if header[:7].lower() == b"bearer ":
        return str(header[7:].decode("latin-1").strip())
    if b"token=" not in query:
        return None
    found = parse_qs(query.decode("latin-1")).get("token")
    if not found:
        return None
    if not allowed_in_query:
        raise tokens.unauthorized("send the token as 'Authorization: Bearer <token>'; ?token= is accepted only "
                                  "on GET /jobs/<id>/events and GET /results/...")
    return found[0]


class Access:
    """The node's authorization: ``keyring()`` answers the token keys now (None: no tokens)."""

    def __init__(self, keyring: Callable[[], Keyring] | None, now: Callable[[], float] = time.time,
                 owners: Mapping[str, frozenset[str]] | None = None) -> None:
        self.keyring = keyring
        self.now = now
        #: the templates of some tenants only (``Catalog.owners``): another tenant's is unknown to it
        self.owners = dict(owners or {})
        self._callers: weakref.WeakKeyDictionary[Any, Caller] = weakref.WeakKeyDictionary()
        self._owners: OrderedDict[str, str] = OrderedDict()

    @property
    def open(self) -> bool:
        return self.keyring is None

    def authorize(self, request: Any, method: bytes, path: bytes, query: bytes) -> Caller:
        """Decide a request from its head (before its body); the coded 401/403 when it may not go on."""
        caller = self._decide(request, method, path, query)
        self._callers[request] = caller
        return caller

    def _decide(self, request: Any, method: bytes, path: bytes, query: bytes) -> Caller:
        if self.keyring is None:
            return OPEN
        needed = need(method, segments(path))
        if needed.scope is None:
            return ANONYMOUS
        token = token_of(request, query, needed.query_token and method in (b"GET", b"HEAD"))
        grant = tokens.verify(self.keyring(), token, self.now())
        if needed.scope != ANY and not grant.allows(needed.scope):
            have = " ".join(sorted(grant.scopes)) or "none"
            raise tokens.forbidden(f"this needs a token with scope {needed.scope}; this token's scope: {have}")
        return Caller(grant)

    def caller(self, request: Any) -> Caller:
        """Who sent ``request``: decided before its body; decided now for one that came another way.
        A request that came by a public route has no say over jobs or uploads (fails closed, should
        a public path ever lead to one)."""
        known = self._callers.get(request)
        if known is None:
            uri = bytes(getattr(request, "uri", b"") or b"")
            known = self.authorize(request, request.method, request.path, uri.partition(b"?")[2])
        if known.anonymous:
            raise tokens.missing_token()
        return known

    # -- uploads (the tus handler and POST /jobs)

    def creator(self, request: Any, presets: list[str], length: int | None, *, inline: bool = False) -> str:
        """The tenant a new upload belongs to, once its token allows these presets and this size
        (and, ``inline``, outputs of the request's own)."""
        caller = self.caller(request)
        if caller.grant is not None:
            tokens.check_upload(caller.grant, presets, length, inline=inline)
            if not caller.grant.every_tenant:
                # Answered as a name that does not exist: another tenant's templates are not named.
                hidden = [p for p in presets if p in self.owners and caller.tenant not in self.owners[p]]
                if hidden:
                    raise unknown_preset(hidden)
        return caller.tenant

    def priority(self, request: Any, asked: str) -> str:
        """``asked``, once the caller's token allows it (its ``priority`` claim)."""
        grant = self.caller(request).grant
        if grant is not None:
            tokens.check_priority(grant, asked)
        return asked

    def upload_limit(self, request: Any) -> int | None:
        """The most bytes the caller's token lets one upload hold (None: no limit of the token's)."""
        grant = self.caller(request).grant
        return grant.max_size if grant is not None else None

    def owner_filter(self, request: Any) -> str | None:
        """Whose uploads and jobs ``request`` may touch: a tenant, or None for any."""
        return self.caller(request).tenant_filter

    # -- results: the job's owner, looked up once

    def may_read_job(self, request: Any, job_id: str, lookup: Callable[[str], Any]) -> Deferred[bool]:
        """Does the caller see job ``job_id``? ``lookup(job_id)`` (a Deferred of the job) is asked
        only when the answer depends on its owner and that owner is not remembered yet."""
        tenant = self.owner_filter(request)
        if tenant is None:
            return succeed(True)
        if job_id in self._owners:
            return succeed(self._owners[job_id] == tenant)

        def found(job: Any) -> bool:
            self._owners[job_id] = job.tenant
            while len(self._owners) > _OWNERS_KEPT:
                self._owners.popitem(last=False)
            return bool(job.tenant == tenant)

        d: Deferred[Any] = ensureDeferred(lookup(job_id))
        return d.addCallback(found)


class _Redacted:
    """A request as the access log sees it: ``token=`` values in its URI replaced."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = redact_uri(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redact_uri(uri: bytes) -> bytes:
    """``uri`` with the value of every ``token`` parameter (however its name is spelled or
    encoded), and a signed result URL's MAC, replaced: a log reader gets nothing that opens a job."""
    path, sep, query = uri.partition(b"?")
    path = _SIGNED_MAC.sub(rb"\1REDACTED", path)
    if not sep:
        return path
    pairs = [b"token=REDACTED" if unquote(p.split(b"=", 1)[0].replace(b"+", b" ")).strip().lower() == b"token"
             else p for p in query.split(b"&")]
    return path + b"?" + b"&".join(pairs)


def redacted_log_line(timestamp: str, request: Any) -> str:
    """twisted.web's combined log line, with any ``?token=`` value replaced."""
    return str(combinedLogFormatter(timestamp, _Redacted(request)))
