"""
A pool of N nodes on one virtual clock: the real membership machines (driven by
bench/membership_sim.py's `Sim`: its network, loss, kills and joins), and on each
node the real registry (gridnode/registry/service.py), job layer (the runner,
and the adopter's looks at its own markers: `job_layer`), succession (node.py's
own `_wire_adoption`: who is gone, which watcher acts on a death or a leave,
gridnode/succession.py) and store token bucket (gridnode/store/rate.py), all
writing to one `CountingBackend` (bench/counting_store.py) that counts what S3
would be sent.

Time: the membership's event heap and a Twisted clock (`PoolClock`, what the
registry, the job layer and the bucket schedule on) are run as one: whichever
has the earlier event goes first, so a store request is counted in the second
it is sent. Store calls are synchronous: a request takes no time.

What is not the product's code: the glue that `gridnode/node.py` and
`gridnode/membership/service.py` do besides `_wire_adoption` (each mirrored in a
few lines here, named where it is), the nodes' jobs (seeded as the runner writes them, and never
finishing: no state changes, so every request counted in the steady state is
one not caused by a job's own state change), and adopted jobs, which are only
counted as claimed (their input is not fetched, nothing is converted). A
crashed process sends nothing from the moment it dies (its store calls never
return).
"""

from __future__ import annotations

import contextvars
import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from bench.counting_store import CausalGate, CountingBackend, cause, caused
from bench.membership_sim import _JOIN, _KILL, Params, Sim
from gridnode import job_records, jobs, keys
from gridnode.adoption import LEGACY_EVERY, Adopter, Claim
from gridnode.jobs import Job
from gridnode.membership import swim
from gridnode.metrics import Metrics
from gridnode.node import NodeService, pool_size
from gridnode.registry.service import Registry
from gridnode.runner import Active, Runner
from gridnode.store.base import THREADS, ObjectStore
from gridnode.store.rate import BACKGROUND
from gridnode.timers import SPREAD, JitteredLoop

ENV, POOL = "prod", "main"
#: the node's defaults (gridnode/config.py): --workers (a 4-core instance), --queue
WORKERS, QUEUE = 4, 32
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def job_id(rng: random.Random, ms: int) -> str:
    """A gridnode id (keys.new_id's layout) from ``rng``: the same run names the same jobs."""
    value = (ms << 80) | rng.getrandbits(80)
    return "".join(_B32[(value >> (5 * i)) & 31] for i in reversed(range(26)))


class PoolClock(Clock):
    """A Twisted `Clock` on a heap: thousands of timers, each call O(log n) (Clock sorts a list)."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, DelayedCall]] = []
        self._seq = 0
        #: seconds spent in the calls (the nodes' registry, job layer and bucket), by the wall clock
        self.busy_s = 0.0

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall:  # noqa: N802
        # a positive delay of less than a microsecond is one (a token bucket short of a token by a
        # rounding error would otherwise wait 1e-17 s, which a float clock at 100 s cannot advance)
        delay = 0.0 if delay <= 0 else max(delay, 1e-6)
        dc = DelayedCall(self.seconds() + delay, f, args, kw, lambda c: None, self._push,
                         seconds=self.seconds)
        self._push(dc)
        return dc

    def _push(self, dc: DelayedCall) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (dc.getTime(), self._seq, dc))

    def getDelayedCalls(self) -> list[DelayedCall]:  # noqa: N802
        return [dc for _, _, dc in self._heap if dc.active()]

    def next_time(self) -> float:
        heap = self._heap
        while heap:
            t, _, dc = heap[0]
            if not dc.active():
                heapq.heappop(heap)  # cancelled or called
            elif dc.delayed_time:
                heapq.heappop(heap)  # postponed by reset: DelayedCall leaves that to the reactor
                dc.activate_delay()
                self._push(dc)
            elif dc.time != t:
                heapq.heappop(heap)  # brought forward by reset, which pushed it again
            else:
                return t
        return math.inf

    def run_until(self, until: float) -> None:
        """Run every call due up to ``until``, each at its own time."""
        t0 = time.perf_counter()  # process_time is a slow system call here: scaled to it by the caller
        while self.next_time() <= until:
            t, _, dc = heapq.heappop(self._heap)
            self.rightNow = max(self.rightNow, t)
            dc.called = 1
            dc.func(*dc.args, **dc.kw)
        self.rightNow = max(self.rightNow, until)
        self.busy_s += time.perf_counter() - t0

    def advance(self, amount: float) -> None:
        self.run_until(self.rightNow + amount)


class CausalLock(DeferredLock):
    """A `DeferredLock` whose waiting work runs in the context it was asked in (see `CAUSE`)."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        ctx = contextvars.copy_context()
        return super().run(lambda *a, **kw: ctx.run(f, *a, **kw), *args, **kwargs)


class _NoMedia:
    """The runner's media, for jobs that never run here: a lost job's ffmpeg is "cancelled"."""

    def cancel(self, job_id: str) -> None:
        pass


@dataclass
class JobLayer:
    """What one node's job layer is to the pool: its timers, its reactions, its jobs."""

    runner: Runner
    adopter: Adopter
    loops: list[JitteredLoop]
    #: the ids of the jobs it holds
    held: Callable[[], list[str]]
    #: claims its unfinished jobs from an earlier life before the node listens (JobService.recover)
    recover: Callable[[], Deferred[Any]]
    load: Callable[[], dict[str, float]]


def job_layer(clock: Any, store: ObjectStore, node_id: str, *, lease: float, rng: random.Random,
              on_claim: Callable[[str, str], None], metrics: Metrics) -> JobLayer:
    """One node's job layer as gridnode/pipeline.py's JobService builds it, without its HTTP side:
    the runner (no timer: a job's record is written when its state changes) and the adopter (our
    own markers every 2 x lease, the old layout's every `LEGACY_EVERY` s on the registry writer),
    on ``store`` (the node's gated store). Who is gone and who acts on a death: `wire_adoption`.
    The one place to re-point at another job layer."""
    runner = Runner(clock, store, _NoMedia(), node_id=node_id, lease=lease, now=clock.seconds,  # type: ignore[arg-type]
                    metrics=metrics, rng=rng)

    class Host:
        draining = False
        active = runner.active
        capacity = WORKERS + QUEUE

        @staticmethod
        def holds(job_id: str) -> bool:
            return job_id in runner.active

        @staticmethod
        def run_claimed(claim: Claim) -> None:  # JobService.run_claimed, less the run
            on_claim(claim.job.id, node_id)
            runner.active[claim.job.id] = Active(claim.job, f"/nonexistent/{claim.job.id}", etag=claim.etag,
                                                 stored=True)

        @staticmethod
        def quarantined(job: Job) -> None:
            pass

    adopter = Adopter(store.in_lane(BACKGROUND), Host(), node_id, lease, now=clock.seconds, rng=rng)
    # one owner's prefix at a time; one waiting for another runs in its own asker's name
    adopter._taking = CausalLock()
    loops = [JitteredLoop(clock, caused("own", adopter.check_own), 2 * lease, rng, SPREAD),
             JitteredLoop(clock, caused("legacy", adopter.migrate), LEGACY_EVERY, rng, SPREAD)]

    def load() -> dict[str, float]:
        running = sum(1 for a in runner.active.values() if a.job.state == jobs.TRANSCODING)
        return {"running": running, "queued": len(runner.active) - running, "workers": WORKERS,
                "free_disk": 50e9, "work": 0.0}

    return JobLayer(runner, adopter, loops, lambda: list(runner.active), caused("start", adopter.check_own), load)


class _CausalReactor:
    """The clock the successor waits its turn on: a standby's turn runs in the context of the event
    it acts on, so its requests are counted as that event's."""

    def __init__(self, clock: PoolClock) -> None:
        self.clock = clock

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall:  # noqa: N802
        return self.clock.callLater(delay, contextvars.copy_context().run, f, *args, **kw)


class Membership:
    """What gridnode/node.py's `_wire_adoption` asks of the membership service (its machine, its live
    members) and sets on it (``on_confirmed_dead``, ``on_declared_dead``, ``on_left``)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.on_confirmed_dead: Callable[[str, int], Any] | None = None
        self.on_declared_dead: Callable[[str, int], Any] | None = None
        self.on_left: Callable[[str], Any] | None = None

    def live_members(self) -> list[str]:  # MembershipService.live_members
        return [v.member for v in self.machine.members() if v.state in (swim.ALIVE, swim.SUSPECT)]

    def unsettled(self) -> int:  # MembershipService.unsettled
        return sum(1 for v in self.machine.members() if v.state != swim.ALIVE)


def wire_adoption(clock: PoolClock, layer: JobLayer, machine: Any, registry: Registry) -> Membership:
    """node.py's own wiring (`NodeService._wire_adoption`, called as it is, not copied): the adopter's
    ``gone``/``members``/``heir``/``reads_legacy``, and a `Successor` (gridnode/succession.py) acting on
    the deaths and leaves this node is a watcher of, in ring order."""
    membership = Membership(machine)
    node = SimpleNamespace(reactor=_CausalReactor(clock))
    NodeService._wire_adoption(cast(Any, node), cast(Any, SimpleNamespace(adopter=layer.adopter)), membership,
                               registry)
    return membership


@dataclass
class NodeParts:
    """One node's parts beside its membership machine."""

    up: bool = True
    gate: CausalGate | None = None
    registry: Registry | None = None
    layer: JobLayer | None = None
    membership: Membership | None = None
    jobs: list[str] = field(default_factory=list)


class PoolSim(Sim):
    """`Sim` with each node's registry and job layer on `clock`, writing to `backend`."""

    def __init__(self, p: Params, *, jobs_per_node: int = 16, running: int = 4, lease: float = 30.0,
                 heartbeat: float = 30.0, depth: int = 1, boot_spread: float = 30.0) -> None:
        super().__init__(p)
        self.clock = PoolClock()
        self.backend = CountingBackend(self.clock.seconds, depth=depth)
        self.seeding = ObjectStore.synchronous(self.backend)
        self.metrics = Metrics()
        self.jobs_per_node, self.running, self.lease, self.heartbeat = jobs_per_node, running, lease, heartbeat
        self.boot_spread = boot_spread
        self.parts: dict[int, NodeParts] = {}
        #: job id -> [(time, adopter)] of every claim won
        self.claims: dict[str, list[tuple[float, str]]] = {}
        #: member -> when the first node confirmed its death
        self.confirmed_at: dict[str, float] = {}
        #: joiner -> seconds from its start to serving (its recovery over)
        self.served: dict[str, float] = {}
        self.job_rng = random.Random(p.seed * 31 + 7)

    # -- the two clocks as one

    def run_to(self, end: float) -> None:
        while True:
            tc = self.clock.next_time()
            ts = self.heap[0][0] if self.heap else math.inf
            if min(tc, ts) > end:
                break
            if ts <= tc:
                self.advance(ts)
                self.clock.rightNow = max(self.clock.rightNow, self.now)
            else:
                self.now = tc
                self.clock.run_until(tc)
        self.now = end
        self.clock.run_until(end)

    # -- nodes

    def boot(self, i: int) -> NodeParts:
        """Node ``i``'s registry, bucket and job layer, wired as node.py wires them; nothing started."""
        nd = self.nodes[i]
        parts = self.parts[i] = NodeParts()
        rng = random.Random(self.rng.getrandbits(64))

        def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            if not parts.up:
                return Deferred()  # a dead process: nothing is sent, nothing comes back
            try:
                return succeed(fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - handed to the caller's errback
                return fail(e)

        machine = nd.m
        # node.py: gate.members is set once the membership is made, after the job layer recovered
        parts.gate = CausalGate(self.clock, rate=None, slots=THREADS)
        store = ObjectStore(self.backend, run).gated(parts.gate)
        host = nd.m.address.split(":")[0]
        registry = parts.registry = Registry(
            self.clock, store.in_lane(BACKGROUND), env=ENV, pool=POOL, node_id=nd.id,
            http_url=f"https://{host}:8080", peer_addr=nd.m.address, heartbeat=self.heartbeat,
            now=self.clock.seconds, incarnation=lambda: machine.incarnation, rng=rng)
        parts.layer = job_layer(self.clock, store, nd.id, lease=self.lease, rng=rng, on_claim=self._claimed,
                                metrics=self.metrics)
        parts.membership = wire_adoption(self.clock, parts.layer, machine, registry)
        registry.load = parts.layer.load
        registry.on_read.append(lambda records: self._registry_read(nd, records))
        registry.on_seed.append(lambda records: self._registry_seeds(nd, records))
        registry.wanted = lambda member: (v := machine.member(member)) is None or v.state in (swim.DEAD, swim.LEFT)
        registry.held = lambda: {v.member: v.state for v in machine.members()}
        return parts

    def _seed(self, i: int, parts: NodeParts) -> None:
        """Node ``i``'s jobs, stored and marked under it as the runner writes them."""
        assert parts.layer is not None
        runner = parts.layer.runner
        node_id = self.nodes[i].id
        with cause("setup"):
            for n in range(self.jobs_per_node):
                jid = job_id(self.job_rng, 1_764_700_000_000 + i * 100 + n)
                job = Job.new(jid, name=f"clip-{n}.mp4", presets=["720p"], node=node_id, size=50_000_000,
                              now=self.clock.seconds())
                job.advance(jobs.PROBING, self.clock.seconds())
                job.accept(self.clock.seconds(), self.lease)
                if n < self.running:
                    job.advance(jobs.TRANSCODING, self.clock.seconds())
                written: list[Any] = []
                job_records.write(self.seeding, jid, job.dumps(), None, node_id).addCallback(written.append)
                info = written[0]
                self.seeding.put_bytes(keys.active_marker(node_id, jid), b"")
                runner.active[jid] = Active(job, f"/nonexistent/{jid}", etag=info.etag, stored=True)
                parts.jobs.append(jid)

    def _serve(self, i: int, parts: NodeParts) -> None:
        """What node.py does once the job layer recovered: the membership, the registry, the timers."""
        assert parts.layer is not None and parts.registry is not None and parts.gate is not None
        machine = self.nodes[i].m
        registry = parts.registry
        parts.gate.members = lambda: pool_size(machine.live_count(), registry.listed_count)  # node.py's
        assert parts.membership is not None
        parts.gate.events = parts.membership.unsettled
        for loop in parts.layer.loops:
            loop.start(now=False)
        parts.registry.startService()

    def start_all(self) -> None:
        """Every node of the pool boots at a random moment of the first ``boot_spread`` s, so its
        timers are in no step with the others' (a pool that has run a while)."""
        at = [self.rng.random() * self.boot_spread for _ in range(self.p.nodes)]
        for i in range(self.p.nodes):
            self.boot(i)
            self._seed(i, self.parts[i])
        self._settle_registries()
        for i in range(self.p.nodes):
            self.clock.callLater(at[i], self._serve, i, self.parts[i])

    def _settle_registries(self) -> None:
        """Two heartbeats of every node's registry, outside the token buckets (setup, not counted):
        each has read every record once, as in a pool that has run a while. A node's first read
        fetches every record, new to it; through its bucket (1 a second at N=1000) that alone
        would take longer than the runs (the ``start`` scenario measures it)."""
        with cause("setup"):
            for _ in range(2):
                for parts in self.parts.values():
                    reg = parts.registry
                    assert reg is not None
                    gated = reg.store, reg.keeping
                    reg.store, reg.keeping = self.seeding.in_lane(BACKGROUND), self.seeding
                    reg.beat()
                    reg.store, reg.keeping = gated

    def kill(self, i: int, at: float) -> None:
        """Node ``i``'s process (or host, by the Sim's kill mode) is gone at ``at``: no goodbye."""
        self.push(at, _KILL, i)

        def halt() -> None:
            self.parts[i].up = False

        self.clock.callLater(at - self.clock.seconds(), halt)

    def join(self, i: int, at: float) -> None:
        """Node ``i`` starts at ``at`` into the pool: it recovers (reads the store for an earlier
        life's jobs), then serves, joins the membership and registers (node.py's order)."""

        def start() -> None:
            parts = self.boot(i)
            assert parts.layer is not None
            began = self.clock.seconds()

            def served(_: Any) -> None:
                self.served[self.nodes[i].id] = self.clock.seconds() - began
                # its membership starts knowing no one (node.py: the registry's first look seeds it),
                # then the registry and the timers start
                self.push(self.clock.seconds(), _JOIN, i)
                self.clock.callLater(0, self._serve, i, parts)

            parts.layer.recover().addCallback(served)

        self.clock.callLater(at - self.clock.seconds(), start)

    def _claimed(self, job: str, node: str) -> None:
        self.claims.setdefault(job, []).append((self.clock.seconds(), node))

    # -- membership.service's glue

    def _registry_read(self, nd: Any, records: list[Any]) -> None:
        """MembershipService.registry_read: admit the listed nodes, tell the machine who is stale."""
        if not nd.started or not nd.up:
            return
        m, now = nd.m, self.now
        fresh = {r.id for r in records}
        records = [r for r in records if r.peer_addr]  # listed only: known alive, no address
        outs = m.add_members([(r.id, r.peer_addr) for r in records], now, {r.id: r.incarnation for r in records})
        for r in records:
            view = m.member(r.id)
            if view is not None and view.state in (swim.DEAD, swim.LEFT) and r.incarnation > view.incarnation:
                outs += m.add_member(r.id, r.peer_addr, r.incarnation, now)
        for view in m.members():
            if view.member != m.me and view.member not in fresh and view.state in (swim.SUSPECT, swim.DEAD):
                outs += m.registry_stale(view.member, None, now)
        self.dispatch(nd, outs)
        self.reschedule(nd)

    def join_seeds(self, nd: Any) -> list[Any]:
        """A joiner's membership knows no one when it starts: its registry seeds it."""
        return []

    def _registry_seeds(self, nd: Any, records: list[Any]) -> None:
        """MembershipService.registry_seeds: admit a starting node's few seeds, sync with one."""
        if not nd.started or not nd.up:
            return
        m, now = nd.m, self.now
        outs = m.add_members([(r.id, r.peer_addr) for r in records if r.peer_addr], now,
                             {r.id: r.incarnation for r in records})
        outs += m.sync_now(now)
        self.dispatch(nd, outs)
        self.reschedule(nd)

    def dispatch(self, src: Any, outs: list[Any]) -> None:
        super().dispatch(src, outs)
        parts = self.parts.get(src.i)
        if parts is None or not parts.up or parts.registry is None or parts.layer is None:
            return
        for o in outs:
            if isinstance(o, swim.ConfirmedDead):
                self.confirmed_at.setdefault(o.member, self.now)
                self.clock.rightNow = max(self.clock.rightNow, self.now)
                self._gone(parts, o.member, o.incarnation, "death")
            elif isinstance(o, swim.MemberChanged) and o.state == swim.LEFT:
                self._gone(parts, o.member, o.incarnation, "left")
            elif isinstance(o, swim.MemberChanged) and o.state == swim.DEAD and src.m.holds_dead(o.member):
                # MembershipService._changed: a death a peer declared
                self.clock.rightNow = max(self.clock.rightNow, self.now)
                act = parts.membership.on_declared_dead if parts.membership is not None else None
                if act is not None:
                    caused("death", maybeDeferred)(act, o.member, o.incarnation)

    @staticmethod
    def _gone(parts: NodeParts, member: str, incarnation: int, why: str) -> None:
        """MembershipService._confirmed_dead / _changed (left): ``on_gone`` (the registry forgets it),
        then ``on_confirmed_dead`` or ``on_left``, which node.py wired to its `Successor`."""
        registry, membership = parts.registry, parts.membership
        assert registry is not None and membership is not None
        registry.forget(member, incarnation)
        if why == "death":
            act: Any = membership.on_confirmed_dead
            args: tuple[Any, ...] = (member, incarnation)
        else:
            act, args = membership.on_left, (member,)
        if act is not None:
            caused(why, maybeDeferred)(act, *args)  # a failure is logged (at collection) as Twisted does
