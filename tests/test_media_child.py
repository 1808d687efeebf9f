"""
The process discipline every child shares (``gridnode.media.child``), on ``task.Clock``
and a fake transport: optional limits, the first stop wins, the one result, the
fallbacks when the group cannot be signalled, and how ``spawn_child`` starts a child.
The ffmpeg and ffprobe protocols built on it are tested in their own modules.
"""

from __future__ import annotations

import errno
import signal
from typing import Any

from twisted.internet import task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.child import ChildProcess, Timeouts, spawn_child
from tests.fake_child import PID, ChildRun, FakeGroups, FakeProcessReactor, exited


class Collect(ChildProcess[bytes]):
    """The least a child says: its stdout is the result, its limits say which one fired."""

    def __init__(self, clock: Any, timeouts: Timeouts, killpg: Any) -> None:
        super().__init__(clock, timeouts=timeouts, killpg=killpg, label="collect")
        self.out = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def outcome(self, reason: Failure) -> bytes | Failure:
        return self.out if reason.check(ProcessDone) else reason

    def timeout_error(self, idle: bool) -> GridnodeError:
        return GridnodeError("idle" if idle else "too long", code="timeout", status=504)


class Run(ChildRun):
    def __init__(self, timeouts: Timeouts = Timeouts(idle=5, max_time=20, kill_grace=3, backup=7),
                 groups: FakeGroups | None = None, start: bool = True) -> None:
        self.clock = task.Clock()
        self.groups = groups or FakeGroups()
        self.child = Collect(self.clock, timeouts, self.groups)
        self.attach(self.child, start)


class ChildProcessTests:
    def test_result_is_what_the_subclass_makes_of_the_end(self) -> None:
        """stdin is closed at the start; stdout reaches outReceived; the end gives outcome's
        value, once, with no timer left."""
        run = Run()
        assert run.transport.stdin_closed and run.child.pid == PID
        run.child.childDataReceived(1, b"{}")
        run.clock.advance(2)
        assert run.child.elapsed == 2
        run.end(exited(0))
        assert run.results == [b"{}"]
        assert run.clock.getDelayedCalls() == []
        run.end(exited(0))
        assert run.results == [b"{}"]

    def test_a_failed_end_is_the_subclass_failure(self) -> None:
        """A non-zero exit gives whatever Failure outcome returns; what the child left in its
        group is swept (SIGKILL), as after any end."""
        run = Run()
        run.end(exited(1))
        assert len(run.results) == 1 and run.results[0].check(ProcessTerminated)
        assert run.groups.sent == [(PID, signal.SIGKILL)]

    def test_no_limits_no_timers(self) -> None:
        """idle and max_time None: nothing is scheduled and silence for an hour stops nothing."""
        run = Run(Timeouts(idle=None, max_time=None))
        assert run.clock.getDelayedCalls() == []
        run.clock.advance(3600)
        assert run.groups.sent == [] and run.results == []

    def test_idle_and_total_limits_say_which(self) -> None:
        """Silence past `idle` stops with timeout_error(idle=True); output that keeps coming
        past `max_time` stops with timeout_error(idle=False)."""
        quiet = Run()
        quiet.clock.advance(5)
        quiet.end(exited(None, signal.SIGTERM))
        assert quiet.error().message == "idle"
        busy = Run()
        for _ in range(20):
            busy.clock.advance(1)
            busy.child.childDataReceived(2, b"x")
        assert busy.groups.sent == [(PID, signal.SIGTERM)]
        busy.end(exited(None, signal.SIGTERM))
        assert busy.error().message == "too long"

    def test_first_stop_wins(self) -> None:
        """A second stop (or a limit firing after a stop) changes neither the error nor the signals."""
        run = Run()
        run.child.stop(GridnodeError("first", code="cancelled", status=409))
        run.child.stop(GridnodeError("second", code="timeout", status=504))
        assert run.child.stopping
        run.clock.advance(2)
        assert run.groups.sent == [(PID, signal.SIGTERM)]
        run.end(exited(None, signal.SIGTERM))
        assert run.error().message == "first"

    def test_stop_at_once_is_sigkill_now(self) -> None:
        """at_once (a node stopping at once): SIGKILL at the stop, no SIGTERM, no grace; the end
        fails with the stop's error."""
        run = Run()
        run.child.stop(GridnodeError("now", code="cancelled", status=409), at_once=True)
        assert run.groups.sent == [(PID, signal.SIGKILL)]
        run.clock.advance(3)
        assert run.groups.sent == [(PID, signal.SIGKILL)]
        run.end(exited(None, signal.SIGKILL))
        assert run.error().message == "now" and run.clock.getDelayedCalls() == []

    def test_stop_after_the_end_does_nothing(self) -> None:
        """Once the result is out (the group swept at the end), a stop sends no signal and starts
        no timer."""
        run = Run()
        run.end(exited(0))
        run.child.stop(GridnodeError("late", code="cancelled", status=409))
        assert run.groups.sent == [(PID, signal.SIGKILL)] and run.clock.getDelayedCalls() == []
        assert run.results == [b""]

    def test_stop_before_the_start_fails_at_once(self) -> None:
        """A child stopped before it was connected has nothing to wait for: the error comes
        at once, with no signal."""
        run = Run(start=False)
        run.child.stop(GridnodeError("never ran", code="cancelled", status=409))
        assert run.error().message == "never ran"
        assert run.groups.sent == [] and run.clock.getDelayedCalls() == []

    def test_backup_timer(self) -> None:
        """SIGTERM, SIGKILL after the grace, and the error after the backup time even though
        the process never reports its end; a late end changes nothing."""
        run = Run()
        run.child.stop(GridnodeError("stuck", code="cancelled", status=409))
        run.clock.advance(3)
        assert run.groups.sent == [(PID, signal.SIGTERM), (PID, signal.SIGKILL)]
        run.clock.advance(6.9)
        assert run.results == []
        run.clock.advance(0.1)
        assert run.error().message == "stuck"
        run.end(exited(None, signal.SIGKILL))
        assert len(run.results) == 1

    def test_group_not_permitted_falls_back_to_the_child(self) -> None:
        """A group the node may not signal: the child itself gets TERM, then KILL."""
        class Refused(FakeGroups):
            def __call__(self, pid: int, sig: int) -> None:
                raise PermissionError()

        run = Run(groups=Refused())
        run.child.stop(GridnodeError("stop", code="cancelled", status=409))
        run.clock.advance(3)
        assert run.transport.signals == ["TERM", "KILL"]


class SpawnChildTests:
    def test_starts_argv_and_makes_the_group(self) -> None:
        """The argv is started as given (executable first, the env passed on), the protocol is
        connected, and the parent makes the child's process group too."""
        reactor = FakeProcessReactor()
        child = Collect(reactor, Timeouts(), FakeGroups())
        groups: list[tuple[int, int]] = []
        spawn_child(reactor, child, ("/usr/bin/python3", "-c", "pass"), env={"A": "1"},
                    setpgid=lambda pid, pgid: groups.append((pid, pgid)))
        assert reactor.spawned == [("/usr/bin/python3", ["/usr/bin/python3", "-c", "pass"], {"A": "1"})]
        assert child.pid == PID and groups == [(PID, PID)]

    def test_child_already_execd(self) -> None:
        """EACCES from setpgid (the child exec'd first, after making its group) is no error."""
        def refuse(pid: int, pgid: int) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        reactor = FakeProcessReactor()
        child = Collect(reactor, Timeouts(), FakeGroups())
        spawn_child(reactor, child, ["/bin/true"], env=None, setpgid=refuse)
        assert child.pid == PID and not child.stopping
