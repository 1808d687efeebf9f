"""The membership's TCP glue on a real reactor and loopback sockets (no node process)."""

from __future__ import annotations

import random
import time

import pytest_twisted
from twisted.internet import reactor

from gridnode.membership import swim
from gridnode.membership.service import MembershipService
from tests.nodes import free_port, wait_for


@pytest_twisted.inlineCallbacks
def test_a_refused_connection_is_reported_to_the_machine() -> None:
    """Nothing listens at a member's address: the refusal makes it suspect with the short timeout."""
    gone = f"127.0.0.1:{free_port()}"
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=time.time())
    machine.add_members([("b", gone)], time.time())
    service = MembershipService(reactor, machine, b"k" * 32, connect_timeout=5)
    service.start(join=False)
    try:
        yield wait_for(lambda: machine.suspicion_deadline("b") is not None, 10)
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None
        lo, _ = machine.config.suspicion_bounds(2)
        # the silent-member timeout here would be ``lo`` (4 periods): a refusal cuts it to one
        assert deadline - time.time() <= machine.config.refused_suspicion_mult * machine.config.probe_interval
        assert machine.config.refused_suspicion_mult * machine.config.probe_interval < lo
    finally:
        yield service.stop()


@pytest_twisted.inlineCallbacks
def test_a_peer_that_leaves_is_reported_gone() -> None:
    """A clean leave reaches the peer over loopback and is handed to ``on_gone`` with its
    incarnation: the registry drops it from nodes.json without waiting for a heartbeat."""
    addrs = {name: f"127.0.0.1:{free_port()}" for name in "ab"}
    services = {}
    for name, addr in addrs.items():
        machine = swim.SwimMachine(name, addr, incarnation=7, rng=random.Random(2), now=time.time())
        other = "b" if name == "a" else "a"
        machine.add_members([(other, addrs[other])], time.time())
        services[name] = MembershipService(reactor, machine, b"k" * 32)
    from twisted.internet.endpoints import TCP4ServerEndpoint

    for name, service in services.items():
        yield service.listen(TCP4ServerEndpoint(reactor, int(addrs[name].rpartition(":")[2]), interface="127.0.0.1"))
        service.start(join=False)
    gone: list[tuple[str, int]] = []
    services["a"].on_gone.append(lambda member, incarnation: gone.append((member, incarnation)))
    try:
        yield wait_for(lambda: services["a"].machine.member("b").state == swim.ALIVE, 10)
        yield services["b"].leave()
        yield wait_for(lambda: gone == [("b", 7)], 10)
        assert services["a"].machine.member("b").state == swim.LEFT
    finally:
        for service in services.values():
            yield service.stop()
