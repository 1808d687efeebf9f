"""The membership's TCP glue on a real reactor and loopback sockets (no node process)."""

from __future__ import annotations

import random
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from gridnode import keys
from gridnode.membership import swim
from gridnode.membership.service import MembershipService
from gridnode.registry.records import NodeRecord
from gridnode.registry.service import Registry
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.nodes import free_port, wait_for


@pytest_twisted.inlineCallbacks
def test_a_refused_connection_is_reported_to_the_machine() -> None:
    """Nothing listens at a member's address: the refusal makes it suspect with the short timeout."""
    gone = f"127.0.0.1:{free_port()}"
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=time.time())
    machine.add_members([("b", gone)], time.time())
    service = MembershipService(reactor, machine, b"k" * 32, connect_timeout=5, join=False)
    service.startService()
    try:
        yield wait_for(lambda: machine.suspicion_deadline("b") is not None, 10)
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None
        lo, _ = machine.config.suspicion_bounds(2)
        # the silent-member timeout here would be ``lo`` (4 periods): a refusal cuts it to one
        assert deadline - time.time() <= machine.config.gone_suspicion_mult * machine.config.probe_interval
        assert machine.config.gone_suspicion_mult * machine.config.probe_interval < lo
    finally:
        yield service.halt()


@pytest_twisted.inlineCallbacks
def test_a_peer_that_leaves_is_reported_gone() -> None:
    """A clean leave reaches the peer over loopback and is handed to ``on_gone`` with its
    incarnation (the registry drops it from nodes.json without waiting for a heartbeat) and to
    ``on_left`` (the jobs a drained node released are adopted at once)."""
    addrs = {name: f"127.0.0.1:{free_port()}" for name in "ab"}
    services = {}
    left: list[str] = []
    for name, addr in addrs.items():
        machine = swim.SwimMachine(name, addr, incarnation=7, rng=random.Random(2), now=time.time())
        other = "b" if name == "a" else "a"
        machine.add_members([(other, addrs[other])], time.time())
        services[name] = MembershipService(reactor, machine, b"k" * 32, on_left=left.append, join=False)
    from twisted.internet.endpoints import TCP4ServerEndpoint

    for name, service in services.items():
        yield service.listen(TCP4ServerEndpoint(reactor, int(addrs[name].rpartition(":")[2]), interface="127.0.0.1"))
        service.startService()
    gone: list[tuple[str, int]] = []
    services["a"].on_gone.append(lambda member, incarnation: gone.append((member, incarnation)))
    try:
        yield wait_for(lambda: services["a"].machine.member("b").state == swim.ALIVE, 10)
        yield services["b"].stopService()
        yield wait_for(lambda: gone == [("b", 7)], 10)
        assert services["a"].machine.member("b").state == swim.LEFT and left == ["b"]
    finally:
        for service in services.values():
            yield service.halt()


def test_the_machine_ticks_after_what_queued_up_is_read() -> None:
    """A reactor runs due timers before it reads its sockets. After a stall, the service ticks the
    machine one reactor turn later, so an ack that arrived before its deadline is read first and
    the probed member is not accused. (Clock cannot interleave socket reads: the turns are driven
    by hand, in the order a real reactor runs them.)"""
    from twisted.internet.task import Clock

    from gridnode.membership import wire

    clock = Clock()
    clock.advance(1000)
    key = b"k" * 32
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=clock.seconds())
    machine.add_members([("b", "127.0.0.1:2")], clock.seconds())
    service = MembershipService(clock, machine, key, now=clock.seconds, join=False)
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
    command, values = wire.seal(key, ack, clock.seconds())
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
    service = MembershipService(reactor, machine, b"k" * 32)
    assert not service.needs_record("b") and not service.needs_record("a")
    assert service.needs_record("stranger")
    machine.receive(swim.Gossip("a", "127.0.0.1:1", "b", "127.0.0.1:2", 0,
                                [swim.Update("b", "127.0.0.1:2", 0, swim.LEFT, "b")]), 1.0)
    assert service.needs_record("b")


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
    service = MembershipService(clock, machine, b"k" * 32, on_confirmed_dead=registry.delete_dead)
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
    service = MembershipService(MemoryReactorClock(), machine, b"k" * 32, on_confirmed_dead=dead)
    service.on_gone.append(lambda member, incarnation: calls.append(("gone", member, incarnation)))
    done = service._confirmed_dead(swim.ConfirmedDead("b", "127.0.0.1:2", 5))
    assert calls == [("gone", "b", 5), ("dead", "b", 5)] and not done.called
    answer.errback(RuntimeError("adoption failed"))
    assert done.called
