"""
Asking a peer's kernel whether its host is still there (``SwimMachine``'s ``CheckHost``).

A member whose reactor is stalled and a member whose host vanished are both
silent. Their kernels are not: a stalled process's kernel still acknowledges
TCP segments, a vanished host's does not. ``HostCheck`` sends a few small
frames over a connection made before the trouble (a standing connection: a new
one to a vanished host never completes) and then reads the socket's ``TCP_INFO``:
segments unacknowledged and no acknowledgement since the first frame means
silence. Loss alone makes that unlikely: every frame, its retransmissions and
every acknowledgement would have to be lost.

The frames are AMP ``Version`` calls, which every peer already answers; their
answers, whenever they come, are not waited for.

Linux only (``TCP_INFO``); elsewhere a check proves nothing and the member is
judged by the protocol's timeouts alone.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.defer import Deferred

from gridnode.membership import wire

# struct tcp_info (linux/tcp.h): 8 one-byte fields, then u32s: rto, ato, snd_mss, rcv_mss,
# unacked, sacked, lost, retrans, fackets, last_data_sent, last_ack_sent, last_data_recv,
# last_ack_recv (ms)
_U32 = struct.Struct("=I")
_UNACKED_AT = 8 + 4 * 4
_LAST_ACK_RECV_AT = 8 + 4 * 12
_TCP_INFO_LEN = 8 + 4 * 13


def tcp_acks(sock: socket.socket) -> tuple[int, float] | None:
    """(segments unacknowledged, seconds since the last acknowledgement); None without TCP_INFO."""
    option = getattr(socket, "TCP_INFO", None)
    if option is None or not hasattr(sock, "getsockopt"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, 104)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    (unacked,) = _U32.unpack_from(raw, _UNACKED_AT)
    (last_ack_ms,) = _U32.unpack_from(raw, _LAST_ACK_RECV_AT)
    return unacked, last_ack_ms / 1000.0


class HostCheck:
    """One check over one connection. ``run()`` fires with True (silent: no acknowledgement of our
    frames), False (the host acknowledged) or None (void: the connection was lost, our own frames
    went out late because our reactor stalled, or the platform has no TCP_INFO)."""

    def __init__(self, reactor: Any, proto: Any, frames: int = 10, gap: float = 0.05) -> None:
        self.reactor = reactor
        self.proto = proto
        self.frames = frames
        self.gap = gap
        self._sent: list[float] = []
        self._done: Deferred[bool | None] = Deferred()

    def run(self) -> Deferred[bool | None]:
        self._frame()
        return self._done

    def _frame(self) -> None:
        transport = self.proto.transport
        if transport is None or not transport.connected:
            self._done.callback(None)
            return
        self._sent.append(self.reactor.seconds())
        # the answer does not matter (a stalled peer answers late); lost with the connection
        self.proto.callRemote(wire.Version).addErrback(lambda f: None)
        if len(self._sent) < self.frames:
            self.reactor.callLater(self.gap, self._frame)
        else:
            self.reactor.callLater(self.gap, self._judge)

    def _judge(self) -> None:
        self._done.callback(self.verdict())

    def verdict(self) -> bool | None:
        transport = self.proto.transport
        if transport is None or not transport.connected:
            return None
        now = self.reactor.seconds()
        steps = [b - a for a, b in zip(self._sent, self._sent[1:], strict=False)]
        if any(step > 4 * self.gap for step in steps) or now - self._sent[-1] > 4 * self.gap:
            return None  # our reactor stalled: the frames did not go out as planned
        acks = tcp_acks(transport.getHandle())
        if acks is None:
            return None
        unacked, since_ack = acks
        # nothing acknowledged since (about) the first frame went out
        return unacked > 0 and since_ack >= 0.8 * (now - self._sent[0])
