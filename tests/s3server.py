"""
A real S3-compatible server for integration tests: ``moto_server`` (from
``moto[server]``) started as a subprocess on a free loopback port, once per
session. Use it from a test module with::

    pytest_plugins = ["tests.s3server"]

and ask for ``s3_endpoint`` (the URL, session-scoped), ``s3_bucket`` (a
fresh, empty bucket for one test, emptied and removed afterwards) or
``s3_client`` (a plain boto3 client on the server, for set-up and checks). The
session runs with dummy AWS credentials in the environment, so backends
built the ordinary way (standard credential chain) find them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "gridnode-test",
    "AWS_SECRET_ACCESS_KEY": "gridnode-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_REGION")
_buckets = itertools.count()


def moto_server_command() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
    exe = beside if os.path.exists(beside) else shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: pip install 'moto[server]'")
    return [exe]


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False
    return True


class MotoServer:
    """One ``moto_server`` process; ``start`` returns once it answers HTTP."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint = ""

    def start(self, timeout: float = 30.0) -> str:
        for _ in range(3):  # a free port can be taken between probe and bind
            port = free_port()
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(
                    moto_server_command() + ["-H", "127.0.0.1", "-p", str(port)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            self.endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if answers(self.endpoint + "/"):
                    return self.endpoint
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"moto_server did not start; see {self.log}:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def client(endpoint: str) -> Any:
    """A plain boto3 client on the server (for set-up and checks, not under test)."""
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def make_bucket(endpoint: str, stem: str = "gridnode-test") -> str:
    """Create a new, empty bucket with a name no other test uses."""
    name = f"{stem}-{os.getpid()}-{next(_buckets)}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def remove_bucket(endpoint: str, name: str) -> None:
    """Delete every object, then the bucket (moto keeps objects in memory)."""
    s3 = client(endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=name, Delete={"Objects": objects})
    s3.delete_bucket(Bucket=name)


def _credentials(mp: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        mp.setenv(name, value)
    for name in _UNSET:
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server on loopback, with test credentials set."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log")
    with pytest.MonkeyPatch.context() as mp:
        _credentials(mp)
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture
def own_moto(tmp_path: Path) -> Iterator[MotoServer]:
    """A moto S3 server of the test's own (started, test credentials set), for a test that
    freezes it (SIGSTOP to ``process``) without stopping anyone else's."""
    server = MotoServer(tmp_path / "own_moto.log")
    with pytest.MonkeyPatch.context() as mp:
        _credentials(mp)
        server.start()
        try:
            yield server
        finally:
            if server.process is not None:
                os.kill(server.process.pid, signal.SIGCONT)  # never left frozen
            server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str) -> Any:
    """A plain boto3 client on the session's server (not the code under test)."""
    return client(s3_endpoint)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> Iterator[str]:
    """A fresh bucket on the session's server, removed after the test."""
    name = make_bucket(s3_endpoint)
    yield name
    remove_bucket(s3_endpoint, name)


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class SlowDownProxy:
    """An S3 endpoint in front of another (moto) that answers ``503 SlowDown`` to the requests
    ``throttle(method, path)`` picks, as S3 does while a prefix scales, and passes the rest on.
    Threads of its own: the tests' blocking HTTP calls hold the reactor, and the node behind
    them needs its store to answer. ``slowed`` counts the SlowDowns sent; ``requests`` holds
    every request's (method, path with query), so a test counts what the nodes sent."""

    def __init__(self, target: str, throttle: Any) -> None:
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.throttle = throttle
        self.slowed = 0
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        where = urlsplit(target)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # botocore's Expect: 100-continue needs it

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _pass(self) -> None:
                body = self._body()
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    slow = bool(proxy.throttle(self.command, self.path))
                    proxy.slowed += int(slow)
                if slow:
                    self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("expect", "connection", "transfer-encoding", "content-length")}
                conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self._answer(resp.status, resp.getheaders(), data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _pass  # noqa: N815 - http.server's names

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
