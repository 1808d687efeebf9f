"""The registry on an in-memory store with a fake clock."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.task import Clock

from gridnode.client.nodes import nodes_from_json
from gridnode.errors import GridnodeError, NotFound, StorageUnavailable
from gridnode.registry.records import (
    MAX_RECORD_BYTES,
    MAX_SPEED,
    MIN_SPEED,
    NodeRecord,
    RecordRead,
    RecordReader,
    parse_record,
)
from gridnode.registry.service import SEEDS, Registry
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.store.rate import BACKGROUND, EVENT, Gate

PREFIX = "registry/prod/east/nodes/"


def make(store: ObjectStore, clock: Clock, node_id: str, **kw: object) -> Registry:
    """A registry whose heartbeats are exactly ``heartbeat`` apart (no jitter: these tests count
    them), unless ``spread`` says otherwise."""
    kw.setdefault("spread", 0.0)
    kw.setdefault("load", lambda: {"running": 1.0})
    return Registry(clock, store, env="prod", pool="east", node_id=node_id,
                    http_url=f"http://127.0.0.1/{node_id}", peer_addr="127.0.0.1:1", heartbeat=30, stale=300,
                    now=clock.seconds, **kw)  # type: ignore[arg-type]


def listed(store: ObjectStore) -> list[str]:
    data, _ = store.backend.get_bytes("registry/prod/east/nodes.json")
    return [n["id"] for n in json.loads(data)["nodes"]]


class RegistryTests:
    def setup_method(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = ObjectStore.synchronous(MemoryBackend())

    def test_register_publish_and_leave(self) -> None:
        """Each node writes its record; the lowest id publishes nodes.json; a clean stop removes it."""
        a, b = make(self.store, self.clock, "a"), make(self.store, self.clock, "b")
        b.startService()
        a.startService()
        assert sorted(i.key for i in self.store.backend.list(PREFIX).items) == [PREFIX + "a.json", PREFIX + "b.json"]
        self.clock.advance(30)
        assert listed(self.store) == ["a", "b"]
        b.stopService()
        self.clock.advance(30)
        assert listed(self.store) == ["a"]
        a.stopService()
        assert listed(self.store) == []
        assert self.store.backend.list(PREFIX).items == []

    def test_leaving_writer_reads_before_it_publishes(self) -> None:
        """The writer's view is up to a heartbeat old when it leaves: a node that registered since
        is in the list it leaves behind (it once wrote an empty list over a live pool)."""
        b = make(self.store, self.clock, "b")
        b.startService()
        assert listed(self.store) == ["b"]
        c = make(self.store, self.clock, "c")
        c.startService()  # b has not read since
        b.stopService()
        assert listed(self.store) == ["c"]

    def test_forget_republishes_at_once(self) -> None:
        """A peer the membership saw leave (or confirmed dead) leaves nodes.json now, not a heartbeat
        later; its old record is not listed again; a later life of the same id is."""
        a, b = make(self.store, self.clock, "a"), make(self.store, self.clock, "b")
        b.startService()
        a.startService()
        assert listed(self.store) == ["a", "b"]
        b.running = False  # gone without deleting its record
        a.forget("b", b.record.incarnation)
        assert listed(self.store) == ["a"]
        self.clock.advance(30)  # the next read still finds b's record: still forgotten
        assert listed(self.store) == ["a"] and a.gone == {"b": b.record.incarnation}
        self.clock.advance(1)
        again = make(self.store, self.clock, "b")
        again.startService()
        self.clock.advance(30)
        assert listed(self.store) == ["a", "b"] and a.gone == {}

    def test_a_dead_writers_successor_publishes_on_forget(self) -> None:
        """The writer (lowest id) confirmed dead: the node that now writes publishes at once (it
        used to ask whether it wrote before dropping the dead writer, and waited a heartbeat)."""
        a, b = make(self.store, self.clock, "a"), make(self.store, self.clock, "b")
        b.startService()
        a.startService()
        self.clock.advance(30)
        assert listed(self.store) == ["a", "b"]
        a.running = False  # killed: its record stays
        b.forget("a", a.record.incarnation)
        assert listed(self.store) == ["b"]

    def test_follow_lists_a_joiner_and_drops_the_dead_within_a_settle(self) -> None:
        """With the membership's view: a node the writer's membership holds alive but the list lacks
        is read in and listed at the next look (a second), not a heartbeat later; one it holds dead
        (not yet confirmed) leaves the list as soon, also when it was the writer. Nothing is
        written while nothing changed."""
        view: dict[str, dict[str, str]] = {"a": {}, "b": {}, "c": {}}
        a, b = make(self.store, self.clock, "a"), make(self.store, self.clock, "b")
        for r in (a, b):
            r.held = lambda r=r: view[r.node_id]  # type: ignore[misc]
            r.startService()
        self.clock.advance(30)
        assert listed(self.store) == ["a", "b"]
        puts = self._count_puts()
        self.clock.advance(5)
        assert puts == []  # steady: no request beyond the heartbeats
        c = make(self.store, self.clock, "c")
        c.startService()  # registered; the writer has not read since
        assert listed(self.store) == ["a", "b"]
        view["a"]["c"] = "alive"  # its membership heard from c
        self.clock.advance(1)
        assert listed(self.store) == ["a", "b", "c"]
        view["b"].update(a="dead", c="alive")  # a is killed: b holds it dead, unconfirmed; its record stays
        a.running = False
        a._follower.stop()  # type: ignore[union-attr]
        self.clock.advance(1)
        assert listed(self.store) == ["b", "c"]
        view["b"]["a"] = "alive"  # it was only stalled and refuted: it writes the list again, at
        view["a"]["b"] = "alive"  # its next heartbeat at the latest
        a.running = True
        a._follower.start(now=False)  # type: ignore[union-attr]
        a._tick()
        assert listed(self.store) == ["a", "b", "c"]

    def test_follow_reads_a_missing_joiner_again_with_backoff(self) -> None:
        """A member held alive whose record is not there yet is looked for again after 2, 4, ... s,
        not every second."""
        view: dict[str, str] = {"z": "alive"}
        a = make(self.store, self.clock, "a")
        a.held = lambda: view
        a.startService()
        lists = self._count_lists()
        for _ in range(8):
            self.clock.advance(1)
        assert len(lists) == 3  # at 1, 3 and 7 s

    def _count_puts(self) -> list[str]:
        puts: list[str] = []
        real = self.store.backend.put_bytes

        def counted(key: str, *a: object, **kw: object) -> object:
            puts.append(key.rsplit("/", 1)[-1])
            return real(key, *a, **kw)  # type: ignore[arg-type]

        self.store.backend.put_bytes = counted  # type: ignore[method-assign]
        return puts

    def _count_lists(self) -> list[str]:
        lists: list[str] = []
        real = self.store.backend.list

        def counted(prefix: str, **kw: object) -> object:
            lists.append(prefix)
            return real(prefix, **kw)  # type: ignore[arg-type]

        self.store.backend.list = counted  # type: ignore[method-assign]
        return lists

    def test_forget_by_a_reader_publishes_nothing(self) -> None:
        """Only the writer (the lowest id) publishes; the others just drop the peer from their view."""
        a, b, c = (make(self.store, self.clock, n) for n in "abc")
        for r in (c, b, a):
            r.startService()
        self.clock.advance(30)
        assert listed(self.store) == ["a", "b", "c"]
        puts = self.store.backend.put_bytes
        calls: list[str] = []
        self.store.backend.put_bytes = lambda key, *a_, **kw: calls.append(key) or puts(key, *a_, **kw)  # type: ignore
        b.forget("c", c.record.incarnation)
        assert calls == [] and [r.id for r in b.live] == ["a", "b"]

    def test_publish_failure_is_logged_not_raised(self) -> None:
        """A store error while republishing leaves the heartbeat to try again."""
        from gridnode.errors import StorageUnavailable

        a, b = make(self.store, self.clock, "a"), make(self.store, self.clock, "b")
        b.startService()
        a.startService()

        def down(*args: object, **kw: object) -> object:
            raise StorageUnavailable("bucket unreachable")

        real = self.store.backend.put_bytes
        self.store.backend.put_bytes = down  # type: ignore[method-assign]
        failures: list[object] = []
        a.forget("b", b.record.incarnation).addErrback(failures.append)
        assert failures == [] and listed(self.store) == ["a", "b"]
        self.store.backend.put_bytes = real  # type: ignore[method-assign]
        b.stopService()
        self.clock.advance(30)
        assert listed(self.store) == ["a"]

    def _count_gets(self) -> list[str]:
        gets: list[str] = []
        real = self.store.backend.get_bytes

        def counted(key: str, **kw: object) -> object:
            gets.append(key.rsplit("/", 1)[-1])
            return real(key, **kw)  # type: ignore[arg-type]

        self.store.backend.get_bytes = counted  # type: ignore[method-assign]
        return gets

    def test_readers_fetch_only_what_they_need(self) -> None:
        """Every heartbeat the writer GETs every record (nodes.json carries the loads); a reader
        GETs none of the nodes its membership holds alive: N GETs a round instead of N²."""
        regs = [make(self.store, self.clock, n) for n in "abc"]
        for r in reversed(regs):
            r.wanted = lambda member: False
            r.startService()
        self.clock.advance(30)
        gets = self._count_gets()
        self.clock.advance(30)
        assert sorted(gets) == ["a.json", "b.json", "c.json"]  # the writer's, and only its
        assert [[x.id for x in r.live] for r in regs] == [["a", "b", "c"]] * 3

    def test_a_reader_fetches_what_it_wants(self) -> None:
        """A record the membership asks for (a node it holds dead, or does not know) is read in full."""
        a, b, c = (make(self.store, self.clock, n) for n in "abc")
        for r in (c, b, a):
            r.wanted = lambda member: member == "b"
            r.startService()
        self.clock.advance(30)
        gets = self._count_gets()
        self.clock.advance(30)
        assert sorted(gets) == ["a.json", "b.json", "b.json", "b.json", "c.json"]

    def _requests(self) -> list[tuple[str, str]]:
        """Every request to the store from now on: (operation, key's last part)."""
        seen: list[tuple[str, str]] = []
        backend = self.store.backend
        for name in ("get_bytes", "put_bytes", "list", "delete"):
            def counted(key: str, *args: object, _real: Any = getattr(backend, name), _name: str = name,
                        **kw: object) -> object:
                seen.append((_name, key.rstrip("/").rsplit("/", 1)[-1]))
                return _real(key, *args, **kw)

            setattr(backend, name, counted)
        return seen

    def test_a_node_starting_in_a_large_pool_reads_a_few_records_not_all(self) -> None:
        """A node whose membership knows no one, in a pool of more than `SMALL_POOL` records:
        its first heartbeat registers (one conditional PUT: no record of an earlier life), lists one
        page and GETs `SEEDS` fresh records for its membership to join through; it is no writer
        and publishes nothing. Once its membership knows the pool, its next read GETs no record of
        a member held alive, and every listed node counts as listed."""
        for i in range(40):
            self.store.backend.put_bytes(f"{PREFIX}n{i:02}.json", record_bytes(f"n{i:02}", heartbeat=1000.0))
        view: dict[str, str] = {}
        seeded: list[list[str]] = []
        reg = make(self.store, self.clock, "z")  # not the lowest id: no writer
        reg.held = lambda: view
        reg.wanted = lambda member: view.get(member) != "alive"
        reg.on_seed.append(lambda records: seeded.append([r.id for r in records]))
        seen = self._requests()
        reg.startService()
        assert [op for op, _ in seen] == ["put_bytes", "list"] + ["get_bytes"] * SEEDS
        assert len(seeded) == 1 and len(set(seeded[0])) == SEEDS and "z" not in seeded[0]
        assert not reg.read_once and not reg.is_writer() and reg.listed_count == 41
        assert not self.store.backend.list("registry/prod/east/nodes.json").items
        view.update({f"n{i:02}": "alive" for i in range(40)} | {"z": "alive"})
        seen.clear()
        self.clock.advance(30)
        assert [op for op, _ in seen] == ["put_bytes", "list"]
        assert len(reg.live) == 41 and reg.read_once and not reg.is_writer()
        assert all(r.listed_only for r in reg.live if r.id != "z")

    def test_a_small_pool_is_read_whole_at_once(self) -> None:
        """At most `SMALL_POOL` records: a starting node's first page is the whole listing, read in
        full at its first heartbeat (one listing), as before; it knows at once whether it writes."""
        for node_id in "bc":
            make(self.store, self.clock, node_id).startService()
        a = make(self.store, self.clock, "a")
        a.held = lambda: {}
        seen = self._requests()
        a.startService()
        assert [op for op, _ in seen].count("list") == 1 and a.is_writer() and listed(self.store) == ["a", "b", "c"]

    def test_a_silent_node_goes_stale_for_readers(self) -> None:
        """A node that stops writing keeps its ETag: a reader's view of it ages and goes stale."""
        a, b, c = (make(self.store, self.clock, n) for n in "abc")
        for r in (c, b, a):
            r.wanted = lambda member: False
            r.startService()
        self.clock.advance(30)
        b.running = False  # hung: its record stays, unchanged
        if b._next is not None:
            b._next.cancel()
        for _ in range(10):
            self.clock.advance(30)
        assert [x.id for x in c.live] == ["a", "b", "c"]
        for _ in range(2):  # a reader dates the record by when it saw it change: a heartbeat late at most
            self.clock.advance(30)
        assert [x.id for x in c.live] == ["a", "c"] and listed(self.store) == ["a", "c"]

    def test_a_new_writer_publishes_exact_loads(self) -> None:
        """When the writer leaves, the next one reads every record in full before it publishes."""
        regs = [make(self.store, self.clock, n) for n in "abc"]
        for r in reversed(regs):
            r.wanted = lambda member: False
            r.load = lambda r=r: {"running": self.clock.seconds()}  # type: ignore[misc]
            r.startService()
        self.clock.advance(30)
        self.clock.advance(30)
        regs[0].stopService()
        self.clock.advance(30)
        data, _ = self.store.backend.get_bytes("registry/prod/east/nodes.json")
        loads = {n["id"]: n["load"] for n in json.loads(data)["nodes"]}
        assert loads == {"b": {"running": self.clock.seconds()}, "c": {"running": self.clock.seconds()}}

    def test_restart_gets_higher_incarnation(self) -> None:
        """A node that comes back after a crash replaces its old record with a higher incarnation."""
        a = make(self.store, self.clock, "a")
        a.startService()
        first = a.record.incarnation
        a.running = False  # a crash: the record stays
        again = make(self.store, self.clock, "a")
        again.startService()
        data, _ = self.store.backend.get_bytes(PREFIX + "a.json")
        assert parse_record(data).incarnation == again.record.incarnation > first

    def test_a_quick_return_after_a_clean_leave_gets_a_higher_incarnation(self) -> None:
        """A node that left cleanly deleted its record; back within the same second, its new life
        still gets a higher incarnation (peers hold the old one ``left`` and admit only a higher)."""
        self.clock.advance(1_795_572_840.2)
        a = make(self.store, self.clock, "a")
        a.startService()
        first = a.record.incarnation
        a.stopService()
        assert listed(self.store) == []
        self.clock.advance(0.3)
        again = make(self.store, self.clock, "a")
        again.startService()
        assert again.record.incarnation > first

    def test_reregisters_when_deleted(self) -> None:
        """If a peer deletes our record, the next heartbeat writes it again."""
        a = make(self.store, self.clock, "a")
        a.startService()
        self.store.backend.delete(PREFIX + "a.json")
        self.clock.advance(30)
        assert self.store.backend.stat(PREFIX + "a.json").size > 0

    def test_bad_records_ignored(self) -> None:
        """Garbage, wrong schemas, huge and stale records are skipped, and the node keeps going."""
        self.store.backend.put_bytes(PREFIX + "junk.json", b"\x00\xffnot json")
        self.store.backend.put_bytes(PREFIX + "list.json", b"[1, 2]")
        self.store.backend.put_bytes(PREFIX + "big.json", b" " * 70000)
        self.store.backend.put_bytes(PREFIX + "other.json", json.dumps({
            "id": "someone-else", "http_url": "http://x", "peer_addr": "", "started": 1, "incarnation": 1,
            "heartbeat": 1000, "load": {}}).encode())
        self.store.backend.put_bytes(PREFIX + "old.json", json.dumps({
            "id": "old", "http_url": "http://x", "peer_addr": "", "started": 1, "incarnation": 1,
            "heartbeat": 1, "load": {}}).encode())
        self.store.backend.put_bytes(PREFIX + "sub/x.json", b"{}")
        a = make(self.store, self.clock, "a")
        a.startService()
        assert [r.id for r in a.live] == ["a"]
        assert listed(self.store) == ["a"]
        assert a.last_error is None

    def test_store_down_retries(self) -> None:
        """With the store unreachable, registration is retried with backoff and reported."""
        from gridnode.errors import StorageUnavailable

        backend = MemoryBackend()
        real_put = backend.put_bytes
        calls = {"n": 0}

        def flaky(*args: object, **kw: object) -> object:
            calls["n"] += 1
            if calls["n"] <= 3:
                raise StorageUnavailable("bucket unreachable")
            return real_put(*args, **kw)  # type: ignore[arg-type]

        backend.put_bytes = flaky  # type: ignore[method-assign]
        a = make(ObjectStore.synchronous(backend), self.clock, "a")
        a.startService()
        assert not a.registered and a.last_error == "bucket unreachable"
        assert len(self.clock.getDelayedCalls()) == 1  # one chain of retries, not a storm
        self.clock.advance(1)
        assert len(self.clock.getDelayedCalls()) == 1
        self.clock.advance(2)
        self.clock.advance(4)
        assert a.registered and a.last_error is None


def record_bytes(node_id: str, incarnation: int = 1, heartbeat: float = 1000.0) -> bytes:
    return json.dumps({"id": node_id, "http_url": f"http://{node_id}", "peer_addr": "", "started": 1,
                       "incarnation": incarnation, "heartbeat": heartbeat, "load": {}}).encode()


class RecordReaderTests:
    """The one reader of node records, without I/O: it says what to GET and judges the answers."""

    def setup_method(self) -> None:
        self.backend = MemoryBackend()
        self.reader = RecordReader(PREFIX)

    def read(self, now: float = 1000.0, wanted: Any = None) -> tuple[list[str], RecordRead]:
        """One read against the backend: the keys it fetched, and the read."""
        read = self.reader.begin(self.backend.list(PREFIX).items, now, wanted)
        fetched = list(read.fetch)
        for key in read.fetch:
            try:
                data, info = self.backend.get_bytes(key, max_size=MAX_RECORD_BYTES)
            except GridnodeError as e:
                read.failed(key, e)
            else:
                read.got(key, data, info.etag)
        return fetched, read

    def test_a_first_read_fetches_every_record_and_skips_what_is_not_one(self) -> None:
        """Every record is fetched, in listing order; an object that is not a record, or too large
        to be one, is left out without a GET, and the read says why."""
        self.backend.put_bytes(PREFIX + "b.json", record_bytes("b"))
        self.backend.put_bytes(PREFIX + "a.json", record_bytes("a"))
        self.backend.put_bytes(PREFIX + "big.json", b" " * (MAX_RECORD_BYTES + 1))
        self.backend.put_bytes(PREFIX + "sub/x.json", b"{}")
        self.backend.put_bytes(PREFIX + "notes.txt", b"hello")
        fetched, read = self.read()
        assert fetched == [PREFIX + "a.json", PREFIX + "b.json"]
        assert [r.id for r in read.done()] == ["a", "b"]
        assert read.skipped == [(PREFIX + "big.json", f"{MAX_RECORD_BYTES + 1} bytes"),
                                (PREFIX + "notes.txt", "not a node record"),
                                (PREFIX + "sub/x.json", "not a node record")]

    def test_unreadable_records_are_skipped_and_store_errors_fail_the_read(self) -> None:
        """A malformed record, or one stored under another node's name, is skipped with its reason;
        a record deleted between the listing and the GET is left out quietly; any other error is
        the store's and fails the read."""
        self.backend.put_bytes(PREFIX + "a.json", record_bytes("a"))
        self.backend.put_bytes(PREFIX + "junk.json", b"\x00{{")
        self.backend.put_bytes(PREFIX + "c.json", record_bytes("someone-else"))
        read = self.reader.begin(self.backend.list(PREFIX).items, 1000.0)
        read.failed(PREFIX + "a.json", NotFound("deleted since"))
        for key in (PREFIX + "c.json", PREFIX + "junk.json"):
            data, info = self.backend.get_bytes(key)
            read.got(key, data, info.etag)
        assert read.done() == []
        assert [key for key, _ in read.skipped] == [PREFIX + "c.json", PREFIX + "junk.json"]
        assert "stored under 'c'" in read.skipped[0][1]
        with pytest.raises(StorageUnavailable):
            read.failed(PREFIX + "a.json", StorageUnavailable("bucket unreachable"))

    def test_a_later_read_fetches_only_wanted_news_and_changes(self) -> None:
        """Unchanged records are not fetched again. A new or changed one is fetched when wanted;
        when not, a changed one is kept, dated by when the change was seen, a new one is held as
        listed only (its id, dated when seen), and either is fetched in full when wanted next."""
        for node_id in "abc":
            self.backend.put_bytes(PREFIX + f"{node_id}.json", record_bytes(node_id, heartbeat=1000.0))
        self.read()[1].done()
        self.backend.put_bytes(PREFIX + "b.json", record_bytes("b", heartbeat=1010.0))
        for node_id in "cde":
            self.backend.put_bytes(PREFIX + f"{node_id}.json", record_bytes(node_id, heartbeat=1010.0))
        fetched, read = self.read(now=1030.0, wanted=lambda node_id: node_id in "ce")
        assert fetched == [PREFIX + "c.json", PREFIX + "e.json"]
        records = {r.id: r for r in read.done()}
        assert {i: r.heartbeat for i, r in records.items()} == {"a": 1000.0, "b": 1030.0, "c": 1010.0, "d": 1030.0,
                                                                 "e": 1010.0}
        assert records["d"].listed_only and not records["d"].peer_addr and not records["e"].listed_only
        fetched, read = self.read(now=1060.0, wanted=lambda node_id: False)
        assert fetched == [] and {r.id: r.heartbeat for r in read.done()}["b"] == 1030.0
        fetched, read = self.read(now=1090.0)
        assert fetched == [PREFIX + "b.json", PREFIX + "d.json"]
        assert {r.id: r.heartbeat for r in read.done()}["b"] == 1010.0 and not read.done()[3].listed_only

    def test_a_read_fetches_at_most_its_limit_and_lists_the_rest(self) -> None:
        """A node whose membership knows no one wants every record: a read with a limit fetches that
        many at random and holds the others as listed only (never as absent: a node missing from
        the list could be taken for gone); the next reads fetch the rest, limit by limit."""
        for i in range(10):
            self.backend.put_bytes(PREFIX + f"n{i}.json", record_bytes(f"n{i}"))
        first, read = self.read_limited(4)
        records = read.done()
        assert len(first) == 4 and len(records) == 10
        assert sorted(r.id for r in records if not r.listed_only) == sorted(k[len(PREFIX):-5] for k in first)
        second, read = self.read_limited(4)
        assert len(second) == 4 and not set(first) & set(second)
        third, read = self.read_limited(4)
        assert len(third) == 2 and not any(r.listed_only for r in read.done())

    def read_limited(self, limit: int) -> tuple[list[str], RecordRead]:
        read = self.reader.begin(self.backend.list(PREFIX).items, 1000.0, lambda node_id: True, limit=limit,
                                 rng=random.Random(4))
        for key in read.fetch:
            data, info = self.backend.get_bytes(key)
            read.got(key, data, info.etag)
        read.done()
        return list(read.fetch), read

    def test_a_failed_read_leaves_the_last_one_standing(self) -> None:
        """Only a finished read replaces what the reader holds."""
        self.backend.put_bytes(PREFIX + "a.json", record_bytes("a"))
        self.read()[1].done()
        self.backend.put_bytes(PREFIX + "a.json", record_bytes("a", heartbeat=1010.0))
        fetched, _ = self.read()  # never done
        fetched_again, read = self.read()
        assert fetched == fetched_again == [PREFIX + "a.json"] and read.done()[0].heartbeat == 1010.0


class LoadFigureTests:
    """The load a record carries (``speed`` and ``work`` among it), written and read back, and a
    hostile record's figures."""

    def test_speed_and_work_round_trip_to_the_client(self) -> None:
        """A node's load, speed and work included, reaches the record, nodes.json and the client."""
        store, clock = ObjectStore.synchronous(MemoryBackend()), Clock()
        clock.advance(1000)
        load = {"running": 2.0, "queued": 1.0, "workers": 4.0, "free_disk": 5e10, "work": 312.5, "speed": 1.75}
        a = make(store, clock, "a", load=lambda: dict(load))
        a.startService()
        data, _ = store.backend.get_bytes(PREFIX + "a.json")
        assert parse_record(data, "a").load == load
        assert parse_record(NodeRecord("b", "http://b", "", 1.0, 1, 2.0, load).dumps()).load == load
        listed_nodes = nodes_from_json(store.backend.get_bytes("registry/prod/east/nodes.json")[0])
        assert listed_nodes[0].load == load and listed_nodes[0].speed == 1.75
        a.stopService()

    @pytest.mark.parametrize("figure", ["NaN", "Infinity", "-Infinity", "-1", "true", '"fast"', "null", "[2]",
                                        "1e999"])
    def test_a_hostile_figure_is_left_out_not_the_record(self, figure: str) -> None:
        """NaN, infinities, negatives and non-numbers in a record's load are left out; the record
        (and so the node, for its peers' membership) is still read, its other figures kept."""
        raw = record_bytes("a").replace(b'"load": {}', f'"load": {{"running": 1, "speed": {figure}, '
                                                       f'"work": {figure}}}'.encode())
        record = parse_record(raw, "a")
        assert record.load == {"running": 1.0}
        assert record.id == "a" and record.heartbeat == 1000.0

    @pytest.mark.parametrize("speed", [0, MIN_SPEED / 2, MAX_SPEED * 2, 1e300])
    def test_a_speed_out_of_range_is_left_out(self, speed: float) -> None:
        """A speed no node measures (zero, or one that would draw every upload) is left out."""
        raw = record_bytes("a").replace(b'"load": {}', f'"load": {{"speed": {speed!r}, "work": 5}}'.encode())
        assert parse_record(raw, "a").load == {"work": 5.0}
        raw = record_bytes("a").replace(b'"load": {}', f'"load": {{"speed": {MAX_SPEED!r}}}'.encode())
        assert parse_record(raw, "a").load == {"speed": MAX_SPEED}


class DeleteDeadTests:
    """The registry deletes a dead peer's record, only while it holds the dead life."""

    def setup_method(self) -> None:
        self.clock = Clock()
        self.store = ObjectStore.synchronous(MemoryBackend())
        self.registry = make(self.store, self.clock, "a")

    def delete_dead(self, member: str, incarnation: int) -> None:
        failures: list[object] = []
        self.registry.delete_dead(member, incarnation).addErrback(failures.append)
        assert failures == []

    def test_the_dead_life_is_deleted(self) -> None:
        """A record of the dead incarnation, or of an earlier one, is deleted."""
        self.store.backend.put_bytes(PREFIX + "b.json", record_bytes("b", incarnation=4))
        self.store.backend.put_bytes(PREFIX + "c.json", record_bytes("c", incarnation=5))
        self.delete_dead("b", 5)
        self.delete_dead("c", 5)
        assert self.store.backend.list(PREFIX).items == []

    def test_a_later_life_keeps_its_record(self) -> None:
        """A node back with a higher incarnation keeps its new record."""
        self.store.backend.put_bytes(PREFIX + "b.json", record_bytes("b", incarnation=6))
        self.delete_dead("b", 5)
        assert [i.key for i in self.store.backend.list(PREFIX).items] == [PREFIX + "b.json"]

    def test_only_the_record_read_is_deleted(self) -> None:
        """The delete is conditional on the ETag read: a record rewritten in between stays; one
        gone already, or a store that fails, is no error (the deletion is logged, never raised)."""
        self.store.backend.put_bytes(PREFIX + "b.json", record_bytes("b", incarnation=5))
        real_get = self.store.backend.get_bytes

        def get_then_rewrite(key: str, **kw: Any) -> Any:
            got = real_get(key, **kw)
            self.store.backend.put_bytes(PREFIX + "b.json", record_bytes("b", incarnation=9))
            return got

        self.store.backend.get_bytes = get_then_rewrite  # type: ignore[method-assign]
        self.delete_dead("b", 5)
        self.store.backend.get_bytes = real_get  # type: ignore[method-assign]
        assert [i.key for i in self.store.backend.list(PREFIX).items] == [PREFIX + "b.json"]
        self.delete_dead("nobody", 5)

        def down(*args: object, **kw: object) -> object:
            raise StorageUnavailable("bucket unreachable")

        self.store.backend.get_bytes = down  # type: ignore[method-assign]
        self.delete_dead("b", 9)

    def test_the_delete_is_an_events_request(self) -> None:
        """Acting on a death spends the store's EVENT lane (a bucket shared by the events in
        progress, gridnode/store/rate.py), not the registry's background lane."""
        lanes: list[str] = []

        class Recording(Gate):
            def run(self, lane: str, send: Any) -> Any:
                lanes.append(lane)
                return super().run(lane, send)

        store = ObjectStore.synchronous(self.store.backend).gated(Recording(self.clock, rate=100.0, slots=8))
        self.registry = make(store.in_lane(BACKGROUND), self.clock, "a")
        self.store.backend.put_bytes(PREFIX + "b.json", record_bytes("b", incarnation=5))
        self.delete_dead("b", 5)
        assert lanes == [EVENT, EVENT] and self.store.backend.list(PREFIX).items == []


class RegistryServiceTests:
    """The registry as a Twisted service."""

    def test_it_starts_and_stops_with_its_parent(self) -> None:
        """A child of the node's MultiService registers when it starts; when it stops, no timer is
        left and its record is gone by the time the stop has fired."""
        clock = Clock()
        clock.advance(1000)
        store = ObjectStore.synchronous(MemoryBackend())
        node = MultiService()
        registry = make(store, clock, "a")
        registry.setServiceParent(node)
        node.startService()
        assert registry.running and registry.registered and len(clock.getDelayedCalls()) == 1
        stopped = node.stopService()
        assert stopped.called and not registry.running and clock.getDelayedCalls() == []
        assert store.backend.list(PREFIX).items == []
