"""
A job whose input is an object already in the pool's bucket (``POST /jobs`` with a JSON body:
gridnode/job_request.py): no byte comes from the client.

The key is a key under the store's prefix (``--store s3://acme-video/grid`` and key
``incoming/alice/movie.mov``: ``s3://acme-video/grid/incoming/alice/movie.mov``), checked by
gridnode/keys.py's rules, then against ``--input-prefixes`` (anything else: ``403
input_forbidden``, whether it exists or not), then against the caller's tenant: a token's
tenant reads only ``<prefix><sub>/...`` (another tenant's key answers ``404 not_found``, as a
key that does not exist); an admin token, or a node without tokens, any key under the prefixes.

It is then admitted as an upload of its size (draining, full, ``--max-upload``, the token's
``max_size``, free space), fetched into the spool for the probe (ffprobe and ffmpeg read local
files only), and submitted like an upload: the job's input (``inputs/<id>/source``) is copied
inside the bucket (S3 UploadPartCopy; a source under 5 MiB, over 5 GiB, or on a folder store is
put from the fetched copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from gridnode import keys
from gridnode.errors import GridnodeError, InvalidKey, NotFound
from gridnode.job_request import JobRequest
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.spool import SpoolFile
from gridnode.store.streamed import StreamedPut

if TYPE_CHECKING:
    from gridnode.pipeline import JobService

#: the largest object S3 copies as one part (UploadPartCopy)
MAX_COPY = 5 * 1024 * 1024 * 1024


def forbidden(message: str) -> GridnodeError:
    return GridnodeError(message, code="input_forbidden", status=403)


def checked_key(key: str, prefixes: tuple[str, ...], tenant: str, any_tenant: bool) -> str:
    """``key`` if the caller may take it as an input; else the coded refusal."""
    if not prefixes:
        raise forbidden("this node takes no input from the bucket: its operator sets --input-prefixes")
    try:
        keys.check_key(key)
    except InvalidKey as e:
        raise GridnodeError(f"input.key: {e.message}", code="bad_body", status=400) from None
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if prefix is None:
        raise forbidden(f"input.key must be under one of this pool's input prefixes: {', '.join(prefixes)}")
    if not any_tenant and not key[len(prefix):].startswith(tenant + "/"):
        raise NotFound(f"no object {key} for you: your inputs are under {prefix}<your tenant>/")
    return key


@inlineCallbacks
def submit(jobs: JobService, request: JobRequest, *, prefixes: tuple[str, ...], tenant: str, any_tenant: bool,
           limit: int | None, allow: Callable[[list[str], int, bool], object],
           claim: Callable[[str], Any] | None = None, level: str = DEFAULT_PRIORITY) -> Any:
    """Make a job of the object ``request`` names, for ``tenant``; fires with the job once it is
    durably accepted (as an upload's ``201``). ``allow(presets, size, inline)`` is the caller's
    token's say on presets, size and inline outputs; ``claim``: its Idempotency-Key's
    (`JobService.submit`); ``level``: the job's priority, as the token allows it."""
    presets = ",".join(request.presets) if request.presets is not None else None
    try:
        key = checked_key(request.input.key, prefixes, tenant, any_tenant)
        spec = list(request.outputs) if request.outputs is not None else None
        # an unknown preset or a bad spec is refused before any transfer
        chosen = jobs.media.parse_presets(presets, spec)
        try:
            info = yield jobs.store.stat(key)
        except NotFound:
            raise NotFound(f"no object {key} in the store") from None
        allow(list(dict.fromkeys(p.template for p in chosen if p.template)), info.size, spec is not None)
    except GridnodeError as e:
        jobs.metrics.upload_rejections.labels(e.code).inc()
        raise
    job_id = keys.new_id(jobs.now())
    release = jobs.hold(job_id, info.size, limit, level)  # counts its own refusals
    path = jobs.spool.path(job_id)
    try:
        got = yield jobs.store.get_file(key, path)
        size = os.path.getsize(path)
        if size > jobs.limit(limit):  # replaced by a larger object since its stat
            raise GridnodeError(f"the input is {size} bytes; at most {jobs.limit(limit)} are allowed here",
                                code="too_large", status=413)
        spool = SpoolFile(path, "r+b", reactor=jobs.reactor)
    except BaseException as e:
        release()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        jobs.metrics.upload_rejections.labels(getattr(e, "code", "error")).inc()
        raise
    spool.on_release = release
    if spool.grows_in_place:
        spool.grew(size)  # hashed by a thread reading the file, as a spliced upload is
    else:
        spool.use_digest(_sha256(path))  # a reactor without threads (tests): small files only
        spool.size = size
    put = spool.follower = StreamedPut(jobs.store, keys.input_source(job_id), path)
    if size <= MAX_COPY and got.size == size:
        put.copy_first([(key, size)])
    name = request.name if request.name is not None else key.rsplit("/", 1)[-1]
    job = yield jobs.submit(spool, name=name, presets=presets, checksum=None, tenant=tenant, claim=claim, spec=spec,
                            notify=list(request.notify), notify_progress=request.notify_progress, priority=level)
    return job


def _sha256(path: str) -> Any:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h
