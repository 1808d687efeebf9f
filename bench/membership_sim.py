"""
Deterministic simulator of the SWIM + Lifeguard membership machine
(gridnode/membership/swim.py): N instances of the *same* ``SwimMachine`` on a
virtual network and a virtual clock (one event heap). No sockets, no sleeps.

    .venv/bin/python bench/membership_sim.py --nodes 1000 --loss 0.01 --kill 5 --seconds 120 --json
    .venv/bin/python bench/membership_sim.py --nodes 1000 --loss 0.05 --stall-fraction 0.05 --seconds 3600 --json
    .venv/bin/python bench/membership_sim.py --nodes 100 --partition-one --json

The model
---------
- Every message is lost independently with probability ``--loss``; the others
  arrive after 0.5 ms + an exponential jitter (mean ``--jitter-ms``, 2 ms).
- ``--one-way`` random ordered pairs (a, b) whose a->b direction drops everything
  (default N/20).
- Stalls: a ``--stall-fraction`` of the nodes block their reactor now and then
  (exponential gaps, mean ``--stall-every`` s) for U(1, 5) s: they process nothing,
  their inbox queues up; on waking they read the queue, then run their due timers
  (a reactor runs due timers before it reads its sockets, so MembershipService ticks
  the machine one reactor turn after its timer fires).
- ``--kill K``: K nodes crash (no goodbye) at random times after ``--quiet`` s.
  ``--kill-mode process`` (the default; what ``kill -9``, an OOM kill or a crash
  does): the host's kernel answers connections to the dead port with a reset, so
  the sender's connection is refused one round trip later (plus 1 s, the SYN
  retransmission, when the SYN or the reset is lost). Its kernel also closes the
  standing connections its watchers hold: each watcher reads the FIN (200 ms later
  when it is lost), reconnects at once and is refused. ``--kill-mode host``: the
  instance vanishes and messages to it are silently lost, as over UDP.
  ``--kill-together``: every kill at ``--quiet`` s (300 of 1000 hosts of one zone at once).
  Stalled nodes and partitions never refuse: their kernel accepts, or nothing
  answers.
- Host checks (``CheckHost``, see gridnode/membership/hostcheck.py): a watcher's
  standing connection exists if, when the machine said ``Watch``, the member's host
  was up and TCP between them worked (a link broken either way breaks TCP). A check
  sends ``check_frames`` frames ``check_gap`` s apart, counted as messages, and ends
  that long after: void if the watcher stalled meanwhile (the I/O layer sees its
  frames went out late); ``refused`` if the member's process was killed (its
  kernel closed the connection; the new try is refused); ``host_silent`` if its
  host vanished, the link between them is broken or one of them is partitioned;
  otherwise ``host_silent`` too with the chance that every frame or its
  acknowledgement was lost, ``(1 - (1 - loss)^2)^check_frames``, and nothing else.
  ``--joins J``: J new nodes join (bootstrapped with the registry's whole list).
  ``--partition-one``: one node is cut off from all others for ``--partition-seconds``.
- Names: every node has an EC2 instance id (``i-`` and 17 hex digits) and a public DNS
  name as its address (``ec2-203-0-113-25.compute-1.amazonaws.com:8081``), so every
  message has the size it has in a real pool.
- Figures: detect_first_s (median over kills, kill -> first suspicion anywhere),
  dead_everywhere_median_s / _p99_s (kill -> every live node holds it dead),
  false_positives (live nodes ever declared dead by anyone; the partitioned node
  is reported apart), confirmed_false_deaths, msgs_per_node_s, bytes_per_node_s (every
  message, as the AMP box the wire sends: sealed, framed, above TCP) and
  sync_bytes_per_node_s (the sync messages alone) in the steady state (from ``--warmup``
  until the first kill, join or partition), max_message_bytes (the largest payload of
  the whole run) and oversized_messages (payloads over the wire's limit: must be 0),
  join_converged_s (join -> known alive by 99.9% of the others), partition_level_s (the
  partition's end -> the cut-off node's live table is the others': its digest equals that
  of most of 5 others, looked at every 0.5 s; it missed every update while cut off, and
  everyone held it dead), partition_confirmed_dead
  (ConfirmedDead emitted by the partitioned node; must be 0).
- The ``memberlist`` block is computed (not simulated) from memberlist's LAN
  configuration: probe interval 1 s, probe timeout 500 ms, suspicion timeout
  4 * max(1, log10 N) * 1 s, gossip every 200 ms to 3 nodes, a full push-pull every
  30 s scaled by ``pushPullScale`` (x ceil(log2 N - log2 32) + 1 above 32 nodes: x6 at
  N=1000), its table sized in this encoding with the same names.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import pickle
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the working tree, not an installed copy that may lag

from gridnode.membership import wire  # noqa: E402
from gridnode.membership.swim import (  # noqa: E402
    ALIVE,
    DEAD,
    SUSPECT,
    CheckHost,
    ConfirmedDead,
    MemberChanged,
    Message,
    Ping,
    SwimConfig,
    SwimMachine,
    SyncDigest,
    SyncState,
    Unwatch,
    Update,
    Watch,
)

#: a pool's region: its instances' public DNS names end so (us-east-1's are the shortest)
DNS_SUFFIX = "compute-1.amazonaws.com"
PEER_PORT = 8081


def ec2_id(rng: random.Random) -> str:
    """An EC2 instance id: ``i-`` and 17 hex digits."""
    return f"i-{rng.getrandbits(68):017x}"


def ec2_address(rng: random.Random) -> str:
    """A public DNS name and the peer port, e.g. ``ec2-203-0-113-25.compute-1.amazonaws.com:8081``."""
    a, b, c, d = rng.randint(3, 223), rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)
    return f"ec2-{a}-{b}-{c}-{d}.{DNS_SUFFIX}:{PEER_PORT}"


_FRAMING: dict[str, int] = {}
_FIELDS: dict[type, tuple[tuple[str, ...], int]] = {}


def payload_size(msg: Message) -> int:
    """``encoded_size(msg)`` counted from the fields' lengths, without encoding (the ids, addresses
    and states are plain ASCII: nothing is escaped); a quarter of the run's time otherwise."""
    t = type(msg)
    known = _FIELDS.get(t)
    if known is None:
        names = tuple(f.name for f in fields(t))
        # {"type":"Name"} plus, per field, a comma, the quoted key and a colon
        known = _FIELDS[t] = names, 11 + len(t.__name__) + sum(len(n) + 4 for n in names)
    names, size = known
    for name in names:
        v = getattr(msg, name)
        if isinstance(v, str):
            size += len(v) + 2
        elif isinstance(v, bool):
            size += 4 if v else 5
        elif isinstance(v, int):
            size += len(str(v))
        else:  # a list: of updates (5 fields: 4 quoted strings), or of bucket numbers
            size += 1 + len(v) if v else 2
            for x in v:
                if isinstance(x, Update):
                    size += (len(x.member) + len(x.address) + len(x.state) + len(x.origin)
                             + len(str(x.incarnation)) + 14)
                else:
                    size += len(str(x))
    return size


def wire_bytes(msg: Message) -> tuple[int, int]:
    """(payload, AMP box) bytes of ``msg`` as the wire seals and frames it: the box adds the command
    name, version, timestamp, nonce and MAC, each with its key and 2-byte lengths."""
    payload = payload_size(msg)
    name = type(msg).__name__
    framing = _FRAMING.get(name)
    if framing is None:
        command, args = wire.seal(b"k" * 32, msg, 1_764_700_000.123456)
        box = command.makeArguments(args, None)
        box[b"_command"] = command.commandName
        # AmpBox.serialize: each key and value after a 2-byte length, then 2 zero bytes (counted
        # by hand: serialize refuses a value over 65,535 bytes, which memberlist's table can be)
        framing = _FRAMING[name] = sum(4 + len(k) + len(v) for k, v in box.items()) + 2 - len(args["payload"])
    return payload, payload + framing


def _version_frame() -> int:
    """A host check's frame: a Version command and its answer's box."""
    from twisted.protocols import amp

    ask = amp.AmpBox({b"_command": b"Version", b"_ask": b"1"})
    answer = amp.AmpBox({b"_answer": b"1", b"version": b"1"})
    return len(ask.serialize()) + len(answer.serialize())


CHECK_FRAME_BYTES = _version_frame()

_WAKE, _DELIVER, _STALL, _UNSTALL, _KILL, _JOIN, _PART_ON, _PART_OFF, _REFUSED, _CHECKED, _LEVEL = range(11)
KILL_MODES = ("process", "host")


@dataclass
class Params:
    nodes: int = 100
    loss: float = 0.01
    jitter_ms: float = 2.0
    one_way: int = -1  # -1: nodes // 20
    stall_fraction: float = 0.0
    stall_every: float = 60.0
    seconds: float = 120.0
    warmup: float = 10.0
    quiet: float = 40.0
    kill: int = 0
    kill_mode: str = "process"
    #: every kill at the same moment (``quiet`` s): an availability zone lost at once
    kill_together: bool = False
    joins: int = 1
    partition_one: bool = False
    partition_seconds: float = 30.0
    #: a host check (CheckHost) sends this many frames, one every ``check_gap`` s, and then judges
    check_frames: int = 10
    check_gap: float = 0.05
    seed: int = 1
    config: SwimConfig = field(default_factory=SwimConfig)


class _Node:
    __slots__ = ("i", "id", "m", "up", "started", "stalled_until", "stall_start", "inbox", "wake_at", "watch")

    def __init__(self, i: int, m: SwimMachine) -> None:
        self.i = i
        self.id = m.me
        self.m = m
        self.up = True
        self.started = False
        self.stalled_until = 0.0
        self.stall_start = -math.inf
        self.inbox: list[Message] = []
        self.wake_at = math.inf
        #: standing connections: watched member -> whether it was made (the host was up then)
        self.watch: dict[str, bool] = {}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


class Sim:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self.seq = 0
        self.now = 0.0
        total = p.nodes + p.joins
        names = random.Random(p.seed * 7919 + 1)
        self.nodes = [
            _Node(i, SwimMachine(ec2_id(names), ec2_address(names), config=p.config,
                                 rng=random.Random(self.rng.getrandbits(64))))
            for i in range(total)
        ]
        self.index = {n.id: n for n in self.nodes}
        n = p.nodes
        one_way = n // 20 if p.one_way < 0 else p.one_way
        self.broken: set[tuple[str, str]] = set()
        while n > 1 and len(self.broken) < one_way:
            a, b = self.rng.sample(range(n), 2)
            self.broken.add((self.nodes[a].id, self.nodes[b].id))
        self.partitioned: str | None = None
        self.part_node: str | None = None
        self.part_healed: float | None = None
        self.part_level: float | None = None
        # figures
        self.kill_at: dict[str, float] = {}
        self.first_suspect: dict[str, float] = {}
        self.dead_at: dict[str, dict[str, float]] = {}
        self.kill_observers: dict[str, list[str]] = {}
        self.join_at: dict[str, float] = {}
        self.join_known: dict[str, set[str]] = {}
        self.join_done: dict[str, float] = {}
        self.false_suspicions = 0
        self.fp_nodes: set[str] = set()
        self.confirmed_false: set[str] = set()
        self.confirmed_true = 0
        self.part_confirmed = 0
        self.part_declared_dead_by: set[str] = set()
        self.part_local_dead: set[str] = set()
        self.msgs = 0
        self.msgs_total = 0
        self.sync_bytes = 0
        self.bytes = 0
        self.max_payload = 0
        self.oversized = 0
        self.window_end = p.seconds
        self.events = 0
        self.set_up = False
        self.cpu_s = 0.0

    # ------------------------------------------------------------ plumbing

    def push(self, t: float, kind: int, node: int, data: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, node, data))

    def reschedule(self, nd: _Node) -> None:
        d = nd.m.next_deadline()
        if d is not None and d < nd.wake_at:
            nd.wake_at = d
            self.push(max(d, self.now), _WAKE, nd.i, d)

    def dispatch(self, src: _Node, outs: list[Any]) -> None:
        p = self.p
        now = self.now
        in_window = p.warmup <= now < self.window_end
        for o in outs:
            if isinstance(o, Message):
                self.msgs_total += 1
                payload, box = wire_bytes(o)
                self.max_payload = max(self.max_payload, payload)
                if payload > wire.MAX_PAYLOAD:
                    self.oversized += 1  # the service would count it and send nothing
                    continue
                if in_window:
                    self.msgs += 1
                    self.bytes += box
                    if isinstance(o, SyncDigest | SyncState):
                        self.sync_bytes += box
                if (src.id, o.dest) in self.broken:
                    continue
                if self.partitioned is not None and (src.id == self.partitioned or o.dest == self.partitioned):
                    continue
                dst = self.index.get(o.dest)
                if dst is None:
                    continue
                lat = self.latency()
                if not dst.up and p.kill_mode == "process":
                    if self.rng.random() < 2 * p.loss:
                        lat += 1.0  # the SYN or the reset was lost: the kernel retries once
                    self.push(now + 2 * lat, _REFUSED, src.i, (o.dest, o.dest_addr))
                    continue
                if self.rng.random() < p.loss:
                    continue
                self.push(now + lat, _DELIVER, dst.i, o)
            elif isinstance(o, Watch):
                dst = self.index.get(o.member)
                src.watch[o.member] = dst is not None and (dst.up or p.kill_mode == "process") and \
                    not self.cut(src.id, o.member)
            elif isinstance(o, Unwatch):
                src.watch.pop(o.member, None)
            elif isinstance(o, CheckHost):
                if src.watch.get(o.member):
                    self.msgs_total += p.check_frames
                    if in_window:
                        self.msgs += p.check_frames
                        self.bytes += p.check_frames * CHECK_FRAME_BYTES
                    self.push(now + p.check_gap * p.check_frames, _CHECKED, src.i, (o.member, o.address, now))
            elif isinstance(o, MemberChanged):
                self.observe(src, o)
            elif isinstance(o, ConfirmedDead):
                if src.id == self.part_node and self.partitioned is not None:
                    self.part_confirmed += 1
                if o.member in self.kill_at:
                    self.confirmed_true += 1
                elif o.member != self.part_node:
                    self.confirmed_false.add(o.member)

    def latency(self) -> float:
        """One packet's one-way delay: 0.5 ms plus an exponential jitter."""
        return 0.0005 + self.rng.expovariate(1000.0 / self.p.jitter_ms)

    def close_standing(self, dead: _Node) -> None:
        """A killed process's kernel closes its standing connections: each watcher holding one
        reads the FIN, reconnects at once and is refused (MembershipService._stand)."""
        p = self.p
        for n in self.nodes:
            if n.up and n.started and n.watch.get(dead.id) and not self.cut(n.id, dead.id):
                fin = self.latency()
                if self.rng.random() < p.loss:
                    fin += 0.2  # the FIN was lost: retransmitted after the minimum RTO
                syn = self.latency()
                if self.rng.random() < 2 * p.loss:
                    syn += 1.0  # the SYN or the reset was lost: the kernel retries once
                self.push(self.now + fin + 2 * syn, _REFUSED, n.i, (dead.id, dead.m.address))

    def cut(self, a: str, b: str) -> bool:
        """Whether TCP between ``a`` and ``b`` is broken (it needs both directions)."""
        return (a, b) in self.broken or (b, a) in self.broken or self.partitioned in (a, b)

    def check_host(self, nd: _Node, member: str, address: str, t0: float) -> list[Any]:
        """The end of ``nd``'s host check of ``member`` (started at ``t0``), as the I/O layer does it."""
        if nd.stall_start >= t0 or nd.stalled_until > self.now:
            return []  # we stalled: our frames went out late, the check proves nothing (void)
        dst = self.index[member]
        if not dst.up and self.p.kill_mode == "process":
            # its kernel closed the standing connection when the process died; reconnecting is refused
            return nd.m.refused(member, address, self.now)
        silent = not dst.up or self.cut(nd.id, member)
        if not silent:
            # every frame or its acknowledgement lost (TCP retransmits within the window count too)
            q = 1 - (1 - self.p.loss) ** 2
            silent = self.rng.random() < q ** self.p.check_frames
        return nd.m.host_silent(member, address, self.now) if silent else []

    def observe(self, src: _Node, o: MemberChanged) -> None:
        member = o.member
        if member in self.kill_at:
            if o.state == SUSPECT:
                self.first_suspect.setdefault(member, self.now)
            elif o.state == DEAD:
                self.dead_at[member].setdefault(src.id, self.now)
            return
        if o.state == ALIVE:
            known = self.join_known.get(member)
            if known is not None and member not in self.join_done and src.id not in known:
                known.add(src.id)
                others = sum(1 for n in self.nodes if n.up and n.started and n.id not in (member, self.part_node))
                if len(known) >= math.ceil(0.999 * others):
                    self.join_done[member] = self.now - self.join_at[member]
            return
        if member == self.part_node:
            if o.state == DEAD:
                self.part_declared_dead_by.add(src.id)
            return
        if src.id == self.part_node:
            # a node cut off from everyone may hold the others dead; it must not *confirm* it
            if o.state == DEAD:
                self.part_local_dead.add(member)
            return
        if o.state == SUSPECT:
            self.false_suspicions += 1
        elif o.state == DEAD:
            self.fp_nodes.add(member)

    # ------------------------------------------------------------ scenario

    def setup(self) -> None:
        p, rng = self.p, self.rng
        registry = [(n.id, n.m.address) for n in self.nodes[: p.nodes]]
        for nd in self.nodes[: p.nodes]:
            self.dispatch(nd, nd.m.add_members(registry, 0.0))
            nd.started = True
            nd.m.start(0.0, join=False)
            self.reschedule(nd)
        prone = rng.sample(range(p.nodes), round(p.stall_fraction * p.nodes))
        for i in prone:
            self.push(p.warmup + rng.expovariate(1 / p.stall_every), _STALL, i)
        span = max(1.0, p.seconds - p.quiet - 25.0)
        victims = rng.sample(range(p.nodes), min(p.kill, p.nodes - 2))
        for i in victims:
            at = p.quiet + rng.random() * span
            self.push(p.quiet if p.kill_together else at, _KILL, i)
        for j in range(p.joins):
            self.push(p.quiet + rng.random() * span, _JOIN, p.nodes + j)
        if p.partition_one:
            cand = [i for i in range(p.nodes) if i not in victims]
            self.push(p.quiet + rng.random() * max(1.0, span - p.partition_seconds), _PART_ON, rng.choice(cand))
        disturbances = [t for t, _, k, _, _ in self.heap if k in (_KILL, _JOIN, _PART_ON)]
        self.window_end = min([p.seconds, *disturbances])

    def run(self, checkpoint: str | None = None, every: float = 3600.0) -> dict[str, Any]:
        """Run to ``--seconds``, or on from where a saved simulation stopped; with ``checkpoint``,
        save the whole simulation there every ``every`` simulated seconds (a run longer than a
        working session goes on later with ``--resume``, exactly as if it had not stopped)."""
        t0 = time.process_time()
        if not self.set_up:
            self.setup()
            self.set_up = True
        while not self.advance(self.p.seconds if checkpoint is None else (self.now // every + 1) * every):
            assert checkpoint is not None
            self.cpu_s += time.process_time() - t0
            t0 = time.process_time()
            save(self, checkpoint)
        self.cpu_s += time.process_time() - t0
        return self.figures()

    def advance(self, until: float) -> bool:
        """Process events up to ``until``; True once the simulation is over."""
        p = self.p
        heap = self.heap
        nodes = self.nodes
        until = min(until, p.seconds)
        while heap:
            t, _, kind, i, data = heapq.heappop(heap)
            if t > until:
                heapq.heappush(heap, (t, _, kind, i, data))
                self.now = until
                return until >= p.seconds
            self.now = t
            self.events += 1
            nd = nodes[i]
            if kind == _CHECKED:
                if nd.up and nd.started:
                    self.dispatch(nd, self.check_host(nd, *data))
                    self.reschedule(nd)
            elif kind == _DELIVER or kind == _REFUSED:
                if not nd.up or not nd.started:
                    continue
                if nd.stalled_until > t:
                    nd.inbox.append(data)
                    continue
                self.dispatch(nd, self.handle(nd, data, t))
                self.reschedule(nd)
            elif kind == _WAKE:
                if data != nd.wake_at or not nd.up or nd.stalled_until > t:
                    continue
                nd.wake_at = math.inf
                self.dispatch(nd, nd.m.tick(t))
                self.reschedule(nd)
            elif kind == _STALL:
                if nd.up:
                    dur = self.rng.uniform(1.0, 5.0)
                    nd.stall_start = t
                    nd.stalled_until = t + dur
                    self.push(t + dur, _UNSTALL, i)
                    self.push(t + dur + self.rng.expovariate(1 / p.stall_every), _STALL, i)
            elif kind == _UNSTALL:
                nd.stalled_until = 0.0
                if not nd.up:
                    continue
                nd.wake_at = math.inf
                inbox, nd.inbox = nd.inbox, []
                for msg in inbox:  # a woken node reads what queued up...
                    self.dispatch(nd, self.handle(nd, msg, t))
                self.dispatch(nd, nd.m.tick(t))  # ...then runs its late timers (MembershipService._due)
                self.reschedule(nd)
            elif kind == _KILL:
                nd.up = False
                self.kill_at[nd.id] = t
                self.dead_at[nd.id] = {}
                self.kill_observers[nd.id] = [n.id for n in nodes if n.up and n.started and n.id != self.partitioned]
                if p.kill_mode == "process":
                    self.close_standing(nd)
            elif kind == _JOIN:
                registry = self.join_seeds(nd)
                self.dispatch(nd, nd.m.add_members([(n.id, n.m.address) for n in registry], t,
                                                   {n.id: n.m.incarnation for n in registry}))
                nd.started = True
                self.join_at[nd.id] = t
                self.join_known[nd.id] = set()
                self.dispatch(nd, nd.m.start(t, join=True))
                self.reschedule(nd)
            elif kind == _PART_ON:
                self.partitioned = self.part_node = nd.id
                self.push(t + p.partition_seconds, _PART_OFF, i)
            elif kind == _PART_OFF:
                self.partitioned = None
                self.part_healed = t
                self.push(t + 0.5, _LEVEL, i)
            elif kind == _LEVEL:
                if self.level(nd):
                    self.part_level = t - (self.part_healed or t)
                else:
                    self.push(t + 0.5, _LEVEL, i)
        return True

    def join_seeds(self, nd: _Node) -> list[_Node]:
        """The members a joiner starts with: the registry's whole list (it lags deaths)."""
        return [n for n in self.nodes if n.started]

    def level(self, nd: _Node) -> bool:
        """Whether ``nd``'s live table is the pool's: its digest equals that of most of 5 others
        (one of them may be in the middle of an update)."""
        others = [n for n in self.nodes if n.up and n.started and n is not nd][:5]
        mine = nd.m.digest()
        return sum(n.m.digest() == mine for n in others) >= 3

    @staticmethod
    def handle(nd: _Node, data: Any, t: float) -> list[Any]:
        if isinstance(data, tuple):
            return nd.m.refused(data[0], data[1], t)
        return nd.m.receive(data, t)

    # ------------------------------------------------------------ figures

    def figures(self) -> dict[str, Any]:
        p = self.p
        up = {n.id for n in self.nodes if n.up}
        detect, everywhere = [], []
        missing = 0
        for victim, t0 in self.kill_at.items():
            if victim in self.first_suspect:
                detect.append(self.first_suspect[victim] - t0)
            seen = self.dead_at[victim]
            # every member that was there at the kill and still is
            times = [seen.get(x) for x in self.kill_observers[victim] if x in up]
            if any(x is None for x in times):
                missing += 1
            else:
                everywhere.append(max(x for x in times if x is not None) - t0)
        window = max(1e-9, self.window_end - p.warmup)
        fp = sorted(self.fp_nodes - set(self.kill_at))
        return {
            "nodes": p.nodes,
            "loss": p.loss,
            "stall_fraction": p.stall_fraction,
            "seconds": p.seconds,
            "seed": p.seed,
            "kills": len(self.kill_at),
            "kill_mode": p.kill_mode,
            "detect_first_s": _round(statistics.median(detect) if detect else None),
            "dead_everywhere_median_s": _round(statistics.median(everywhere) if everywhere else None),
            "dead_everywhere_p99_s": _round(_pct(everywhere, 0.99)),
            "dead_everywhere_max_s": _round(max(everywhere) if everywhere else None),
            "kills_not_dead_everywhere": missing,
            "false_positives": len(fp),
            "false_suspicions": self.false_suspicions,
            "confirmed_false_deaths": len(self.confirmed_false),
            "confirmed_true_deaths": self.confirmed_true,
            "msgs_per_node_s": _round(self.msgs / (p.nodes * window)),
            "bytes_per_node_s": _round(self.bytes / (p.nodes * window)),
            "sync_bytes_per_node_s": _round(self.sync_bytes / (p.nodes * window)),
            "max_message_bytes": self.max_payload,
            "max_message_limit": wire.MAX_PAYLOAD,
            "oversized_messages": self.oversized,
            "steady_window_s": _round(window),
            "join_converged_s": _round(max(self.join_done.values()) if len(self.join_done) == len(self.join_at)
                                       and self.join_done else None),
            "joins": len(self.join_at),
            "partition_one": p.partition_one,
            "partition_confirmed_dead": self.part_confirmed if p.partition_one else None,
            "partition_level_s": _round(self.part_level),
            "partitioned_declared_dead_by": len(self.part_declared_dead_by) if p.partition_one else None,
            "partitioned_node_held_dead": len(self.part_local_dead) if p.partition_one else None,
            "events": self.events,
            "config": {k: v for k, v in vars(p.config).items()},
            "suspicion_min_max_s": [_round(x) for x in p.config.suspicion_bounds(p.nodes)],
            "memberlist": memberlist_figures(p.nodes),
        }


def _digest_of_source() -> str:
    import hashlib

    from gridnode.membership import swim

    h = hashlib.sha256()
    for path in (swim.__file__, __file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


#: read once, as the code is loaded: a run saves for hours, and the files may change or move
#: under it meanwhile (a checkout moved once and the next save failed)
_CODE = _digest_of_source()


def code_digest() -> str:
    """The machine's and the simulator's source as this process loaded them: a saved run goes
    on only with the same code."""
    return _CODE


def save(sim: Sim, path: str) -> None:
    """The whole simulation (machines, network, event heap, random states) to ``path``, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump((code_digest(), sim), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def load_any(path: str) -> tuple[Sim, bool]:
    """A saved simulation, and whether this code saved it (only then may it go on)."""
    with open(path, "rb") as f:
        code, sim = pickle.load(f)  # noqa: S301 - our own checkpoint file
    assert isinstance(sim, Sim)
    return sim, code == code_digest()


def load(path: str) -> Sim:
    """A saved simulation to go on with: refused unless this code saved it."""
    sim, same = load_any(path)
    if not same:
        raise SystemExit(f"{path} was saved by another version of swim.py or of this simulator: "
                         "its run cannot go on with this code; go on in a worktree of the commit "
                         "that saved it, or start it again")
    return sim


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def memberlist_figures(n: int) -> dict[str, Any]:
    """memberlist's LAN defaults, computed: what the same goals look like with them."""
    probe_interval, probe_timeout = 1.0, 0.5
    suspicion = 4 * max(1.0, math.log10(n)) * probe_interval
    first_probe_median = math.log(2) * probe_interval  # ~one probe of any member per period, cluster-wide
    spread = 0.2 * math.ceil(math.log(max(n, 2)) / math.log(4)) + 0.2
    names = random.Random(0)
    me, peer = (ec2_id(names), ec2_address(names)), (ec2_id(names), ec2_address(names))
    entry = Update(me[0], me[1], 0, ALIVE, me[0])
    # its push-pull: the whole table each way, one sent and one answered per node per interval
    state = SyncState(*peer, *me, 0, [entry] * n, True)
    push_pull = 30.0 * push_pull_scale(n)
    _, state_bytes = wire_bytes(state)
    _, ping_bytes = wire_bytes(Ping(*peer, *me, 0, 1, []))
    return {
        "probe_interval_s": probe_interval,
        "probe_timeout_s": probe_timeout,
        "suspicion_timeout_s": round(suspicion, 3),
        "detect_first_s": round(first_probe_median + probe_interval, 3),
        "dead_everywhere_estimate_s": round(first_probe_median + probe_interval + suspicion + spread, 3),
        "push_pull_interval_s": push_pull,
        "msgs_per_node_s": round(2.0 + 2 / push_pull, 3),
        "sync_bytes_per_node_s": round(2 * state_bytes / push_pull, 1),
        # a probe and its answer per period, no piggyback: a lower bound of the rest
        "probe_bytes_per_node_s": 2 * ping_bytes,
    }


def push_pull_scale(n: int) -> float:
    """memberlist's ``pushPullScale``: the push-pull interval's multiplier above 32 nodes."""
    if n <= 32:
        return 1.0
    return math.ceil(math.log2(n) - math.log2(32)) + 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = Params()
    ap.add_argument("--nodes", type=int, default=d.nodes)
    ap.add_argument("--loss", type=float, default=d.loss)
    ap.add_argument("--jitter-ms", type=float, default=d.jitter_ms)
    ap.add_argument("--one-way", type=int, default=d.one_way)
    ap.add_argument("--stall-fraction", type=float, default=d.stall_fraction)
    ap.add_argument("--stall-every", type=float, default=d.stall_every)
    ap.add_argument("--seconds", type=float, default=d.seconds)
    ap.add_argument("--warmup", type=float, default=d.warmup)
    ap.add_argument("--quiet", type=float, default=d.quiet, help="no kill/join/partition before this time")
    ap.add_argument("--kill", type=int, default=d.kill)
    ap.add_argument("--kill-mode", choices=KILL_MODES, default=d.kill_mode,
                    help="process: connections to the dead node are refused; host: silence")
    ap.add_argument("--kill-together", action="store_true", help="every kill at --quiet s (hosts of one zone)")
    ap.add_argument("--joins", type=int, default=d.joins)
    ap.add_argument("--partition-one", action="store_true")
    ap.add_argument("--partition-seconds", type=float, default=d.partition_seconds)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--memberlist", action="store_true", help="print only the computed memberlist block")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a SwimConfig field, e.g. --set suspicion_min_mult=2")
    ap.add_argument("--checkpoint", metavar="FILE", help="save the simulation to FILE as it goes")
    ap.add_argument("--checkpoint-every", type=float, default=3600.0, metavar="S",
                    help="simulated seconds between saves (default 3600)")
    ap.add_argument("--resume", metavar="FILE",
                    help="go on with a saved simulation (its own settings; the others are ignored)")
    a = ap.parse_args(argv)
    if a.memberlist:
        print(json.dumps(memberlist_figures(a.nodes)))
        return 0
    cfg = SwimConfig()
    for item in a.set:
        k, _, v = item.partition("=")
        cur = getattr(cfg, k)
        cfg = replace(cfg, **{k: type(cur)(v) if not isinstance(cur, bool) else v.lower() in ("1", "true")})
    p = Params(nodes=a.nodes, loss=a.loss, jitter_ms=a.jitter_ms, one_way=a.one_way, stall_fraction=a.stall_fraction,
               stall_every=a.stall_every, seconds=a.seconds, warmup=a.warmup, quiet=a.quiet, kill=a.kill,
               kill_mode=a.kill_mode, kill_together=a.kill_together,
               joins=a.joins, partition_one=a.partition_one, partition_seconds=a.partition_seconds, seed=a.seed,
               config=cfg)
    sim = load(a.resume) if a.resume else Sim(p)
    figs = sim.run(a.checkpoint, a.checkpoint_every)
    figs["cpu_s"] = round(sim.cpu_s, 1)
    if a.json:
        print(json.dumps(figs))
    else:
        for k, v in figs.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
