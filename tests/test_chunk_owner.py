"""The owner's side of pool-run chunks (gridnode/chunk_owner.py) on the memory store and a fake
clock: its own idle workers first, offers to idle peers, collection of a peer's archive into the
stitch's layout, a holder's death and poison, a peer's failure, adoption of a job's records,
requests kept to a few per chunk."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gridnode import chunk_files, keys
from gridnode.chunk_owner import ChunkOwner, OwnedJob
from gridnode.chunk_records import CLAIMED, DONE, OPEN, POISON, Board, Held
from gridnode.errors import GridnodeError
from gridnode.media import stitch
from gridnode.media.split import Task
from gridnode.metrics import Metrics
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.test_chunk_records import result
from tests.test_chunk_worker import SPEC, plan

JOB = keys.new_id(1_700_000_500)


class Counting(MemoryBackend):
    """The memory store, counting requests by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def _count(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def get_bytes(self, key: str, **kw: Any) -> Any:
        self._count("get")
        return super().get_bytes(key, **kw)

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> Any:
        self._count("put")
        return super().put_bytes(key, data, **kw)

    def put_file(self, key: str, path: str, **kw: Any) -> Any:
        self._count("put_body")
        with open(path, "rb") as f:
            return MemoryBackend.put_bytes(self, key, f.read())

    def get_file(self, key: str, path: str) -> Any:
        self._count("get_body")
        data, info = MemoryBackend.get_bytes(self, key)
        with open(path, "wb") as f:
            f.write(data)
        return info


class Rig:
    def __init__(self, tmp: Path, free: int = 0, node: str = "owner", metrics: Metrics | None = None) -> None:
        self.backend = Counting()
        self.store = ObjectStore.synchronous(self.backend)
        self.clock = Clock()
        self.clock.advance(1000)
        self.free = free
        self.dead: set[str] = set()
        self.sent: list[tuple[str, str, str, str]] = []
        self.idle: list[tuple[str, float]] = [("p1", 2), ("p2", 1)]
        self.local_runs: list[tuple[Task, Deferred[Any]]] = []
        self.tmp = tmp
        self.owner = ChunkOwner(Board(self.store, node, self.clock.seconds), self.store, self.clock,
                                send=lambda *a: self.sent.append(a), peers=lambda: succeed(list(self.idle)),
                                gone=lambda n: n in self.dead, local_free=lambda: self.free,
                                rng=random.Random(3), metrics=metrics)
        #: each chunk's last state and node as the owner told the job's chunk list
        self.told: dict[int, tuple[str, str]] = {}
        self.job = OwnedJob(JOB, "t1", "low", [], SPEC, 60.0, plan(), str(tmp / "work"), 10_000_000,
                            lambda index, state, node: self.told.__setitem__(index, (state, node)))
        (tmp / "work").mkdir(exist_ok=True)

    def status(self) -> list[tuple[int, str, str]]:
        return [(index, state, node) for index, (state, node) in sorted(self.told.items())]

    def local(self, task: Task, progress: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.local_runs.append((task, d))
        if self.free > 0:
            self.free -= 1
        return d

    def start(self, index: int) -> Deferred[Any]:
        run = self.owner.run_task(self.job, self.local)
        d = run(Task("chunk", index, ["ffmpeg"], 60.0), lambda p: None)
        self.clock.advance(0)
        return d

    def peer(self, node: str) -> Board:
        return Board(self.store, node, self.clock.seconds)

    def finish_as(self, node: str, index: int, content: bytes = b"video") -> None:
        """``node`` claims chunk ``index``, stores its archive and marks it done."""
        board = self.peer(node)
        held = result(board.claim(JOB, f"chunk-{index}"))
        assert held is not None
        self.done_by(board, held, content)

    def done_by(self, board: Board, held: Held, content: bytes = b"video") -> None:
        folder = self.tmp / f"made-{held.record.index}"
        folder.mkdir(exist_ok=True)
        (folder / "v.mp4").write_bytes(content)
        size = chunk_files.pack(str(folder), str(self.tmp / "a.tar"), 10_000)
        self.backend.put_file(keys.chunk_files(JOB, held.record.task) + chunk_files.ARCHIVE, str(self.tmp / "a.tar"))
        result(board.finish(held, plan().chunks[held.record.index].frames, size))

    def record(self, index: int) -> Any:
        return result(self.owner.board.read(JOB, f"chunk-{index}")).record

    def offers(self, index: int) -> list[str]:
        return [peer for peer, kind, _job, task in self.sent if kind == "offer" and task == f"chunk-{index}"]


class OwnerTests:
    def test_our_idle_worker_first_then_offers(self, tmp_path: Path) -> None:
        """With one idle worker, the first task is claimed and run here (never offered), the second
        offered to two idle peers; the status lists each chunk where it stands; the audio pass goes
        to the local runner as it is."""
        rig = Rig(tmp_path, free=1)
        first, _second = rig.start(1), rig.start(2)
        assert [t.index for t, _ in rig.local_runs] == [1]
        assert (rig.record(1).state, rig.record(1).holder) == (CLAIMED, "owner")
        assert rig.offers(1) == [] and sorted(rig.offers(2)) == ["p1", "p2"]
        rig.local_runs[0][1].callback(1500)
        assert result(first) == 1500
        assert rig.status() == [(1, DONE, "owner"), (2, OPEN, "")]
        rig.owner.noted("p2", "claimed", JOB, "chunk-2")
        assert rig.status()[1] == (2, CLAIMED, "p2")
        run = rig.owner.run_task(rig.job, rig.local)
        run(Task("audio", 0, ["ffmpeg"]), lambda p: None)
        assert rig.local_runs[-1][0].kind == "audio"

    def test_a_peers_done_chunk_is_collected_into_the_stitch_layout(self, tmp_path: Path) -> None:
        """A peer claims, says so, finishes: one read of the record, the archive fetched and unpacked
        into chunk-NNN/ of the work folder, the task fires with the record's frames."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        rig.finish_as("p1", 2)
        rig.owner.noted("p1", "done", JOB, "chunk-2")
        assert result(d) == plan().chunks[2].frames
        made = tmp_path / "work" / stitch.chunk_dir(2) / "v.mp4"
        assert made.read_bytes() == b"video" and not (tmp_path / "work" / "chunk-002.tar").exists()

    def test_a_peer_that_made_one_is_offered_the_next_at_once(self, tmp_path: Path) -> None:
        """A peer's done note says a worker of its is free: it is offered the next open task it has
        not refused right away, by a note (no request), not at that task's next round of offers;
        a failed or released note offers nothing."""
        rig = Rig(tmp_path)
        rig.idle = [("p1", 1)]
        d, d2, d3 = rig.start(1), rig.start(2), rig.start(3)
        assert (rig.offers(1), rig.offers(2), rig.offers(3)) == (["p1"], ["p1"], ["p1"])
        rig.owner.noted("p1", "claimed", JOB, "chunk-1")
        rig.owner.noted("p2", "released", JOB, "chunk-2")
        rig.owner.noted("p2", "failed", JOB, "chunk-3")
        rig.finish_as("p1", 1)
        calls = dict(rig.backend.calls)
        rig.owner.noted("p1", "done", JOB, "chunk-1")
        assert result(d) == plan().chunks[1].frames
        assert (rig.offers(2), rig.offers(3)) == (["p1", "p1"], ["p1"])  # the next one, and one only
        assert rig.backend.calls["get"] - calls["get"] == 1  # the done record's read, no more
        assert not d2.called and not d3.called

    def test_a_dead_holder_is_reopened_and_offered_elsewhere(self, tmp_path: Path) -> None:
        """The holder dies: its task is reopened (one holder lost) and offered to the live peer only;
        another node then makes it."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        assert result(rig.peer("p1").claim(JOB, "chunk-2")) is not None
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        rig.sent.clear()
        rig.dead.add("p1")
        rig.owner.holder_gone("p1")
        rig.clock.advance(0)
        assert (rig.record(2).state, rig.record(2).lost) == (OPEN, 1)
        assert rig.offers(2) == ["p2"]
        rig.finish_as("p2", 2)
        rig.owner.noted("p2", "done", JOB, "chunk-2")
        assert result(d) == plan().chunks[2].frames

    def test_a_lost_done_note_is_found_by_a_look(self, tmp_path: Path) -> None:
        """The holder's done note never arrives: a look at the record (after 60 s, jittered) finds it
        done and collects it; before, the held task costs no read."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        rig.finish_as("p1", 2)
        reads = rig.backend.calls.get("get", 0)
        rig.clock.advance(40)
        assert rig.backend.calls.get("get", 0) == reads and not d.called
        rig.clock.advance(40)
        assert result(d) == plan().chunks[2].frames

    def test_a_holder_gone_unheard_is_found_at_the_next_look(self, tmp_path: Path) -> None:
        """No death reported to us, but the membership holds the holder gone: the next round
        reopens its task."""
        rig = Rig(tmp_path)
        rig.start(2)
        result(rig.peer("p1").claim(JOB, "chunk-2"))
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        rig.dead.add("p1")
        rig.clock.advance(200)
        assert rig.record(2).lost == 1

    def test_poison_after_three_lost_holders(self, tmp_path: Path) -> None:
        """Each holder dies in turn: at the third the task fails with code poison."""
        rig = Rig(tmp_path)
        rig.idle = [(f"p{i}", 1) for i in range(5)]
        d = rig.start(2)
        for i in range(POISON):
            assert result(rig.peer(f"p{i}").claim(JOB, "chunk-2")) is not None
            rig.owner.noted(f"p{i}", "claimed", JOB, "chunk-2")
            rig.dead.add(f"p{i}")
            rig.owner.holder_gone(f"p{i}")
            rig.clock.advance(0)
        with pytest.raises(GridnodeError) as e:
            result(d)
        assert e.value.code == "poison"

    def test_a_peers_failure_fails_the_task_with_its_code(self, tmp_path: Path) -> None:
        """The holder's ffmpeg failed: the task fails with ffmpeg_failed (the job's run decides)."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        board = rig.peer("p1")
        result(board.fail(result(board.claim(JOB, "chunk-2")), "ffmpeg_failed", "exited 1"))
        rig.owner.noted("p1", "failed", JOB, "chunk-2")
        with pytest.raises(GridnodeError) as e:
            result(d)
        assert e.value.code == "ffmpeg_failed"

    def test_a_failed_chunk_is_made_again_by_a_new_run_a_poisoned_one_not(self, tmp_path: Path) -> None:
        """A run of the job again finds a chunk a peer failed: it is open again (attempts kept) and
        offered; a chunk failed as poison fails the new run at once."""
        rig = Rig(tmp_path)
        first = rig.start(2)
        board = rig.peer("p1")
        result(board.fail(result(board.claim(JOB, "chunk-2")), "ffmpeg_failed", "exited 1"))
        rig.owner.noted("p1", "failed", JOB, "chunk-2")
        with pytest.raises(GridnodeError):
            result(first)
        rig.sent.clear()
        rig.start(2)
        assert (rig.record(2).state, rig.record(2).attempts, rig.record(2).error) == (OPEN, 1, None)
        assert rig.offers(2)
        for i in range(POISON):
            result(rig.peer(f"x{i}").claim(JOB, "chunk-2"))
            result(rig.owner.board.reopen(JOB, "chunk-2", lambda n: True))
        with pytest.raises(GridnodeError) as e:
            result(rig.start(2))
        assert e.value.code == "poison"

    def test_the_stores_trouble_while_collecting_redoes_nothing(self, tmp_path: Path) -> None:
        """The archive cannot be fetched now (the store's trouble): the task fails with that code
        and the chunk stays done, collected by the next run."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        rig.finish_as("p1", 2)
        fetch = rig.backend.get_file

        def down(key: str, path: str) -> Any:
            raise GridnodeError("the store is unreachable", code="storage_unavailable", status=503)

        rig.backend.get_file = down  # type: ignore[method-assign]
        rig.owner.noted("p1", "done", JOB, "chunk-2")
        with pytest.raises(GridnodeError) as e:
            result(d)
        assert e.value.code == "storage_unavailable" and rig.record(2).state == DONE
        rig.backend.get_file = fetch  # type: ignore[method-assign]
        assert result(rig.start(2)) == plan().chunks[2].frames

    def test_a_failed_round_is_tried_again(self, tmp_path: Path) -> None:
        """The peers' loads cannot be read: the round is logged and tried again later, and offers go
        out once they can."""
        rig = Rig(tmp_path)
        calls = []

        def peers() -> Deferred[Any]:
            calls.append(1)
            if len(calls) == 1:
                return fail(GridnodeError("nodes.json unreadable", code="storage_unavailable"))
            return succeed(list(rig.idle))

        rig.owner.peers = peers
        rig.start(2)
        assert rig.offers(2) == []
        rig.clock.advance(20)
        assert sorted(rig.offers(2)) == ["p1", "p2"]

    def test_a_bad_archive_is_made_again(self, tmp_path: Path) -> None:
        """An archive whose size is not its record's: the task is sent back to open (a holder lost)
        and offered again."""
        rig = Rig(tmp_path)
        rig.start(2)
        rig.finish_as("p1", 2)
        rig.backend.put_bytes(keys.chunk_files(JOB, "chunk-2") + chunk_files.ARCHIVE, b"short")
        rig.sent.clear()
        rig.owner.noted("p1", "done", JOB, "chunk-2")
        rig.clock.advance(0)
        assert (rig.record(2).state, rig.record(2).lost) == (OPEN, 1) and rig.offers(2)

    def test_no_idle_peer_means_no_offer_and_no_read(self, tmp_path: Path) -> None:
        """A pool with no idle worker: the owner publishes, sends nothing and reads nothing while
        the task waits, however long."""
        rig = Rig(tmp_path)
        rig.idle = []
        rig.start(2)
        before = dict(rig.backend.calls)
        for _ in range(40):
            rig.clock.advance(30)
        assert rig.sent == [] and rig.backend.calls == before == {"put": 1}

    def test_offers_back_off_and_a_lost_claim_note_is_read_once(self, tmp_path: Path) -> None:
        """A task nobody takes is offered again at growing intervals; its record is read before each
        repeat, and once it shows a holder (whose note was lost) the offers stop."""
        rig = Rig(tmp_path)
        rig.start(2)
        times = []
        for _ in range(200):
            rig.clock.advance(5)
            count = len(rig.offers(2))
            if not times or count != times[-1][1]:
                times.append((rig.clock.seconds(), count))
        gaps = [b[0] - a[0] for a, b in zip(times, times[1:], strict=False)]
        assert gaps[-1] > gaps[0] * 4
        result(rig.peer("p1").claim(JOB, "chunk-2"))
        sent = len(rig.offers(2))
        rig.clock.advance(1000)
        assert len(rig.offers(2)) == sent

    def test_the_requests_of_a_peers_chunk(self, tmp_path: Path) -> None:
        """The requests of a chunk a peer makes: the owner's PUT of the record, its GET when told
        it is done, the archive's fetch; the peer's GET and PUT of its claim, the archive's PUT and
        the finish's PUT. Seven requests, bodies included, whatever the chunk's length."""
        rig = Rig(tmp_path)
        d = rig.start(2)
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        owner_calls = dict(rig.backend.calls)
        rig.finish_as("p1", 2)
        peer_calls = {k: v - owner_calls.get(k, 0) for k, v in rig.backend.calls.items()}
        rig.owner.noted("p1", "done", JOB, "chunk-2")
        result(d)
        assert owner_calls == {"put": 1}
        assert peer_calls == {"get": 1, "put": 2, "put_body": 1}
        assert rig.backend.calls == {"put": 3, "get": 2, "put_body": 1, "get_body": 1}

    def test_end_removes_records_and_tells_holders(self, tmp_path: Path) -> None:
        """The job's end: a task still waiting fails (cancelled), the records and archives are
        deleted, each peer that held a task told."""
        rig = Rig(tmp_path)
        waiting = rig.start(3)
        d = rig.start(2)
        rig.owner.noted("p1", "claimed", JOB, "chunk-2")
        rig.finish_as("p1", 2)
        rig.owner.noted("p1", "done", JOB, "chunk-2")
        result(d)
        result(rig.owner.end(JOB))
        with pytest.raises(GridnodeError) as e:
            result(waiting)
        assert e.value.code == "cancelled" and rig.owner.entries == {}
        assert ("p1", "ended", JOB, "") in rig.sent and rig.status()[0] == (2, DONE, "p1")
        assert result(rig.store.list_all(keys.chunks_prefix(JOB))) == []


    def test_a_worker_freed_by_the_audio_pass_takes_an_open_task(self, tmp_path: Path) -> None:
        """No idle worker at first (the audio pass holds it): the task is offered; once the audio
        pass ends, our freed worker claims the task still open rather than wait for its next offer."""
        rig = Rig(tmp_path)
        run = rig.owner.run_task(rig.job, rig.local)
        audio = run(Task("audio", 0, ["ffmpeg"]), lambda p: None)
        chunk = rig.start(1)
        assert sorted(rig.offers(1)) == ["p1", "p2"] and [t.kind for t, _ in rig.local_runs] == ["audio"]
        rig.free = 1
        rig.local_runs[0][1].callback(None)
        result(audio)
        rig.clock.advance(0)
        assert [t.key for t, _ in rig.local_runs] == ["audio-0", "chunk-1"]
        assert (rig.record(1).state, rig.record(1).holder) == (CLAIMED, "owner")
        rig.local_runs[1][1].callback(1500)
        assert result(chunk) == 1500


    def test_a_stopped_run_waits_no_more_and_keeps_the_records(self, tmp_path: Path) -> None:
        """The job's entry cancelled (a client's cancel, the node stopping): its chunks held by a
        peer or still open fail ``cancelled`` at once; the records stay for a run again or an
        adopter, and no holder is told the job ended."""
        rig = Rig(tmp_path)
        held, still_open = rig.start(1), rig.start(2)
        rig.owner.noted("p1", "claimed", JOB, "chunk-1")
        rig.owner.stop(JOB)
        for d in (held, still_open):
            with pytest.raises(GridnodeError) as e:
                result(d)
            assert e.value.code == "cancelled"
        assert rig.owner.entries == {} and not [s for s in rig.sent if s[1] == "ended"]
        assert rig.record(1).state == rig.record(2).state == OPEN
        again = rig.start(2)  # a run again of the job publishes over the same records
        assert not again.called and rig.record(2).state == OPEN


    def test_a_job_keeps_its_turn_in_a_busy_node(self, tmp_path: Path) -> None:
        """With ``turn``, no worker idle: the job's first two open tasks are claimed here anyway
        (one runs, one waits its tenant's turn in the node's queue), the next offered; once one
        ends, the next open one is claimed here."""
        rig = Rig(tmp_path)
        rig.owner.turn = lambda job_id: job_id == JOB
        first, second, third, fourth = rig.start(1), rig.start(2), rig.start(3), rig.start(4)
        assert [t.index for t, _ in rig.local_runs] == [1, 2]
        assert rig.offers(1) == rig.offers(2) == [] and rig.offers(3) and rig.offers(4)
        rig.local_runs[0][1].callback(1500)
        rig.clock.advance(0)
        assert result(first) == 1500 and [t.index for t, _ in rig.local_runs] == [1, 2, 3]
        assert not second.called and not third.called and not fourth.called


class AdoptionTests:
    def test_the_adopter_keeps_done_chunks_and_redoes_the_old_owners_own(self, tmp_path: Path) -> None:
        """The old owner's records: a peer's done chunk is collected (not run again), a task the old
        owner ran itself is reopened without a holder counted lost and run by the adopter, a task
        a live peer holds is waited for and then names the adopter as its owner."""
        old = Rig(tmp_path, free=1, node="old")
        old.start(1)  # run by the old owner itself
        old.start(2)
        old.start(3)
        old.finish_as("p1", 2)
        held = result(old.peer("p2").claim(JOB, "chunk-3"))
        new = Rig(tmp_path, free=2, node="new")
        new.backend, new.store = old.backend, old.store
        new.owner.board.store = new.owner.store = old.store
        new.dead.add("old")
        one, two, three = new.start(1), new.start(2), new.start(3)
        assert result(two) == plan().chunks[2].frames
        assert [t.index for t, _ in new.local_runs] == [1]
        assert (new.record(1).holder, new.record(1).lost) == ("new", 0)
        assert (new.record(3).owner, new.record(3).holder) == ("new", "p2")
        assert new.status() == [(1, CLAIMED, "new"), (2, DONE, "p1"), (3, CLAIMED, "p2")]
        new.done_by(old.peer("p2"), held)  # the holder's finish lands over the adopter's rewrite
        assert new.record(3).state == DONE
        new.owner.noted("p2", "done", JOB, "chunk-3")
        assert result(three) == plan().chunks[3].frames
        new.local_runs[0][1].callback(1500)
        assert result(one) == 1500
