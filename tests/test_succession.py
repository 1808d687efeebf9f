"""One actor per event (gridnode/succession.py): who acts on a death or a leave, when a standby
takes over, and what the event costs the store, on fakes (a fake clock, the memory store)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gridnode import jobs, keys
from gridnode.adoption import Adopter
from gridnode.errors import StorageUnavailable
from gridnode.jobs import Job
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.succession import REMEMBER, STANDBY, Succession, Successor, heirs, is_gone
from tests.test_adoption import FakeHost


def test_is_gone_takes_the_membership_word_first() -> None:
    """Alive or suspect is never gone, whatever the registry says (a frozen store leaves records
    stale); left or a confirmed death is; dead unconfirmed is not; a member the membership does
    not know is gone only when the registry, read, lists no fresh record of it."""
    assert not is_gone("alive", False, False) and not is_gone("suspect", False, False)
    assert is_gone("left", False, True) and is_gone("dead", True, True)
    assert not is_gone("dead", False, False)
    assert is_gone(None, False, False)
    assert not is_gone(None, False, True) and not is_gone(None, False, None)


class SuccessionTests:
    def succession(self, me: str) -> Succession:
        return Succession(me, lambda member: ["w0", "w1", "w2"], rng=random.Random(7))

    def test_the_first_watcher_acts_at_once_the_others_in_turn(self) -> None:
        """Rank 0 waits nothing; rank r waits r to r + 0.5 standbys, so the turns never overlap;
        a node that does not watch the member never acts."""
        assert self.succession("w0").wait("dead") == 0.0
        for rank in (1, 2):
            for _ in range(20):
                wait = self.succession(f"w{rank}").wait("dead")
                assert wait is not None and rank * STANDBY <= wait < (rank + 0.5) * STANDBY
        assert self.succession("other").wait("dead") is None
        assert self.succession("other").rank("dead") is None

    def test_the_member_itself_is_no_watcher(self) -> None:
        """A ring that still holds the member does not make it its own heir."""
        s = Succession("w1", lambda member: ["dead", "w1"])
        assert s.rank("dead") == 0


def test_more_heirs_take_turns_when_several_members_are_down() -> None:
    """One death: its 3 watchers; several members down at once: 6 heirs (watchers may be dead or
    out of room). The last heir in turn is the one that hands leftovers on."""
    assert heirs(0) == heirs(1) == 3 and heirs(2) == heirs(300) == 6
    s = Succession("w2", lambda member: ["w0", "w1", "w2"])
    assert s.last("x") and not Succession("w1", s.watchers_of).last("x")
    assert Succession("w0", lambda member: []).last("x")
    assert Succession("w5", s.watchers_of).last("x")  # an heir no longer among them: nobody after it


class SuccessorTests:
    """Three watchers of node "gone" on one memory store, each with its `Successor` acting by
    its adopter's `take_over`, the store's requests counted by kind and key."""

    @pytest.fixture(autouse=True)
    def setup(self) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.failing: set[str] = set()
        for name in ("get_bytes", "put_bytes", "delete", "list"):
            self._count(name)

    def _count(self, name: str) -> None:
        real = getattr(self.backend, name)

        def counted(key: str, *args: Any, **kw: Any) -> Any:
            self.requests[(name, key)] += 1
            return real(key, *args, **kw)

        setattr(self.backend, name, counted)

    def watcher(self, name: str, capacity: int = 8) -> tuple[Successor, FakeHost]:
        host = FakeHost(capacity)
        backend = self.backend

        def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            if name in self.failing:
                return fail(StorageUnavailable("the store is unreachable"))
            try:
                return succeed(fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - as ObjectStore.synchronous
                return fail(e)

        adopter = Adopter(ObjectStore(backend, run), host, name, 30.0, now=lambda: 100.0, rng=random.Random(1))
        adopter.gone = {"gone"}.__contains__
        succession = Succession(name, lambda member: ["w0", "w1", "w2"], rng=random.Random(3))
        return Successor(self.clock, succession, lambda member, inc: adopter.take_over(member)), host

    def orphans(self, count: int) -> list[str]:
        made = []
        for _ in range(count):
            job = Job.new(keys.new_id(1.0), name="m.mov", presets=["mp4-720p"], node="gone", size=5, now=1.0)
            job.advance(jobs.PROBING, 1.0)
            job.accept(1.0, 30.0)
            self.backend.put_bytes(keys.job_record(job.id), job.dumps())
            self.backend.put_bytes(keys.active_marker("gone", job.id), b"")
            made.append(job.id)
        self.requests.clear()
        return made

    def test_the_first_watcher_takes_everything_the_standbys_one_list_each(self) -> None:
        """A death heard by every node: the first watcher claims all of the dead node's jobs at
        once; the standbys, at their turns, each list the prefix once, find it empty and claim
        nothing; a node that does not watch it sends nothing."""
        made = self.orphans(5)
        (s0, h0), (s1, h1), (s2, h2), (other, _) = (self.watcher(n) for n in ("w0", "w1", "w2", "x"))
        for s in (s0, s1, s2, other):
            s.dead("gone", 7)
        assert sorted(h0.active) == sorted(made)
        self.clock.advance(3 * STANDBY)
        assert h1.active == {} and h2.active == {}
        lists = [k for (op, k), n in self.requests.items() if op == "list" for _ in range(n)]
        assert lists == ["active/gone/"] * 3
        assert sum(n for (op, k), n in self.requests.items() if k.startswith("jobs/") and op == "get_bytes") == 5

    def test_a_standby_takes_over_when_the_first_fails(self) -> None:
        """The first watcher's store calls fail: nothing is claimed at once, and the second claims
        every job at its turn; the third then finds nothing left."""
        made = self.orphans(4)
        self.failing.add("w0")
        (s0, h0), (s1, h1), (s2, h2) = (self.watcher(n) for n in ("w0", "w1", "w2"))
        for s in (s0, s1, s2):
            s.dead("gone", 7)
        assert h0.active == {} and h1.active == {}
        self.clock.advance(1.5 * STANDBY)
        assert sorted(h1.active) == sorted(made)
        self.clock.advance(STANDBY)
        assert h2.active == {}

    def test_a_leave_is_acted_on_the_same_way_and_stop_forgets_turns(self) -> None:
        """A drained node's leave goes to its watchers in turn as a death does; a stopped node's
        turns that have not come never do."""
        made = self.orphans(2)
        (s0, h0), (s1, h1) = self.watcher("w0"), self.watcher("w1")
        s1.left("gone")
        assert s1.pending and h1.active == {}
        s1.stop()
        self.clock.advance(3 * STANDBY)
        assert h1.active == {} and not self.clock.getDelayedCalls()
        s0.left("gone")
        assert sorted(h0.active) == sorted(made)


class MovingRingTests:
    """When a dead member's watchers die with it, the next live members in ring order act: each
    node remembers the deaths it was no heir of and looks again when the members after it on the
    ring change. A ring of fakes: ``watchers`` and ``after`` are what the node's machine would
    answer now."""

    @pytest.fixture(autouse=True)
    def setup(self) -> None:
        self.clock = Clock()
        self.watchers = {"x": ["w0", "w1", "w2"]}
        self.after: list[str] = ["a", "b", "c"]
        self.acted: list[tuple[str, int | None, float]] = []

    def successor(self, me: str) -> Successor:
        succession = Succession(me, lambda member: self.watchers.get(member, []), rng=random.Random(5),
                                after=lambda: self.after)

        def act(member: str, incarnation: int | None) -> Deferred[None]:
            self.acted.append((member, incarnation, self.clock.seconds()))
            return succeed(None)

        return Successor(self.clock, succession, act)

    def test_the_next_live_member_acts_once_the_watchers_died_too(self) -> None:
        """x dies with its three watchers: w3, no watcher when it heard of x, becomes the first
        once the ring drops them (the members after it on the ring change) and acts at once, once."""
        s = self.successor("w3")
        s.dead("x", 4)
        assert self.acted == [] and "x" in s.remembered
        self.watchers["x"] = ["w3", "w4", "w5"]
        s.dead("w2", 9)  # a death that moves the ring without changing what we watch: nothing yet
        assert self.acted == []
        self.after = ["a", "b", "d"]
        s.dead("w1", 9)
        assert self.acted == [("x", 4, 0.0)] and "x" not in s.remembered
        s.dead("x", 4)  # heard again (a peer's declaration after our own confirmation)
        s.moved()
        assert self.acted == [("x", 4, 0.0)]

    def test_a_standby_whose_turn_is_waiting_acts_now_when_those_before_it_die(self) -> None:
        """w1 waits its turn behind w0; w0 dies too: w1's turn comes at once."""
        s = self.successor("w1")
        s.dead("x", 4)
        assert self.acted == [] and s.pending
        self.watchers["x"] = ["w1", "w2", "w3"]
        self.after = ["a", "b", "e"]
        s.dead("w0", 2)
        self.clock.advance(0)
        assert self.acted == [("x", 4, 0.0)]
        self.clock.advance(3 * STANDBY)
        assert len(self.acted) == 1

    def test_an_old_death_is_forgotten(self) -> None:
        """A death remembered longer than `REMEMBER` is not acted on when the ring moves later."""
        s = self.successor("w3")
        s.dead("x", 4)
        self.clock.advance(REMEMBER + 1)
        self.watchers["x"] = ["w3"]
        self.after = ["z"]
        s.moved()
        assert self.acted == [] and s.remembered == {}
