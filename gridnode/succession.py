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

Many deaths at once (a zone lost) can leave a death with no live watcher in
a node's ring when it hears of it (its watchers die with it, not yet held
dead), and no second event for it once they are: so a node remembers the
deaths and leaves that were not its to act on, for `REMEMBER` seconds, and at
every later event looks again whether one has become its own (its ring moved).

`Succession` decides (no I/O, an injected random source); `Successor` runs the
decision on a reactor's timers.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

#: seconds between the watchers' turns (rank 1 waits 1 to 1.5 x this, rank 2 twice that)
STANDBY = 5.0
#: seconds an event not ours to act on is remembered, in case the ring moves it to us (the
#: membership forgets dead and left members after as long: swim.py ``reap_after``)
REMEMBER = 600.0


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
        #: events that were not ours to act on: member -> (incarnation, what, when heard)
        self.others: dict[str, tuple[int | None, str, float]] = {}

    def dead(self, member: str, incarnation: int) -> Deferred[Any]:
        """``member`` was confirmed dead at ``incarnation``."""
        return self._heard(member, incarnation, "dead")

    def left(self, member: str) -> Deferred[Any]:
        """``member`` left (a drain handed its jobs back before it went)."""
        return self._heard(member, None, "left")

    def _heard(self, member: str, incarnation: int | None, what: str) -> Deferred[Any]:
        self.others.pop(member, None)
        done = self._event(member, incarnation, what)
        self._look_again(member)
        return done

    def _look_again(self, but: str) -> None:
        """Each event may move the ring: the remembered events that are ours now are acted on,
        each after its own wait; those older than `REMEMBER` are forgotten."""
        now = self.reactor.seconds()
        for member, (incarnation, what, heard) in list(self.others.items()):
            if member == but:
                continue
            if now - heard > REMEMBER:
                del self.others[member]
            elif self.succession.rank(member) is not None:
                del self.others[member]
                self._event(member, incarnation, what).addErrback(self._failed, member)

    def _failed(self, failure: Failure, member: str) -> None:
        self._log.failure("acting on {peer} failed", failure, peer=member)

    def _event(self, member: str, incarnation: int | None, what: str) -> Deferred[Any]:
        wait = self.succession.wait(member)
        if wait is None:
            self.others[member] = (incarnation, what, self.reactor.seconds())
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
