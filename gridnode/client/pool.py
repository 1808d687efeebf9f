"""
``gridnode pool``: a local pool in one command, for trying gridnode on one machine.

It starts N real nodes (``twistd -n gridnode``, run by this same Python) on
one embedded ``file:`` store under ``--dir``, each with free loopback ports, a
work folder and a log of its own, and no pidfile (``--pidfile=``), so that
several never clash. Loopback nodes need neither an upload-token keyring nor a
peer secret (both matter only beyond loopback), so the pool is open, as a
newcomer's ``curl`` expects. It shows each node's ``/health`` live, one line a
node (plain lines, on change, when not on a terminal), and on Ctrl-C or
SIGTERM sends SIGTERM to every node, waits for their drain, and exits 0; a
second Ctrl-C kills them at once. A pool killed outright (SIGKILL) still stops
its nodes: the kernel sends each one SIGTERM when the pool dies.

Plain blocking code on purpose: a few processes, one poll a second, and no
reactor to share with anything.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, TextIO

from gridnode.client.discovery import config_path

#: how a node is started: twistd's own entry point under this Python (no PATH lookup)
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]
#: beyond the drain, how long a node may take to exit before it is killed
EXIT_GRACE = 10.0
#: prctl(2): the signal a child gets when its parent dies
PR_SET_PDEATHSIG = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=_count, default=3, metavar="N", help="how many nodes (default: %(default)s)")
    p.add_argument("--dir", default="gridnode-pool", metavar="DIR",
                   help="the pool's folder: the store in DIR/store, each node's work files and log in "
                        "DIR/nodeN (default: %(default)s)")
    p.add_argument("--workers", type=_count, metavar="N",
                   help="ffmpeg processes per node (default: the CPUs shared among the nodes)")
    p.add_argument("--drain-timeout", type=_count, default=10, metavar="S",
                   help="on Ctrl-C, how long running jobs may take to finish (default: %(default)s)")
    p.add_argument("--write-config", action="store_true",
                   help=f"write the client config that finds this pool from any folder ({config_path(os.environ)})")
    p.add_argument("node_args", nargs=argparse.REMAINDER, metavar="-- NODE OPTION",
                   help="options passed on to every node, after --, e.g. -- --sandbox weak")


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number from 1 to 64")
    return int(text)


@dataclass(frozen=True)
class PoolNode:
    id: str
    folder: str
    http_port: int
    peer_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> str:
        return os.path.join(self.folder, "twistd.log")


def plan(base: str, count: int, ports: list[int]) -> list[PoolNode]:
    """The nodes of a pool under ``base``: two ports each (HTTP, peer), from ``ports``."""
    base = os.path.abspath(base)
    return [PoolNode(f"node{i + 1}", os.path.join(base, f"node{i + 1}"), ports[2 * i], ports[2 * i + 1])
            for i in range(count)]


def store_url(base: str) -> str:
    return "file:" + os.path.join(os.path.abspath(base), "store")


def node_argv(python: str, node: PoolNode, store: str, *, workers: int, drain_timeout: int,
              extra: list[str]) -> list[str]:
    return [python, *TWISTD, "-n", "--pidfile=", "gridnode", "--store", store, "--node-id", node.id,
            "--http", f"tcp:{node.http_port}:interface=127.0.0.1",
            "--peer", f"tcp:{node.peer_port}:interface=127.0.0.1",
            "--work-dir", os.path.join(node.folder, "work"), "--workers", str(workers),
            "--drain-timeout", str(drain_timeout), *extra]


def client_config(store: str) -> str:
    """The client.toml that finds this pool from any folder."""
    return f"# written by `gridnode pool`: where the command line client finds its pool\nstore = {json.dumps(store)}\n"


def write_config(path: str, store: str) -> str:
    """Write the client config for ``store`` unless the file there is the user's own (one that
    ``gridnode pool`` did not write); returns what to tell the user."""
    try:
        with open(path) as f:
            if not f.readline().startswith(client_config("")[:20]):
                return (f"{path} is yours: left as it is; from any folder: export GRIDNODE_STORE={store}")
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(client_config(store))
    return f"client config written to {path}: `gridnode upload FILE --wait` finds this pool from any folder"


def describe_health(health: dict[str, Any] | None, exited: int | None) -> str:
    """A node's state in a few words: from its ``/health``, or why there is none."""
    if exited is not None:
        return f"exited {exited}"
    if health is None:
        return "starting"
    if not health:
        return "not answering"
    found = health.get("registry")
    registry: dict[str, Any] = found if isinstance(found, dict) else {}
    state = str(health.get("state", "?"))
    if state == "ok" and registry.get("registered") is False:
        state = "registering"  # clients cannot find it yet
    words = [state]
    error = registry.get("error")
    for key in ("running", "queued", "workers"):
        if isinstance(health.get(key), (int, float)):
            words.append(f"{key} {health[key]:g}")
    if error:
        words.append(f"registry: {error}")
    return "  ".join(words)


def last_line(path: str) -> str:
    """Why a node exited: its log's last start-up failure line, else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    said = [x for x in lines if x.startswith("twistd gridnode:")] or lines
    return said[-1].strip() if said else "(empty log)"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while found, so none repeats)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def read_health(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """A node's ``/health`` (its 503 while draining too); {} where it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            data = json.loads(r.read(65536))
    except urllib.error.HTTPError as e:
        try:
            data = json.loads(e.read(65536))
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class Screen:
    """A line per node: redrawn in place on a terminal, printed when it changes elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: dict[str, str] = {}

    def show(self, lines: list[tuple[str, str]]) -> None:
        if self.tty:
            if self.drawn:
                self.out.write(f"\x1b[{self.drawn}F")
            for name, text in lines:
                self.out.write(f"\x1b[2K{name}  {text}\n")
            self.drawn = len(lines)
        else:
            for name, text in lines:
                if self.last.get(name) != text:
                    self.out.write(f"{name}  {text}\n")
            self.last = dict(lines)
        self.out.flush()

    def say(self, text: str) -> None:
        self.drawn = 0
        self.out.write(text + "\n")
        self.out.flush()


def run_pool(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    extra = list(args.node_args or [])
    if extra[:1] == ["--"]:
        extra = extra[1:]
    os.makedirs(args.dir, exist_ok=True)
    lock = open(os.path.join(args.dir, "pool.lock"), "a+")  # held (and closed) with this process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        # a second pool on the same store would start nodes with the first one's ids
        out.write(f"gridnode: pool_running: another `gridnode pool` runs in {os.path.abspath(args.dir)}; "
                  f"stop it, or give this one its own --dir\n")
        return 1
    nodes = plan(args.dir, args.nodes, free_ports(2 * args.nodes))
    store = store_url(args.dir)
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.nodes)
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, _frame: signals.append(number))

    processes: dict[str, subprocess.Popen[bytes]] = {}
    for node in nodes:
        # Traversable (not readable) by others: a root node runs ffmpeg as nobody, which must reach
        # its job's folder; the node keeps what is inside private itself.
        os.makedirs(node.folder, exist_ok=True)
        for folder in (os.path.dirname(node.folder), node.folder):
            os.chmod(folder, 0o711)
        with open(node.log, "ab") as log:
            # A session of its own: Ctrl-C reaches the pool only, which then drains each node.
            processes[node.id] = subprocess.Popen(
                node_argv(sys.executable, node, store, workers=workers, drain_timeout=args.drain_timeout,
                          extra=extra), cwd=node.folder, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()))

    screen = Screen(out)
    each = "1 worker each" if workers == 1 else f"{workers} workers each"
    screen.say(f"gridnode pool: {len(nodes)} nodes on {store}, {each}; logs in "
               f"{os.path.abspath(args.dir)}/nodeN/twistd.log")
    for node in nodes:
        screen.say(f"  {node.id}  {node.url}/")
    screen.say(f"page: {nodes[0].url}/   status: {nodes[0].url}/status")
    if args.write_config:
        screen.say(write_config(config_path(os.environ), store))
    else:
        screen.say(f"from any folder: export GRIDNODE_STORE={store}  (or run with --write-config to put it "
                   f"in {config_path(os.environ)})")
    screen.say("Ctrl-C stops them all.")

    seen: dict[str, dict[str, Any] | None] = {n.id: None for n in nodes}
    while not signals:
        lines = []
        for node in nodes:
            code = processes[node.id].poll()
            if code is None:
                health = read_health(node.url)
                if health or seen[node.id] is not None:
                    seen[node.id] = health
            lines.append((node.id, describe_health(seen[node.id], code)))
        screen.show(lines)
        if all(p.poll() is not None for p in processes.values()):
            screen.say(f"gridnode: pool_failed: every node exited; {nodes[0].id} said: {last_line(nodes[0].log)} "
                       f"(all of it: {nodes[0].log})")
            return 1
        for _ in range(10):
            if signals:
                break
            time.sleep(0.1)
    return stop(nodes, processes, screen, signals, args.drain_timeout)


def _die_with_parent(pool: int) -> None:
    """In the node's process before it runs: SIGTERM it (a drain) when the pool dies, even by
    SIGKILL, so a killed pool leaves no node behind. Linux only; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != pool:  # the pool died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop(nodes: list[PoolNode], processes: dict[str, subprocess.Popen[bytes]], screen: Screen,
         signals: list[int], drain_timeout: int) -> int:
    """SIGTERM to every node, then wait for their drain; a further signal, or the drain plus
    ``EXIT_GRACE`` running out, kills what is left (and its process group)."""
    screen.say(f"stopping {len(nodes)} nodes (running jobs get {drain_timeout} s; Ctrl-C again kills them)")
    seen = len(signals)
    for p in processes.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout + EXIT_GRACE
    while any(p.poll() is None for p in processes.values()):
        if len(signals) > seen or time.monotonic() > deadline:
            for p in processes.values():
                if p.poll() is None:
                    with contextlib.suppress(OSError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.1)
    screen.say("stopped: " + ", ".join(f"{n.id} exited {processes[n.id].returncode}" for n in nodes))
    return 0
