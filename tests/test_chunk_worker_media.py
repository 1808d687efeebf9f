"""A peer's chunks on real ffmpeg and a file: store (gridnode/chunk_worker.py): the source fetched
from the store, the argv rebuilt from the worker's own probe and plan, the chunk's video stored as
one archive holding exactly the chunk's frames, the record done."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode import chunk_files, keys
from gridnode.chunk_records import DONE, Board, ChunkRecord
from gridnode.chunk_run import pool_runner
from gridnode.chunk_worker import ChunkWorker, Sources
from gridnode.media import chunks
from gridnode.media.pool import TranscodePool
from gridnode.media.probe import probe
from gridnode.media.sandbox import Sandbox
from gridnode.media.templates import Catalog
from gridnode.store.base import ObjectStore
from gridnode.store.file import FileBackend
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.nodes import boxes_here

pytestmark = [pytest.mark.integration, needs_ffmpeg]
SPEC = [{"name": "v", "container": "mp4", "size": 240}]


def make_source(path: Path, seconds: int = 12) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=320x240:rate=25:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=duration={seconds}",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest",
                    str(path)], check=True, timeout=120)


def count_frames(data: bytes, tmp: Path) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("v.mp4")
        assert member is not None
        (tmp / "chunk.mp4").write_bytes(member.read())
    out = subprocess.run([FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "json", str(tmp / "chunk.mp4")],
                         check=True, capture_output=True, timeout=60).stdout
    return int(json.loads(out)["streams"][0]["nb_read_frames"])


@pytest_twisted.ensureDeferred
async def test_a_peer_makes_chunks_from_the_store(real_reactor: Any, tmp_path: Path) -> None:
    """Two chunks of a 12 s source, offered to a worker with nothing but the store, run on its
    pool's workers (in a box where this host makes one): each record ends done with the chunk's
    frames, and its archive's mp4 holds exactly those frames."""
    src = tmp_path / "src.mp4"
    make_source(src)
    store = ObjectStore.synchronous(FileBackend(str(tmp_path / "store")))
    job = keys.new_id()
    store.backend.put_file(keys.input_source(job), str(src))
    presets = Catalog().parse(None, SPEC)
    info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
    plan = chunks.plan(info, presets, chunk_seconds=4, chunk_over=0)
    assert len(plan.chunks) == 3
    owner = Board(store, "owner", real_reactor.seconds)
    for c in plan.chunks[1:]:
        await owner.publish(ChunkRecord(job=job, index=c.index, owner="owner", chunks=3, first=c.first, end=c.end,
                                        rate=str(c.rate), chunk_seconds=4.0, spec=SPEC))

    pool = TranscodePool(real_reactor, str(tmp_path / "scratch"), workers=2)
    run = pool_runner(real_reactor, pool, lambda: Sandbox(boxed=boxes_here() is None))
    sources = Sources(store, str(tmp_path / "peer"), lambda p: probe(real_reactor, p, ffprobe=FFPROBE))
    told: list[tuple[str, ...]] = []
    worker = ChunkWorker(Board(store, "peer", real_reactor.seconds), store, sources, parse_presets=Catalog().parse,
                         run_chunk=run, tell=lambda *a: told.append(a), ffmpeg=FFMPEG, threads=1)
    for c in plan.chunks[1:]:
        assert await worker.offered(job, f"chunk-{c.index}")
    for d in list(worker.running.values()):
        await d
    for c in plan.chunks[1:]:
        held = await owner.read(job, f"chunk-{c.index}")
        expected = c.frames if c.end is not None else 300 - c.first
        assert (held.record.state, held.record.holder) == (DONE, "peer")
        assert held.record.frames == expected
        data, _ = store.backend.get_bytes(keys.chunk_files(job, f"chunk-{c.index}") + chunk_files.ARCHIVE)
        assert count_frames(data, tmp_path) == expected
    assert sorted(t[1] for t in told) == ["claimed", "claimed", "done", "done"]
