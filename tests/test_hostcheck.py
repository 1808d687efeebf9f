"""Watching members: the standing connection and asking a peer's kernel (real sockets)."""

from __future__ import annotations

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
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from gridnode.membership import swim
from gridnode.membership.hostcheck import HostCheck, tcp_acks
from gridnode.membership.service import MembershipService
from tests.nodes import free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")


def _namespaces() -> bool:
    """Whether we may make a network namespace with a veth link in it (root, iproute2, nsenter)."""
    probe = "ip link set lo up && ip link add gv0 type veth peer name gv1 && command -v nsenter"
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", probe], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@linux_only
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
@pytest.mark.skipif(not _namespaces(), reason="needs network namespaces with veth links (root, unshare -n, iproute2)")
def test_a_stalled_host_answers_and_a_vanished_one_does_not() -> None:
    """In a network namespace: a peer process stopped with SIGSTOP (a stalled reactor) still has its
    kernel acknowledge our frames; once the namespace's loopback goes down (the host vanished)
    nothing does, and the check says silent."""
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


@pytest_twisted.inlineCallbacks
def test_a_watched_member_gets_a_standing_connection_and_its_crash_is_a_refusal() -> None:
    """The watcher keeps one connection to the member it watches. When the member's process goes
    away the connection closes, the watcher connects again at once and is refused: the member is
    suspect with the short timeout before any probe of it has failed."""
    port = free_port()
    accepted: list[Any] = []

    class Recording(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:  # noqa: N802 - Twisted's name
            p = _Quiet()
            accepted.append(p)
            return p

    listening = yield TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(Recording())
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=time.time(),
                               config=swim.SwimConfig(probe_interval=30.0, probe_timeout=10.0))
    service = MembershipService(reactor, machine, b"k" * 32)
    service.act(machine.add_members([("b", f"127.0.0.1:{port}")], time.time()))
    assert machine.watching() == {"b": f"127.0.0.1:{port}"}
    service.start(join=False)
    try:
        yield wait_for(lambda: service._standing["b"].proto is not None and accepted, 10)
        assert machine.suspicion_deadline("b") is None
        sock = service._standing["b"].proto.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        yield listening.stopListening()
        for p in accepted:
            p.transport.loseConnection()  # the process is gone: its kernel closes its connections
        yield wait_for(lambda: machine.suspicion_deadline("b") is not None, 10)
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None and deadline - time.time() <= machine.config.gone_suspicion_mult * 30.0
    finally:
        yield service.stop()


@pytest_twisted.inlineCallbacks
def test_a_silent_host_check_reaches_the_machine() -> None:
    """A watcher that learns its member is suspect asks the member's kernel; a silent verdict
    (here forced: loopback always answers) gives the member the short timeout."""
    server = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_Quiet))
    addr = f"127.0.0.1:{server.getHost().port}"
    machine = swim.SwimMachine("a", "127.0.0.1:1", rng=random.Random(1), now=time.time(),
                               config=swim.SwimConfig(probe_interval=30.0, probe_timeout=10.0))

    class Silent:
        def __init__(self, reactor: Any, proto: Any) -> None:
            assert proto.transport.getPeer().port == server.getHost().port

        def run(self) -> Any:
            return succeed(True)

    service = MembershipService(reactor, machine, b"k" * 32, host_check=Silent)
    service.act(machine.add_members([("b", addr), ("c", "127.0.0.1:3")], time.time()))
    assert "b" in machine.watching()
    service.start(join=False)
    try:
        yield wait_for(lambda: service._standing["b"].proto is not None, 10)
        # c suspects b and tells b's watchers (us) directly
        service.act(machine.receive(swim.Gossip("a", "127.0.0.1:1", "c", "127.0.0.1:3", 0, [
            swim.Update("b", addr, 0, swim.SUSPECT, "c")]), time.time()))
        assert service.checks == {"silent": 1}
        deadline = machine.suspicion_deadline("b")
        assert deadline is not None and deadline - time.time() < 5
        lo, _ = machine.config.suspicion_bounds(3)
        assert lo >= 100
    finally:
        yield service.stop()
        yield server.stopListening()


@linux_only
@pytest.mark.integration
@pytest.mark.skipif(not _namespaces(), reason="needs network namespaces with veth links (root, unshare -n, iproute2)")
def test_real_nodes_tell_a_stalled_host_from_a_vanished_one(tmp_path: Path) -> None:
    """Four real nodes, the fourth on a host of its own behind a veth link (network namespaces):
    stopped for 3 s it is suspected but not declared dead (its kernel still answers the host
    checks); when its link goes down, every other node holds it dead through the host checks'
    silence, and its record is deleted."""
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
