"""The pipeline's decisions on fakes: an in-memory store, a fake clock, fake media."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock

import gridnode.spool
from gridnode import jobs
from gridnode.adoption import KeeperRing
from gridnode.config import build_config
from gridnode.errors import Busy, GridnodeError, StorageUnavailable
from gridnode.pipeline import RELEASE_GRACE, JobService
from gridnode.registry.records import MAX_SPEED
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.fakes import FakeMedia
from tests.test_spool_hash import out_of_space_halfway


class PipelineTests:
    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend()
        self.media = FakeMedia(tmp_path)
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 1,
                                   "min-free": 0, "max-upload": 1}).with_identity("n1")
        self.jobs = JobService(self.clock, config, ObjectStore.synchronous(self.backend), self.media,
                               now=self.clock.seconds)

    def upload(self, body: bytes = b"video bytes", **kw: Any) -> Any:
        spool = self.jobs.admit(len(body))
        spool.write(body)
        results: list[Any] = []
        self.jobs.submit(spool, name=kw.get("name", "movie.mov"), presets=kw.get("presets"),
                         checksum=kw.get("checksum")).addBoth(results.append)
        return results[0], spool.path

    def record(self, job_id: str) -> dict[str, Any]:
        return json.loads(self.backend.get_bytes(f"jobs/{job_id}.json")[0])

    def test_happy_path(self) -> None:
        """An upload is queued at once; input, outputs and every state's record end in the store."""
        job, spool_path = self.upload()
        assert job.state == jobs.QUEUED and job.input["name"] == "movie.mov"
        assert job.sha256 == hashlib.sha256(b"video bytes").hexdigest()  # every upload, asked or not
        assert self.backend.get_bytes(f"inputs/{job.id}/source")[0] == b"video bytes"
        seen: list[str] = []
        self.jobs.subscribe(job.id, lambda j: seen.append(f"{j.state}:{j.progress}"))
        started, progress, _ = self.media.hooks[job.id]
        started()
        assert self.record(job.id)["state"] == jobs.TRANSCODING
        progress(0.5)
        progress(0.4)
        self.media.finish(job.id)
        assert seen == ["transcoding:0.0", "transcoding:0.5", "storing:0.5", "done:1.0"]
        rec = self.record(job.id)
        assert rec["state"] == "done" and rec["outputs"][0]["url"] == f"/results/{job.id}/video.mp4"
        assert rec["outputs"][0]["duration"] == 3.96  # as the output measured, not the input's 4.0
        assert self.backend.get_bytes(f"outputs/{job.id}/video.mp4")[0] == b"converted"
        assert not os.path.exists(spool_path) and job.id not in self.jobs.active
        listing = self.jobs.listing()
        assert listing["active"] == [] and listing["recent"][0]["id"] == job.id

    def test_load_says_the_work_held_and_the_speed_measured(self) -> None:
        """The load (/health, the registry record) gives the seconds of input still to convert and,
        once a job has finished, the speed measured: no speed before it."""
        job, _ = self.upload()
        load = self.jobs.load()
        assert load["work"] == 4.0 and "speed" not in load  # FakeMedia probes 4.0 s
        started, progress, _ = self.media.hooks[job.id]
        started()
        progress(0.5)
        assert self.jobs.load()["work"] == 2.0
        self.media.finish(job.id)
        load = self.jobs.load()
        assert load["work"] == 0.0 and load["running"] == 0
        assert 0 < load["speed"] <= MAX_SPEED  # 4 s of input over the test's real seconds

    def test_a_job_with_no_timed_output_measures_no_speed(self) -> None:
        """A poster alone takes a frame, not the input: its ratio would make the node look hundreds
        of times faster than it converts, and draw every client's uploads."""
        job, _ = self.upload(presets="poster")
        started, _, _ = self.media.hooks[job.id]
        started()
        self.media.finish(job.id, duration=None)
        assert self.record(job.id)["state"] == "done"
        assert "speed" not in self.jobs.load()

    def test_a_chunked_jobs_chunks_are_told_and_stored(self) -> None:
        """The media side's chunk list: on the job at once (answers and subscribers), not a write of
        its own, in the record with the job's next state; no speed measured (several workers)."""
        job, _ = self.upload()
        seen: list[list[str]] = []
        self.jobs.subscribe(job.id, lambda j: seen.append([c["state"] for c in j.chunks]))
        started, _, _ = self.media.hooks[job.id]
        tell = self.media.chunk_hooks[job.id]
        assert tell is not None
        chunk = {"index": 0, "start": 0.0, "seconds": 2.0, "state": "queued", "node": "", "tries": 0}
        tell([chunk, {**chunk, "index": 1, "start": 2.0}])
        assert self.record(job.id)["chunks"] == []  # no store write for a chunk's change
        started()
        assert [c["state"] for c in self.record(job.id)["chunks"]] == ["queued", "queued"]
        tell([{**chunk, "state": "running", "node": "n1", "tries": 1}, {**chunk, "index": 1, "start": 2.0}])
        tell([{**chunk, "state": "running", "node": "n1", "tries": 1}, {**chunk, "index": 1, "start": 2.0}])
        assert seen == [["queued", "queued"], ["queued", "queued"], ["running", "queued"]]  # a repeat is no change
        done = [{**chunk, "state": "done", "node": "n1", "tries": 1}, {**chunk, "index": 1, "state": "done"}]
        tell(done)
        self.media.finish(job.id)
        rec = self.record(job.id)
        assert rec["state"] == "done" and rec["chunks"] == done
        assert "speed" not in self.jobs.load()

    def test_checksum_mismatch_keeps_nothing(self) -> None:
        """A wrong Upload-Checksum: refused, spool removed, nothing in the store."""
        result, spool_path = self.upload(checksum=hashlib.sha256(b"other").hexdigest())
        assert result.value.code == "checksum_mismatch"
        assert not os.path.exists(spool_path)
        assert self.backend.list("").items == []

    def test_right_checksum_accepted(self) -> None:
        """The right sha256 passes."""
        job, _ = self.upload(checksum=hashlib.sha256(b"video bytes").hexdigest())
        assert job.state == jobs.QUEUED

    def test_not_a_video(self) -> None:
        """A probe failure is the upload's answer; nothing is kept."""
        self.media.probe_error = GridnodeError("not a video", code="not_a_video", status=422)
        result, spool_path = self.upload()
        assert result.value.code == "not_a_video"
        assert not os.path.exists(spool_path) and self.backend.list("").items == []

    def test_unknown_preset(self) -> None:
        """An unknown preset is refused before probing."""
        result, _ = self.upload(presets="mp4-720p,gif")
        assert result.value.code == "unknown_preset"

    def test_empty_upload(self) -> None:
        """An empty body is not a video."""
        result, _ = self.upload(b"")
        assert result.value.code == "not_a_video"

    def test_full_node_says_busy(self) -> None:
        """Past workers + queue jobs, admission answers 503 with Retry-After."""
        self.upload()
        self.upload()
        with pytest.raises(Busy) as e:
            self.jobs.admit(10)
        assert e.value.status == 503 and e.value.retry_after > 0

    def test_too_large_declared(self) -> None:
        """A declared length over --max-upload is refused before reading."""
        with pytest.raises(GridnodeError) as e:
            self.jobs.admit(2 * 1024 * 1024)
        assert e.value.code == "too_large" and e.value.status == 413

    def test_disk_taken_meanwhile_is_insufficient_storage(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Free space that other uploads took after the check: reserving the declared length
        finds out, the upload is refused with 507 before its body is read, and it holds no slot
        and leaves no file."""
        probe = self.jobs.spool.new("probe")
        reserved = probe.reserve(4096)
        probe.discard()
        if not reserved:
            pytest.skip("no fallocate(2) for this folder's filesystem")
        monkeypatch.setattr(gridnode.spool, "_fallocate", out_of_space_halfway)
        with pytest.raises(GridnodeError) as e:
            self.jobs.admit(1000)
        assert e.value.code == "insufficient_storage" and e.value.status == 507
        assert os.listdir(self.jobs.spool.folder) == [] and not self.jobs.uploading
        monkeypatch.undo()
        job, _ = self.upload()  # nothing held: the next upload, with room, is taken
        assert job.state == jobs.QUEUED

    def test_too_large_streamed(self) -> None:
        """A chunked body that grows past --max-upload is stopped mid-way."""
        spool = self.jobs.admit(None)
        spool.write(b"x" * (1024 * 1024))
        with pytest.raises(GridnodeError) as e:
            spool.write(b"x")
        assert e.value.code == "too_large"

    def test_cancel_while_transcoding(self) -> None:
        """Cancel: state cancelled, recorded, spool removed."""
        job, spool_path = self.upload()
        self.media.hooks[job.id][0]()
        results: list[Any] = []
        self.jobs.cancel(job.id).addBoth(results.append)
        assert results[0].state == jobs.CANCELLED
        assert self.record(job.id)["state"] == "cancelled"
        assert not os.path.exists(spool_path)

    def test_cancelled_job_keeps_its_progress(self) -> None:
        """ffmpeg stopped by a cancel reports "progress=end" on its way out: the cancelled job
        keeps the progress it had, not 1.0."""
        job, _ = self.upload()
        started, progress, _ = self.media.hooks[job.id]
        started()
        progress(0.25)
        cancel = self.media.cancel

        def cancel_like_ffmpeg(job_id: str) -> None:
            progress(1.0)  # what a SIGTERMed ffmpeg's last report says
            cancel(job_id)

        self.media.cancel = cancel_like_ffmpeg  # type: ignore[method-assign]
        results: list[Any] = []
        self.jobs.cancel(job.id).addBoth(results.append)
        assert results[0].state == jobs.CANCELLED and results[0].progress == 0.25
        assert self.record(job.id)["progress"] == 0.25

    def test_store_down_refuses_the_upload(self) -> None:
        """With the store unreachable when the body is complete, the upload is refused with 503
        storage_unavailable and a Retry-After, and nothing of it is kept, here or in the store:
        the client sends it again, to this node or another."""
        real = self.backend.put_file
        down = {"on": True}

        def put_file(*a: Any, **kw: Any) -> Any:
            if down["on"]:
                raise StorageUnavailable("bucket unreachable")
            return real(*a, **kw)

        self.backend.put_file = put_file  # type: ignore[method-assign]
        result, spool_path = self.upload()
        assert result.value.code == "storage_unavailable" and result.value.status == 503
        assert result.value.retry_after > 0
        assert not os.path.exists(spool_path) and not self.jobs.uploading and not self.jobs.active
        assert self.backend.list("").items == [] and self.media.runs == {}
        down["on"] = False
        job, _ = self.upload()
        assert job.state == jobs.QUEUED and job.id in self.media.runs

    def test_record_refused_removes_the_input(self) -> None:
        """The input is stored but the record cannot be written: 503, and the input, record and
        marker are removed (no half-accepted job for a peer to find)."""
        real = self.backend.put_bytes

        def put_bytes(key: str, *a: Any, **kw: Any) -> Any:
            if key.startswith("active/"):
                raise StorageUnavailable("bucket unreachable")
            return real(key, *a, **kw)

        self.backend.put_bytes = put_bytes  # type: ignore[method-assign]
        result, _ = self.upload()
        assert result.value.code == "storage_unavailable"
        assert self.backend.list("").items == [] and not self.jobs.active

    def test_get_falls_back_to_store(self) -> None:
        """A finished job is read from its stored record."""
        job, _ = self.upload()
        self.media.hooks[job.id][0]()
        self.media.finish(job.id)
        results: list[Any] = []
        self.jobs.get(job.id).addBoth(results.append)
        assert results[0].state == "done"
        self.jobs.get("01ARZ3NDEKTSV4RRFFQ69G5FAV").addBoth(results.append)
        assert results[1].value.code == "not_found"


class OwnershipTests:
    """Adoption, poison, drain and recovery, with two nodes sharing one store."""

    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.backend = MemoryBackend()
        self.tmp = tmp_path
        #: the nodes the adopters hold gone (the membership's and the registry's word, in a node)
        self.gone: set[str] = set()
        self.n1, self.m1 = self.service("n1")
        self.n2, self.m2 = self.service("n2")

    def service(self, node: str, queue: int = 2) -> tuple[JobService, FakeMedia]:
        media = FakeMedia(self.tmp)
        config = build_config(cli={"work-dir": str(self.tmp / node), "workers": 2, "queue": queue, "min-free": 0,
                                   "job-lease": 30}).with_identity(node)
        svc = JobService(self.clock, config, ObjectStore.synchronous(self.backend), media, now=self.clock.seconds)
        svc.adopter.gone = self.gone.__contains__
        return svc, media

    def markers(self) -> list[str]:
        return sorted(i.key for i in self.backend.list("active/").items)

    def upload(self, svc: JobService) -> Any:
        spool = svc.admit(5)
        spool.write(b"video")
        results: list[Any] = []
        svc.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(results.append)
        return results[0]

    def record(self, job_id: str) -> dict[str, Any]:
        return json.loads(self.backend.get_bytes(f"jobs/{job_id}.json")[0])

    def test_a_live_owners_job_is_never_adopted_whatever_its_age(self) -> None:
        """Nothing renews a job's record, and nothing needs to: while its owner is not gone, no pass
        claims the job, however long ago its record was written."""
        job = self.upload(self.n1)
        self.n1.startService()
        for _ in range(30):
            self.clock.advance(10)
        writes = self.backend.get_bytes(f"jobs/{job.id}.json")[1].etag
        assert self.backend.get_bytes(f"jobs/{job.id}.json")[1].etag == writes
        adopted: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(adopted.append)
        assert adopted == [0] and job.id not in self.n2.active and self.record(job.id)["node"] == "n1"

    def test_stop_service_stops_every_loop(self) -> None:
        """startService begins the looks at our own and the old markers, and `recovered` fires once
        recovery is over; a subscriber to a job run elsewhere adds a poll of its record.
        stopService stops all of them: nothing is left on the clock."""
        job = self.upload(self.n1)
        self.n1.startService()
        self.n2.startService()
        recovered: list[Any] = []
        self.n1.recovered.addCallback(recovered.append)
        assert recovered == [None]
        seen: list[str] = []
        self.n2.subscribe(job.id, lambda j: seen.append(j.state), poll=1.0)
        assert len(self.clock.getDelayedCalls()) == 5  # each node's two looks, n2's poll
        self.clock.advance(1)
        assert seen == ["queued"]
        stopped: list[Any] = []
        self.n1.stopService().addCallback(stopped.append)
        self.n2.stopService().addCallback(stopped.append)
        assert stopped == [None, None] and not self.n1.running
        assert self.clock.getDelayedCalls() == []

    def test_a_gone_owners_job_is_adopted_once_and_finished(self) -> None:
        """Its owner gone, two nodes take over its prefix: exactly one claims the job, marks it
        under its own id, runs it from the stored input with attempts 2, and finishes it."""
        job = self.upload(self.n1)  # n1 then dies
        self.gone.add("n1")
        n3, m3 = self.service("n3")
        a: list[Any] = []
        b: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(a.append)
        n3.adopter.take_over("n1").addBoth(b.append)
        assert a[0] + b[0] == 1
        winner, media = (self.n2, self.m2) if a[0] else (n3, m3)
        assert self.record(job.id)["node"] == winner.node_id and self.record(job.id)["attempts"] == 2
        assert self.markers() == [f"active/{winner.node_id}/{job.id}"]
        media.hooks[job.id][0]()
        media.finish(job.id)
        rec = self.record(job.id)
        assert rec["state"] == "done" and rec["node"] == winner.node_id
        assert self.markers() == []

    def test_an_adopted_job_keeps_its_priority_and_tenant(self) -> None:
        """A high-priority job of alice's, its owner gone: the adopter queues it at high priority
        among alice's jobs, as its owner did."""
        spool = self.n1.admit(5, level="high")
        spool.write(b"video")
        done: list[Any] = []
        self.n1.submit(spool, name="m.mov", presets=None, checksum=None, tenant="alice",
                       priority="high").addBoth(done.append)
        job = done[0]
        assert self.m1.places[job.id] == (0, "alice") and self.record(job.id)["priority"] == "high"
        self.gone.add("n1")
        adopted: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(adopted.append)
        assert adopted == [1] and self.m2.places[job.id] == (0, "alice")
        assert self.n2.active[job.id].job.priority == "high"

    def test_two_takeovers_at_once_claim_a_job_once(self) -> None:
        """A second takeover of the same prefix while the first runs: the job is claimed once
        (attempts 2), not a second time as "ours from an earlier life"."""
        job = self.upload(self.n1)
        self.gone.add("n1")
        held: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

        def run(fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
            if fn == self.backend.get_bytes and str(args[0]).startswith("jobs/"):
                d: Deferred[Any] = Deferred()
                held.append((fn, args, d))
                return d
            return succeed(fn(*args, **kwargs))

        config = build_config(cli={"work-dir": str(self.tmp / "n3"), "workers": 2, "queue": 2, "min-free": 0,
                                   "job-lease": 30}).with_identity("n3")
        media = FakeMedia(self.tmp)
        n3 = JobService(self.clock, config, ObjectStore(self.backend, run), media, now=self.clock.seconds)
        n3.adopter.gone = self.gone.__contains__
        passes: list[Any] = []
        n3.adopter.take_over("n1").addBoth(passes.append)
        n3.adopter.take_over("n1").addBoth(passes.append)
        while held:  # the reads answer in order, each when released
            fn, args, d = held.pop(0)
            d.callback(fn(*args))
        assert sorted(passes) == [0, 1], passes
        assert self.record(job.id)["attempts"] == 2 and list(media.runs) == [job.id]

    def test_a_takeover_reads_one_prefix_not_the_pool(self) -> None:
        """Taking over a dead node's jobs lists that node's prefix alone and reads only its jobs'
        records, however many jobs the rest of the pool has."""
        busy, _ = self.service("n9", queue=20)
        others = [self.upload(busy).id for _ in range(20)]
        mine = [self.upload(self.n1).id for _ in range(2)]
        self.gone.add("n1")
        reads: list[str] = []
        listed: list[str] = []
        real_get, real_list = self.backend.get_bytes, self.backend.list
        self.backend.get_bytes = lambda key, **kw: reads.append(key) or real_get(key, **kw)  # type: ignore
        self.backend.list = lambda prefix, **kw: listed.append(prefix) or real_list(prefix, **kw)  # type: ignore
        got: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(got.append)
        assert got == [2] and listed == ["active/n1/"]
        records = sorted(k for k in reads if k.startswith("jobs/"))  # the rest: the inputs fetched
        assert records == sorted(f"jobs/{j}.json" for j in mine)
        assert not set(records) & {f"jobs/{j}.json" for j in others}

    def test_what_does_not_fit_is_handed_to_its_keepers(self) -> None:
        """A watcher with room for two of a dead node's six jobs claims two and moves the other
        markers to each job's keeper among the other live members; each keeper claims its own at
        its next look at its prefix. Every job ends claimed once."""
        owner, _ = self.service("n1", queue=6)
        made = {self.upload(owner).id for _ in range(6)}
        members = ["n1", "n2", "n3", "n4"]
        self.gone.add("n1")
        watcher, _ = self.service("w", queue=0)  # 2 workers: room for 2
        watcher.adopter.members = lambda: members + ["w"]
        got: list[Any] = []
        watcher.adopter.take_over("n1").addBoth(got.append)
        assert got == [2]
        ring = KeeperRing(["n2", "n3", "n4"])
        moved = {k for k in self.markers() if not k.startswith("active/w/")}
        assert moved == {f"active/{ring.keepers(j, 1)[0]}/{j}" for j in made if j not in watcher.active}
        total = 2
        for name in ("n3", "n4"):
            svc = self.service(name, queue=6)[0]
            svc.adopter.take_over(name).addBoth(got.append)
            total += got[-1]
        self.n2.adopter.check_own().addBoth(got.append)
        total += got[-1]
        assert total == 6
        assert {self.record(j)["attempts"] for j in made} == {2}

    def test_lost_owner_stops(self) -> None:
        """An owner taken for dead whose job was adopted finds out at its next write and writes
        nothing more."""
        job = self.upload(self.n1)
        self.gone.add("n1")
        claimed: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(claimed.append)
        assert claimed == [1]
        self.m1.hooks[job.id][0]()  # n1 wakes up and starts ffmpeg: its write fails
        assert job.id not in self.n1.active  # stopped there
        rec = self.record(job.id)
        assert rec["node"] == "n2" and rec["state"] == "queued" and rec["attempts"] == 2

    def test_poison_after_three_attempts(self) -> None:
        """A job whose owners keep dying is quarantined as failed/poison on its third adoption."""
        job = self.upload(self.n1)
        owner = "n1"
        for i in range(2):
            self.gone.add(owner)
            svc, _ = self.service(f"x{i}")
            got: list[Any] = []
            svc.adopter.take_over(owner).addBoth(got.append)
            assert got == [1]
            owner = svc.node_id
        assert self.record(job.id)["attempts"] == 3
        self.gone.add(owner)
        svc, _ = self.service("last")
        svc.adopter.take_over(owner)
        rec = self.record(job.id)
        assert rec["state"] == "failed" and rec["error"]["code"] == "poison"
        assert self.markers() == []

    def test_drain_releases_to_the_pool(self) -> None:
        """Draining refuses uploads, and a job still running at the timeout is released (lease 0),
        its marker left under the draining node: its watchers take it when it has left."""
        job = self.upload(self.n1)
        self.m1.hooks[job.id][0]()
        drained: list[Any] = []
        self.n1.drain(5).addBoth(drained.append)
        with pytest.raises(Busy):
            self.n1.admit(5)
        self.clock.advance(5)
        assert drained == [1]
        rec = self.record(job.id)
        assert rec["state"] == "queued" and rec["lease_until"] == 0.0 and rec["node"] == "n1"
        assert self.markers() == [f"active/n1/{job.id}"]
        got: list[Any] = []
        self.n2.adopter.take_over("n1").addBoth(got.append)
        assert got == [1] and self.record(job.id)["node"] == "n2"

    def test_drain_waits_for_running_jobs(self) -> None:
        """A job that finishes within the drain timeout ends done on its own node."""
        job = self.upload(self.n1)
        self.m1.hooks[job.id][0]()
        drained: list[Any] = []
        self.n1.drain(60).addBoth(drained.append)
        self.clock.advance(1)
        self.m1.finish(job.id)
        assert drained == [0] and self.record(job.id)["state"] == "done"

    def test_drain_ends_in_time_with_the_store_down(self) -> None:
        """With the store unreachable, the record that hands a released job back retries for ever:
        the drain still ends at its timeout plus the release grace, the job's journal kept."""
        job = self.upload(self.n1)
        self.m1.hooks[job.id][0]()

        def down(*a: Any, **kw: Any) -> Any:
            raise StorageUnavailable("down")

        self.backend.put_bytes = down  # type: ignore[method-assign]
        drained: list[Any] = []
        self.n1.drain(5).addBoth(drained.append)
        self.clock.advance(5)
        assert drained == []  # released; its record is being retried
        self.clock.advance(RELEASE_GRACE)
        assert drained == [1]
        assert os.path.exists(self.n1.active[job.id].spool_path + ".json")  # the journal resumes it

    def test_hurry_ends_a_drain_at_once(self) -> None:
        """A second SIGTERM (`hurry`) ends the wait for running jobs and for their release at once."""
        job = self.upload(self.n1)
        self.m1.hooks[job.id][0]()
        drained: list[Any] = []
        self.n1.drain(600).addBoth(drained.append)
        self.clock.advance(1)
        self.n1.hurry()
        assert drained == [1] and self.record(job.id)["lease_until"] == 0.0

    def test_restart_resumes_from_the_journal(self) -> None:
        """Accepted (its input, record and marker stored before the answer), then the node
        crashed: the restarted node (same id, same work folder) takes the job back and runs it
        from its spooled copy, without fetching the input again."""
        job = self.upload(self.n1)
        fetched: list[str] = []
        real = self.backend.get_file
        self.backend.get_file = lambda key, path: fetched.append(key) or real(key, path)  # type: ignore[method-assign]
        again, media = self.service("n1")  # the crash: a new process, same folder
        again.startService()
        assert job.id in again.active and job.id in media.runs and fetched == []
        media.hooks[job.id][0]()
        media.finish(job.id)
        assert self.record(job.id)["state"] == "done"

    def test_follow_a_job_run_elsewhere(self) -> None:
        """A node asked to follow a job another node runs follows its stored record to the end."""
        job = self.upload(self.n1)
        seen: list[str] = []
        self.n2.subscribe(job.id, lambda j: seen.append(j.state), poll=1.0)
        self.clock.advance(1)
        self.m1.hooks[job.id][0]()
        self.clock.advance(1)
        self.m1.finish(job.id)
        self.clock.advance(1)
        self.clock.advance(1)
        assert seen == ["queued", "transcoding", "done"]
        assert self.clock.getDelayedCalls() == []  # the poll stopped at the final state


class HeldRecords:
    """A job service on a memory store whose job record writes wait, while ``holding``, until the
    test lands them (``land``); the job ``job`` accepted."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock, self.backend, self.media = Clock(), MemoryBackend(), FakeMedia(tmp_path)
        self.held: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.holding = False
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 1, "min-free": 0,
                                   "job-lease": 30}).with_identity("n1")
        self.svc = JobService(self.clock, config, ObjectStore(self.backend, self.run), self.media,
                              now=self.clock.seconds)
        spool = self.svc.admit(5)
        spool.write(b"video")
        accepted: list[Any] = []
        self.svc.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(accepted.append)
        self.job = accepted[0]

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if self.holding and fn == self.backend.put_bytes and str(args[0]).startswith("jobs/"):
            d: Deferred[Any] = Deferred()
            self.held.append((lambda: fn(*args, **kwargs), d))
            return d
        return maybeDeferred(fn, *args, **kwargs)

    def land(self, index: int = -1) -> None:
        """The store answers a held write (the newest by default)."""
        write, d = self.held.pop(index)
        maybeDeferred(write).chainDeferred(d)

    def end_held(self) -> list[str]:
        """Run the job to its end with the write of that end held; returns the states its
        subscriber has heard."""
        seen: list[str] = []
        self.svc.subscribe(self.job.id, lambda j: seen.append(j.state))
        self.media.hooks[self.job.id][0]()
        self.holding = True
        self.media.finish(self.job.id)  # its 'storing' write is held, and the job ends behind it
        self.land()  # 'storing' lands; 'done' is sent, and held
        return seen

    def refuse(self, error: Exception, index: int = -1) -> None:
        """The store refuses a held write (the newest by default)."""
        _, d = self.held.pop(index)
        d.errback(error)

    def record(self) -> dict[str, Any]:
        return json.loads(self.backend.get_bytes(f"jobs/{self.job.id}.json")[0])


class RecordWriteOrderTests:
    def test_a_write_in_flight_never_lands_over_a_later_state(self, tmp_path: Path) -> None:
        """The write of 'transcoding' is slow; the job then stores its outputs and ends. Whatever
        order the store answers in, the record ends 'done' (one write of a job's record at a time)."""
        rig = HeldRecords(tmp_path)
        rig.holding = True
        rig.media.hooks[rig.job.id][0]()  # transcoding: its write is held...
        rig.media.finish(rig.job.id)  # ...while the job stores its outputs and ends
        while rig.held:  # the store answers the newest write first
            rig.land()
        assert rig.record()["state"] == "done", rig.record()["state"]
        assert rig.job.id not in rig.svc.active

    def test_the_end_is_told_once_its_record_is_stored(self, tmp_path: Path) -> None:
        """The final record's write is slow: until it lands the owner's answer, its node view and
        its subscribers still say 'storing' (what the store says, and what an adopter would read
        after a crash); then 'done'."""
        rig = HeldRecords(tmp_path)
        svc, job = rig.svc, rig.job
        seen = rig.end_held()
        assert len(rig.held) == 1
        answers: list[Any] = []
        svc.get(job.id).addBoth(answers.append)
        assert answers[0].state == jobs.STORING and seen[-1] == jobs.STORING
        assert [j["state"] for j in svc.listing()["active"]] == ["storing"] and svc.listing()["recent"] == []
        rig.land()
        svc.get(job.id).addBoth(answers.append)
        assert answers[1].state == jobs.DONE and seen[-1] == jobs.DONE
        assert svc.listing()["active"] == [] and svc.listing()["recent"][0]["state"] == "done"

    def test_a_refused_end_waits_for_the_store(self, tmp_path: Path) -> None:
        """The store refuses the final record's write for a reason of its own (an S3 error the node
        does not know; a full disk under a `file:` store): the job still says 'storing' to its
        clients, and the write is tried again until the store takes it; then 'done'."""
        rig = HeldRecords(tmp_path)
        svc, job = rig.svc, rig.job
        seen = rig.end_held()
        refusals = [GridnodeError("S3 refused put jobs/x.json: KMS.DisabledException", code="storage_error"),
                    OSError(errno.ENOSPC, "No space left on device")]
        for refusal in refusals:
            rig.refuse(refusal)
            answers: list[Any] = []
            svc.get(job.id).addBoth(answers.append)
            assert answers[0].state == jobs.STORING and seen[-1] == jobs.STORING
            assert rig.record()["state"] == "storing" and job.id in svc.active
            rig.clock.advance(60)  # the retry
            assert len(rig.held) == 1
        rig.land()
        assert seen[-1] == jobs.DONE and rig.record()["state"] == "done" and job.id not in svc.active
