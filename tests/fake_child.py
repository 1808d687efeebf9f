"""
Stand-ins for a child process, for the unit tests of ``gridnode.media.child`` and the
ffmpeg and ffprobe protocols built on it: a process transport, the group-signal
function, the ways a process ends and a reactor that spawns nothing. No process is
started.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError

PID = 4242


class FakeTransport:
    """What a ProcessProtocol sees of its process; ``pid`` None once it is reaped."""

    def __init__(self, pid: int = PID) -> None:
        self.pid: int | None = pid
        self.signals: list[str] = []
        self.stdin_closed = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(name)


class FakeGroups:
    """``os.killpg`` that records (pgid, signal); with ``exists`` False there is no group."""

    def __init__(self, exists: bool = True) -> None:
        self.exists = exists
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        if not self.exists:
            raise ProcessLookupError()
        self.sent.append((pid, sig))


class ChildRun:
    """A child protocol on a `FakeTransport`, its result collected: what the tests of every
    `ChildProcess` (ffmpeg's, ffprobe's, the base's own) drive it with."""

    transport: FakeTransport
    results: list[Any]

    def attach(self, child: Any, start: bool = True) -> None:
        self._child = child
        self.transport = FakeTransport()
        self.results = []
        child.deferred.addBoth(self.results.append)
        if start:
            child.makeConnection(self.transport)

    def end(self, reason: Failure) -> None:
        self.transport.pid = None
        self._child.processEnded(reason)

    def error(self) -> GridnodeError:
        assert len(self.results) == 1 and isinstance(self.results[0], Failure)
        value = self.results[0].value
        assert isinstance(value, GridnodeError)
        return value


def exited(code: int | None = 0, sig: int | None = None) -> Failure:
    """The reason ``processEnded`` gets: exit status ``code``, or killed by ``sig``."""
    if code == 0 and sig is None:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(exitCode=code, signal=sig))


class FakeProcessReactor(MemoryReactorClock):
    """A clock whose ``spawnProcess`` records what it was asked to start and connects the
    protocol to a ``FakeTransport``, as the real reactor connects it to the process."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[str, list[str], Any]] = []
        self.protocols: list[Any] = []

    def spawnProcess(self, processProtocol: Any, executable: str, args: Any = (), env: Any = None,
                     **kwargs: Any) -> FakeTransport:
        self.spawned.append((executable, list(args), env))
        self.protocols.append(processProtocol)
        transport = FakeTransport()
        processProtocol.makeConnection(transport)
        return transport
