"""
The membership's TCP glue: AMP connections in and out, the machine's timer
on the reactor, and what the machine's outputs mean to the rest of the node.

- Out: a bounded cache of connections keyed by peer address (least recently
  used one closed past ``max_out``), with a connect timeout; a message whose
  connection fails is lost, as on UDP (SWIM expects loss), and counted with the
  dropped ones (``send_failed``). A connection *refused* is news, though: nothing
  listens at that address any more, so the machine hears of it
  (``SwimMachine.refused``). A message over the wire's size limit is not sent,
  counted (``send_oversized``) and logged: the machine cuts its syncs to fit, so
  one is a bug to report.
- In: at most ``max_in`` concurrent connections; more are closed at once.
- Watching: a standing connection to each member the machine watches
  (``Watch``/``Unwatch``), remade when lost. Over it, ``CheckHost`` asks the
  member's kernel whether the host is still there (``hostcheck.HostCheck``); a
  standing connection that is lost and then refused is a refusal like any other.
- Bootstrap and healing: every registry read adds the records' nodes, and
  says which records are stale (the bucket as an independent witness).
- What the rest of the node hears, through callbacks only: a peer that left
  (``on_left``), was confirmed dead here (``on_confirmed_dead``, with the dead
  incarnation) or was declared dead by a peer (``on_declared_dead``: a death
  spreads only when two members suspected it): its watchers, in ring order,
  delete that life's record and adopt its jobs, gridnode/succession.py; and a
  peer that left or was confirmed dead here (``on_gone``: the registry drops it
  from nodes.json at once).

A Twisted service: ``startService`` joins; ``stopService`` leaves (``left``,
not ``dead``) and closes every timer and connection, and the port ``listen``
opened. Listening is a call of its own, before the node registers: it can fail
(the port is taken), which ``startService`` could not report.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import ConnectError, ConnectionClosed, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from gridnode.membership import swim, wire
from gridnode.membership.hostcheck import HostCheck
from gridnode.membership.peer import PeerProtocol, keep_alive


class RegisteredPeer(Protocol):
    """What the membership takes from a node's registry record (``NodeRecord``)."""

    id: str
    peer_addr: str
    incarnation: int


class _InboundFactory(Factory):
    def __init__(self, service: MembershipService) -> None:
        self.service = service

    def buildProtocol(self, addr: Any) -> PeerProtocol | None:  # noqa: N802 - Twisted's name
        if len(self.service.inbound) >= self.service.max_in:
            self.service.drop("too_many_connections")
            return None
        proto = PeerProtocol(self.service)
        self.service.inbound.add(proto)
        return proto


class _Standing:
    """The standing connection to one watched member."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.proto: Any = None
        self.retry: Any = None
        self.since = 0.0
        self.closed = False


class MembershipService(Service):
    _log = Logger()

    def __init__(
        self, reactor: Any, machine: swim.SwimMachine, keys: wire.PeerKeys, *, metrics: Any = None,
        on_confirmed_dead: Callable[[str, int], Any] | None = None, on_left: Callable[[str], Any] | None = None,
        stale: float = 300.0, max_out: int = 64, max_in: int = 256, connect_timeout: float = 2.0,
        now: Callable[[], float] = time.time, host_check: Callable[..., Any] = HostCheck, join: bool = True,
    ) -> None:
        self.reactor = reactor
        self.machine = machine
        self.opener = wire.Opener(keys, now)
        #: the pool's MAC keys now (a keyring re-read while the node runs): the first seals
        self.keys = keys
        self.metrics = metrics
        #: called with (member, incarnation) when a peer is confirmed dead, after ``on_gone``; may
        #: return a Deferred (the node deletes that life's record, then adopts the member's jobs)
        self.on_confirmed_dead = on_confirmed_dead
        #: called with a member that left cleanly (a drained node: its jobs were just released)
        self.on_left = on_left
        #: called with (member, incarnation) when a peer's declaration of a death reaches us and we
        #: hold it dead (not our own declaration: that one comes confirmed, `on_confirmed_dead`)
        self.on_declared_dead: Callable[[str, int], Any] | None = None
        #: called with (member, incarnation) when a peer left or was confirmed dead
        self.on_gone: list[Callable[[str, int], Any]] = []
        self.stale = stale
        self.max_out = max_out
        self.max_in = max_in
        self.connect_timeout = connect_timeout
        self.now = now
        #: whether starting announces us and syncs with one member at once
        self.join = join
        self.inbound: set[PeerProtocol] = set()
        self._out: OrderedDict[str, Any] = OrderedDict()
        self._connecting: dict[str, list[Deferred[Any]]] = {}
        self._standing: dict[str, _Standing] = {}
        #: makes a check over a connection: ``host_check(reactor, proto).run()`` fires True when silent
        self.host_check = host_check
        #: host checks by verdict (silent, answered, void), for /peers and tests
        self.checks: dict[str, int] = {}
        self._timer: Any = None
        self._tick_next_turn = False
        self.last_heard: dict[str, float] = {}
        self.dropped: dict[str, int] = {}
        self._port: Any = None
        #: called with each `wire.Note` for us, opened and checked (gridnode/chunk_grid.py)
        self.on_note: Callable[[wire.Note], None] | None = None

    # -- life cycle

    @inlineCallbacks
    def listen(self, endpoint: Any) -> Any:
        """Take peers' connections on ``endpoint`` (closed by `stopService`); fires the port."""
        self._port = yield endpoint.listen(_InboundFactory(self))
        return self._port

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        """Join: arm the machine's timers and connect to the members we watch."""
        super().startService()
        for member in list(self._standing):
            self._stand(member)
        self.act(self.machine.start(self.now(), join=self.join))

    @inlineCallbacks
    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        """Tell peers we leave (``left``, not ``dead``), then `halt`."""
        if self.running:
            outputs = self.machine.leave(self.now())
            sent = [self._send(m) for m in outputs if isinstance(m, swim.Message)]
            for d in sent:
                try:
                    yield d
                except Exception:  # noqa: BLE001 - best effort
                    pass
        yield self.halt()

    @inlineCallbacks
    def halt(self) -> Any:
        """Stop at once, telling no one: the machine's timer, every connection, the port."""
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        for proto in list(self._out.values()):
            proto.transport.loseConnection()
        self._out.clear()
        for member in list(self._standing):
            self._unwatch(member)
        for p in list(self.inbound):
            if p.transport is not None:
                p.transport.loseConnection()
        port, self._port = self._port, None
        if port is not None:
            yield port.stopListening()

    # -- the machine

    def act(self, outputs: list[swim.Output]) -> None:
        for out in outputs:
            if isinstance(out, swim.Message):
                self._send(out).addErrback(self._send_failed, out)
            elif isinstance(out, swim.ConfirmedDead):
                self._confirmed_dead(out)
            elif isinstance(out, swim.MemberChanged):
                self._changed(out)
            elif isinstance(out, swim.Watch):
                self._watch(out.member, out.address)
            elif isinstance(out, swim.Unwatch):
                self._unwatch(out.member)
            elif isinstance(out, swim.CheckHost):
                self._check_host(out.member, out.address)
        self._schedule()

    def _schedule(self) -> None:
        if not self.running or self._tick_next_turn:
            return  # a tick is queued: it reschedules when it has run
        deadline = self.machine.next_deadline()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if deadline is not None:
            self._timer = self.reactor.callLater(max(0.0, deadline - self.now()), self._due)

    def _due(self) -> None:
        # Tick one reactor turn later: a reactor runs due timers before it reads its sockets, so
        # after a stall an ack or refutation already queued would otherwise be read only after the
        # machine has accused or declared dead for want of it.
        self._tick_next_turn = True
        self._timer = self.reactor.callLater(0, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._tick_next_turn = False
        if self.running:
            self.act(self.machine.tick(self.now()))

    def deliver(self, command: str, values: dict[str, Any]) -> None:
        try:
            msg = self.opener.open(command, values["version"], values["sent"], values["nonce"], values["payload"],
                                   values["mac"])
        except wire.Dropped as e:
            self.drop(e.reason)
            return
        if msg.dest != self.machine.me:
            self.drop("not_for_me")
            return
        self.last_heard[msg.sender] = self.now()
        if isinstance(msg, wire.Note):
            if self.on_note is None:
                self.drop("no_handler")
            elif self.running:
                self.on_note(msg)
            return
        if self.running:
            self.act(self.machine.receive(msg, self.now()))

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.peer_dropped.labels(reason).inc()
        self._log.debug("dropped a peer message: {reason}", reason=reason)

    def send_note(self, note: wire.Note) -> None:
        """Send ``note`` one way, as a message of the machine's (a failure counted and logged)."""
        self._send(note).addErrback(self._send_failed, note)

    def _send_failed(self, failure: Any, msg: swim.Message | wire.Note) -> None:
        """Counted, logged, and a refusal told to the machine; never silent: a sync that cannot be
        sent would otherwise stop anti-entropy without a trace."""
        self.drop("send_failed")
        if failure.check(ConnectError, ConnectionClosed, DNSLookupError):
            # the peer is gone or unreachable: loss SWIM expects, common around a death
            self._log.debug("{kind} to {peer} not sent: {error}", kind=type(msg).__name__, peer=msg.dest,
                            error=failure.getErrorMessage())
        else:
            self._log.failure("{kind} to {peer} not sent", failure, kind=type(msg).__name__, peer=msg.dest)
        # a note's refusal is left to the machine's own probes of that member
        if failure.check(ConnectionRefusedError) and self.running and not isinstance(msg, wire.Note):
            self.act(self.machine.refused(msg.dest, msg.dest_addr, self.now()))

    def _changed(self, change: swim.MemberChanged) -> None:
        self._log.info("peer {peer} is {state} (incarnation {incarnation})", peer=change.member,
                       state=change.state, incarnation=change.incarnation)
        if self.metrics is not None:
            if change.state == swim.SUSPECT:
                self.metrics.suspicions.inc()
            elif change.state == swim.DEAD:
                self.metrics.deaths.labels("no").inc()
        if change.state == swim.LEFT:
            self._gone(change.member, change.incarnation)
            if self.on_left is not None:
                self._offer_jobs(self.on_left, change.member)
        elif (change.state == swim.DEAD and self.on_declared_dead is not None
              and self.machine.holds_dead(change.member)):
            self._offer_jobs(self.on_declared_dead, change.member, change.incarnation)

    def _offer_jobs(self, callback: Callable[..., Any], member: str, *args: Any) -> Deferred[Any]:
        """Hand a gone member to the node, whose watchers of it adopt its jobs; a failure is logged
        (the member's other watchers take over what is left, gridnode/succession.py)."""
        d = maybeDeferred(callback, member, *args)
        d.addErrback(lambda f: self._log.failure("adopting the jobs of {peer} failed", f, peer=member))
        return d

    def _gone(self, member: str, incarnation: int) -> None:
        for callback in self.on_gone:
            callback(member, incarnation)

    # -- connections

    def _send(self, msg: swim.Message | wire.Note) -> Deferred[Any]:
        command, args = wire.seal(self.keys()[0], msg, self.now())
        if len(args["payload"]) > wire.MAX_PAYLOAD:
            # the receiver would drop it (and AMP refuses a value over 65,535 bytes)
            self.drop("send_oversized")
            self._log.warn("{kind} to {peer} not sent: {size} bytes, over the limit of {limit}",
                           kind=type(msg).__name__, peer=msg.dest, size=len(args["payload"]), limit=wire.MAX_PAYLOAD)
            return succeed(None)
        d = self._connection(msg.dest_addr)

        def call(proto: PeerProtocol) -> Any:
            if self.metrics is not None and isinstance(msg, (swim.Ping, swim.PingReq)):
                self.metrics.probes.labels(type(msg).__name__.lower()).inc()
            return proto.callRemote(command, **args)

        return d.addCallback(call)

    def _connection(self, address: str) -> Deferred[Any]:
        """A connection to ``address``: cached, being made, or new (closing the least used)."""
        proto = self._out.get(address)
        if proto is not None:
            self._out.move_to_end(address)
            return succeed(proto)
        d: Deferred[Any] = Deferred()
        waiting = self._connecting.get(address)
        if waiting is not None:
            waiting.append(d)
            return d
        self._connecting[address] = [d]
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        host, _, port = address.rpartition(":")
        endpoint = TCP4ClientEndpoint(self.reactor, host, int(port), timeout=self.connect_timeout)
        made = PeerProtocol(None, on_lost=lambda: self._forget(address, made))

        def connected(p: Any) -> None:
            self._out[address] = p
            while len(self._out) > self.max_out:
                _, old = self._out.popitem(last=False)
                old.transport.loseConnection()
            for waiter in self._connecting.pop(address, []):
                waiter.callback(p)

        def failed(f: Any) -> None:
            for waiter in self._connecting.pop(address, []):
                waiter.errback(f)

        connectProtocol(endpoint, made).addCallbacks(connected, failed)
        return d

    # -- watching

    def _watch(self, member: str, address: str) -> None:
        held = self._standing.get(member)
        if held is not None and held.address == address:
            return
        if held is not None:
            self._unwatch(member)
        self._standing[member] = _Standing(address)
        if self.running:
            self._stand(member)

    def _unwatch(self, member: str) -> None:
        held = self._standing.pop(member, None)
        if held is None:
            return
        held.closed = True
        if held.retry is not None and held.retry.active():
            held.retry.cancel()
        if held.proto is not None and held.proto.transport is not None:
            held.proto.transport.loseConnection()

    def _stand(self, member: str) -> None:
        """Make the standing connection to ``member``; when lost, remake it at once (after a probe
        period if it was short-lived or could not be made). A refusal goes to the machine."""
        held = self._standing.get(member)
        if held is None or held.closed or held.proto is not None:
            return
        held.retry = None
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        host, _, port = held.address.rpartition(":")
        endpoint = TCP4ClientEndpoint(self.reactor, host, int(port), timeout=self.connect_timeout)
        made = PeerProtocol(None, on_lost=lambda: lost())
        period = self.machine.config.probe_interval

        def again(delay: float) -> None:
            if not held.closed and self.running:
                held.retry = self.reactor.callLater(delay, self._stand, member)

        def lost() -> None:
            if held.proto is made:
                # at once (a crashed process's kernel closed it: the new try is refused), unless it
                # was short-lived (the peer turns connections away): then not in a tight loop
                held.proto = None
                again(0 if self.reactor.seconds() - held.since > period else period)

        def connected(p: Any) -> None:
            if held.closed:
                p.transport.loseConnection()
                return
            # each frame of a host check must go out at once, not wait for the last one's ACK
            p.transport.setTcpNoDelay(True)
            keep_alive(p.transport.getHandle())
            held.proto = p
            held.since = self.reactor.seconds()

        def failed(f: Any) -> None:
            if f.check(ConnectionRefusedError) and self.running and not held.closed:
                self.act(self.machine.refused(member, held.address, self.now()))
            again(period)

        connectProtocol(endpoint, made).addCallbacks(connected, failed)

    def _check_host(self, member: str, address: str) -> None:
        held = self._standing.get(member)
        if held is None or held.address != address or held.proto is None:
            return  # no standing connection (yet): nothing to ask
        d = self.host_check(self.reactor, held.proto).run()

        def judged(silent: bool | None) -> None:
            verdict = {True: "silent", False: "answered", None: "void"}[silent]
            self.checks[verdict] = self.checks.get(verdict, 0) + 1
            if self.metrics is not None:
                self.metrics.host_checks.labels(verdict).inc()
            if silent and self.running:
                self._log.info("peer {peer}'s host acknowledged none of our frames", peer=member)
                self.act(self.machine.host_silent(member, address, self.now()))

        d.addCallback(judged)
        d.addErrback(lambda f: self._log.failure("host check of {peer} failed", f, peer=member))

    def _forget(self, address: str, proto: Any) -> None:
        if self._out.get(address) is proto:
            del self._out[address]

    def inbound_lost(self, proto: PeerProtocol) -> None:
        self.inbound.discard(proto)

    # -- the registry as bootstrap list and witness

    def registry_read(self, records: Sequence[RegisteredPeer]) -> None:
        """Every registry read: admit the nodes it lists; tell the machine whose heartbeat is stale.
        A record known from the listing alone (no address: we held its node alive) is fresh, and
        admits no one."""
        now = self.now()
        fresh = {r.id for r in records}
        records = [r for r in records if r.peer_addr]
        self.act(self.machine.add_members([(r.id, r.peer_addr) for r in records], now,
                                          {r.id: r.incarnation for r in records}))
        for r in records:
            view = self.machine.member(r.id)
            if view is not None and view.state in (swim.DEAD, swim.LEFT) and r.incarnation > view.incarnation:
                self.act(self.machine.add_member(r.id, r.peer_addr, r.incarnation, now))
        for view in self.machine.members():
            if view.member != self.machine.me and view.member not in fresh and view.state in (swim.SUSPECT,
                                                                                             swim.DEAD):
                self.act(self.machine.registry_stale(view.member, None, now))

    def registry_seeds(self, records: Sequence[RegisteredPeer]) -> None:
        """A starting node's first look at a large pool's registry (a few records): admit them and
        sync with one at once (the join sync brings every member: the registry's other records
        need no reading)."""
        now = self.now()
        self.act(self.machine.add_members([(r.id, r.peer_addr) for r in records if r.peer_addr], now,
                                          {r.id: r.incarnation for r in records}))
        self.act(self.machine.sync_now(now))

    def live_members(self) -> list[str]:
        """The ids of the members held alive or suspect, ourselves included."""
        return [v.member for v in self.machine.members() if v.state in (swim.ALIVE, swim.SUSPECT)]

    def unsettled(self) -> int:
        """Members held suspect, dead or left (until forgotten): at least the deaths and leaves that
        may be acted on at once, as this node sees the pool (the store's EVENT lane shares the
        pool's budget by it). Suspicions count, so a mass failure counts before its deaths are
        confirmed."""
        return sum(1 for v in self.machine.members() if v.state != swim.ALIVE)

    def needs_record(self, member: str) -> bool:
        """Whether a changed registry record of ``member`` can tell us anything: not while we hold
        it alive or suspect (the protocol knows its address and incarnation better)."""
        view = self.machine.member(member)
        return view is None or view.state in (swim.DEAD, swim.LEFT)

    def _confirmed_dead(self, dead: swim.ConfirmedDead) -> Deferred[Any]:
        self._log.warn("peer {peer} confirmed dead at incarnation {incarnation}", peer=dead.member,
                       incarnation=dead.incarnation)
        if self.metrics is not None:
            self.metrics.deaths.labels("yes").inc()
        self._gone(dead.member, dead.incarnation)
        if self.on_confirmed_dead is None:
            return succeed(None)
        return self._offer_jobs(self.on_confirmed_dead, dead.member, dead.incarnation)

    # -- views

    def peers(self) -> list[dict[str, Any]]:
        return [{"id": v.member, "address": v.address, "state": v.state, "incarnation": v.incarnation,
                 "last_heard": self.last_heard.get(v.member)} for v in self.machine.members()]


def new_machine(me: str, address: str, incarnation: int, now: float) -> swim.SwimMachine:
    return swim.SwimMachine(me, address, incarnation=incarnation, now=now, rng=random.Random())
