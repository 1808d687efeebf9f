"""
Upload bodies go to disk as they arrive, never into memory.

twisted.web's stock Request buffers a body of 100 kB or more into an
anonymous temporary file, has no size limit, and parses multipart bodies
whole in memory. `GridRequest` asks the site, once the headers are in and
before any body byte is read, where the body should go:

- an upload route answers with a sink on disk (a `gridnode.spool.SpoolFile`,
  or a tus chunk), after the admission checks: draining, queue full (503 +
  Retry-After), too little disk (507), declared size over ``--max-upload``
  (413); a declared size is reserved on disk up front;
- or with a Deferred of that sink, when the answer needs the store (a tus
  PATCH for an upload this node has not seen, a request with an
  Idempotency-Key, a POST /jobs body whose S3 multipart upload is begun
  first): the transport stops reading meanwhile, so nothing of the body is
  read (beyond what came with the headers) before the store has answered;
- or with an `EarlyAnswer`, the whole answer, written before the body is
  read (the retry of a request already accepted);
- any other route gets a small in-memory body with a hard cap.

The sink counts the bytes actually received against its limit and the free
space (chunked bodies declare no size), and may refuse mid-stream (so may the
store that takes the body as it arrives: 503 storage_unavailable). A refusal
is answered at once (clients sending ``Expect: 100-continue`` never send the
body); the body of a refused request is read and dropped up to a bound, then
the connection is closed, so the client sees the answer rather than a reset.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from gridnode.errors import GridnodeError
from gridnode.web.access import redacted_log_line
from gridnode.web.http import MethodChecked
from gridnode.web.splice import BodySplice, can_splice

#: socket reads of an upload body
UPLOAD_READ_SIZE = 512 * 1024
#: bodies of non-upload requests (JSON, tus creation) stay this small
SMALL_BODY = 64 * 1024
#: seconds a refused request's connection may linger before it is cut
REFUSED_LINGER = 30.0
#: how much of a refused body is read and dropped before the connection is closed
DRAIN_REFUSED = 64 * 1024 * 1024


@dataclass(frozen=True)
class EarlyAnswer:
    """An answer the router gives instead of a sink: sent before the body, which is read and dropped
    as a refused one's is."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, error: GridnodeError) -> EarlyAnswer:
        retry_after = getattr(error, "retry_after", None)
        headers = (("Retry-After", str(int(retry_after))),) if retry_after is not None else ()
        return cls(error.status, json.dumps(error.to_json()).encode() + b"\n",
                   (("Content-Type", "application/json"), *headers))


class BodyRouter(Protocol):
    def __call__(self, method: bytes, path: bytes, request: Request, length: int | None) -> Any: ...


class GridRequest(Request):
    """A Request whose body goes where the site's body router says."""

    _log = Logger()
    #: the answer sent before the body (a refusal, or a replay): what is left of the body is dropped
    _refused: EarlyAnswer | None = None
    _dropped = 0
    _splice: BodySplice | None = None
    #: the query string, known before the body (request.args is parsed only after it)
    early_query = b""
    #: the router's `gridnode.idempotency.Claim` for a request with an Idempotency-Key: the resource
    #: that accepts its work writes the key's entry through it
    idempotency: Any = None

    #: the route, while the router waits for the store (the transport reads nothing meanwhile)
    _routing: Deferred[Any] | None = None
    #: body bytes that arrived with the headers of a request whose route is not known yet
    _held: list[bytes]
    #: requestReceived's arguments, when the body ended before its route was known
    _received: tuple[bytes, bytes, bytes] | None = None
    _continue = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
        channel = self._channel()
        # The request line is parsed but not yet set on the request (that
        # happens once the body is in); the channel holds it meanwhile.
        method: bytes = getattr(channel, "_command", b"")
        path, _, self.early_query = getattr(channel, "_path", b"").partition(b"?")
        try:
            sink = channel.site.route_body(method, path, self, length)
        except GridnodeError as e:
            self._refuse(e)
            return
        if isinstance(sink, Deferred):
            self._await_route(sink, length)
            return
        if isinstance(sink, EarlyAnswer):
            self._answer_now(sink)
            return
        self._take(sink, length)

    def _take(self, sink: Any, length: int | None) -> None:
        """Send the body to ``sink`` (None: a small body in memory)."""
        channel = self._channel()
        if sink is not None:
            self.content = sink
            # Read uploads in 512 KiB pieces instead of Twisted's 64 KiB: an eighth of the
            # per-chunk work (parse, write) for the same bytes; larger pieces fall out of L2.
            transport = getattr(channel, "transport", None)
            if transport is not None and hasattr(transport, "bufferSize"):
                transport.bufferSize = UPLOAD_READ_SIZE
            if can_splice(channel, sink, length):
                # once the part of the body that came with the headers went the usual way
                self._splice = BodySplice(channel.site.reactor, channel, sink, refuse=self._refuse_midway)
                channel.site.reactor.callLater(0, self._splice.start)
            return
        if length is not None and length > SMALL_BODY:
            self._refuse(GridnodeError(f"a body of more than {SMALL_BODY} bytes is not accepted here",
                                       code="too_large", status=413))
            return
        self.content = _CappedBuffer(SMALL_BODY)

    def _await_route(self, route: Deferred[Any], length: int | None) -> None:
        """Read nothing of the body until ``route`` names its sink. Only what came with the headers
        (one read at most) is held in memory; a client that asked for "100 Continue" is told to
        send its body once it has somewhere to go, and not at all if it is refused."""
        channel = self._channel()
        self._routing, self._held = route, []
        expect = self.requestHeaders.getRawHeaders(b"expect") or [b""]
        self._continue = expect[0].lower() == b"100-continue" and getattr(channel, "_version", b"") == b"HTTP/1.1"
        self.requestHeaders.removeHeader(b"expect")  # or the channel says "100 Continue" right away
        channel.transport.pauseProducing()
        route.addCallbacks(lambda sink: self._routed(sink, length), self._route_refused)

    def _routed(self, sink: Any, length: int | None) -> None:
        self._routing = None
        if self._disconnected:
            getattr(sink, "abort", lambda: None)()  # the client left meanwhile: the sink gives back its slot
            return
        if isinstance(sink, EarlyAnswer):
            self._settle_early(sink)
            return
        self._take(sink, length)
        held, self._held = self._held, []
        for data in held:
            self.handleContentChunk(data)
        if self._received is not None:
            received, self._received = self._received, None
            self.requestReceived(*received)
            return
        if self._refused is None:
            if self._continue:
                self._channel()._send100Continue()
            self._read_again()

    def _route_refused(self, failure: Failure) -> None:
        self._routing, self._held = None, []
        error = failure.value if isinstance(failure.value, GridnodeError) else None
        if error is None:
            self._log.failure("routing a request body failed", failure)
            error = GridnodeError("the node failed to take this request; try again or another node")
        if self._disconnected:
            return
        self._log.info("refused a request body: {code}", code=error.code)
        self._settle_early(EarlyAnswer.of(error))

    def _settle_early(self, answer: EarlyAnswer) -> None:
        """Answer a request whose route was awaited without its body."""
        self._routing, self._held = None, []
        self._answer_now(answer)
        if self._received is not None:
            received, self._received = self._received, None
            self.requestReceived(*received)  # answered early: closes the connection
            return
        self._read_again()  # read and drop what the client still sends, so that it sees the answer

    def _read_again(self) -> None:
        transport = self._channel().transport
        if not transport.disconnecting:
            transport.resumeProducing()

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        if self._routing is not None:
            self._held.append(data)
            self._channel().transport.pauseProducing()  # again, should anything have resumed it
            return
        if self._refused is not None:
            self._dropped += len(data)
            if self._dropped > DRAIN_REFUSED:
                self._channel().transport.loseConnection()
            return
        content: Any = self.content
        try:
            content.write(data)
        except GridnodeError as e:
            self._refuse_midway(e)

    def _refuse_midway(self, error: GridnodeError) -> None:
        """The sink refused the body as it arrived (over its limit, the disk below --min-free)."""
        self._channel().site.on_refused(error)
        self._refuse(error)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if self._refused is not None:
            self._channel().transport.loseConnection()
            return
        if self._routing is not None:
            self._received = (command, path, version)  # processed once the route is known
            return
        super().requestReceived(command, path, version)

    _body_done = False

    def render(self, resrc: Any) -> None:
        # a method the resource does not take is a coded 405, not twisted.web's HTML 405 or 501
        super().render(MethodChecked(resrc))

    def _channel(self) -> Any:
        # Twisted's stubs type channel.site/transport loosely; they are always set here.
        return self.channel

    def process(self) -> None:
        self._body_done = True
        super().process()

    _linger: Any = None

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._splice is not None:
            self._splice.stop()
        # A body cut off mid-way: the sink decides what is kept (nothing for a
        # plain upload; the bytes so far for a resumable one).
        if not self._body_done:
            abort = getattr(self.content, "abort", None)
            if abort is not None:
                abort()
        super().connectionLost(reason)

    def _refuse(self, error: GridnodeError) -> None:
        """Answer the coded error now, before (or instead of) reading the body, and close after."""
        self._answer_now(EarlyAnswer.of(error))
        self._log.info("refused a request body: {code}", code=error.code)

    def _answer_now(self, answer: EarlyAnswer) -> None:
        """Send ``answer`` before (or instead of) reading the body, and close after."""
        self._refused = answer
        abort = getattr(self.content, "abort", None)
        if abort is not None:
            abort()
        self.content = io.BytesIO()
        # No "100 Continue" for a request answered already: the client keeps its body.
        self.requestHeaders.removeHeader(b"expect")
        try:
            reason = HTTPStatus(answer.status).phrase
        except ValueError:
            reason = "Error"
        head = [f"HTTP/1.1 {answer.status} {reason}", *(f"{name}: {value}" for name, value in answer.headers),
                f"Content-Length: {len(answer.body)}", "Connection: close"]
        for name, value in self._channel().site.extra_headers(self):
            head.append(f"{name}: {value}")
        self._channel().transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + answer.body)
        transport = self._channel().transport
        # Half-close: the client reads our answer to its end while we go on reading (and
        # dropping) what it still sends. Closing outright with its body unread would reset
        # the connection, and a client busy sending would never see the answer.
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
        reactor = getattr(self._channel().site, "reactor", None)
        if reactor is not None:
            self._linger = reactor.callLater(REFUSED_LINGER, transport.abortConnection)


class _CappedBuffer(io.BytesIO):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, data: Any) -> int:
        if self.tell() + len(data) > self.cap:
            raise GridnodeError(f"a body of more than {self.cap} bytes is not accepted here",
                                code="too_large", status=413)
        return super().write(data)


class GridSite(Site):
    """A Site that routes bodies and never parses form submissions in memory."""

    requestFactory = GridRequest

    def __init__(self, resource: Any, reactor: Any, route_body: BodyRouter,
                 extra_headers: Callable[[Request], list[tuple[str, str]]] = lambda request: [],
                 on_refused: Callable[[GridnodeError], None] = lambda error: None) -> None:
        # The access log never shows a ?token= value.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False, logFormatter=redacted_log_line)
        self.route_body = route_body
        self.extra_headers = extra_headers
        #: told of bodies refused mid-stream (admission refusals are the router's to count)
        self.on_refused = on_refused
        self.started = time.time()
