"""
Processes for the benchmarks: a real ``twistd -n gridnode`` node or a stock
twisted.web server, started in a folder of their own, waited on by their
"serving/listening on HOST:PORT" line, and always stopped again (with every
child they started, ffmpeg included, which lives in a process group of its own).

Plus the small blocking clients the benchmarks need: a raw-socket POST that
sends the body with ``sendfile`` (the kernel copies; the client costs almost no
CPU) and records when the last byte was handed to the kernel and when the
answer arrived, a JSON GET, and /proc readers.

Deliberately independent of tests/ (benchmarks must not import the test suite).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
READY = re.compile(r"(?:serving HTTP|listening) on ([0-9.]+):(\d+)")

# A stock twisted.web Site whose resource only counts the body's bytes. The
# body is buffered by twisted.web itself (a temporary file above 100 kB).
STOCK_SERVER = """\
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

class Count(Resource):
    isLeaf = True

    def render_POST(self, request):
        request.content.seek(0, 2)
        return b'{"received": %d}\\n' % request.content.tell()

port = reactor.listenTCP(0, Site(Count()), interface="127.0.0.1")
print("listening on 127.0.0.1:%d" % port.getHost().port, flush=True)
reactor.run()
"""

# The ceiling for any Python receiver on this machine: no HTTP parser, no hash, no
# reactor; read the headers, then recv_into a 1 MiB buffer and os.write it to a file
# until Content-Length, answer, remove the file. One connection at a time.
BARE_SERVER = """\
import os, socket, sys
folder = sys.argv[1]
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(8)
print("listening on 127.0.0.1:%d" % ls.getsockname()[1], flush=True)
buf = bytearray(1 << 20)
view = memoryview(buf)
while True:
    conn, _ = ls.accept()
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    head, _, rest = head.partition(b"\\r\\n\\r\\n")
    length = 0
    for line in head.split(b"\\r\\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    path = os.path.join(folder, "bare.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, rest)
    got = len(rest)
    while got < length:
        n = conn.recv_into(buf, min(len(buf), length - got))
        if not n:
            break
        os.write(fd, view[:n])
        got += n
    os.close(fd)
    os.unlink(path)
    body = b'{"received": %d}' % got
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n"
                 b"Connection: close\\r\\n\\r\\n%s" % (len(body), body))
    conn.close()
"""


def twistd() -> str:
    return str(BIN / "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def reaped_cpu() -> float:
    """User + system seconds of this process's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in bytes."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


@dataclass
class Server:
    """A server process in ``folder``; its output goes to ``folder/out.log``."""

    folder: Path
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    host: str = ""
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.folder / "out.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> Server:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, cwd=self.folder, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY.search(self.text())
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                self.url = f"http://{self.host}:{self.port}"
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited {self.process.returncode}:\n{self.text()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} not ready in {timeout}s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL; then kill whatever it left (ffmpeg runs in its own group)."""
        if self.process is None:
            return
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

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def node(folder: Path, *args: str, json_log: bool = False) -> Server:
    """A started ``twistd -n gridnode`` in ``folder`` (its store and work folder live there)."""
    logger = ["--logger", "gridnode.logs.json_observer"] if json_log else []
    argv = [twistd(), "-n", "--pidfile=", *logger, "gridnode",
            "--http", "tcp:0:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
            "--node-id", "bench", "--store", "file:store", "--work-dir", "work", "--drain-timeout", "2", *args]
    server = Server(folder, argv)
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


def stock_server(folder: Path) -> Server:
    """A started stock twisted.web Site that counts POSTed bytes; temp files go to ``folder``."""
    server = Server(folder, [sys.executable, "-c", STOCK_SERVER], env={"TMPDIR": str(folder)})
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


def bare_server(folder: Path) -> Server:
    """A started ``BARE_SERVER`` writing into ``folder``."""
    server = Server(folder, [sys.executable, "-c", BARE_SERVER, str(folder)])
    try:
        return server.start()
    except BaseException:
        server.stop()
        raise


@dataclass
class Posted:
    status: int
    body: Any
    started: float  # time.monotonic() before the first byte
    sent: float  # the last body byte was handed to the kernel
    answered: float  # the whole answer was read
    wall_started: float  # time.time() at ``started``


def post_file(host: str, port: int, target: str, path: Path, size: int | None = None) -> Posted:
    """POST ``path`` (repeated until ``size`` bytes when given) as a raw body with sendfile."""
    file_size = path.stat().st_size
    total = file_size if size is None else size
    head = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {total}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((host, port)) as s, open(path, "rb") as f:
        wall = time.time()
        started = time.monotonic()
        s.sendall(head)
        left = total
        try:
            while left > 0:
                n = min(left, file_size)
                s.sendfile(f, 0, n)
                left -= n
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: read the answer
        sent = time.monotonic()
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        answered = time.monotonic()
    raw = b"".join(chunks)
    head_block, _, payload = raw.partition(b"\r\n\r\n")
    status_line, _, header_lines = head_block.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line else 0
    if b"transfer-encoding: chunked" in header_lines.lower():
        payload = dechunk(payload)
    try:
        body: Any = json.loads(payload)
    except ValueError:
        body = payload[:500].decode(errors="replace")
    return Posted(status, body, started, sent, answered, wall)


def dechunk(data: bytes) -> bytes:
    """The body of a ``Transfer-Encoding: chunked`` answer."""
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2:]
    return b"".join(out)


def get_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_idle(base: str, timeout: float = 600.0, every: float = 0.05) -> float:
    """Poll /health until the node holds no job (all done and forgotten); returns time.monotonic() then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, health = get_json(f"{base}/health")
        if status == 200 and health.get("running", 1) == 0 and health.get("queued", 1) == 0:
            return time.monotonic()
        time.sleep(every)
    raise RuntimeError(f"node {base} still busy after {timeout}s")
