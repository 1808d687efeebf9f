"""Jittered periodic work (gridnode/timers.py), and nodes started together drifting apart."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.pipeline import JobService
from gridnode.registry.service import Registry
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.timers import SPREAD, JitteredLoop, jittered
from tests.fakes import FakeMedia


def in_step(a: list[float], b: list[float], within: float) -> int:
    """How many of ``b``'s instants fall within ``within`` s of one of ``a``'s."""
    return sum(1 for t in b if any(abs(t - s) <= within for s in a))


class JitteredTests:
    def test_each_wait_is_drawn_around_the_period(self) -> None:
        """Every wait lies in [1 - SPREAD, 1 + SPREAD] x the period, and they are not all equal."""
        clock, fired = Clock(), []
        loop = JitteredLoop(clock, lambda: fired.append(clock.seconds()), 10.0, random.Random(7))
        loop.start()
        for _ in range(400):
            clock.advance(0.5)
        waits = [b - a for a, b in zip([0.0, *fired], fired, strict=False)]
        assert len(waits) >= 15
        assert all(10 * (1 - SPREAD) - 0.5 <= w <= 10 * (1 + SPREAD) + 0.5 for w in waits)
        assert len({round(w, 1) for w in waits}) > 3

    def test_jittered_stays_in_its_range(self) -> None:
        """`jittered` never leaves [1 - spread, 1 + spread] x its seconds; spread 0 is exact."""
        rng = random.Random(1)
        draws = [jittered(4.0, rng, 0.5) for _ in range(1000)]
        assert min(draws) >= 2.0 and max(draws) <= 6.0 and max(draws) - min(draws) > 3.0
        assert jittered(4.0, rng, 0.0) == 4.0

    def test_two_loops_started_together_drift_apart(self) -> None:
        """Two nodes' loops started at the same instant, with their own random sources, do not stay
        in step; with the same seed they would (the measure can fail)."""

        def run(seed_a: int, seed_b: int) -> tuple[list[float], list[float]]:
            clock = Clock()
            times: tuple[list[float], list[float]] = ([], [])
            for seed, out in zip((seed_a, seed_b), times, strict=True):
                JitteredLoop(clock, lambda out=out: out.append(clock.seconds()),  # type: ignore[misc]
                             10.0, random.Random(seed)).start()
            for _ in range(2000):
                clock.advance(0.25)
            return times

        a, b = run(1, 2)
        assert len(a) >= 40 and len(b) >= 40
        assert in_step(a, b, 0.5) < len(b) / 2
        a, b = run(3, 3)
        assert in_step(a, b, 0.5) == len(b)

    def test_a_round_is_waited_for_and_stop_fires_after_it(self) -> None:
        """A round that returns a Deferred is waited for before the next wait begins; stopping in
        the middle of it fires `start`'s Deferred only once the round has ended."""
        clock = Clock()
        rounds: list[Deferred[None]] = []

        def work() -> Deferred[None]:
            rounds.append(Deferred())
            return rounds[-1]

        loop = JitteredLoop(clock, work, 1.0, random.Random(0))
        stopped: list[Any] = []
        loop.start(now=True).addCallback(stopped.append)
        assert len(rounds) == 1
        clock.advance(10)
        assert len(rounds) == 1  # the first round still runs
        rounds[0].callback(None)
        clock.advance(1.25)
        assert len(rounds) == 2
        loop.stop()
        assert stopped == [] and not loop.running
        rounds[1].callback(None)
        assert stopped == [None] and clock.getDelayedCalls() == []

    def test_a_failing_round_stops_the_loop(self) -> None:
        """A round that raises stops the loop, and `start`'s Deferred fails with the error."""
        clock = Clock()
        loop = JitteredLoop(clock, lambda: 1 / 0, 1.0, random.Random(0))
        failed: list[Any] = []
        loop.start().addErrback(failed.append)
        clock.advance(2)
        assert len(failed) == 1 and failed[0].check(ZeroDivisionError)
        assert not loop.running and clock.getDelayedCalls() == []

    def test_hostile_settings_are_refused(self) -> None:
        """A period of 0 (a busy loop) or a spread of 1 (a wait of 0) is refused; starting twice and
        stopping a stopped loop are errors."""
        with pytest.raises(ValueError):
            JitteredLoop(Clock(), lambda: None, 0.0, random.Random())
        with pytest.raises(ValueError):
            JitteredLoop(Clock(), lambda: None, 1.0, random.Random(), spread=1.0)
        loop = JitteredLoop(Clock(), lambda: None, 1.0, random.Random())
        loop.start()
        with pytest.raises(RuntimeError):
            loop.start()
        loop.stop()
        with pytest.raises(RuntimeError):
            loop.stop()


def writes_of(store: ObjectStore, clock: Clock, prefix: str,
              call: str = "put_bytes") -> tuple[ObjectStore, list[float]]:
    """``store`` with the instants of its ``call``s (puts) under ``prefix`` recorded."""
    times: list[float] = []

    def wrap(run: Any) -> Any:
        def recorded(fn: Any, *args: Any, **kw: Any) -> Any:
            if getattr(fn, "__name__", "") == call and any(str(a).startswith(prefix) for a in args[:2]):
                times.append(clock.seconds())
            return run(fn, *args, **kw)

        return recorded

    return store.wrapped(wrap), times


class NodesStartedTogetherTests:
    def test_registry_heartbeats_drift_apart(self) -> None:
        """Two nodes registered at the same instant write their heartbeats at instants that drift
        apart (each node its own random source)."""
        clock = Clock()
        clock.advance(1000)
        shared = ObjectStore.synchronous(MemoryBackend())
        times = []
        for node, seed in (("a", 1), ("b", 2)):
            store, written = writes_of(shared, clock, f"registry/prod/east/nodes/{node}")
            Registry(clock, store, env="prod", pool="east", node_id=node, http_url="http://127.0.0.1:1",
                     peer_addr="127.0.0.1:1", heartbeat=30, now=clock.seconds, rng=random.Random(seed)).startService()
            times.append(written)
        for _ in range(1200):
            clock.advance(1)
        a, b = times
        assert len(a) >= 30 and len(b) >= 30
        assert in_step(a[1:], b[1:], 1.0) < len(b) / 2  # the first, the registration, is together

    def test_looks_at_own_markers_drift_apart(self, tmp_path: Path) -> None:
        """Two job services started at the same instant list their own markers (jobs handed to
        them) at instants that drift apart."""
        clock = Clock()
        clock.advance(1000)
        backend = MemoryBackend()
        times = []
        for node, seed in (("n1", 1), ("n2", 2)):
            config = build_config(cli={"work-dir": str(tmp_path / node), "workers": 1, "queue": 1, "min-free": 0,
                                       "job-lease": 30}).with_identity(node)
            store, written = writes_of(ObjectStore.synchronous(backend), clock, f"active/{node}/", "list_all")
            svc = JobService(clock, config, store, FakeMedia(tmp_path), now=clock.seconds, rng=random.Random(seed))
            spool = svc.admit(5)
            spool.write(b"video")
            svc.submit(spool, name="m.mov", presets=None, checksum=None)
            svc.startService()
            times.append(written)
        for _ in range(2400):
            clock.advance(1)
        a, b = times
        assert len(a) >= 30 and len(b) >= 30
        assert in_step(a[1:], b[1:], 0.5) < len(b) / 2  # the first, at start, is together
