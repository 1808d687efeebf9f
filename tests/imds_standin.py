"""
A stand-in for the EC2 instance metadata service (IMDSv2 only), as a
twisted.web Resource tree.

- ``PUT /latest/api/token`` needs ``X-aws-ec2-metadata-token-ttl-seconds``
  (1..21600, else 400) and answers a fresh token;
- ``GET /latest/meta-data/{instance-id,local-ipv4,public-hostname}`` and
  ``GET /latest/user-data`` need a valid ``X-aws-ec2-metadata-token`` (else
  401); a value set to None answers 404, as EC2 does for an instance without
  a public name or without user-data; unknown paths answer 404 (after the
  token check, like EC2);
- a wrong method answers 405.

Failure modes, counted over every request in arrival order: the first
``hang_first`` requests get no answer at all (until `ImdsStandin.close`), the
next ``fail_first`` answer 500; ``fail_on={path: K}`` makes the first K
requests for that path answer 500. ``expire_tokens_after=N`` makes every token
good for N reads only (then 401, as an expired token). Every request is
recorded in `ImdsStandin.log`.

Tests use it in memory (``StubTreq(standin.resource())``) or on a real
loopback port: the `imds` fixture, or `start_imds` for an integration test
that points a real ``twistd -n gridnode --instance-metadata URL`` at it.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["ImdsStandin", "LoggedRequest", "imds", "start_imds"]

TOKEN_PATH = b"/latest/api/token"
TTL_HEADER = b"x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = b"x-aws-ec2-metadata-token"
MAX_TTL = 21600


@dataclass
class LoggedRequest:
    """One request as the stand-in saw it."""

    method: str
    path: str
    token: str | None
    #: the answer's status; None while it hangs (or when it never got one)
    status: int | None = None
    #: the clock's time when it arrived, when the stand-in has a clock
    at: float | None = None
    #: the token TTL header it carried, if any
    ttl: str | None = None


class ImdsStandin:
    """The state behind the resource tree: what it answers and what it saw."""

    def __init__(
        self,
        *,
        instance_id: str | None = "i-0123456789abcdef0",
        local_ipv4: str | None = "10.0.1.23",
        public_hostname: str | None = "ec2-203-0-113-25.compute-1.amazonaws.com",
        user_data: bytes | str | None = None,
        fail_first: int = 0,
        hang_first: int = 0,
        expire_tokens_after: int | None = None,
        fail_on: dict[str, int] | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.local_ipv4 = local_ipv4
        self.public_hostname = public_hostname
        self.user_data = user_data.encode() if isinstance(user_data, str) else user_data
        self.fail_first = fail_first
        self.hang_first = hang_first
        self.expire_tokens_after = expire_tokens_after
        self.fail_on = dict(fail_on or {})
        self.clock = clock
        self.url = ""
        self.log: list[LoggedRequest] = []
        #: valid tokens and how many reads each has answered
        self.tokens: dict[str, int] = {}
        self.hanging: list[Request] = []
        #: TCP connections accepted so far, and those still open (served by `start_imds` only)
        self.connections_made = 0
        self.open_connections: set[ProtocolWrapper] = set()
        self._seen = 0

    # -- what tests look at -------------------------------------------------

    def requests(self) -> list[str]:
        """The log as ``"METHOD /path"`` lines."""
        return [f"{r.method} {r.path}" for r in self.log]

    def statuses(self) -> list[int | None]:
        return [r.status for r in self.log]

    def expire_tokens(self) -> None:
        """Every token issued so far is refused from now on."""
        self.tokens.clear()

    def close(self) -> None:
        """Drop the connections of hanging requests, and every open TCP connection."""
        hanging, self.hanging = self.hanging, []
        for request in hanging:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
        for connection in list(self.open_connections):
            connection.transport.abortConnection()  # type: ignore[union-attr]

    def resource(self) -> Resource:
        """A fresh Resource tree answering from this stand-in."""
        root = _Dir(self)
        latest = _Dir(self)
        root.putChild(b"latest", latest)
        api = _Dir(self)
        latest.putChild(b"api", api)
        api.putChild(b"token", _Token(self))
        meta = _Dir(self)
        latest.putChild(b"meta-data", meta)
        meta.putChild(b"instance-id", _Value(self, lambda: self.instance_id))
        meta.putChild(b"local-ipv4", _Value(self, lambda: self.local_ipv4))
        meta.putChild(b"public-hostname", _Value(self, lambda: self.public_hostname))
        latest.putChild(b"user-data", _Value(self, lambda: self.user_data))
        return root

    # -- what the resources call ----------------------------------------------

    def _admit(self, request: Request) -> LoggedRequest | None:
        """Log the request; None when a failure mode has answered (or hung) it."""
        self._seen += 1
        raw_token = request.getHeader(TOKEN_HEADER)
        token = raw_token.decode("latin-1") if raw_token is not None else None
        raw_ttl = request.getHeader(TTL_HEADER)
        entry = LoggedRequest(
            ttl=raw_ttl.decode("latin-1") if raw_ttl is not None else None,
            method=(request.method or b"").decode(),
            path=(request.path or b"").decode(),
            token=token,
            at=self.clock.seconds() if self.clock is not None else None,
        )
        self.log.append(entry)
        if self._seen <= self.hang_first:
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return None
        if self._seen <= self.hang_first + self.fail_first:
            self._answer(request, entry, 500, b"Internal Server Error")
            return None
        if self.fail_on.get(entry.path, 0) > 0:
            self.fail_on[entry.path] -= 1
            self._answer(request, entry, 500, b"Internal Server Error")
            return None
        return entry

    def _answer(self, request: Request, entry: LoggedRequest, status: int, body: bytes) -> bytes:
        entry.status = status
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain")
        request.write(body)
        request.finish()
        return NOT_DONE_YET  # type: ignore[return-value]

    def _issue_token(self, request: Request, entry: LoggedRequest) -> bytes:
        if request.method != b"PUT":
            return self._answer(request, entry, 405, b"Method Not Allowed")
        ttl = request.getHeader(TTL_HEADER)
        if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            return self._answer(request, entry, 400, b"Bad Request")
        token = secrets.token_urlsafe(32)
        self.tokens[token] = 0
        request.setHeader(TTL_HEADER, ttl)
        return self._answer(request, entry, 200, token.encode())

    def _serve(self, request: Request, entry: LoggedRequest, value: bytes | str | None) -> bytes:
        if entry.token is None or entry.token not in self.tokens:
            return self._answer(request, entry, 401, b"Unauthorized")
        if self.expire_tokens_after is not None and self.tokens[entry.token] >= self.expire_tokens_after:
            del self.tokens[entry.token]
            return self._answer(request, entry, 401, b"Unauthorized")
        self.tokens[entry.token] += 1
        if request.method != b"GET":
            return self._answer(request, entry, 405, b"Method Not Allowed")
        if value is None:
            return self._answer(request, entry, 404, b"Not Found")
        return self._answer(request, entry, 200, value.encode() if isinstance(value, str) else value)


class _Dir(Resource):
    """An inner node: known children, else a leaf that answers 404 past the token check."""

    def __init__(self, standin: ImdsStandin) -> None:
        super().__init__()
        self._standin = standin

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802 - Twisted's name
        return _Value(self._standin, lambda: None)

    def render(self, request: Any) -> bytes:
        return _Value(self._standin, lambda: None).render(request)


class _Value(Resource):
    isLeaf = True

    def __init__(self, standin: ImdsStandin, value: Any) -> None:
        super().__init__()
        self._standin = standin
        self._value = value

    def render(self, request: Any) -> bytes:
        entry = self._standin._admit(request)
        if entry is None:
            return NOT_DONE_YET  # type: ignore[return-value]
        return self._standin._serve(request, entry, self._value())


class _Token(Resource):
    isLeaf = True

    def __init__(self, standin: ImdsStandin) -> None:
        super().__init__()
        self._standin = standin

    def render(self, request: Any) -> bytes:
        entry = self._standin._admit(request)
        if entry is None:
            return NOT_DONE_YET  # type: ignore[return-value]
        return self._standin._issue_token(request, entry)


class _Connections(WrappingFactory):
    """Keeps the stand-in's count of TCP connections."""

    def __init__(self, standin: ImdsStandin, site: Site) -> None:
        super().__init__(site)
        self._standin = standin

    def registerProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802 - Twisted's name
        super().registerProtocol(p)
        self._standin.connections_made += 1
        self._standin.open_connections.add(p)

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:  # noqa: N802 - Twisted's name
        super().unregisterProtocol(p)
        self._standin.open_connections.discard(p)


def start_imds(reactor: Any = None, **options: Any) -> tuple[str, ImdsStandin, IListeningPort]:
    """
    Serve a new `ImdsStandin` (built from ``options``) on 127.0.0.1, on a free port.

    Returns (base URL, stand-in, listening port). The caller stops it:
    ``standin.close(); port.stopListening()``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    standin = ImdsStandin(**options)
    factory = _Connections(standin, Site(standin.resource()))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    standin.url = f"http://127.0.0.1:{port.getHost().port}"
    return standin.url, standin, port


@pytest.fixture
def imds() -> Iterator[ImdsStandin]:
    """An `ImdsStandin` on a real loopback port (``imds.url``), with its defaults;
    a test changes its attributes (``imds.fail_first = 2``) before the first request."""
    _, standin, port = start_imds()
    yield standin
    standin.close()
    port.stopListening()
