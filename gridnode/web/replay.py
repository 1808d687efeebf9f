"""
``Idempotency-Key`` over HTTP (the decisions are gridnode/idempotency.py's).

A creation request (POST /jobs, tus creation) with a key is looked up before its body is read: a
retry is answered then, 201 with the work its key made (and ``Idempotent-Replayed: true``), and
its body is dropped unread; any other goes on to admission, with its `Claim` on the request. The
resource that accepts its work writes the key's entry through the claim, at the moment of
acceptance; the loser of a race with the same key drops its own work and answers the winner's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from gridnode import idempotency
from gridnode.errors import GridnodeError, NotFound
from gridnode.idempotency import Claim, Found, Intent, KeyInUse, Ledger, Replay
from gridnode.web.upload import EarlyAnswer

if TYPE_CHECKING:
    from gridnode.jobs import Job
    from gridnode.pipeline import JobService
    from gridnode.uploads.store import Progress, UploadStore

REPLAYED = ("Idempotent-Replayed", "true")


def key_of(request: Any) -> str | None:
    """The request's Idempotency-Key (None: none), or the coded 400 of a bad one."""
    return idempotency.parse_key(request.requestHeaders.getRawHeaders(b"idempotency-key"))


def route(ledger: Ledger, request: Any, intent: Intent, fetch: Callable[[str], Deferred[Any]],
          replayed: Callable[[str, Any], EarlyAnswer], admit: Callable[[Claim], Any]) -> Deferred[Any]:
    """Where the body of a creation request with a key goes: nowhere for a retry (its `EarlyAnswer`,
    ``replayed(target, work)``), else where ``admit(claim)`` says, the request's claim kept on it.
    Admission comes after the lookup: a full or draining node still answers a retry."""

    def routed(found: Found | Claim) -> Any:
        if isinstance(found, Found):
            return replayed(found.target, found.work)
        request.idempotency = found
        return admit(found)

    d: Deferred[Any] = ledger.find(intent, fetch)
    return d.addCallback(routed)


@inlineCallbacks
def accept(claim: Claim | None, target: str, make: Callable[[], Deferred[Any]]) -> Any:
    """``make()`` the work named ``target`` once the key is claimed for it; the claim is released
    when the work is refused after all. `Replay` when another request with the key won."""
    if claim is not None:
        yield claim.claim(target)
    try:
        return (yield make())
    except BaseException:
        if claim is not None:
            yield claim.release()
        raise


def settled(claim: Claim | None, fetch: Callable[[str], Deferred[Any]]) -> Callable[[Failure], Any]:
    """An errback for accepted work: a `Replay` becomes the winner's work (`KeyInUse` while it cannot
    be read yet), and the claim of work refused after it is released."""

    @inlineCallbacks
    def errback(failure: Failure) -> Any:
        if isinstance(failure.value, Replay):
            work = yield fetch(failure.value.target)
            if work is None:
                raise KeyInUse()
            return work
        if claim is not None:
            yield claim.release()
        return failure

    return errback


# -- POST /jobs


def job_fetcher(jobs: JobService, tenant: str) -> Callable[[str], Deferred[Job | None]]:
    """``tenant``'s job by id, or None where it is gone (or, impossibly, another tenant's)."""

    @inlineCallbacks
    def fetch(job_id: str) -> Any:
        try:
            job = yield jobs.get(job_id)
        except NotFound:
            return None
        return job if job.tenant == tenant else None

    return fetch


def job_answer(render: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[str, Job], EarlyAnswer]:
    """A retried POST /jobs: 201 and the job, as the first answer was; ``render`` makes the JSON
    a reader gets of a job (its result URLs signed now)."""

    def answer(job_id: str, job: Job) -> EarlyAnswer:
        body = json.dumps(render(job.to_json()), sort_keys=True).encode() + b"\n"
        return EarlyAnswer(201, body, (("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                                       ("Location", f"/jobs/{job_id}"), REPLAYED))

    return answer


# -- tus creation


def upload_fetcher(uploads: UploadStore, tenant: str) -> Callable[[str], Deferred[Progress | None]]:
    """How far ``tenant``'s upload is, or None where it is gone (terminated, expired, refused)."""

    @inlineCallbacks
    def fetch(upload_id: str) -> Any:
        try:
            return (yield uploads.progress(upload_id, tenant))
        except NotFound:
            return None
        except GridnodeError as e:
            if e.code == "upload_expired":
                return None
            raise

    return fetch


def upload_id_of(progress: Progress) -> str:
    """The id of the upload ``progress`` is of (a complete upload's is its job's)."""
    if progress.info is not None:
        return progress.info.id
    assert progress.job_id is not None
    return progress.job_id


def upload_headers(base: str, upload_id: str, progress: Progress) -> list[tuple[str, str]]:
    """A retried tus creation's answer: the same Location, and the upload's offset now (the client
    resumes from it); the job's id once the upload is complete."""
    headers = [("Location", f"{base}{upload_id}"), ("Upload-Offset", str(progress.offset)), REPLAYED]
    if progress.job_id is not None:
        headers.append(("Gridnode-Job", progress.job_id))
    elif progress.info is not None:
        headers.append(("Upload-Expires", formatdate(progress.info.expires, usegmt=True)))
    return headers


def upload_answer(base: str) -> Callable[[str, Progress], EarlyAnswer]:
    def answer(upload_id: str, progress: Progress) -> EarlyAnswer:
        return EarlyAnswer(201, b"", tuple(upload_headers(base, upload_id, progress)))

    return answer
