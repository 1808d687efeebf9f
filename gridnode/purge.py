"""
Removing what a job left in the store: a purge (``DELETE /jobs/<id>?purge=true``) and the
retention sweep's input and output deletions (gridnode/retention.py).

A purge writes the job's tombstone first (``gone/<id>.json``: its id, tenant and when: what
``GET /jobs/<id>`` answers ``404 gone`` from), then deletes its outputs, input, listing entries
and marker, and its record last: a purge cut short (node lost, store down) leaves the record,
so the same ``DELETE`` sent again finishes it. Deletes are idempotent on every backend.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from gridnode import job_list, keys
from gridnode.errors import GridnodeError, NotFound
from gridnode.jobs import Job
from gridnode.store.base import ObjectStore

#: the largest tombstone a reader accepts
MAX_TOMBSTONE_BYTES = 4096


class Gone(GridnodeError):
    """The job was purged: nothing of it is left but its tombstone."""

    code = "gone"
    status = 404


def marker_keys(job: Job) -> list[str]:
    """The keys that mark a job unfinished for adoption: the one place a purge learns the
    marker layout (gridnode/job_records.py): under its owner, and the layout before issue 19."""
    owned = [keys.active_marker(job.node, job.id)] if job.node else []
    return [*owned, keys.legacy_marker(job.id)]


@inlineCallbacks
def delete_outputs(store: ObjectStore, job_id: str) -> Any:
    """Delete every output of a job; fires with how many objects there were."""
    listed = yield store.list_all(keys.outputs_prefix(job_id))
    for info in listed:
        yield store.delete(info.key)
    return len(listed)


@inlineCallbacks
def purge(store: ObjectStore, job: Job, now: float) -> Any:
    """Remove every object of a final ``job``, leaving its tombstone; fires with the tombstone."""
    if not job.final:
        raise GridnodeError(f"job {job.id} is {job.state}: cancel it before purging it",
                            code="not_final", status=409)
    stone = {"id": job.id, "tenant": job.tenant, "state": "gone", "purged": now}
    yield store.put_bytes(keys.tombstone(job.id), json.dumps(stone, sort_keys=True).encode(),
                          content_type="application/json")
    yield delete_outputs(store, job.id)
    for key in [keys.input_source(job.id), *job_list.entries(job), *marker_keys(job), keys.job_record(job.id)]:
        yield store.delete(key)
    return stone


def tombstone(store: ObjectStore, job_id: str) -> Deferred[dict[str, Any] | None]:
    """A purged job's tombstone, or None when it has none (never purged, or the tombstone expired)."""

    def read(got: tuple[bytes, Any]) -> dict[str, Any] | None:
        try:
            stone = json.loads(got[0])
        except ValueError:
            return None
        ok = isinstance(stone, dict) and stone.get("id") == job_id and isinstance(stone.get("tenant"), str)
        return stone if ok else None

    def missing(failure: Any) -> None:
        failure.trap(NotFound)
        return None

    d = store.get_bytes(keys.tombstone(job_id), max_size=MAX_TOMBSTONE_BYTES)
    return d.addCallbacks(read, missing)
