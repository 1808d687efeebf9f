"""
Anti-entropy by buckets (gridnode/membership/sync.py and its use in ``SwimMachine``): digests per
bucket over live members, only differing buckets sent, every message under the wire's limits whatever the id and
address lengths, a joiner that knows nothing, and members of the protocol before buckets.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

import pytest
from twisted.protocols import amp

from gridnode.membership import sync, wire
from gridnode.membership.swim import (
    ALIVE,
    DEAD,
    Gossip,
    Message,
    SwimConfig,
    SwimMachine,
    SyncDigest,
    SyncState,
    Update,
    encoded_size,
    message_from_dict,
    message_to_dict,
)

CFG = SwimConfig()


def ec2_pool(n: int, seed: int = 1, id_pad: int = 0, addr_pad: int = 0) -> list[tuple[str, str]]:
    """``n`` members with EC2 instance ids and public DNS names (padded longer when asked)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ip = "-".join(str(rng.randint(1, 254)) for _ in range(4))
        out.append((f"i-{rng.getrandbits(68):017x}" + "x" * id_pad,
                    f"ec2-{ip}.{'a' * addr_pad}compute-1.amazonaws.com:8081"))
    return out


def machine(me: tuple[str, str], members: Iterable[tuple[str, str]], seed: int = 1) -> SwimMachine:
    m = SwimMachine(me[0], me[1], config=CFG, rng=random.Random(seed))
    m.add_members(members, 0.0)
    return m


def opening(src: SwimMachine, dest: SwimMachine) -> SyncDigest:
    """What ``src``'s sync timer sends ``dest``: its pool-wide digest."""
    d, n = src.digest()
    return SyncDigest(dest.me, dest.address, src.me, src.address, src.incarnation, d, n)


def converse(machines: list[SwimMachine], first: Message, now: float = 1.0) -> list[Message]:
    """Deliver ``first`` and every sync message it leads to between ``machines``; returns them all."""
    by_id = {m.me: m for m in machines}
    queue, sent = [first], []
    while queue:
        msg = queue.pop(0)
        sent.append(msg)
        assert len(sent) < 10_000
        for out in by_id[msg.dest].receive(msg, now):
            if isinstance(out, SyncDigest | SyncState):
                assert out.dest in by_id
                queue.append(out)
    return sent


def assert_fits(msgs: Iterable[Message]) -> None:
    """Each message's payload is within the wire's limit and its AMP box can be built and framed."""
    for msg in msgs:
        assert encoded_size(msg) <= wire.MAX_PAYLOAD
        command, args = wire.seal(b"k" * 32, msg, 1_764_700_000.0)
        box = command.makeArguments(args, None)
        box[b"_command"] = command.commandName
        box.serialize()  # raises TooLong for a value over 65,535 bytes


class BucketTests:
    def test_buckets_fold_into_the_pool_wide_digest(self) -> None:
        """Every coarser digest is the XOR of the finer ones, so any two bucket counts compare."""
        d = sync.Digests()
        for member, addr in ec2_pool(300):
            d.toggle(member, 0, addr)
        whole = d.fold(1)[0]
        for n in (2, 16, 64, sync.FINE):
            acc = 0
            for x in d.fold(n):
                acc ^= x
            assert acc == whole
        assert len(d.encode(64)) == 64 * 16 and sync.decode(d.encode(64)) == d.fold(64)

    def test_incarnation_and_address_change_the_digest_and_toggling_back_restores_it(self) -> None:
        """A live entry is (id, incarnation, address): each of them counts."""
        d = sync.Digests()
        d.toggle("i-0a", 1, "a:1")
        before = d.encode(1)
        for other in (("i-0a", 2, "a:1"), ("i-0a", 1, "b:1"), ("i-0b", 1, "a:1")):
            d.toggle("i-0a", 1, "a:1")
            d.toggle(*other)
            assert d.encode(1) != before
            d.toggle(*other)
            d.toggle("i-0a", 1, "a:1")
            assert d.encode(1) == before

    def test_the_digest_holds_live_members_only_and_a_suspicion_leaves_it_alone(self) -> None:
        """A member held suspect is still live (gossip carries the suspicion); one held dead or
        left is out of the digest (members forget the dead at different times)."""
        pool = ec2_pool(40)
        a, b = machine(pool[0], pool), machine(pool[1], pool, seed=2)
        x = pool[7]
        b.receive(Gossip(b.me, b.address, pool[5][0], pool[5][1], 0, [Update(x[0], x[1], 0, "suspect", pool[5][0])]),
                  0.5)
        assert a.digest() == b.digest()
        b.receive(Gossip(b.me, b.address, pool[5][0], pool[5][1], 0, [Update(x[0], x[1], 0, DEAD, pool[5][0])]), 0.6)
        assert a.digest() != b.digest() and b.digest()[1] == a.digest()[1] - 1

    def test_bucket_count_follows_the_pool_size(self) -> None:
        """About 16 members a bucket, a power of two, at most FINE."""
        assert [sync.buckets_for(n) for n in (1, 16, 17, 1000, 5000, 10**6)] == [1, 1, 2, 64, 512, sync.FINE]

    @pytest.mark.parametrize("bad", ["", "0" * 15, "0" * 48, "g" * 16, "A" * 16, "0" * 16 * 2048, 7])
    def test_a_bad_digest_is_malformed(self, bad: object) -> None:
        """Not 16 lower-case hex digits per bucket, a power of two of them up to FINE: refused."""
        with pytest.raises(ValueError):
            sync.decode(bad)  # type: ignore[arg-type]
        raw = message_to_dict(SyncDigest("b", "b:1", "a", "a:1", 0, "0" * 16, 1))
        raw["digest"] = bad
        with pytest.raises((ValueError, TypeError)):
            message_from_dict(raw)

    @pytest.mark.parametrize(("buckets", "want"), [(3, []), (-1, []), (2048, []), (4, [4]), (4, [1, 1]),
                                                   (4, [-1]), (4, [True]), (0, [0]), (True, [])])
    def test_a_bad_want_is_malformed(self, buckets: int, want: list[int]) -> None:
        """A SyncState's bucket count and the buckets it asks for are checked on arrival."""
        raw = message_to_dict(SyncState("b", "b:1", "a", "a:1", 0, [], True, 4, [1]))
        raw["buckets"], raw["want"] = buckets, want
        with pytest.raises(ValueError):
            message_from_dict(raw)


class PackTests:
    def test_parts_are_cut_to_the_room_and_each_bucket_named_once(self) -> None:
        """A bucket larger than a message spans several; each bucket is named in one message only."""
        parts = [(0, ["x" * 100] * 25), (1, []), (2, ["y" * 100] * 3)]
        msgs = sync.pack(parts, len, 1000)
        assert len(msgs) > 2
        for entries, named in msgs:
            assert sum(len(e) + 1 for e in entries) + sum(len(str(b)) + 1 for b in named) <= 1000
        assert [b for _, named in msgs for b in named] == [0, 1, 2]
        assert [e for entries, _ in msgs for e in entries] == ["x" * 100] * 25 + ["y" * 100] * 3

    def test_an_entry_too_large_for_any_message_goes_alone(self) -> None:
        """It cannot be cut: it goes in a message of its own, which the sender then refuses and counts."""
        msgs = sync.pack([(0, ["a", "b" * 5000, "c"])], len, 1000)
        assert [entries for entries, _ in msgs] == [["a"], ["b" * 5000], ["c"]]


class ConversationTests:
    def test_equal_tables_exchange_one_digest(self) -> None:
        """In the steady state a sync is one 16-digit digest, whatever N."""
        pool = ec2_pool(1000)
        a, b = machine(pool[0], pool), machine(pool[1], pool, seed=2)
        sent = converse([a, b], opening(a, b))
        assert len(sent) == 1 and len(sent[0].digest) == 16  # type: ignore[attr-defined]

    def test_only_the_buckets_that_differ_travel(self) -> None:
        """b learnt of 3 changes a missed: the answer names 64 buckets, and the members that go are
        those of the ≤ 3 differing buckets (each way), not the table; a then holds what b holds."""
        pool = ec2_pool(1000)
        a, b = machine(pool[0], pool), machine(pool[1], pool, seed=2)
        news = [Update(pool[10][0], pool[10][1], 3, ALIVE, pool[10][0]),
                Update(pool[20][0], pool[20][1], 0, "left", pool[20][0]),
                Update("i-0fffffffffffffff1", "ec2-1-2-3-4.compute-1.amazonaws.com:8081", 0, ALIVE,
                       "i-0fffffffffffffff1")]
        b.receive(Gossip(b.me, b.address, pool[5][0], pool[5][1], 0, news), 0.5)
        sent = converse([a, b], opening(a, b))
        answer = sent[1]
        assert isinstance(answer, SyncDigest) and len(answer.digest) == 64 * 16
        states = [m for m in sent if isinstance(m, SyncState)]
        asked = {i for m in states if m.dest == b.me for i in m.want}
        assert 1 <= len(asked) <= 3
        assert sum(len(m.members) for m in states) < 2 * 3 * 40  # ~16 a bucket, each way
        assert a.digest() == b.digest()
        assert a.member(pool[10][0]).incarnation == 3  # type: ignore[union-attr]
        assert a.member(pool[20][0]).state == "left"  # type: ignore[union-attr]
        assert a.member("i-0fffffffffffffff1").state == ALIVE  # type: ignore[union-attr]
        assert_fits(sent)

    def test_a_joiner_that_knows_nobody_gets_every_bucket_in_messages_that_fit(self) -> None:
        """A joiner that knows one member only: every bucket differs; the tables come in parts under
        the limit, and both sides end with the same table."""
        pool = ec2_pool(3000)
        old = machine(pool[1], pool, seed=2)
        joiner = machine(pool[0], [pool[1]])
        sent = converse([joiner, old], opening(joiner, old))
        states = [m for m in sent if isinstance(m, SyncState) and m.dest == joiner.me]
        assert len(states) > 1
        assert sum(len(m.members) for m in states) == 3000
        assert joiner.digest() == old.digest() and joiner.live_count() == 3000
        assert_fits(sent)

    def test_long_ids_and_addresses_still_fit(self) -> None:
        """Ids of 200 characters and addresses of 300: every message under both limits, tables equal."""
        pool = ec2_pool(1000, id_pad=180, addr_pad=250)
        old = machine(pool[1], pool, seed=2)
        joiner = machine(pool[0], [pool[1]])
        sent = converse([joiner, old], opening(joiner, old))
        assert max(encoded_size(m) for m in sent) > wire.MAX_PAYLOAD // 2  # the limit was what cut them
        assert_fits(sent)
        assert joiner.digest() == old.digest()

    def test_the_whole_table_without_digests_is_cut_too(self) -> None:
        """``sync_digest=False`` (memberlist's push-pull) sends the whole table, in parts that fit."""
        pool = ec2_pool(2000)
        cfg = SwimConfig(sync_digest=False, sync_interval=1.0)
        a = SwimMachine(pool[0][0], pool[0][1], config=cfg, rng=random.Random(1))
        a.add_members(pool[1:], 0.0)
        a.start(0.0, join=False)
        outs = []
        while not outs:
            deadline = a.next_deadline()
            assert deadline is not None and deadline < 10
            outs = [o for o in a.tick(deadline) if isinstance(o, SyncState)]
        assert len(outs) > 1 and sum(len(o.members) for o in outs) == 2000
        assert sum(len(o.want) for o in outs) == 1 and all(o.buckets == 1 for o in outs)
        assert_fits(outs)

    def test_a_missed_death_arrives_as_a_suspicion(self) -> None:
        """Dead members travel with their bucket (not in the digest): one that missed the death
        suspects the member and gets to run its own check."""
        pool = ec2_pool(200)
        a, b = machine(pool[0], pool), machine(pool[1], pool, seed=2)
        b.receive(Gossip(b.me, b.address, pool[5][0], pool[5][1], 0,
                         [Update(pool[9][0], pool[9][1], 0, DEAD, pool[5][0])]), 0.5)
        converse([a, b], opening(b, a))
        assert a.member(pool[9][0]).state == "suspect"  # type: ignore[union-attr]


class OlderMemberTests:
    def test_a_sync_state_without_buckets_is_a_whole_table_and_is_answered_whole(self) -> None:
        """A member of the protocol before buckets sends {members, reply} only: read as a whole
        table, answered with ours (in parts), which it reads as before (it ignores new fields)."""
        pool = ec2_pool(100)
        a = machine(pool[0], pool)
        raw = {"type": "SyncState", "dest": a.me, "dest_addr": a.address, "sender": pool[1][0],
               "sender_addr": pool[1][1], "sender_inc": 0, "reply": True,
               "members": [[pool[2][0], pool[2][1], 4, ALIVE, pool[2][0]]]}
        msg = message_from_dict(json.loads(json.dumps(raw)))
        assert isinstance(msg, SyncState) and msg.buckets == 0 and msg.want == []
        outs = [o for o in a.receive(msg, 1.0) if isinstance(o, SyncState)]
        assert a.member(pool[2][0]).incarnation == 4  # type: ignore[union-attr]
        assert sum(len(o.members) for o in outs) == 100 and not any(o.reply for o in outs)

    def test_an_old_digest_is_answered(self) -> None:
        """An older member's digest is 16 hex digits too: it differs from ours, and we answer."""
        pool = ec2_pool(100)
        a = machine(pool[0], pool)
        outs = a.receive(SyncDigest(a.me, a.address, pool[1][0], pool[1][1], 0, "0123456789abcdef", 100), 1.0)
        assert [type(o) for o in outs] == [SyncDigest]


def test_amp_refuses_what_the_limit_keeps_out() -> None:
    """The reason for the limit: AMP cannot frame a value over 65,535 bytes."""
    with pytest.raises(amp.TooLong):
        amp.AmpBox({b"payload": b"x" * 65_536}).serialize()


def test_a_node_that_missed_joins_converges_on_a_swim_net_with_ec2_names() -> None:
    """300 members with EC2 ids and DNS names; one of them missed 12 joins (the registry told
    everyone else). Anti-entropy alone brings its table level with everyone's: the joins are never
    gossiped, and the members it missed seldom probe it. Each sync it takes part in carries the
    buckets that differ, not the table, and every message fits."""
    from tests.swimnet import SwimNet

    pool = ec2_pool(300, seed=3)
    names = [m for m, _ in pool]
    net = SwimNet(0, names=names, addresses=dict(pool), config=SwimConfig(sync_interval=10.0))
    laggard, missed = names[0], set(names[-12:])
    net.add(laggard, incarnation=1, knows=[x for x in names if x not in missed], join=False)
    reference = net.machines[names[1]]

    def level() -> bool:
        return all(net.state(laggard, x) == ALIVE for x in missed) and \
            net.machines[laggard].digest() == reference.digest()

    assert not level()
    net.until(level, 60.0)
    to_laggard = [m for m in net.sent() if isinstance(m, SyncState) and m.dest == laggard]
    assert to_laggard and max(len(m.members) for m in to_laggard) < 150
    assert_fits(m for m in net.sent() if isinstance(m, SyncDigest | SyncState))
