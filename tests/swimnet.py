"""
A simulated network of ``SwimMachine``s (gridnode/membership/swim.py) for the unit tests: every
machine on one virtual clock, each message delivered ``delay`` seconds after it was sent, each
timer run when it is due, a host check answered half a second after it was asked (ten frames
50 ms apart, as ``HostCheck`` sends them). No sockets, no reactor, no sleeps.

The test says what fails, and may change it between runs:

- ``down``: crashed or frozen; receives nothing and runs no timer (what it sent already arrives)
- ``cut``: one-way links (a, b) that lose everything; ``isolated``: nodes cut off both ways
- ``refusing``: its process is gone; a connection to it is refused (``SwimMachine.refused``)
- ``rejected``: one-way links a firewall rejects: refused too
- ``vanished``: its host is gone; a host check of it finds it silent (``host_silent``)

bench/membership_sim.py simulates the same machine at scale (N=1000, loss, jitter, stalls,
checkpoints) on an event heap of its own: its figures come from that model, so it keeps it.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from typing import Any, TypeVar

from gridnode.membership.swim import (
    CheckHost,
    ConfirmedDead,
    MemberChanged,
    Message,
    Output,
    SwimConfig,
    SwimMachine,
)

#: how long after ``CheckHost`` the host check's verdict comes
CHECK_SECONDS = 0.5

T = TypeVar("T")


def address(name: str) -> str:
    return f"{name}:1"


class SwimNet:
    """``n`` machines named ``{prefix}0`` ... ``{prefix}{n-1}`` (or ``names``, at ``addresses``),
    each knowing all the others, started at time 0 without a join (the registry told them of each
    other)."""

    def __init__(self, n: int, *, prefix: str = "n", config: SwimConfig | None = None, seed: int = 1,
                 incarnation: int = 0, delay: float = 0.001, names: list[str] | None = None,
                 addresses: dict[str, str] | None = None) -> None:
        self.now = 0.0
        self.config = config or SwimConfig()
        self.delay = delay
        self.names = list(names) if names is not None else [f"{prefix}{i}" for i in range(n)]
        self.addresses = addresses or {}
        self.machines = {name: SwimMachine(name, self.address(name), config=self.config, incarnation=incarnation,
                                           rng=random.Random(seed * 100 + i)) for i, name in enumerate(self.names)}
        self.down: set[str] = set()
        self.cut: set[tuple[str, str]] = set()
        self.isolated: set[str] = set()
        self.refusing: set[str] = set()
        self.rejected: set[tuple[str, str]] = set()
        self.vanished: set[str] = set()
        #: every output of every machine: (time, the machine's name, output)
        self.log: list[tuple[float, str, Output]] = []
        #: what is due on the wire: (time, order, the machine it is for, a message or an I/O verdict)
        self._wire: list[tuple[float, int, str, Any]] = []
        self._order = 0
        #: each machine's next deadline as of its last call (only a call changes it)
        self._deadlines: dict[str, float] = {}
        for name, machine in self.machines.items():
            self.act(name, machine.add_members([(x, self.address(x)) for x in self.names], 0.0))
        for name, machine in self.machines.items():
            self.act(name, machine.start(0.0, join=False))

    def address(self, name: str) -> str:
        return self.addresses.get(name) or address(name)

    def add(self, name: str, incarnation: int = 0, knows: list[str] | None = None, join: bool = True) -> SwimMachine:
        """A (re)started node that bootstraps from the registry (or knows only ``knows``) and joins
        (``join``: announces itself and syncs at once)."""
        machine = SwimMachine(name, self.address(name), config=self.config, rng=random.Random(7),
                              incarnation=incarnation, now=self.now)
        self.machines[name] = machine
        if name not in self.names:
            self.names.append(name)
        self.down.discard(name)
        known = list(self.machines) if knows is None else knows
        self.act(name, machine.add_members([(x, self.address(x)) for x in known], self.now))
        self.act(name, machine.start(self.now, join=join))
        return machine

    # -- what the machines do

    def act(self, name: str, outputs: list[Output]) -> None:
        """Carry out ``outputs`` of ``name``'s machine (as MembershipService.act does)."""
        machine = self.machines.get(name)
        if machine is not None:
            deadline = machine.next_deadline()
            self._deadlines[name] = math.inf if deadline is None else deadline
        for out in outputs:
            self.log.append((self.now, name, out))
            if isinstance(out, Message):
                self._send(name, out)
            elif isinstance(out, CheckHost):
                self._due(self.now + CHECK_SECONDS, name, out)

    def _send(self, src: str, msg: Message) -> None:
        if msg.dest in self.refusing or (src, msg.dest) in self.rejected:
            self._due(self.now + 2 * self.delay, src, ("refused", msg.dest, msg.dest_addr))
        elif (src, msg.dest) not in self.cut and src not in self.isolated and msg.dest not in self.isolated:
            self._due(self.now + self.delay, msg.dest, msg)

    def _due(self, when: float, name: str, what: Any) -> None:
        self._order += 1
        heapq.heappush(self._wire, (when, self._order, name, what))

    def _arrive(self, name: str, what: Any) -> None:
        machine = self.machines.get(name)
        if machine is None or name in self.down:
            return
        if isinstance(what, Message):
            self.act(name, machine.receive(what, self.now))
        elif isinstance(what, CheckHost):
            if what.member in self.vanished:
                self.act(name, machine.host_silent(what.member, what.address, self.now))
        else:
            _, member, addr = what
            self.act(name, machine.refused(member, addr, self.now))

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass: deliver what is due, then run due timers."""
        end = self.now + seconds
        for name, machine in self.machines.items():  # a test may have called a machine itself
            deadline = machine.next_deadline()
            self._deadlines[name] = math.inf if deadline is None else deadline
        while True:
            down = self.down
            t_timer = min((d for name, d in self._deadlines.items() if name not in down), default=math.inf)
            t_wire = self._wire[0][0] if self._wire else math.inf
            t = min(t_timer, t_wire)
            if t > end:
                self.now = end
                return
            self.now = max(self.now, t)
            if t_wire <= t_timer:
                _, _, name, what = heapq.heappop(self._wire)
                self._arrive(name, what)
            else:
                for name in sorted(n for n, d in self._deadlines.items() if d <= self.now and n not in down):
                    self.act(name, self.machines[name].tick(self.now))

    def until(self, predicate: Callable[[], bool], limit: float) -> float:
        """Run until ``predicate`` holds (at most ``limit`` seconds); returns the seconds it took."""
        start = self.now
        while not predicate():
            assert self.now - start < limit, "not reached in time"
            self.run(0.1)
        return self.now - start

    # -- what the test reads

    def emitted(self, kind: type[T], by: str | None = None) -> list[tuple[float, str, T]]:
        """Every output of type ``kind`` (of ``by``'s machine only, when given): (time, machine, output)."""
        return [(t, name, o) for t, name, o in self.log if isinstance(o, kind) and (by is None or name == by)]

    def sent(self, by: str | None = None) -> list[Message]:
        """Every message sent (by ``by``, when given), delivered or lost."""
        return [m for _, _, m in self.emitted(Message, by)]

    def changes(self, member: str | None = None, state: str | None = None) -> list[tuple[float, str, MemberChanged]]:
        return [(t, obs, e) for t, obs, e in self.emitted(MemberChanged)
                if (member is None or e.member == member) and (state is None or e.state == state)]

    def confirmed(self, member: str | None = None) -> list[tuple[float, str, ConfirmedDead]]:
        return [(t, obs, e) for t, obs, e in self.emitted(ConfirmedDead) if member is None or e.member == member]

    def view(self, observer: str, member: str) -> tuple[str, int] | None:
        """(state, incarnation) of ``member`` as ``observer`` holds it."""
        v = self.machines[observer].member(member)
        return None if v is None else (v.state, v.incarnation)

    def state(self, observer: str, member: str) -> str | None:
        v = self.view(observer, member)
        return None if v is None else v[0]
