"""The job state machine, with no I/O."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode import jobs, keys
from gridnode.errors import GridnodeError
from gridnode.jobs import BadTransition, Job


def new_job() -> Job:
    return Job.new(keys.new_id(1.0), name="../movie.mov", presets=["mp4-720p"], node="n1", size=10, now=1.0)


class JobStateTests:
    def test_happy_path(self) -> None:
        """received -> probing -> queued -> transcoding -> storing -> done, progress ends at 1."""
        job = new_job()
        for i, state in enumerate([jobs.PROBING, jobs.QUEUED, jobs.TRANSCODING, jobs.STORING, jobs.DONE]):
            job.advance(state, 2.0 + i)
        assert job.state == jobs.DONE and job.progress == 1.0 and job.final
        assert job.updated == 6.0 and job.created == 1.0

    def test_no_skipping(self) -> None:
        """A state cannot be skipped, and nothing leaves a final state."""
        job = new_job()
        with pytest.raises(BadTransition):
            job.advance(jobs.TRANSCODING, 2.0)
        job.cancel(3.0)
        with pytest.raises(BadTransition):
            job.advance(jobs.PROBING, 4.0)
        with pytest.raises(BadTransition):
            job.fail("x", "y", 4.0)

    def test_fail_keeps_code(self) -> None:
        """A failure carries its stable code and message."""
        job = new_job()
        job.fail("not_a_video", "that file is not a video", 2.0)
        assert job.to_json()["error"] == {"code": "not_a_video", "message": "that file is not a video"}

    def test_progress_only_forward_while_transcoding(self) -> None:
        """Progress moves only forward, only while transcoding, within 0..1."""
        job = new_job()
        assert not job.set_progress(0.5, 2.0)
        job.advance(jobs.PROBING, 2.0)
        job.advance(jobs.QUEUED, 2.0)
        job.advance(jobs.TRANSCODING, 2.0)
        assert job.set_progress(0.5, 3.0)
        assert not job.set_progress(0.4, 3.0)
        assert job.set_progress(7, 3.0) and job.progress == 1.0

    def test_accept_queues_the_first_attempt_under_a_lease(self) -> None:
        """A probed job is accepted: queued, attempt 1, leased from now; only from probing."""
        job = new_job()
        with pytest.raises(BadTransition):
            job.accept(2.0, 30.0)
        job.advance(jobs.PROBING, 2.0)
        job.accept(3.0, 30.0)
        assert (job.state, job.attempts, job.lease_until, job.updated) == (jobs.QUEUED, 1, 33.0, 3.0)

    def test_only_a_queued_job_given_back_is_released(self) -> None:
        """`released` (any node may claim it) holds for a queued job its owner gave back, not for
        one accepted or claimed, nor for one being probed."""
        job = new_job()
        job.advance(jobs.PROBING, 2.0)
        assert not job.released
        job.accept(2.0, 30.0)
        assert not job.released
        job.release(3.0)
        assert job.released
        job.reclaim("n2", 4.0, 30.0)
        assert not job.released

    def test_release_gives_the_job_back_with_an_expired_lease(self) -> None:
        """Draining: a running job goes back to queued, progress 0, lease expired (a peer adopts
        it at once), same node and attempts; a final job cannot be released."""
        job = new_job()
        job.advance(jobs.PROBING, 2.0)
        job.accept(2.0, 30.0)
        job.advance(jobs.TRANSCODING, 2.0)
        job.set_progress(0.5, 3.0)
        job.release(4.0)
        assert (job.state, job.progress, job.lease_until, job.updated) == (jobs.QUEUED, 0.0, 0.0, 4.0)
        assert job.node == "n1" and job.attempts == 1
        job.release(5.0)  # still queued (released before a worker took it)
        assert job.state == jobs.QUEUED
        job.cancel(6.0)
        with pytest.raises(BadTransition):
            job.release(7.0)

    def test_name_is_data(self) -> None:
        """The user's file name is kept as data, never checked as a key."""
        assert new_job().input["name"] == "../movie.mov"

    def test_bad_id(self) -> None:
        """Only server-made ids name jobs."""
        with pytest.raises(GridnodeError):
            Job.new("../x", name="", presets=[], node="n", size=0, now=0)


class JobRecordTests:
    def test_round_trip(self) -> None:
        """A record written and read back is the same job."""
        job = new_job()
        job.advance(jobs.PROBING, 2.0)
        assert Job.loads(job.dumps()) == job

    def test_chunks_kept_and_reset(self) -> None:
        """A chunk list round-trips in the record; a record whose chunks are not a list of
        objects is refused; taken over or released, a job's chunks are made again: none listed."""
        job = new_job()
        chunk = {"index": 0, "start": 0.0, "seconds": 60.0, "state": "done", "node": "n1", "tries": 1}
        assert job.set_chunks([chunk], 3.0) and not job.set_chunks([chunk], 4.0) and job.updated == 3.0
        assert Job.loads(job.dumps()).chunks == [chunk]
        for bad in ({"index": 0}, [1, 2], "chunks"):
            with pytest.raises(GridnodeError) as e:
                Job.loads(json.dumps({**job.to_json(), "chunks": bad}).encode())
            assert e.value.code == "bad_record"
        job.reclaim("n2", 5.0, 30.0)
        assert job.chunks == []
        job.set_chunks([chunk], 6.0)
        job.release(7.0)
        assert job.chunks == []

    @given(st.binary(max_size=300))
    def test_garbage_refused(self, data: bytes) -> None:
        """Arbitrary bytes are either a valid record or a coded error, never a crash."""
        try:
            job = Job.loads(data)
        except GridnodeError as e:
            assert e.code == "bad_record"
        else:
            assert job.state in jobs.STATES
