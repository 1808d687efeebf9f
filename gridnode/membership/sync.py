"""
Anti-entropy by buckets: what two members compare before they send any part of their tables,
and how a part is cut into messages that fit the wire.

Members are hashed by id into ``FINE`` buckets. A table's digest of a bucket is the XOR of a
64-bit hash of ``(id, incarnation, address)`` over the bucket's live (alive or suspect) members,
kept as the table changes (`Digests`): the state counts as live or not (in the digest or out).
Alive and suspect hash alike: a suspicion is news gossip spreads within a second or two, and with
them apart syncs at 5 % loss repaired what gossip was about to (N=1000: 9.76 messages a node a
second instead of 9.32). Coarser digests (any power of two up to
``FINE``) are XORs of neighbouring fine ones, so two members that count the pool differently
still compare like with like: a digest message says how many buckets it has.

The conversation (``SwimMachine``): a sync opens with the pool-wide digest (one bucket, 16 hex
digits, whatever N: the steady state costs the same at any size). Where it differs, the answer
is the answerer's per-bucket digests, about ``PER_BUCKET`` members a bucket; the opener then
sends its members of the buckets that differ and asks for the other side's (``want``). Only the
buckets that differ travel, each message at most ``MAX_MESSAGE_BYTES`` (`pack` splits a part
over as many messages as it needs). A joiner opens the same way.

Dead and left members are sent with their bucket (a member that missed a death learns of it) but
are not in the digests: members forget them at slightly different times (``reap_after``), and
that must not read as a difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import reduce
from operator import xor
from typing import TypeVar

FINE_BITS = 10
#: the finest buckets kept; a digest message has at most this many
FINE = 1 << FINE_BITS
#: live members per bucket a member aims at when it answers with its bucket digests: a differing
#: bucket then costs ~16 members each way, the digests 16 hex digits per 16 members
PER_BUCKET = 16
#: the most bytes of one message's compact JSON: the wire's payload limit (wire.MAX_PAYLOAD), under
#: AMP's 65,535-byte value limit
MAX_MESSAGE_BYTES = 60_000
_HEX = frozenset("0123456789abcdef")

T = TypeVar("T")


def bucket_of(member: str) -> int:
    """``member``'s fine bucket: the top bits of a hash of its id, the same on every node."""
    h = hashlib.blake2b(member.encode(), digest_size=8, person=b"gridnode-sync").digest()
    return int.from_bytes(h, "big") >> (64 - FINE_BITS)


def coarse(fine: int, buckets: int) -> int:
    """The bucket that fine bucket ``fine`` falls in when there are ``buckets`` of them."""
    return fine // (FINE // buckets)


def entry_hash(member: str, incarnation: int, address: str) -> int:
    h = hashlib.blake2b(f"{member}\0{incarnation}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def buckets_for(live: int) -> int:
    """How many buckets a member answers with when it holds ``live`` members live: a power of two,
    about ``PER_BUCKET`` members each, at most ``FINE``."""
    n = 1
    while n < FINE and n * PER_BUCKET < live:
        n *= 2
    return n


def valid_count(buckets: int) -> bool:
    return 1 <= buckets <= FINE and buckets & (buckets - 1) == 0


class Digests:
    """A table's per-bucket digests, kept as members come, change and go."""

    __slots__ = ("fine",)

    def __init__(self) -> None:
        self.fine = [0] * FINE

    def toggle(self, member: str, incarnation: int, address: str, fine: int | None = None) -> None:
        """Add a live member's entry if it is not in, take it out if it is (XOR)."""
        i = bucket_of(member) if fine is None else fine
        self.fine[i] ^= entry_hash(member, incarnation, address)

    def fold(self, buckets: int) -> list[int]:
        width = FINE // buckets
        fine = self.fine
        return [reduce(xor, fine[i:i + width], 0) for i in range(0, FINE, width)]

    def encode(self, buckets: int) -> str:
        """The digest of each of ``buckets`` buckets, 16 hex digits each, end to end."""
        return "".join(f"{d:016x}" for d in self.fold(buckets))


def decode(text: str) -> list[int]:
    """The bucket digests of a digest message; ValueError unless 16 hex digits each, a power of
    two of them, at most ``FINE``."""
    if not isinstance(text, str) or len(text) % 16 or not valid_count(len(text) // 16) or not _HEX.issuperset(text):
        raise ValueError("a sync digest is 16 lower-case hex digits per bucket, 1 to 1024 buckets, a power of two")
    return [int(text[i:i + 16], 16) for i in range(0, len(text), 16)]


def check_want(buckets: int, want: Sequence[int]) -> None:
    """ValueError unless ``want`` names distinct buckets of ``buckets`` (0: no buckets, no want)."""
    if type(buckets) is not int or not (buckets == 0 or valid_count(buckets)):
        raise ValueError(f"bucket count {buckets!r} is not a power of two up to {FINE}")
    if len(set(want)) != len(want) or not all(type(i) is int and 0 <= i < buckets for i in want):
        raise ValueError(f"want {list(want)!r} is not a set of buckets below {buckets}")


def differing(ours: Sequence[int], theirs: Sequence[int]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]


def pack(parts: Sequence[tuple[int, Sequence[T]]], size_of: Callable[[T], int], room: int
         ) -> list[tuple[list[T], list[int]]]:
    """Cut ``parts`` (bucket, its entries) into messages: (entries, buckets first seen in it).

    ``room`` is the bytes a message has for them once its other fields are counted. An entry
    costs its ``size_of`` plus a comma, a bucket number its digits plus a comma. A bucket is named
    once, in the message its first entry goes in (an empty one in the current message), so the
    answer to each bucket comes once. An entry larger than ``room`` on its own goes alone: the
    sender finds it over the limit and counts it (it cannot be cut)."""
    out: list[tuple[list[T], list[int]]] = []
    entries: list[T] = []
    named: list[int] = []
    used = 0

    def flush() -> None:
        nonlocal entries, named, used
        if entries or named:
            out.append((entries, named))
        entries, named, used = [], [], 0

    for bucket, items in parts:
        cost = len(str(bucket)) + 1
        first = size_of(items[0]) + 1 if items else 0
        if used and used + cost + first > room:
            flush()
        named.append(bucket)
        used += cost
        for item in items:
            size = size_of(item) + 1
            if used + size > room and entries:
                flush()
            entries.append(item)
            used += size
    flush()
    return out
