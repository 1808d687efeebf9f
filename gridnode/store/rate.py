"""
How fast one node spends its store requests: a token bucket, and the gate
that queues requests for its tokens by lane.

S3 takes at least 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per
second per partitioned prefix, and answers a sudden burst above what a prefix
is partitioned for with ``503 Slow Down`` while it scales (minutes). A pool
shares its prefixes (``jobs/``, ``active/``, ``registry/``), so an event every
node acts on at once (a death, a mass start) is a burst of N nodes. Each node
therefore spends at most `rate` requests a second (``--store-rate``; by
default `pool_rate`: the pool's budget, half the lower of S3's limits, shared
by the members it holds live), with a bucket of `BURST` seconds' worth.

A request waits for a token, never dropped, in one of four lanes, the first
served first (FIFO within a lane): `KEEP` (what keeps this node's claims
alive: its jobs' record writes, which carry their leases, the first before
the job's 201, and its registry record), `ANSWER` (what a client waits on:
the marker before a 201, reads of jobs and uploads), `EVENT` (acting on a
member's death or leave: its record's delete, the takeover of its jobs) and
`BACKGROUND` (looks for orphaned jobs, reads of the registry, sweeps). `KEEP`
never waits for a token: it takes one even from an empty bucket, which then
owes it, and the other lanes wait until it is paid back. Its requests are
bounded by the node's own jobs, never by an event, and a write held back
would leave a job's record behind its state.

`EVENT` has a bucket of its own, whose rate is the pool's budget shared by the
events its membership may see acted on at once (`pool_rate` of the members it
holds suspect, dead or left), not by the members: a death is acted on by one
node at a time (its first watcher; a standby later, on what is left,
gridnode/succession.py), so while each actor counts at least the events in
progress, the actors together stay within the budget, and one death's
takeover (4 requests a job) is not held to a node's share of a large pool
(1 a second at N=1000: a minute for 16 jobs). A request also waits for one of
the store's control threads (``slots``), so the lanes' order holds while calls
are slow (throttled, retried inside botocore) rather than in the thread pool's
FIFO.

Bodies (inputs, outputs, multipart parts: gridnode/store/base.py) take no
token and have threads of their own: their number follows each job's own
bytes, not an event, and a 201 must not queue behind another upload's parts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

#: lanes, first served first
KEEP, ANSWER, EVENT, BACKGROUND = "keep", "answer", "event", "background"
LANES = (KEEP, ANSWER, EVENT, BACKGROUND)

#: requests/s a whole pool may send to one prefix: half of S3's 3,500 PUT/COPY/POST/DELETE per
#: second per partitioned prefix (the lower of its two limits; GET/HEAD take 5,500)
POOL_BUDGET = 1750.0
#: the least a node is given whatever the pool's size (it wins from 875 nodes: past ~1,750 the
#: pool's steady rate alone passes the budget, and it needs S3's partitioning to catch up)
MIN_RATE = 1.0
#: the bucket holds this many seconds' worth of tokens: the most a node sends at once after a quiet
#: spell, so a pool's busiest second is (1 + BURST) x its rate
BURST = 1.0
#: the pool's size assumed until the membership has a view (a node still starting)
ASSUMED_POOL = 100
#: seconds between counts of the live members (a count walks the membership's table)
RECOUNT = 1.0


def pool_rate(members: int) -> float:
    """A node's share of `POOL_BUDGET` among ``members`` that may spend at once (the live nodes,
    itself included; for the `EVENT` lane, the events in progress), bucket included: (1 + `BURST`)
    x rate x members stays within the budget."""
    return max(MIN_RATE, POOL_BUDGET / ((1.0 + BURST) * max(1, members)))


def burst(rate: float) -> float:
    """The bucket of a node spending ``rate``: `BURST` seconds' worth, one token at least."""
    return max(1.0, rate * BURST)


class TokenBucket:
    """Tokens at ``rate`` a second up to ``burst``, on an injected clock; no I/O."""

    def __init__(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        self.now = now
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._at = now()

    def _refill(self) -> None:
        at = self.now()
        self.tokens = min(self.burst, self.tokens + max(0.0, at - self._at) * self.rate)
        self._at = at

    def set_rate(self, rate: float, burst: float) -> None:
        """A new rate from now on (what was earned at the old rate is kept, up to the new burst)."""
        self._refill()
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)

    def take(self) -> bool:
        """Take a token if there is one."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def spend(self) -> None:
        """Take a token whether or not there is one: the bucket owes it (down to -burst), and the
        next requests wait for it to be paid back."""
        self._refill()
        self.tokens = max(-self.burst, self.tokens - 1.0)

    def wait(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self.tokens) / self.rate)


class Gate:
    """Requests wait here for a token and a free slot, by lane; `take` fires when the caller may
    send, and the caller calls `release` once the request has ended. ``rate``: a fixed rate
    (``--store-rate``, the `EVENT` lane's too), or None: `pool_rate` of ``members()`` (the live
    members; 0 while unknown), and for the `EVENT` lane `pool_rate` of ``events()`` (the members
    held suspect, dead or left: the deaths and leaves that may be acted on at once)."""

    def __init__(self, clock: Any, *, rate: float | None, slots: int,
                 members: Callable[[], int] = lambda: 0, events: Callable[[], int] = lambda: 1,
                 waited: Callable[[str, float], None] = lambda lane, seconds: None) -> None:
        self.clock = clock
        self.fixed = rate
        self.members = members
        self.events = events
        self.slots = slots
        #: told how long each request waited, by lane (the metrics)
        self.waited = waited
        self.busy = 0
        self._counted = (0, float("-inf"))  # (members, when)
        self._events_counted = (1, float("-inf"))
        rate = self._rate()
        self.bucket = TokenBucket(rate, burst(rate), clock.seconds)
        rate = self._event_rate()
        self.event_bucket = TokenBucket(rate, burst(rate), clock.seconds)
        self._queues: dict[str, deque[tuple[Deferred[None], float]]] = {lane: deque() for lane in LANES}
        self._timer: Any = None

    def _rate(self) -> float:
        if self.fixed is not None:
            return self.fixed
        members, at = self._counted
        if self.clock.seconds() - at >= RECOUNT:
            members = self.members()
            self._counted = (members, self.clock.seconds())
        return pool_rate(members if members > 0 else ASSUMED_POOL)

    def _event_rate(self) -> float:
        if self.fixed is not None:
            return self.fixed
        events, at = self._events_counted
        if self.clock.seconds() - at >= RECOUNT:
            events = self.events()
            self._events_counted = (events, self.clock.seconds())
        return pool_rate(events)

    @property
    def rate(self) -> float:
        """Requests a second this node spends now (the `EVENT` lane aside)."""
        return self.bucket.rate

    def waiting(self, lane: str) -> int:
        return len(self._queues[lane])

    def take(self, lane: str) -> Deferred[None]:
        """Fires when a request in ``lane`` may be sent: at once if nothing waits before it."""
        if lane not in self._queues:
            raise ValueError(f"no lane {lane!r}")
        entry: tuple[Deferred[None], float]

        def cancel(d: Deferred[None]) -> None:
            try:
                self._queues[lane].remove(entry)
            except ValueError:
                pass  # granted already

        d: Deferred[None] = Deferred(cancel)
        entry = (d, self.clock.seconds())
        self._queues[lane].append(entry)
        self._pump()
        return d

    def release(self) -> None:
        """A request granted by `take` has ended: its slot is free."""
        self.busy -= 1
        self._pump()

    def _bucket(self, lane: str) -> TokenBucket:
        return self.event_bucket if lane == EVENT else self.bucket

    def _grant(self, lane: str) -> bool:
        """Whether a request of ``lane`` may go now (its token taken, or owed for `KEEP`)."""
        if lane == KEEP:
            self.bucket.spend()  # never waits for a token; the others wait for the debt
            return True
        return self._bucket(lane).take()

    def _pump(self) -> None:
        rate = self._rate()
        if rate != self.bucket.rate:
            self.bucket.set_rate(rate, burst(rate))
        if self._queues[EVENT]:  # counting events walks the membership: only when there are some
            rate = self._event_rate()
            if rate != self.event_bucket.rate:
                self.event_bucket.set_rate(rate, burst(rate))
        while self.busy < self.slots:
            # the first lane with a request that may go: EVENT's bucket is its own, so it does not
            # wait behind the node's other requests, nor they behind it
            lane = next((lane for lane in LANES if self._queues[lane] and self._grant(lane)), None)
            if lane is None:
                break
            d, since = self._queues[lane].popleft()
            self.busy += 1
            self.waited(lane, self.clock.seconds() - since)
            d.callback(None)
        if self.busy < self.slots and any(self._queues.values()):
            wait = min(self._bucket(lane).wait() for lane in LANES if self._queues[lane])
            if self._timer is not None and self._timer.getTime() > self.clock.seconds() + wait:
                self._timer.cancel()  # an EVENT request's token comes sooner than the other lanes'
                self._timer = None
            if self._timer is None:
                self._timer = self.clock.callLater(wait, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def run(self, lane: str, send: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """``send()`` once a token and a slot are ours; the slot is freed when its Deferred fires.
        Cancelled while waiting: nothing is sent (the caller gets CancelledError)."""

        def granted(_: None) -> Deferred[Any]:
            try:
                sent = send()
            except BaseException:
                self.release()
                raise

            def ended(result: object) -> object:
                self.release()
                return result

            return sent.addBoth(ended)

        return self.take(lane).addCallback(granted)
