"""Peer liveness on real nodes over real TCP: SWIM over AMP, bootstrapped from the registry."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from gridnode.membership import swim, wire
from tests.helpers import free_port, sleep, wait_for
from tests.nodes import NodeProcess, get_json

pytestmark = pytest.mark.integration


def states(node: NodeProcess) -> dict[str, str]:
    status, view = get_json(node.url + "/peers", timeout=5)
    assert status == 200
    return {p["id"]: p["state"] for p in view["peers"]}


def make(tmp_path: Path, store: Path, name: str, peer_port: int, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"file:{store}", "--node-id", name, "--heartbeat", "1", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{peer_port}:interface=127.0.0.1",
        *extra])


def records(store: Path) -> set[str]:
    folder = store / "registry" / "dev" / "default" / "nodes"
    return {p.stem for p in folder.glob("*.json")} if folder.is_dir() else set()


class MembershipTests:
    @pytest_twisted.inlineCallbacks
    def test_five_nodes_kill_and_return(self, tmp_path: Path) -> None:
        """5 nodes know each other from the registry alone; kill -9 one: every survivor shows it
        dead and its record is gone; restarted, it is alive everywhere again. (How fast is the
        simulator's figure, bench/membership_sim.py: a loaded test machine's timers say nothing.)"""
        store = tmp_path / "store"
        names = [f"s{i}" for i in range(5)]
        ports = {n: free_port() for n in names}
        nodes = {n: make(tmp_path, store, n, ports[n]) for n in names}
        for node in nodes.values():
            node.start()
        try:
            for node in nodes.values():
                yield node.wait_ready()
            everyone = dict.fromkeys(names, "alive")
            yield wait_for(lambda: all(states(n) == everyone for n in nodes.values()), 60)
            victim = nodes["s3"]
            victim.signal(signal.SIGKILL)
            assert victim.process is not None
            victim.process.wait()
            survivors = [nodes[n] for n in names if n != "s3"]
            yield wait_for(lambda: all(states(n)["s3"] == "dead" for n in survivors) and "s3" not in records(store),
                           60)
            victim.start()
            yield victim.wait_ready()
            yield wait_for(lambda: all(states(n).get("s3") == "alive" for n in survivors) and "s3" in records(store),
                           60)
        finally:
            for node in nodes.values():
                node.stop()

    @pytest_twisted.inlineCallbacks
    def test_partitioned_node_deletes_nothing(self, tmp_path: Path) -> None:
        """A node cut off from all its peers (they are frozen, their records still fresh in the bucket)
        may suspect them, but deletes no record."""
        store = tmp_path / "store"
        names = ["p0", "p1", "p2"]
        nodes = {n: make(tmp_path, store, n, free_port(), "--stale", "600") for n in names}
        for node in nodes.values():
            node.start()
        try:
            for node in nodes.values():
                yield node.wait_ready()
            yield wait_for(lambda: all(len(states(n)) == 3 for n in nodes.values()), 60)
            for n in ("p1", "p2"):
                nodes[n].signal(signal.SIGSTOP)
            yield sleep(15)  # past its suspicions' timeouts (4.5 to 13.5 probe periods of 1 s)

            def noticed() -> bool:
                view = states(nodes["p0"])
                return view["p1"] != "alive" or view["p2"] != "alive"

            yield wait_for(noticed, 45)  # it noticed (its first probes' timeouts: seconds, more when loaded)
            assert records(store) == {"p0", "p1", "p2"}  # and deleted nothing
        finally:
            for n in ("p1", "p2"):
                nodes[n].signal(signal.SIGCONT)
            for node in nodes.values():
                node.stop()

    @pytest_twisted.inlineCallbacks
    def test_peer_port_abuse(self, tmp_path: Path) -> None:
        """Garbage bytes, a wrong HMAC, a replayed message and a 10 MB frame sent to the peer port are
        rejected and counted; the node stays healthy and keeps its peers."""
        store = tmp_path / "store"
        port = free_port()
        a = make(tmp_path, store, "a0", port)
        b = make(tmp_path, store, "a1", free_port())
        a.start()
        b.start()
        try:
            yield a.wait_ready()
            yield b.wait_ready()
            yield wait_for(lambda: states(a).get("a1") == "alive", 60)
            key = wire.peer_key(b"", "dev", "default")
            ping = swim.Ping("a0", f"127.0.0.1:{port}", "evil", "127.0.0.1:1", 1, 7, [])
            yield deferToThread(abuse, port, key, ping)

            def counted() -> bool:  # the node has read (and dropped) all four
                dropped = get_json(a.url + "/peers")[1]["dropped"]
                return (dropped.get("bad_mac", 0) >= 1 and dropped.get("replay", 0) >= 1
                        and (dropped.get("oversized", 0) >= 1 or dropped.get("protocol_error", 0) >= 1))

            try:
                yield wait_for(counted, 30)
            except AssertionError:
                raise AssertionError(get_json(a.url + "/peers")[1]["dropped"]) from None
            status, health = get_json(a.url + "/health")
            assert status == 200 and health["state"] == "ok"
            status, metrics = get_json_text(a.url + "/metrics")
            assert 'gridnode_peer_messages_dropped_total{reason="bad_mac"}' in metrics
            yield deferToThread(flood, port, 300)
            try:  # the node accepts (and refuses) the flood's connections on its own time
                yield wait_for(lambda: get_json(a.url + "/peers")[1]["dropped"].get("too_many_connections", 0) >= 1,
                               30)
            except AssertionError:
                raise AssertionError(get_json(a.url + "/peers")[1]["dropped"]) from None
            assert get_json(a.url + "/health")[0] == 200
            yield wait_for(lambda: states(a).get("a1") == "alive", 30)
        finally:
            a.stop()
            b.stop()


def get_json_text(url: str) -> tuple[int, str]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def flood(port: int, count: int) -> None:
    """Blocking: hold ``count`` idle connections to the peer port at once, then let them go."""
    held = []
    try:
        for _ in range(count):
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
    finally:
        for s in held:
            s.close()


def abuse(port: int, key: bytes, ping: swim.Ping) -> None:
    """Blocking: four kinds of abuse, each on its own connection."""
    from twisted.protocols.amp import AmpBox

    def box(command: str, args: dict[str, Any]) -> bytes:
        b = AmpBox(_command=command.encode(), _ask=b"1")
        for k, v in args.items():
            b[k.encode()] = v if isinstance(v, bytes) else str(v).encode() if not isinstance(v, float) else repr(
                v).encode()
        return b.serialize()

    def send(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.recv(100)
            except OSError:
                pass

    send(b"\x00\x05hello\xff\xff" + bytes(range(256)) * 10)  # garbage
    command, args = wire.seal(b"wrong key" * 4, ping)
    send(box(command.__name__, args))  # wrong HMAC
    command, args = wire.seal(key, ping)
    sealed = box(command.__name__, args)
    send(sealed)
    send(sealed)  # the same nonce again: a replay
    send(b"\x00\x01x" + b"\xff" * (10 * 1024 * 1024))  # a 10 MB frame
