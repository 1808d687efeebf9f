"""
The only place that builds object keys.

Keys built carelessly can name objects that no tool can delete afterwards.
Here every key is built from server-chosen ids and fixed words, checked
against one rule: characters ``[A-Za-z0-9._-]`` with ``/`` as separator, no
empty, ``.`` or ``..`` segment, at most 1024 bytes. A user's file name is
data kept in the job record; it never reaches a key.
"""

from __future__ import annotations

import hashlib
import os
import re
import time

from gridnode.errors import InvalidKey

MAX_KEY_BYTES = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
# Crockford's base32: sortable, no ambiguous letters.
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def check_segment(segment: str, what: str = "segment") -> str:
    """Return ``segment`` if it may stand as one part of a key, else raise."""
    if not isinstance(segment, str) or not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
        raise InvalidKey(
            f"{what} {segment!r} must be 1 or more of A-Z a-z 0-9 . _ - and not '.' or '..'"
        )
    return segment


def check_key(key: str) -> str:
    """Return ``key`` if every segment is safe and it fits in 1024 bytes."""
    if not isinstance(key, str) or not key:
        raise InvalidKey("an empty key")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"a key of more than {MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        check_segment(segment)
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key optionally ending with ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def join(*segments: str) -> str:
    return check_key("/".join(check_segment(s) for s in segments))


def new_id(now: float | None = None) -> str:
    """
    A 26-character sortable id: 48 bits of milliseconds, 80 random bits,
    in Crockford's base32 (the ULID layout).
    """
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_id(value: str) -> bool:
    return len(value) == 26 and all(c in _B32 for c in value)


def first_id(seconds: float) -> str:
    """The smallest id made at ``seconds`` (its millisecond): ids made then or later sort after it."""
    ms = min(max(int(seconds * 1000), 0), (1 << 48) - 1)
    value, chars = ms << 80, []
    for _ in range(26):
        chars.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def id_seconds(job_id: str) -> float:
    """When an id was made (its first 10 characters: milliseconds)."""
    ms = 0
    for c in job_id[:10]:
        ms = ms * 32 + _B32.index(c)
    return ms / 1000


_FLIP = str.maketrans(_B32, _B32[::-1])


def reversed_id(job_id: str) -> str:
    """``job_id`` with each digit d as 31 - d: reversed ids sort newest first, so one LIST reads a
    listing from its newest end (S3 lists in key order only). Its own inverse."""
    return job_id.translate(_FLIP)


def tenant_segment(tenant: str) -> str:
    """A tenant (a token's ``sub``: any string of up to 256 characters) as one key segment:
    ``t-<sub>`` where it is plain letters, digits, ``_`` and ``-`` (200 at most), else ``x-<its
    UTF-8 in hex>`` up to 400 hex digits, else ``h-<its sha256>`` (a key holds 1024 bytes);
    ``open`` for the tenant of a node without tokens. Distinct tenants never share a segment."""
    if tenant == "":
        return "open"
    if re.fullmatch(r"[A-Za-z0-9_-]{1,200}", tenant):
        return "t-" + tenant
    raw = tenant.encode("utf-8")
    if len(raw) <= 200:
        return check_segment("x-" + raw.hex(), "tenant")
    return check_segment("h-" + hashlib.sha256(raw).hexdigest(), "tenant")


# The object layout (docs/api.md, "Objects in the store").

#: the top-level prefixes the node writes: never a job's input from the bucket (--input-prefixes)
NODE_PREFIXES = frozenset({"registry/", "jobs/", "active/", "index/", "gone/", "inputs/", "outputs/", "uploads/",
                           "idempotency/", "retention/", "webhooks/", "chunks/", ".gridnode/"})

def registry_prefix(env: str, pool: str) -> str:
    return join("registry", env, pool) + "/"


def node_records_prefix(env: str, pool: str) -> str:
    return join("registry", env, pool, "nodes") + "/"


def node_record(env: str, pool: str, node_id: str) -> str:
    return join("registry", env, pool, "nodes", check_segment(node_id, "node id") + ".json")


def nodes_list(env: str, pool: str) -> str:
    return join("registry", env, pool, "nodes.json")


def registry_page(env: str, pool: str) -> str:
    return join("registry", env, pool, "index.html")


def job_record(job_id: str) -> str:
    return join("jobs", check_segment(job_id, "job id") + ".json")


def jobs_prefix() -> str:
    return "jobs/"


def active_marker(owner: str, job_id: str) -> str:
    """An empty object per unfinished job, under its owner's node id: a dead node's jobs are one
    LIST of one prefix (`active_prefix`), and a starting node lists only its own."""
    return join("active", check_segment(owner, "node id"), check_segment(job_id, "job id"))


def active_prefix(owner: str | None = None) -> str:
    """Every marker (``owner`` None), or one node's."""
    return "active/" if owner is None else f"active/{check_segment(owner, 'node id')}/"


def legacy_marker(job_id: str) -> str:
    """The marker of the layout before owners (``active/<job>``), still written by nodes of
    earlier versions while a pool is upgraded in place."""
    return join("active", check_segment(job_id, "job id"))


def listing_prefix(tenant: str | None) -> str:
    """Where the listing entries of ``tenant``'s jobs are (None: every tenant's, the pool's)."""
    if tenant is None:
        return "index/pool/"
    return join("index", "tenants", tenant_segment(tenant)) + "/"


def listing_entry(tenant: str | None, job_id: str) -> str:
    """An empty object per job in a listing (gridnode/job_list.py), named by its reversed id."""
    return listing_prefix(tenant) + check_segment(reversed_id(check_segment(job_id, "job id")), "job id")


def tombstone(job_id: str) -> str:
    """What is left of a purged job: its id, tenant and when it was purged (its GET: 404 gone)."""
    return join("gone", check_segment(job_id, "job id") + ".json")


def tombstones_prefix() -> str:
    return "gone/"


def retention_lease() -> str:
    """The retention sweep's lease: the node that holds it sweeps (gridnode/retention.py)."""
    return "retention/lease.json"


def inputs_prefix() -> str:
    return "inputs/"


def outputs_root() -> str:
    return "outputs/"


def input_source(job_id: str) -> str:
    return join("inputs", job_id, "source")


def output(job_id: str, name: str) -> str:
    """An output file; ``name`` may hold ``/`` for HLS trees (``hls/720p/seg0.ts``)."""
    return check_key(join("outputs", job_id) + "/" + name)


def outputs_prefix(job_id: str) -> str:
    return join("outputs", job_id) + "/"


def uploads_root() -> str:
    return "uploads/"


def upload_prefix(upload_id: str) -> str:
    return join("uploads", upload_id) + "/"


def idempotency_entry(digest: str) -> str:
    """A client's Idempotency-Key's entry, named by a hash of its tenant and key (gridnode/idempotency.py)."""
    return join("idempotency", check_segment(digest, "digest") + ".json")


def idempotency_prefix() -> str:
    return "idempotency/"


def webhook_entry(owner: str, msg_id: str) -> str:
    """A webhook delivery ``owner`` owes, until a 2xx answers it (gridnode/notify/service.py)."""
    return join("webhooks", check_segment(owner, "node id"), check_segment(msg_id, "message id") + ".json")


def webhooks_prefix(owner: str | None = None) -> str:
    return "webhooks/" if owner is None else join("webhooks", check_segment(owner, "node id")) + "/"


def chunks_root() -> str:
    return "chunks/"


def chunks_prefix(job_id: str) -> str:
    """A chunked job's tasks run by any node of the pool (gridnode/chunk_records.py): one record
    and one folder of files per task, all removed with the job's end."""
    return join("chunks", check_segment(job_id, "job id")) + "/"


def chunk_record(job_id: str, task: str) -> str:
    """The record of one task of a chunked job (``task``: its key, ``chunk-3``)."""
    return join("chunks", check_segment(job_id, "job id"), check_segment(task, "task") + ".json")


def chunk_files(job_id: str, task: str) -> str:
    """Where a task's holder stores what it made (one archive of its folder): ``chunks/<job>/<task>/``."""
    return join("chunks", check_segment(job_id, "job id"), check_segment(task, "task")) + "/"
