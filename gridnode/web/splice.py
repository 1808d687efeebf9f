"""
The rest of a long upload body moved from the socket to its spool file
inside the kernel, never through Python: splice(2), socket -> pipe -> file.

On loopback, a Python receive loop (recv, then write) copies every byte
twice through user space and is what limits the upload rate; splice moves
page references instead (bench/pipeline.py, ingest).

twisted.web reads the headers and whatever part of the body came with them,
as usual. Then, for a plain TCP connection with a declared Content-Length,
``BodySplice`` stops the transport's reading and reads a duplicate of its
socket itself. It leaves the last byte of the body to twisted.web, so the
request ends by Twisted's own code path, and it keeps the HTTP channel's
count of the bytes still expected (its identity transfer decoder's
``contentLength``) true as it goes. That count is twisted.web's private
state: where it is not found as expected, nothing is spliced and the body
is read the usual way.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger

from gridnode.errors import GridnodeError

#: bodies shorter than this are read the usual way: setting up costs more than it saves
MIN_BODY = 4 * 1024 * 1024
#: the pipe between socket and file (Linux caps unprivileged pipes at 1 MiB by default)
PIPE_SIZE = 1024 * 1024
#: at most this much per wake-up, so that other connections get their turn
PER_READ = 4 * 1024 * 1024
_F_SETPIPE_SZ = 1031


def _decoder(channel: Any) -> Any:
    """The channel's identity transfer decoder, or None where it is not what we know."""
    decoder = getattr(channel, "_transferDecoder", None)
    if type(decoder).__name__ != "_IdentityTransferDecoder" or not isinstance(
            getattr(decoder, "contentLength", None), int):
        return None
    return decoder


def can_splice(channel: Any, sink: Any, length: int | None) -> bool:
    """Whether this request's body may be spliced: Linux, plain TCP (not TLS), a declared
    length of at least ``MIN_BODY``, a sink whose digest is read back from the file."""
    return (hasattr(os, "splice") and length is not None and length >= MIN_BODY
            and type(getattr(channel, "transport", None)) is tcp.Server
            and getattr(sink, "grows_in_place", False) and _decoder(channel) is not None)


class BodySplice:
    """Moves the rest of one request body into ``sink``; an IReadDescriptor of its own. A refusal
    of the sink's (the disk below ``--min-free``) goes to ``refuse``, and the rest of the body
    back to twisted.web, which drops it."""

    _log = Logger()

    def __init__(self, reactor: Any, channel: Any, sink: Any,
                 refuse: Callable[[GridnodeError], None] = lambda error: None) -> None:
        self.reactor = reactor
        self.channel = channel
        self.transport = channel.transport
        self.sink = sink
        self.refuse = refuse
        #: this request's decoder: the channel's next request brings another
        self.decoder = _decoder(channel)
        self.fd = -1
        self._pipe: tuple[int, int] | None = None

    def _current(self) -> Any:
        """The decoder, while the channel is still reading this request's body."""
        decoder = _decoder(self.channel)
        return decoder if decoder is not None and decoder is self.decoder else None

    def start(self) -> None:
        """Call once the part of the body that came with the headers went the usual way."""
        decoder = self._current()
        if decoder is None or decoder.contentLength < MIN_BODY or self.transport.disconnected:
            return  # the body is (nearly) all in already, or the connection is gone
        try:
            read, write = os.pipe2(os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: the usual way
        try:
            # A duplicate descriptor: the reactor knows the transport by the original one (and
            # may still be watching it for writing, e.g. for "100 Continue").
            self.fd = os.dup(self.transport.fileno())
        except OSError:
            os.close(read)
            os.close(write)
            return
        self._pipe = (read, write)
        try:
            fcntl.fcntl(write, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # a smaller pipe still works
        self.transport.stopReading()
        self.reactor.addReader(self)

    # -- IReadDescriptor

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "BodySplice"

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        decoder = self._current()
        if decoder is None or self._pipe is None:
            self.stop()
            return
        read, write = self._pipe
        budget, closed = PER_READ, False
        try:
            # The last byte is left to twisted.web: it ends the request its own way.
            while budget > 0 and decoder.contentLength > 1:
                try:
                    n = os.splice(self.fd, write, min(PIPE_SIZE, budget, decoder.contentLength - 1),
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    break
                if n == 0:
                    closed = True  # the transport finds out once it reads again
                    break
                done = 0
                while done < n:
                    done += os.splice(read, self.sink.file.fileno(), n - done, flags=os.SPLICE_F_MOVE)
                decoder.contentLength -= n
                budget -= n
                self.sink.grew(n)
        except GridnodeError as e:
            self.stop()
            self.refuse(e)
            return
        except (OSError, ValueError) as e:  # ValueError: the spool file was closed meanwhile
            if getattr(e, "errno", None) not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                self._log.failure("moving an upload body to {path} failed", path=self.sink.path)
            self.stop()
            self.transport.abortConnection()
            return
        self.channel.resetTimeout()  # what dataReceived does for every read it makes
        if closed or decoder.contentLength <= 1:
            self.stop()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted's name
        self.stop()

    def stop(self) -> None:
        """Hand the socket back to the transport (which then reads the last byte, or the end).
        The request calls it when its connection is lost: the duplicate descriptor would keep
        the socket open after the transport closed its own."""
        if self.fd < 0:
            return
        self.reactor.removeReader(self)
        os.close(self.fd)  # after removeReader: epoll forgets a descriptor only when told
        self.fd = -1
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)
            self._pipe = None
        if not self.transport.disconnected:
            self.transport.startReading()
