"""Chunk records (gridnode/chunk_records.py) on the memory store: publish, claims racing, done,
failed, released, reopened when the holder is gone, poison, and hostile records refused."""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred

from gridnode import chunk_records, keys
from gridnode.chunk_records import (
    CLAIMED,
    DONE,
    FAILED,
    OPEN,
    POISON,
    BadChunk,
    Board,
    ChunkRecord,
    NotHeld,
    disagrees,
    load,
)
from gridnode.errors import NotFound
from gridnode.media.chunks import Chunk, Plan
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend

JOB = keys.new_id(1_700_000_000)


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the memory store answers at once"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def record(index: int = 1, **kw: Any) -> ChunkRecord:
    fields: dict[str, Any] = {"job": JOB, "index": index, "owner": "owner", "chunks": 3, "first": 1500 * index,
                              "end": 1500 * (index + 1), "rate": "25", "chunk_seconds": 60.0, "seconds": 60.0,
                              "presets": ["720p"], "priority": "normal"}
    return ChunkRecord(**(fields | kw))


def boards(*nodes: str) -> tuple[ObjectStore, list[Board]]:
    store = ObjectStore.synchronous(MemoryBackend())
    return store, [Board(store, n, lambda: 1000.0) for n in nodes]


class BoardTests:
    def test_publish_claim_finish(self) -> None:
        """The owner publishes an open task; a node claims it (holder, one attempt), finishes it
        (done, frames and size); the record in the store says so."""
        store, (owner, worker) = boards("owner", "w1")
        held = result(owner.publish(record()))
        assert held.record.state == OPEN
        claim = result(worker.claim(JOB, "chunk-1"))
        assert (claim.record.state, claim.record.holder, claim.record.attempts) == (CLAIMED, "w1", 1)
        result(worker.finish(claim, 1500, 1234))
        now = result(owner.read(JOB, "chunk-1")).record
        assert (now.state, now.frames, now.size, now.holder) == (DONE, 1500, 1234, "w1")

    def test_publish_keeps_a_record_already_there(self) -> None:
        """A task published again (the owner's next life, the job's adopter) keeps the record that is
        there: a done chunk is not redone."""
        _store, (owner, worker) = boards("owner", "w1")
        result(owner.publish(record()))
        result(worker.finish(result(worker.claim(JOB, "chunk-1")), 1500, 1))
        again = result(Board(owner.store, "adopter", lambda: 2.0).publish(record(owner="adopter")))
        assert again.record.state == DONE and again.record.owner == "owner"

    def test_two_claimers_race_one_wins(self) -> None:
        """Two nodes read the open record, then both write their claim: exactly one wins; the loser
        gets None and the record names the winner."""
        _store, (owner, a, b) = boards("owner", "a", "b")
        result(owner.publish(record()))
        seen_a, seen_b = result(a.read(JOB, "chunk-1")), result(b.read(JOB, "chunk-1"))
        won_a = result(a.claim(JOB, "chunk-1", seen_a))
        won_b = result(b.claim(JOB, "chunk-1", seen_b))
        assert won_a is not None and won_b is None
        assert result(owner.read(JOB, "chunk-1")).record.holder == "a"
        assert result(b.claim(JOB, "chunk-1")) is None  # not open any more

    def test_a_lost_holder_is_reopened_and_cannot_finish(self) -> None:
        """The owner reopens a task whose holder is gone (one holder lost); the old holder's late
        finish fails with NotHeld and writes nothing; another node claims and finishes it."""
        _store, (owner, a, b) = boards("owner", "a", "b")
        result(owner.publish(record()))
        stale = result(a.claim(JOB, "chunk-1"))
        now = result(owner.reopen(JOB, "chunk-1", lambda node: node == "a"))
        assert (now.record.state, now.record.holder, now.record.lost) == (OPEN, "", 1)
        with pytest.raises(NotHeld):
            result(a.finish(stale, 1500, 1))
        claim = result(b.claim(JOB, "chunk-1"))
        result(b.finish(claim, 1500, 1))
        assert result(owner.read(JOB, "chunk-1")).record.state == DONE

    def test_a_live_holder_is_left_alone(self) -> None:
        """Reopening looks at the holder: one that is not gone keeps its task; a done task stays done."""
        _store, (owner, a) = boards("owner", "a")
        result(owner.publish(record()))
        result(a.claim(JOB, "chunk-1"))
        assert result(owner.reopen(JOB, "chunk-1", lambda node: False)).record.state == CLAIMED

    def test_poison_after_losing_poison_many_holders(self) -> None:
        """A task whose holders keep dying fails with code poison at the POISON-th loss."""
        _store, (owner, *workers) = boards("owner", *[f"w{i}" for i in range(POISON)])
        result(owner.publish(record()))
        assert len(workers) == POISON
        for w in workers:
            assert result(w.claim(JOB, "chunk-1")) is not None
            now = result(owner.reopen(JOB, "chunk-1", lambda node, w=w: node == w.node_id)).record
        assert (now.state, now.lost, now.error["code"]) == (FAILED, POISON, "poison")

    def test_fail_and_release(self) -> None:
        """A holder's own failure is recorded with its code; a release by refusal reopens the task
        without a lost holder and the refuser cannot claim it again."""
        _store, (owner, a, b) = boards("owner", "a", "b")
        result(owner.publish(record()))
        result(a.release(result(a.claim(JOB, "chunk-1")), refused=True))
        now = result(owner.read(JOB, "chunk-1")).record
        assert (now.state, now.lost, now.refused) == (OPEN, 0, ["a"])
        assert result(a.claim(JOB, "chunk-1")) is None
        result(b.fail(result(b.claim(JOB, "chunk-1")), "ffmpeg_failed", "exited with status 1"))
        now = result(owner.read(JOB, "chunk-1")).record
        assert now.state == FAILED and now.error == {"code": "ffmpeg_failed", "message": "exited with status 1"}

    def test_tasks_and_remove(self) -> None:
        """The tasks are one listing, the chunk length they were planned with one more read;
        remove deletes records and archives."""
        store, (owner,) = boards("owner")
        for i in range(3):
            result(owner.publish(record(i, first=1500 * i, end=None if i == 2 else 1500 * (i + 1))))
        result(store.put_bytes(keys.chunk_files(JOB, "chunk-0") + "files.tar", b"x"))
        assert result(owner.tasks(JOB)) == ["chunk-0", "chunk-1", "chunk-2"]
        assert result(owner.chunk_seconds(JOB)) == 60.0
        assert result(owner.chunk_seconds(keys.new_id(1_700_000_009))) is None
        result(owner.remove(JOB))
        assert result(store.list_all(keys.chunks_prefix(JOB))) == []
        with pytest.raises(NotFound):
            result(owner.read(JOB, "chunk-0"))


class HostileRecordTests:
    def raw(self, **change: Any) -> bytes:
        body = json.loads(record().dumps())
        body.update(change)
        return json.dumps(body).encode()

    @pytest.mark.parametrize("change,task,words", [
        ({"job": keys.new_id(1_700_000_001)}, "chunk-1", "stored under job"),
        ({}, "chunk-2", "stored as task"),
        ({"index": 3}, "chunk-3", "'index'"),
        ({"index": -1}, "chunk--1", "'index'"),
        ({"index": True}, "chunk-1", "'index'"),
        ({"chunks": 1}, "chunk-1", "'chunks'"),
        ({"kind": "audio"}, "chunk-1", "only chunks"),
        ({"rate": "0/1"}, "chunk-1", "'rate'"),
        ({"rate": "1e9"}, "chunk-1", "'rate'"),
        ({"end": 10}, "chunk-1", "'end'"),
        ({"owner": "../x"}, "chunk-1", "node id"),
        ({"holder": "a/b"}, "chunk-1", "node id"),
        ({"state": "running"}, "chunk-1", "'state'"),
        ({"priority": "urgent"}, "chunk-1", "'priority'"),
        ({"presets": "720p"}, "chunk-1", "'presets'"),
        ({"spec": [1]}, "chunk-1", "'spec'"),
        ({"chunk_seconds": float("nan")}, "chunk-1", "chunk_seconds"),
        ({"format": 2}, "chunk-1", "upgrade"),
        ({"refused": ["n"] * 100}, "chunk-1", "'refused'"),
    ])
    def test_refused_with_the_field_named(self, change: dict[str, Any], task: str, words: str) -> None:
        """Each hostile record is refused (BadChunk) with a message naming what is wrong."""
        with pytest.raises(BadChunk, match=words):
            load(self.raw(**change), JOB, task)

    def test_not_json_and_oversized(self) -> None:
        """Garbage and records over the limit are refused, the latter before any parse, and through
        the board (the store's size check) too."""
        with pytest.raises(BadChunk, match="not JSON"):
            load(b"\xff{", JOB, "chunk-1")
        with pytest.raises(BadChunk, match="bytes"):
            load(b" " * (chunk_records.MAX_BYTES + 1), JOB, "chunk-1")
        store, (board,) = boards("w")
        result(store.put_bytes(keys.chunk_record(JOB, "chunk-1"), b"{" + b" " * chunk_records.MAX_BYTES))
        with pytest.raises(BadChunk):
            result(board.read(JOB, "chunk-1"))

    def test_a_valid_record_round_trips(self) -> None:
        """What the owner writes is what a reader loads."""
        assert load(record().dumps(), JOB, "chunk-1") == record()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                max_size=4),
                    max_leaves=20)


class FuzzTests:
    @settings(max_examples=200, deadline=None)
    @given(change=st.dictionaries(st.sampled_from(sorted(json.loads(record().dumps()))), JSON, max_size=4))
    def test_any_record_loads_or_is_refused(self, change: dict[str, Any]) -> None:
        """Whatever a writer put in a record's fields, reading it gives a record or BadChunk,
        never another error, and what loads names this job's task."""
        body = {**json.loads(record().dumps()), **change}
        try:
            got = load(json.dumps(body).encode(), JOB, "chunk-1")
        except BadChunk:
            return
        assert (got.job, got.task) == (JOB, "chunk-1") and 0 <= got.index < got.chunks

    def test_a_number_past_any_float_is_refused(self) -> None:
        """An integer too large for a float in a number field: BadChunk, not an overflow."""
        body = {**json.loads(record().dumps()), "seconds": 10**400}
        with pytest.raises(BadChunk, match="seconds"):
            load(json.dumps(body).encode(), JOB, "chunk-1")

    @settings(max_examples=200, deadline=None)
    @given(raw=st.binary(max_size=200))
    def test_any_bytes_load_or_are_refused(self, raw: bytes) -> None:
        """Bytes that are not a record are refused as BadChunk."""
        with pytest.raises(BadChunk):
            load(raw, JOB, "chunk-1")


class DisagreesTests:
    def plan(self, cuts: list[int], rate: Fraction = Fraction(25)) -> Plan:
        bounds = [0, *cuts]
        chunks = tuple(Chunk(i, f, bounds[i + 1] if i + 1 < len(bounds) else None, rate) for i, f in enumerate(bounds))
        return Plan(chunks, rate, Fraction(1))

    def test_the_same_cut_agrees(self) -> None:
        """A plan with the record's cut, rate and count agrees."""
        assert disagrees(record(), self.plan([1500, 3000])) == ""

    def test_a_cut_a_rate_or_a_count_that_differs(self) -> None:
        """Another cut, another rate or another number of chunks: the reason says which."""
        assert "slots" in disagrees(record(), self.plan([1500, 3001]))
        assert "slots" in disagrees(record(), self.plan([1500, 3000], Fraction(30000, 1001)))
        assert "chunks" in disagrees(record(), self.plan([1500, 3000, 4500]))
