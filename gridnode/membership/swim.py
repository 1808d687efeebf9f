"""
SWIM + Lifeguard membership, sans I/O.

``SwimMachine`` is a plain object. The I/O layer feeds it ``receive(message, now)``
and ``tick(now)`` (call it at ``next_deadline()``, after delivering what has already
arrived: a tick decides on missing acks), and sends or acts on what those calls
return: wire messages (dataclasses with a ``dest`` member id and ``dest_addr``)
and events (``MemberChanged``, ``ConfirmedDead``). No sockets, no reactor, no wall
clock: time is the ``now`` float passed in, randomness the ``random.Random`` given.

Protocol choices, and why:

- Probing (SWIM): one member per protocol period, round-robin over a list shuffled
  every round, so every member is probed within a bounded time. No ack within
  ``probe_timeout``: ``PingReq`` through ``indirect_k`` random members; still no ack
  at the end of the period: the target becomes *suspect*. Relays that get no ack
  answer with a ``Nack`` (Lifeguard), so a requester whose nacks are missing knows the
  trouble is on its side.
- Local health (Lifeguard LHM): missed acks, missing nacks, having to refute and
  noticing our own stall (a timer that fires late: our reactor was blocked) raise a
  score 0..``health_max``; a good probe lowers it. Probe interval and timeout are
  scaled by ``1 + score``, so a slow node probes less and accuses less. A timer that
  fires late is deferred once so that the messages sent during our own stall (acks,
  refutations), which may still be on their way, are read before we accuse anyone.
- Suspicion (Lifeguard): the timeout starts at ``max`` and shrinks toward ``min`` as
  independent suspicions of the same incarnation (distinct ``origin``) arrive:
  ``max(min, max - (max - min) * log(C + 1) / log(K + 1))``. ``min`` must exceed the
  longest reactor stall we tolerate (a stalled member is indistinguishable from a dead
  one until it wakes). When the timeout runs out we send one last direct ping plus k
  ping-reqs and declare death only if none is answered: gossip is probabilistic and a
  refutation may have missed us. Every ping-req carries what the requester holds about a
  suspect target, and a relay that holds a newer incarnation (the target refuted since) tells
  the requester at once: a requester that missed the refutation, say while it was stalled
  itself, would otherwise declare dead a target that happens to stall just then. A death
  backed by one accuser only stays local (not
  gossiped): a lone accuser is more likely cut off itself. A dead entry received in a
  full-state sync counts as a suspicion (as in memberlist).
- Refused connections (TCP, not in SWIM's UDP world): the I/O layer reports a
  connection to a member's address that was actively refused (``refused``). No
  process listens there: the member's process is gone (a stalled member's kernel
  still accepts, a lossy link drops rather than refuses). We suspect it at once, ask
  ``indirect_k`` relays to try it too (they get refused in turn and become
  independent suspectors), and our timeout for that incarnation is the short
  ``gone_suspicion_mult`` periods. The rules for spreading and confirming a death
  do not change, so a node cut off from everyone by a rejecting firewall still
  confirms nothing.
- Silent hosts (TCP again): a vanished host (power or network lost) is silence,
  which a stalled member also is, until the longest stall we tolerate has passed.
  Its kernel tells them apart: a stalled member's kernel still acknowledges TCP
  segments, a vanished one does not. Each member has ``watchers`` watchers, the
  members just before it on a hash ring of the live members; a watcher keeps a
  standing connection to it (``Watch``/``Unwatch``: only a connection made before
  the host vanished can show silence; a new one just fails to connect). When a
  watched member becomes suspect the watcher asks its kernel (``CheckHost``): the
  I/O layer sends a few small frames over that connection and, if none was
  acknowledged, reports ``host_silent``. That counts as a refusal does (the short
  timeout). A suspector tells the suspect's watchers directly, so they check at
  once. Loss alone makes a false report unlikely (every frame and every
  acknowledgement lost), and the last-chance check and the confirmation rule still
  apply.
- Buddy system: a member we suspect is told so directly (right away, and in every
  probe or answer we send it), so it refutes at once by bumping its incarnation.
- Dissemination: updates are piggybacked on every ping/ack/ping-req, and pushed to
  ``gossip_fanout`` random members every ``gossip_interval`` *only while there is
  something to say*; each update is sent ``retransmit_mult * ceil(log10(N + 1))`` times,
  up to ``max_piggyback`` to a message (the least sent first), so a burst of news (many
  hosts gone at once) goes out in a few large messages rather than queueing.
  The steady state thus costs one ping and one ack per member per period.
- Anti-entropy (gridnode/membership/sync.py): every ``sync_interval`` the pool-wide digest
  of the live table goes to one random member; where it differs, the two compare per-bucket
  digests and push-pull only the buckets that differ, each message under the wire's size
  limit, so steady-state sync bytes do not grow with N and a repair costs the difference, not
  the table. A joiner opens the same way. A share of syncs goes to members held dead, so that
  both sides of a healed partition find each other again.
- Precedence: an update wins over the held state iff ``(incarnation, rank)`` is greater,
  rank alive < suspect < dead < left: a join-semilattice, so merge order does not
  matter.
- Confirmed death (who may delete a registry record): only a member whose own
  suspicion timer ran out, and only if a second member independently suspected that
  incarnation, or ``registry_stale`` says the peer's heartbeat is stale. A node cut off
  from everyone hears no second suspector, so it never confirms a death.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import json
import math
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from gridnode.membership import sync

ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"
_RANK = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
STATES = tuple(_RANK)


@dataclass(frozen=True)
class SwimConfig:
    """Timings in seconds. Defaults: memberlist's LAN profile, tuned (see bench/membership_sim.py)."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.4
    indirect_k: int = 3
    #: suspicion min = suspicion_min_mult * probe_interval. With the last-chance check (2 probe
    #: timeouts) it must outlast the longest stall we tolerate (5 s) even when the stall begins
    #: just after a suspicion that loss kept the member from refuting: 4.0 let one such stall be
    #: confirmed dead in 24 simulated hours at N=100 (bench/membership_sim.py); 4.5 and 5.0 none.
    #: (The false positives later seen at N=1000 with 4.5 were a last-chance check that judged a
    #: newer suspicion than its own: fixed, see ``_Probe.last_chance_of``.)
    suspicion_min_mult: float = 4.5
    #: suspicion max = suspicion_max_mult * min
    suspicion_max_mult: float = 3.0
    #: suspicion timeout (in probe periods) once we know the member's host is gone: our connection
    #: to it was refused, or its kernel stopped acknowledging our bytes (``refused``, ``host_silent``)
    gone_suspicion_mult: float = 1.0
    #: members that keep a standing connection to each member, to ask its kernel (``CheckHost``)
    watchers: int = 3
    retransmit_mult: int = 4
    health_max: int = 8
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    #: updates one message carries at most. Only a mass event fills the queue: with 300 of 1,000
    #: hosts gone at once, 8 a message made the deaths queue behind one another (dead everywhere
    #: p99 26 s in bench/membership_sim.py); 64 (~9 KB with EC2 names, under the wire's limit)
    #: 12-14 s. Each update is still sent `retransmit_limit` times: batching, not more traffic.
    max_piggyback: int = 64
    sync_interval: float = 30.0
    #: False: always exchange the full table (memberlist's push-pull), cut into messages that fit
    sync_digest: bool = True
    #: share of syncs sent to a member held dead (heals partitions; always when none is alive)
    sync_dead_fraction: float = 0.1
    #: a timer that fires this late means our own reactor was blocked
    stall_threshold: float = 0.25
    #: forget dead/left members after this long
    reap_after: float = 600.0

    def suspicion_bounds(self, n: int) -> tuple[float, float]:
        """(min, max) suspicion timeout for a cluster of ``n`` live members."""
        # n is kept for the memberlist-like log(N) term we do not need: the last-chance probe
        # at the end of a suspicion covers a refutation that has not reached us yet
        del n
        lo = self.suspicion_min_mult * self.probe_interval
        return lo, lo * self.suspicion_max_mult

    def retransmit_limit(self, n: int) -> int:
        """How many times each node sends each update: λ·log(N)."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


# ---------------------------------------------------------------- wire messages


@dataclass(frozen=True, slots=True)
class Update:
    """One membership fact. ``origin``: who suspected (suspect), who declared (dead), else the member."""

    member: str
    address: str
    incarnation: int
    state: str
    origin: str


@dataclass(slots=True)
class Message:
    dest: str
    dest_addr: str
    sender: str
    sender_addr: str
    sender_inc: int


@dataclass(slots=True)
class Ping(Message):
    seq: int
    updates: list[Update]


@dataclass(slots=True)
class Ack(Message):
    seq: int
    updates: list[Update]


@dataclass(slots=True)
class Nack(Message):
    seq: int


@dataclass(slots=True)
class PingReq(Message):
    seq: int
    target: str
    target_addr: str
    updates: list[Update]


@dataclass(slots=True)
class Gossip(Message):
    updates: list[Update]


@dataclass(slots=True)
class SyncDigest(Message):
    """``digest``: 16 hex digits per bucket (sync.py); one bucket opens a sync, more answer it."""

    digest: str
    count: int


@dataclass(slots=True)
class SyncState(Message):
    """Our members of some buckets (of ``buckets``; 0: the whole table). ``want``: the buckets the
    receiver should send back its members of (``reply`` says whether there are any)."""

    members: list[Update]
    reply: bool
    buckets: int = 0
    want: list[int] = field(default_factory=list)


MESSAGE_TYPES: dict[str, type[Message]] = {
    c.__name__: c for c in (Ping, Ack, Nack, PingReq, Gossip, SyncDigest, SyncState)
}
_UPDATE_FIELDS = ("updates", "members")


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A JSON-ready dict: ``{"type": "Ping", ...fields}``; updates become lists of dicts."""
    d: dict[str, Any] = {"type": type(msg).__name__}
    for f in fields(msg):
        v = getattr(msg, f.name)
        if f.name in _UPDATE_FIELDS:
            v = [[u.member, u.address, u.incarnation, u.state, u.origin] for u in v]
        d[f.name] = v
    return d


def message_from_dict(d: dict[str, Any]) -> Message:
    """Inverse of ``message_to_dict``; raises KeyError/TypeError/ValueError on bad input."""
    cls = MESSAGE_TYPES[d["type"]]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in d and (f.default is not MISSING or f.default_factory is not MISSING):
            continue  # a field added since: an older member leaves it out
        v = d[f.name]
        if f.name in _UPDATE_FIELDS:
            v = [Update(str(m), str(a), int(i), _check_state(s), str(o)) for m, a, i, s, o in v]
        kwargs[f.name] = v
    msg = cls(**kwargs)
    if isinstance(msg, SyncDigest):
        sync.decode(msg.digest)
    elif isinstance(msg, SyncState):
        sync.check_want(msg.buckets, msg.want)
    return msg


def _check_state(s: Any) -> str:
    if s not in _RANK:
        raise ValueError(f"unknown member state {s!r}")
    return str(s)


def encoded_size(msg: Message) -> int:
    """Bytes of the compact JSON encoding: the figure used for sync-bytes budgets."""
    return len(json.dumps(message_to_dict(msg), separators=(",", ":")))


def _update_size(u: Update) -> int:
    return len(json.dumps([u.member, u.address, u.incarnation, u.state, u.origin], separators=(",", ":")))


def supersedes(new: Update, held: Update) -> bool:
    """True iff ``new`` replaces ``held`` (same member): higher (incarnation, rank)."""
    return (new.incarnation, _RANK[new.state]) > (held.incarnation, _RANK[held.state])


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MemberChanged:
    """Our view of ``member`` changed to ``state`` at ``incarnation``."""

    member: str
    address: str
    state: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class ConfirmedDead:
    """We may delete ``member``'s registry record if it still holds ``incarnation``."""

    member: str
    address: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberView:
    member: str
    address: str
    state: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Watch:
    """We are one of ``member``'s watchers: keep a standing connection to ``address``."""

    member: str
    address: str


@dataclass(frozen=True, slots=True)
class Unwatch:
    """We no longer watch ``member``: close the standing connection."""

    member: str


@dataclass(frozen=True, slots=True)
class CheckHost:
    """Ask ``member``'s kernel over the standing connection; call ``host_silent`` if it does not answer."""

    member: str
    address: str


Output = Message | MemberChanged | ConfirmedDead | Watch | Unwatch | CheckHost

# ---------------------------------------------------------------- internals

_T_PROBE, _T_ACK, _T_PROBE_END, _T_RELAY, _T_SUSPECT, _T_GOSSIP, _T_SYNC, _T_REAP, _T_FINAL = range(9)
# timers that decide about others: when late (we were stalled) they wait for the queued messages
_DEFERRABLE = frozenset((_T_ACK, _T_PROBE_END, _T_RELAY, _T_SUSPECT, _T_FINAL))


class _Member:
    __slots__ = ("id", "address", "incarnation", "state", "origin", "changed", "bucket")

    def __init__(self, id: str, address: str, incarnation: int, state: str, origin: str, changed: float) -> None:
        self.id = id
        self.address = address
        self.incarnation = incarnation
        self.state = state
        self.origin = origin
        self.changed = changed
        #: its fine sync bucket (sync.bucket_of), hashed once
        self.bucket = sync.bucket_of(id)

    def update(self) -> Update:
        return Update(self.id, self.address, self.incarnation, self.state, self.origin or self.id)


class _Suspicion:
    __slots__ = ("incarnation", "start", "suspectors", "deadline", "checking")

    def __init__(self, incarnation: int, start: float, suspectors: set[str]) -> None:
        self.incarnation = incarnation
        self.start = start
        self.suspectors = suspectors
        self.deadline = start
        self.checking = False


class _Probe:
    __slots__ = ("seq", "target", "acked", "nacks", "expected_nacks", "last_chance_of")

    def __init__(self, seq: int, target: str, last_chance_of: _Suspicion | None = None) -> None:
        self.seq = seq
        self.target = target
        self.acked = False
        self.nacks = 0
        self.expected_nacks = 0
        #: the suspicion this probe is the last-chance check of: its verdict is about that one only
        self.last_chance_of = last_chance_of


def _ring_point(member: str) -> tuple[int, str]:
    h = hashlib.blake2b(member.encode(), digest_size=8, person=b"gridnode-ring").digest()
    return int.from_bytes(h, "big"), member


class SwimMachine:
    """The membership state machine of one node. Every method returns the outputs to act on."""

    def __init__(
        self,
        me: str,
        address: str,
        *,
        config: SwimConfig | None = None,
        rng: random.Random | None = None,
        incarnation: int = 0,
        now: float = 0.0,
    ) -> None:
        self.me = me
        self.address = address
        self.config = config or SwimConfig()
        self._rng = rng or random.Random()
        self._inc = incarnation
        self._now = now
        self._health = 0
        self._left = False
        self._started = False
        self._members: dict[str, _Member] = {}
        # alive+suspect members other than us: O(1) random choice and removal
        self._live: list[str] = []
        self._live_pos: dict[str, int] = {}
        self._dead: list[str] = []  # dead (not left) members, for the occasional healing sync
        self._deaths: deque[float] = deque()  # when we learned of each recent death (down_count)
        self._dead_pos: dict[str, int] = {}
        self._probe_list: list[str] = []
        self._probe_idx = 0
        # per-bucket digests of the live table, us included (sync.py)
        self._digests = sync.Digests()
        self._bucket = sync.bucket_of(me)
        self._digests.toggle(me, incarnation, address, self._bucket)
        self._timers: list[tuple[float, int, int, Any]] = []
        self._tseq = 0
        self._seq = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, tuple[str, str, int, str]] = {}  # our seq -> (requester, addr, seq, target)
        self._suspicions: dict[str, _Suspicion] = {}
        self._queue: dict[str, list[Any]] = {}  # member -> [Update, transmits]
        self._gossip_armed = False
        self._stale: dict[str, int] = {}  # registry-stale witness: member -> incarnation
        self._pending: dict[str, tuple[int, set[str]]] = {}  # declared dead by us, not yet confirmed
        self._confirmed: dict[str, int] = {}
        self._gone: dict[str, int] = {}  # member -> incarnation whose host we know gone (refused/silent)
        # the hash ring of live members and us: we watch the ``watchers`` members after us
        self._ring: list[tuple[int, str]] = [_ring_point(me)]
        self._watching: dict[str, str] = {}  # member -> address
        self._checked: dict[str, int] = {}  # member -> incarnation whose host we asked about
        self._last_stall = -math.inf
        # applying many updates at once (add_members, a SyncState): the ring is looked at once, after
        self._batch = False
        self._rewatch_due = False

    # ------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def health(self) -> int:
        """Lifeguard local health score, 0 (good) .. config.health_max."""
        return self._health

    def add_members(self, members: Iterable[tuple[str, str]], now: float,
                    incarnations: Mapping[str, int] | None = None) -> list[Output]:
        """Bootstrap from the registry: (member id, address) pairs, unknown ones added as alive at
        the incarnation their record gives (0 where none is given). With the record's number, a
        member that dies before we ever hear from it is confirmed dead at the life its record is
        of, so that record is deleted."""
        self._now = now
        out: list[Output] = []
        known = incarnations or {}
        self._batch = True
        try:
            for member, address in members:
                if member != self.me and member not in self._members:
                    self._apply(Update(member, address, known.get(member, 0), ALIVE, member), out)
                    self._queue.pop(member, None)  # the registry told everyone already: not news
        finally:
            self._end_batch(out)
        return out

    def add_member(self, member: str, address: str, incarnation: int, now: float) -> list[Output]:
        """Admit ``member`` alive at ``incarnation``; a rejoin with a higher incarnation re-admits it."""
        self._now = now
        out: list[Output] = []
        if member != self.me:
            self._apply(Update(member, address, incarnation, ALIVE, member), out)
        return out

    def start(self, now: float, *, join: bool = True) -> list[Output]:
        """Arm the timers. ``join``: announce ourselves and open a sync with one member at once."""
        self._now = now
        self._started = True
        out: list[Output] = []
        cfg = self.config
        self._push(now + self._rng.random() * cfg.probe_interval, _T_PROBE, None)
        self._push(now + cfg.sync_interval * (0.5 + self._rng.random()), _T_SYNC, None)
        if self._queue:
            self._gossip_armed = True
            self._push(now + cfg.gossip_interval, _T_GOSSIP, None)
        if join:
            self._enqueue(self._self_update(), first=True)
            for peer in self._sample(1, ()):
                self._open_sync(peer, self._members[peer].address, out)
        return out

    def sync_now(self, now: float) -> list[Output]:
        """Open a sync with one live member now: a node that knew no one when it started, seeded
        later (a few registry records), joins this way (``start``'s join found no one)."""
        self._now = now
        out: list[Output] = []
        if self._started and not self._left:
            for peer in self._sample(1, ()):
                self._open_sync(peer, self._members[peer].address, out)
        return out

    def leave(self, now: float) -> list[Output]:
        """Graceful leave: gossip ``left`` to 2*fanout members now; the machine then goes quiet."""
        self._now = now
        out: list[Output] = []
        if self._left:
            return out
        self._left = True
        u = Update(self.me, self.address, self._inc, LEFT, self.me)
        for peer in self._sample(2 * self.config.gossip_fanout, ()):
            out.append(Gossip(peer, self._members[peer].address, *self._hdr(), [u]))
        return out

    def registry_stale(self, member: str, incarnation: int | None, now: float) -> list[Output]:
        """External witness: ``member``'s registry heartbeat (at ``incarnation``; None: current) is stale."""
        self._now = now
        out: list[Output] = []
        m = self._members.get(member)
        if m is None:
            return out
        inc = m.incarnation if incarnation is None else incarnation
        self._stale[member] = inc
        pending = self._pending.get(member)
        if pending is not None and pending[0] == inc:
            self._confirm_death(m, out)
        return out

    def refused(self, member: str, address: str, now: float) -> list[Output]:
        """The I/O layer: a connection to ``member`` at ``address`` was actively refused."""
        self._now = now
        out: list[Output] = []
        relaying = any(target == member for _, _, _, target in self._relays.values())
        m = self._host_gone(member, address, out, relaying)
        if m is None:
            return out  # not news: our own probes, buddy notes and relays keep getting refused
        if not relaying and not any(p.target == member and p.expected_nacks for p in self._probes.values()):
            # no need to wait for an ack timeout: have relays try it now. A relay refused does not
            # fan out again (its requester asked others already and told the watchers): its
            # refusal goes back to the requester as a witness, below
            seq = self._next_seq()
            p = self._probes[seq] = _Probe(seq, member)
            self._ping_req(p, m, out)
            self._push(now + self.config.probe_interval * (1 + self._health), _T_PROBE_END, seq)
        mine = Update(m.id, m.address, m.incarnation, SUSPECT, self.me)
        for requester, addr, _, target in list(self._relays.values()):
            if target == member and requester in self._live_pos:
                # we relay a probe for ``requester``: our refusal is its second witness
                out.append(Gossip(requester, addr, *self._hdr(), [mine]))
        return out

    def host_silent(self, member: str, address: str, now: float) -> list[Output]:
        """The I/O layer (after ``CheckHost``): ``member``'s kernel acknowledged none of our frames."""
        self._now = now
        out: list[Output] = []
        if self._host_gone(member, address, out) is not None:
            s = self._suspicions.get(member)
            if s is not None and s.deadline > now and len(s.suspectors) >= 2:
                # the check itself was the wait; another member suspects it too: last chance now
                s.deadline = now
                self._push(now, _T_SUSPECT, member)
        return out

    def watching(self) -> dict[str, str]:
        """The members we watch (member -> address)."""
        return dict(self._watching)

    def watchers_of(self, member: str, count: int | None = None) -> list[str]:
        """The members that watch ``member`` (as we see the ring; us included), nearest first;
        ``count``: that many of the live members before it (default: its ``watchers``)."""
        ring = self._ring
        i = bisect.bisect_left(ring, _ring_point(member))
        found = i < len(ring) and ring[i][1] == member
        others = len(ring) - found
        count = self.config.watchers if count is None else count
        return [ring[(i - j) % len(ring)][1] for j in range(1, min(count, others) + 1)]

    def successors(self, count: int) -> list[str]:
        """The ``count`` live members after us on the ring, nearest first (the first ``watchers``
        are those we watch; we are among the first ``count`` watchers of each of them)."""
        ring = self._ring
        i = bisect.bisect_left(ring, _ring_point(self.me))
        return [ring[(i + j) % len(ring)][1] for j in range(1, min(count, len(ring) - 1) + 1)]

    def down_count(self, within: float = 60.0) -> int:
        """Members held suspect now, and deaths we learned of in the last ``within`` s."""
        deaths = self._deaths
        while deaths and deaths[0] < self._now - within:
            deaths.popleft()
        return len(deaths) + len(self._suspicions)

    def is_confirmed_dead(self, member: str) -> bool:
        """True if we declared ``member`` dead and that death is confirmed (see module docstring)."""
        m = self._members.get(member)
        return m is not None and m.state == DEAD and self._confirmed.get(member) == m.incarnation

    def holds_dead(self, member: str) -> bool:
        """True if we hold ``member`` dead on two members' word: we confirmed the death, or a peer
        declared it (a death spreads only when two members suspected it; one whose only accuser
        is us stays here, unconfirmed, and a dead entry in a sync is only a suspicion)."""
        m = self._members.get(member)
        return m is not None and m.state == DEAD and (m.origin != self.me or
                                                      self._confirmed.get(member) == m.incarnation)

    def member(self, member: str) -> MemberView | None:
        if member == self.me:
            return MemberView(self.me, self.address, LEFT if self._left else ALIVE, self._inc)
        m = self._members.get(member)
        return None if m is None else MemberView(m.id, m.address, m.state, m.incarnation)

    def members(self) -> list[MemberView]:
        """Every member we know (ourselves included), for /peers."""
        views = [MemberView(m.id, m.address, m.state, m.incarnation) for m in self._members.values()]
        return [MemberView(self.me, self.address, LEFT if self._left else ALIVE, self._inc), *views]

    def suspicion_deadline(self, member: str) -> float | None:
        """When our suspicion of ``member`` runs out (None: not suspected)."""
        s = self._suspicions.get(member)
        return None if s is None else s.deadline

    def live_count(self) -> int:
        """Alive and suspect members, ourselves included."""
        return len(self._live) + 1

    def digest(self, buckets: int = 1) -> tuple[str, int]:
        """Our live table's digest in ``buckets`` buckets (sync.py), and how many it holds live."""
        return self._digests.encode(buckets), len(self._live) + 1

    def next_deadline(self) -> float | None:
        """When ``tick`` should next be called (None: nothing armed)."""
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> list[Output]:
        """Run every timer due at ``now``."""
        self._now = now
        out: list[Output] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, key = heapq.heappop(timers)
            if self._left:
                continue
            if now - when > self.config.stall_threshold and kind in _DEFERRABLE:
                self._defer(kind, key, now)
                continue
            self._fire(kind, key, now, out)
        return out

    def receive(self, msg: Message, now: float) -> list[Output]:
        """Handle one message addressed to us."""
        self._now = now
        out: list[Output] = []
        if self._left:
            return out
        self._heard_from(msg.sender, msg.sender_addr, msg.sender_inc, out)
        t = type(msg)
        if t is Ping:
            assert isinstance(msg, Ping)
            self._apply_all(msg.updates, out)
            out.append(Ack(msg.sender, msg.sender_addr, *self._hdr(), msg.seq, self._piggyback(msg.sender)))
        elif t is Ack:
            assert isinstance(msg, Ack)
            self._apply_all(msg.updates, out)
            self._on_ack(msg.seq, out)
        elif t is Nack:
            assert isinstance(msg, Nack)
            p = self._probes.get(msg.seq)
            if p is not None:
                p.nacks += 1
        elif t is PingReq:
            assert isinstance(msg, PingReq)
            self._apply_all(msg.updates, out)
            known = self._members.get(msg.target)
            if known is not None and known.state == ALIVE and any(
                    u.member == msg.target and u.incarnation < known.incarnation for u in msg.updates):
                # the requester accuses an incarnation that has refuted since: tell it (it may have
                # missed the refutation, e.g. while stalled, and the target may be stalled right now)
                out.append(Gossip(msg.sender, msg.sender_addr, *self._hdr(), [known.update()]))
            seq = self._next_seq()
            self._relays[seq] = (msg.sender, msg.sender_addr, msg.seq, msg.target)
            out.append(Ping(msg.target, msg.target_addr, *self._hdr(), seq, self._piggyback(msg.target)))
            self._push(now + 0.8 * self.config.probe_timeout, _T_RELAY, seq)
        elif t is Gossip:
            assert isinstance(msg, Gossip)
            self._apply_all(msg.updates, out)
        elif t is SyncDigest:
            assert isinstance(msg, SyncDigest)
            self._on_digest(msg, out)
        elif t is SyncState:
            assert isinstance(msg, SyncState)
            self._batch = True
            try:
                for u in msg.members:
                    # a remote death becomes a suspicion here (as memberlist does): the sender's
                    # table may be stale (it was cut off), and a live member then gets to refute
                    held = Update(u.member, u.address, u.incarnation, SUSPECT, u.origin) if u.state == DEAD else u
                    self._apply(held, out)
            finally:
                self._end_batch(out)
            if msg.want:
                self._send_buckets(msg.sender, msg.sender_addr, msg.buckets, msg.want, False, out)
            elif msg.reply and not msg.buckets:
                # an older member's whole table, asking for ours
                self._send_buckets(msg.sender, msg.sender_addr, 1, [0], False, out)
        return out

    # ------------------------------------------------------------ timers

    def _push(self, when: float, kind: int, key: Any) -> None:
        self._tseq += 1
        heapq.heappush(self._timers, (when, self._tseq, kind, key))

    def _defer(self, kind: int, key: Any, now: float) -> None:
        """Our reactor was blocked: read what queued up before deciding; blame ourselves a bit."""
        cfg = self.config
        if now - self._last_stall > cfg.probe_interval:
            self._health = min(cfg.health_max, self._health + 1)
        self._last_stall = now
        scale = 1 + self._health
        if kind == _T_ACK:
            self._push(now + cfg.probe_timeout * scale, kind, key)
        elif kind == _T_PROBE_END:
            self._push(now + cfg.probe_interval * scale, kind, key)
        elif kind == _T_RELAY:
            self._push(now + 0.8 * cfg.probe_timeout, kind, key)
        elif kind == _T_FINAL:
            self._push(now + 2 * cfg.probe_timeout, kind, key)
        else:
            s = self._suspicions.get(key)
            if s is not None:
                s.deadline = max(s.deadline, now + cfg.probe_timeout)
                self._push(s.deadline, kind, key)

    def _fire(self, kind: int, key: Any, now: float, out: list[Output]) -> None:
        cfg = self.config
        if kind == _T_PROBE:
            self._probe(now, out)
        elif kind == _T_ACK:
            p = self._probes.get(key)
            if p is not None and not p.acked and not p.expected_nacks:
                m = self._members.get(p.target)
                if m is not None:
                    self._ping_req(p, m, out)
        elif kind == _T_PROBE_END:
            p = self._probes.pop(key, None)
            if p is not None and not p.acked:
                missing = p.expected_nacks - p.nacks if p.expected_nacks else 1
                self._health = min(cfg.health_max, self._health + missing)
                m = self._members.get(p.target)
                if m is not None and m.state in (ALIVE, SUSPECT):
                    self._suspect(m, out)
        elif kind == _T_RELAY:
            r = self._relays.pop(key, None)
            if r is not None:
                out.append(Nack(r[0], r[1], *self._hdr(), r[2]))
        elif kind == _T_SUSPECT:
            s = self._suspicions.get(key)
            m = self._members.get(key)
            if s is not None and m is not None and s.deadline <= now and m.state == SUSPECT and not s.checking:
                self._last_chance(m, s, out)
        elif kind == _T_FINAL:
            p = self._probes.pop(key, None)
            if p is not None:
                m = self._members.get(p.target)
                s = self._suspicions.get(p.target)
                # Only the suspicion this check was for: the member may have refuted and been
                # suspected again meanwhile, and that newer suspicion has its own full timeout.
                if (m is not None and s is not None and s is p.last_chance_of and m.state == SUSPECT
                        and s.incarnation == m.incarnation):
                    if p.acked:
                        # it answered but has not refuted yet (it will: our ping told it); start over
                        s.checking = False
                        s.start = now
                        self._reschedule(m.id, s)
                    else:
                        self._declare_dead(m, s, out)
        elif kind == _T_GOSSIP:
            self._gossip(now, out)
        elif kind == _T_SYNC:
            self._push(now + cfg.sync_interval * (0.5 + self._rng.random()), _T_SYNC, None)
            peers = self._sample(1, ())
            if self._dead and (not peers or self._rng.random() < cfg.sync_dead_fraction):
                # now and then (always, if we hold no one alive) sync with a member we hold dead:
                # a healed partition heals the tables too, on either side
                peers = [self._dead[self._rng.randrange(len(self._dead))]]
            for peer in peers:
                addr = self._members[peer].address
                if cfg.sync_digest:
                    self._open_sync(peer, addr, out)
                else:
                    self._send_buckets(peer, addr, 1, [0], True, out)
        elif kind == _T_REAP:
            m = self._members.get(key)
            if m is not None and m.state in (DEAD, LEFT) and m.changed + cfg.reap_after <= now:
                del self._members[key]
                self._bag_remove(self._dead, self._dead_pos, key)
                self._pending.pop(key, None)
                self._confirmed.pop(key, None)
                self._stale.pop(key, None)
                self._gone.pop(key, None)
                self._checked.pop(key, None)

    # ------------------------------------------------------------ probing

    def _probe(self, now: float, out: list[Output]) -> None:
        cfg = self.config
        scale = 1 + self._health
        self._push(now + cfg.probe_interval * scale, _T_PROBE, None)
        target = self._next_target()
        if target is None:
            return
        m = self._members[target]
        seq = self._next_seq()
        self._probes[seq] = _Probe(seq, target)
        out.append(Ping(target, m.address, *self._hdr(), seq, self._piggyback(target)))
        self._push(now + cfg.probe_timeout * scale, _T_ACK, seq)
        self._push(now + cfg.probe_interval * scale, _T_PROBE_END, seq)

    def _next_target(self) -> str | None:
        for _ in range(2):
            lst = self._probe_list
            while self._probe_idx < len(lst):
                t = lst[self._probe_idx]
                self._probe_idx += 1
                if t in self._live_pos:
                    return t
            # a new round: reshuffle so that probe order is not predictable
            self._probe_list = list(self._live)
            self._rng.shuffle(self._probe_list)
            self._probe_idx = 0
        return None

    def _ping_req(self, p: _Probe, m: _Member, out: list[Output]) -> None:
        for relay in self._sample(self.config.indirect_k, (p.target,)):
            ups = self._piggyback(relay)
            if m.state == SUSPECT and not any(u.member == m.id for u in ups):
                # what we hold about the target: a relay that knows better says so (never a death
                # of ours: one we alone declared must not spread)
                ups.insert(0, m.update())
            out.append(PingReq(relay, self._members[relay].address, *self._hdr(), p.seq, m.id, m.address, ups))
            p.expected_nacks += 1

    def _on_ack(self, seq: int, out: list[Output]) -> None:
        p = self._probes.get(seq)
        if p is not None:
            if not p.acked:
                p.acked = True
                self._health = max(0, self._health - 1)
            return
        r = self._relays.pop(seq, None)
        if r is not None:
            out.append(Ack(r[0], r[1], *self._hdr(), r[2], self._piggyback(r[0])))

    # ------------------------------------------------------------ suspicion

    def _suspect(self, m: _Member, out: list[Output], tell_watchers: bool = True) -> None:
        """Our own probe of ``m`` failed (or a relayed one: its requester tells the watchers)."""
        self._apply(Update(m.id, m.address, m.incarnation, SUSPECT, self.me), out)
        # buddy system: tell the accused right away so that it can refute
        out.append(Gossip(m.id, m.address, *self._hdr(), self._piggyback(m.id)))
        # and its watchers, so that they ask its kernel now rather than when gossip reaches them
        mine = [Update(m.id, m.address, m.incarnation, SUSPECT, self.me)]
        for w in self.watchers_of(m.id) if tell_watchers else ():
            watcher = self._members.get(w)
            if watcher is not None and watcher.state in (ALIVE, SUSPECT) and w != m.id:
                out.append(Gossip(w, watcher.address, *self._hdr(), mine))

    def _host_gone(self, member: str, address: str, out: list[Output], relaying: bool = False) -> _Member | None:
        """The I/O layer found ``member``'s host at ``address`` gone (refused or silent). If that is
        news (we hold it live there, and not yet gone at this incarnation), suspect it with the
        short timeout and return it; else None."""
        m = self._members.get(member)
        if self._left or m is None or m.address != address or m.state not in (ALIVE, SUSPECT):
            return None
        if self._gone.get(member) == m.incarnation:
            return None
        self._gone[m.id] = m.incarnation
        self._suspect(m, out, tell_watchers=not relaying)
        s = self._suspicions.get(m.id)
        if s is not None:
            self._reschedule(m.id, s)
        return m

    def _start_suspicion(self, m: _Member, origin: str, out: list[Output]) -> None:
        s = _Suspicion(m.incarnation, self._now, {origin})
        self._suspicions[m.id] = s
        self._reschedule(m.id, s)
        if m.id in self._watching and self._checked.get(m.id) != m.incarnation:
            self._checked[m.id] = m.incarnation
            out.append(CheckHost(m.id, m.address))

    def _reschedule(self, member: str, s: _Suspicion) -> None:
        n = len(self._live) + 1
        lo, hi = self.config.suspicion_bounds(n)
        k = min(self.config.indirect_k, n - 2)
        c = len(s.suspectors) - 1
        timeout = lo if k < 1 else max(lo, hi - (hi - lo) * math.log(c + 1) / math.log(k + 1))
        if self._gone.get(member) == s.incarnation:
            timeout = min(timeout, self.config.gone_suspicion_mult * self.config.probe_interval)
        # never in the past: a timer that fires late reads as a stall of our own
        s.deadline = max(s.start + timeout, self._now)
        self._push(s.deadline, _T_SUSPECT, member)

    def _add_suspector(self, m: _Member, inc: int, origin: str, u: Update) -> None:
        s = self._suspicions.get(m.id)
        if m.state == SUSPECT and s is not None and s.incarnation == inc and origin not in s.suspectors:
            s.suspectors.add(origin)
            self._reschedule(m.id, s)
            if len(s.suspectors) <= self.config.indirect_k + 1:
                # others shrink their timers too; beyond K+1 suspectors the timeout is at min anyway
                self._enqueue(u)
        pending = self._pending.get(m.id)
        if m.state == DEAD and pending is not None and pending[0] == inc and origin not in pending[1]:
            pending[1].add(origin)

    def _last_chance(self, m: _Member, s: _Suspicion, out: list[Output]) -> None:
        """Timeout reached: one direct and k indirect pings at once before declaring death.

        A member that was stalled (or whose refutation has not reached us: gossip is
        probabilistic) answers, and its answer carries its refutation.
        """
        s.checking = True
        seq = self._next_seq()
        p = _Probe(seq, m.id, last_chance_of=s)
        self._probes[seq] = p
        out.append(Ping(m.id, m.address, *self._hdr(), seq, self._piggyback(m.id)))
        self._ping_req(p, m, out)
        self._push(self._now + 2 * self.config.probe_timeout, _T_FINAL, seq)

    def _declare_dead(self, m: _Member, s: _Suspicion, out: list[Output]) -> None:
        del self._suspicions[m.id]
        self._apply(Update(m.id, m.address, m.incarnation, DEAD, self.me), out)
        n = len(self._live) + 1
        if len(s.suspectors) < 2 and min(self.config.indirect_k, n - 2) >= 1:
            # One accuser only: hold it dead here but do not spread it. A real death draws
            # independent suspicions (and then every node's own timer fires); a lone one is
            # more likely our own trouble (a partition) and would be a false death everywhere.
            self._queue.pop(m.id, None)
        self._pending[m.id] = (m.incarnation, s.suspectors)
        self._maybe_confirm(m, out)

    def _maybe_confirm(self, m: _Member, out: list[Output]) -> None:
        pending = self._pending.get(m.id)
        if pending is None or pending[0] != m.incarnation or m.state != DEAD:
            return
        if len(pending[1]) >= 2 or self._stale.get(m.id) == m.incarnation:
            self._confirm_death(m, out)

    def _confirm_death(self, m: _Member, out: list[Output]) -> None:
        pending = self._pending.get(m.id)
        if m.state != DEAD or pending is None or pending[0] != m.incarnation:
            return
        del self._pending[m.id]
        self._confirmed[m.id] = m.incarnation
        out.append(ConfirmedDead(m.id, m.address, m.incarnation))

    # ------------------------------------------------------------ state merge

    def _heard_from(self, sender: str, address: str, inc: int, out: list[Output]) -> None:
        """A message from ``sender`` proves it alive at ``inc``: admit it if new or newer."""
        m = self._members.get(sender)
        if sender != self.me and (m is None or inc > m.incarnation):
            self._apply(Update(sender, address, inc, ALIVE, sender), out)

    def _apply_all(self, updates: Iterable[Update], out: list[Output]) -> None:
        for u in updates:
            self._apply(u, out)

    def _apply(self, u: Update, out: list[Output]) -> None:
        if u.member == self.me:
            self._about_me(u, out)
            return
        m = self._members.get(u.member)
        if m is None:
            if u.state in (DEAD, LEFT):
                return  # nothing to learn about a stranger's death
            m = _Member(u.member, u.address, u.incarnation, u.state, u.origin, self._now)
            self._members[u.member] = m
            self._live_add(m.id)
            self._toggle(m)
            if self._started and self._probe_idx < len(self._probe_list):
                # join the current round at a random place (memberlist does the same)
                pos = self._rng.randint(self._probe_idx, len(self._probe_list))
                self._probe_list.insert(pos, m.id)
            if u.state == SUSPECT:
                self._start_suspicion(m, u.origin, out)
            self._enqueue(u)
            out.append(MemberChanged(m.id, m.address, m.state, m.incarnation))
            self._ring_changed(out)
            return
        if (u.incarnation, _RANK[u.state]) <= (m.incarnation, _RANK[m.state]):
            if u.state == SUSPECT and u.incarnation == m.incarnation:
                self._add_suspector(m, u.incarnation, u.origin, u)
                if m.state == DEAD:
                    self._maybe_confirm(m, out)
            return
        was_live = m.state in (ALIVE, SUSPECT)
        if was_live:
            self._toggle(m)
        m.incarnation = u.incarnation
        m.state = u.state
        m.address = u.address
        m.origin = u.origin
        m.changed = self._now
        if u.state == ALIVE:
            self._suspicions.pop(m.id, None)
            self._pending.pop(m.id, None)
        elif u.state == SUSPECT:
            self._start_suspicion(m, u.origin, out)
        else:
            self._suspicions.pop(m.id, None)
            self._push(self._now + self.config.reap_after, _T_REAP, m.id)
        is_live = u.state in (ALIVE, SUSPECT)
        if u.state == DEAD:
            self._bag_add(self._dead, self._dead_pos, m.id)
            self._deaths.append(self._now)
        else:
            self._bag_remove(self._dead, self._dead_pos, m.id)
        if is_live:
            self._toggle(m)
            if not was_live:
                self._live_add(m.id)
        elif was_live:
            self._live_remove(m.id)
        self._enqueue(u)
        out.append(MemberChanged(m.id, m.address, m.state, m.incarnation))
        if is_live != was_live or (m.id in self._watching and self._watching[m.id] != m.address):
            self._ring_changed(out)

    def _about_me(self, u: Update, out: list[Output]) -> None:
        if self._left:
            return
        if u.incarnation < self._inc or (u.state == ALIVE and u.incarnation == self._inc):
            return
        # someone holds us suspect/dead/left (or an older life of ours as alive): refute
        self._digests.toggle(self.me, self._inc, self.address, self._bucket)
        self._inc = u.incarnation + 1
        self._digests.toggle(self.me, self._inc, self.address, self._bucket)
        if u.state == SUSPECT:
            self._health = min(self.config.health_max, self._health + 1)
        alive = self._self_update()
        self._enqueue(alive, first=True)
        accuser = self._members.get(u.origin)
        if accuser is not None and accuser.state in (ALIVE, SUSPECT):
            out.append(Gossip(accuser.id, accuser.address, *self._hdr(), self._piggyback(accuser.id)))

    # ------------------------------------------------------------ dissemination

    def _enqueue(self, u: Update, first: bool = False) -> None:
        # one entry per member: a newer fact replaces an older one still in flight
        self._queue[u.member] = [u, -1 if first else 0]
        if not self._gossip_armed and self._started:
            self._gossip_armed = True
            self._push(self._now + self.config.gossip_interval, _T_GOSSIP, None)

    def _take(self) -> list[Update]:
        q = self._queue
        if not q:
            return []
        limit = self.config.retransmit_limit(len(self._live) + 1)
        cap = self.config.max_piggyback
        entries = list(q.values()) if len(q) <= cap else heapq.nsmallest(cap, q.values(), key=lambda e: e[1])
        taken = []
        for e in entries:
            taken.append(e[0])
            e[1] += 1
            if e[1] >= limit:
                del q[e[0].member]
        return taken

    def _piggyback(self, dest: str) -> list[Update]:
        ups = self._take()
        m = self._members.get(dest)
        if m is not None and m.state in (SUSPECT, DEAD) and not any(u.member == dest for u in ups):
            ups.insert(0, m.update())  # buddy system: the accused hears of it in every message
        return ups

    def _gossip(self, now: float, out: list[Output]) -> None:
        if not self._queue:
            self._gossip_armed = False
            return
        self._push(now + self.config.gossip_interval, _T_GOSSIP, None)
        for peer in self._sample(self.config.gossip_fanout, ()):
            ups = self._piggyback(peer)
            if not ups:
                break
            out.append(Gossip(peer, self._members[peer].address, *self._hdr(), ups))

    # ------------------------------------------------------------ anti-entropy (sync.py)

    def _toggle(self, m: _Member) -> None:
        """Put a live member's entry in our digests, or take it out (before it changes)."""
        self._digests.toggle(m.id, m.incarnation, m.address, m.bucket)

    def _open_sync(self, peer: str, addr: str, out: list[Output]) -> None:
        d, n = self.digest()
        out.append(SyncDigest(peer, addr, *self._hdr(), d, n))

    def _on_digest(self, msg: SyncDigest, out: list[Output]) -> None:
        theirs = sync.decode(msg.digest)
        n = len(theirs)
        if n == 1:
            if self._digests.fold(1) == theirs:
                return
            mine = sync.buckets_for(len(self._live) + 1)
            if mine > 1:
                # tell where we differ; the opener then sends those buckets and asks for ours
                d, count = self.digest(mine)
                out.append(SyncDigest(msg.sender, msg.sender_addr, *self._hdr(), d, count))
                return
        want = sync.differing(self._digests.fold(n), theirs)
        if want:
            self._send_buckets(msg.sender, msg.sender_addr, n, want, True, out)

    def _send_buckets(self, dest: str, addr: str, buckets: int, want: list[int], ask: bool,
                      out: list[Output]) -> None:
        """Our members (dead and left too: the other may have missed a death) of ``want`` out of
        ``buckets`` buckets, in as many messages as it takes to keep each under the size limit;
        ``ask``: ask for theirs of the same buckets."""
        chosen = set(want)
        parts: dict[int, list[Update]] = {i: [] for i in sorted(chosen)}
        if sync.coarse(self._bucket, buckets) in chosen:
            parts[sync.coarse(self._bucket, buckets)].append(self._self_update())
        for m in self._members.values():
            i = sync.coarse(m.bucket, buckets)
            if i in chosen:
                parts[i].append(m.update())
        room = sync.MAX_MESSAGE_BYTES - encoded_size(SyncState(dest, addr, *self._hdr(), [], False, buckets, []))
        for members, named in sync.pack(list(parts.items()), _update_size, room):
            wanted = named if ask else []
            out.append(SyncState(dest, addr, *self._hdr(), members, bool(wanted), buckets, wanted))

    # ------------------------------------------------------------ helpers

    def _hdr(self) -> tuple[str, str, int]:
        return self.me, self.address, self._inc

    def _self_update(self) -> Update:
        return Update(self.me, self.address, self._inc, ALIVE, self.me)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _live_add(self, member: str) -> None:
        if member not in self._live_pos:
            bisect.insort(self._ring, _ring_point(member))
        self._bag_add(self._live, self._live_pos, member)

    def _live_remove(self, member: str) -> None:
        if member in self._live_pos:
            ring = self._ring
            i = bisect.bisect_left(ring, _ring_point(member))
            if i < len(ring) and ring[i][1] == member:
                del ring[i]
        self._bag_remove(self._live, self._live_pos, member)

    def _ring_changed(self, out: list[Output]) -> None:
        if self._batch:
            self._rewatch_due = True  # once at the end of the batch: a registry or a sync adds thousands
        else:
            self._rewatch(out)

    def _end_batch(self, out: list[Output]) -> None:
        self._batch = False
        if self._rewatch_due:
            self._rewatch_due = False
            self._rewatch(out)

    def _rewatch(self, out: list[Output]) -> None:
        """The ring changed: watch the ``watchers`` live members after us, and no others."""
        ring = self._ring
        i = bisect.bisect_left(ring, _ring_point(self.me))
        k = min(self.config.watchers, len(ring) - 1)
        now = {ring[(i + j) % len(ring)][1] for j in range(1, k + 1)}
        for member in [x for x in self._watching if x not in now]:
            del self._watching[member]
            out.append(Unwatch(member))
        for member in now:
            address = self._members[member].address
            if self._watching.get(member) != address:
                self._watching[member] = address
                out.append(Watch(member, address))

    @staticmethod
    def _bag_add(items: list[str], pos: dict[str, int], member: str) -> None:
        if member not in pos:
            pos[member] = len(items)
            items.append(member)

    @staticmethod
    def _bag_remove(items: list[str], pos: dict[str, int], member: str) -> None:
        # swap with the last one: O(1)
        i = pos.pop(member, None)
        if i is None:
            return
        last = items.pop()
        if last != member:
            items[i] = last
            pos[last] = i

    def _sample(self, k: int, exclude: tuple[str, ...]) -> list[str]:
        """Up to ``k`` distinct random live members not in ``exclude``."""
        live = self._live
        n = len(live)
        if n <= 4 * k:
            cands = [x for x in live if x not in exclude]
            self._rng.shuffle(cands)
            return cands[:k]
        picks: list[str] = []
        while len(picks) < k:
            x = live[self._rng.randrange(n)]
            if x not in exclude and x not in picks:
                picks.append(x)
        return picks
