"""
Long upload bodies moved from the socket to the spool file by splice(2): a real GridSite on
loopback TCP with a real reactor, real spool files, clients on raw sockets in threads. splice
needs a real socket, so all of this is the integration suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gridnode.spool import FreeSpace, Meter, Spool
from gridnode.web import splice
from gridnode.web.upload import GridSite

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux's")]

MiB = 1024 * 1024


class Receiver(Resource):
    """Answers a POST with what reached its spool file: size, sha256, and how much was spliced."""

    isLeaf = True

    def render_POST(self, request: Any) -> Any:  # noqa: N802 - Twisted's name
        spool = request.content
        spool.close(release=False)

        def answer(digest: str) -> None:
            with open(spool.path, "rb") as f:
                on_disk = hashlib.sha256(f.read()).hexdigest()
            os.unlink(spool.path)
            data = json.dumps({"size": spool.size, "sha256": digest, "on_disk": on_disk,
                               "spliced": spool.spliced}).encode()
            request.setHeader(b"content-length", str(len(data)).encode())
            request.write(data)
            request.finish()

        spool.digest().addCallback(answer)
        return NOT_DONE_YET


class Site:
    def __init__(self, reactor: Any, folder: Path, timeout: float | None = None) -> None:
        self.spool = Spool(str(folder), reactor)
        #: gives each body a free-space meter, when set
        self.meter: Callable[[], Meter] | None = None
        self.sinks: list[Any] = []
        self.released: list[str] = []
        self.site = GridSite(Receiver(), reactor, self.route)
        if timeout is not None:
            self.site.timeOut = timeout
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")

    def route(self, method: bytes, path: bytes, request: Any, length: int | None) -> Any:
        sink = self.spool.new(f"body{len(self.sinks)}", meter=self.meter() if self.meter else None)
        sink.on_release = lambda: self.released.append(sink.path)
        self.sinks.append(sink)
        return sink

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port.getHost().port)


@pytest.fixture
def site(real_reactor: Any, tmp_path: Path) -> Any:
    s = Site(real_reactor, tmp_path)
    yield s
    s.port.stopListening()


def head(length: int, extra: str = "") -> bytes:
    return f"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


def read_answers(sock: socket.socket, count: int) -> list[dict[str, Any]]:
    """``count`` HTTP answers (Content-Length framed) from ``sock``."""
    data, answers = b"", []
    while len(answers) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        while b"\r\n\r\n" in data:
            top, _, rest = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in top.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is None or len(rest) < length:
                break
            answers.append(json.loads(rest[:length]))
            data = rest[length:]
    return answers


def post(address: tuple[str, int], bodies: list[bytes], pause: float = 0.0) -> list[dict[str, Any]]:
    """The bodies as pipelined POSTs on one connection (each in 1 MiB sends, ``pause`` apart)."""
    with socket.create_connection(address, timeout=30) as sock:
        for body in bodies:
            sock.sendall(head(len(body)))
            for at in range(0, len(body), MiB):
                sock.sendall(body[at:at + MiB])
                if pause:
                    time.sleep(pause)
        return read_answers(sock, len(bodies))


@pytest_twisted.ensureDeferred
async def test_a_long_body_is_spliced_and_arrives_whole(site: Site) -> None:
    """Every byte reaches the file, in order; the digest is the body's; almost all of it went
    by splice (the part that came with the headers and the last byte went the usual way)."""
    body = os.urandom(24 * MiB + 12345)
    (answer,) = await deferToThread(post, site.address, [body])
    assert answer["size"] == len(body)
    assert answer["sha256"] == answer["on_disk"] == hashlib.sha256(body).hexdigest()
    assert answer["spliced"] >= len(body) - 2 * MiB


@pytest_twisted.ensureDeferred
async def test_a_short_body_goes_the_usual_way(site: Site) -> None:
    body = os.urandom(splice.MIN_BODY - 1)
    (answer,) = await deferToThread(post, site.address, [body])
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["spliced"] == 0


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_after_a_spliced_body(site: Site) -> None:
    """Splicing never reads past its body: the next request on the connection is served."""
    bodies = [os.urandom(9 * MiB + 7), os.urandom(100), os.urandom(6 * MiB)]
    answers = await deferToThread(post, site.address, bodies)
    assert [a["sha256"] for a in answers] == [hashlib.sha256(b).hexdigest() for b in bodies]
    assert answers[0]["spliced"] > 0 and answers[1]["spliced"] == 0


@pytest_twisted.ensureDeferred
async def test_a_body_cut_off_mid_splice_keeps_nothing(site: Site, real_reactor: Any) -> None:
    """The client goes away half-way: the spool file is removed, its slot released."""

    def cut() -> None:
        with socket.create_connection(site.address, timeout=30) as sock:
            sock.sendall(head(32 * MiB))
            sock.sendall(os.urandom(12 * MiB))
            time.sleep(0.3)

    await deferToThread(cut)
    (sink,) = site.sinks
    for _ in range(100):
        if site.released and not os.path.exists(sink.path):
            break
        await deferLater(real_reactor, 0.05, lambda: None)
    assert site.released == [sink.path] and not os.path.exists(sink.path)
    assert sink.spliced > 0


@pytest_twisted.ensureDeferred
async def test_a_slow_long_body_is_not_timed_out(real_reactor: Any, tmp_path: Path) -> None:
    """Bytes that arrive by splice count as activity: a body slower than the idle timeout, but
    never idle that long, arrives whole."""
    # gaps of a quarter of the timeout: a stall of this process (a loaded machine) is not idleness
    slow = Site(real_reactor, tmp_path, timeout=2.0)
    try:
        body = os.urandom(12 * MiB)
        (answer,) = await deferToThread(post, slow.address, [body], 0.5)  # ~6 s in all: three timeouts
        assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["spliced"] > 0
    finally:
        slow.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_goes_the_usual_way(site: Site) -> None:
    """No declared length (chunked transfer coding): nothing to splice against; read as usual."""
    body = os.urandom(6 * MiB)

    def send() -> list[dict[str, Any]]:
        with socket.create_connection(site.address, timeout=30) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for at in range(0, len(body), MiB):
                piece = body[at:at + MiB]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
            return read_answers(sock, 1)

    (answer,) = await deferToThread(send)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["spliced"] == 0


@pytest_twisted.ensureDeferred
async def test_a_body_stalled_past_the_idle_timeout_is_closed(real_reactor: Any, tmp_path: Path) -> None:
    """A client that stops sending mid-body is cut off after the idle timeout like any other:
    the connection is closed and nothing is kept."""
    stalled = Site(real_reactor, tmp_path, timeout=1.0)

    def stall() -> bytes:
        with socket.create_connection(stalled.address, timeout=15) as sock:
            sock.sendall(head(32 * MiB))
            sock.sendall(os.urandom(6 * MiB))
            return sock.recv(65536)  # blocks until the node closes the connection

    try:
        assert await deferToThread(stall) == b""
        (sink,) = stalled.sinks
        assert stalled.released == [sink.path] and not os.path.exists(sink.path) and sink.spliced > 0
    finally:
        stalled.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_expect_100_continue(site: Site) -> None:
    """curl sends `Expect: 100-continue` for a long body and waits for the interim answer: the body
    that follows it is spliced like any other."""
    body = os.urandom(10 * MiB + 3)

    def send() -> list[dict[str, Any]]:
        with socket.create_connection(site.address, timeout=30) as sock:
            sock.sendall(head(len(body), "Expect: 100-continue\r\n"))
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                interim += sock.recv(1)
            assert interim.startswith(b"HTTP/1.1 100 ")
            sock.sendall(body)
            return read_answers(sock, 1)

    (answer,) = await deferToThread(send)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["spliced"] > 0


@pytest_twisted.ensureDeferred
async def test_a_sink_that_refuses_mid_splice(site: Site, real_reactor: Any) -> None:
    """A sink refusing bytes already spliced into it (the disk fell below --min-free): the node
    answers 507 at once, drops the rest of the body, and removes the file."""
    site.meter = FreeSpace(lambda: 0, min_free=1).meter  # the first look finds the disk full

    def send() -> list[dict[str, Any]]:
        with socket.create_connection(site.address, timeout=30) as sock:
            sock.sendall(head(24 * MiB))
            with contextlib.suppress(OSError):
                for _ in range(24):
                    sock.sendall(os.urandom(MiB))
            return read_answers(sock, 1)

    (answer,) = await deferToThread(send)
    assert answer["error"]["code"] == "insufficient_storage"
    (sink,) = site.sinks
    for _ in range(100):
        if site.released:
            break
        await deferLater(real_reactor, 0.05, lambda: None)
    assert site.released == [sink.path] and not os.path.exists(sink.path) and sink.spliced > 0
    assert sink.size <= splice.PIPE_SIZE + 4 * MiB  # refused at the first look: nothing written after it
