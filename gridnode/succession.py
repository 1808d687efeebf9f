"""
Who acts on a member's death or departure, and when: one actor per event.

Every node hears of a confirmed death (or a leave) within moments, and every
one of them acting on it (a GET and a conditional DELETE of the registry
record, a listing and reads of the jobs) multiplied one event by the pool's
size. Only the dead member's watchers act (gridnode/membership/swim.py: the
live members before it on the hash ring, as each node sees the ring), in ring
order: the first at once, the others each a jittered `STANDBY` later per rank,
taking over only what is left by then. What is left is what the first did
not finish: the record still there (a GET answers 404 otherwise) and jobs
still marked under the member (an empty LIST otherwise); every claim is a
conditional write, so a standby that acts while the first is still at work
wins nothing twice.

`Succession` decides (no I/O, an injected random source); `Successor` runs the
decision on a reactor's timers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

#: seconds between the watchers' turns (rank 1 waits 1 to 1.5 x this, rank 2 twice that)
STANDBY = 5.0


def is_gone(state: str | None, confirmed_dead: bool, listed: bool | None) -> bool:
    """Whether a job's owner is gone, from what the membership holds of it (``state``: alive,
    suspect, dead, left; None: unknown) and whether the registry lists a fresh record of it
    (None: the registry has not been read yet). A member held alive or suspect is never gone, so a
    store that is frozen or throttles (registry records going stale) makes no one look gone."""
    if state is not None:
        return state == "left" or (state == "dead" and confirmed_dead)
    return listed is False


class Succession:
    """Whether this node acts on ``member``'s death or leave, and after how many seconds: the
    member's watchers in ring order (``watchers_of``, first first), rank r after r to r + 0.5 x
    ``standby``; not a watcher, never."""

    def __init__(self, me: str, watchers_of: Callable[[str], list[str]], *, standby: float = STANDBY,
                 rng: random.Random | None = None) -> None:
        self.me = me
        self.watchers_of = watchers_of
        self.standby = standby
        self.rng = rng or random.Random()

    def rank(self, member: str) -> int | None:
        """Our place among ``member``'s watchers (0: the first), None when we are not one."""
        watchers = [w for w in self.watchers_of(member) if w != member]
        return watchers.index(self.me) if self.me in watchers else None

    def wait(self, member: str) -> float | None:
        """Seconds before we act on ``member``'s event; None: not ours to act on."""
        rank = self.rank(member)
        if rank is None:
            return None
        return 0.0 if rank == 0 else self.standby * (rank + 0.5 * self.rng.random())


class Successor:
    """Acts on the deaths and leaves `Succession` gives this node, each after its wait. ``act(member,
    incarnation)`` does the work (incarnation None for a leave: the member deleted its own record)
    and must be safe to repeat: a standby runs it again to finish what the first did not."""

    _log = Logger()

    def __init__(self, reactor: Any, succession: Succession,
                 act: Callable[[str, int | None], Deferred[Any]]) -> None:
        self.reactor = reactor
        self.succession = succession
        self.act = act
        #: events waiting for our turn, by member
        self.pending: dict[str, Any] = {}

    def dead(self, member: str, incarnation: int) -> Deferred[Any]:
        """``member`` was confirmed dead at ``incarnation``."""
        return self._event(member, incarnation, "dead")

    def left(self, member: str) -> Deferred[Any]:
        """``member`` left (a drain handed its jobs back before it went)."""
        return self._event(member, None, "left")

    def _event(self, member: str, incarnation: int | None, what: str) -> Deferred[Any]:
        wait = self.succession.wait(member)
        if wait is None:
            return succeed(None)
        self._log.info("peer {peer} {what}: we act in {wait:.1f}s (watcher {rank})", peer=member, what=what,
                       wait=wait, rank=self.succession.rank(member))
        if wait == 0:
            return maybeDeferred(self.act, member, incarnation)
        done: Deferred[Any] = Deferred()

        def turn() -> None:
            self.pending.pop(member, None)
            maybeDeferred(self.act, member, incarnation).chainDeferred(done)

        previous = self.pending.pop(member, None)
        if previous is not None and previous.active():
            previous.cancel()
        self.pending[member] = self.reactor.callLater(wait, turn)
        return done

    def stop(self) -> None:
        """Forget the turns still waiting (the node stops)."""
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
