"""
Real nodes for integration tests: ``twistd -n gridnode`` processes started
from the installed package, in their own folder, waited on by log line
(Tahoe-LAFS's habit) rather than by sleeping a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater

BIN = os.path.dirname(sys.executable)
READY = re.compile(r"serving HTTP on ([0-9.]+):(\d+)")


def twistd() -> str:
    return os.path.join(BIN, "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@dataclass
class NodeProcess:
    folder: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_offset: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / "twistd.out"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.log_offset = self.log.stat().st_size
        # Tests run as root in folders only root may enter; the sandbox user has its own test.
        args = self.args if "--ffmpeg-user" in self.args else [*self.args, "--ffmpeg-user", "none"]
        self.process = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "gridnode", *args],
            cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env}, start_new_session=True,
        )
        out.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")[self.log_offset:]

    def ready_url(self) -> str | None:
        """The base URL once the node logs that it serves HTTP (None before); raises if it exited."""
        m = READY.search(self.text())
        if m:
            self.url = f"http://{m.group(1)}:{m.group(2)}"
            return self.url
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"node exited {self.process.returncode}:\n{self.text()}")
        return None

    @inlineCallbacks
    def wait_ready(self, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = self.ready_url()
            if url:
                return url
            yield sleep(0.05)
        raise AssertionError(f"node not ready in {timeout}s:\n{self.text()}")

    def signal(self, sig: int) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


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


def heard_from(node: NodeProcess) -> list[str]:
    """The peers ``node`` holds alive and has had a message from (not only read in the registry):
    they know ``node`` too, so its leave reaches them."""
    status, view = get_json(node.url + "/peers")
    return [p["id"] for p in view["peers"]
            if p["id"] != view["node"] and p["state"] == "alive" and p["last_heard"] is not None]


@inlineCallbacks
def wait_for(predicate: Any, timeout: float = 15.0) -> Any:
    """Poll ``predicate`` until true; returns the seconds it took. A predicate that raises
    OSError or AssertionError (a node not answering yet) counts as false."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except (OSError, AssertionError):
            pass
        yield sleep(0.1)
    raise AssertionError(f"condition not reached within {timeout}s")
