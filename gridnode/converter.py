"""
The node's media side as the pipeline sees it (`gridnode.media.interface.Media`):
presets, probe and a pool of ffmpeg workers (gridnode/media/), configured
from `NodeConfig`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from gridnode.config import NodeConfig, cpu_count
from gridnode.media import presets as presets_mod
from gridnode.media.ffmpeg import FfmpegResult, ProducedFile, collect_outputs, start_transcode
from gridnode.media.pool import JobSlot, TranscodePool
from gridnode.media.presets import Preset, job_output_limit
from gridnode.media.probe import Limits, ProbeResult, probe
from gridnode.media.sandbox import resolve_user, share_with, take_back
from gridnode.media.verify import OutputWatch, measure_outputs

if TYPE_CHECKING:
    from gridnode.media.interface import Media


def check_reachable(user: str, work_dir: str, name: str) -> None:
    """The children's user must traverse every folder down to the work folder."""
    from gridnode.errors import ConfigError

    folder = os.path.abspath(work_dir)
    for sub in ("spool", "scratch"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        os.chmod(os.path.join(folder, sub), 0o711)
    os.chmod(folder, os.stat(folder).st_mode | 0o011)
    uid = int(user.split(":")[0])
    while True:
        st = os.stat(folder)
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
            raise ConfigError(f"ffmpeg-user {name} cannot reach {folder} (no o+x): allow it "
                              f"(chmod o+x {folder}), move --work-dir, or set --ffmpeg-user none")
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent


class Converter(Service):
    """A service: started, it clears the scratch folder and checks the children's user; stopped,
    it cancels every job."""

    def __init__(self, reactor: Any, config: NodeConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.limits = Limits(max_duration=float(config.max_duration), max_pixels=config.max_pixels)
        # Each ffmpeg gets its share of the cores, not all of them: with every
        # worker busy, that is less context switching and a responsive reactor.
        self.threads = max(1, cpu_count() // config.workers)
        self.user = resolve_user(config.ffmpeg_user)
        self.pool = TranscodePool(reactor, os.path.join(config.work_dir, "scratch"), workers=config.workers,
                                  queue=config.queue)

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        """Remove scratch folders a crash left behind; check the children's user can work here."""
        super().startService()
        self.pool.sweep()
        if self.user:
            check_reachable(self.user, self.config.work_dir, self.config.ffmpeg_user)

    def stopService(self) -> Deferred[None]:  # noqa: N802 - Twisted's name
        """Cancel every job; fires when no ffmpeg is left."""
        super().stopService()
        return self.pool.stop_all()

    def parse_presets(self, text: str | None) -> list[Preset]:
        return presets_mod.parse_presets(text)

    def probe(self, path: str) -> Deferred[ProbeResult]:
        return probe(self.reactor, path, ffprobe=self.config.ffprobe, limits=self.limits, user=self.user)

    def run(self, job_id: str, info: ProbeResult, input_path: str, presets: list[Preset],
            started: Callable[[], None], progress: Callable[[float], None],
            finish: Callable[[list[ProducedFile]], Deferred[Any]]) -> Deferred[Any]:
        """Queue the job; when a worker takes it: ffmpeg (its output folder watched against
        the job's output limit), its outputs checked whole, then ``finish(outputs)`` while the
        scratch folder still holds them."""
        per_output = self.config.max_output_bytes

        def work(slot: JobSlot) -> Deferred[Any]:
            started()
            out_dir = str(slot.scratch / "out")
            share_with(self.user, str(slot.scratch))  # private (0700) to the node, and to its children
            watch = OutputWatch(self.reactor, out_dir, job_output_limit(info, presets, per_output))
            process = start_transcode(self.reactor, info, input_path, out_dir, presets, ffmpeg=self.config.ffmpeg,
                                      on_progress=progress, on_tick=watch.tick, max_output_bytes=per_output,
                                      threads=self.threads, label=f"ffmpeg {job_id}", user=self.user,
                                      input_limits=self.limits)
            slot.on_cancel(process.cancel)
            d: Deferred[Any] = process.deferred

            def transcoded(result: FfmpegResult) -> list[ProducedFile]:
                slot.free_worker()  # ffmpeg is done: the next job's may start while these are stored
                take_back(self.user, str(slot.scratch))  # what is checked now stays what is read
                found = collect_outputs(out_dir, info, presets, max_output_bytes=per_output)
                return measure_outputs(found, info, presets, result.stderr_tail)  # whole, or not done

            d.addCallback(transcoded)
            d.addCallback(finish)
            return d

        return self.pool.submit(job_id, work)

    def cancel(self, job_id: str) -> bool:
        return self.pool.cancel(job_id)


if TYPE_CHECKING:
    _media: type[Media[Preset, ProbeResult]] = Converter
