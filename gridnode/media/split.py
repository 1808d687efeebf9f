"""
Split-and-stitch, the run: a chunked job's processes, each started through a callable the
caller gives (``RunTask``: a local ffmpeg, or the pool's workers through the store),
so this object decides the order and keeps the count, and knows nothing of where they run.

``SplitJob(plan, ...)`` holds the tasks: one per chunk (``chunks.chunk_argv``: posters and
storyboard tiles too), the audio pass (``chunks.audio_argv``), then one stitch per output
(``stitch.py``) once all of those are done. ``run()`` starts every task not yet done, at most
``parallel`` at once, and fires with the outputs' folder when the stitch is done, or fails with
``TasksFailed`` naming the chunks (by index) and passes that failed: calling ``run()`` again
redoes those alone. Progress is the sum over the chunks of each one's progress times its
seconds, over the video's; the audio, posters and stitch count when the job ends. CMAF outputs
are joined in the node's own process (``stitch.join_cmaf``: renames and playlists).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from gridnode.errors import GridnodeError
from gridnode.media import chunks as plan_chunks
from gridnode.media import stitch
from gridnode.media.ffmpeg import collect_outputs
from gridnode.media.presets import Preset, default_output_limit, folders, hls_rungs, storyboard_plan
from gridnode.media.probe import Limits, ProbeResult
from gridnode.media.verify import truncation


@dataclass(frozen=True)
class Task:
    """One process of a chunked job: ``kind`` is ``chunk`` (``index``: the chunk's), ``audio``
    or ``stitch`` (``index``: the output's place in the job); ``seconds`` of video it
    converts (its share of the progress: 0 for all but chunks)."""

    kind: str
    index: int
    argv: list[str]
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.index}"


#: runs one task's argv and fires when it exits 0 (fails otherwise), telling its progress 0..1;
#: fires with the number of video frames it wrote where known (``-progress``' last ``frame=``)
RunTask = Callable[[Task, Callable[[float], None]], "Deferred[Any]"]


class TasksFailed(GridnodeError):
    """Some tasks of a chunked job failed; ``failed`` maps each one's key (``chunk-3``) to its
    error. ``run()`` again redoes those alone."""

    def __init__(self, failed: dict[str, BaseException]) -> None:
        # a chunk that found the input cut short says why the later ones failed too; a poison
        # chunk (its holders kept dying) says the job is not to be run again
        codes = {getattr(e, "code", ""): e for e in reversed(failed.values())}
        first = codes.get("input_truncated") or codes.get("poison") or next(iter(failed.values()))
        code = first.code if isinstance(first, GridnodeError) else "ffmpeg_failed"
        super().__init__(f"{', '.join(failed)} failed: {first}", code=code, status=422)
        self.failed = failed


@dataclass
class SplitJob:
    """A chunked job of ``presets`` on ``probe``'s source ``input_path``: chunks made under
    ``work_dir``, outputs under ``out_dir``."""

    plan: plan_chunks.Plan
    probe: ProbeResult
    input_path: str
    presets: Sequence[Preset]
    work_dir: str
    out_dir: str
    run_task: RunTask
    ffmpeg: str = "ffmpeg"
    threads: int | None = None
    parallel: int = 1
    input_limits: Limits = Limits()
    on_progress: Callable[[float], None] | None = None
    #: each output's ``-fs`` (None: ``default_output_limit``)
    max_output_bytes: int | None = None
    #: told of each concat list written, before its stitch reads it (the node lets the
    #: children's user read it)
    on_list: Callable[[str], None] | None = None
    #: the keys of the tasks done: kept across ``run()``s
    done: set[str] = field(default_factory=set, init=False)
    #: each chunk done's video frames, as its run told them: what a join must write in all
    made: dict[int, int] = field(default_factory=dict, init=False)
    _progress: dict[int, float] = field(default_factory=dict, init=False)

    def tasks(self) -> list[Task]:
        """Every task but the stitches, in the order they start: chunks first (the long ones)."""
        out = []
        for chunk in self.plan.chunks:
            folder = os.path.join(self.work_dir, stitch.chunk_dir(chunk.index))
            argv = plan_chunks.chunk_argv(self.ffmpeg, self.probe, self.input_path, folder, self.presets, chunk,
                                          threads=self.threads, input_limits=self.input_limits,
                                          max_output_bytes=self.max_output_bytes)
            out.append(Task("chunk", chunk.index, argv, self._seconds(chunk)))
        audio = plan_chunks.audio_argv(self.ffmpeg, self.probe, self.input_path, self.work_dir, self.presets,
                                       threads=self.threads, input_limits=self.input_limits)
        if audio is not None:
            out.append(Task("audio", 0, audio))
        return out

    def stitches(self) -> list[stitch.Stitch]:
        with_audio = {p.name for p in plan_chunks.audio_presets(self.probe, self.presets)}
        return [stitch.stitch(self.ffmpeg, self.work_dir, self.out_dir, p, self.plan.chunks,
                              audio=p.name in with_audio,
                              max_output_bytes=self.max_output_bytes or default_output_limit(self.probe),
                              rungs=[r.name for r, _size in hls_rungs(self.probe, p.ladder)])
                for p in plan_chunks.video_presets(self.presets)
                if p.container not in ("cmaf", *plan_chunks.IMAGES)] + [
            stitch.stitch_storyboard(self.ffmpeg, self.work_dir, self.out_dir, p, self.plan.chunks,
                                     storyboard_plan(self.probe, p))
            for p in self.presets if p.container == "storyboard"]

    def join_segments(self) -> None:
        """Join each CMAF output's segments (files renamed, playlists written: no process); move
        each poster from the chunk that made it."""
        with_audio = {p.name for p in plan_chunks.audio_presets(self.probe, self.presets)}
        for p in plan_chunks.video_presets(self.presets):
            if p.container == "jpeg":
                chunk = plan_chunks.poster_chunk(self.probe, p, self.plan.chunks)
                name = p.outputs(self.probe)[0].name
                try:  # a link the child planted moves as a link: collect_outputs refuses it
                    os.replace(os.path.join(self.work_dir, stitch.chunk_dir(chunk.index), name),
                               os.path.join(self.out_dir, name))
                except FileNotFoundError:
                    raise GridnodeError(f"ffmpeg did not write {name}", code="ffmpeg_failed", status=422) from None
            if p.container == "cmaf":
                stitch.join_cmaf(self.work_dir, self.out_dir, p, self.plan.chunks,
                                 len(hls_rungs(self.probe, p.ladder)), p.name in with_audio)

    def _seconds(self, chunk: plan_chunks.Chunk) -> float:
        seconds = chunk.seconds
        return seconds if seconds is not None else max(0.0, self.probe.converted_duration - float(chunk.start))

    def prepare(self) -> None:
        """Make the folders the tasks write into (the muxers make none)."""
        video = plan_chunks.video_presets(self.presets)
        for chunk in self.plan.chunks:
            base = os.path.join(self.work_dir, stitch.chunk_dir(chunk.index))
            for name in ["", *folders(video)]:
                os.makedirs(os.path.join(base, name), exist_ok=True)
        for name in folders(self.presets):  # the stitch's sheets (the image2 muxer makes no folder)
            os.makedirs(os.path.join(self.out_dir, name), exist_ok=True)
        for p in plan_chunks.audio_presets(self.probe, self.presets):
            if p.container == "cmaf":
                os.makedirs(os.path.join(self.work_dir, plan_chunks.audio_file(p)), exist_ok=True)
        os.makedirs(self.out_dir, exist_ok=True)

    @defer.inlineCallbacks
    def run(self) -> Any:
        """Run every task not done yet, then the stitches; fires with ``out_dir``."""
        self.prepare()
        pending = [t for t in self.tasks() if t.key not in self.done]
        failed: dict[str, BaseException] = {}
        limiter = defer.DeferredSemaphore(max(1, self.parallel))
        yield defer.DeferredList([limiter.run(self._one, t, failed) for t in pending], consumeErrors=True)
        if failed:
            raise TasksFailed(failed)
        for i, item in enumerate(self.stitches()):
            stitch.write_concat(self.work_dir, item)
            if self.on_list is not None:
                self.on_list(os.path.join(self.work_dir, item.list_name))
            task = Task("stitch", i, item.argv)
            try:
                frames = yield self.run_task(task, lambda _p: None)
                made = [self.made[c.index] for c in self.plan.chunks if c.index in self.made]
                if item.preset.container != "storyboard" and isinstance(frames, int) \
                        and len(made) == len(self.plan.chunks) and frames != sum(made):
                    # ffmpeg's concat ends quietly at a chunk's file it cannot open, and -fs at the
                    # size limit: that one is the job's output_too_large
                    self._too_large(item.preset)
                    raise GridnodeError(f"{task.key} joined {frames} video frames of the chunks' {sum(made)}",
                                        code="ffmpeg_failed", status=422)
            except Exception as e:  # noqa: BLE001 - named with its task, as the others
                raise TasksFailed({task.key: e}) from e
        self.join_segments()
        self._report(1.0)
        return self.out_dir

    def _too_large(self, preset: Preset) -> None:
        """Raise ``output_too_large`` where an output of ``preset`` reached its size limit."""
        try:
            collect_outputs(self.out_dir, self.probe, [preset],
                            max_output_bytes=self.max_output_bytes or default_output_limit(self.probe))
        except GridnodeError as e:
            if e.code == "output_too_large":
                raise

    @defer.inlineCallbacks
    def _one(self, task: Task, failed: dict[str, BaseException]) -> Any:
        def progress(value: float) -> None:
            if task.kind == "chunk":
                self._progress[task.index] = max(self._progress.get(task.index, 0.0), min(1.0, value))
                self._report(None)

        try:
            frames = yield self.run_task(task, progress)
            expected = self.plan.chunks[task.index].frames if task.kind == "chunk" else None
            if isinstance(frames, int) and expected is not None and frames != expected:
                # A seek that landed past its keyframe, a source that ends early: never a seam
                # with frames lost or repeated.
                chunk = self.plan.chunks[task.index]
                reached = float((chunk.first + min(frames, expected)) / chunk.rate)
                made = f"chunk {task.index} made {frames} frames of its {expected}"
                short = frames < expected and truncation(self.probe.converted_duration, {"its video": reached})
                if short:  # the input ends early: what a whole job of it fails with
                    raise GridnodeError(f"{short.message} ({made})", code=short.code, status=short.status)
                raise GridnodeError(made, code="ffmpeg_failed", status=422)
        except Exception as e:  # noqa: BLE001 - every failure is reported by its task's key
            failed[task.key] = e
            if task.kind == "chunk":
                self._progress.pop(task.index, None)
            return
        if task.kind == "chunk" and isinstance(frames, int):
            self.made[task.index] = frames
        self.done.add(task.key)
        progress(1.0)

    def progress(self) -> float:
        """The job's progress: the chunks' progress weighted by their seconds, below 1 until
        the stitch is done."""
        total = sum(self._seconds(c) for c in self.plan.chunks) or 1.0
        got = sum(self._progress.get(c.index, 0.0) * self._seconds(c) for c in self.plan.chunks)
        return min(0.99, got / total)

    def _report(self, value: float | None) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress() if value is None else value)
