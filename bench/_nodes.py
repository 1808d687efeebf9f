"""
Servers for the benchmarks: a real ``twistd -n gridnode`` node or a stock twisted.web server,
started in a folder of their own, waited on by their "serving/listening on HOST:PORT" line, and
always stopped again (with every child they started). The process itself is
tests/nodes.py's ``ServerProcess``, which the integration tests use too.

Plus the small blocking clients the benchmarks need: a raw-socket POST that
sends the body with ``sendfile`` (the kernel copies; the client costs almost no
CPU) and records when the last byte was handed to the kernel and when the
answer arrived, and /proc readers.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    # for tests/ (appended: the benchmarks' gridnode stays the installed package the nodes run)
    sys.path.append(str(ROOT))

from tests.helpers import free_port  # noqa: E402
from tests.nodes import ServerProcess, get_json, gridnode_argv  # noqa: E402

__all__ = ["ServerProcess", "bare_server", "get_json", "memory", "node", "post_file", "reaped_cpu", "stock_server",
           "wait_idle"]

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


def _started(server: ServerProcess, timeout: float = 60.0) -> ServerProcess:
    """``server`` started and ready (stopped again if it does not get there)."""
    try:
        server.start()
        server.block_until_ready(timeout)
    except BaseException:
        server.stop()
        raise
    return server


def node(folder: Path, *args: str, json_log: bool = False, cpus: str | None = None) -> ServerProcess:
    """A started ``twistd -n gridnode`` in ``folder`` (its store and work folder live there; ARGS
    may name others). ``cpus``: the node and its children run on those cores only (``taskset``),
    as on a machine of that many cores: the node sizes its encoders by its affinity."""
    pinned = ["taskset", "-c", cpus] if cpus is not None else []
    return _started(ServerProcess(folder, pinned + gridnode_argv(
        "--http", "tcp:0:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        "--node-id", "bench", "--store", "file:store", "--work-dir", "work", "--drain-timeout", "2", *args,
        json_log=json_log)))


def stock_server(folder: Path) -> ServerProcess:
    """A started stock twisted.web Site that counts POSTed bytes; temp files go to ``folder``."""
    return _started(ServerProcess(folder, [sys.executable, "-c", STOCK_SERVER], env={"TMPDIR": str(folder)}))


def bare_server(folder: Path) -> ServerProcess:
    """A started ``BARE_SERVER`` writing into ``folder``."""
    return _started(ServerProcess(folder, [sys.executable, "-c", BARE_SERVER, str(folder)]))


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


def wait_idle(base: str, timeout: float = 600.0, every: float = 0.05) -> float:
    """Poll /health until the node holds no job (all done and forgotten); returns time.monotonic() then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, health = get_json(f"{base}/health")
        if status == 200 and health.get("running", 1) == 0 and health.get("queued", 1) == 0:
            return time.monotonic()
        time.sleep(every)
    raise RuntimeError(f"node {base} still busy after {timeout}s")
