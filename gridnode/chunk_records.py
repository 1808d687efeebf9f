"""
A chunked job's tasks as records in the store, claimed by any node of the pool.

``chunks/<job>/<task>.json`` (``task``: ``chunk-3``) is written by the job's owner when the
task is to run, and holds what a node needs to rebuild the task's argv on its own paths: the
job's id, tenant, priority and presets as its record holds them, ``chunk_seconds`` and the
number of chunks of the owner's plan, and the chunk's cut (its slots and rate), which the
holder's own plan must give again (`disagrees`) before its ffmpeg starts. Its ``state``:

    open --claim--> claimed --finish--> done
      ^                |  \\--fail--> failed (the task's own error: the job's)
      |--release-------|  (the holder's plan disagrees, or it stops: no attempt lost)
      |--reopen--------|  (the owner: its holder is gone; ``lost`` + 1, ``poison`` at POISON)

Every write but the first is conditional on the ETag of the record just read or written (as
jobs are claimed, gridnode/adoption.py), so of two claimers exactly one wins, and a holder
whose task was reopened under it finds out at its next write (`NotHeld`) and writes nothing.
`Board` does the reads and writes over an `ObjectStore` with an injected clock; `load` checks
every record read, since any node (or anyone with the bucket) may have written it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from twisted.internet.defer import inlineCallbacks

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.priority import RANK
from gridnode.store.base import ObjectStore

OPEN, CLAIMED, DONE, FAILED = "open", "claimed", "done", "failed"
STATES = (OPEN, CLAIMED, DONE, FAILED)
#: the record layout's version: a reader refuses a higher one rather than guess at it
FORMAT = 1
#: the largest record read (a job record's limit: the presets and specs are the job's)
MAX_BYTES = 256 * 1024
#: errors of a chunk's own making (ffmpeg, its limits): its holder fails the record with one
#: (anything else releases it); these and ``poison`` are the codes a failed record should carry
CHUNK_ERRORS = frozenset({"ffmpeg_failed", "output_too_large", "timeout", "frames"})
#: holders a task may lose (each gone while it held the task) before the job is ``poison``, as a
#: job is after as many adoptions (gridnode/adoption.py's MAX_ATTEMPTS)
POISON = 3
#: chunks a plan may hold: a 4-hour input in 1-second chunks, bounded
MAX_CHUNKS = 20_000
#: nodes named in ``refused`` at most
MAX_REFUSED = 64


class BadChunk(GridnodeError):
    """A chunk record that is not one this node wrote or would write: it is not run."""

    code = "bad_chunk"
    status = 422


class NotHeld(GridnodeError):
    """The task is not ours any more (reopened by its owner, or gone with its job): drop the work."""

    code = "lost_ownership"
    status = 409


@dataclass
class ChunkRecord:
    job: str
    index: int
    owner: str
    chunks: int
    first: int
    end: int | None
    rate: str
    chunk_seconds: float
    seconds: float = 0.0
    presets: list[str] = field(default_factory=list)
    spec: list[dict[str, Any]] = field(default_factory=list)
    tenant: str = ""
    priority: str = "normal"
    state: str = OPEN
    holder: str = ""
    #: claims so far, and holders lost (gone while holding it: `POISON` of them fail the job)
    attempts: int = 0
    lost: int = 0
    #: nodes whose own plan disagreed with this cut: not offered the task again
    refused: list[str] = field(default_factory=list)
    #: done: the frames its ffmpeg wrote and the bytes of its archive (``chunks/<job>/<task>/``)
    frames: int | None = None
    size: int = 0
    #: failed: ``{"code", "message"}``
    error: dict[str, str] | None = None
    updated: float = 0.0
    kind: str = "chunk"

    @property
    def task(self) -> str:
        return f"{self.kind}-{self.index}"

    @property
    def key(self) -> str:
        return keys.chunk_record(self.job, self.task)

    def dumps(self) -> bytes:
        return json.dumps({**asdict(self), "format": FORMAT}, sort_keys=True, separators=(",", ":")).encode()


def _int(raw: dict[str, Any], name: str, low: int = 0, high: int = 2**53) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadChunk(f"field {name!r} is {str(value)[:40]!r}, not a whole number in [{low}, {high}]")
    return value


def _str(raw: dict[str, Any], name: str, limit: int = 256) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise BadChunk(f"field {name!r} is not a string of at most {limit} characters")
    return value


def _number(raw: dict[str, Any], name: str) -> float:
    value = raw.get(name)
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer past any float
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise BadChunk(f"field {name!r} is not a finite number >= 0")
    return number


def _node(value: str, name: str) -> str:
    try:
        return keys.check_segment(value, name)
    except GridnodeError:
        raise BadChunk(f"field {name!r} is not a node id") from None


def load(data: bytes, job_id: str, task: str) -> ChunkRecord:
    """The record of ``job_id``'s ``task`` from its bytes, every field checked; `BadChunk` says
    which is wrong. A record of another job or task (copied, or planted) is refused."""
    if len(data) > MAX_BYTES:
        raise BadChunk(f"a chunk record of {len(data)} bytes (at most {MAX_BYTES})")
    try:
        raw = json.loads(data)
    except ValueError:
        raise BadChunk("the chunk record is not JSON") from None
    if not isinstance(raw, dict):
        raise BadChunk("the chunk record is not a JSON object")
    if _int(raw, "format", 1) > FORMAT:
        raise BadChunk(f"chunk record format {raw['format']}; this node reads {FORMAT}: upgrade it")
    if raw.get("job") != job_id or not keys.is_id(job_id):
        raise BadChunk(f"a record of job {str(raw.get('job'))[:40]!r} stored under job {job_id!r}")
    if raw.get("kind") != "chunk":
        raise BadChunk(f"a task of kind {str(raw.get('kind'))[:20]!r}: only chunks are run by the pool")
    chunks = _int(raw, "chunks", 2, MAX_CHUNKS)
    index = _int(raw, "index", 0, chunks - 1)
    if f"chunk-{index}" != task:
        raise BadChunk(f"the record of chunk {index} stored as task {task!r}")
    first = _int(raw, "first")
    end = None if raw.get("end") is None else _int(raw, "end", first + 1)
    rate = _str(raw, "rate", 40)
    try:
        parsed = Fraction(rate)
    except (ValueError, ZeroDivisionError):
        parsed = Fraction(0)
    if not 0 < parsed <= 1000:
        raise BadChunk(f"field 'rate' is {rate!r}, not a frame rate")
    presets, spec, refused = raw.get("presets"), raw.get("spec"), raw.get("refused")
    if not isinstance(presets, list) or not all(isinstance(p, str) for p in presets):
        raise BadChunk("field 'presets' is not a list of names")
    if not isinstance(spec, list) or not all(isinstance(s, dict) for s in spec):
        raise BadChunk("field 'spec' is not a list of output specs")
    if not isinstance(refused, list) or len(refused) > MAX_REFUSED or not all(isinstance(n, str) for n in refused):
        raise BadChunk("field 'refused' is not a list of node ids")
    state = raw.get("state")
    if not isinstance(state, str) or state not in STATES:
        raise BadChunk(f"field 'state' is {str(state)[:20]!r}, not one of {', '.join(STATES)}")
    priority = raw.get("priority")
    if not isinstance(priority, str) or priority not in RANK:
        raise BadChunk(f"field 'priority' is {str(priority)[:20]!r}")
    error = raw.get("error")
    if error is not None and not (isinstance(error, dict) and all(isinstance(v, str) for v in error.values())):
        raise BadChunk("field 'error' is not an error")
    chunk_seconds = _number(raw, "chunk_seconds")
    if chunk_seconds <= 0:
        raise BadChunk("field 'chunk_seconds' is not a length")
    holder = _str(raw, "holder")
    frames = None if raw.get("frames") is None else _int(raw, "frames")
    return ChunkRecord(
        job=job_id, index=index, owner=_node(_str(raw, "owner"), "owner"), chunks=chunks, first=first, end=end,
        rate=rate, chunk_seconds=chunk_seconds, seconds=_number(raw, "seconds"), presets=list(presets),
        spec=list(spec), tenant=_str(raw, "tenant"), priority=priority, state=state,
        holder=_node(holder, "holder") if holder else "", attempts=_int(raw, "attempts"), lost=_int(raw, "lost"),
        refused=[_node(n, "refused") for n in refused], frames=frames, size=_int(raw, "size"),
        error=dict(error) if error else None, updated=_number(raw, "updated"))


def disagrees(record: ChunkRecord, plan: Any) -> str:
    """Why ``plan`` (this node's `chunks.plan` of the job, with the record's ``chunk_seconds``)
    does not give the record's cut; "" when it does. A node whose ffprobe or presets differ from
    the owner's would make a chunk that does not join: it refuses the task instead."""
    if len(plan.chunks) != record.chunks:
        return f"this node plans {len(plan.chunks)} chunks, the owner {record.chunks}"
    chunk = plan.chunks[record.index]
    if (chunk.first, chunk.end) != (record.first, record.end) or str(chunk.rate) != record.rate:
        return (f"this node cuts chunk {record.index} at slots {chunk.first}-{chunk.end} at {chunk.rate}, "
                f"the owner at {record.first}-{record.end} at {record.rate}")
    return ""


def poison(index: int, lost: int) -> dict[str, str]:
    return {"code": "poison", "message": f"chunk {index} was lost with {lost} nodes that held it; the job is "
            "quarantined. Check the input, then submit it again"}


@dataclass(frozen=True)
class Held:
    """A record as last read or written, and that object's ETag."""

    record: ChunkRecord
    etag: str


class Board:
    """The reads and conditional writes of chunk records, as node ``node_id``, over ``store``
    (its lane is the caller's choice), dating each write by ``now()``."""

    def __init__(self, store: ObjectStore, node_id: str, now: Callable[[], float]) -> None:
        self.store = store
        self.node_id = node_id
        self.now = now

    @inlineCallbacks
    def read(self, job_id: str, task: str) -> Any:
        """The record and its ETag (`Held`); `NotFound` when there is none, `BadChunk` when it is
        not a record to trust."""
        try:
            data, info = yield self.store.get_bytes(keys.chunk_record(job_id, task), max_size=MAX_BYTES)
        except GridnodeError as e:
            if e.code == "too_large":
                raise BadChunk(f"the record of {task} of job {job_id} is over {MAX_BYTES} bytes") from None
            raise
        return Held(load(data, job_id, task), info.etag)

    @inlineCallbacks
    def publish(self, record: ChunkRecord) -> Any:
        """Create the record (open); one already there is kept and returned as it is (an earlier
        life of the owner, or the job's previous owner, wrote it: a done task is not redone)."""
        record.updated = self.now()
        try:
            info = yield self.store.put_bytes(record.key, record.dumps(), if_none_match="*",
                                              content_type="application/json")
        except PreconditionFailed:
            held = yield self.read(record.job, record.task)
            return held
        return Held(record, info.etag)

    @inlineCallbacks
    def _write(self, held: Held, record: ChunkRecord) -> Any:
        """``record`` over ``held``, if nothing wrote since; None when something did."""
        record.updated = self.now()
        try:
            info = yield self.store.put_bytes(record.key, record.dumps(), if_match=held.etag,
                                              content_type="application/json")
        except (PreconditionFailed, NotFound):
            return None
        return Held(record, info.etag)

    @inlineCallbacks
    def claim(self, job_id: str, task: str, held: Held | None = None) -> Any:
        """Take an open task for this node: fires with the `Held` claim, or None when the task is
        not open (or another node claimed it first). ``held``: the record as we last saw it (the
        owner, who just published it, saves a read)."""
        if held is None:
            held = yield self.read(job_id, task)
        if held.record.state != OPEN or self.node_id in held.record.refused:
            return None
        record = ChunkRecord(**{**asdict(held.record), "state": CLAIMED, "holder": self.node_id,
                                "attempts": held.record.attempts + 1})
        won = yield self._write(held, record)
        return won

    @inlineCallbacks
    def _as_holder(self, held: Held, change: dict[str, Any]) -> Any:
        """``change`` by the holder; a record written since but still claimed by us (the job's
        adopter made itself the owner) is changed again over that write."""
        for _ in range(3):
            written = yield self._write(held, ChunkRecord(**{**asdict(held.record), **change}))
            if written is not None:
                return written
            try:
                held = yield self.read(held.record.job, held.record.task)
            except NotFound:
                break
            if held.record.state != CLAIMED or held.record.holder != self.node_id:
                break
        raise NotHeld(f"chunk {held.record.index} of job {held.record.job} is not held by {self.node_id} any more")

    def replace(self, held: Held, record: ChunkRecord) -> Any:
        """The owner's ``record`` over ``held`` (a record of an earlier plan, or of the job's
        previous owner); fires the new `Held`, or None when something wrote since."""
        return self._write(held, record)

    def redo(self, held: Held) -> Any:
        """The owner sends a done task back to open (its archive was bad), counting one holder
        lost as `reopen` does; fires the new `Held`, or None when something wrote since."""
        lost = held.record.lost + 1
        change: dict[str, Any] = {"state": OPEN, "holder": "", "lost": lost, "frames": None, "size": 0}
        if lost >= POISON:
            change = {"state": FAILED, "lost": lost, "error": poison(held.record.index, lost)}
        return self._write(held, ChunkRecord(**{**asdict(held.record), **change}))

    def finish(self, held: Held, frames: int | None, size: int) -> Any:
        """Our claimed task is done, its archive stored: fails with `NotHeld` when it was reopened."""
        return self._as_holder(held, {"state": DONE, "frames": frames, "size": size})

    def fail(self, held: Held, code: str, message: str) -> Any:
        """Our claimed task failed on its own (ffmpeg, its limits): the owner fails the job with it."""
        return self._as_holder(held, {"state": FAILED, "error": {"code": code, "message": message[:2000]}})

    def release(self, held: Held, refused: bool = False) -> Any:
        """Give our claim back, open for another node (no holder lost); ``refused``: this node's plan
        disagrees, so it is not asked again."""
        names = held.record.refused + ([self.node_id] if refused and len(held.record.refused) < MAX_REFUSED else [])
        return self._as_holder(held, {"state": OPEN, "holder": "", "refused": names})

    @inlineCallbacks
    def reopen(self, job_id: str, task: str, gone: Callable[[str], bool], count: bool = True) -> Any:
        """The owner's look at a task whose holder may be gone (``gone(holder)``, the membership's
        word): reopened with one more holder lost (``count``; not for the job's own earlier owner,
        whose loss the job's attempts count), or failed ``poison`` at `POISON`; fires with the
        record as it now is (`Held`), whatever was done."""
        held = yield self.read(job_id, task)
        while held.record.state == CLAIMED and gone(held.record.holder):
            record = held.record
            lost = record.lost + int(count)
            if lost >= POISON:
                change: dict[str, Any] = {"state": FAILED, "lost": lost, "error": poison(record.index, lost)}
            else:
                change = {"state": OPEN, "holder": "", "lost": lost}
            written = yield self._write(held, ChunkRecord(**{**asdict(record), **change}))
            if written is not None:
                return written
            held = yield self.read(job_id, task)  # written meanwhile (done, or claimed again): look again
        return held

    @inlineCallbacks
    def tasks(self, job_id: str) -> Any:
        """The tasks of ``job_id`` that have a record: one LIST (a page per 1,000 objects)."""
        prefix = keys.chunks_prefix(job_id)
        listing = yield self.store.list_all(prefix)
        names = (info.key[len(prefix):] for info in listing)
        return sorted(n[:-5] for n in names if n.endswith(".json") and "/" not in n)

    @inlineCallbacks
    def chunk_seconds(self, job_id: str) -> Any:
        """The chunk length ``job_id``'s records were planned with (None: no record): a job's
        adopter plans with it, so the chunks done before are kept. One LIST, one GET."""
        for task in (yield self.tasks(job_id)):
            try:
                held = yield self.read(job_id, task)
            except (NotFound, BadChunk):
                continue
            return held.record.chunk_seconds
        return None

    @inlineCallbacks
    def remove(self, job_id: str) -> Any:
        """Every record and archive of ``job_id`` (its end, whichever way): one LIST and a DELETE
        each, the records last, so a retry after a failure finds what is left."""
        listing = yield self.store.list_all(keys.chunks_prefix(job_id))
        for info in sorted(listing, key=lambda i: i.key.endswith(".json")):
            try:
                yield self.store.delete(info.key)
            except NotFound:
                pass
