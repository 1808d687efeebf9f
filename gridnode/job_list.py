"""
The pool-wide job listing: ``GET /jobs`` answered from the store, so any node gives the same answer.

Each accepted job has two empty listing entries (`entries`): under its tenant's prefix
(``index/tenants/<tenant>/``) and the pool's (``index/pool/``, what an admin or a node without
tokens lists), each named by the job's *reversed* id. Ids sort by the time they were made, and
S3 lists in key order only, so reversed they list newest first: a page is one LIST of the
caller's own prefix from a start key, plus a GET of each listed record. ``since``/``until`` are
start and stop keys of that LIST (an id begins with its millisecond); ``state`` is matched on
the records read, so a page with a state filter may hold fewer jobs than ``limit`` (even none)
and still have a ``next`` cursor.

The cursor is the last entry read, with a digest of the query it belongs to, in base64url. It
carries no authority: the prefix is always the caller's, so a cursor, forged or not, only moves
the start within what the caller may list anyway; one that does not decode, or was made for
another query, is a 400 ``bad_cursor``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults, inlineCallbacks

from gridnode import job_records, keys
from gridnode.errors import GridnodeError, NotFound
from gridnode.jobs import STATES, Job
from gridnode.store.base import ObjectStore

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
_CURSOR_VERSION = "1"


def bad_query(message: str) -> GridnodeError:
    return GridnodeError(message, code="bad_query", status=400)


def bad_cursor(message: str) -> GridnodeError:
    return GridnodeError(f"{message}; start again without cursor= or pass the 'next' of the page before",
                         code="bad_cursor", status=400)


def entries(job: Job) -> list[str]:
    """The listing entries a job has: its tenant's and the pool's."""
    return [keys.listing_entry(job.tenant, job.id), keys.listing_entry(None, job.id)]


def _time(name: str, text: str) -> float:
    """Unix seconds, or an ISO 8601 time with its zone (``2026-01-02T03:04:05Z``)."""
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise bad_query(f"{name}={text[:40]!r}: give Unix seconds or an ISO 8601 time with its zone") from None
        if when.tzinfo is None:
            raise bad_query(f"{name}={text[:40]!r} has no time zone: add Z or +00:00") from None
        value = when.timestamp()
    if not math.isfinite(value) or not 0 <= value < 2 ** 47:
        raise bad_query(f"{name}={text[:40]!r} is not a time after 1970")
    return value


@dataclass(frozen=True)
class Query:
    """One page's question: whose jobs (None: every tenant's), which, how many, from where."""

    tenant: str | None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT
    #: the reversed id of the last entry the page before read (from the cursor)
    after: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, str], tenant_filter: str | None) -> Query:
        """A query from ``GET /jobs``'s parameters, for a caller who reaches ``tenant_filter``'s jobs
        (None: every tenant's, who may name one with ``tenant=``)."""
        tenant = tenant_filter
        if "tenant" in args:
            if tenant_filter is not None and args["tenant"] != tenant_filter:
                raise GridnodeError("tenant= names another tenant; only an admin token lists other tenants' jobs",
                                    code="forbidden", status=403)
            tenant = args["tenant"]
            if not tenant or len(tenant) > 256:
                raise bad_query("tenant= must be a token's sub (1-256 characters)")
        state = args.get("state") or None
        if state is not None and state not in STATES:
            raise bad_query(f"state={state[:40]!r}: use one of {', '.join(STATES)}")
        since = _time("since", args["since"]) if args.get("since") else None
        until = _time("until", args["until"]) if args.get("until") else None
        limit = DEFAULT_LIMIT
        if args.get("limit"):
            text = args["limit"]
            if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
                raise bad_query(f"limit={text[:40]!r}: give a whole number from 1 to {MAX_LIMIT}")
            limit = int(text)
        query = cls(tenant, state, since, until, limit)
        cursor = args.get("cursor")
        return query if not cursor else query.resumed(cursor)

    def digest(self) -> str:
        """What a cursor is bound to: the query but its limit and start."""
        text = "\n".join(str(v) for v in (self.tenant, self.state, self.since, self.until))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def cursor(self, after: str) -> str:
        raw = f"{_CURSOR_VERSION}.{after}.{self.digest()}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def resumed(self, cursor: str) -> Query:
        """This query from where ``cursor`` left off."""
        if len(cursor) > 200:
            raise bad_cursor("this cursor is too long to be one")
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            raise bad_cursor("this cursor is not one this API made") from None
        parts = raw.split(".")
        if len(parts) != 3 or parts[0] != _CURSOR_VERSION or not keys.is_id(parts[1]):
            raise bad_cursor("this cursor is not one this API made")
        if parts[2] != self.digest():
            raise bad_cursor("this cursor belongs to a listing with other tenant, state, since or until")
        return Query(self.tenant, self.state, self.since, self.until, self.limit, parts[1])


@inlineCallbacks
def page(store: ObjectStore, query: Query) -> Any:
    """One page: ``{"jobs": [records, newest first], "next": cursor or None}``. One LIST, and one
    GET per listed entry (in parallel). An entry whose record is gone (purged) is left out."""
    prefix = keys.listing_prefix(query.tenant)
    start = query.after
    if query.until is not None:
        # ids made before ``until`` are those below its first id: reversed, those above
        bound = keys.reversed_id(keys.first_id(query.until))
        start = bound if start is None else max(start, bound)
    stop = keys.reversed_id(keys.first_id(query.since)) if query.since is not None else None
    listed = yield store.list(prefix, start_after=None if start is None else prefix + start, limit=query.limit)
    ids: list[str] = []
    ended = listed.next_after is None
    for info in listed.items:
        reversed_id = info.key[len(prefix):]
        if not keys.is_id(reversed_id):
            continue  # not an entry of ours
        if stop is not None and reversed_id > stop:
            ended = True
            break
        ids.append(reversed_id)
    try:
        found = yield gatherResults([_record(store, keys.reversed_id(r)) for r in ids], consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
    jobs = [j for j in found if j is not None and query.state in (None, j.state)
            and (query.tenant is None or j.tenant == query.tenant)]
    return {"jobs": jobs, "next": None if ended or not ids else query.cursor(ids[-1])}


def _record(store: ObjectStore, job_id: str) -> Deferred[Job | None]:
    def gone(failure: Any) -> None:
        failure.trap(NotFound)
        return None

    return job_records.read(store, job_id).addCallbacks(lambda got: got[0], gone)
