"""
Real servers for integration tests and benchmarks (bench/_nodes.py uses these too): a process in
a folder of its own, waited on by the log line that says where it listens (Tahoe-LAFS's habit)
rather than by sleeping a fixed time, and stopped with every process it started. A node is
``twistd -n gridnode`` from the installed package.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from tests.helpers import sleep

BIN = os.path.dirname(sys.executable)
READY = re.compile(r"(?:serving HTTP|listening) on ([0-9.]+):(\d+)")


def twistd() -> str:
    return os.path.join(BIN, "twistd")


def gridnode_argv(*args: str, json_log: bool = False) -> list[str]:
    """``twistd -n gridnode ARGS``; ``json_log``: one JSON object per log line."""
    logger = ["--logger", "gridnode.logs.json_observer"] if json_log else []
    return [twistd(), "-n", "--pidfile=", *logger, "gridnode", *args]


def children_of(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (scanned from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in found:
                found.append(child)
                todo.append(child)
    return found


class ServerProcess:
    """``argv`` run in ``folder``, its output appended to ``folder/log``; ready once it logs
    "serving HTTP on HOST:PORT" or "listening on HOST:PORT". Started again, ``text()`` is the new
    run's output only."""

    def __init__(self, folder: Path, argv: list[str], *, env: dict[str, str] | None = None,
                 log: str = "out.log") -> None:
        self.folder = folder
        self.argv = argv
        self.env = env or {}
        self.log = folder / log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.host = ""
        self.port = 0
        self._offset = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        """Start the process (in a session of its own) and return at once."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self._offset = out.tell()
            self.process = subprocess.Popen(
                self.argv, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True)

    def text(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ready_url(self) -> str | None:
        """The base URL once the process logged where it listens (None before); raises if it exited."""
        m = READY.search(self.text())
        if m:
            self.host, self.port = m.group(1), int(m.group(2))
            self.url = f"http://{self.host}:{self.port}"
            return self.url
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(self._why(f"exited {self.process.returncode}"))
        return None

    def block_until_ready(self, timeout: float = 60.0) -> str:
        """``ready_url()``, waited for by sleeping (nothing else runs meanwhile)."""
        deadline = time.monotonic() + timeout
        while (url := self.ready_url()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(self._why(f"not ready in {timeout}s"))
            time.sleep(0.05)
        return url

    @inlineCallbacks
    def wait_ready(self, timeout: float = 30.0) -> Any:
        """``ready_url()``, waited for on the reactor (a Deferred)."""
        deadline = time.monotonic() + timeout
        while (url := self.ready_url()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(self._why(f"not ready in {timeout}s"))
            yield sleep(0.05)
        return url

    def _why(self, what: str) -> str:
        return f"{self.argv[0]} in {self.folder} {what}:\n{self.text()[-4000:]}"

    def signal(self, sig: int) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL to its group after ``timeout``; then kill whatever it left (ffmpeg
        runs in a process group of its own). Returns its exit status."""
        if self.process is None:
            return 0
        left = children_of(self.process.pid) if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for pid in left:
            for kill in (lambda p: os.killpg(p, signal.SIGKILL), lambda p: os.kill(p, signal.SIGKILL)):
                with contextlib.suppress(OSError):
                    kill(pid)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.cache
def boxes_here(user: str | None = None) -> str | None:
    """None where this host boxes children run as ``user`` ("uid:gid"; None: ours), else why
    not: a trial box, as a node makes at start (gridnode.media.sandbox.find_host)."""
    from gridnode.media.sandbox import find_host

    host = find_host(user, trial_binary="ffprobe")
    return host.missing or host.refused or (None if host.bwrap else "bubblewrap is not installed")


class NodeProcess(ServerProcess):
    """A node for a test: ``twistd -n gridnode ARGS`` in ``folder``, its output in ``twistd.out``.
    Its children run as the node's own user unless ARGS say otherwise: tests run as root in
    folders only root may enter (the sandbox tests choose the user). Where this host cannot
    box them, the node runs them with ``--sandbox weak`` unless ARGS choose."""

    def __init__(self, folder: Path, args: list[str], *, env: dict[str, str] | None = None,
                 json_log: bool = False) -> None:
        if "--ffmpeg-user" not in args:
            args = [*args, "--ffmpeg-user", "none"]
        if "--sandbox" not in args and boxes_here() is not None:
            args = [*args, "--sandbox", "weak"]
        super().__init__(folder, gridnode_argv(*args, json_log=json_log), env=env, log="twistd.out")


def run_twistd(folder: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``twistd -n gridnode ARGS`` to its end (for start-up failures and --help)."""
    return subprocess.run(
        [twistd(), "-n", "--pidfile=", "gridnode", *args], cwd=folder, capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    """A blocking GET for tests that have no reactor work running meanwhile."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """A blocking HTTP request: (status, headers with lower-case names, body)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def upload(base: str, path: Path, presets: str = "mp4-720p", **headers: str) -> tuple[int, dict[str, str], Any]:
    """POST a file to /jobs; returns (status, headers, JSON body)."""
    status, head, body = request("POST", f"{base}/jobs?presets={presets}&name={path.name}", path.read_bytes(),
                                 {"content-type": "application/octet-stream", **headers})
    return status, head, json.loads(body)


@inlineCallbacks
def wait_job(base: str, job_id: str, states: set[str] | frozenset[str] = frozenset({"done", "failed", "cancelled"}),
             timeout: float = 120.0, min_progress: float = -1.0) -> Any:
    """Poll a job until it reaches one of ``states`` (and ``min_progress``)."""
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        status, job = get_json(f"{base}/jobs/{job_id}")
        if status == 200 and job["state"] in states and job["progress"] >= min_progress:
            return job
        yield sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job}")


def stored_record(s3: Any, bucket: str, key: str) -> Any:
    """The job record at ``key`` in the bucket, read at once: a node tells of a job's end only
    once this record says so (docs/api.md, States), so a test that saw the end reads it here."""
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def heard_from(node: NodeProcess) -> list[str]:
    """The peers ``node`` holds alive and has had a message from (not only read in the registry):
    they know ``node`` too, so its leave reaches them."""
    status, view = get_json(node.url + "/peers")
    return [p["id"] for p in view["peers"]
            if p["id"] != view["node"] and p["state"] == "alive" and p["last_heard"] is not None]


@inlineCallbacks
def spool_emptied(spool: Path, prefix: str = "", tries: int = 100) -> Any:
    """Wait (bounded) until the spool folder holds nothing named ``prefix``...: "done" shows while
    a job's last record is written (fsynced), its spool file goes a moment after. Fires with
    what is left (nothing, unless the wait ran out)."""
    for _ in range(tries):
        left = [n for n in os.listdir(spool) if n.startswith(prefix)]
        if not left:
            break
        yield sleep(0.1)
    return left
