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

Notes: messages between nodes that are not the membership's (`Note`: split-and-stitch's
chunk offers and reports, gridnode/chunk_grid.py) are one command, ``ChunkNote``, sealed and
checked exactly as the membership's, handed to the node rather than the machine. A node of a
release before notes does not know the command: it counts it (``protocol_error``) and closes
that connection, so a note goes only to a node that says it takes them (its ``chunk_idle``
load figure); a node of this release drops a command it does not know (``unknown_command``)
and keeps the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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


class ChunkNote(_OneWay):
    """Split-and-stitch: a chunk offered to an idle node, or its holder telling the owner of it."""


@dataclass(frozen=True)
class Note:
    """A note from ``sender`` to ``dest`` (at ``dest_addr``) about ``task`` of ``job``: ``kind``
    is one of `NOTE_KINDS`. What the fields name is checked by whoever acts on it."""

    dest: str
    dest_addr: str
    sender: str
    kind: str
    job: str
    task: str


#: offer (owner to an idle node), claimed/done/failed/released (holder to owner), ended (owner to
#: holders: the job is over, drop its source)
NOTE_KINDS = frozenset({"offer", "claimed", "done", "failed", "released", "ended"})
#: the most characters of a note's field
NOTE_FIELD = 256


class Version(amp.Command):
    """The peer protocol version spoken here."""

    arguments = []
    response = [(b"version", amp.Integer())]


COMMANDS: dict[str, type[amp.Command]] = {c.__name__: c for c in (Ping, Ack, Nack, PingReq, Gossip, SyncDigest,
                                                                  SyncState)}
#: commands carrying a `Note`, for the node rather than the machine
NOTES: dict[str, type[amp.Command]] = {"ChunkNote": ChunkNote}


def _mac(key: bytes, command: str, version: int, sent: float, nonce: bytes, payload: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (command.encode(), str(version).encode(), repr(sent).encode(), nonce, payload):
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


def seal(key: bytes, msg: swim.Message | Note, now: float | None = None) -> tuple[type[amp.Command], dict[str, Any]]:
    """The AMP command and arguments that carry ``msg``."""
    command: type[amp.Command]
    if isinstance(msg, Note):
        name, command, body = "ChunkNote", ChunkNote, {"type": "ChunkNote", **asdict(msg)}
    else:
        name = type(msg).__name__
        command, body = COMMANDS[name], swim.message_to_dict(msg)
    payload = json.dumps(body, separators=(",", ":")).encode()
    sent = time.time() if now is None else now
    nonce = os.urandom(12)
    return command, {"version": VERSION, "sent": sent, "nonce": nonce, "payload": payload,
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
             ) -> swim.Message | Note:
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
            msg = note_from_dict(raw) if command in NOTES else swim.message_from_dict(raw)
        except (ValueError, KeyError, TypeError):
            raise Dropped("malformed") from None
        if raw.get("type") != command:
            raise Dropped("malformed")
        return msg

    def _forget(self, now: float) -> None:
        seen = self._seen
        while seen and (len(seen) > self.max_nonces or next(iter(seen.values())) < now - 2 * WINDOW):
            seen.popitem(last=False)


def note_from_dict(raw: dict[str, Any]) -> Note:
    """A `Note` from its payload: every field a short string, the kind a known one (a field
    added by a later release is left out)."""
    values = {name: raw[name] for name in ("dest", "dest_addr", "sender", "kind", "job", "task")}
    if not all(isinstance(v, str) and len(v) <= NOTE_FIELD for v in values.values()):
        raise ValueError("a note's fields are short strings")
    if values["kind"] not in NOTE_KINDS:
        raise ValueError(f"a note of kind {values['kind'][:20]!r}")
    return Note(**values)
