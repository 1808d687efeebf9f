"""
The peer protocol on the wire: Twisted AMP over TCP (the ``--peer`` endpoint).

The conversation: every membership message (SWIM's Ping, Ack, Nack,
PingReq, Gossip, SyncDigest, SyncState) is one AMP command of the same name,
sent one way (no AMP answer: SWIM's answers are messages of their own, such
as the Ack to a Ping, and may come back over another connection). A
``Version`` command, the only one with an answer, tells the protocol version.

Every command carries the message as compact JSON (``payload``, a dict of
plain fields, never pickle), the sender's clock (``sent``), a random
``nonce`` and ``mac`` = HMAC-SHA256 over version, command, sent, nonce and
payload, keyed from the pool secret. The secret is a keyring
(gridnode/keyring.py): a message is sealed with the first key and opened
with any, so a pool moves to a new secret node by node without a partition.
A receiver drops, and counts by reason: a MAC that no key gives
(``bad_mac``), a timestamp outside the window (``stale``), a nonce seen
within the window (``replay``), a payload over the size limit
(``oversized``), an unreadable one (``malformed``) or one from another
protocol version (``version``). AMP's own framing limits any key to 255 and
any value to 65,535 bytes; a connection that sends more than a box's worth
without completing one is closed (``oversized``).

Compatibility (rolling upgrades): a receiver reads only the payload fields it
knows, so a release may add top-level fields to a message and still share a
pool with the release before it. A new command, member state or element of an
update, or any change an older node would misread, needs a new ``VERSION``:
older nodes drop those messages (``version``) and count them, never crash; a
release that raises it must open the previous version too for a roll to work.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.protocols import amp

from gridnode.membership import swim, sync

VERSION = 1
#: seconds a message's timestamp may differ from ours
WINDOW = 30.0
#: a payload's most bytes (the machine cuts its syncs to fit it)
MAX_PAYLOAD = sync.MAX_MESSAGE_BYTES


#: the pool's MAC keys now, newest first: the first seals, any of them opens
PeerKeys = Callable[[], Sequence[bytes]]


def peer_key(secret: bytes, env: str, pool: str) -> bytes:
    """The MAC key: derived from the pool secret, bound to the environment and pool."""
    return hmac.new(secret, f"gridnode-peer-v{VERSION}:{env}:{pool}".encode(), hashlib.sha256).digest()


def fixed_keys(*keys: bytes) -> PeerKeys:
    return lambda: keys


def peer_keys(secrets: Callable[[], Sequence[bytes]], env: str, pool: str) -> PeerKeys:
    """The MAC keys of the secrets ``secrets()`` answers now (a keyring the node re-reads),
    derived again only when they change."""
    derived: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}

    def keys() -> Sequence[bytes]:
        current = tuple(secrets())
        if current not in derived:
            derived.clear()
            derived[current] = tuple(peer_key(s, env, pool) for s in current)
        return derived[current]

    return keys


def _args() -> list[tuple[bytes, amp.Argument]]:
    return [(b"version", amp.Integer()), (b"sent", amp.Float()), (b"nonce", amp.String()),
            (b"payload", amp.String()), (b"mac", amp.String())]


class _OneWay(amp.Command):
    arguments = _args()
    requiresAnswer = False


class Ping(_OneWay):
    """Are you alive? (SWIM direct probe; the answer is an Ack command back.)"""


class Ack(_OneWay):
    """I am: the answer to a Ping, directly or relayed through a PingReq."""


class Nack(_OneWay):
    """Lifeguard: I relayed your PingReq and heard nothing back."""


class PingReq(_OneWay):
    """Please probe this member for me (SWIM indirect probe)."""


class Gossip(_OneWay):
    """Membership updates, pushed."""


class SyncDigest(_OneWay):
    """Anti-entropy: the digest of my live table, pool-wide (opening) or per bucket (answer)."""


class SyncState(_OneWay):
    """Anti-entropy: my members of the buckets whose digests differ (push-pull), in parts that fit."""


class Version(amp.Command):
    """The peer protocol version spoken here."""

    arguments = []
    response = [(b"version", amp.Integer())]


COMMANDS: dict[str, type[amp.Command]] = {c.__name__: c for c in (Ping, Ack, Nack, PingReq, Gossip, SyncDigest,
                                                                  SyncState)}


def _mac(key: bytes, command: str, version: int, sent: float, nonce: bytes, payload: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (command.encode(), str(version).encode(), repr(sent).encode(), nonce, payload):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def seal(key: bytes, msg: swim.Message, now: float | None = None) -> tuple[type[amp.Command], dict[str, Any]]:
    """The AMP command and arguments that carry ``msg``."""
    name = type(msg).__name__
    payload = json.dumps(swim.message_to_dict(msg), separators=(",", ":")).encode()
    sent = time.time() if now is None else now
    nonce = os.urandom(12)
    return COMMANDS[name], {"version": VERSION, "sent": sent, "nonce": nonce, "payload": payload,
                            "mac": _mac(key, name, VERSION, sent, nonce, payload)}


class Dropped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Opener:
    """Checks and opens sealed messages; remembers nonces for the replay window."""

    def __init__(self, keys: PeerKeys, now: Callable[[], float] = time.time, max_nonces: int = 200_000) -> None:
        self.keys = keys
        self.now = now
        self.max_nonces = max_nonces
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def open(self, command: str, version: int, sent: float, nonce: bytes, payload: bytes, mac: bytes
             ) -> swim.Message:
        if version != VERSION:
            raise Dropped("version")
        if len(payload) > MAX_PAYLOAD:
            raise Dropped("oversized")
        if not any(hmac.compare_digest(mac, _mac(key, command, version, sent, nonce, payload))
                   for key in self.keys()):
            raise Dropped("bad_mac")
        now = self.now()
        if abs(now - sent) > WINDOW:
            raise Dropped("stale")
        self._forget(now)
        if nonce in self._seen:
            raise Dropped("replay")
        self._seen[nonce] = sent
        try:
            raw = json.loads(payload)
            msg = swim.message_from_dict(raw)
        except (ValueError, KeyError, TypeError):
            raise Dropped("malformed") from None
        if raw.get("type") != command:
            raise Dropped("malformed")
        return msg

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen and (len(seen) > self.max_nonces or next(iter(seen.values())) < now - 2 * WINDOW):
            seen.popitem(last=False)
