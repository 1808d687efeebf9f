"""The converter as a Twisted service (gridnode/converter.py), on a fake clock and without ffmpeg."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.converter import Converter
from gridnode.media.pool import JobSlot
from gridnode.media.templates import parse_presets
from tests.test_media_chunks import source


class ConverterServiceTests:
    def test_start_sweeps_scratch_and_stop_cancels_every_job(self, tmp_path: Path) -> None:
        """startService removes the scratch folders a crash left; stopService cancels the running
        and the queued job and fires once the running one has ended."""
        config = build_config(cli={"work-dir": str(tmp_path), "workers": 1, "queue": 1,
                                   "ffmpeg-user": "none", "sandbox": "weak"}).with_identity("n1")  # no trial box
        converter = Converter(Clock(), config)
        leftover = tmp_path / "scratch" / "01ARZ3NDEKTSV4RRFFQ69G5FAV"
        leftover.mkdir(parents=True)
        converter.startService()
        assert converter.running and not leftover.exists()

        cancelled: list[str] = []
        running: Deferred[None] = Deferred()

        def work(slot: JobSlot) -> Deferred[None]:
            slot.on_cancel(lambda: cancelled.append(slot.job_id))
            return running

        results: list[Any] = []
        converter.pool.submit("a", work).addErrback(results.append)
        converter.pool.submit("b", work).addErrback(results.append)
        stopped: list[Any] = []
        converter.stopService().addCallback(stopped.append)
        assert not converter.running and cancelled == ["a"] and stopped == []
        assert [f.value.code for f in results] == ["cancelled"]  # b, at once
        running.callback(None)  # a's work ends
        assert stopped == [None]


class ChunkedQueueTests:
    """A job the pool makes in chunks is queued at once, like any other: it reads its chunk
    records (to plan the cuts an earlier run made) only once a worker takes it."""

    class Grid:
        def __init__(self) -> None:
            self.reads: list[Deferred[Any]] = []
            self.tasks: list[str] = []

        def recorded_chunk_seconds(self, job_id: str) -> Deferred[Any]:
            self.reads.append(Deferred())
            return self.reads[-1]

        def run_task(self, *args: Any, **kwargs: Any) -> Any:
            self.tasks.append("run_task")
            raise AssertionError("no chunk of a cancelled job runs")

        def stop(self, job_id: str) -> None:
            self.tasks.append("stop")

    def test_queued_in_the_order_accepted_and_cancelled_while_reading(self, tmp_path: Path) -> None:
        """With the one worker busy, alice's chunked job then bob's are queued in that order
        before her records are read; cancelled while they are read, her job ends cancelled and
        plans nothing, even when the read answers afterwards."""
        config = build_config(cli={"work-dir": str(tmp_path), "workers": 1, "ffmpeg-user": "none",
                                   "sandbox": "weak", "chunk-over": 10, "chunk-seconds": 3}).with_identity("n1")
        converter = Converter(Clock(), config)
        converter.chunk_grid = grid = self.Grid()
        (tmp_path / "in.mp4").write_bytes(b"x")
        blocker: Deferred[None] = Deferred()
        converter.pool.submit("blocker", lambda slot: blocker, tenant="ops")
        results: list[Any] = []
        converter.run("long", source(60.0), str(tmp_path / "in.mp4"), parse_presets("mp4-480p"),
                      started=lambda: None, progress=lambda p: None, finish=lambda outputs: Deferred(),
                      tenant="alice", job=object()).addBoth(results.append)
        converter.pool.submit("short", lambda slot: Deferred(), tenant="bob")
        assert converter.pool.waiting() == ["long", "short"] and grid.reads == []
        blocker.callback(None)
        assert converter.pool.waiting() == ["short"] and len(grid.reads) == 1
        assert converter.pool.cancel("long") and results[0].value.code == "cancelled"
        grid.reads[0].callback(3.0)  # a read that could not be stopped answers late
        assert grid.tasks == [] and len(results) == 1
