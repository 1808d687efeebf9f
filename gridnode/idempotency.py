"""
``Idempotency-Key`` on the requests that create work (POST /jobs, tus creation): a client whose
connection was cut before the answer retries with the same key, and gets the job (or upload) it
made the first time instead of a second one.

The key's entry lives in the store, never in a node's memory: the retry may reach another node of
the pool. One small object per (tenant, key) under ``idempotency/``, named by a hash of both, so
that a client's string never reaches a key and tenants are separate namespaces. A request with a
key looks its entry up before its body is read (one GET); the entry is written once, with a
conditional create, at the moment the work is accepted (one PUT). Of two requests racing with one
key, the one whose write loses drops its own work and answers the winner's. An entry older than
`TTL` counts as absent and is overwritten, conditionally on its ETag.

The decisions here need no HTTP; gridnode/web/replay.py answers them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed

#: a key is at most this long (Stripe's limit; a UUID is 36)
MAX_KEY = 255
#: how long a key holds: a retry later than this makes new work
TTL = 24 * 3600.0
#: an entry whose work cannot be found yet is taken for one being accepted for this long (its
#: job record or upload info follows its entry within seconds); after, for one whose acceptance
#: died with its node, and the key is free again
PENDING = 60.0
#: seconds a client is told to wait while the first request with its key is being accepted
RETRY_AFTER = 2
MAX_ENTRY_BYTES = 4096
JOB, UPLOAD = "job", "upload"


def bad_key(message: str) -> GridnodeError:
    return GridnodeError(f"{message}; send at most {MAX_KEY} printable ASCII characters (a UUID, say)",
                         code="bad_idempotency_key", status=400)


def parse_key(values: list[bytes] | None) -> str | None:
    """The request's ``Idempotency-Key`` (None: no header), or the coded refusal of a bad one."""
    if not values:
        return None
    if len(values) > 1:
        raise bad_key("Idempotency-Key is sent more than once")
    raw = values[0]
    if not raw:
        raise bad_key("Idempotency-Key is empty")
    if len(raw) > MAX_KEY:
        raise bad_key(f"Idempotency-Key is {len(raw)} bytes long")
    if any(b < 0x20 or b > 0x7E for b in raw):
        raise bad_key("Idempotency-Key holds a control or non-ASCII character")
    return raw.decode("ascii")


class KeyInUse(GridnodeError):
    """The first request with this key is being accepted (here or on another node): ask again soon."""

    code = "idempotency_key_in_use"
    status = 409

    def __init__(self) -> None:
        super().__init__("a request with this Idempotency-Key is still being accepted; send the same request "
                         f"again in {RETRY_AFTER} s to get its answer")
        self.retry_after = RETRY_AFTER


def reused() -> GridnodeError:
    return GridnodeError("this Idempotency-Key was used for a different request (another file, length, name, "
                         "presets or endpoint) in the last 24 hours; use a new key for a new upload",
                         code="idempotency_key_reused", status=422)


class Replay(Exception):  # noqa: N818 - an outcome, not a failure: the request was answered before
    """The request is one already accepted (a retry, or the loser of a race): answer ``target`` again."""

    #: what the job service's rejection metric counts it as
    code = "idempotent_replay"

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


@dataclass(frozen=True)
class Intent:
    """A request that carries a key: whose, which key, and what it declared before its body."""

    tenant: str
    key: str
    kind: str
    #: a digest of what the request declared (its kind, length, name, presets...): a retry
    #: declares the same; another request under the same key does not
    request: str

    @classmethod
    def of(cls, tenant: str, key: str, kind: str, **declared: Any) -> Intent:
        text = json.dumps({"kind": kind, **declared}, sort_keys=True, default=str)
        return cls(tenant, key, kind, hashlib.sha256(text.encode()).hexdigest())

    @property
    def object_key(self) -> str:
        # Length-prefixed, so that no (tenant, key) pair spells another's.
        named = f"{len(self.tenant)}:{self.tenant}{self.key}".encode()
        return keys.idempotency_entry(hashlib.sha256(named).hexdigest())


@dataclass(frozen=True)
class Entry:
    """What the store holds for a key: the work it made, for which request, since when."""

    target: str
    request: str
    created: float

    def dumps(self) -> bytes:
        return json.dumps({"target": self.target, "request": self.request, "created": self.created}).encode()

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        doc = json.loads(data)
        entry = cls(str(doc["target"]), str(doc["request"]), float(doc["created"]))
        if not keys.is_id(entry.target):
            raise ValueError("target is not an id")
        return entry


@dataclass(frozen=True)
class Found:
    """A retry: the work its key made, as ``fetch`` gave it."""

    target: str
    work: Any


class Claim:
    """A request with a key that made no work yet: `claim` writes its entry once its work is
    accepted, `release` takes it back should the work be refused after all."""

    def __init__(self, ledger: Ledger, intent: Intent, replaces: str | None, made: Any = None) -> None:
        self.ledger = ledger
        self.intent = intent
        #: the ETag of a stale entry to overwrite (None: there was none)
        self.replaces = replaces
        #: what the router made for this request before its body (a tus creation's upload)
        self.made = made
        self.etag: str | None = None

    def claim(self, target: str) -> Deferred[None]:
        """Write the entry naming ``target``; fails with `Replay` naming the winner's work when another
        request with the key wrote first (or `reused` when that one was a different request)."""
        return self.ledger.claim(self, target)

    def release(self) -> Deferred[None]:
        return self.ledger.release(self)


class Ledger:
    """The keys' entries in the store; ``now`` is the clock their ages are read on, ``replayed(kind)``
    is told of every request answered with earlier work."""

    _log = Logger()

    def __init__(self, store: Any, now: Callable[[], float] = time.time,
                 replayed: Callable[[str], None] = lambda kind: None) -> None:
        self.store = store
        self.now = now
        self.replayed = replayed

    @inlineCallbacks
    def find(self, intent: Intent, fetch: Callable[[str], Deferred[Any]]) -> Any:
        """`Found` for a retry (``fetch(target)``: the work, or None where it is gone), else the
        request's `Claim`; the coded refusals: `reused`, `KeyInUse`."""
        try:
            data, stat = yield self.store.get_bytes(intent.object_key, max_size=MAX_ENTRY_BYTES)
        except NotFound:
            return Claim(self, intent, None)
        try:
            entry = Entry.loads(data)
        except (ValueError, KeyError, TypeError):
            self._log.warn("unreadable idempotency entry {key}: overwritten", key=intent.object_key)
            return Claim(self, intent, stat.etag)
        age = self.now() - entry.created
        if age >= TTL:
            return Claim(self, intent, stat.etag)
        if entry.request != intent.request:
            raise reused()
        work = yield fetch(entry.target)
        if work is not None:
            self.replayed(intent.kind)
            return Found(entry.target, work)
        if age < PENDING:
            raise KeyInUse()
        return Claim(self, intent, stat.etag)  # its work was refused, or died with its node

    @inlineCallbacks
    def claim(self, claim: Claim, target: str) -> Any:
        entry = Entry(target, claim.intent.request, self.now())
        condition = {"if_match": claim.replaces} if claim.replaces is not None else {"if_none_match": "*"}
        try:
            stat = yield self.store.put_bytes(claim.intent.object_key, entry.dumps(),
                                              content_type="application/json", **condition)
        except (PreconditionFailed, NotFound):
            winner = yield self._winner(claim.intent)
            self.replayed(claim.intent.kind)
            raise Replay(winner) from None
        claim.etag = stat.etag

    @inlineCallbacks
    def _winner(self, intent: Intent) -> Any:
        try:
            data, _ = yield self.store.get_bytes(intent.object_key, max_size=MAX_ENTRY_BYTES)
            entry = Entry.loads(data)
        except (NotFound, ValueError, KeyError, TypeError):
            raise KeyInUse() from None  # changed again meanwhile: the retry reads it afresh
        if entry.request != intent.request:
            raise reused()
        return entry.target

    @inlineCallbacks
    def release(self, claim: Claim) -> Any:
        """Delete the entry this request wrote (its work was refused after it), so that a retry is
        not held up; best effort: an entry left behind frees itself after `PENDING`."""
        if claim.etag is None:
            return
        etag, claim.etag = claim.etag, None
        try:
            yield self.store.delete(claim.intent.object_key, if_match=etag)
        except GridnodeError as e:
            self._log.info("idempotency entry {key} left behind: {reason}", key=claim.intent.object_key,
                           reason=e.message)
