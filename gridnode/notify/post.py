"""
One webhook POST, with treq, to the address the target was checked at.

The connection goes to that address (no second DNS lookup that could answer differently), with
the URL's host in ``Host`` and, for https, in SNI and the certificate check. No redirect is
followed (a 3xx is a failed delivery: a redirect could lead anywhere), the whole exchange has
`TIMEOUT` seconds, and at most `BODY_LIMIT` bytes of the answer are read before the connection
is dropped: only the status counts.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gridnode.notify.targets import IPAddress, Target

#: seconds to connect, send and have the status line back
TIMEOUT = 10.0
#: bytes of an answer's body read (and dropped) at most
BODY_LIMIT = 4096
USER_AGENT = b"gridnode-webhooks/1"


class _Drain(Protocol):
    """Reads an answer's body up to a limit, then drops the connection."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self.left -= len(data)
        if self.left < 0:
            self.stop()

    def stop(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if not self.done.called:
            self.done.callback(None)


def _endpoints(reactor: Any, address: IPAddress, target: Target) -> Any:
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
    from twisted.internet.ssl import optionsForClientTLS
    from twisted.web.iweb import IAgentEndpointFactory

    @implementer(IAgentEndpointFactory)
    class Pinned:
        def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - Twisted's name
            tcp = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint: Any = tcp(reactor, str(address), target.port, timeout=TIMEOUT)
            if target.scheme == "https":
                endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
            return endpoint

    return Pinned()


def post(reactor: Any, target: Target, address: IPAddress, body: bytes, headers: dict[str, str]) -> Deferred[int]:
    """POST ``body`` to ``target`` at ``address``; fires with the answer's status (or fails)."""
    import treq.client
    from twisted.web.client import Agent

    agent = Agent.usingEndpointFactory(reactor, _endpoints(reactor, address, target))
    client = treq.client.HTTPClient(agent)
    sent: dict[bytes | str, bytes | str] = {"content-type": "application/json", "user-agent": USER_AGENT}
    sent.update(headers)
    d = client.post(target.url, data=body, headers=sent, allow_redirects=False, unbuffered=True,
                    timeout=TIMEOUT, reactor=reactor)

    def answered(response: Any) -> Deferred[int]:
        drain = _Drain(BODY_LIMIT)
        response.deliverBody(drain)
        # a body that trickles forever is cut off: only the status counts
        cut = reactor.callLater(TIMEOUT, drain.stop)

        def over(_: object) -> int:
            if cut.active():
                cut.cancel()
            return int(response.code)

        return drain.done.addCallback(over)

    return d.addCallback(answered)
