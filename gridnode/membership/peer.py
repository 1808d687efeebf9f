"""
One AMP connection between peers, either way. An inbound one hands what it
receives to its `Receiver` (the membership service) and is cut when a sender
streams past ``MAX_UNFRAMED`` bytes without completing a box. A command it does
not know (a later release's) is dropped and counted, the connection kept.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from twisted.protocols import amp

from gridnode.membership import wire

#: bytes an inbound connection may send without completing an AMP box
MAX_UNFRAMED = 256 * 1024


class Receiver(Protocol):
    """Where an inbound connection's messages go."""

    def deliver(self, command: str, values: dict[str, Any]) -> None: ...

    def drop(self, reason: str) -> None: ...

    def inbound_lost(self, proto: PeerProtocol) -> None: ...


class PeerProtocol(amp.AMP):
    """One AMP connection; inbound ones deliver to the service."""

    def __init__(self, service: Receiver | None = None,
                 on_lost: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.service = service
        self.on_lost = on_lost
        self._unframed = 0

    def locateResponder(self, name: bytes) -> Any:  # noqa: N802 - AMP's name
        command = name.decode("ascii", "replace")
        if self.service is not None and (command in wire.COMMANDS or command in wire.NOTES):
            return lambda box: self._deliver(command, box)
        found = super().locateResponder(name)
        if found is None and self.service is not None:
            return self._unknown
        return found

    @wire.Version.responder
    def version(self) -> dict[str, int]:
        return {"version": wire.VERSION}

    def _unknown(self, box: amp.AmpBox) -> amp.AmpBox:
        assert self.service is not None
        self.service.drop("unknown_command")
        return amp.AmpBox()  # the answer to one that asks for one: empty

    def _deliver(self, command: str, box: amp.AmpBox) -> Any:
        assert self.service is not None
        try:
            values = (wire.COMMANDS.get(command) or wire.NOTES[command]).parseArguments(box, self)
        except Exception:  # noqa: BLE001 - a malformed box is the sender's problem, counted
            self.service.drop("malformed")
            return None
        self.service.deliver(command, values)
        return None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        self._unframed += len(data)
        if self._unframed > MAX_UNFRAMED and self.service is not None:
            self.service.drop("oversized")
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().dataReceived(data)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:  # noqa: N802 - AMP's name
        self._unframed = 0
        super().ampBoxReceived(box)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted's name
        if self.service is not None:
            self.service.inbound_lost(self)
        if self.on_lost is not None:
            self.on_lost()
        super().connectionLost(reason)

    def unhandledError(self, failure: Any) -> None:  # noqa: N802 - AMP's name
        if self.service is not None:
            self.service.drop("protocol_error")
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


def keep_alive(sock: Any, idle: int = 60) -> None:
    """Keepalives on an idle standing connection: firewalls keep its state, and a connection that
    died unseen is noticed (and remade) within minutes, not at the next host check."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle // 4)
