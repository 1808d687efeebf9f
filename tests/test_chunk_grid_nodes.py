"""Chunks made by real twistd nodes: two nodes of a pool on a file: store publish ``chunk_idle``
in nodes.json, take the chunks an owner offers them by ChunkNote over their peer port, fetch the
source from the store, run each chunk on a worker of theirs (boxed where the host boxes) and
store its archive; the owner (this test, with the library's ChunkOwner, none of its own workers)
stitches a file that has the one-piece encode's frames."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, inlineCallbacks

from gridnode import keys
from gridnode.chunk_grid import FIGURE, PeerLoads
from gridnode.chunk_owner import ChunkJob, ChunkOwner
from gridnode.chunk_records import Board
from gridnode.media import chunks
from gridnode.media.probe import probe
from gridnode.media.split import SplitJob
from gridnode.media.templates import Catalog
from gridnode.membership import wire
from gridnode.membership.peer import PeerProtocol
from gridnode.store.base import ObjectStore
from gridnode.store.file import FileBackend
from tests.helpers import free_port, wait_for
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.nodes import NodeProcess
from tests.test_chunk_grid_media import ffmpeg_task
from tests.test_chunk_worker_media import make_source
from tests.test_split_media import frames, whole

pytestmark = [pytest.mark.integration, needs_ffmpeg]
SPEC = [{"name": "v", "container": "mp4", "size": 240}]


class Notes:
    """Sends sealed ChunkNotes to nodes at the peer addresses their registry records give."""

    def __init__(self, reactor: Any, store: Path) -> None:
        self.reactor = reactor
        self.store = store
        self.key = wire.peer_key(b"", "dev", "default")  # loopback peers without a secret file
        self.sent: list[tuple[str, str, str]] = []

    def address(self, node: str) -> str:
        record = json.loads((self.store / "registry" / "dev" / "default" / "nodes" / f"{node}.json").read_text())
        return str(record["peer_addr"])

    def send(self, peer: str, kind: str, job: str, task: str) -> None:
        self.sent.append((peer, kind, task))
        self._send(wire.Note(peer, self.address(peer), "tester", kind, job, task))

    @inlineCallbacks
    def _send(self, note: wire.Note) -> Any:
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        host, _, port = note.dest_addr.rpartition(":")
        proto = yield connectProtocol(TCP4ClientEndpoint(self.reactor, host, int(port)), PeerProtocol())
        command, args = wire.seal(self.key, note)
        yield proto.callRemote(command, **args)
        proto.transport.loseConnection()


def listed(store: Path) -> dict[str, dict[str, float]]:
    path = store / "registry" / "dev" / "default" / "nodes.json"
    return {n["id"]: n["load"] for n in json.loads(path.read_text())["nodes"]} if path.exists() else {}


@pytest_twisted.ensureDeferred
async def test_two_nodes_make_an_owners_chunks(real_reactor: Any, tmp_path: Path) -> None:
    """The owner offers each chunk to the idle nodes of nodes.json; the nodes make them all (each
    on its one worker, so both take some); the owner, which hears nothing back (it is no member:
    every note to it is lost), finds each done at its looks in the store, and stitches the
    whole's frames."""
    store_dir = tmp_path / "store"
    nodes = {name: NodeProcess(tmp_path / name, [
        "--store", f"file:{store_dir}", "--node-id", name, "--heartbeat", "1", "--min-free", "0", "--workers", "1",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
        for name in ("na", "nb")}
    for node in nodes.values():
        node.start()
    try:
        for node in nodes.values():
            await node.wait_ready()
        await wait_for(lambda: {n: load.get(FIGURE) for n, load in listed(store_dir).items()} == {"na": 1, "nb": 1},
                       20)
        src = tmp_path / "src.mp4"
        make_source(src)
        store = ObjectStore.synchronous(FileBackend(str(store_dir)))
        job_id = keys.new_id()
        store.backend.put_file(keys.input_source(job_id), str(src))
        presets = Catalog().parse(None, SPEC)
        info = await probe(real_reactor, str(src), ffprobe=FFPROBE)
        plan = chunks.plan(info, presets, chunk_seconds=2, chunk_over=0)
        notes = Notes(real_reactor, store_dir)
        owner = ChunkOwner(Board(store, "tester", real_reactor.seconds), store, real_reactor, send=notes.send,
                           peers=PeerLoads(store, keys.nodes_list("dev", "default"), real_reactor).idle,
                           gone=lambda n: False, local_free=lambda: 0, reoffer=1.0, look=2.0,
                           rng=random.Random(2))
        work = tmp_path / "work"
        split = SplitJob(plan, info, str(src), presets, str(work), str(tmp_path / "out"),
                         owner.run_task(ChunkJob(job_id, "", "normal", [], SPEC, 2.0, plan, str(work), 10**8),
                                        ffmpeg_task(real_reactor)),
                         ffmpeg=FFMPEG, threads=1, parallel=len(plan.chunks) + 1)
        done: Deferred[Any] = split.run()
        await wait_for(lambda: done.called, 120, interval=0.5)
        await done
        holders = {(await owner.board.read(job_id, f"chunk-{c.index}")).record.holder for c in plan.chunks}
        assert holders == {"na", "nb"}
        await whole(real_reactor, info, src, tmp_path / "whole", presets)
        assert frames(tmp_path / "out" / "v.mp4") == frames(tmp_path / "whole" / "v.mp4")
        await owner.end(job_id)
        assert not (store_dir / "chunks" / job_id).exists() or not any((store_dir / "chunks" / job_id).iterdir())
    finally:
        for node in nodes.values():
            node.stop()
