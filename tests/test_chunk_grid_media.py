"""A chunked job made by two nodes through the store, on real ffmpeg and a file: store: the owner
runs what its one worker can take, a peer (its own folder, nothing but the store) the chunks
offered to it, and the owner's SplitJob stitches. The stitched mp4 has the one-piece encode's
frames at its timestamps, and a peer that dies holding a chunk costs only that chunk."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed

from gridnode import keys
from gridnode.chunk_owner import ChunkOwner, OwnedJob
from gridnode.chunk_records import Board
from gridnode.chunk_run import ChunkRun
from gridnode.chunk_worker import ChunkWorker, Sources
from gridnode.media import chunks
from gridnode.media.ffmpeg import spawn_ffmpeg
from gridnode.media.probe import probe
from gridnode.media.split import SplitJob, Task
from gridnode.media.templates import Catalog
from gridnode.store.base import ObjectStore
from gridnode.store.file import FileBackend
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.test_chunk_worker_media import make_source
from tests.test_split_media import frames, whole

pytestmark = [pytest.mark.integration, needs_ffmpeg]
SPEC = [{"name": "v", "container": "mp4", "size": 240}]


def ffmpeg_task(reactor: Any, running: dict[str, Any] | None = None) -> Any:
    def run(task: Task, progress: Any) -> Deferred[Any]:
        proto = spawn_ffmpeg(reactor, task.argv, duration=task.seconds or 12, on_progress=progress, label=task.key)
        if running is not None:
            running[task.key] = proto
        return proto.deferred.addCallback(lambda _r: int(proto.parser.fields.get("frame", "-1")))
    return run


@pytest.mark.parametrize("kill", [False, True])
@pytest_twisted.ensureDeferred
async def test_two_nodes_make_one_job(real_reactor: Any, tmp_path: Path, kill: bool) -> None:
    """Owner and peer share the chunks (the owner's first, on its one worker); the stitch is the
    whole's frame for frame. With ``kill``, the peer dies while encoding its first chunk: the
    chunks it held then (its first, and any other it had claimed) alone are reopened (one holder
    lost each) and made by the owner; what it finished before stays its."""
    src = tmp_path / "src.mp4"
    make_source(src)
    store = ObjectStore.synchronous(FileBackend(str(tmp_path / "store")))
    job_id = keys.new_id()
    store.backend.put_file(keys.input_source(job_id), str(src))
    presets = Catalog().parse(None, SPEC)
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    plan = chunks.plan(info, presets, chunk_seconds=2, chunk_over=0)
    assert len(plan.chunks) == 6
    dead: set[str] = set()
    free = [1]
    local_task = ffmpeg_task(real_reactor)

    def local(task: Task, progress: Any) -> Deferred[Any]:
        free[0] -= task.kind == "chunk"

        def freed(result: Any) -> Any:
            free[0] += task.kind == "chunk"
            return result
        return local_task(task, progress).addBoth(freed)

    owner: ChunkOwner
    worker: ChunkWorker

    def send(peer: str, kind: str, job: str, task: str) -> None:
        if peer == "peer" and "peer" not in dead:
            real_reactor.callLater(0, worker.offered, job, task)

    owner = ChunkOwner(Board(store, "owner", real_reactor.seconds), store, real_reactor, send=send,
                       peers=lambda: succeed([] if dead else [("peer", 2.0)]), gone=lambda n: n in dead,
                       local_free=lambda: free[0], reoffer=1.0, rng=random.Random(1))
    running: dict[str, Any] = {}
    peer_run = ffmpeg_task(real_reactor, running)
    killed: list[str] = []

    held_at_death: list[str] = []

    def die() -> None:
        """The peer is gone: what it held dies with it (no note, no write), the owner hears of it."""
        held_at_death.extend(sorted(task for _job, task in worker.running))
        dead.add("peer")
        for proto in running.values():
            proto.cancel(True)
        owner.holder_gone("peer")

    def run_chunk(chunk: ChunkRun, progress: Any) -> Deferred[Any]:
        task = chunk.task
        if "peer" in dead:
            return Deferred()
        d = peer_run(task, progress)
        d.addBoth(lambda r: Deferred() if "peer" in dead else r)  # a dead node writes nothing more
        if kill and not killed:
            killed.append(task.key)
            real_reactor.callLater(0.1, die)  # mid-encode
        return d

    def tell(to: str, kind: str, job: str, task: str) -> None:
        if "peer" not in dead:
            real_reactor.callLater(0, owner.noted, "peer", kind, job, task)

    sources = Sources(store, str(tmp_path / "peer"), lambda p: probe(real_reactor, p, ffprobe=FFPROBE))
    worker = ChunkWorker(Board(store, "peer", real_reactor.seconds), store, sources, parse_presets=Catalog().parse,
                         run_chunk=run_chunk, tell=tell, can_take=lambda: len(worker.running) < 2, ffmpeg=FFMPEG,
                         threads=1)
    work = tmp_path / "work"
    chunk_job = OwnedJob(job_id, "", "normal", [], SPEC, 2.0, plan, str(work), 100_000_000)
    split = SplitJob(plan, info, str(src), presets, str(work), str(tmp_path / "out"),
                     owner.run_task(chunk_job, local), ffmpeg=FFMPEG, threads=1, parallel=len(plan.chunks) + 1)
    await split.run()
    await whole(real_reactor, info, src, tmp_path / "whole", presets)
    assert frames(tmp_path / "out" / "v.mp4") == frames(tmp_path / "whole" / "v.mp4")
    holders = [(await Board(store, "x", real_reactor.seconds).read(job_id, f"chunk-{c.index}")).record
               for c in plan.chunks]
    by = {r.holder for r in holders}
    assert by == {"owner", "peer"} if not kill else "owner" in by
    if kill:
        lost = [r for r in holders if r.lost]
        assert killed[0] in held_at_death
        assert [r.task for r in lost] == held_at_death and {(r.lost, r.holder) for r in lost} == {(1, "owner")}
    await owner.end(job_id)
    assert store.backend.list(keys.chunks_prefix(job_id)).items == []
