"""
Ports and waits for tests and benchmarks that run real servers (bench/_nodes.py imports this
module too).

Two kinds of wait: ``poll`` blocks (plain tests, benchmarks, scripts: nothing else runs meanwhile);
``wait_for`` and ``sleep`` give Deferreds on a reactor (the reactor tests of pytest-twisted, where
the reactor must keep running while we wait). The reactor is imported only when one of those runs.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater


def free_port() -> int:
    """A loopback TCP port that is free just now, for a server to listen on.

    Drawn below the kernel's ephemeral range (32768 and up on Linux), so that no outgoing
    connection of this or another test can take it between now and the server's bind, nor while
    a killed node is restarted on it; each process draws from its own stride, and never hands out
    a port twice."""
    for _ in _PORTS:
        port = _PORTS.start + (next(_draws) * 7919 + os.getpid() * 101) % len(_PORTS)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port left in {_PORTS}")


_PORTS = range(20000, 32000)
_draws = itertools.count()
_given: set[int] = set()


def closed_port() -> int:
    """A loopback TCP port that nothing listens on (bound, then released): a connection is refused."""
    return free_port()


def poll(predicate: Callable[[], Any], timeout: float, what: str = "condition", interval: float = 0.1) -> Any:
    """Block until ``predicate()`` is truthy (OSError counts as not yet); returns its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached within {timeout}s (last: {last!r})")


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor


def sleep(seconds: float, reactor: Any = None) -> Deferred[None]:
    """Fires after ``seconds`` on ``reactor`` (the global one by default)."""
    return deferLater(_reactor(reactor), seconds, lambda: None)


@inlineCallbacks
def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, *, interval: float = 0.1,
             reactor: Any = None) -> Any:
    """Poll ``predicate`` every ``interval`` seconds on ``reactor`` (the global one by default) until
    it is true; fires with the seconds it took. A predicate that raises OSError or AssertionError
    (a node not answering yet) counts as false."""
    reactor = _reactor(reactor)
    start = reactor.seconds()
    while True:
        try:
            if predicate():
                return reactor.seconds() - start
        except (OSError, AssertionError):
            pass
        if reactor.seconds() - start >= timeout:
            raise AssertionError(f"condition not reached within {timeout}s")
        yield sleep(interval, reactor)
