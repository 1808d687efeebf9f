"""
An in-memory store that counts what S3 would bill and throttle: each request
by S3 class, by key prefix, by simulated second and by cause.

`CountingBackend` is gridnode/store/memory.py's `MemoryBackend` (the same
semantics, conditional writes included) with every backend call counted as the
S3 request it would be, failures too (S3 bills a 404 or a 412 as any other):

- ``put_bytes``, ``put_file``: PUT; ``copy_part``: COPY (UploadPartCopy); ``put_part``: PUT;
  ``begin_upload``, ``finish_upload``: POST; ``list``, ``list_uploads``: LIST (one a page);
- ``get_bytes``, ``get_file``: GET; ``stat``: HEAD;
- ``delete``, ``abort_upload``: DELETE.

Billing (S3 Standard list prices): PUT/COPY/POST/LIST $0.005 per 1,000, GET/HEAD $0.0004 per
1,000, DELETE free. Per-prefix limits: 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD a second per
partitioned prefix; LIST is a read and is counted with GET/HEAD here (S3 names neither).

A request's prefix is its key's first ``depth`` path segments (``jobs/``, ``active/``,
``registry/``; a listing's, its prefix's). Its cause is `CAUSE` when it was sent: a context
variable, so it follows a call through ``inlineCallbacks`` (Twisted runs each generator in the
context it started in) and, with `CausalGate`, through the token bucket's queue.
"""

from __future__ import annotations

import bisect
import builtins
import contextvars
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred

from gridnode.store.base import ObjectInfo, Page
from gridnode.store.memory import MemoryBackend
from gridnode.store.rate import Gate

#: S3 operations, and their billing and limit classes
PUT, COPY, POST, LIST, GET, HEAD, DELETE = "PUT", "COPY", "POST", "LIST", "GET", "HEAD", "DELETE"
OPS = (PUT, COPY, POST, LIST, GET, HEAD, DELETE)
#: billed at $0.005 per 1,000 / $0.0004 per 1,000 / free
TIER1 = frozenset({PUT, COPY, POST, LIST})
TIER2 = frozenset({GET, HEAD})
PRICE_TIER1 = 0.005 / 1000
PRICE_TIER2 = 0.0004 / 1000
#: S3's per-prefix limits, requests a second: writes (PUT/COPY/POST/DELETE), reads (GET/HEAD; LIST here)
WRITE_LIMIT = 3500.0
READ_LIMIT = 5500.0
WRITES = frozenset({PUT, COPY, POST, DELETE})
READS = frozenset({GET, HEAD, LIST})

#: what sent the request now ("" when nobody said)
CAUSE: contextvars.ContextVar[str] = contextvars.ContextVar("cause", default="")


@contextmanager
def cause(name: str) -> Iterator[None]:
    """Requests sent (or begun: an inlineCallbacks chain keeps its context) inside are ``name``'s."""
    token = CAUSE.set(name)
    try:
        yield
    finally:
        CAUSE.reset(token)


def caused(name: str, work: Callable[..., Any]) -> Callable[..., Any]:
    """``work``, every call of it run as ``name``'s (a timer's round)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = contextvars.copy_context()
        ctx.run(CAUSE.set, name)
        return ctx.run(work, *args, **kwargs)

    return run


def prefix_of(key: str, depth: int) -> str:
    """The first ``depth`` path segments of ``key``, with their slash (``jobs/``); a key with fewer
    segments is its own prefix."""
    parts = key.split("/")
    if len(parts) <= depth:
        return key
    return "/".join(parts[:depth]) + "/"


class CountingBackend(MemoryBackend):
    """`MemoryBackend`, every request counted (see the module's docstring). ``now``: the clock
    that says which second a request falls in; ``on_request(op, key)``: told of each."""

    def __init__(self, now: Callable[[], float] = lambda: 0.0, *, depth: int = 1,
                 part_size: int | None = None) -> None:
        super().__init__(part_size)
        self.now = now
        self.depth = depth
        #: op -> requests
        self.ops: Counter[str] = Counter()
        #: (prefix, op) -> requests
        self.by_prefix: Counter[tuple[str, str]] = Counter()
        #: (cause, op) -> requests
        self.by_cause: Counter[tuple[str, str]] = Counter()
        #: second -> (prefix, limit class "write"/"read") -> requests
        self.by_second: defaultdict[int, Counter[tuple[str, str]]] = defaultdict(Counter)
        #: every request as (time, cause, op, key), while `log` is on
        self.log: builtins.list[tuple[float, str, str, str]] | None = None
        self._depth = threading.local()
        #: the keys in order, for listings in O(log n + page) rather than a walk of every object
        self._sorted: builtins.list[str] = []

    # -- counting

    @contextmanager
    def _request(self, op: str, key: str) -> Iterator[None]:
        """One request, unless it is a call inside another (MemoryBackend's get_file calls get_bytes)."""
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            self.count(op, key)
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth

    def count(self, op: str, key: str) -> None:
        prefix = prefix_of(key, self.depth)
        why = CAUSE.get()
        self.ops[op] += 1
        self.by_prefix[prefix, op] += 1
        self.by_cause[why, op] += 1
        self.by_second[int(self.now())][prefix, "write" if op in WRITES else "read"] += 1
        if self.log is not None:
            self.log.append((self.now(), why, op, key))

    def reset(self) -> None:
        """Forget every count (the objects stay): a measurement begins."""
        self.ops.clear()
        self.by_prefix.clear()
        self.by_cause.clear()
        self.by_second.clear()
        if self.log is not None:
            self.log = []

    def total(self) -> int:
        return sum(self.ops.values())

    # -- the backend's calls, counted

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> ObjectInfo:
        with self._request(PUT, key):
            info = super().put_bytes(key, data, **kw)
            self._index(key)
            return info

    def put_file(self, key: str, path: str, **kw: Any) -> ObjectInfo:
        with self._request(PUT, key):
            return super().put_file(key, path, **kw)

    def get_bytes(self, key: str, *, max_size: int | None = None) -> tuple[bytes, ObjectInfo]:
        with self._request(GET, key):
            return super().get_bytes(key, max_size=max_size)

    def get_file(self, key: str, path: str) -> ObjectInfo:
        with self._request(GET, key):
            return super().get_file(key, path)

    def stat(self, key: str) -> ObjectInfo:
        with self._request(HEAD, key):
            return super().stat(key)

    def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> Page:
        with self._request(LIST, prefix):
            from gridnode import keys

            keys.check_prefix(prefix)
            with self._lock:
                names = self._sorted
                lo = bisect.bisect_left(names, prefix)
                if start_after is not None:
                    lo = max(lo, bisect.bisect_right(names, start_after))
                chosen: builtins.list[str] = []
                i = lo
                while i < len(names) and len(chosen) <= limit and names[i].startswith(prefix):
                    chosen.append(names[i])
                    i += 1
                more = len(chosen) > limit
                chosen = chosen[:limit]
                return Page([self._objects[k][1] for k in chosen], chosen[-1] if more and chosen else None)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        with self._request(DELETE, key):
            super().delete(key, if_match=if_match)
            self._unindex(key)

    def begin_upload(self, key: str, *, content_type: str | None = None) -> str:
        with self._request(POST, key):
            return super().begin_upload(key, content_type=content_type)

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int, length: int) -> str:
        with self._request(PUT, key):
            return super().put_part(key, upload_id, number, path, offset, length)

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> str:
        with self._request(COPY, key):
            return super().copy_part(key, upload_id, number, source)

    def finish_upload(self, key: str, upload_id: str, parts: builtins.list[tuple[str, int]]) -> ObjectInfo:
        with self._request(POST, key):
            return super().finish_upload(key, upload_id, parts)

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._request(DELETE, key):
            super().abort_upload(key, upload_id)

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str]]:
        with self._request(LIST, prefix):
            return super().list_uploads(prefix)

    def _index(self, key: str) -> None:
        with self._lock:
            i = bisect.bisect_left(self._sorted, key)
            if i == len(self._sorted) or self._sorted[i] != key:
                self._sorted.insert(i, key)

    def _unindex(self, key: str) -> None:
        with self._lock:
            if key in self._objects:
                return  # not deleted (a failed condition raised before; kept for clarity)
            i = bisect.bisect_left(self._sorted, key)
            if i < len(self._sorted) and self._sorted[i] == key:
                del self._sorted[i]


class CausalGate(Gate):
    """The node's real token bucket (gridnode/store/rate.py), each request sent in the context it
    was asked in: a request that waited for a token is still its asker's."""

    def run(self, lane: str, send: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        ctx = contextvars.copy_context()
        return super().run(lane, lambda: ctx.run(send))


# -- figures


def dollars(ops: Counter[str] | dict[str, int | float]) -> float:
    """What these requests cost at S3 Standard list prices."""
    return sum(n * (PRICE_TIER1 if op in TIER1 else PRICE_TIER2 if op in TIER2 else 0.0) for op, n in ops.items())


def per_class(ops: Counter[str] | dict[str, int | float]) -> dict[str, float]:
    """Requests by billing class: ``put_copy_post_list``, ``get_head``, ``delete``."""
    return {"put_copy_post_list": sum(ops.get(op, 0) for op in TIER1),
            "get_head": sum(ops.get(op, 0) for op in TIER2),
            "delete": ops.get(DELETE, 0)}


def busiest(backend: CountingBackend, since: float = float("-inf"), until: float = float("inf")) -> dict[str, Any]:
    """The busiest second of each prefix (in ``[since, until)``), as shares of S3's limits; and the
    busiest prefix's, the larger of its write and read shares."""
    peak: dict[tuple[str, str], int] = {}
    for second, counts in backend.by_second.items():
        if not since <= second < until:
            continue
        for (prefix, kind), n in counts.items():
            peak[prefix, kind] = max(n, peak.get((prefix, kind), 0))
    prefixes: dict[str, dict[str, float]] = {}
    for (prefix, kind), n in peak.items():
        p = prefixes.setdefault(prefix, {"write_peak": 0, "read_peak": 0, "write_share": 0.0, "read_share": 0.0})
        p[f"{kind}_peak"] = n
        p[f"{kind}_share"] = round(n / (WRITE_LIMIT if kind == "write" else READ_LIMIT), 4)
    top = max(prefixes.items(), key=lambda kv: max(kv[1]["write_share"], kv[1]["read_share"]), default=None)
    return {"prefixes": prefixes,
            "busiest_prefix": top[0] if top else None,
            "busiest_share": max(top[1]["write_share"], top[1]["read_share"]) if top else 0.0}
