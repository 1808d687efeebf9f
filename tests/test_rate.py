"""A node's store request budget (gridnode/store/rate.py) on a fake clock, and the store through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.errors import ConfigError
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.store.rate import (
    ANSWER,
    ASSUMED_POOL,
    BACKGROUND,
    BURST,
    EVENT,
    KEEP,
    MIN_RATE,
    POOL_BUDGET,
    Gate,
    TokenBucket,
    pool_rate,
)


class BucketTests:
    def test_a_burst_then_the_rate(self) -> None:
        """A full bucket gives `burst` tokens at once, then one per 1/rate s; a spent token is owed."""
        clock = Clock()
        bucket = TokenBucket(2.0, 4.0, clock.seconds)
        assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]
        assert bucket.wait() == pytest.approx(0.5)
        clock.advance(0.5)
        assert bucket.take() and not bucket.take()
        bucket.spend()
        bucket.spend()
        assert bucket.wait() == pytest.approx(1.5)  # two owed, then the next one
        clock.advance(100)
        assert [bucket.take() for _ in range(5)] == [True] * 4 + [False]  # never more than the burst

    def test_the_pool_shares_its_budget(self) -> None:
        """`pool_rate`: the budget split over the members with their bursts, never under MIN_RATE."""
        assert pool_rate(1) == POOL_BUDGET / (1 + BURST)
        assert pool_rate(10) * 10 * (1 + BURST) == pytest.approx(POOL_BUDGET)
        assert pool_rate(100_000) == MIN_RATE
        assert pool_rate(0) == pool_rate(1)


def gate(clock: Clock, rate: float | None = 2.0, slots: int = 100, **kw: Any) -> Gate:
    return Gate(clock, rate=rate, slots=slots, **kw)


class GateTests:
    def test_requests_wait_for_tokens_and_none_is_dropped(self) -> None:
        """Past the burst, requests are let through at the rate, in order; none is dropped."""
        clock = Clock()
        g = gate(clock, rate=2.0)  # a burst of 2
        granted: list[int] = []
        for i in range(6):
            g.take(ANSWER).addCallback(lambda _, i=i: granted.append(i))
        assert granted == [0, 1]
        clock.advance(0.5)
        assert granted == [0, 1, 2]
        for _ in range(3):
            clock.advance(0.5)
        assert granted == list(range(6)) and g.waiting(ANSWER) == 0

    def test_lanes_first_keep_then_answer_then_background(self) -> None:
        """With the bucket empty, what waits is let through lane by lane: a lease renewal (KEEP) at
        once, without a token, then what a client waits on, then the scans; FIFO within a lane."""
        clock = Clock()
        g = gate(clock, rate=1.0)
        order: list[str] = []
        g.take(ANSWER)  # the only token
        for name, lane in (("scan1", BACKGROUND), ("scan2", BACKGROUND), ("read1", ANSWER), ("read2", ANSWER)):
            g.take(lane).addCallback(lambda _, n=name: order.append(n))
        g.take(KEEP).addCallback(lambda _: order.append("renew"))
        assert order == ["renew"]  # no token was left: the renewal went anyway, owing it
        for _ in range(10):
            clock.advance(1)
        assert order == ["renew", "read1", "read2", "scan1", "scan2"]

    def test_keep_waits_for_a_slot_only(self) -> None:
        """Slots (the store's threads) bound what is in flight for every lane; a free one goes to
        KEEP first, so a renewal never queues behind slow scans in the thread pool."""
        clock = Clock()
        g = gate(clock, rate=100.0, slots=1)
        sent: list[str] = []
        answers: dict[str, Deferred[None]] = {}

        def send(name: str) -> Deferred[None]:
            sent.append(name)
            answers[name] = Deferred()
            return answers[name]

        g.run(BACKGROUND, lambda: send("scan1"))
        g.run(BACKGROUND, lambda: send("scan2"))
        g.run(KEEP, lambda: send("renew"))
        assert sent == ["scan1"]
        answers["scan1"].callback(None)
        assert sent == ["scan1", "renew"]
        answers["renew"].callback(None)
        assert sent == ["scan1", "renew", "scan2"] and g.busy == 1

    def test_a_failed_request_frees_its_slot(self) -> None:
        """A request that fails (or whose sending raises) gives its slot back."""
        clock = Clock()
        g = gate(clock, rate=100.0, slots=1)
        failures: list[Any] = []

        def boom() -> Deferred[None]:
            raise RuntimeError("boom")

        g.run(ANSWER, boom).addErrback(failures.append)
        failed: Deferred[None] = Deferred()
        g.run(ANSWER, lambda: failed).addErrback(failures.append)
        failed.errback(RuntimeError("store"))
        assert len(failures) == 2 and g.busy == 0

    def test_cancelled_while_waiting_sends_nothing(self) -> None:
        """A caller that gives up while its request waits (a client gone) sends nothing and leaves
        no trace in the queue."""
        clock = Clock()
        g = gate(clock, rate=1.0)
        g.take(ANSWER)
        sent: list[str] = []
        d = g.run(ANSWER, lambda: sent.append("x") or Deferred())
        failures: list[Any] = []
        d.addErrback(failures.append)
        d.cancel()
        clock.advance(5)
        assert sent == [] and failures[0].check(CancelledError) and g.waiting(ANSWER) == 0

    def test_auto_rate_follows_the_pool(self) -> None:
        """Without a fixed rate the node spends its share of the pool's budget: an assumed pool
        while the membership has no view, then the live members' count (looked at every second)."""
        clock = Clock()
        members = [0]
        g = gate(clock, rate=None, members=lambda: members[0])
        g.take(ANSWER)
        assert g.rate == pool_rate(ASSUMED_POOL)
        members[0] = 1000
        clock.advance(1)
        g.take(ANSWER)
        assert g.rate == pool_rate(1000) == MIN_RATE
        members[0] = 3
        g.take(ANSWER)
        assert g.rate == MIN_RATE  # counted again only after a second
        clock.advance(1)
        g.take(ANSWER)
        assert g.rate == pool_rate(3)

    def test_an_event_spends_a_bucket_of_its_own(self) -> None:
        """Acting on a death (EVENT) does not wait behind the node's own requests, nor they behind
        it: with the node's bucket in debt, the takeover goes at its own rate, and the background
        waits for the node's bucket alone."""
        clock = Clock()
        g = gate(clock, rate=None, members=lambda: 1000, events=lambda: 1)  # the node's share: 1/s
        order: list[str] = []
        for _ in range(3):
            g.take(KEEP)  # the node's own writes: its bucket owes them
        g.take(BACKGROUND).addCallback(lambda _: order.append("look"))
        for i in range(64):  # a dead node's 16 jobs, 4 requests each
            g.take(EVENT).addCallback(lambda _, i=i: order.append(f"claim{i}"))
        assert order == [f"claim{i}" for i in range(64)]  # pool_rate(1) = 875/s: all at once
        assert g.waiting(BACKGROUND) == 1
        clock.advance(3)
        assert order[-1] == "look"

    def test_the_event_rate_is_the_pool_budget_shared_by_the_events(self) -> None:
        """The EVENT lane's rate is `pool_rate` of the members held suspect, dead or left (however
        many live members), so N actors each counting N events spend at most the pool's budget;
        counted again at most once a second, and only while an event's requests wait."""
        clock = Clock()
        events = [300]
        calls: list[int] = []

        def count() -> int:
            calls.append(events[0])
            return events[0]

        g = gate(clock, rate=None, members=lambda: 1000, events=count)
        n = len(calls)
        g.take(ANSWER)
        clock.advance(2)
        g.take(ANSWER)
        assert len(calls) == n  # nothing waits in EVENT: the membership is not walked
        granted: list[float] = []
        for _ in range(20):
            g.take(EVENT).addCallback(lambda _: granted.append(clock.seconds()))
        assert g.event_bucket.rate == pool_rate(300) == pytest.approx(POOL_BUDGET / (2 * 300))
        assert 300 * g.event_bucket.rate * (1 + BURST) <= POOL_BUDGET + 1e-9
        for _ in range(20):
            clock.advance(0.5)
        assert len(granted) == 20 and granted[-1] > granted[0]  # at the shared rate, not at once
        events[0] = 1
        g.take(EVENT)
        clock.advance(1)
        g.take(EVENT)
        assert g.event_bucket.rate == pool_rate(1)

    def test_a_fixed_rate_holds_for_events_too(self) -> None:
        """With --store-rate the EVENT lane spends at that rate, from a bucket of its own."""
        clock = Clock()
        g = gate(clock, rate=2.0, events=lambda: 1)
        granted: list[str] = []
        for i in range(4):
            g.take(EVENT).addCallback(lambda _, i=i: granted.append(f"e{i}"))
        g.take(ANSWER).addCallback(lambda _: granted.append("read"))
        assert granted == ["e0", "e1", "read"]  # the event burst, then the node's own token
        clock.advance(0.5)
        assert granted == ["e0", "e1", "read", "e2"]

    def test_an_event_token_due_sooner_is_not_held_by_the_other_lanes_timer(self) -> None:
        """The gate wakes for the lane whose token comes first: an EVENT request that waits 0.1 s
        is not held until the node's bucket, 1 s away, pays its debt."""
        clock = Clock()
        g = gate(clock, rate=None, members=lambda: 1000, events=lambda: 400)  # EVENT: ~2.2/s
        g.take(ANSWER)
        g.take(BACKGROUND)  # waits a second for the node's bucket: the timer is set for it
        granted: list[float] = []
        for _ in range(4):
            g.take(EVENT).addCallback(lambda _: granted.append(clock.seconds()))
        assert len(granted) == 2  # the event bucket's burst
        clock.advance(0.5)
        assert len(granted) == 3 and g.waiting(BACKGROUND) == 1

    def test_waits_are_measured_by_lane(self) -> None:
        """The metrics see each request's wait for its token, by lane, and what waits now."""
        clock = Clock()
        metrics = Metrics()
        g = gate(clock, rate=1.0)
        metrics.bind_gate(g)
        g.take(ANSWER)
        g.take(BACKGROUND)
        assert metrics.registry.get_sample_value("gridnode_store_waiting", {"lane": BACKGROUND}) == 1
        clock.advance(1)
        r = metrics.registry
        assert r.get_sample_value("gridnode_store_token_wait_seconds_count", {"lane": BACKGROUND}) == 1
        assert r.get_sample_value("gridnode_store_token_wait_seconds_sum", {"lane": BACKGROUND}) == 1.0
        assert r.get_sample_value("gridnode_store_waiting", {"lane": BACKGROUND}) == 0
        assert r.get_sample_value("gridnode_store_rate") == 1.0

    def test_unknown_lane_is_refused(self) -> None:
        with pytest.raises(ValueError):
            gate(Clock()).take("urgent")
        with pytest.raises(ValueError):
            ObjectStore.synchronous(MemoryBackend()).in_lane("urgent")


class GatedStoreTests:
    def setup_method(self) -> None:
        self.clock = Clock()
        self.gate = gate(self.clock, rate=1.0)
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend).gated(self.gate)

    def test_records_wait_bodies_do_not(self, tmp_path: Path) -> None:
        """Puts, gets, lists and deletes of records spend tokens; a body (a file put, a part)
        takes none: its requests follow the job's own bytes."""
        body = tmp_path / "body"
        body.write_bytes(b"x" * 10)
        done: list[str] = []
        self.store.put_bytes("jobs/a.json", b"{}").addCallback(lambda _: done.append("record"))
        self.store.put_bytes("jobs/b.json", b"{}").addCallback(lambda _: done.append("record2"))
        self.store.put_file("inputs/a/source", str(body)).addCallback(lambda _: done.append("body"))
        assert done == ["record", "body"]
        self.clock.advance(1)
        assert done == ["record", "body", "record2"]

    def test_a_listing_spends_a_token_a_page(self) -> None:
        """list_all through a gate reads page by page, a token each, and still returns every item."""
        for i in range(2500):
            self.backend.put_bytes(f"active/{i:05d}", b"")
        got: list[Any] = []
        self.store.list_all("active/").addCallback(got.append)
        assert got == []
        self.clock.advance(1)
        assert got == []
        self.clock.advance(1)
        assert len(got[0]) == 2500

    def test_lanes_survive_wrapping(self) -> None:
        """A store's lane and gate stay through `wrapped` (the metrics' and health's wraps)."""
        wrapped = self.store.in_lane(KEEP).wrapped(lambda run: run)
        assert wrapped.lane == KEEP and wrapped.gate is self.gate
        self.store.put_bytes("jobs/a.json", b"{}")  # the last token
        done: list[Any] = []
        wrapped.put_bytes("jobs/b.json", b"{}").addCallback(done.append)
        assert len(done) == 1  # KEEP went without one


class StoreRateSettingTests:
    def test_auto_or_a_number(self) -> None:
        """store-rate: 'auto' (the default, None) or requests a second."""
        assert build_config().store_rate is None
        assert build_config(cli={"store-rate": "auto"}).store_rate is None
        assert build_config(cli={"store-rate": "25"}).store_rate == 25.0
        assert build_config(file={"store_rate": 2.5}).store_rate == 2.5

    @pytest.mark.parametrize("value", ["0", "-1", "fast", "1e9", "nan", True, [], ""])
    def test_hostile_values_are_refused(self, value: Any) -> None:
        """Zero, negative, absurd or non-numeric rates stop the node with a line naming the key."""
        with pytest.raises(ConfigError) as e:
            build_config(cli={"store-rate": value})
        assert "store-rate" in e.value.message
