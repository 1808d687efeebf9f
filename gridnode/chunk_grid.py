"""
A node's part in chunks run by the pool, assembled: the owner side (gridnode/chunk_owner.py)
for its own chunked jobs, the worker side (gridnode/chunk_worker.py) for its peers', the notes
between nodes (``ChunkNote``, gridnode/membership/wire.py) and the peers' idle workers.

The converter asks `ChunkGrid.run_task` for the `RunTask` of a chunked job's `SplitJob`; the
node merges `ChunkGrid.load_figures` into its load (``chunk_idle``: the workers it would give a
peer's chunk now, which also says it takes notes: a node of an earlier release has no such
figure and is never sent one); the membership hands it every note (``on_note``) and every
member gone (``on_gone``).

Which peers are idle: the pool's ``nodes.json`` (every node's load as of the registry writer's
last heartbeat), read at most once every ``refresh`` s and only while this node has a task to
offer, and once more when a chunked job starts; a peer it holds busy or gone is not offered
anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from gridnode import keys
from gridnode.chunk_owner import ChunkOwner, OwnedJob
from gridnode.chunk_records import Board
from gridnode.chunk_worker import ChunkWorker, RunChunk, Sources
from gridnode.errors import GridnodeError
from gridnode.jobs import Job
from gridnode.media.chunks import Plan
from gridnode.media.presets import Preset
from gridnode.media.probe import Limits, ProbeResult
from gridnode.media.split import RunTask
from gridnode.membership import swim
from gridnode.membership.wire import Note
from gridnode.metrics import Metrics
from gridnode.registry.records import clean_load
from gridnode.store.base import ObjectStore

#: the load figure: workers this node would give a peer's chunk now
FIGURE = "chunk_idle"
#: seconds between reads of nodes.json for the peers' idle workers
REFRESH = 30.0
#: a chunked job starting reads nodes.json anew unless it was read this many seconds ago
FRESH = 2.0
#: the largest nodes.json read (5,000 nodes' entries)
MAX_LIST_BYTES = 8 * 1024 * 1024
_TASK = re.compile(r"chunk-[0-9]{1,5}")


class PeerLoads:
    """The peers' ``chunk_idle`` figures from ``nodes.json``: one GET per ``refresh`` s at most."""

    _log = Logger()

    def __init__(self, store: ObjectStore, key: str, clock: Any, refresh: float = REFRESH) -> None:
        self.store = store
        self.key = key
        self.clock = clock
        self.refresh = refresh
        self._figures: list[tuple[str, float]] = []
        self._read_at: float | None = None

    def stale(self) -> None:
        """A chunked job starts here: its first offers go by figures read now (a heartbeat old at
        most), not by up to ``refresh`` s older ones, from when every peer may have been busy."""
        if self._read_at is not None and self.clock.seconds() - self._read_at >= FRESH:
            self._read_at = None

    @inlineCallbacks
    def idle(self) -> Any:
        """(node id, idle workers) of every listed node with some, as last read."""
        now = self.clock.seconds()
        if self._read_at is not None and now - self._read_at < self.refresh:
            return self._figures
        self._read_at = now
        try:
            data, _ = yield self.store.get_bytes(self.key, max_size=MAX_LIST_BYTES)
            nodes = json.loads(data).get("nodes", [])
            figures = []
            for entry in nodes if isinstance(nodes, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    idle = clean_load(entry.get("load")).get(FIGURE, 0.0)
                    if idle >= 1:
                        figures.append((entry["id"], idle))
            self._figures = figures
        except (GridnodeError, ValueError, AttributeError) as e:
            self._log.debug("no peer loads from {key}: {reason}", key=self.key, reason=str(e))
        return self._figures


class ChunkGrid:
    """One node's owner and worker sides of pool-run chunks, and the notes that join them."""

    _log = Logger()

    def __init__(self, clock: Any, store: ObjectStore, membership: Any, *, node_id: str, nodes_list: str,
                 parse_presets: Callable[[str | None, list[Any] | None], list[Preset]],
                 probe: Callable[[str], Deferred[ProbeResult]], run_chunk: RunChunk, local_free: Callable[[], int],
                 draining: Callable[[], bool], gone: Callable[[str], bool], scratch: str, ffmpeg: str = "ffmpeg",
                 threads: int | None = None, input_limits: Limits = Limits(),
                 children_user: Callable[[], str | None] = lambda: None, metrics: Metrics | None = None,
                 others_waiting: Callable[[str], bool] = lambda _job: True) -> None:
        self.clock = clock
        #: whether a task of a job other than the one named waits for this node's workers
        self.others_waiting = others_waiting
        self.membership = membership
        self.node_id = node_id
        self.local_free = local_free
        self.draining = draining
        self.board = Board(store, node_id, clock.seconds)
        self.loads = PeerLoads(store, nodes_list, clock)
        self.sources = Sources(store, scratch, probe, user=children_user)
        self.worker = ChunkWorker(self.board, store, self.sources, parse_presets=parse_presets, run_chunk=run_chunk,
                                  tell=self.send, can_take=lambda: self.idle() > self.worker.preparing,
                                  ffmpeg=ffmpeg, threads=threads, input_limits=input_limits, metrics=metrics)
        self.owner = ChunkOwner(self.board, store, clock, send=self.send, peers=self._idle_peers, gone=gone,
                                local_free=self.idle, turn=self._turn, user=children_user,
                                metrics=metrics)
        membership.on_note = self.on_note
        membership.on_gone.append(lambda member, incarnation: self.owner.holder_gone(member))

    def idle(self) -> int:
        return 0 if self.draining() else max(0, self.local_free())

    def _turn(self, job_id: str) -> bool:
        """Whether a job's chunks keep their turn here with no worker idle: while another job's
        task waits for this node's workers (fair share); else they stay open for idle peers."""
        return not self.draining() and self.others_waiting(job_id)

    def load_figures(self) -> dict[str, float]:
        """What the node's load adds: its workers free for a peer's chunk (and that it takes notes)."""
        return {FIGURE: float(self.idle())}

    def run_task(self, job: Job, plan: Plan, chunk_seconds: float, work_dir: str, limit: int,
                 local: RunTask, told: Callable[[int, str, str], None] = lambda _i, _s, _n: None) -> RunTask:
        """The `RunTask` a chunked job's `SplitJob` runs its tasks through: chunks on the pool (ours
        first), the audio pass and the stitches ``local`` (the node's own runner of a task under
        the job's tenant and priority). Give the `SplitJob` ``parallel`` of every task at once
        (``len(plan.chunks) + 1``): how many run is the pool's idle workers' to say. ``limit``:
        the most bytes a chunk's archive may hold (``presets.job_output_limit``). Call `end`
        when the job is over, whichever way. ``told(index, state, node)``: each chunk's change,
        for the job's chunk list."""
        chunk_job = OwnedJob(job.id, job.tenant, job.priority, list(job.presets), list(job.spec), chunk_seconds,
                             plan, work_dir, limit, told)
        self.loads.stale()
        return self.owner.run_task(chunk_job, local)

    def recorded_chunk_seconds(self, job_id: str) -> Deferred[Any]:
        """The chunk length a job's existing records were planned with, or None: the job's adopter
        plans with it (if its own ``--chunk-seconds`` differs, the records' cuts would not match
        and every chunk would be made again)."""
        return self.board.chunk_seconds(job_id)

    def stop(self, job_id: str) -> None:
        """The job's run here stopped (its entry cancelled): its chunks still waiting on the pool
        fail ``cancelled``; their records stay for a run again or the job's adopter."""
        self.owner.stop(job_id)

    def end(self, job_id: str) -> Deferred[Any]:
        """The job is over: its chunk records and archives go, its holders drop its source."""
        return self.owner.end(job_id)

    def _idle_peers(self) -> Deferred[list[tuple[str, float]]]:
        def alive(figures: list[tuple[str, float]]) -> list[tuple[str, float]]:
            return [(peer, idle) for peer, idle in figures if self._address(peer) is not None]
        return self.loads.idle().addCallback(alive)

    def _address(self, peer: str) -> str | None:
        view = self.membership.machine.member(peer)
        return view.address if view is not None and view.state == swim.ALIVE and peer != self.node_id else None

    def send(self, peer: str, kind: str, job_id: str, task: str) -> None:
        address = self._address(peer)
        if address is None:
            return  # gone or unknown: a holder's owner learns from the record, an offer goes elsewhere
        self.membership.send_note(Note(peer, address, self.node_id, kind, job_id, task))

    def on_note(self, note: Note) -> None:
        """A note for us, authenticated: checked before it leads to any request."""
        if not keys.is_id(note.job) or (note.kind != "ended" and not _TASK.fullmatch(note.task)):
            self.membership.drop("bad_note")  # counted with the peer messages dropped (/peers, metrics)
            return
        if note.kind == "offer":
            d = self.worker.offered(note.job, note.task)
            d.addErrback(lambda f: self._log.warn("offer of {task} of job {job} not taken: {reason}", task=note.task,
                                                  job=note.job, reason=f.getErrorMessage()))
        elif note.kind == "ended":
            self.sources.forget(note.job)
        else:
            self.owner.noted(note.sender, note.kind, note.job, note.task)


def others_waiting(pool: Any, job_id: str) -> bool:
    """Whether a `TranscodePool` entry of a job other than ``job_id`` (its tasks: ``<job>.chunk-3``)
    waits for a worker."""
    return any(entry.split(".", 1)[0] != job_id for entry in pool.waiting())


def idle_workers(pool: Any) -> int:
    """A `TranscodePool`'s workers nobody holds or waits for: what it may give a peer's chunk."""
    return max(0, pool.workers - pool.running - pool.queued)
