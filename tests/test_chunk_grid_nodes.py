"""Chunks made by real twistd nodes: two nodes of a pool on a file: store publish ``chunk_idle``
in nodes.json, take the chunks an owner offers them by ChunkNote over their peer port, fetch the
source from the store, run each chunk on a worker of theirs (boxed where the host boxes) and
store its archive; the owner (this test, with the library's ChunkOwner, none of its own workers)
stitches a file that has the one-piece encode's frames."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, inlineCallbacks

from gridnode import keys
from gridnode.chunk_grid import FIGURE, PeerLoads
from gridnode.chunk_owner import ChunkOwner, OwnedJob
from gridnode.chunk_records import Board
from gridnode.media import chunks
from gridnode.media.probe import probe
from gridnode.media.sandbox import resolve_user
from gridnode.media.split import SplitJob
from gridnode.media.templates import Catalog
from gridnode.membership import wire
from gridnode.membership.peer import PeerProtocol
from gridnode.store.base import ObjectStore
from gridnode.store.file import FileBackend
from tests.helpers import free_port, poll, wait_for
from tests.media_samples import FFMPEG, FFPROBE, needs_ffmpeg
from tests.nodes import NodeProcess, boxes_here, request, upload
from tests.test_chunk_grid_media import ffmpeg_task
from tests.test_chunk_worker_media import make_source
from tests.test_chunked_nodes import fetch, wait_done
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
        try:
            address = self.address(peer)
        except FileNotFoundError:
            return  # gone: as ChunkGrid.send, nothing to a member not alive
        self.sent.append((peer, kind, task))
        self._send(wire.Note(peer, address, "tester", kind, job, task))

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


def start_nodes(tmp_path: Path, store_dir: Path, names: tuple[str, ...],
                workers: dict[str, int] | None = None, *args: str) -> dict[str, NodeProcess]:
    nodes = {name: NodeProcess(tmp_path / name, [
        "--store", f"file:{store_dir}", "--node-id", name, "--heartbeat", "1", "--min-free", "0",
        "--workers", str((workers or {}).get(name, 1)),
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1", *args])
        for name in names}
    for node in nodes.values():
        node.start()
    return nodes


class Owner:
    """This test as a chunked job's owner: the library's ChunkOwner with none of its own workers,
    offering by ChunkNote to the nodes nodes.json lists idle; ``gone``: the node's registry record
    is gone (its watcher deleted it once the membership confirmed its death)."""

    def __init__(self, reactor: Any, tmp_path: Path, store_dir: Path) -> None:
        self.reactor = reactor
        self.tmp = tmp_path
        self.store_dir = store_dir
        self.store = ObjectStore.synchronous(FileBackend(str(store_dir)))
        self.notes = Notes(reactor, store_dir)
        self.owner = ChunkOwner(Board(self.store, "tester", reactor.seconds), self.store, reactor,
                                send=self.notes.send,
                                peers=PeerLoads(self.store, keys.nodes_list("dev", "default"), reactor).idle,
                                gone=self.gone, local_free=lambda: 0, reoffer=1.0, look=2.0, rng=random.Random(2))

    def gone(self, node: str) -> bool:
        return not (self.store_dir / "registry" / "dev" / "default" / "nodes" / f"{node}.json").exists()

    async def job(self, seconds: int = 12, chunk_seconds: float = 2.0) -> tuple[str, Any, Any, Deferred[Any]]:
        src = self.tmp / "src.mp4"
        make_source(src, seconds)
        job_id = keys.new_id()
        self.store.backend.put_file(keys.input_source(job_id), str(src))
        presets = Catalog().parse(None, SPEC)
        info = await probe(self.reactor, str(src), ffprobe=FFPROBE)
        plan = chunks.plan(info, presets, chunk_seconds=chunk_seconds, chunk_over=0)
        work = self.tmp / "work"
        split = SplitJob(plan, info, str(src), presets, str(work), str(self.tmp / "out"),
                         self.owner.run_task(OwnedJob(job_id, "", "normal", [], SPEC, chunk_seconds, plan, str(work),
                                                      10**8), ffmpeg_task(self.reactor)),
                         ffmpeg=FFMPEG, threads=1, parallel=len(plan.chunks) + 1)
        return job_id, info, plan, split.run()

    async def check(self, job_id: str, info: Any, plan: Any) -> list[Any]:
        """The stitch is the whole's frame for frame; the records, then the job's end."""
        presets = Catalog().parse(None, SPEC)
        await whole(self.reactor, info, self.tmp / "src.mp4", self.tmp / "whole", presets)
        assert frames(self.tmp / "out" / "v.mp4") == frames(self.tmp / "whole" / "v.mp4")
        records = [(await self.owner.board.read(job_id, f"chunk-{c.index}")).record for c in plan.chunks]
        await self.owner.end(job_id)
        assert self.store.backend.list(keys.chunks_prefix(job_id)).items == []
        return records


def peer_chunks(node: NodeProcess) -> dict[str, float]:
    """What a node's /metrics says of the peers' chunks it made: done, their durations' count,
    and those running now."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = request("GET", node.url + "/metrics")
    assert status == 200, text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    return {"made": samples.get(("gridnode_peer_chunks_finished_total", (("reason", ""), ("result", "done"))), 0.0),
            "timed": samples.get(("gridnode_peer_chunk_duration_seconds_count", (("result", "done"),)), 0.0),
            "running": samples[("gridnode_peer_chunks_running", ())]}


@pytest_twisted.ensureDeferred
async def test_two_nodes_make_an_owners_chunks(real_reactor: Any, tmp_path: Path) -> None:
    """The owner offers each chunk to the idle nodes of nodes.json; the nodes make them all (each
    on its one worker, most often both take some); the owner, which hears nothing back (it is no member:
    every note to it is lost), finds each done at its looks in the store, and stitches the
    whole's frames. Each node's /metrics counts as made (and timed) the chunks its records say
    it made, and none running."""
    store_dir = tmp_path / "store"
    nodes = start_nodes(tmp_path, store_dir, ("na", "nb"))
    try:
        for node in nodes.values():
            await node.wait_ready()
        await wait_for(lambda: {n: load.get(FIGURE) for n, load in listed(store_dir).items()} == {"na": 1, "nb": 1},
                       60)
        owner = Owner(real_reactor, tmp_path, store_dir)
        job_id, info, plan, done = await owner.job()
        await wait_for(lambda: done.called, 120, interval=0.5)
        await done
        records = await owner.check(job_id, info, plan)
        # both are offered chunks; which takes how many is the scheduler's (on a busy machine one
        # node may take them all)
        assert {r.holder for r in records} <= {"na", "nb"} and all(r.holder for r in records)
        for name, node in nodes.items():
            made = sum(r.holder == name for r in records)
            # counted once the finish is written: a scrape may come a moment before
            await wait_for(lambda n=node, m=made: peer_chunks(n)["made"] == m, 30)
            assert peer_chunks(node) == {"made": made, "timed": made, "running": 0}, name
    finally:
        for node in nodes.values():
            node.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the node runs as root here, its children as nobody (CI runs as root)")
def test_children_as_nobody_make_and_stitch_a_peers_chunks(tmp_path: Path, open_folder: Path) -> None:
    """Two nodes run as root, their ffprobe and ffmpeg as nobody in boxes (a root node's default).
    The peer's fetched source lies in folders nobody's box may pass, so it probes and cuts it
    (not releases it as unreadable); the owner's stitch, as nobody, reads the chunks unpacked
    from the peer's archives as it reads its own."""
    why = boxes_here(resolve_user("auto"))
    if why is not None:
        pytest.skip(f"no box for nobody here: {why}")
    store_dir = tmp_path / "store"
    src = open_folder / "src.mp4"
    make_source(src, 20)
    nodes = start_nodes(open_folder, store_dir, ("na", "nb"), None, "--ffmpeg-user", "auto", "--chunk-over", "0",
                        "--chunk-seconds", "2")
    try:
        for node in nodes.values():
            node.block_until_ready(30)
        both_idle = {"na": 1, "nb": 1}  # else nb may be offered nothing
        poll(lambda: {n: load.get(FIGURE) for n, load in listed(store_dir).items()} == both_idle, 60,
             "both nodes listed idle")
        status, _, body = upload(nodes["na"].url, src, "mp4-720p")
        assert status == 201, body
        job = wait_done(nodes["na"], body["id"], 180)
        # na's one worker takes the audio pass first: nb, idle, is offered the open chunks
        assert "nb" in {c["node"] for c in job["chunks"]}, job["chunks"]
        assert all(c["state"] == "done" for c in job["chunks"])
        made = fetch(nodes["na"], job, "mp4-720p", tmp_path)
        assert len(frames(made)) == 20 * 25  # every chunk's frames, the peer's too
    finally:
        for node in nodes.values():
            node.stop()


@pytest_twisted.ensureDeferred
async def test_a_node_killed_holding_a_chunk(real_reactor: Any, tmp_path: Path) -> None:
    """Three nodes; kill -9 of one while it holds a chunk: once its death is confirmed (its record
    deleted by its watcher), the chunk is reopened (one holder lost) and another node makes it;
    only the chunks the dead node held are redone, and the stitch is still the whole's frames."""
    store_dir = tmp_path / "store"
    nodes = start_nodes(tmp_path, store_dir, ("na", "nb", "nc"), {"na": 2})  # na: offered the most
    try:
        for node in nodes.values():
            await node.wait_ready()
        await wait_for(lambda: {n: load.get(FIGURE) for n, load in listed(store_dir).items()}
                       == {"na": 2, "nb": 1, "nc": 1}, 60)
        owner = Owner(real_reactor, tmp_path, store_dir)
        job_id, info, plan, done = await owner.job(24, 2.0)

        def held_by_na() -> list[str]:
            found = []
            for path in (store_dir / "chunks" / job_id).glob("chunk-*.json"):
                record = json.loads(path.read_text())
                if record["state"] == "claimed" and record["holder"] == "na":
                    found.append(path.stem)
            return found

        await wait_for(held_by_na, 60, interval=0.02)
        nodes["na"].signal(signal.SIGKILL)
        process = nodes["na"].process
        assert process is not None
        process.wait()
        held = held_by_na()
        assert held
        await wait_for(lambda: done.called, 180, interval=0.5)
        await done
        records = await owner.check(job_id, info, plan)
        lost = sorted(r.task for r in records if r.lost)
        assert lost == sorted(held), (held, records)
        assert all(r.holder in ("nb", "nc") and r.lost == 1 for r in records if r.lost)
    finally:
        for node in nodes.values():
            node.stop()
