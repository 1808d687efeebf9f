"""
A peer's chunk on this node's workers: the `chunk_worker.RunChunk` the node gives its worker
side. The chunk waits in the node's `TranscodePool` as a job would, under the chunked job's
tenant and priority (gridnode/media/fair.py: fair share covers chunks), then its ffmpeg runs in
a box of its own that shows it the job's source and the chunk's folder alone, under limits
scaled to the chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred

from gridnode.chunk_records import ChunkRecord
from gridnode.media.ffmpeg import max_time_for, spawn_ffmpeg
from gridnode.media.pool import JobSlot, TranscodePool
from gridnode.media.sandbox import (
    ChildLimits,
    Sandbox,
    ffmpeg_processes,
    let_read,
    private_folder,
    share_with,
    take_back,
)
from gridnode.media.split import Task
from gridnode.priority import RANK


@dataclass(frozen=True)
class ChunkRun:
    """One chunk to run here: its record, its task (the argv on this node's paths), the job's
    source and the folder the argv writes in."""

    record: ChunkRecord
    task: Task
    source: str
    out_dir: str
    #: the most bytes one of its files may hold (``-fs`` is in the argv: this bounds the child)
    limit: int


def pool_runner(reactor: Any, pool: TranscodePool, sandbox: Callable[[], Sandbox],
                hurried: Callable[[], bool] = lambda: False) -> Callable[[ChunkRun, Callable[[float], None]],
                                                                          Deferred[Any]]:
    """Runs a `ChunkRun` on a worker of ``pool`` in ``sandbox()`` (the node's, settled at its
    start); fires with the frames ffmpeg wrote, fails as a job's ffmpeg would."""

    def run(chunk: ChunkRun, progress: Callable[[float], None]) -> Deferred[Any]:
        record, task = chunk.record, chunk.task

        def work(slot: JobSlot) -> Deferred[Any]:
            box = sandbox()
            folders = [os.path.join(root, name) for root, names, _ in os.walk(chunk.out_dir) for name in names]
            job_folder = os.path.dirname(chunk.source)
            for folder in (os.path.dirname(job_folder), job_folder, os.path.dirname(chunk.out_dir)):
                private_folder(folder, box.user)  # the child's group may pass, not list
            let_read(box.user, chunk.source)
            share_with(box.user, chunk.out_dir, *folders)
            seconds = max(1.0, task.seconds)
            limits = box.limits(ChildLimits(cpu_seconds=int(max_time_for(seconds)) + 60,
                                            file_size=chunk.limit + 1024 * 1024, processes=ffmpeg_processes()),
                                reads=[chunk.source], writes=[chunk.out_dir])
            proto = spawn_ffmpeg(reactor, task.argv, duration=seconds, on_progress=progress,
                                 label=f"ffmpeg {record.job} {task.key}", limits=limits)
            slot.on_cancel(lambda: proto.cancel(at_once=hurried()))

            def exited(_result: Any) -> int | None:
                slot.free_worker()
                take_back(box.user, chunk.out_dir)  # the folder is the node's again before it is read
                frame = proto.parser.fields.get("frame")
                return int(frame) if frame is not None and frame.isdigit() else None

            return proto.deferred.addCallback(exited)

        return maybeDeferred(pool.submit, f"{record.job}.{task.key}", work, rank=RANK[record.priority],
                             tenant=record.tenant)

    return run
