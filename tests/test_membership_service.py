"""The membership's TCP glue, driven on a MemoryReactorClock with connections made in memory."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim

from gridnode import keys
from gridnode.membership import swim, wire
from gridnode.membership.service import MembershipService
from gridnode.registry.records import NodeRecord
from gridnode.registry.service import Registry
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend

KEY = b"k" * 32


class _Socket:
    """What `keep_alive` sets options on."""

    def setsockopt(self, *args: Any) -> None:
        pass


class _Transport(iosim.FakeTransport):
    def getHandle(self) -> _Socket:  # noqa: N802 - Twisted's name
        return _Socket()


class _Port:
    def __init__(self, wires: Wires, address: str) -> None:
        self.wires = wires
        self.address = address

    def stopListening(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        self.wires.listening.pop(self.address, None)
        return succeed(None)


class _Endpoint:
    def __init__(self, wires: Wires, address: str) -> None:
        self.wires = wires
        self.address = address

    def listen(self, factory: Factory) -> Deferred[_Port]:
        self.wires.listening[self.address] = factory
        return succeed(_Port(self.wires, self.address))


class Wires:
    """Services on one MemoryReactorClock, their TCP made in memory: a connection to an address
    something listens on (`endpoint`) is completed through iosim; any other is refused."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.listening: dict[str, Factory] = {}
        self.pumps: list[iosim.IOPump] = []

    def endpoint(self, address: str) -> _Endpoint:
        return _Endpoint(self, address)

    def settle(self) -> None:
        """Make or refuse the connections asked for and carry every byte, until nothing moves."""
        moved = True
        while moved:
            moved = False
            while self.reactor.tcpClients:
                host, port, factory, _, _ = self.reactor.tcpClients.pop(0)
                connector = self.reactor.connectors.pop(0)
                server_factory = self.listening.get(f"{host}:{port}")
                server = server_factory.buildProtocol(None) if server_factory is not None else None
                if server is None:
                    factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                else:
                    client = factory.buildProtocol(None)
                    self.pumps.append(iosim.connect(server, _Transport(server, isServer=True), client,
                                                    _Transport(client, isServer=False), greet=False,
                                                    clock=self.reactor))
                moved = True
            for pump in list(self.pumps):
                moved = pump.flush() or moved
                if pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self.pumps.remove(pump)

    def run_until(self, done: Callable[[], object], seconds: float, step: float = 0.05) -> float:
        """Let time pass in small steps until ``done()``; the simulated seconds it took."""
        start = self.reactor.seconds()
        self.settle()
        while not done():
            assert self.reactor.seconds() - start < seconds, f"condition not reached within {seconds}s"
            self.reactor.advance(step)
            self.settle()
        return self.reactor.seconds() - start


def test_a_refused_connection_is_reported_to_the_machine() -> None:
    """Nothing listens at a member's address: the refusal makes it suspect with the short timeout."""
    wires = Wires()
    clock = wires.reactor
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=clock.seconds())
    machine.add_members([("b", "127.0.0.1:2")], clock.seconds())
    service = MembershipService(clock, machine, wire.fixed_keys(KEY), connect_timeout=5, now=clock.seconds,
                                join=False)
    service.startService()
    try:
        wires.run_until(lambda: machine.suspicion_deadline("b") is not None, 10)
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None
        lo, _ = machine.config.suspicion_bounds(2)
        # the silent-member timeout here would be ``lo`` (4 periods): a refusal cuts it to one
        assert deadline - clock.seconds() <= machine.config.gone_suspicion_mult * machine.config.probe_interval
        assert machine.config.gone_suspicion_mult * machine.config.probe_interval < lo
    finally:
        service.halt()


def _pair(wires: Wires, start: bool = True, **kw: Any) -> dict[str, MembershipService]:
    """Two members at incarnation 7 that know each other, listening (and started)."""
    clock = wires.reactor
    addrs = {"a": "127.0.0.1:7001", "b": "127.0.0.1:7002"}
    services = {}
    for name, addr in addrs.items():
        machine = swim.SwimMachine(name, addr, incarnation=7, rng=random.Random(2), now=clock.seconds())
        other = "b" if name == "a" else "a"
        machine.add_members([(other, addrs[other])], clock.seconds())
        services[name] = MembershipService(clock, machine, wire.fixed_keys(KEY), now=clock.seconds, join=False, **kw)
    for name, service in services.items():
        service.listen(wires.endpoint(addrs[name]))
        if start:
            service.startService()
    return services


def test_a_peer_that_leaves_is_reported_gone() -> None:
    """A clean leave (stopping the service) reaches the peer and is handed to ``on_gone`` with its
    incarnation (the registry drops it from nodes.json without waiting for a heartbeat) and to
    ``on_left`` (the jobs a drained node released are adopted at once)."""
    wires = Wires()
    left: list[str] = []
    services = _pair(wires, on_left=left.append)
    gone: list[tuple[str, int]] = []
    services["a"].on_gone.append(lambda member, incarnation: gone.append((member, incarnation)))
    try:
        wires.run_until(lambda: services["a"].machine.member("b").state == swim.ALIVE, 10)  # type: ignore[union-attr]
        stopped = services["b"].stopService()
        wires.run_until(lambda: stopped.called, 10)
        wires.run_until(lambda: gone == [("b", 7)], 10)
        assert services["a"].machine.member("b").state == swim.LEFT and left == ["b"]  # type: ignore[union-attr]
    finally:
        for service in services.values():
            service.halt()


def test_stopping_stops_every_timer_and_connection() -> None:
    """As children of the node's MultiService: started with it, the members talk; stopped with it,
    they leave no timer, connection or listening port behind."""
    wires = Wires()
    node = MultiService()
    services = _pair(wires, start=False)
    for service in services.values():
        service.setServiceParent(node)
    node.startService()
    wires.run_until(lambda: "b" in services["a"].last_heard and "a" in services["b"].last_heard, 30)
    stopped = node.stopService()
    wires.settle()
    assert stopped.called and not any(service.running for service in services.values())
    assert wires.reactor.getDelayedCalls() == []
    assert wires.pumps == [] and wires.listening == {}


def test_the_machine_ticks_after_what_queued_up_is_read() -> None:
    """A reactor runs due timers before it reads its sockets. After a stall, the service ticks the
    machine one reactor turn later, so an ack that arrived before its deadline is read first and
    the probed member is not accused. (The turns are driven by hand, in the order a real reactor
    runs them.)"""
    clock = MemoryReactorClock()
    clock.advance(1000)
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=clock.seconds())
    machine.add_members([("b", "127.0.0.1:2")], clock.seconds())
    service = MembershipService(clock, machine, wire.fixed_keys(KEY), now=clock.seconds, join=False)
    service._send = lambda msg: sent.append(msg) or Deferred()  # type: ignore[method-assign]
    sent: list[swim.Message] = []

    def turn() -> None:
        """One pass of the reactor's timers, as runUntilCurrent does: only calls already due."""
        due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        for call in sorted(due, key=lambda c: c.getTime()):
            if call.active():
                clock.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    service.startService()
    while not any(isinstance(m, swim.Ping) for m in sent):
        clock.rightNow = service.machine.next_deadline()  # type: ignore[assignment]
        turn()
        turn()
    ping = next(m for m in sent if isinstance(m, swim.Ping))
    ack = swim.Ack("a", "127.0.0.1:1", "b", "127.0.0.1:2", 0, ping.seq, [])
    # The ack arrives in time, but the reactor is blocked until just after the probe's period ends.
    clock.rightNow = ping_period_end = clock.seconds() + machine.config.probe_interval + 0.1
    turn()  # the timer fires: the machine is not ticked yet
    assert service._tick_next_turn and not any(isinstance(m, swim.PingReq) for m in sent)
    command, values = wire.seal(KEY, ack, clock.seconds())
    service.deliver(command.__name__, values)  # the reactor reads its sockets
    turn()  # next turn: the machine ticks, with the ack already read
    assert clock.seconds() == ping_period_end
    assert machine.member("b").state == swim.ALIVE  # type: ignore[union-attr]
    assert not any(isinstance(m, swim.PingReq) for m in sent)
    assert not service._tick_next_turn and service._timer is not None and service._timer.active()


def test_registry_records_are_needed_only_for_nodes_not_held_alive() -> None:
    """The registry GETs a changed record only when the membership can learn from it."""
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    machine.add_members([("b", "127.0.0.1:2")], 0.0)
    service = MembershipService(MemoryReactorClock(), machine, wire.fixed_keys(KEY))
    assert not service.needs_record("b") and not service.needs_record("a")
    assert service.needs_record("stranger")
    machine.receive(swim.Gossip("a", "127.0.0.1:1", "b", "127.0.0.1:2", 0,
                                [swim.Update("b", "127.0.0.1:2", 0, swim.LEFT, "b")]), 1.0)
    assert service.needs_record("b")


def test_unsettled_counts_suspect_dead_and_left_members() -> None:
    """What the store's EVENT lane shares the pool's budget by: every member not held alive (a
    suspicion counts, so a mass failure counts before its deaths are confirmed)."""
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    machine.add_members([(m, f"127.0.0.1:{i + 2}") for i, m in enumerate("bcde")], 0.0)
    service = MembershipService(MemoryReactorClock(), machine, wire.fixed_keys(KEY))
    assert service.unsettled() == 0
    for member, state in (("b", swim.SUSPECT), ("c", swim.DEAD), ("d", swim.LEFT)):
        machine.receive(swim.Gossip("e", "127.0.0.1:5", "a", "127.0.0.1:1", 0,
                                    [swim.Update(member, "127.0.0.1:9", 0, state, "e")]), 1.0)
    assert {v.member: v.state for v in machine.members()}["b"] == swim.SUSPECT
    assert service.unsettled() == 3 and len(service.live_members()) == 3  # a, b (suspect), e


def test_a_member_known_only_from_its_record_is_deleted_at_its_death() -> None:
    """A node that dies before we ever hear from it: we hold it at its record's incarnation (the
    registry bootstrap once said 0), so its confirmed death, reported with that incarnation,
    deletes that record."""
    clock = MemoryReactorClock()
    store = ObjectStore.synchronous(MemoryBackend())
    record = NodeRecord("b", "http://127.0.0.1:2", "127.0.0.1:2", started=1.0, incarnation=1_795_000_000_123,
                        heartbeat=1.0)
    key = keys.node_record("dev", "p", "b")
    store.backend.put_bytes(key, record.dumps())
    registry = Registry(clock, store, env="dev", pool="p", node_id="a", http_url="http://127.0.0.1:1",
                        peer_addr="127.0.0.1:1", now=clock.seconds)
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    service = MembershipService(clock, machine, wire.fixed_keys(KEY), on_confirmed_dead=registry.delete_dead)
    service.registry_read([record])
    view = machine.member("b")
    assert view is not None and view.incarnation == record.incarnation
    done = service._confirmed_dead(swim.ConfirmedDead("b", "127.0.0.1:2", view.incarnation))
    assert done.called
    assert store.backend.list("registry/").items == []


def test_a_confirmed_death_is_reported_through_callbacks_only() -> None:
    """The membership tells the rest of the node of a confirmed death, first ``on_gone`` (the
    registry republishes at once), then ``on_confirmed_dead`` with the dead incarnation (its
    record, then its jobs), and waits for it; a failing callback is logged, not raised."""
    calls: list[tuple[str, str, int]] = []
    answer: Deferred[None] = Deferred()

    def dead(member: str, incarnation: int) -> Deferred[None]:
        calls.append(("dead", member, incarnation))
        return answer

    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    service = MembershipService(MemoryReactorClock(), machine, wire.fixed_keys(KEY), on_confirmed_dead=dead)
    service.on_gone.append(lambda member, incarnation: calls.append(("gone", member, incarnation)))
    done = service._confirmed_dead(swim.ConfirmedDead("b", "127.0.0.1:2", 5))
    assert calls == [("gone", "b", 5), ("dead", "b", 5)] and not done.called
    answer.errback(RuntimeError("adoption failed"))
    assert done.called


def test_a_death_a_peer_declared_is_offered_ours_alone_is_not() -> None:
    """A death that reaches us from a peer (a death spreads only with two suspectors) goes to
    ``on_declared_dead`` with its incarnation, its record left to the registry's own rules; a dead
    entry of a sync (a suspicion here) and a suspicion are not deaths."""
    declared: list[tuple[str, int]] = []
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    machine.add_members([(m, f"127.0.0.1:{i + 2}") for i, m in enumerate("bcde")], 0.0)
    service = MembershipService(MemoryReactorClock(), machine, wire.fixed_keys(KEY))
    service.on_declared_dead = lambda member, incarnation: declared.append((member, incarnation))
    service.act(machine.receive(swim.Gossip("a", "127.0.0.1:1", "e", "127.0.0.1:5", 0,
                                            [swim.Update("b", "127.0.0.1:2", 0, swim.DEAD, "e"),
                                             swim.Update("c", "127.0.0.1:3", 0, swim.SUSPECT, "e")]), 1.0))
    service.act(machine.receive(swim.SyncState("a", "127.0.0.1:1", "e", "127.0.0.1:5", 0,
                                               [swim.Update("d", "127.0.0.1:4", 0, swim.DEAD, "e")], False), 2.0))
    assert declared == [("b", 0)]


def test_a_starting_node_joins_through_its_seeds_at_once() -> None:
    """The registry's few records of a large pool (a node starting): admitted, and a sync opened
    with one of them at once (its answer brings every member); a seed without an address (listed
    only) admits no one."""
    sent: list[swim.Message] = []
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=0.0)
    service = MembershipService(MemoryReactorClock(), machine, wire.fixed_keys(KEY))
    service._send = lambda msg: (sent.append(msg), succeed(None))[1]  # type: ignore[method-assign]
    service.startService()
    assert sent == []  # knowing no one, its join opened no sync
    service.registry_seeds([NodeRecord("b", "http://127.0.0.1:2", "127.0.0.1:2", 1.0, 7, 1.0),
                            NodeRecord("c", "", "", 0.0, 0, 1.0)])
    assert [v.member for v in machine.members()] == ["a", "b"]
    assert any(isinstance(m, swim.SyncDigest) and m.dest == "b" for m in sent)


def _huge_state(to: str, addr: str, size: int) -> swim.SyncState:
    """A SyncState from a to ``to`` whose payload is about ``size`` bytes (one member's long address)."""
    big = swim.Update("x", "h" * size + ":1", 0, swim.ALIVE, "x")
    return swim.SyncState(to, addr, "a", "127.0.0.1:7001", 7, [big], False, 1, [])


def test_a_message_over_the_limit_is_counted_logged_and_not_sent() -> None:
    """A payload over the wire's limit would be dropped by the receiver (or refused by AMP): the
    sender counts it (``send_oversized``, in /peers ``dropped``), logs it, and opens no connection."""
    from twisted.logger import capturedLogs

    wires = Wires()
    services = _pair(wires, start=False)
    a = services["a"]
    with capturedLogs() as logs:
        a.act([_huge_state("b", "127.0.0.1:7002", wire.MAX_PAYLOAD)])
    assert a.dropped == {"send_oversized": 1}
    assert wires.reactor.tcpClients == []
    assert any("over the limit" in str(e.get("log_format")) for e in logs)
    a.halt()


def test_a_send_that_fails_is_counted_and_logged(monkeypatch: Any) -> None:
    """The path that used to swallow errors: a message AMP refuses to frame (a value over 65,535
    bytes, here with the size check lifted) fails after the connection is made, and is counted
    (``send_failed``) and logged; the peer still gets the messages after it."""
    from twisted.logger import capturedLogs

    wires = Wires()
    services = _pair(wires)
    a, b = services["a"], services["b"]
    try:
        wires.run_until(lambda: "a" in b.last_heard, 10)
        monkeypatch.setattr(wire, "MAX_PAYLOAD", 10**6)
        with capturedLogs() as logs:
            a.act([_huge_state("b", "127.0.0.1:7002", 70_000)])
            wires.settle()
        assert a.dropped == {"send_failed": 1}
        assert any(e.get("log_failure") is not None and "not sent" in str(e.get("log_format")) for e in logs)
        heard = b.last_heard["a"]
        wires.run_until(lambda: b.last_heard["a"] > heard, 10)
    finally:
        for service in services.values():
            service.halt()


def test_a_refused_send_is_counted() -> None:
    """A connection refused is counted with the failed sends (and told to the machine, as before)."""
    wires = Wires()
    clock = wires.reactor
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=clock.seconds())
    machine.add_members([("b", "127.0.0.1:2")], clock.seconds())
    service = MembershipService(clock, machine, wire.fixed_keys(KEY), now=clock.seconds, join=False)
    service.startService()
    try:
        wires.run_until(lambda: service.dropped.get("send_failed", 0) >= 1, 10)
        assert machine.member("b").state == swim.SUSPECT  # type: ignore[union-attr]
    finally:
        service.halt()
