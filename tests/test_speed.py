"""A node's conversion speed and the work it holds: the two load figures clients rank nodes by."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode import jobs
from gridnode.jobs import Job
from gridnode.registry.records import MAX_SPEED, MIN_SPEED
from gridnode.speed import ALPHA, Speed


class SpeedTests:
    def test_none_until_the_first_job(self) -> None:
        """No figure before a job has finished: the client then takes its peers' instead."""
        assert Speed().value is None

    def test_the_first_job_sets_it_later_ones_move_it_smoothly(self) -> None:
        """The first ratio is the figure; each later one moves it by ALPHA of the difference."""
        s = Speed()
        s.observe(2.0)
        assert s.value == 2.0
        s.observe(4.0)
        assert s.value == pytest.approx(2.0 + ALPHA * 2.0)
        for _ in range(60):
            s.observe(1.0)
        assert s.value == pytest.approx(1.0, rel=1e-4)

    @pytest.mark.parametrize("bad", [0.0, -3.0, float("nan"), float("inf"), -float("inf")])
    def test_a_ratio_that_is_no_speed_is_ignored(self, bad: float) -> None:
        """Zero, negative or non-finite ratios (a clock step, a broken duration) change nothing."""
        s = Speed()
        s.observe(bad)
        assert s.value is None
        s.observe(3.0)
        s.observe(bad)
        assert s.value == 3.0

    @given(st.lists(st.floats(min_value=1e-9, max_value=1e12), min_size=1, max_size=30))
    def test_always_within_what_readers_take(self, ratios: list[float]) -> None:
        """Whatever the jobs measured, the figure stays where every reader accepts it."""
        s = Speed()
        for r in ratios:
            s.observe(r)
        assert s.value is not None and MIN_SPEED <= s.value <= MAX_SPEED


class InputLeftTests:
    def job(self, duration: object = 120.0) -> Job:
        job = Job.new("0" * 26, name="a.mov", presets=["mp4-720p"], node="n1", size=1, now=0.0)
        job.input["duration"] = duration
        return job

    def test_queued_whole_transcoding_the_rest_storing_nothing(self) -> None:
        """A queued job holds all its input; a transcoding one what its progress has not reached;
        one storing its outputs, or ended, none."""
        job = self.job()
        assert job.input_left() == 120.0  # whatever the state before ffmpeg, once the probe gave a duration
        job.advance(jobs.PROBING, 1.0)
        job.accept(2.0, 30.0)
        assert job.input_left() == 120.0
        job.advance(jobs.TRANSCODING, 3.0)
        job.set_progress(0.25, 4.0)
        assert job.input_left() == pytest.approx(90.0)
        job.advance(jobs.STORING, 5.0)
        assert job.input_left() == 0.0
        job.advance(jobs.DONE, 6.0)
        assert job.input_left() == 0.0

    @pytest.mark.parametrize("duration", [None, "120", True, -5.0, 0.0, float("nan"), float("inf")])
    def test_an_unknown_or_hostile_duration_counts_nothing(self, duration: object) -> None:
        """A job record adopted from the store may say anything: only a finite positive duration
        counts, so the node never publishes NaN or infinity."""
        assert self.job(duration).input_left() == 0.0
