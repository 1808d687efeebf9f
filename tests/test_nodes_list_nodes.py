"""
nodes.json follows the membership (real twistd nodes, the file: store, the default 30 s
heartbeat): a started node is listed within 5 s, a killed last peer is gone from it within 10 s;
and Twisted's per-connection log lines show only at --log-level debug.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers import free_port, wait_for
from tests.nodes import NodeProcess

pytestmark = pytest.mark.integration


#: far longer than any wait here: a change of the list seen within it came from the membership
#: (a join, a death), not from a heartbeat's read of the records (the first comes after 3/4 of it)
HEARTBEAT = 300


def make(tmp_path: Path, store: Path, name: str, *extra: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"file:{store}", "--node-id", name, "--min-free", "0", "--heartbeat", str(HEARTBEAT),
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        *extra])


def listed(store: Path) -> list[str]:
    path = store / "registry" / "dev" / "default" / "nodes.json"
    try:
        return [n["id"] for n in json.loads(path.read_text())["nodes"]]
    except (FileNotFoundError, ValueError):
        return []


class NodesListTests:
    @pytest_twisted.inlineCallbacks
    def test_listed_within_seconds_and_gone_within_seconds(self, tmp_path: Path) -> None:
        """a runs; b starts: listed once it serves, by its join (not a heartbeat later). b is killed
        (kill -9, its record left behind): out of the list once its death is confirmed, a being its
        last peer.
        a logs no "Starting factory" lines (info, the default); b, at debug, does."""
        store = tmp_path / "store"
        a, b = make(tmp_path, store, "a1"), make(tmp_path, store, "b2", "--log-level", "debug")
        a.start()
        try:
            yield a.wait_ready()
            yield wait_for(lambda: listed(store) == ["a1"], timeout=60)
            b.start()
            yield b.wait_ready()
            yield wait_for(lambda: listed(store) == ["a1", "b2"], timeout=60)
            b.signal(signal.SIGKILL)
            assert b.process is not None
            b.process.wait()
            yield wait_for(lambda: listed(store) == ["a1"], timeout=60)
            assert "Starting factory" not in a.text() and "OneShotFactory" not in a.text()
            assert "Starting factory" in b.text()
        finally:
            a.stop()
            b.stop()
