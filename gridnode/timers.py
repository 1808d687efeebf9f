"""
Periodic work with jitter, on an injected clock and random source.

Nodes started together (a deploy, an autoscaling step) would otherwise keep
their timers in step for ever, and every heartbeat, lease renewal and scan of
the pool would reach the store in the same instant. Each wait is drawn in
``[1 - spread, 1 + spread]`` x the period, from the end of the previous round,
so the phases of two nodes drift apart by a random walk from the first round;
the mean period is the nominal one, so the request rate the docs give holds.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

#: each wait is drawn in [1 - SPREAD, 1 + SPREAD] x its period
SPREAD = 0.25


def jittered(seconds: float, rng: random.Random, spread: float = SPREAD) -> float:
    """``seconds`` x a factor drawn in ``[1 - spread, 1 + spread]``."""
    return seconds * (1.0 + spread * (2.0 * rng.random() - 1.0))


class JitteredLoop:
    """Calls ``work`` every ``period`` s, each wait jittered (`jittered`), a round that returns a
    Deferred waited for before the next wait begins (rounds never overlap). Like Twisted's
    LoopingCall: `start` returns a Deferred that fires when the loop is stopped, or fails (and
    the loop stops) with the first exception a round raises."""

    def __init__(self, clock: Any, work: Callable[[], object], period: float, rng: random.Random,
                 spread: float = SPREAD) -> None:
        if period <= 0 or not 0 <= spread < 1:
            raise ValueError("a period above 0 and a spread in [0, 1) are needed")
        self.clock = clock
        self.work = work
        self.period = period
        self.rng = rng
        self.spread = spread
        self.running = False
        self._call: Any = None
        self._round: Deferred[Any] | None = None
        self._done: Deferred[None] | None = None

    def start(self, now: bool = False) -> Deferred[None]:
        """Begin: a first round at once (``now``) or after a first jittered wait."""
        if self.running:
            raise RuntimeError("the loop runs already")
        self.running = True
        done = self._done = Deferred()
        if now:
            self._run()
        else:
            self._schedule()
        return done

    def stop(self) -> None:
        """No further round; the Deferred `start` returned fires now, or when the round in the
        middle of its work ends."""
        if not self.running:
            raise RuntimeError("the loop is not running")
        self.running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._round is None:
            self._finish(None)

    def _schedule(self) -> None:
        self._call = self.clock.callLater(jittered(self.period, self.rng, self.spread), self._run)

    def _run(self) -> None:
        self._call = None
        self._round = maybeDeferred(self.work)
        self._round.addBoth(self._ended)

    def _ended(self, result: object) -> None:
        self._round = None
        if isinstance(result, Failure):
            self.running = False
            self._finish(result)
        elif self.running:
            self._schedule()
        else:
            self._finish(None)

    def _finish(self, result: Failure | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if result is None:
            done.callback(None)
        else:
            done.errback(result)
