"""
How the node runs a child (ffmpeg, ffprobe): buildbot-worker's habits, in one place.

- ``spawn_child`` starts an argv made by ``sandbox.sandboxed_argv``, with an environment
  of its own (``sandbox.child_env``: never the node's credentials): the wrapper makes the
  child the leader of a process group of its own, in the node's session, and the parent
  makes the same group too, so it exists as soon as ``spawn_child`` returns.
- ``ChildProcess`` is the ProcessProtocol both children share. It enforces an
  idle-output timeout and a maximum total time (each optional) and stops the child
  with SIGTERM to its whole process group, then SIGKILL after a grace period; a backup
  timer fires the result even if the process never reports its end. Whichever way the
  child ends, what is left in its group gets SIGKILL (a box ends everything else: its pid
  namespace). ``deferred`` fires exactly once, and only once the child is gone (or the
  backup timer gave up on it), so a caller may remove the child's scratch folder then.

A subclass keeps only its own parsing: ``outReceived``/``errReceived`` for what the
child writes, ``outcome`` for what the child's own end means, ``timeout_error`` for
what a stop by a time limit says. The clock and the signal function are injected, so
all of it is tested with ``task.Clock`` and a fake transport, without processes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.sandbox import child_env

T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    """Seconds; ``idle`` or ``max_time`` None: no such limit (``FfmpegProcess`` reads a
    ``max_time`` of None as ``max_time_for(duration)``)."""

    idle: float | None = 120.0
    max_time: float | None = None
    kill_grace: float = 5.0  # SIGTERM -> SIGKILL
    backup: float = 10.0  # after SIGKILL, give up waiting for the process to end


class ChildProcess(ProcessProtocol, Generic[T]):
    """One child, a process-group leader. ``stop(error)`` ends it; ``deferred`` tells how it ended."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        timeouts: Timeouts = Timeouts(),
        killpg: Callable[[int, int], None] = os.killpg,
        label: str = "child",
    ) -> None:
        self.deferred: Deferred[T] = Deferred()
        self.pid: int | None = None  # also the process group id
        self.label = label
        self.timeouts = timeouts
        self._clock = clock
        self._killpg = killpg
        self._started = clock.seconds()
        self._stopping: GridnodeError | None = None
        self._done = False
        self._idle_timer: IDelayedCall | None = None
        self._total_timer: IDelayedCall | None = None
        self._kill_timer: IDelayedCall | None = None
        self._backup_timer: IDelayedCall | None = None

    # -- what a subclass says

    def outcome(self, reason: Failure) -> T | Failure:
        """What the child's own end (not a stop) means: the result, or a Failure."""
        raise NotImplementedError

    def timeout_error(self, idle: bool) -> GridnodeError:
        """Why the child was stopped by the idle-output limit (``idle``) or the total-time limit."""
        raise NotImplementedError

    @property
    def elapsed(self) -> float:
        """Seconds since the child started."""
        return self._clock.seconds() - self._started

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    # -- ProcessProtocol

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self._started = self._clock.seconds()
        if self.timeouts.idle is not None:
            self._idle_timer = self._clock.callLater(self.timeouts.idle, self._timed_out, True)
        if self.timeouts.max_time is not None:
            self._total_timer = self._clock.callLater(self.timeouts.max_time, self._timed_out, False)
        self._log.info("{label} started as pid {pid}", label=self.label, pid=self.pid)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        idle = self.timeouts.idle
        if idle is not None and self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(idle)
        super().childDataReceived(childFD, data)  # to outReceived / errReceived

    def processEnded(self, reason: Failure) -> None:
        if self.pid is not None:
            # The leader is reaped now; sweep any member it left behind (after a normal end
            # too: a child that exits leaves its own children running) before the group id
            # can be handed out again.
            self._signal_group(signal.SIGKILL, fallback=False)
        self._cancel_timers()
        if self._done:
            return
        self._finish(Failure(self._stopping) if self._stopping is not None else self.outcome(reason))

    # -- control

    def stop(self, error: GridnodeError, *, at_once: bool = False) -> None:
        """Stop the child; ``deferred`` fails with ``error`` once it is gone. SIGTERM first, SIGKILL
        after ``kill_grace``; ``at_once``: SIGKILL now. Only the first stop counts."""
        if self._done or self._stopping is not None:
            return
        self._stopping = error
        self._log.info("stopping {label} pid {pid}: {code}", label=self.label, pid=self.pid, code=error.code)
        for timer in (self._idle_timer, self._total_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._total_timer = None
        if self.pid is None:
            # Never started: nothing to wait for.
            self._finish(Failure(error))
            return
        if at_once:
            self._signal_group(signal.SIGKILL)
            self._backup_timer = self._clock.callLater(self.timeouts.backup, self._give_up)
            return
        self._signal_group(signal.SIGTERM)
        self._kill_timer = self._clock.callLater(self.timeouts.kill_grace, self._kill)

    def _timed_out(self, idle: bool) -> None:
        self.stop(self.timeout_error(idle))

    def _kill(self) -> None:
        self._kill_timer = None
        self._log.warn("{label} pid {pid} ignored SIGTERM; sending SIGKILL", label=self.label, pid=self.pid)
        self._signal_group(signal.SIGKILL)
        self._backup_timer = self._clock.callLater(self.timeouts.backup, self._give_up)

    def _give_up(self) -> None:
        # buildbot's backup timer: a child stuck in the kernel may never be
        # reaped; the job must still end.
        self._backup_timer = None
        self._log.error("{label} pid {pid} did not end after SIGKILL; giving up on it", label=self.label,
                        pid=self.pid)
        assert self._stopping is not None
        self._finish(Failure(self._stopping))

    def _signal_group(self, sig: int, fallback: bool = True) -> None:
        transport_pid = getattr(self.transport, "pid", None)
        if self.pid is None:
            return
        try:
            self._killpg(self.pid, sig)
            return
        except ProcessLookupError:
            pass
        except PermissionError:
            self._log.warn("cannot signal process group {pid}", pid=self.pid)
        if fallback and transport_pid is not None and self.transport is not None:
            # No group (the child died before making one): signal the child alone.
            try:
                self.transport.signalProcess("KILL" if sig == signal.SIGKILL else "TERM")
            except (ProcessExitedAlready, OSError):
                pass

    # -- the one end

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._total_timer, self._kill_timer, self._backup_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._total_timer = self._kill_timer = self._backup_timer = None

    def _finish(self, result: T | Failure) -> None:
        if self._done:
            return
        self._done = True
        self._cancel_timers()
        if isinstance(result, Failure):
            self.deferred.errback(result)
        else:
            self.deferred.callback(result)


def spawn_child(
    reactor: IReactorProcess,
    proto: ChildProcess[Any],
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    setpgid: Callable[[int, int], None] = os.setpgid,
) -> None:
    """Start ``argv`` (a list, never a shell; made by ``sandboxed_argv``) with ``proto``, in
    ``env`` (None: ``child_env()``, the allowlist)."""
    transport = reactor.spawnProcess(proto, argv[0], list(argv), env=child_env() if env is None else env)
    if transport.pid is not None:
        # The parent sets the group too, so it exists as soon as spawnProcess
        # returns whichever side runs first (the shells' trick); EACCES means
        # the child already exec'd, after making the group itself.
        try:
            setpgid(transport.pid, transport.pid)
        except OSError:
            pass
