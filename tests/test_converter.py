"""The converter as a Twisted service (gridnode/converter.py), on a fake clock and without ffmpeg."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.converter import Converter
from gridnode.media.pool import JobSlot


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
