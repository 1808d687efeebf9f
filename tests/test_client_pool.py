"""`gridnode pool`'s plan and its per-node lines (pure parts; the processes: test_client_cli_nodes)."""

from __future__ import annotations

import argparse
import fcntl
import io
import tomllib
from pathlib import Path

from gridnode.client.discovery import parse_config
from gridnode.client.pool import (
    Screen,
    client_config,
    describe_health,
    node_argv,
    plan,
    run_pool,
    store_url,
    write_config,
)


class PlanTests:
    def test_each_node_has_its_ports_folder_and_no_pidfile(self) -> None:
        """Two ports a node, a folder each, one store, loopback only, no twistd pidfile."""
        nodes = plan("/p", 3, [11, 12, 21, 22, 31, 32])
        assert [(n.id, n.folder, n.http_port, n.peer_port) for n in nodes] == [
            ("node1", "/p/node1", 11, 12), ("node2", "/p/node2", 21, 22), ("node3", "/p/node3", 31, 32)]
        argv = node_argv("/py", nodes[1], store_url("/p"), workers=2, drain_timeout=10, extra=["--sandbox", "weak"])
        assert argv[0] == "/py" and "--pidfile=" in argv and argv.index("--pidfile=") < argv.index("gridnode")
        assert argv[argv.index("--store") + 1] == "file:/p/store"
        assert argv[argv.index("--http") + 1] == "tcp:21:interface=127.0.0.1"
        assert argv[argv.index("--peer") + 1] == "tcp:22:interface=127.0.0.1"
        assert argv[argv.index("--work-dir") + 1] == "/p/node2/work"
        assert argv[-2:] == ["--sandbox", "weak"]

    def test_the_client_config_it_writes_is_read_back(self) -> None:
        """What `gridnode pool --write-config` writes is a client.toml the client accepts."""
        text = client_config('file:/odd "path"')
        assert tomllib.loads(text) == {"store": 'file:/odd "path"'}
        assert parse_config(text.encode(), "f") == {"store": 'file:/odd "path"'}


class LinesTests:
    def test_states(self) -> None:
        assert describe_health(None, None) == "starting"
        assert describe_health({}, None) == "not answering"
        assert describe_health(None, 1) == "exited 1"
        assert describe_health({"state": "ok", "running": 1, "queued": 0, "workers": 2}, None) == (
            "ok  running 1  queued 0  workers 2")
        assert "registry: no bucket" in describe_health({"state": "degraded", "registry": {"error": "no bucket"}}, None)
        assert describe_health({"state": "ok", "registry": {"registered": False}}, None) == "registering"

    def test_plain_lines_only_on_change_off_a_terminal(self) -> None:
        """Not a tty: a node's line is printed again only when it changes."""
        out = io.StringIO()
        screen = Screen(out)
        screen.show([("node1", "starting"), ("node2", "starting")])
        screen.show([("node1", "ok"), ("node2", "starting")])
        assert out.getvalue().splitlines() == ["node1  starting", "node2  starting", "node1  ok"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TerminalTests:
    def test_lines_are_redrawn_in_place(self) -> None:
        """On a terminal the node lines are rewritten where they stand (cursor up, clear line)."""
        out = Terminal()
        screen = Screen(out)
        screen.show([("node1", "starting"), ("node2", "starting")])
        screen.show([("node1", "ok"), ("node2", "ok")])
        assert out.getvalue() == ("\x1b[2Knode1  starting\n\x1b[2Knode2  starting\n"
                                  "\x1b[2F\x1b[2Knode1  ok\n\x1b[2Knode2  ok\n")


class ConfigAndLockTests:
    def test_write_config_keeps_a_users_own_file(self, tmp_path: Path) -> None:
        """--write-config writes the file, rewrites its own, and leaves one the user wrote alone."""
        path = tmp_path / "cfg" / "gridnode" / "client.toml"
        assert "written" in write_config(str(path), "file:/a/store")
        assert "written" in write_config(str(path), "file:/b/store")
        assert tomllib.loads(path.read_text()) == {"store": "file:/b/store"}
        path.write_text('store = "s3://mine/grid"\n')
        said = write_config(str(path), "file:/c/store")
        assert "left as it is" in said and "GRIDNODE_STORE=file:/c/store" in said
        assert path.read_text() == 'store = "s3://mine/grid"\n'

    def test_a_second_pool_in_one_folder_is_refused(self, tmp_path: Path) -> None:
        """Its nodes would take the first pool's ids on the same store: one coded line, exit 1,
        nothing started."""
        (tmp_path / "pool").mkdir()
        held = open(tmp_path / "pool" / "pool.lock", "a+")  # noqa: SIM115 - held for the test
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            out = io.StringIO()
            args = argparse.Namespace(dir=str(tmp_path / "pool"), nodes=2, node_args=[], workers=None,
                                      drain_timeout=10, write_config=False)
            assert run_pool(args, out) == 1
            assert out.getvalue().startswith("gridnode: pool_running: ")
            assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["pool.lock"]
        finally:
            held.close()
