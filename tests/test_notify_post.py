"""
One webhook POST (gridnode/notify/post.py) against real receivers on loopback: it connects to the
address it is given (the URL's host is never resolved), sends that host in ``Host``, follows no
redirect, reads a huge answer only up to its limit, and checks an https receiver's certificate.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.notify.post import post
from gridnode.notify.targets import parse_url
from tests.test_tls_nodes import self_signed

pytestmark = pytest.mark.integration
LOOPBACK = ipaddress.ip_address("127.0.0.1")


class Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        Handler.seen.append({"path": self.path, "host": self.headers.get("host"), "body": body,
                             "id": self.headers.get("webhook-id")})
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("content-length", "0")
            self.end_headers()
        elif self.path == "/huge":
            self.send_response(200)
            self.send_header("content-length", str(1 << 30))
            self.end_headers()
            try:
                for _ in range(1 << 14):  # 1 GiB promised; the node stops reading after 4 KiB
                    self.wfile.write(b"x" * 65536)
            except OSError:
                Handler.seen[-1]["cut"] = True
        else:
            self.send_response(204)
            self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def serve(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def port() -> Iterator[int]:
    Handler.seen = []
    yield from serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture
def tls_port(tmp_path: Path) -> Iterator[int]:
    Handler.seen = []
    key, cert = self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from serve(server)


class PostTests:
    @pytest_twisted.inlineCallbacks
    def test_the_checked_address_is_used_and_the_host_sent(self, port: int) -> None:
        """``hooks.invalid`` resolves nowhere: the POST still reaches the address it was given."""
        from twisted.internet import reactor

        target = parse_url(f"http://hooks.invalid:{port}/in?x=1")
        status = yield post(reactor, target, LOOPBACK, b'{"a": 1}', {"webhook-id": "msg_1"})
        assert status == 204
        assert Handler.seen == [{"path": "/in?x=1", "host": f"hooks.invalid:{port}", "body": b'{"a": 1}',
                                 "id": "msg_1"}]

    @pytest_twisted.inlineCallbacks
    def test_no_redirect_is_followed_and_a_huge_answer_is_not_read(self, port: int) -> None:
        from twisted.internet import reactor

        status = yield post(reactor, parse_url(f"http://hooks.invalid:{port}/redirect"), LOOPBACK, b"{}", {})
        assert status == 307 and [s["path"] for s in Handler.seen] == ["/redirect"]
        status = yield post(reactor, parse_url(f"http://hooks.invalid:{port}/huge"), LOOPBACK, b"{}", {})
        assert status == 200

    @pytest_twisted.inlineCallbacks
    def test_an_https_receiver_must_hold_a_trusted_certificate(self, tls_port: int) -> None:
        """A self-signed certificate is refused (nothing is sent); the receiver saw no POST."""
        from twisted.internet import reactor

        with pytest.raises(Exception):  # noqa: B017 - any TLS verification failure
            yield post(reactor, parse_url(f"https://localhost:{tls_port}/in"), LOOPBACK, b"{}", {})
        assert Handler.seen == []
