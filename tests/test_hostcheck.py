"""Watching members: the standing connection and asking a peer's kernel. The kernel's own part
(TCP_INFO, namespaces) is integration; the service's part runs on a MemoryReactorClock."""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from gridnode.membership import swim, wire
from gridnode.membership.hostcheck import HostCheck, tcp_acks
from gridnode.membership.service import MembershipService

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")


@functools.cache
def _namespaces() -> bool:
    """Whether we may make a network namespace with a veth link in it (root, iproute2, nsenter)."""
    probe = "ip link set lo up && ip link add gv0 type veth peer name gv1 && command -v nsenter"
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", probe], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _needs_namespaces() -> None:
    # asked when such a test runs, not when the module is collected (the unit run starts no process)
    if not _namespaces():
        pytest.skip("needs network namespaces with veth links (root, unshare -n, iproute2)")


@linux_only
@pytest.mark.integration  # the kernel's TCP_INFO on a real loopback connection
def test_tcp_info_reads_acknowledgements() -> None:
    """On a live loopback connection our bytes are acknowledged at once."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"x" * 100)
                time.sleep(0.2)
                acks = tcp_acks(client)
                assert acks is not None
                unacked, since_ack = acks
                assert unacked == 0 and 0.1 <= since_ack < 5


@linux_only
@pytest.mark.integration
def test_a_stalled_host_answers_and_a_vanished_one_does_not() -> None:
    """In a network namespace: a peer process stopped with SIGSTOP (a stalled reactor) still has its
    kernel acknowledge our frames; once the namespace's loopback goes down (the host vanished)
    nothing does, and the check says silent."""
    _needs_namespaces()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-n", sys.executable, str(ROOT / "tests" / "netns_hostcheck.py")],
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"running": False, "stalled": False, "vanished": True}


class _FakeSocket:
    """getsockopt(TCP_INFO) as Linux lays it out: unacked at byte 24, last_ack_recv (ms) at 56."""

    def __init__(self, unacked: int, last_ack_ms: int) -> None:
        self.unacked, self.last_ack_ms = unacked, last_ack_ms

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        raw = bytearray(104)
        struct.pack_into("=I", raw, 24, self.unacked)
        struct.pack_into("=I", raw, 56, self.last_ack_ms)
        return bytes(raw)


class _FakeTransport:
    connected = True

    def __init__(self, sock: _FakeSocket) -> None:
        self.sock = sock

    def getHandle(self) -> _FakeSocket:  # noqa: N802 - Twisted's name
        return self.sock


class _FakeProto:
    def __init__(self, sock: _FakeSocket) -> None:
        self.transport = _FakeTransport(sock)
        self.calls = 0

    def callRemote(self, command: Any) -> Any:  # noqa: N802 - AMP's name
        self.calls += 1
        return Deferred()


@linux_only
@pytest.mark.parametrize(("unacked", "last_ack_ms", "verdict"), [
    (3, 600, True),    # frames outstanding, nothing acknowledged since the first went out
    (0, 600, False),   # all acknowledged (the last ACK is old only because nothing was sent since)
    (3, 100, False),   # something was acknowledged during the check
])
def test_the_verdict_reads_tcp_info(unacked: int, last_ack_ms: int, verdict: bool) -> None:
    """Ten frames 50 ms apart, then TCP_INFO decides."""
    clock = Clock()
    proto = _FakeProto(_FakeSocket(unacked, last_ack_ms))
    results: list[Any] = []
    HostCheck(clock, proto).run().addCallback(results.append)
    clock.pump([0.05] * 11)
    assert proto.calls == 10 and results == [verdict]


@linux_only
def test_a_check_whose_frames_went_out_late_proves_nothing() -> None:
    """Our own reactor stalled between two frames: no verdict (void), however silent the peer looks."""
    clock = Clock()
    proto = _FakeProto(_FakeSocket(3, 5000))
    results: list[Any] = []
    HostCheck(clock, proto).run().addCallback(results.append)
    clock.pump([0.05] * 4 + [1.0] + [0.05] * 6)
    assert results == [None]
    lost = _FakeProto(_FakeSocket(3, 5000))
    HostCheck(clock, lost).run().addCallback(results.append)
    clock.advance(0.1)
    lost.transport.connected = False  # type: ignore[misc]
    clock.pump([0.05] * 10)
    assert results == [None, None]


class _Quiet(Protocol):
    pass


class _Socket:
    """The options set on a connection's socket, read back as the kernel would give them."""

    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[(level, option)] = value

    def getsockopt(self, level: int, option: int) -> int:
        return self.options.get((level, option), 0)


class _Transport(iosim.FakeTransport):
    """iosim's transport with a socket handle under it, for what the service sets on the socket."""

    def __init__(self, protocol: Any, isServer: bool, hostAddress: Any = None,  # noqa: N803 - iosim's names
                 peerAddress: Any = None) -> None:
        super().__init__(protocol, isServer, hostAddress, peerAddress)
        self.sock = _Socket()

    def getHandle(self) -> _Socket:  # noqa: N802 - Twisted's name
        return self.sock

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802 - Twisted's name
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))


def _accept(reactor: MemoryReactorClock, port: int, server: Protocol) -> tuple[_Transport, _Transport, iosim.IOPump]:
    """Complete the first connection being made on ``reactor`` to ``port``, with ``server`` on the
    other end: (client transport, server transport, the pump between them)."""
    i = next(i for i, c in enumerate(reactor.tcpClients) if c[1] == port)
    host, _, factory, _, _ = reactor.tcpClients.pop(i)
    reactor.connectors.pop(i)
    peer, me = IPv4Address("TCP", host, port), IPv4Address("TCP", "127.0.0.1", 40000)
    client = factory.buildProtocol(peer)
    client_io, server_io = _Transport(client, False, me, peer), _Transport(server, True, peer, me)
    return client_io, server_io, iosim.connect(server, server_io, client, client_io, clock=reactor)


def _watcher(reactor: MemoryReactorClock, **service: Any) -> tuple[swim.SwimMachine, MembershipService]:
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=reactor.seconds(),
                               config=swim.SwimConfig(probe_interval=30.0, probe_timeout=10.0))
    return machine, MembershipService(reactor, machine, wire.fixed_keys(b"k" * 32), now=reactor.seconds, join=False,
                                      **service)


def test_a_watched_member_gets_a_standing_connection_and_its_crash_is_a_refusal() -> None:
    """The watcher keeps one connection to the member it watches. When the member's process goes
    away the connection closes and every new one is refused: the member is suspect with the short
    timeout of a refusal, not the long one of a silent member."""
    reactor = MemoryReactorClock()
    machine, service = _watcher(reactor)
    service.act(machine.add_members([("b", "127.0.0.1:9002")], reactor.seconds()))
    assert machine.watching() == {"b": "127.0.0.1:9002"}
    service.startService()
    try:
        client_io, server_io, pump = _accept(reactor, 9002, _Quiet())
        assert (client_io.getPeer().host, client_io.getPeer().port) == ("127.0.0.1", 9002)
        assert service._standing["b"].proto is not None
        assert machine.suspicion_deadline("b") is None
        sock = service._standing["b"].proto.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        server_io.loseConnection()  # the process is gone: its kernel closes its connections
        pump.flush()
        assert service._standing["b"].proto is None
        refuse = iosim.ConnectionCompleter(reactor)
        for _ in range(60):  # nothing listens any more: whatever connects to b is refused
            while reactor.tcpClients:
                refuse.failOnce()
            if machine.suspicion_deadline("b") is not None:
                break
            reactor.advance(1.0)
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None and deadline - reactor.seconds() <= machine.config.gone_suspicion_mult * 30.0
    finally:
        service.halt()


def test_a_silent_host_check_reaches_the_machine() -> None:
    """A watcher that learns its member is suspect asks the member's kernel; a silent verdict
    (here forced) gives the member the short timeout."""
    reactor = MemoryReactorClock()
    asked: list[Any] = []

    class Silent:
        def __init__(self, reactor: Any, proto: Any) -> None:
            assert proto.transport.getPeer().port == 9002
            asked.append(proto)

        def run(self) -> Any:
            return succeed(True)

    machine, service = _watcher(reactor, host_check=Silent)
    addr = "127.0.0.1:9002"
    service.act(machine.add_members([("b", addr), ("c", "127.0.0.1:3")], reactor.seconds()))
    assert "b" in machine.watching()
    service.startService()
    try:
        _accept(reactor, 9002, _Quiet())
        assert service._standing["b"].proto is not None
        # c suspects b and tells b's watchers (us) directly
        service.act(machine.receive(swim.Gossip("a", "127.0.0.1:1", "c", "127.0.0.1:3", 0, [
            swim.Update("b", addr, 0, swim.SUSPECT, "c")]), reactor.seconds()))
        assert asked == [service._standing["b"].proto]
        assert service.checks == {"silent": 1}
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None and deadline - reactor.seconds() < 5
        lo, _ = machine.config.suspicion_bounds(3)
        assert lo >= 100
    finally:
        service.halt()


@linux_only
@pytest.mark.integration
def test_real_nodes_tell_a_stalled_host_from_a_vanished_one(tmp_path: Path) -> None:
    """Four real nodes, the fourth on a host of its own behind a veth link (network namespaces):
    stopped for 3 s it is suspected but not declared dead (its kernel still answers the host
    checks); when its link goes down, every other node holds it dead through the host checks'
    silence, and its record is deleted."""
    _needs_namespaces()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-n", sys.executable, str(ROOT / "tests" / "netns_vanish.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["stall_survived"] and result["record_deleted"]
    # the stalled host's kernel answered every check; the vanished one's did not (each of the
    # others watches it, N=4; a watcher that stalls itself during a check gets no verdict)
    assert not any(checks.get("silent") for checks in result["checks_after_stall"].values()), result
    assert sum(checks.get("silent", 0) for checks in result["host_checks"].values()) >= 1, result
    assert result["dead_everywhere_s"] < 15
