"""The SWIM + Lifeguard state machine, driven by hand and on the simulated network of tests/swimnet.py."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from gridnode.membership import swim
from gridnode.membership.swim import ALIVE, DEAD, LEFT, SUSPECT, SwimMachine
from tests.swimnet import SwimNet


def network(n: int) -> SwimNet:
    """n0 ... n{n-1}, each at incarnation 1, on 1 ms links."""
    return SwimNet(n, incarnation=1)


class ProbeTests:
    def test_everyone_alive(self) -> None:
        """Probes and acks between live members keep everyone alive; nobody is suspected."""
        net = network(4)
        net.run(20)
        assert all(net.state(a, b) == ALIVE for a in net.names for b in net.names)
        assert not any(c.state != ALIVE for _, _, c in net.changes())
        assert any(isinstance(m, swim.Ping) for m in net.sent("n0"))

    def test_indirect_probe_saves_a_member(self) -> None:
        """With the direct link n0 <-> n2 lost, PingReq through others keeps n2 alive in n0's view."""
        net = network(4)
        net.cut |= {("n0", "n2"), ("n2", "n0")}
        net.run(30)
        assert net.state("n0", "n2") == ALIVE
        assert any(isinstance(m, swim.PingReq) and m.target == "n2" for m in net.sent("n0"))

    def test_crash_suspect_then_dead(self) -> None:
        """A crashed member is suspected, then declared dead by everyone."""
        net = network(5)
        net.run(3)
        net.down.add("n4")
        net.until(lambda: any(net.state(n, "n4") == SUSPECT for n in net.names[:4]), 10)
        took = net.until(lambda: all(net.state(n, "n4") == DEAD for n in net.names[:4]), 30)
        assert took > 0

    def test_lifeguard_health_rises_when_acks_go_missing(self) -> None:
        """A node that hears no acks at all (its inbound links lost) raises its local health score."""
        net = network(4)
        net.cut |= {(o, "n0") for o in net.names if o != "n0"}
        net.run(10)
        assert net.machines["n0"].health > 0
        assert net.machines["n1"].health == 0


class SuspicionTests:
    def test_refutation_by_incarnation_bump(self) -> None:
        """A live member told it is suspected bumps its incarnation and is alive everywhere again."""
        net = network(4)
        net.run(2)
        before = net.machines["n3"].incarnation
        lie = swim.Gossip("n1", "n1:1", "n0", "n0:1", net.machines["n0"].incarnation,
                          [swim.Update("n3", "n3:1", before, SUSPECT, "n0")])
        net.act("n0", [lie])
        net.run(10)
        assert net.machines["n3"].incarnation > before
        assert all(net.state(n, "n3") == ALIVE for n in net.names if n != "n3")

    def test_suspicion_shrinks_with_confirmations(self) -> None:
        """Lifeguard: the suspicion timeout starts at max and shrinks toward min as independent
        suspicions of the same incarnation arrive, so three witnesses declare death sooner than one."""

        def time_to_dead(witnesses: int) -> float:
            m = SwimMachine("n0", "n0:1", rng=random.Random(5), now=0.0, incarnation=1)
            others = [f"n{i}" for i in range(1, 7)]
            m.add_members([(o, f"{o}:1") for o in [*others, "v"]], 0.0)
            m.start(0.0, join=False)
            now = 0.0
            for origin in others[:witnesses]:
                m.receive(swim.Gossip("n0", "n0:1", origin, f"{origin}:1", 1,
                                      [swim.Update("v", "v:1", 0, SUSPECT, origin)]), 0.0)
            while m.member("v").state != DEAD:  # type: ignore[union-attr]
                now += 0.05
                assert now < 120
                m.tick(now)
            return now

        lo, hi = swim.SwimConfig().suspicion_bounds(8)
        assert 0 < lo < hi
        one, three = time_to_dead(1), time_to_dead(3)
        assert three < one
        assert three >= lo * 0.9

    def test_rejoin_with_higher_incarnation(self) -> None:
        """A member declared dead is admitted again when it comes back with a higher incarnation."""
        net = network(3)
        net.run(2)
        net.down.add("n2")
        net.until(lambda: net.state("n0", "n2") == DEAD, 60)
        dead_inc = net.machines["n0"].member("n2").incarnation  # type: ignore[union-attr]
        net.act("n0", net.machines["n0"].add_member("n2", "n2:1", dead_inc + 1, net.now))
        assert net.state("n0", "n2") == ALIVE

    def test_graceful_leave(self) -> None:
        """A member that leaves is 'left', not dead, in the others' views."""
        net = network(4)
        net.run(2)
        net.act("n3", net.machines["n3"].leave(net.now))
        net.run(2)
        net.down.add("n3")
        net.run(20)
        assert all(net.state(n, "n3") == LEFT for n in net.names[:3])
        assert not net.confirmed()


class ConfirmedDeathTests:
    def test_second_suspector_confirms(self) -> None:
        """With several survivors, a crash is confirmed (independent suspicions of the same incarnation)."""
        net = network(5)
        net.run(3)
        net.down.add("n4")
        net.until(lambda: any(obs in net.names[:4] for _, obs, _ in net.confirmed("n4")), 60)
        assert all(c.member == "n4" for _, _, c in net.confirmed())

    def test_registry_witness_confirms_in_a_pool_of_two(self) -> None:
        """In a pool of two no second suspector exists: the stale registry heartbeat confirms."""
        net = network(2)
        net.run(3)
        net.down.add("n1")
        net.until(lambda: net.state("n0", "n1") == DEAD, 60)
        assert [c for _, obs, c in net.confirmed() if obs == "n0"] == []
        net.act("n0", net.machines["n0"].registry_stale("n1", None, net.now))
        assert [c.member for _, obs, c in net.confirmed() if obs == "n0"] == ["n1"]

    def test_partitioned_node_confirms_nothing(self) -> None:
        """A node cut off from everyone may suspect them all, but confirms no death."""
        net = network(5)
        net.run(3)
        for other in net.names[1:]:
            net.cut |= {("n0", other), (other, "n0")}
        net.run(90)
        assert any(net.state("n0", other) != ALIVE for other in net.names[1:])
        assert [c for _, obs, c in net.confirmed() if obs == "n0"] == []


class RefusedTests:
    def kill(self, refusing: bool) -> float:
        net = network(6)
        net.run(3)
        net.down.add("n5")
        if refusing:
            net.refusing.add("n5")
        took = net.until(lambda: all(net.state(n, "n5") == DEAD for n in net.names[:5]), 60)
        assert all(c.member == "n5" for _, _, c in net.confirmed())
        assert any(obs in net.names[:5] for _, obs, _ in net.confirmed())
        return took

    def test_refused_connections_shorten_the_suspicion(self) -> None:
        """A process that is gone refuses connections: it is dead everywhere sooner than a silent one."""
        cfg = swim.SwimConfig()
        refused, silent = self.kill(refusing=True), self.kill(refusing=False)
        assert refused < silent
        lo, _ = cfg.suspicion_bounds(6)
        assert refused < lo  # under the shortest suspicion a silent member can get

    def test_relays_refused_too_become_witnesses(self) -> None:
        """The first refusal sends ping-reqs at once; the relays' own refusals make them suspectors."""
        net = network(6)
        net.run(3)
        net.down.add("n5")
        net.refusing.add("n5")
        net.until(lambda: any(net.state(n, "n5") == SUSPECT for n in net.names[:5]), 10)
        _, first, _ = net.changes("n5", SUSPECT)[0]
        net.run(0.05)
        assert any(isinstance(m, swim.PingReq) and m.target == "n5" for m in net.sent(first))
        suspectors = {c.member for _, obs, c in net.changes() if obs in net.names[:5]}
        assert "n5" in suspectors
        assert sum(net.state(n, "n5") == SUSPECT for n in net.names[:5]) >= 2

    def test_a_rejecting_partition_confirms_nothing(self) -> None:
        """Cut off by a firewall that rejects (every connection refused): suspects fast, confirms nothing."""
        net = network(5)
        net.run(3)
        for other in net.names[1:]:
            net.rejected |= {("n0", other)}
            net.cut |= {(other, "n0")}
        net.run(90)
        assert all(net.state("n0", other) == DEAD for other in net.names[1:])
        assert [c for _, obs, c in net.confirmed() if obs == "n0"] == []
        # the others may rightly confirm n0 (nobody can reach it), but no one else
        assert all(c.member == "n0" for _, obs, c in net.confirmed() if obs in net.names[1:])

    def test_refusal_of_another_address_or_an_unknown_member_is_ignored(self) -> None:
        """Only a refusal at the member's current address counts (a node that moved is not accused)."""
        net = network(3)
        net.run(2)
        assert net.machines["n0"].refused("n1", "elsewhere:1", net.now) == []
        assert net.machines["n0"].refused("stranger", "stranger:1", net.now) == []
        assert net.state("n0", "n1") == ALIVE
        outs = net.machines["n0"].refused("n1", "n1:1", net.now)
        assert net.state("n0", "n1") == SUSPECT and outs
        assert net.machines["n0"].refused("n1", "n1:1", net.now) == []  # known already


class WatchTests:
    def test_every_member_has_its_watchers_and_views_agree(self) -> None:
        """Each member is watched by ``watchers`` others, the same ones whoever computes it."""
        net = network(12)
        w = swim.SwimConfig().watchers
        for member in net.names:
            watchers = {n for n in net.names if member in net.machines[n].watching()}
            assert len(watchers) == w and member not in watchers
            assert all(set(net.machines[v].watchers_of(member)) == watchers for v in net.names)

    def test_watchers_move_when_a_member_dies(self) -> None:
        """When a watcher is gone from the ring, the next member before the watched one takes over."""
        net = network(8)
        net.run(2)
        member = "n0"
        old = net.machines["n1"].watchers_of(member)
        gone = old[0]
        net.machines["n1"].receive(
            swim.Gossip("n1", "n1:1", "n2", "n2:1", 1, [swim.Update(gone, f"{gone}:1", 1, DEAD, "n2")]), net.now)
        new = net.machines["n1"].watchers_of(member)
        assert gone not in new and set(old) - {gone} <= set(new) and len(new) == len(old)

    def test_a_suspector_tells_the_watchers_and_they_check_once(self) -> None:
        """The first suspector gossips its suspicion straight to the member's watchers; each asks the
        member's kernel once per incarnation."""
        net = network(8)
        net.run(2)
        victim = "n7"
        watchers = net.machines["n0"].watchers_of(victim)
        net.down.add(victim)
        net.until(lambda: any(net.state(n, victim) == SUSPECT for n in net.names[:7]), 10)
        _, first, _ = net.changes(victim, SUSPECT)[0]
        told = {m.dest for m in net.sent(first) if isinstance(m, swim.Gossip)
                and any(u.member == victim and u.state == SUSPECT for u in m.updates)}
        assert set(watchers) - {first} <= told
        net.run(1)
        assert sorted(w for _, w, check in net.emitted(swim.CheckHost) if check.member == victim) == sorted(watchers)

    def test_a_vanished_host_is_dead_sooner_than_a_stalled_one_would_be(self) -> None:
        """The watchers find the host silent: it is dead everywhere well before the shortest suspicion
        a silent member could get; a stalled member (its kernel answers) is not declared dead faster."""
        net = network(8)
        net.run(2)
        net.down.add("n7")
        net.vanished.add("n7")
        start = net.now
        net.until(lambda: all(net.state(n, "n7") == DEAD for n in net.names[:7]), 30)
        lo, _ = swim.SwimConfig().suspicion_bounds(8)
        assert net.now - start < lo
        assert net.confirmed("n7")

        stalled = network(8)
        stalled.run(2)
        stalled.down.add("n7")  # frozen: no answers, but its kernel still acknowledges
        stalled.run(lo)
        assert not any(stalled.state(n, "n7") == DEAD for n in stalled.names[:7])

    def test_host_silent_for_another_address_or_a_stranger_is_ignored(self) -> None:
        """Only a check of the member's current address counts."""
        net = network(3)
        net.run(2)
        assert net.machines["n0"].host_silent("n1", "elsewhere:1", net.now) == []
        assert net.machines["n0"].host_silent("stranger", "x:1", net.now) == []
        assert net.state("n0", "n1") == ALIVE
        assert net.machines["n0"].host_silent("n1", "n1:1", net.now)
        assert net.state("n0", "n1") == SUSPECT
        deadline = net.machines["n0"].suspicion_deadline("n1")
        assert deadline is not None and deadline <= net.now + swim.SwimConfig().gone_suspicion_mult


class RelayTests:
    def test_a_relay_corrects_a_requester_that_missed_a_refutation(self) -> None:
        """A ping-req carries what the requester holds about a suspect target; a relay that holds a
        newer incarnation (the target refuted; the requester missed it, and the target may be stalled
        just now) tells the requester at once."""
        relay = SwimMachine("r", "r:1", rng=random.Random(1), now=0.0)
        relay.add_members([("q", "q:1"), ("t", "t:1")], 0.0)
        relay.receive(swim.Gossip("r", "r:1", "t", "t:1", 5, []), 0.0)  # t refuted: incarnation 5
        req = swim.PingReq("r", "r:1", "q", "q:1", 0, 9, "t", "t:1", [swim.Update("t", "t:1", 4, SUSPECT, "q")])
        outs = relay.receive(req, 1.0)
        told = [o for o in outs if isinstance(o, swim.Gossip) and o.dest == "q"]
        assert told and told[0].updates == [swim.Update("t", "t:1", 5, ALIVE, "t")]
        assert any(isinstance(o, swim.Ping) and o.dest == "t" for o in outs)  # and relays the probe
        # a ping-req about an incarnation the relay holds too: nothing to correct
        same = swim.PingReq("r", "r:1", "q", "q:1", 0, 10, "t", "t:1", [swim.Update("t", "t:1", 5, SUSPECT, "q")])
        assert not any(isinstance(o, swim.Gossip) and o.dest == "q" for o in relay.receive(same, 2.0))

    def test_a_requester_says_what_it_holds_about_a_suspect_target(self) -> None:
        """The last-chance check's ping-reqs carry the requester's suspicion of the target."""
        net = network(5)
        net.run(2)
        net.down.add("n4")
        net.until(lambda: net.state("n0", "n4") == SUSPECT, 30)
        net.until(lambda: any(isinstance(m, swim.PingReq) and m.target == "n4" and any(
            u.member == "n4" and u.state == SUSPECT for u in m.updates) for m in net.sent("n0")), 30)


class MergeTests:
    @given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(swim.STATES)), min_size=1, max_size=12),
           st.randoms())
    def test_merge_order_does_not_matter(self, updates: list[tuple[int, str]], rng: random.Random) -> None:
        """Updates about one member form a join-semilattice: any delivery order ends in the same state."""
        ups = [swim.Update("x", "x:1", inc, state, "n9") for inc, state in updates]
        shuffled = list(ups)
        rng.shuffle(shuffled)

        def final(order: list[swim.Update]) -> swim.Update:
            held = order[0]
            for u in order[1:]:
                if swim.supersedes(u, held):
                    held = u
            return held

        a, b = final(ups), final(shuffled)
        assert (a.incarnation, a.state) == (b.incarnation, b.state)


class BootstrapTests:
    def test_registry_members_are_held_at_their_records_incarnation(self) -> None:
        """A member added from the registry is held at the incarnation its record gives (0 where
        none is given); one already known is left as we hold it."""
        m = SwimMachine("a", "a:1", rng=random.Random(1))
        m.add_members([("b", "b:1"), ("c", "c:1")], 0.0, {"b": 42})
        assert [(v.member, v.incarnation, v.state) for v in m.members()[1:]] == [("b", 42, ALIVE), ("c", 0, ALIVE)]
        m.add_members([("b", "b:1")], 1.0, {"b": 7})
        assert m.member("b") == swim.MemberView("b", "b:1", ALIVE, 42)
