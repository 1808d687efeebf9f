"""Notes between nodes about chunks: the ``ChunkNote`` command sealed and opened as the
membership's messages are (gridnode/membership/wire.py), carried by the membership service to
the node (``on_note``), dropped and counted by a node that does not know the command (a rolling
upgrade), and checked by `ChunkGrid` before any request; the peers' idle workers from nodes.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from gridnode import keys
from gridnode.chunk_grid import FIGURE, ChunkGrid, PeerLoads, others_waiting
from gridnode.membership import swim, wire
from gridnode.membership.wire import Note
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.test_chunk_records import result
from tests.test_membership_service import KEY, Wires, _pair

JOB = keys.new_id(1_700_000_700)


def note(kind: str = "offer", **kw: Any) -> Note:
    fields = {"dest": "b", "dest_addr": "127.0.0.1:7002", "sender": "a", "kind": kind, "job": JOB, "task": "chunk-3"}
    return Note(**(fields | kw))


def open_(opener: wire.Opener, args: dict[str, Any], command: str = "ChunkNote") -> Any:
    return opener.open(command, args["version"], args["sent"], args["nonce"], args["payload"], args["mac"])


class WireTests:
    def test_round_trip(self) -> None:
        """A sealed note opens to the same note, as a ChunkNote command."""
        command, args = wire.seal(KEY, note(), now=1000.0)
        assert command is wire.ChunkNote
        assert open_(wire.Opener(wire.fixed_keys(KEY), lambda: 1000.0), args) == note()

    @pytest.mark.parametrize("change", [{"kind": "steal"}, {"task": "x" * 300}, {"job": 5}, {"sender": None}])
    def test_a_bad_note_is_malformed(self, change: dict[str, Any]) -> None:
        """A kind not known, a field too long or not a string: dropped as malformed."""
        payload = json.dumps({"type": "ChunkNote", **{**note().__dict__, **change}}).encode()
        args = {"version": wire.VERSION, "sent": 1000.0, "nonce": b"n" * 12, "payload": payload,
                "mac": wire._mac(KEY, "ChunkNote", wire.VERSION, 1000.0, b"n" * 12, payload)}
        with pytest.raises(wire.Dropped) as e:
            open_(wire.Opener(wire.fixed_keys(KEY), lambda: 1000.0), args)
        assert e.value.reason == "malformed"

    def test_a_note_under_another_name_or_key_is_dropped(self) -> None:
        """The MAC covers the command: a note replayed as a Ping, or sealed with another key, is dropped."""
        _, args = wire.seal(KEY, note(), now=1000.0)
        for command, keys_, reason in (("Ping", (KEY,), "bad_mac"), ("ChunkNote", (b"x" * 32,), "bad_mac")):
            with pytest.raises(wire.Dropped) as e:
                open_(wire.Opener(wire.fixed_keys(*keys_), lambda: 1000.0), args, command)
            assert e.value.reason == reason


class NoteFuzzTests:
    @settings(max_examples=150, deadline=None)
    @given(raw=st.dictionaries(st.sampled_from(["dest", "dest_addr", "sender", "kind", "job", "task", "extra"]),
                               st.none() | st.integers() | st.text(max_size=300) | st.lists(st.integers(), max_size=2),
                               max_size=7))
    def test_any_payload_is_a_note_or_malformed(self, raw: dict[str, Any]) -> None:
        """A note's payload opens to a Note of short strings and a known kind, or is refused with
        the errors the opener counts as malformed."""
        try:
            got = wire.note_from_dict(raw)
        except (KeyError, TypeError, ValueError):
            return
        assert got.kind in wire.NOTE_KINDS and all(len(v) <= wire.NOTE_FIELD for v in got.__dict__.values())


class CarriedTests:
    def test_a_note_reaches_the_node_not_the_machine(self) -> None:
        """a sends b a note: b's on_note gets it; without one it is dropped (no_handler), counted."""
        wires = Wires()
        services = _pair(wires)
        got: list[Note] = []
        services["b"].on_note = got.append
        try:
            sent = note(sender="a")
            services["a"].send_note(sent)
            wires.run_until(lambda: got, 10)
            assert got == [sent]
            services["b"].on_note = None
            services["a"].send_note(note(kind="done"))
            wires.run_until(lambda: services["b"].dropped.get("no_handler"), 10)
        finally:
            for service in services.values():
                service.halt()

    def test_a_node_that_does_not_know_the_command_drops_it_and_goes_on(self, monkeypatch: Any) -> None:
        """A receiver without ChunkNote (a release before it; its sender's check failed) counts it
        as unknown_command, keeps the connection and goes on with the membership: the sender still
        hears b alive, and nothing was raised."""
        wires = Wires()
        services = _pair(wires)
        monkeypatch.setattr(wire, "NOTES", {})
        try:
            services["a"].send_note(note(sender="a"))
            wires.run_until(lambda: services["b"].dropped.get("unknown_command"), 10)
            assert "protocol_error" not in services["b"].dropped
            assert wires.pumps and not any(p.serverIO.disconnected for p in wires.pumps)
            wires.run_until(lambda: services["a"].machine.member("b").state == swim.ALIVE, 30)  # type: ignore[union-attr]
            assert services["a"].machine.member("b").state == swim.ALIVE  # type: ignore[union-attr]
        finally:
            for service in services.values():
                service.halt()


class _Machine:
    def __init__(self) -> None:
        self.states = {"p1": swim.ALIVE, "p2": swim.SUSPECT}

    def member(self, peer: str) -> swim.MemberView | None:
        state = self.states.get(peer)
        return None if state is None else swim.MemberView(peer, f"10.0.0.{len(peer)}:8081", state, 1)


class _Membership:
    def __init__(self) -> None:
        self.machine = _Machine()
        self.on_gone: list[Any] = []
        self.on_note: Any = None
        self.sent: list[Note] = []
        self.dropped: dict[str, int] = {}

    def send_note(self, n: Note) -> None:
        self.sent.append(n)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class GridTests:
    def grid(self, tmp: Path, free: int = 1, draining: bool = False) -> tuple[ChunkGrid, _Membership, MemoryBackend]:
        backend = MemoryBackend()
        membership = _Membership()
        clock = Clock()
        grid = ChunkGrid(clock, ObjectStore.synchronous(backend), membership, node_id="me",
                         nodes_list=keys.nodes_list("dev", "default"), parse_presets=lambda t, s: [],
                         probe=lambda p: Deferred(), run_chunk=lambda c, p: Deferred(),
                         local_free=lambda: free, draining=lambda: draining, gone=lambda n: False,
                         scratch=str(tmp / "chunks"))
        return grid, membership, backend

    @pytest.mark.parametrize("bad", [{"job": "../x"}, {"job": "01"}, {"task": "chunk-x"}, {"task": "audio-0"},
                                     {"task": "chunk-1/../../x"}])
    def test_a_hostile_note_is_dropped_before_any_request(self, tmp_path: Path, bad: dict[str, str]) -> None:
        """A note naming no job id or no chunk task leads to no request, counted with the peer
        messages dropped (bad_note)."""
        grid, membership, backend = self.grid(tmp_path)
        membership.on_note(note(**bad))
        assert membership.dropped == {"bad_note": 1} and backend._objects == {}

    def test_notes_go_where_they_belong(self, tmp_path: Path) -> None:
        """An offer reaches the worker (which reads the record: none here, so nothing is claimed);
        a holder's note the owner; a member gone the owner's holders."""
        grid, membership, _backend = self.grid(tmp_path)
        offered: list[tuple[str, str]] = []
        noted: list[tuple[str, ...]] = []
        gone: list[str] = []
        grid.worker.offered = lambda job, task: offered.append((job, task)) or succeed(False)  # type: ignore[method-assign]
        grid.owner.noted = lambda *a: noted.append(a)  # type: ignore[method-assign]
        grid.owner.holder_gone = gone.append  # type: ignore[method-assign]
        membership.on_note(note("offer"))
        membership.on_note(note("done", sender="p1"))
        membership.on_gone[0]("p1", 3)
        assert offered == [(JOB, "chunk-3")] and noted == [("p1", "done", JOB, "chunk-3")] and gone == ["p1"]

    def test_sends_only_to_live_members(self, tmp_path: Path) -> None:
        """A note goes to a member held alive, at its address; none to a suspect or unknown one."""
        grid, membership, _backend = self.grid(tmp_path)
        for peer in ("p1", "p2", "p3"):
            grid.send(peer, "offer", JOB, "chunk-1")
        assert membership.sent == [Note("p1", "10.0.0.2:8081", "me", "offer", JOB, "chunk-1")]

    def test_a_job_keeps_its_turn_only_while_another_waits(self) -> None:
        """A job's chunks keep their turn in the node's queue while another job's task waits for
        its workers; with only the job's own tasks waiting, they stay open for idle peers."""
        class Pool:
            queued: list[str] = []

            def waiting(self) -> list[str]:
                return self.queued

        pool = Pool()
        pool.queued = ["J1.chunk-3", "J1.audio-0"]
        assert not others_waiting(pool, "J1")
        pool.queued = ["J1.chunk-3", "J2"]
        assert others_waiting(pool, "J1") and others_waiting(pool, "J2")
        pool.queued = ["J2.chunk-0"]
        assert others_waiting(pool, "J1")

    def test_the_load_figure(self, tmp_path: Path) -> None:
        """chunk_idle: the free workers; none while draining."""
        assert self.grid(tmp_path, free=3)[0].load_figures() == {FIGURE: 3.0}
        assert self.grid(tmp_path, free=3, draining=True)[0].load_figures() == {FIGURE: 0.0}


class PeerLoadsTests:
    def test_read_once_per_refresh_and_idle_only(self) -> None:
        """nodes.json is read at most once per refresh; only nodes with a chunk_idle of 1 or more
        are taken (an older node has none); a bad figure or entry is left out."""
        backend = MemoryBackend()
        store = ObjectStore.synchronous(backend)
        key = keys.nodes_list("dev", "default")
        body = {"nodes": [{"id": "p1", "load": {FIGURE: 2}}, {"id": "old", "load": {"workers": 4}},
                          {"id": "p3", "load": {FIGURE: "many"}}, {"id": "p4", "load": {FIGURE: 0}}, "junk"]}
        backend.put_bytes(key, json.dumps(body).encode())
        clock = Clock()
        loads = PeerLoads(store, key, clock, refresh=30)
        assert result(loads.idle()) == [("p1", 2.0)]
        backend.put_bytes(key, json.dumps({"nodes": []}).encode())
        clock.advance(10)
        assert result(loads.idle()) == [("p1", 2.0)]
        clock.advance(30)
        assert result(loads.idle()) == []
        backend.put_bytes(key, b"not json")
        clock.advance(30)
        assert result(loads.idle()) == []

    def test_a_job_starting_reads_them_anew(self) -> None:
        """A chunked job starting (``stale``) reads nodes.json at its first offer, unless it was
        read in the last FRESH s: peers busy a refresh ago may be idle now."""
        backend = MemoryBackend()
        store = ObjectStore.synchronous(backend)
        key = keys.nodes_list("dev", "default")
        backend.put_bytes(key, json.dumps({"nodes": [{"id": "p1", "load": {FIGURE: 0}}]}).encode())
        clock = Clock()
        loads = PeerLoads(store, key, clock, refresh=30)
        assert result(loads.idle()) == []
        backend.put_bytes(key, json.dumps({"nodes": [{"id": "p1", "load": {FIGURE: 1}}]}).encode())
        clock.advance(1)
        loads.stale()
        assert result(loads.idle()) == []  # read a moment ago: kept
        clock.advance(2)
        loads.stale()
        assert result(loads.idle()) == [("p1", 1.0)]
