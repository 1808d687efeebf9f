"""
Node records: the format of ``registry/<env>/<pool>/nodes/<node-id>.json``
and of the public ``nodes.json``, and the one reader of records, shared by
the node's `Registry` and the client library.

The reader does no I/O. It is given a listing of the records' prefix, says
which records to GET, takes the answers, and ends with the valid records: the
node drives it with its asynchronous store, the client with a blocking
backend, and both get the same checks (size, schema, key, id) and the same
skips. Kept from one read to the next, it GETs only what it must: a record
that is needed in full (``wanted``) and that it has not read, or that changed
since; a record it does not need is not fetched: a new one is held as listed
only (`listed_record`: its id, dated when first seen), a changed one is taken
as that node's heartbeat, seen then. A read fetches at most ``limit`` records
(chosen at random), so a node whose membership does not know the pool yet
never reads every record at once: the rest are held as listed only, and
fetched by later reads if still needed.

Versions: a record carries ``format``, the major version of this layout. A
reader ignores fields it does not know, so a release that only adds fields
keeps the number and old and new nodes read each other's records during a
rolling upgrade; a record of a higher format (a change older readers would
misread) is skipped, with a reason that says so, never guessed at. A record
without ``format`` is format 1 (written before the field existed).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from gridnode import __version__, keys
from gridnode.errors import GridnodeError, NotFound

MAX_RECORD_BYTES = 64 * 1024
#: the record layout's major version: raise it only for a change older readers would misread
FORMAT = 1
#: the ``speed`` load figures a reader takes (seconds of input converted per second, per worker):
#: outside it a figure is a bug or a lie, and one huge speed would draw a whole pool's uploads
MIN_SPEED, MAX_SPEED = 0.001, 1000.0


@dataclass
class NodeRecord:
    id: str
    http_url: str
    peer_addr: str
    started: float
    incarnation: int
    heartbeat: float
    load: dict[str, float] = field(default_factory=dict)
    version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "http_url": self.http_url, "peer_addr": self.peer_addr, "started": self.started,
            "incarnation": self.incarnation, "heartbeat": self.heartbeat, "load": self.load,
            "version": self.version, "format": FORMAT,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @property
    def listed_only(self) -> bool:
        """A record known from the listing alone (`RecordRead`: its node's membership knew it
        alive, so it was not fetched): its id and a heartbeat, nothing else."""
        return not self.http_url


def listed_record(node_id: str, seen: float) -> NodeRecord:
    """A record known from the listing alone, dated when it was first seen or last changed."""
    return NodeRecord(node_id, "", "", 0.0, 0, seen)


class BadRecord(GridnodeError):
    code = "bad_record"


def _check_format(raw: dict[str, Any]) -> None:
    """Refuse a record of a format this reader does not know, before reading any other field."""
    found = raw.get("format", 1)
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise BadRecord(f"field 'format' is {found!r}, not a format number")
    if found > FORMAT:
        raise BadRecord(f"record format {found} (gridnode {str(raw.get('version', '?'))[:40]!r}); this node reads "
                        f"format {FORMAT} and older: upgrade it")


def parse_record(data: bytes, expected_id: str | None = None) -> NodeRecord:
    """Validate one registry record; raise BadRecord saying what is wrong."""
    if len(data) > MAX_RECORD_BYTES:
        raise BadRecord(f"record of {len(data)} bytes (at most {MAX_RECORD_BYTES})")
    try:
        raw = json.loads(data)
    except ValueError:
        raise BadRecord("record is not JSON") from None
    if not isinstance(raw, dict):
        raise BadRecord("record is not a JSON object")
    _check_format(raw)
    try:
        record = NodeRecord(
            id=_typed(raw, "id", str), http_url=_typed(raw, "http_url", str),
            peer_addr=_typed(raw, "peer_addr", str), started=float(_typed(raw, "started", (int, float))),
            incarnation=_typed(raw, "incarnation", int), heartbeat=float(_typed(raw, "heartbeat", (int, float))),
            load=clean_load(_typed(raw, "load", dict)),
            version=str(raw.get("version", "")),
        )
    except (TypeError, ValueError) as e:
        raise BadRecord(str(e)) from None
    keys.check_segment(record.id, "node id")
    if not record.http_url.startswith(("http://", "https://")):
        raise BadRecord(f"http_url {record.http_url!r} is not an http(s) URL")
    if expected_id is not None and record.id != expected_id:
        raise BadRecord(f"record of {record.id!r} stored under {expected_id!r}")
    return record


def _typed(raw: dict[str, Any], key: str, kind: Any) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} missing or of the wrong type")
    return value


def clean_load(raw: Any) -> dict[str, float]:
    """The load figures of a record, nodes.json entry or ``/health`` answer that can be compared:
    finite numbers >= 0 (``speed`` within [MIN_SPEED, MAX_SPEED]). Any other figure is left out,
    not the record: a bad figure must not hide a node from the membership (NaN would also break
    every sort a client makes)."""
    if not isinstance(raw, dict):
        return {}
    out = {}
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            if k != "speed" or MIN_SPEED <= v <= MAX_SPEED:
                out[str(k)] = float(v)
    return out


def live_list(records: list[NodeRecord], now: float, stale: float) -> list[NodeRecord]:
    """Fresh records, sorted by id."""
    return sorted((r for r in records if now - r.heartbeat <= stale), key=lambda r: r.id)


def nodes_json(records: list[NodeRecord], env: str, pool: str) -> bytes:
    """The public list: what a client needs to choose a node."""
    body = {
        "env": env, "pool": pool, "format": FORMAT,
        "nodes": [{"id": r.id, "http_url": r.http_url, "load": r.load, "heartbeat": r.heartbeat,
                   "version": r.version} for r in records],
    }
    return json.dumps(body, sort_keys=True, indent=1).encode()


class Listed(Protocol):
    """What the reader needs of a listed object (the store's ``ObjectInfo``)."""

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def etag(self) -> str: ...


class _Held(NamedTuple):
    etag: str
    record: NodeRecord
    #: whether ``record`` is that ETag's content (not an older content, dated by a changed ETag)
    exact: bool


#: errors that make a record unreadable, not the read: the record is skipped
_SKIPPED = frozenset({"bad_record", "invalid_key", "too_large"})


class RecordReader:
    """The records under one prefix, read again and again: `begin` one `RecordRead` per listing."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        #: key -> what the last finished read knew of it
        self._held: dict[str, _Held] = {}
        #: key -> (ETag, why) of a record the last read skipped as unreadable: not fetched again
        #: until it changes, and its reason not reported again while it stays the same
        self._unreadable: dict[str, tuple[str, str]] = {}

    def begin(self, listing: Iterable[Listed], now: float, wanted: Callable[[str], bool] | None = None, *,
              limit: int | None = None, rng: random.Random | None = None) -> RecordRead:
        """A read of ``listing`` (every object under the prefix). ``wanted``: whether a record of a
        node id must be read in full (None: every one); ``now`` dates the others. ``limit``: the
        most records fetched (None: all), picked by ``rng`` (else the first listed)."""
        return RecordRead(self, listing, now, wanted, limit, rng)


class RecordRead:
    """One read: ``fetch`` lists the keys to GET; hand each answer to `got` or `failed`, then
    `done` gives the records. ``skipped`` says which objects were left out, and why."""

    def __init__(self, reader: RecordReader, listing: Iterable[Listed], now: float,
                 wanted: Callable[[str], bool] | None, limit: int | None = None,
                 rng: random.Random | None = None) -> None:
        self._reader = reader
        self.fetch: list[str] = []
        #: (key, reason) of every object left out, for the caller's log
        self.skipped: list[tuple[str, str]] = []
        #: the records' keys in listing order
        self._order: list[str] = []
        self._held: dict[str, _Held] = {}
        self._unreadable: dict[str, tuple[str, str]] = {}
        etags: dict[str, str] = {}
        for info in listing:
            name = info.key[len(reader.prefix):]
            if "/" in name or not name.endswith(".json"):
                self.skipped.append((info.key, "not a node record"))
                continue
            if info.size > MAX_RECORD_BYTES:
                self.skipped.append((info.key, f"{info.size} bytes"))
                continue
            bad = reader._unreadable.get(info.key)
            if bad is not None and bad[0] == info.etag:
                self._unreadable[info.key] = bad
                continue
            self._order.append(info.key)
            etags[info.key] = info.etag
            known = reader._held.get(info.key)
            needed = wanted is None or wanted(name[: -len(".json")])
            if known is None and not needed:
                # its node is known alive: no need to fetch what the membership knows better
                self._held[info.key] = self._later(None, info.key, info.etag, now)
            elif known is not None and ((known.etag == info.etag and known.exact) or not needed):
                if known.etag != info.etag:
                    # rewritten since we read it: alive then, which is all we need to know here
                    known = _Held(info.etag, replace(known.record, heartbeat=max(known.record.heartbeat, now)),
                                  False)
                self._held[info.key] = known
            else:
                self.fetch.append(info.key)
        if limit is not None and len(self.fetch) > limit:
            chosen = set(rng.sample(self.fetch, limit) if rng is not None else self.fetch[:limit])
            for key in self.fetch:
                if key not in chosen:
                    # left for a later read: held as it was (dated now if it changed), or as listed
                    # only; never left out (a node missing from the list may be taken for gone)
                    self._held[key] = self._later(reader._held.get(key), key, etags[key], now)
            self.fetch = [key for key in self.fetch if key in chosen]

    def _later(self, known: _Held | None, key: str, etag: str, now: float) -> _Held:
        if known is None:
            return _Held(etag, listed_record(key[len(self._reader.prefix): -len(".json")], now), False)
        if known.etag == etag:
            return known
        return _Held(etag, replace(known.record, heartbeat=max(known.record.heartbeat, now)), False)

    def got(self, key: str, data: bytes, etag: str) -> None:
        """The GET of ``key`` answered ``data`` at ``etag``."""
        name = key[len(self._reader.prefix):]
        try:
            record = parse_record(data, name[: -len(".json")])
        except GridnodeError as e:
            before = self._reader._unreadable.get(key)
            self._unreadable[key] = (etag, e.message)
            if before is None or before[1] != e.message:
                self.failed(key, e)
            return
        self._held[key] = _Held(etag, record, True)

    def failed(self, key: str, error: GridnodeError) -> None:
        """The GET of ``key`` failed: an unreadable record is skipped, a record deleted since the
        listing is left out, any other error (the store's) is raised again: the read failed."""
        if isinstance(error, NotFound):
            return
        if error.code not in _SKIPPED:
            raise error
        self.skipped.append((key, error.message))

    def done(self) -> list[NodeRecord]:
        """The valid records, in listing order; the reader keeps them for its next read."""
        self._reader._held = self._held
        self._reader._unreadable = self._unreadable
        return [self._held[key].record for key in self._order if key in self._held]
