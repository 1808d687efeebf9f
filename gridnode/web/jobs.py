"""
``/jobs`` and ``/results``: thin resources over the node's `JobService`.

POST /jobs                 body = the video (spooled by GridRequest), 201 + job
GET /jobs/<id>             job JSON (local view, else the stored record)
GET /jobs/<id>/events      Server-Sent Events until a final state
DELETE /jobs/<id>          cancel
GET /results/<id>/<name>   the bytes (Range, ETag) or a 302 to a presigned URL
GET /results/<id>/~<signature>/<name>   the same, for a signed URL (no token)

Every request was authorized before its body (gridnode/web/access.py); here
a caller is kept to its own tenant's jobs: another tenant's job answers 404,
word for word as one that does not exist. A job's JSON is rendered here, its
result URLs made at that moment (`ResultUrls.job_json`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from gridnode import bucket_input, job_list, keys, priority, purge
from gridnode.errors import GridnodeError, InvalidKey, NotFound
from gridnode.idempotency import JOB, Found, Intent, Ledger
from gridnode.job_request import JobRequest
from gridnode.jobs import Job
from gridnode.media.presets import CONTENT_TYPES
from gridnode.notify.targets import parse_urls
from gridnode.spool import SpoolFile
from gridnode.web import replay
from gridnode.web.form import FormBody
from gridnode.web.http import ErrorResource, error_body, is_json, json_body, not_found, parse_checksum, respond_later
from gridnode.web.result_urls import ResultUrls, is_signature

if TYPE_CHECKING:
    from gridnode.pipeline import JobService
    from gridnode.web.access import Access


def arg(request: Request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


_LISTING_ARGS = frozenset({"state", "since", "until", "limit", "cursor", "tenant", "view"})


def listing_args(request: Request) -> dict[str, str]:
    """``GET /jobs``'s parameters, each given once; an unknown or repeated one is a 400 ``bad_query``."""
    args: dict[str, str] = {}
    for raw, values in request.args.items():
        name = raw.decode("utf-8", "replace")
        if name not in _LISTING_ARGS or len(values) != 1:
            raise GridnodeError(f"GET /jobs takes each of {', '.join(sorted(_LISTING_ARGS))} once; "
                                f"not {name[:40]!r} here", code="bad_query", status=400)
        args[name] = values[0].decode("utf-8", "replace")
    if args.get("view", "node") != "node" or ("view" in args and len(args) > 1):
        raise GridnodeError("view= takes 'node' (this node's own jobs), alone", code="bad_query", status=400)
    return args


#: the largest HLS playlist the node passes on from an S3 store itself (a 10 h rung is ~100 KiB)
MAX_PLAYLIST_BYTES = 1024 * 1024
#: seconds between SSE comment lines on a quiet stream: under the usual 60 s idle cut of proxies
KEEP_ALIVE = 15.0


def answer_json(request: Request, urls: ResultUrls, status: int = 200) -> Callable[[Any], None]:
    """For `respond_later`: answer a job's JSON (its result URLs made now) and finish."""

    def done(obj: Any) -> None:
        if isinstance(obj, dict) and "jobs" in obj:  # a page of the listing
            obj = {**obj, "jobs": [urls.job_json(j.to_json()) for j in obj["jobs"]]}
        request.write(json_body(request, urls.job_json(obj.to_json()) if isinstance(obj, Job) else obj, status))
        request.finish()

    return done


def notify_of(request: Request, fields: dict[str, str]) -> tuple[list[str], bool]:
    """A new job's notify URLs (query ``notify``, else header ``Notify``, else a form's field; comma-
    separated) and whether it asked for job.progress (``notify_progress=true``, ``Notify-Progress``, a form's
    field)."""
    header = request.getHeader(b"notify")
    text = arg(request, "notify") or (header.decode("latin-1") if header else None) or fields.get("notify")
    flag = (arg(request, "notify_progress") or (request.getHeader(b"notify-progress") or b"").decode("latin-1")
            or fields.get("notify_progress", ""))
    return parse_urls(text), flag.strip().lower() in ("1", "true", "yes")


def no_job(job_id: str) -> NotFound:
    """The answer for a job that does not exist, and for another tenant's."""
    return NotFound(f"no job {job_id}")


def bad_job_id(text: str) -> GridnodeError:
    """A path segment that cannot be a job id: the caller's mistake, whoever's jobs exist."""
    return GridnodeError(f"{text[:40]!r} is not a job id: use the id a POST /jobs answered (26 letters and digits)",
                         code="bad_job_id", status=400)


async def visible_job(jobs: JobService, access: Access, request: Request, job_id: str) -> Job:
    """The job, if the caller's tenant may see it; else the same 404 as for no job at all."""
    try:
        job: Job = await jobs.get(job_id)
    except NotFound:
        stone = await purge.tombstone(jobs.store, job_id)
        if stone is not None and access.caller(request).sees(stone["tenant"]):
            raise purge.Gone(f"job {job_id} was purged: its input, outputs and record are deleted") from None
        raise no_job(job_id) from None
    if not access.caller(request).sees(job.tenant):
        raise no_job(job_id)
    return job


class JobsResource(Resource):
    def __init__(self, jobs: JobService, access: Access, urls: ResultUrls, ledger: Ledger | None = None) -> None:
        super().__init__()
        self.jobs = jobs
        self.access = access
        self.urls = urls
        #: the Idempotency-Keys of JSON job requests (an upload's are looked up by the body router)
        self.ledger = ledger or Ledger(jobs.store, now=jobs.now)

    def getChild(self, path: bytes, request: Request) -> Resource:  # noqa: N802 - Twisted's name
        job_id = path.decode("ascii", "replace")
        if not keys.is_id(job_id):
            return ErrorResource(bad_job_id(job_id))
        return JobResource(self.jobs, self.access, self.urls, job_id)

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        """``GET /jobs``: the caller's tenant's jobs from the store, a page at a time, newest first
        (gridnode/job_list.py); ``?view=node``: this node's running and queued jobs, and its recent
        finished ones."""
        try:
            args = listing_args(request)
            if args.get("view") == "node":
                return json_body(request, self.urls.listing(self.jobs.listing(self.access.owner_filter(request))))
            query = job_list.Query.parse(args, self.access.owner_filter(request))
        except GridnodeError as e:
            return error_body(request, e)
        return respond_later(request, job_list.page(self.jobs.store, query),
                             answer_json(request, self.urls))

    def render_POST(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        if is_json(request):
            return self._from_bucket(request)
        body: Any = request.content  # a SpoolFile (or a form's, around one): GridRequest routed the body there
        spool: Any = body.spool if isinstance(body, FormBody) else body
        try:
            if not isinstance(spool, SpoolFile):
                raise GridnodeError("this upload's body was not routed to the spool; POST it to /jobs",
                                    code="internal_error", status=500)
            fields: dict[str, str] = {}
            if isinstance(body, FormBody):
                body.finish()
                fields = {"name": body.filename, **body.fields}
            checksum = parse_checksum(request.getHeader(b"upload-checksum"))
            # the query string wins over a form's field: it is what was authorized before the body
            presets = arg(request, "presets")
            if presets is None and "presets" in fields:
                presets = fields["presets"]
                self.access.creator(request, [p.strip() for p in presets.split(",") if p.strip()], None)
            name = arg(request, "name") or fields.get("name") or ""
            tenant = self.access.caller(request).tenant
            claim = getattr(request, "idempotency", None)  # the router's, for a request with an Idempotency-Key
            notify, progress = notify_of(request, fields)
            asked = arg(request, "priority")  # the query wins over a form's field, as for presets
            asked = asked if asked is not None else fields.get("priority")
            level = self.access.priority(request, priority.parse(asked))
            work = self.jobs.submit(spool, name=name, presets=presets, checksum=checksum, tenant=tenant,
                                    claim=claim.claim if claim is not None else None, notify=notify,
                                    notify_progress=progress, priority=level)
        except GridnodeError as e:  # refused before the job service saw it (which counts its own)
            getattr(spool, "discard", lambda: None)()
            self.jobs.metrics.upload_rejections.labels(e.code).inc()
            return error_body(request, e)
        if claim is not None:
            # Another request with the key won: its job is the answer (this one's was dropped).
            work.addErrback(replay.settled(claim, replay.job_fetcher(self.jobs, tenant)))

        def located(job: Job) -> Job:
            request.setHeader(b"location", f"/jobs/{job.id}".encode())
            if claim is not None and job.id != os.path.basename(spool.path):
                request.setHeader(*(h.encode() for h in replay.REPLAYED))
            return job

        return respond_later(request, work.addCallback(located), answer_json(request, self.urls, 201))

    def _from_bucket(self, request: Request) -> Any:
        """``POST /jobs`` with a JSON body: a job of an object already in the bucket. With an
        Idempotency-Key, a retry of the same body is answered the job its key made."""
        try:
            body = request.content.read() if request.content is not None else b""
            asked = JobRequest.parse(body)
            caller = self.access.caller(request)
            level = self.access.priority(request, asked.priority)
            key = replay.key_of(request)
        except GridnodeError as e:
            self.jobs.metrics.upload_rejections.labels(e.code).inc()
            return error_body(request, e)
        fetch = replay.job_fetcher(self.jobs, caller.tenant)

        async def make() -> Any:
            claim = None
            if key is not None:
                intent = Intent.of(caller.tenant, key, JOB, json=hashlib.sha256(body).hexdigest())
                found = await self.ledger.find(intent, fetch)
                if isinstance(found, Found):
                    return replayed(found.work)
                claim = found
            work = bucket_input.submit(
                self.jobs, asked, prefixes=self.jobs.config.input_prefixes, tenant=caller.tenant,
                any_tenant=caller.tenant_filter is None, limit=self.access.upload_limit(request),
                allow=lambda presets, size, inline: self.access.creator(request, presets, size, inline=inline),
                claim=claim.claim if claim is not None else None, level=level)
            if claim is not None:
                settle = replay.settled(claim, fetch)

                def lost(failure: Failure) -> Any:  # another request with the key won: its job
                    return settle(failure).addCallback(replayed)

                work.addErrback(lost)
            return await work

        def replayed(job: Job) -> Job:
            request.setHeader(*(h.encode() for h in replay.REPLAYED))
            return job

        def located(job: Job) -> Job:
            request.setHeader(b"location", f"/jobs/{job.id}".encode())
            return job

        return respond_later(request, ensureDeferred(make()).addCallback(located),
                             answer_json(request, self.urls, 201))


class JobResource(Resource):
    def __init__(self, jobs: JobService, access: Access, urls: ResultUrls, job_id: str) -> None:
        super().__init__()
        self.jobs = jobs
        self.access = access
        self.urls = urls
        self.job_id = job_id

    def getChild(self, path: bytes, request: Request) -> Resource:  # noqa: N802 - Twisted's name
        if path == b"events" and not request.postpath:
            return EventsResource(self.jobs, self.access, self.urls, self.job_id)
        return ErrorResource(not_found())

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        return respond_later(request, visible_job(self.jobs, self.access, request, self.job_id),
                             answer_json(request, self.urls))

    def render_DELETE(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        """Cancel the job; ``?purge=true``: cancel it (on the node that runs it) and remove its
        input, outputs and record (gridnode/purge.py)."""
        purging = arg(request, "purge")
        if purging not in (None, "true", "false"):
            return error_body(request, GridnodeError("purge= takes true or false", code="bad_query", status=400))

        async def cancel() -> Any:
            job = await visible_job(self.jobs, self.access, request, self.job_id)  # the owner never changes
            if purging != "true":
                return await self.jobs.cancel(self.job_id)
            if not job.final:
                job = await self.jobs.cancel(self.job_id)
            stone = await purge.purge(self.jobs.store, job, self.jobs.now())
            self.jobs.metrics.jobs_purged.inc()
            return stone

        return respond_later(request, cancel(), answer_json(request, self.urls))


class EventsResource(Resource):
    """Server-Sent Events: the job now, then one event per change, until final."""

    isLeaf = True

    def __init__(self, jobs: JobService, access: Access, urls: ResultUrls, job_id: str) -> None:
        super().__init__()
        self.jobs = jobs
        self.access = access
        self.urls = urls
        self.job_id = job_id

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        def started(job: Job) -> None:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"x-accel-buffering", b"no")
            stream = _EventStream(request, self.urls)
            stream.send(job)
            if job.final:
                return  # its one event ended the stream
            unsubscribe = self.jobs.subscribe(self.job_id, stream.send)
            beat = LoopingCall(stream.keep_alive)
            beat.clock = self.jobs.reactor
            beat.start(KEEP_ALIVE, now=False)

            def stop(_: object = None) -> None:
                unsubscribe()
                if beat.running:
                    beat.stop()

            request.notifyFinish().addBoth(stop)

        def failed(f: Failure) -> None:
            error = f.value if isinstance(f.value, GridnodeError) else GridnodeError("cannot watch this job")
            request.write(error_body(request, error))
            request.finish()

        ensureDeferred(visible_job(self.jobs, self.access, request, self.job_id)).addCallbacks(started, failed)
        return NOT_DONE_YET


class _EventStream:
    def __init__(self, request: Request, urls: ResultUrls) -> None:
        self.request = request
        self.urls = urls
        self.closed = False
        self.count = 0
        self.last = ""

    def keep_alive(self) -> None:
        """A comment line, which EventSource ignores: a proxy or load balancer between the client
        and the node cuts a connection idle for 60 s, and a long job can go quiet for longer."""
        if not self.closed:
            self.request.write(b": keep-alive\n\n")

    def send(self, job: Job) -> None:
        record = job.to_json()
        data = json.dumps(record, sort_keys=True)  # compared before signing: a URL made later is no change
        if self.closed or data == self.last:
            return
        self.last = data
        self.count += 1
        signed = json.dumps(self.urls.job_json(record), sort_keys=True)
        self.request.write(f"id: {self.count}\nevent: {job.state}\ndata: {signed}\n\n".encode())
        if job.final:
            self.closed = True
            self.request.finish()


class ResultsResource(Resource):
    """``/results/<job>/<name...>`` (a token with scope read) and ``/results/<job>/~<signature>/<name...>``
    (a signed URL: no token). From a file: store the bytes; from S3 a playlist is passed on by the
    node (its relative URLs then lead back here, signature and all) and any other file is a 302 to
    a presigned URL."""

    isLeaf = True

    def __init__(self, jobs: JobService, access: Access, urls: ResultUrls) -> None:
        super().__init__()
        self.jobs = jobs
        self.access = access
        self.urls = urls

    def render_GET(self, request: Request) -> Any:  # noqa: N802 - Twisted's name
        parts = [unquote(p.decode("utf-8", "replace")) for p in request.postpath or []]
        signed = len(parts) > 1 and is_signature(parts[1])
        try:
            if parts and not keys.is_id(parts[0]):
                raise bad_job_id(parts[0])
            if len(parts) < 2:
                raise NotFound("no such result: use /results/<job id>/<file name> from the job's outputs")
            name = "/".join(parts[2:] if signed else parts[1:])
            key = keys.output(parts[0], name)
            if signed:
                try:
                    valid = self.urls.verify(parts[0], parts[1], name)
                except GridnodeError as e:
                    self.jobs.metrics.auth_refusals.labels(e.code).inc()
                    raise
                return self._serve(request, key, valid)
        except InvalidKey:
            return error_body(request, NotFound("no such result"))
        except GridnodeError as e:
            return error_body(request, e)
        if self.access.owner_filter(request) is None:
            return self._serve(request, key)

        def checked(seen: bool) -> None:
            if not seen:
                raise NotFound("no such result")
            if request._disconnected:
                return
            body = self._serve(request, key)
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

        def failed(f: Failure) -> None:
            e = f.value if isinstance(f.value, GridnodeError) else GridnodeError("cannot reach the store")
            if isinstance(e, NotFound):
                e = NotFound("no such result")
            if not request._disconnected:
                request.write(error_body(request, e))
                request.finish()

        self.access.may_read_job(request, parts[0], self.jobs.get).addCallback(checked).addErrback(failed)
        return NOT_DONE_YET

    render_HEAD = render_GET

    def _serve(self, request: Request, key: str, valid: int | None = None) -> Any:
        """The result's bytes, or NOT_DONE_YET while the store answers. ``valid``: the seconds a
        signed URL has left (no cache keeps it longer, no presigned URL outlives it)."""
        store = self.jobs.store
        path = store.local_path(key)
        if path is not None:
            return self._serve_file(request, key, path, valid)

        def answer(result: tuple[bytes, Any] | str | None) -> None:
            if request._disconnected:
                return
            if result is None:
                request.write(error_body(request, NotFound("no such result")))
            elif isinstance(result, str):
                request.redirect(result.encode())
            else:
                self._cache_headers(request, valid)
                request.setHeader(b"content-type", CONTENT_TYPES[os.path.splitext(key)[1]].encode())
                request.write(result[0])
            request.finish()

        def failed(f: Failure) -> None:
            e = f.value if isinstance(f.value, GridnodeError) else GridnodeError("cannot reach the store")
            if not request._disconnected:
                request.write(error_body(request, e))
                request.finish()

        work: Deferred[Any]
        if key.endswith((".m3u8", ".mpd", ".vtt")):
            # A redirected playlist's (DASH manifest's, storyboard VTT's) relative URLs would resolve
            # against the presigned URL, where they name objects with no signature: the node passes
            # it on, one GET to the store.
            work = store.get_bytes(key, max_size=MAX_PLAYLIST_BYTES)
        else:
            work = store.stat(key).addCallback(lambda _: store.presigned_url(key, valid or 3600))
        work.addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _cache_headers(self, request: Request, valid: int | None) -> None:
        # A tenant's result may sit in the browser's cache, never in one shared with other tenants.
        shared = b"public" if self.access.open else b"private"
        age = 86400 if valid is None else min(86400, valid)
        request.setHeader(b"cache-control", shared + b", max-age=%d, immutable" % age)

    def _serve_file(self, request: Request, key: str, path: str, valid: int | None) -> Any:
        info = self.jobs.store.backend.stat(key)  # local file: a stat, no network
        etag = f'"{info.etag}"'.encode()
        request.setHeader(b"etag", etag)
        self._cache_headers(request, valid)
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        f = static.File(path)
        ext = "." + path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
        f.type = CONTENT_TYPES.get(ext, "application/octet-stream")
        f.encoding = None
        return f.render(request)
