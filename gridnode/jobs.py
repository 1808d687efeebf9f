"""
The job: a record and its state machine, a plain object with no I/O.

States (docs/api.md, "States"): ``received -> probing -> queued -> transcoding -> storing
-> done``, or ``failed`` / ``cancelled`` from any state that is not final.
The record is what ``GET /jobs/<id>`` shows and what is written to
``jobs/<id>.json`` on every state change. The user's file name is data here;
it never becomes part of a key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from gridnode import keys
from gridnode.errors import GridnodeError
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.priority import RANK as PRIORITY_RANK

RECEIVED = "received"
PROBING = "probing"
QUEUED = "queued"
TRANSCODING = "transcoding"
STORING = "storing"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (RECEIVED, PROBING, QUEUED, TRANSCODING, STORING, DONE, FAILED, CANCELLED)
FINAL = frozenset({DONE, FAILED, CANCELLED})
_NEXT = {
    RECEIVED: {PROBING},
    PROBING: {QUEUED},
    QUEUED: {TRANSCODING},
    TRANSCODING: {STORING, QUEUED},  # back to queued when a node gives the job up
    STORING: {DONE, QUEUED},
}
#: a chunk's states in a job's ``chunks``: waiting for a worker, on one, made, failed (redone once,
#: unless ``poison``)
CHUNK_STATES = ("queued", "running", "done", "failed")
#: the largest job record a reader accepts
MAX_RECORD_BYTES = 256 * 1024


class BadTransition(GridnodeError):
    code = "bad_transition"
    status = 409


@dataclass
class Job:
    id: str
    state: str
    created: float
    updated: float
    name: str = ""
    presets: list[str] = field(default_factory=list)
    progress: float = 0.0
    input: dict[str, Any] = field(default_factory=dict)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    node: str = ""
    attempts: int = 0
    sha256: str = ""
    #: set when a node takes the job (accepted, claimed), never renewed: a job is adopted when its
    #: owner is gone (gridnode/adoption.py), not when this passes; 0 once its owner released it
    lease_until: float = 0.0
    #: the ``sub`` of the token that created it ("" on a node without tokens): only that tenant
    #: (and an admin) sees the job
    tenant: str = ""
    #: what a queued job waits for beyond a worker: "scratch_space" (its outputs need more
    #: scratch space than is free), else ""
    waiting: str = ""
    #: URLs its events are POSTed to (gridnode/notify/), and whether job.progress is among them
    notify: list[str] = field(default_factory=list)
    notify_progress: bool = False
    #: the job's inline output specs, as checked (``presets`` names the presets and templates)
    spec: list[dict[str, Any]] = field(default_factory=list)
    #: high, normal or low (gridnode/priority.py): the order its node's queue serves it in, kept
    #: when a peer adopts it
    priority: str = DEFAULT_PRIORITY
    #: a job made in chunks (gridnode/chunked.py): each chunk's index, start and seconds of video,
    #: state (``CHUNK_STATES``), node and tries; empty for a job made whole
    chunks: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, job_id: str, *, name: str, presets: list[str], node: str, size: int, now: float,
            sha256: str = "", tenant: str = "", notify: list[str] | None = None,
            notify_progress: bool = False, spec: list[dict[str, Any]] | None = None,
            priority: str = DEFAULT_PRIORITY) -> Job:
        if not keys.is_id(job_id):
            raise GridnodeError(f"job id {job_id!r} is not a gridnode id", code="bad_request", status=400)
        return cls(id=job_id, state=RECEIVED, created=now, updated=now, name=name, presets=list(presets),
                   node=node, input={"name": name, "size": size}, sha256=sha256, tenant=tenant,
                   notify=list(notify or []), notify_progress=notify_progress,
                   spec=list(spec or []), priority=priority)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def input_left(self) -> float:
        """Seconds of input ffmpeg has still to convert for this job (0 when unknown, or past
        ffmpeg): what a node's load sums as ``work``."""
        duration = self.input.get("duration")
        if (self.final or self.state == STORING or not isinstance(duration, (int, float))
                or isinstance(duration, bool) or not 0 < duration < math.inf):
            return 0.0
        return float(duration) * (1.0 - self.progress)

    def set_chunks(self, chunks: list[dict[str, Any]], now: float) -> bool:
        """Record the chunks' states; True when they changed."""
        if self.final or chunks == self.chunks:
            return False
        self.chunks = chunks
        self.updated = now
        return True

    def advance(self, state: str, now: float) -> None:
        """Move to the next state of the happy path (or back to queued)."""
        if state not in _NEXT.get(self.state, set()):
            raise BadTransition(f"job {self.id} cannot go from {self.state} to {state}")
        self.state = state
        self.updated = now
        if state != QUEUED:
            self.waiting = ""
        if state == QUEUED:
            self.progress = 0.0
        if state == DONE:
            self.progress = 1.0

    def accept(self, now: float, lease: float) -> None:
        """Its probe passed: queued, first attempt, leased to its node for ``lease`` seconds."""
        self.advance(QUEUED, now)
        self.attempts = 1
        self.lease_until = now + lease

    @property
    def released(self) -> bool:
        """Its owner gave it back to the pool (`release`): any node may claim it."""
        return self.state == QUEUED and self.lease_until == 0.0

    def set_progress(self, progress: float, now: float) -> bool:
        """Record transcoding progress; True when it moved (progress never goes back)."""
        progress = min(1.0, max(0.0, progress))
        if self.state != TRANSCODING or progress <= self.progress:
            return False
        self.progress = progress
        self.updated = now
        return True

    def reclaim(self, node: str, now: float, lease: float) -> None:
        """A node takes the job over (adoption, or its own restart): queued again, one more attempt."""
        if self.final:
            raise BadTransition(f"job {self.id} is {self.state} already")
        self.state = QUEUED
        self.waiting = ""
        self.node = node
        self.attempts += 1
        self.progress = 0.0
        self.outputs = []
        self.chunks = []  # the adopter's run lists them again (the chunks done on the pool are kept)
        self.lease_until = now + lease
        self.updated = now

    def release(self, now: float) -> None:
        """Its node gives the job back to the pool (draining): queued with its lease expired, so a
        peer adopts it at once; node and attempts stay, the adopter's `reclaim` changes them."""
        if self.final:
            raise BadTransition(f"job {self.id} is {self.state} already")
        self.state = QUEUED
        self.waiting = ""
        self.progress = 0.0
        self.chunks = []
        self.lease_until = 0.0
        self.updated = now

    def fail(self, code: str, message: str, now: float) -> None:
        if self.final:
            raise BadTransition(f"job {self.id} is {self.state} already")
        self.state = FAILED
        self.waiting = ""
        self.error = {"code": code, "message": message}
        self.updated = now

    def cancel(self, now: float) -> None:
        if self.final:
            raise BadTransition(f"job {self.id} is {self.state} already; nothing to cancel")
        self.state = CANCELLED
        self.waiting = ""
        self.error = {"code": "cancelled", "message": "cancelled by a client"}
        self.updated = now

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data: a new dict, whose lists and dicts are the job's own
        (serialise it, don't change it). Not ``dataclasses.asdict``: its deep copy was most of
        the cost of the several records a job writes."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["progress"] = round(self.progress, 4)
        return record

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def loads(cls, data: bytes) -> Job:
        """Read a stored record, refusing anything that is not one."""
        if len(data) > MAX_RECORD_BYTES:
            raise GridnodeError("job record too large", code="bad_record", status=500)
        try:
            raw = json.loads(data)
            job = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError) as e:
            raise GridnodeError(f"unreadable job record: {e}", code="bad_record", status=500) from None
        if (job.state not in STATES or not keys.is_id(job.id) or not isinstance(job.tenant, str)
                or not isinstance(job.waiting, str) or not isinstance(job.notify, list)
                or not all(isinstance(u, str) for u in job.notify) or not isinstance(job.spec, list)
                or not isinstance(job.chunks, list) or not all(isinstance(c, dict) for c in job.chunks)
                or job.priority not in PRIORITY_RANK):
            raise GridnodeError(f"job record with state {job.state!r}", code="bad_record", status=500)
        return job
