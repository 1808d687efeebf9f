"""
Scratch space on fakes: the estimate of a job's outputs, the ENOSPC verdict, the pool holding
a job until its space is free (injected free space, a fake clock), and a job whose run ran out
of space waiting and running again instead of failing (the job service on fake media).
The same on a real node with a real ffmpeg and a small tmpfs: tests/test_scratch_nodes.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from gridnode import jobs
from gridnode.config import build_config
from gridnode.converter import Converter
from gridnode.errors import GridnodeError
from gridnode.jobs import Job
from gridnode.media.ffmpeg import ProgressParser
from gridnode.media.interface import SCRATCH_WAIT, WAITING_SCRATCH
from gridnode.media.pool import RECHECK, JobSlot, TranscodePool
from gridnode.media.presets import job_output_limit
from gridnode.media.scratch import (
    FULL_BELOW,
    MAX_WAIT,
    ScratchSpace,
    learned_needs,
    output_estimate,
    ran_out,
    scratch_full,
    scratch_wait,
    wait_limit,
)
from gridnode.media.templates import parse_presets
from gridnode.pipeline import JobService
from gridnode.runner import SCRATCH_RETRIES
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.fake_child import FakeProcessReactor, exited
from tests.fakes import FakeMedia
from tests.test_media_presets import source

MB = 1024 * 1024


class EstimateTests:
    def test_hls_is_its_rungs_caps_for_the_duration(self) -> None:
        """HLS: (video + audio caps of the rungs kept) x duration, +10 % for MPEG-TS, +25 %."""
        hls = parse_presets("hls")
        got = output_estimate(source(duration=100.0), hls)
        caps = (2800 + 128 + 1400 + 96 + 800 + 64) * 1000 / 8 * 100  # bytes for 100 s
        assert caps * 1.1 * 1.25 < got < (caps * 1.1 + 64 * 1024) * 1.25 + 2

    def test_grows_with_duration_and_size_not_with_the_input_file(self) -> None:
        """Twice the duration, about twice the bytes; a larger target, more; the input's own
        size (a ProRes master, a tiny phone clip) changes nothing."""
        mp4 = parse_presets("mp4-720p")
        ten = output_estimate(source(duration=10.0), mp4)
        assert 1.9 * ten < output_estimate(source(duration=20.0), mp4) < 2.1 * ten
        assert output_estimate(source(640, 360, duration=10.0), mp4) < ten
        huge = dataclasses.replace(source(duration=10.0), size=4000 * MB)
        assert output_estimate(huge, mp4) == ten

    def test_every_preset_adds_and_the_limit_caps(self) -> None:
        """Each preset adds its share; never more than the outputs may hold together."""
        probe = source(duration=60.0)
        one = output_estimate(probe, parse_presets("mp4-720p"))
        assert output_estimate(probe, parse_presets("mp4-720p,webm-480p,poster")) > one
        assert output_estimate(probe, parse_presets("mp4-720p"), per_output=MB) == MB
        long = source(duration=4 * 3600.0)
        assert output_estimate(long, parse_presets("hls")) == job_output_limit(long, parse_presets("hls"))

    def test_a_clip_without_audio_needs_less(self) -> None:
        """No audio stream, no audio bytes."""
        mp4 = parse_presets("mp4-480p")
        assert output_estimate(source(audio=False), mp4) < output_estimate(source(), mp4)


class RanOutTests:
    def test_ffmpegs_enospc_line(self) -> None:
        """ffmpeg's strerror line, on any muxer's error line, means the disk was full."""
        assert ran_out(["Error writing trailer of /x/out/a.mp4: No space left on device"], free=10 * MB)

    def test_a_full_filesystem_at_exit(self) -> None:
        """Whatever ffmpeg said, a filesystem with under FULL_BELOW free was full."""
        assert ran_out(["Error muxing a packet"], free=FULL_BELOW - 1)

    def test_other_failures_are_not_a_full_disk(self) -> None:
        """A broken input, a file over RLIMIT_FSIZE, a disk with room: not ENOSPC."""
        assert not ran_out(["Invalid data found when processing input"], free=10 * MB)
        assert not ran_out(["av_interleaved_write_frame(): File too large"], free=10 * MB)
        assert not ran_out([], free=FULL_BELOW)
        assert not ran_out(["Error muxing a packet"], free=None)  # the filesystem could not be asked

    def test_the_wait_is_bounded(self) -> None:
        """A job waits as long as its conversion may take, and never past MAX_WAIT: the queue
        behind it waits too."""
        assert wait_limit(60.0) == 60.0 and wait_limit(40 * 3600.0) == MAX_WAIT

    def test_learned_needs(self) -> None:
        """What it wrote scaled by its progress; doubled when it made none; at least a bit more
        than it wrote and than it was thought to need; at most the limit."""
        assert learned_needs(MB, 4 * MB, 0.5, 100 * MB) == 10 * MB
        assert learned_needs(3 * MB, 2 * MB, 0.0, 100 * MB) == 6 * MB
        assert learned_needs(20 * MB, 4 * MB, 0.9, 100 * MB) == 20 * MB
        assert learned_needs(MB, 4 * MB, 1.0, 100 * MB) == 5 * MB  # written + FULL_BELOW
        assert learned_needs(MB, 40 * MB, 0.1, 100 * MB) == 100 * MB


class Space:
    """Free bytes a test sets."""

    def __init__(self, free: int) -> None:
        self.bytes = free

    def __call__(self) -> int:
        return self.bytes


class PoolSpaceTests:
    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.free = Space(100)
        self.pool = TranscodePool(self.clock, tmp_path / "scratch", workers=2, queue=10,
                                  space=ScratchSpace(self.free))
        self.started: list[str] = []
        self.pending: dict[str, Deferred[str]] = {}
        self.held: list[str] = []
        self.results: dict[str, list[Any]] = {}

    def work(self, slot: JobSlot) -> Deferred[str]:
        self.started.append(slot.job_id)
        d = self.pending[slot.job_id] = Deferred()
        return d

    def submit(self, job_id: str, needs: int, wait_limit: float = 1000.0) -> None:
        out = self.results[job_id] = []
        self.pool.submit(job_id, self.work, needs=needs, wait_limit=wait_limit,
                         on_hold=lambda: self.held.append(job_id)).addBoth(out.append)

    def test_a_job_waits_until_its_space_is_free(self) -> None:
        """More needed than free: held, told once, no worker taken; started once the space is
        there, at the next look."""
        self.submit("a", needs=150)
        assert self.started == [] and self.held == ["a"] and self.pool.running == 0 and self.pool.held == 1
        self.clock.advance(RECHECK)
        assert self.started == [] and self.held == ["a"]
        self.free.bytes = 200
        self.clock.advance(RECHECK)
        assert self.started == ["a"] and self.pool.held == 0

    def test_first_in_first_out_while_held(self) -> None:
        """A small job behind a held one waits too: a large job is never overtaken for ever."""
        self.submit("big", needs=150)
        self.submit("small", needs=10)
        assert self.started == [] and self.pool.queued == 2
        self.free.bytes = 150
        self.clock.advance(RECHECK)
        assert self.started == ["big"]  # small: 150 free, 150 promised to big
        self.free.bytes = 1000
        self.clock.advance(RECHECK)
        assert self.started == ["big", "small"]

    def test_space_promised_to_a_converting_job_is_not_given_twice(self) -> None:
        """Two jobs of 60 with 100 free: the second waits until the first ends."""
        self.submit("a", needs=60)
        self.submit("b", needs=60)
        assert self.started == ["a"] and self.held == ["b"]
        self.pending["a"].callback("done")
        assert self.started == ["a", "b"]  # a job's end is a look at the space too

    def test_waiting_longest_fails_with_scratch_wait_and_the_next_goes(self) -> None:
        """Held past its wait_limit: it leaves the queue with scratch_wait; the one behind starts."""
        self.submit("a", needs=500, wait_limit=3 * RECHECK)
        self.submit("b", needs=50)
        for _ in range(4):
            self.clock.advance(RECHECK)
        failure = self.results["a"][0]
        assert isinstance(failure, Failure) and failure.value.code == SCRATCH_WAIT
        assert self.started == ["b"] and self.pool.queued == 0

    def test_cancelling_a_held_job_lets_the_next_go(self) -> None:
        """A held job cancelled (a client, or draining) leaves at once, and the next starts."""
        self.submit("a", needs=500)
        self.submit("b", needs=50)
        assert self.pool.cancel("a")
        assert self.results["a"][0].value.code == "cancelled" and self.started == ["b"]

    def test_stop_all_stops_looking(self) -> None:
        """Stopped, the pool leaves no timer behind."""
        self.submit("a", needs=500)
        self.pool.stop_all()
        assert self.clock.getDelayedCalls() == []

    def test_a_filesystem_that_cannot_be_asked_lets_the_job_start(self) -> None:
        """statvfs failing (the folder gone): the job starts, and its run tells."""
        def broken() -> int:
            raise FileNotFoundError("scratch")
        assert self.pool.space is not None
        self.pool.space.free = broken
        self.submit("a", needs=500)
        assert self.started == ["a"]

    def test_without_needs_or_space_nothing_waits(self) -> None:
        """needs 0 (or a pool without a space) starts as before."""
        self.free.bytes = 0
        self.submit("a", needs=0)
        assert self.started == ["a"]


class RunsOutTests:
    """The job service on fake media: what a job that finds too little scratch space becomes."""

    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend()
        self.media = FakeMedia(tmp_path)
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 1,
                                   "min-free": 0}).with_identity("n1")
        self.jobs = JobService(self.clock, config, ObjectStore.synchronous(self.backend), self.media,
                               now=self.clock.seconds)
        spool = self.jobs.admit(5)
        spool.write(b"video")
        got: list[Any] = []
        self.jobs.submit(spool, name="a.mov", presets=None, checksum=None).addBoth(got.append)
        self.job: Job = got[0]

    def record(self) -> dict[str, Any]:
        return json.loads(self.backend.get_bytes(f"jobs/{self.job.id}.json")[0])

    def metric(self, name: str, **labels: str) -> float:
        return self.jobs.metrics.registry.get_sample_value(name, labels) or 0.0

    def run_out(self) -> None:
        self.media.hooks[self.job.id][0]()  # started
        self.media.fail(self.job.id, scratch_full(8 * MB))

    def test_held_before_its_start_says_so(self) -> None:
        """Held for space: queued, ``waiting`` says why, in the record and the metrics; its
        start clears it."""
        hold = self.media.waits[self.job.id]
        assert hold is not None
        hold()
        rec = self.record()
        assert rec["state"] == jobs.QUEUED and rec["waiting"] == WAITING_SCRATCH
        assert self.metric("gridnode_scratch_full_total", when="start") == 1
        assert self.metric("gridnode_jobs_waiting_scratch") == 1
        self.media.hooks[self.job.id][0]()
        assert self.record()["waiting"] == "" and self.record()["state"] == jobs.TRANSCODING
        assert self.metric("gridnode_jobs_waiting_scratch") == 0

    def test_ran_out_waits_and_runs_again_then_done(self) -> None:
        """ffmpeg ran out: not failed, no attempt counted; back to queued, waiting for space, and
        run again; it ends done."""
        self.run_out()
        rec = self.record()
        assert rec["state"] == jobs.QUEUED and rec["waiting"] == WAITING_SCRATCH and rec["error"] is None
        assert rec["attempts"] == 1 and self.media.started_runs[self.job.id] == 2
        assert self.metric("gridnode_scratch_full_total", when="run") == 1
        self.media.hooks[self.job.id][0]()
        self.media.finish(self.job.id)
        rec = self.record()
        assert rec["state"] == jobs.DONE and rec["waiting"] == "" and rec["attempts"] == 1

    def test_out_again_and_again_goes_to_the_pool(self) -> None:
        """Past SCRATCH_RETRIES runs out of space, the job is handed to the pool (released, its
        marker moved to our heir, who claims it at its next look), never failed: another node may
        have the space."""
        self.jobs.adopter.heir = lambda: "n2"
        for _ in range(SCRATCH_RETRIES + 1):
            self.run_out()
        rec = self.record()
        assert rec["state"] == jobs.QUEUED and rec["lease_until"] == 0.0 and rec["error"] is None
        assert rec["waiting"] == "" and self.job.id not in self.jobs.active
        assert self.media.started_runs[self.job.id] == SCRATCH_RETRIES + 1
        assert [i.key for i in self.backend.list("active/").items] == [f"active/n2/{self.job.id}"]

    def test_waited_its_longest_goes_to_the_pool(self) -> None:
        """Space that never came: released to the pool, not failed."""
        self.media.fail(self.job.id, scratch_wait(8 * MB, 600.0))
        rec = self.record()
        assert rec["state"] == jobs.QUEUED and rec["lease_until"] == 0.0 and rec["error"] is None
        assert self.job.id not in self.jobs.active

    def test_a_draining_node_hands_a_waiting_job_on(self) -> None:
        """A job waiting for space does not hold the drain: released at its timeout, and left
        under our id (not handed to our heir)."""
        self.jobs.adopter.heir = lambda: "n2"
        self.run_out()
        drained: list[Any] = []
        self.jobs.drain(5).addBoth(drained.append)
        self.clock.advance(5)
        assert drained == [1]
        rec = self.record()
        assert rec["state"] == jobs.QUEUED and rec["lease_until"] == 0.0 and rec["waiting"] == ""
        # its marker stays with us: our watchers take it as we leave
        assert [i.key for i in self.backend.list("active/").items] == [f"active/n1/{self.job.id}"]

    def test_other_failures_still_fail(self) -> None:
        """output_too_large (or any other code) fails the job as before: never taken for ENOSPC."""
        self.media.hooks[self.job.id][0]()
        self.media.fail(self.job.id, GridnodeError("too big", code="output_too_large", status=413))
        rec = self.record()
        assert rec["state"] == jobs.FAILED and rec["error"]["code"] == "output_too_large"
        assert self.media.started_runs[self.job.id] == 1


class JobWaitingTests:
    def test_a_record_with_a_bad_waiting_is_refused(self) -> None:
        """``waiting`` is read as a string or the record is refused; an old record lacks it."""
        job = Job.new("01ARZ3NDEKTSV4RRFFQ69G5FAV", name="a", presets=["mp4-720p"], node="n", size=1, now=0)
        raw = job.to_json()
        del raw["waiting"]
        assert Job.loads(json.dumps(raw).encode()).waiting == ""
        raw["waiting"] = {"x": 1}
        with pytest.raises(GridnodeError):
            Job.loads(json.dumps(raw).encode())

    def test_reclaim_and_release_clear_it(self) -> None:
        """A job handed on or adopted waits for nothing on its new node yet."""
        job = Job.new("01ARZ3NDEKTSV4RRFFQ69G5FAV", name="a", presets=["mp4-720p"], node="n", size=1, now=0)
        job.advance(jobs.PROBING, 0)
        job.accept(0, 30)
        job.waiting = WAITING_SCRATCH
        job.release(1)
        assert job.waiting == ""
        job.waiting = WAITING_SCRATCH
        job.reclaim("n2", 2, 30)
        assert job.waiting == ""



class ConverterRunsOutTests:
    """The converter's verdict on a failed ffmpeg, on a fake process reactor: ran out of space or
    not, and what its next run waits for."""

    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.reactor = FakeProcessReactor()
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "ffmpeg-user": "none",
                                   "sandbox": "weak", "max-output": 16}).with_identity("n1")
        self.converter = Converter(self.reactor, config)
        self.free = Space(100 * MB)
        self.converter.space.free = self.free
        self.input = tmp_path / "in.mp4"
        self.input.write_bytes(b"x")
        self.probe = source(640, 360, duration=10.0)
        self.presets = parse_presets("mp4-480p")
        self.finished: list[Any] = []

    def run(self) -> list[Any]:
        results: list[Any] = []

        def finish(outputs: Any) -> Deferred[Any]:
            self.finished.append(outputs)
            return Deferred()

        self.converter.run("job1", self.probe, str(self.input), self.presets, started=lambda: None,
                           progress=lambda p: None, finish=finish).addBoth(results.append)
        return results

    def ffmpeg_writes(self, size: int, stderr: bytes, at: float = 4.0, end: Failure | None = None) -> None:
        proto = self.reactor.protocols[-1]
        out = self.converter.pool.scratch_root / "job1" / "out"
        with open(out / "mp4-480p.mp4", "wb") as f:
            f.truncate(size)  # sparse: its size is what counts
        proto.childDataReceived(1, b"out_time_us=%d\nprogress=continue\n" % int(at * 1e6))
        proto.childDataReceived(2, stderr)
        proto.childDataReceived(1, b"progress=end\n")  # a failed ffmpeg ends its reports so too
        proto.processEnded(end or exited(1))

    def test_enospc_is_scratch_full_and_the_next_run_waits_for_what_it_showed(self) -> None:
        """ffmpeg's ENOSPC line: the run fails with scratch_full (never ffmpeg_failed), its partial
        output goes with the scratch folder, and the job's next run waits until the bytes the run
        showed it needs (what it wrote, scaled by how far it got) are free."""
        results = self.run()
        assert len(self.reactor.protocols) == 1
        self.ffmpeg_writes(2 * MB, b"av_interleaved_write_frame(): No space left on device\n")
        failure = results[0]
        assert isinstance(failure, Failure) and failure.value.code == "scratch_full", failure
        assert not (self.converter.pool.scratch_root / "job1").exists()
        needs = learned_needs(0, 2 * MB, 0.4, 16 * MB)  # 4 s of 10 written: 5 MB and a quarter
        assert needs == int(6.25 * MB) and needs > output_estimate(self.probe, self.presets, 16 * MB)
        self.free.bytes = needs - 1
        self.run()
        assert len(self.reactor.protocols) == 1 and self.converter.pool.held == 1
        self.free.bytes = needs
        self.reactor.advance(RECHECK)
        assert len(self.reactor.protocols) == 2

    def test_what_a_run_showed_is_for_the_next_run_only(self) -> None:
        """The learned needs stay for the job's next run (one refused busy keeps them); a run that
        ends any other way than scratch_full forgets them."""
        self.run()
        self.ffmpeg_writes(2 * MB, b"No space left on device\n")
        assert self.converter._needs["job1"] == int(6.25 * MB)
        self.run()
        self.ffmpeg_writes(1000, b"Invalid data found when processing input\n")
        assert "job1" not in self.converter._needs

    def test_a_full_filesystem_at_exit_is_scratch_full_too(self) -> None:
        """No ENOSPC line (a muxer that says 'I/O error'), but the filesystem is full as it exits."""
        results = self.run()
        self.free.bytes = 0
        self.ffmpeg_writes(1000, b"Error writing trailer: Input/output error\n")
        assert results[0].value.code == "scratch_full"

    def test_a_broken_input_with_room_still_fails(self) -> None:
        """An ordinary failure with room on the disk stays ffmpeg_failed."""
        results = self.run()
        self.ffmpeg_writes(1000, b"Invalid data found when processing input\n")
        assert results[0].value.code == "ffmpeg_failed"

    def test_output_too_large_is_never_taken_for_enospc(self) -> None:
        """Outputs over their limit (--max-output 16) stop ffmpeg with output_too_large, even with a
        full disk and an ENOSPC line."""
        results = self.run()
        self.free.bytes = 0
        self.ffmpeg_writes(17 * MB, b"No space left on device\n", end=exited(sig=15))
        assert results[0].value.code == "output_too_large" and self.finished == []


class ProgressAtTheEndTests:
    def test_out_seconds_is_how_far_a_failed_run_got(self) -> None:
        """A run that failed at 6 s of 10 ends its reports with progress=end: progress says 1.0,
        ``out_seconds`` 6."""
        parser = ProgressParser(10.0)
        parser.feed(b"out_time_us=3784853\nprogress=continue\nout_time_us=5960078\nprogress=end\n")
        assert parser.progress == 1.0 and parser.out_seconds == pytest.approx(5.960078)
