"""
The sans-I/O SWIM + Lifeguard machine (gridnode/membership/swim.py), driven by
hand or on the simulated network of tests/swimnet.py. No sockets, no reactor, no
sleeps.
"""

from __future__ import annotations

import json
import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gridnode.membership.swim import (
    ALIVE,
    DEAD,
    LEFT,
    STATES,
    SUSPECT,
    Ack,
    ConfirmedDead,
    Gossip,
    MemberChanged,
    Message,
    Nack,
    Ping,
    PingReq,
    SwimConfig,
    SwimMachine,
    SyncDigest,
    SyncState,
    Update,
    encoded_size,
    message_from_dict,
    message_to_dict,
)
from tests.swimnet import SwimNet, address

CFG = SwimConfig(sync_interval=30.0)


def net_state(m: SwimMachine, member: str) -> str | None:
    view = m.member(member)
    return None if view is None else view.state


def network(n: int) -> SwimNet:
    """m0 ... m{n-1} on 1 ms links."""
    return SwimNet(n, prefix="m", config=CFG)


class ProbeTests:
    def test_probe_and_ack(self) -> None:
        """Two healthy members ping and ack each other every period and never suspect each other."""
        net = network(2)
        net.run(10.0)
        pings = [m for m in net.sent() if isinstance(m, Ping)]
        acks = [m for m in net.sent() if isinstance(m, Ack)]
        assert 15 <= len(pings) <= 22
        assert len(acks) == len(pings)
        assert net.changes("m0", SUSPECT) == [] and net.changes("m1", SUSPECT) == []
        assert net.machines["m0"].health == 0

    def test_indirect_probe_when_direct_path_lost(self) -> None:
        """With m0<->m1 cut both ways, m0 reaches m1 through PingReq relays and never suspects it."""
        net = network(4)
        net.cut |= {("m0", "m1"), ("m1", "m0")}
        net.run(30.0)
        assert any(isinstance(m, PingReq) and m.sender == "m0" and m.target == "m1" for m in net.sent())
        assert [e for e in net.changes("m1", SUSPECT) if e[1] == "m0"] == []
        assert net.view("m0", "m1") == (ALIVE, 0)

    def test_wire_messages_carry_id_address_incarnation(self) -> None:
        """Every message names its destination, sender, sender address and incarnation."""
        net = network(3)
        net.run(3.0)
        for m in net.sent():
            assert m.dest in net.machines and m.dest_addr == address(m.dest)
            assert m.sender_addr == address(m.sender) and m.sender_inc == 0


class SuspicionTests:
    def test_suspect_then_dead(self) -> None:
        """A crashed member becomes suspect, then dead everywhere within the max suspicion timeout."""
        net = network(4)
        net.run(5.0)
        net.down.add("m3")
        net.run(55.0)
        for obs in ("m0", "m1", "m2"):
            assert net.view(obs, "m3") == (DEAD, 0)
        first_suspect = min(t for t, _, _ in net.changes("m3", SUSPECT))
        last_dead = max(t for t, _, _ in net.changes("m3", DEAD))
        lo, hi = CFG.suspicion_bounds(4)
        assert 5.0 < first_suspect < 5.0 + 4 * CFG.probe_interval
        assert first_suspect + lo <= last_dead <= first_suspect + hi + 1

    def test_refutation_by_incarnation_bump(self) -> None:
        """A member that hears itself suspected bumps its incarnation and everyone holds it alive again."""
        net = network(3)
        net.run(2.0)
        m2 = net.machines["m2"]
        outs = m2.receive(Gossip("m2", address("m2"), "m0", address("m0"), 0,
                                 [Update("m2", address("m2"), 0, SUSPECT, "m0")]),
                          net.now)
        assert m2.incarnation == 1
        # the accuser is told at once
        told = [o for o in outs if isinstance(o, Gossip) and o.dest == "m0"]
        assert told and Update("m2", address("m2"), 1, ALIVE, "m2") in told[0].updates
        net.act("m2", outs)
        net.run(8.0)
        assert net.view("m0", "m2") == (ALIVE, 1) and net.view("m1", "m2") == (ALIVE, 1)
        assert net.changes("m2", DEAD) == []

    def test_suspected_member_refutes_through_buddy_probe(self) -> None:
        """A member cut off for a few periods is suspected, learns it from a probe, refutes; nobody declares it dead."""
        net = network(5)
        net.run(3.0)
        net.isolated.add("m4")
        net.run(2.5)
        assert net.changes("m4", SUSPECT)
        net.isolated.clear()
        net.run(34.5)
        assert net.changes("m4", DEAD) == []
        assert net.machines["m4"].incarnation >= 1
        assert all(net.view(o, "m4") == (ALIVE, net.machines["m4"].incarnation) for o in ("m0", "m1", "m2", "m3"))

    def test_timeout_shrinks_with_independent_confirmations(self) -> None:
        """Lifeguard: the suspicion timeout starts at max and drops toward min as distinct suspectors arrive."""
        names = [f"m{i}" for i in range(8)]
        m = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(1))
        m.add_members([(x, address(x)) for x in names], 0.0)
        lo, hi = CFG.suspicion_bounds(8)
        k = CFG.indirect_k
        deadlines = []
        for c, origin in enumerate(["m1", "m2", "m3", "m4", "m5"]):
            m.receive(Gossip("m0", address("m0"), origin, address(origin), 0,
                             [Update("m7", address("m7"), 0, SUSPECT, origin)]),
                      10.0 + c)
            deadlines.append(m.suspicion_deadline("m7"))
        expected = [10.0 + max(lo, hi - (hi - lo) * math.log(c + 1) / math.log(k + 1)) for c in range(5)]
        assert deadlines == expected
        assert deadlines[0] == 10.0 + hi and deadlines[3] == deadlines[4] == 10.0 + lo
        # the same suspector twice is no confirmation
        m.receive(Gossip("m0", address("m0"), "m1", address("m1"), 0,
                         [Update("m7", address("m7"), 0, SUSPECT, "m1")]), 20.0)
        assert m.suspicion_deadline("m7") == 10.0 + lo


class HealthTests:
    def test_health_rises_on_missed_acks_and_slows_probing(self) -> None:
        """A node whose probes go unanswered raises its health score up to the max and probes less often."""
        net = network(4)
        net.isolated.add("m0")
        net.run(120.0)
        m0 = net.machines["m0"]
        assert m0.health == CFG.health_max
        _, hi = CFG.suspicion_bounds(4)
        times = [t for t in _ping_times(net, "m0") if t < 1.0 + hi]  # probes, before any last-chance ping
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert gaps == sorted(gaps) and gaps[0] == CFG.probe_interval
        assert gaps[-1] >= 5 * CFG.probe_interval

    def test_health_recovers_after_good_probes(self) -> None:
        """Acked probes bring the health score back to 0."""
        net = network(4)
        net.isolated.add("m0")
        net.run(30.0)
        assert net.machines["m0"].health > 0
        net.isolated.clear()
        net.run(370.0)
        assert net.machines["m0"].health == 0

    def test_own_stall_is_not_blamed_on_the_target(self) -> None:
        """A timer that fires late (our reactor was blocked) waits for the queued ack instead of accusing."""
        a = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(1))
        b = SwimMachine("m1", address("m1"), config=CFG, rng=random.Random(2))
        a.add_members([("m1", address("m1"))], 0.0)
        b.add_members([("m0", address("m0"))], 0.0)
        a.start(0.0, join=False)
        t = a.next_deadline()
        assert t is not None
        ping = [o for o in a.tick(t) if isinstance(o, Ping)][0]
        ack = [o for o in b.receive(ping, t + 0.001) if isinstance(o, Ack)][0]
        # a is blocked for 4 s: its timers run late, then the queued ack is read
        outs = a.tick(t + 4.0) + a.receive(ack, t + 4.0)
        outs += a.tick(t + 20.0)
        assert not any(isinstance(o, MemberChanged) and o.state == SUSPECT for o in outs)
        assert not any(isinstance(o, PingReq) for o in outs)
        assert a.member("m1") is not None and a.member("m1").state == ALIVE  # type: ignore[union-attr]

    def test_last_chance_judges_only_its_own_suspicion(self) -> None:
        """Found by the simulator (N=100, seed 1, half the nodes stalling): our last-chance check of
        m2's suspicion at incarnation 0 was under way when m2 refuted and was suspected again at
        incarnation 1. The unanswered check must not declare the *new* suspicion dead; that one
        runs its own full timeout."""
        m = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(3))
        m.add_members([(f"m{i}", address(f"m{i}")) for i in range(1, 5)], 0.0)
        suspect = Gossip("m0", address("m0"), "m1", address("m1"), 0, [Update("m2", address("m2"), 0, SUSPECT, "m1")])
        m.receive(suspect, 1.0)
        deadline = m.suspicion_deadline("m2")
        assert deadline is not None
        outs = m.tick(deadline)  # the timeout ran out: one direct ping and k ping-reqs
        assert any(isinstance(o, Ping) and o.dest == "m2" for o in outs)
        refuted = Update("m2", address("m2"), 1, ALIVE, "m2")
        again = Update("m2", address("m2"), 1, SUSPECT, "m3")
        m.receive(Gossip("m0", address("m0"), "m3", address("m3"), 0, [refuted, again]), deadline + 0.1)
        new_deadline = m.suspicion_deadline("m2")
        assert new_deadline is not None and new_deadline >= deadline + 0.1 + CFG.suspicion_min_mult
        outs = m.tick(deadline + 2 * CFG.probe_timeout)  # no answer to the old check
        assert not any(isinstance(o, MemberChanged) and o.state == DEAD for o in outs)
        assert m.member("m2") == m.member("m2") and (m.member("m2").state, m.member("m2").incarnation) == (SUSPECT, 1)  # type: ignore[union-attr]


def _ping_times(net: SwimNet, sender: str) -> list[float]:
    return [t for t, _, _ in net.emitted(Ping, by=sender)]


class LeaveAndRejoinTests:
    def test_graceful_left(self) -> None:
        """A member that leaves is held left by everyone, never suspect, and no death is confirmed."""
        net = network(4)
        net.run(3.0)
        net.act("m3", net.machines["m3"].leave(net.now))
        net.down.add("m3")
        net.run(57.0)
        for obs in ("m0", "m1", "m2"):
            assert net.view(obs, "m3") == (LEFT, 0)
        assert net.changes("m3", SUSPECT) == [] and net.confirmed("m3") == []

    def test_rejoin_with_higher_incarnation_is_readmitted(self) -> None:
        """A node declared dead that restarts (fresh machine, incarnation 0) refutes its death and is alive again."""
        net = network(4)
        net.run(2.0)
        net.down.add("m3")
        net.run(38.0)
        assert net.view("m0", "m3") == (DEAD, 0)
        m3 = net.add("m3")
        net.run(20.0)
        assert m3.incarnation >= 1
        for obs in ("m0", "m1", "m2"):
            assert net.view(obs, "m3") == (ALIVE, m3.incarnation)

    def test_add_member_with_higher_incarnation_readmits(self) -> None:
        """add_member (a registry record with a newer incarnation) re-admits a dead member; an older one does not."""
        m = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(1))
        m.add_members([("m1", address("m1"))], 0.0)
        m.receive(Gossip("m0", address("m0"), "m2", address("m2"), 0,
                         [Update("m1", address("m1"), 3, DEAD, "m2")]), 1.0)
        assert m.member("m1") == m.member("m1") and (m.member("m1").state, m.member("m1").incarnation) == (DEAD, 3)  # type: ignore[union-attr]
        assert m.add_member("m1", address("m1"), 3, 2.0) == []
        outs = m.add_member("m1", "10.0.0.9:8081", 4, 3.0)
        assert MemberChanged("m1", "10.0.0.9:8081", ALIVE, 4) in outs


class ConfirmedDeathTests:
    def test_confirmed_by_a_second_suspector(self) -> None:
        """A crash is suspected by several members independently: the node whose timer ran out confirms it."""
        net = network(5)
        net.run(3.0)
        net.down.add("m4")
        net.run(57.0)
        confirmed = net.confirmed("m4")
        assert confirmed and all(e.incarnation == 0 for _, _, e in confirmed)
        assert any(net.machines[obs].is_confirmed_dead("m4") for _, obs, _ in confirmed)

    def test_partitioned_node_confirms_no_death(self) -> None:
        """A node cut off from everyone may hold peers dead, but never emits ConfirmedDead."""
        net = network(5)
        net.run(3.0)
        net.isolated.add("m0")
        net.run(197.0)
        assert [e for e in net.confirmed() if e[1] == "m0"] == []
        assert not any(net.machines["m0"].is_confirmed_dead(x) for x in ("m1", "m2", "m3", "m4"))
        # the others do confirm the unreachable m0
        assert net.confirmed("m0")

    def test_held_dead_on_a_peers_declaration_never_on_our_lone_one(self) -> None:
        """`holds_dead`: a death a peer declared (it spreads only with two suspectors) or one we
        confirmed; not our own lone declaration (partitioned: held dead, unconfirmed), and not a
        dead entry of a sync (only a suspicion here)."""
        net = network(5)
        net.run(3.0)
        net.isolated.add("m0")
        net.run(197.0)
        m0 = net.machines["m0"]
        assert net.view("m0", "m1")[0] == DEAD and not m0.holds_dead("m1")
        peer = net.machines["m1"]
        assert peer.holds_dead("m0") and net.view("m1", "m0")[0] == DEAD
        fresh = SwimMachine("n0", address("n0"), config=CFG, rng=random.Random(2))
        fresh.add_members([("m0", address("m0")), ("m1", address("m1"))], 0.0)
        fresh.receive(Gossip("n0", address("n0"), "m1", address("m1"), 0, [Update("m0", address("m0"), 0, DEAD, "m1")]),
                      1.0)
        assert fresh.holds_dead("m0")
        fresh.receive(SyncState("n0", address("n0"), "m1", address("m1"), 0,
                                [Update("m2", address("m2"), 0, ALIVE, "m2")], False), 2.0)
        fresh.receive(SyncState("n0", address("n0"), "m1", address("m1"), 0,
                                [Update("m2", address("m2"), 0, DEAD, "m1")], False), 3.0)
        assert net_state(fresh, "m2") == SUSPECT and not fresh.holds_dead("m2")

    def test_down_counts_suspicions_and_recent_deaths(self) -> None:
        """`down_count`: members held suspect now and deaths learned of in the last minute (how
        many take turns acting on a death, gridnode/succession.py, follows it)."""
        m = SwimMachine("n0", address("n0"), config=CFG, rng=random.Random(2))
        m.add_members([(f"m{i}", address(f"m{i}")) for i in range(4)], 0.0)
        assert m.down_count() == 0
        m.receive(Gossip("n0", address("n0"), "m1", address("m1"), 0,
                         [Update("m0", address("m0"), 0, DEAD, "m1"), Update("m2", address("m2"), 0, SUSPECT, "m1")]),
                  1.0)
        assert m.down_count() == 2
        m.receive(Gossip("n0", address("n0"), "m2", address("m2"), 1, []), 70.0)  # m2 refuted; m0's death is old
        assert m.down_count() == 0

    def test_confirmed_by_registry_stale_witness(self) -> None:
        """A lone suspector's death is confirmed only once the registry says that incarnation's heartbeat is stale."""
        net = network(3)
        net.run(2.0)
        net.down |= {"m1", "m2"}
        net.run(78.0)
        m0 = net.machines["m0"]
        assert net.view("m0", "m1") == (DEAD, 0) and net.confirmed() == []
        assert m0.registry_stale("m1", 5, net.now) == []  # another incarnation: no
        outs = m0.registry_stale("m1", 0, net.now)
        assert outs == [ConfirmedDead("m1", address("m1"), 0)]
        assert m0.is_confirmed_dead("m1") and not m0.is_confirmed_dead("m2")

    def test_stale_witness_before_death(self) -> None:
        """A registry-stale witness given while the member is still suspect confirms the death when it comes."""
        m = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(3))
        m.add_members([(f"m{i}", address(f"m{i}")) for i in range(1, 5)], 0.0)
        m.receive(Gossip("m0", address("m0"), "m1", address("m1"), 0,
                         [Update("m2", address("m2"), 0, SUSPECT, "m1")]), 1.0)
        assert m.registry_stale("m2", None, 1.5) == []
        deadline = m.suspicion_deadline("m2")
        assert deadline is not None
        outs = m.tick(deadline)
        # the last-chance probe goes out first: the accused gets one more chance to answer
        assert any(isinstance(o, Ping) and o.dest == "m2" for o in outs)
        assert [o for o in outs if isinstance(o, PingReq) and o.target == "m2"]
        assert ConfirmedDead("m2", address("m2"), 0) not in outs
        outs = m.tick(deadline + 2 * CFG.probe_timeout)
        assert ConfirmedDead("m2", address("m2"), 0) in outs


class DisseminationTests:
    def test_piggyback_retransmit_limit(self) -> None:
        """Each update is sent retransmit_mult*ceil(log10(N+1)) times, then dropped from the queue."""
        n = 20
        m = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(1))
        m.add_members([(f"m{i}", address(f"m{i}")) for i in range(1, n)], 0.0)
        m.start(0.0, join=False)
        m.receive(Gossip("m0", address("m0"), "m1", address("m1"), 0,
                         [Update("m5", address("m5"), 2, ALIVE, "m5")]), 0.01)
        carried = 0
        t = 0.01
        while t < 30.0:
            nd = m.next_deadline()
            assert nd is not None
            t = nd
            for o in m.tick(t):
                if isinstance(o, Ping | Gossip | PingReq):
                    carried += sum(1 for u in o.updates if u.member == "m5")
                if isinstance(o, Ping):  # answer probes so that nothing else happens
                    m.receive(Ack("m0", address("m0"), o.dest, o.dest_addr, 0, o.seq, []), t)
        assert carried == CFG.retransmit_limit(n) == 8

    def test_sync_by_digest_then_full_state(self) -> None:
        """Equal tables exchange a digest only; different tables trigger a push-pull of the buckets
        that differ (at 6 members there is one bucket: the whole table; tests/test_sync.py goes on)."""
        names = [f"m{i}" for i in range(5)]
        a = SwimMachine("m0", address("m0"), config=CFG, rng=random.Random(1))
        b = SwimMachine("m1", address("m1"), config=CFG, rng=random.Random(2))
        a.add_members([(x, address(x)) for x in names], 0.0)
        b.add_members([(x, address(x)) for x in names], 0.0)
        d, n = a.digest()
        assert b.receive(SyncDigest("m1", address("m1"), "m0", address("m0"), 0, d, n), 1.0) == []
        b.receive(Gossip("m1", address("m1"), "m2", address("m2"), 0,
                         [Update("m9", address("m9"), 0, ALIVE, "m9")]), 2.0)
        d, n = a.digest()
        outs = b.receive(SyncDigest("m1", address("m1"), "m0", address("m0"), 0, d, n), 3.0)
        full = [o for o in outs if isinstance(o, SyncState)]
        assert len(full) == 1 and full[0].reply and len(full[0].members) == 6
        back = a.receive(full[0], 3.1)
        assert a.member("m9") is not None and a.member("m9").state == ALIVE  # type: ignore[union-attr]
        assert [o for o in back if isinstance(o, SyncState) and not o.reply]
        assert a.digest() == b.digest()

    def test_join_announces_itself(self) -> None:
        """A node that joins late is known alive by every member shortly after."""
        net = network(5)
        net.run(3.0)
        net.add("m5")
        net.run(5.0)
        assert all(net.view(o, "m5") == (ALIVE, 0) for o in ("m0", "m1", "m2", "m3", "m4"))


_updates = st.builds(
    Update,
    member=st.just("x"),
    address=st.sampled_from(["10.0.0.1:1", "10.0.0.2:1"]),
    incarnation=st.integers(0, 4),
    state=st.sampled_from(STATES),
    origin=st.sampled_from(["a", "b", "c"]),
)
_RANKS = {s: i for i, s in enumerate(STATES)}


class MergeTests:
    @settings(max_examples=200, deadline=None)
    @given(st.lists(_updates, min_size=1, max_size=8), st.randoms(use_true_random=False))
    def test_merge_is_order_independent_and_monotone(self, updates: list[Update], rnd: random.Random) -> None:
        """Whatever order updates arrive in, the held state is the max by (incarnation, rank) and never goes back."""
        finals = []
        for order in (updates, rnd.sample(updates, len(updates))):
            m = SwimMachine("me", "10.0.0.0:1", config=CFG, rng=random.Random(0))
            m.add_members([("x", "10.0.0.1:1"), ("a", "1"), ("b", "2"), ("c", "3")], 0.0)
            held = (0, 0)
            for i, u in enumerate(order):
                m.receive(Gossip("me", "10.0.0.0:1", "a", "1", 0, [u]), float(i))
                v = m.member("x")
                assert v is not None
                now = (v.incarnation, _RANKS[v.state])
                assert now >= held
                held = now
            finals.append(held)
        best = max((u.incarnation, _RANKS[u.state]) for u in updates)
        assert finals[0] == finals[1] == max(best, (0, 0))

    @given(
        st.sampled_from(["Ping", "Ack", "Nack", "PingReq", "Gossip", "SyncDigest", "SyncState"]),
        st.lists(_updates, max_size=4),
        st.integers(0, 2**31),
    )
    def test_wire_round_trip(self, kind: str, updates: list[Update], seq: int) -> None:
        """Every message survives message_to_dict -> JSON -> message_from_dict unchanged; size is its JSON length."""
        hdr = ("b", "10.0.0.2:8081", "a", "10.0.0.1:8081", seq % 7)
        msg: Message = {
            "Ping": lambda: Ping(*hdr, seq, updates),
            "Ack": lambda: Ack(*hdr, seq, updates),
            "Nack": lambda: Nack(*hdr, seq),
            "PingReq": lambda: PingReq(*hdr, seq, "c", "10.0.0.3:8081", updates),
            "Gossip": lambda: Gossip(*hdr, updates),
            "SyncDigest": lambda: SyncDigest(*hdr, f"{seq:016x}", seq),
            "SyncState": lambda: SyncState(*hdr, updates, seq % 2 == 0),
        }[kind]()
        text = json.dumps(message_to_dict(msg), separators=(",", ":"))
        assert message_from_dict(json.loads(text)) == msg
        assert encoded_size(msg) == len(text)
