"""
Twisted endpoint strings as the node's settings name them (``tcp:8080:interface=127.0.0.1``,
``ssl:...``, ``unix:...``): what they listen on, their port and scheme, and the backlog and node
id the node derives from them. Plain functions, no I/O but the host name.
"""

from __future__ import annotations

import re
import socket


def is_loopback(endpoint: str) -> bool:
    """Does this endpoint listen on loopback only?"""
    if not endpoint.startswith(("tcp:", "tcp6:", "ssl:")):
        return endpoint.startswith("unix:")
    interface = endpoint_interface(endpoint)
    return interface is not None and (interface.startswith("127.") or interface in ("::1", "localhost"))


#: the HTTP accept queue. Twisted's default, 50, overflows under a burst of clients (200 at once
#: in tests/test_load.py), and clients whose connection overflowed it were reset.
HTTP_BACKLOG = 1024


def with_backlog(endpoint: str, backlog: int = HTTP_BACKLOG) -> str:
    """``endpoint`` with ``backlog=`` added when it is a TCP or TLS endpoint string that sets none."""
    if endpoint.split(":", 1)[0] in ("tcp", "tcp6", "ssl") and not re.search(r"(^|:)backlog=", endpoint):
        return f"{endpoint}:backlog={backlog}"
    return endpoint


def endpoint_port(endpoint: str) -> int | None:
    """The port of a ``tcp:PORT:...`` endpoint string, if it has one."""
    parts = endpoint.split(":")
    for part in parts[1:]:
        if part.isascii() and part.isdigit():
            return int(part)
        if part.startswith("port="):
            return int(part[5:]) if part[5:].isascii() and part[5:].isdigit() else None
    return None


def endpoint_scheme(endpoint: str) -> str:
    """The URL scheme clients use to reach an HTTP endpoint: TLS endpoints serve ``https``."""
    return "https" if endpoint.split(":", 1)[0] == "ssl" else "http"


def endpoint_interface(endpoint: str) -> str | None:
    for part in endpoint.split(":")[1:]:
        if part.startswith("interface="):
            return part[len("interface="):]
    return None


def default_node_id(http_endpoint: str) -> str:
    """HOSTNAME-HTTPPORT, made safe to stand in a key."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "node"
    port = endpoint_port(http_endpoint)
    node = f"{host[:50]}-{port}" if port is not None else host[:60]
    return node
