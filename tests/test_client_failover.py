"""The command line client against real nodes: failover past a frozen node, coded failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import free_port, wait_for
from tests.media_samples import Clips
from tests.nodes import BIN, NodeProcess, get_json

pytestmark = pytest.mark.integration


def gridnode(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "gridnode"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class FailoverTests:
    @pytest_twisted.inlineCallbacks
    def test_frozen_node_is_passed_by(self, tmp_path: Path, media_clips: Clips) -> None:
        """3 nodes, one frozen with SIGSTOP (its connections hang): `gridnode upload --wait --output`
        succeeds through another node, 10 times out of 10; a non-video fails with the node's code."""
        store = tmp_path / "store"
        nodes = [NodeProcess(tmp_path / f"f{i}", [
            "--store", f"file:{store}", "--node-id", f"f{i}", "--heartbeat", "1", "--min-free", "0",
            "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
            for i in range(3)]
        for n in nodes:
            n.start()
        try:
            for n in nodes:
                yield n.wait_ready()
            yield wait_for(lambda: len(get_json(nodes[0].url + "/registry/nodes.json")[1].get("nodes", [])) == 3, 60)
            nodes[1].signal(signal.SIGSTOP)
            # the frozen node fails the client's 2-s health check and is tried last, if at all: a
            # live node's silence (--timeout) may last seconds on a loaded machine, as it probes
            # and stores the upload before its answer
            common = ["--store", f"file:{store}", "--timeout", "15"]
            for run in range(10):
                out = yield deferToThread(gridnode, "upload", str(media_clips.portrait), "--preset", "poster",
                                          "--wait", "--output", str(tmp_path / "out"), "--json", *common,
                                          cwd=tmp_path)
                assert out.returncode == 0, (run, out.stdout, out.stderr)
                events = [json.loads(line) for line in out.stdout.splitlines()]
                assert events[0]["node"] != "f1"
                finished = [e for e in events if e["event"] == "finished"]
                assert finished and finished[0]["job"]["state"] == "done"
                fetched = [e["path"] for e in events if e["event"] == "fetched"]
                assert fetched and all(Path(p).stat().st_size > 0 for p in fetched)
            out = yield deferToThread(gridnode, "upload", str(media_clips.random), *common, cwd=tmp_path)
            assert out.returncode != 0
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "not_a_video" in lines[0], out.stderr
        finally:
            nodes[1].signal(signal.SIGCONT)
            for n in nodes:
                n.stop()

    def test_no_nodes(self, tmp_path: Path) -> None:
        """An empty registry: one line saying there is no node and what to check."""
        out = gridnode("upload", "/etc/hostname", "--store", f"file:{tmp_path}/empty", cwd=tmp_path)
        assert out.returncode != 0
        assert out.stderr.startswith("gridnode: no_nodes:") and len(out.stderr.strip().splitlines()) == 1
