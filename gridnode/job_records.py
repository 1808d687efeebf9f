"""
A job's record, ``jobs/<id>.json``, in the store and in the local journal;
and its unfinished-job marker, ``active/<owner>/<id>``.

Any node reads a record; only the job's owner writes it, and each write is
conditional on the ETag of the owner's last one: a node whose job was taken
over (adopted by a peer) finds out at its next write (`Lost`) instead of
writing over the new owner. Until the store has the job, its copy beside the
spooled body (``spool/<id>.json``, the journal) is what a restart resumes.

The markers are the only index of unfinished jobs: one empty object per job
under its owner's node id, so a dead node's jobs are one LIST of one prefix
(`marked`). Whoever becomes a job's owner writes its own marker before it
claims the record, and removes the previous one after: the record's owner
always has a marker, and a marker under another prefix is at worst a stale
copy. Markers of the layout before owners (``active/<id>``, `legacy_marked`)
are still read while a pool is upgraded in place.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.jobs import MAX_RECORD_BYTES, Job
from gridnode.store.base import ObjectInfo, ObjectStore


class Lost(GridnodeError):
    """Another node owns this job now: stop working on it, write nothing."""

    code = "lost_ownership"
    status = 409


def read(store: ObjectStore, job_id: str) -> Deferred[tuple[Job, ObjectInfo]]:
    """The stored record and its ETag'd info; `NotFound` when there is none."""
    d = store.get_bytes(keys.job_record(job_id), max_size=MAX_RECORD_BYTES)
    return d.addCallback(lambda got: (Job.loads(got[0]), got[1]))


@inlineCallbacks
def write(store: ObjectStore, job_id: str, data: bytes, etag: str | None, owner: str) -> Any:
    """Write a job's record (``data``) as its ``owner``: a new record (``etag`` None) or over our
    last write (of that ETag); fires with the write's `ObjectInfo`, or fails with `Lost`."""
    key = keys.job_record(job_id)
    try:
        if etag is None:
            info = yield store.put_bytes(key, data, if_none_match="*", content_type="application/json")
        else:
            info = yield store.put_bytes(key, data, if_match=etag, content_type="application/json")
    except (PreconditionFailed, NotFound):
        # A retried write may have landed the first time: then the record is ours.
        try:
            current, info = yield read(store, job_id)
        except NotFound:
            raise Lost(f"job {job_id}: its record is gone") from None
        if current.node != owner:
            raise Lost(f"job {job_id} is owned by another node now") from None
        info = yield store.put_bytes(key, data, if_match=info.etag, content_type="application/json")
    return info


def mark(store: ObjectStore, owner: str, job_id: str) -> Deferred[ObjectInfo]:
    """Mark ``job_id`` unfinished under ``owner``."""
    return store.put_bytes(keys.active_marker(owner, job_id), b"")


@inlineCallbacks
def is_marked(store: ObjectStore, owner: str, job_id: str) -> Any:
    """Whether ``job_id`` is marked under ``owner``: one HEAD."""
    try:
        yield store.stat(keys.active_marker(owner, job_id))
    except NotFound:
        return False
    return True


def unmark(store: ObjectStore, owner: str | None, job_id: str) -> Deferred[None]:
    """Remove ``job_id``'s marker under ``owner`` (None: its legacy marker, ``active/<id>``)."""
    key = keys.legacy_marker(job_id) if owner is None else keys.active_marker(owner, job_id)
    return store.delete(key)


@inlineCallbacks
def move_marker(store: ObjectStore, job_id: str, owner: str, heir: str) -> Any:
    """Hand ``job_id``'s marker from ``owner``'s prefix to ``heir``'s: written there first, so the
    job is never unmarked."""
    yield mark(store, heir, job_id)
    yield unmark(store, owner, job_id)


@inlineCallbacks
def marked(store: ObjectStore, owner: str) -> Any:
    """The ids of the jobs marked under ``owner``: one LIST (a page per 1,000)."""
    prefix = keys.active_prefix(owner)
    listing = yield store.list_all(prefix)
    return [info.key[len(prefix):] for info in listing if keys.is_id(info.key[len(prefix):])]


@inlineCallbacks
def legacy_marked(store: ObjectStore) -> Any:
    """The ids of the jobs marked in the layout before owners (``active/<id>``): a listing of every
    marker, so only the pool's registry writer reads it, and seldom (gridnode/adoption.py)."""
    prefix = keys.active_prefix()
    listing = yield store.list_all(prefix)
    return [info.key[len(prefix):] for info in listing if keys.is_id(info.key[len(prefix):])]


def journal(spool_path: str, data: bytes) -> None:
    """The record (as just dumped) beside the job's spooled body, replaced whole."""
    tmp = spool_path + ".json.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, spool_path + ".json")


def journaled(folder: str) -> Iterator[tuple[Job, str]]:
    """The unfinished jobs journaled in the spool ``folder`` whose body is still there, with its
    path, in id order; an unreadable journal is skipped."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or not keys.is_id(name[:-5]):
            continue
        path = os.path.join(folder, name[:-5])
        try:
            with open(path + ".json", "rb") as f:
                job = Job.loads(f.read())
        except (OSError, GridnodeError):
            continue
        if os.path.exists(path) and not job.final:
            yield job, path
