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

When several members are down at once, the turns go on past the watchers to
the live members before them on the ring (`heirs`): a watcher may be out of
room, and what the last heir cannot take it hands on to each job's keeper,
who claims it only at its next look at its own markers (up to a minute).

A death counts here whether this node confirmed it or a peer declared it (a
death spreads only when two members suspected it): a watcher that heard it by
gossip before its own timer ran out acts all the same. When many hosts go at
once (an availability zone), a dead member's watchers may all be dead too:
each node remembers the deaths it was no heir of for `REMEMBER` s, and looks
at them again whenever the members after it on the ring change (a death
between it and them moved it up): the next live members in ring order then act, with
the same first-write-wins rule. Each event is acted on once per node.

`Succession` decides (no I/O, an injected random source); `Successor` runs the
decision on a reactor's timers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

#: seconds between the watchers' turns (rank 1 waits 1 to 1.5 x this, rank 2 twice that)
STANDBY = 5.0
#: heirs of a member (its watchers first, then the live members before them on the ring) that
#: act in turn on its death: its 3 watchers alone for one death; when several members are down at
#: once, watchers may be dead or out of room too, and a job handed on to a keeper waits for that
#: keeper's next look at its own markers (up to a minute), so the turns go on further
HEIRS, MANY_HEIRS = 3, 6


def heirs(down: int) -> int:
    """How many heirs take turns while ``down`` members are held suspect or dead."""
    return HEIRS if down <= 1 else MANY_HEIRS


#: seconds a death or leave this node was no watcher of is remembered, in case its watchers die
#: too and the ring makes this node one (their deaths are confirmed within seconds of its own)
REMEMBER = 120.0


def is_gone(state: str | None, held_dead: bool, listed: bool | None) -> bool:
    """Whether a job's owner is gone, from what the membership holds of it (``state``: alive,
    suspect, dead, left; None: unknown; ``held_dead``: dead on two members' word, confirmed here or
    declared by a peer, `SwimMachine.holds_dead`) and whether the registry lists a fresh record of
    it (None: the registry has not been read yet). A member held alive or suspect is never gone, so
    a store that is frozen or throttles (registry records going stale) makes no one look gone."""
    if state is not None:
        return state == "left" or (state == "dead" and held_dead)
    return listed is False


class Succession:
    """Whether this node acts on ``member``'s death or leave, and after how many seconds: the
    member's watchers in ring order (``watchers_of``, first first), rank r after r to r + 0.5 x
    ``standby``; not a watcher, never."""

    def __init__(self, me: str, watchers_of: Callable[[str], list[str]], *, standby: float = STANDBY,
                 rng: random.Random | None = None, after: Callable[[], Iterable[str]] = tuple) -> None:
        self.me = me
        self.watchers_of = watchers_of
        self.standby = standby
        self.rng = rng or random.Random()
        #: the live members after us on the ring, as many as the most heirs (the machine's
        #: ``successors``): when they change, the ring moved near us and we may have become an
        #: heir of a member that died before
        self.after = after

    def rank(self, member: str) -> int | None:
        """Our place among ``member``'s watchers (0: the first), None when we are not one."""
        watchers = [w for w in self.watchers_of(member) if w != member]
        return watchers.index(self.me) if self.me in watchers else None

    def last(self, member: str) -> bool:
        """Whether no heir of ``member`` comes after us (none does when we are no longer among its
        heirs: fewer take turns once the pool settles): what we have no room for, we hand on."""
        watchers = [w for w in self.watchers_of(member) if w != member]
        return self.me not in watchers or watchers[-1] == self.me

    def wait(self, member: str) -> float | None:
        """Seconds before we act on ``member``'s event; None: not ours to act on."""
        rank = self.rank(member)
        if rank is None:
            return None
        return self.turn(rank)

    def turn(self, rank: int) -> float:
        """Seconds rank ``rank`` waits."""
        return 0.0 if rank == 0 else self.standby * (rank + 0.5 * self.rng.random())


class Successor:
    """Acts on the deaths and leaves `Succession` gives this node, each after its wait, once per
    event. ``act(member, incarnation)`` does the work (incarnation None for a leave: the member
    deleted its own record) and must be safe to repeat: a standby runs it again to finish what the
    first did not. Events it is no heir of are remembered (`REMEMBER` s) and looked at again
    when the members after it on the ring change."""

    _log = Logger()

    def __init__(self, reactor: Any, succession: Succession,
                 act: Callable[[str, int | None], Deferred[Any]]) -> None:
        self.reactor = reactor
        self.succession = succession
        self.act = act
        #: events waiting for our turn, by member: (the call, our rank when it was set)
        self.pending: dict[str, tuple[Any, int]] = {}
        #: events we were no watcher of: member -> (incarnation, what, when heard)
        self.remembered: dict[str, tuple[int | None, str, float]] = {}
        #: events acted on or waiting for our turn: (member, incarnation) -> when
        self._taken: dict[tuple[str, int | None], float] = {}
        self._after: frozenset[str] = frozenset(succession.after())

    def dead(self, member: str, incarnation: int) -> Deferred[Any]:
        """``member`` is dead at ``incarnation``: confirmed here, or declared by a peer."""
        return self._event(member, incarnation, "dead")

    def left(self, member: str) -> Deferred[Any]:
        """``member`` left (a drain handed its jobs back before it went)."""
        return self._event(member, None, "left")

    def moved(self) -> None:
        """The ring may have moved (a member died or left): if the members after us changed, the
        remembered events we are now an heir of are ours, and a turn waiting at a lower place
        comes now."""
        after = frozenset(self.succession.after())
        if after == self._after:
            return
        self._after = after
        now = self.reactor.seconds()
        for member, (incarnation, what, heard) in list(self.remembered.items()):
            if now - heard > REMEMBER:
                del self.remembered[member]
            elif self.succession.rank(member) is not None:
                del self.remembered[member]
                self._log.info("peer {peer}'s watchers are gone: we are one now", peer=member)
                self._event(member, incarnation, what, heard=False)
        for member, (call, rank) in list(self.pending.items()):
            now_rank = self.succession.rank(member)
            if now_rank == 0 < rank and call.active():
                call.reset(0)  # the watchers before us are gone: our turn is now
                self.pending[member] = (call, 0)

    def _event(self, member: str, incarnation: int | None, what: str, *, heard: bool = True) -> Deferred[Any]:
        now = self.reactor.seconds()
        key = (member, incarnation)
        for old in [k for k, at in self._taken.items() if now - at > REMEMBER]:
            del self._taken[old]
        if key in self._taken:
            return succeed(None)  # confirmed here and declared by a peer: one event
        rank = self.succession.rank(member)
        if rank is None:
            if heard:
                self.remembered[member] = (incarnation, what, now)
            self.moved()  # its death may have made us a watcher of an earlier one
            return succeed(None)
        self._taken[key] = now
        self.remembered.pop(member, None)
        wait = self.succession.turn(rank)
        self._log.info("peer {peer} {what}: we act in {wait:.1f}s (watcher {rank})", peer=member, what=what,
                       wait=wait, rank=rank)
        if heard:
            self.moved()
        if wait == 0:
            return maybeDeferred(self.act, member, incarnation)
        done: Deferred[Any] = Deferred()

        def turn() -> None:
            self.pending.pop(member, None)
            maybeDeferred(self.act, member, incarnation).chainDeferred(done)

        previous = self.pending.pop(member, None)
        if previous is not None and previous[0].active():
            previous[0].cancel()
        self.pending[member] = (self.reactor.callLater(wait, turn), rank)
        return done

    def stop(self) -> None:
        """Forget the turns still waiting (the node stops)."""
        for call, _ in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
