"""
What the HTTP side sees of a node: its settled configuration, store, jobs
and uploads, and (once they run) its registry and membership. Before any
body byte is read it has every request authorized (gridnode/web/access.py)
and decides where an upload's body goes; the resources under it render what
it holds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred

from gridnode import __version__, priority
from gridnode.config import NodeConfig
from gridnode.errors import GridnodeError
from gridnode.idempotency import JOB, Intent, Ledger
from gridnode.media.templates import Catalog
from gridnode.store_health import StoreHealth
from gridnode.web import form, replay
from gridnode.web import tus as tus_web
from gridnode.web.access import Access, segments
from gridnode.web.cors import CORS
from gridnode.web.http import is_json
from gridnode.web.result_urls import ResultUrls

if TYPE_CHECKING:
    from gridnode.keyring import KeyringFile
    from gridnode.membership.service import MembershipService
    from gridnode.pipeline import JobService
    from gridnode.registry.service import Registry
    from gridnode.store.base import ObjectStore
    from gridnode.uploads.store import UploadStore


class NodeView:
    def __init__(self, config: NodeConfig, store: ObjectStore, jobs: JobService, uploads: UploadStore,
                 tokens: KeyringFile | None = None, store_health: StoreHealth | None = None) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.started = time.time()
        self.registry: Registry | None = None
        #: what the node's store calls say (the assembly wraps the store with its `watch`)
        self.store_health = store_health or StoreHealth()
        self.membership: MembershipService | None = None
        self.cors = CORS(config.cors_origins, tus_web.ALLOW_HEADERS, tus_web.EXPOSE_HEADERS)
        #: the one authorization of every request (open when the node has no token keyring)
        self.access = Access(tokens.ring if tokens is not None else None,
                             owners=Catalog(config.templates).owners())
        #: result URLs in a job's JSON: signed with the same keyring (none: plain paths)
        self.result_urls = ResultUrls(tokens.ring if tokens is not None else None, config.result_url_ttl)
        #: the Idempotency-Keys of POST /jobs and tus creations, in the store
        self.ledger = Ledger(store, now=uploads.now,
                             replayed=lambda kind: jobs.metrics.idempotent_replays.labels(kind).inc())
        self.tus = tus_web.TusHandler(uploads, access=self.access, ledger=self.ledger)

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    def route_body(self, method: bytes, path: bytes, request: Any, length: int | None) -> Any:
        """Called for every request once its head is in: authorize it, then say where an upload's
        body goes (see web/upload.py); None for small bodies."""
        early_query: bytes = getattr(request, "early_query", b"")
        try:
            self.access.authorize(request, method, path, early_query)
        except GridnodeError as e:
            self.jobs.metrics.auth_refusals.labels(e.code).inc()
            raise
        # The path as the resource tree sees it: POST /%6Aobs is POST /jobs.
        if method == b"POST" and segments(path) == [b"jobs"]:
            if is_json(request):
                # a job of an object in the bucket (gridnode/bucket_input.py): a small body in memory,
                # its Idempotency-Key looked up once it is read (the body is what a retry repeats)
                replay.key_of(request)  # a malformed key: 400 before the body
                return None
            query = parse_qs(early_query.decode("latin-1"), keep_blank_values=True)
            try:
                if "presets" in query:  # refused before the body: an unknown or empty preset
                    self.jobs.media.parse_presets(",".join(query["presets"]))
                asked = priority.parse(",".join(query["priority"]) if "priority" in query else None)
                # a form's file part is its body less the form's parts; it is what the limits count
                boundary = form.boundary_of(request.getHeader(b"content-type"))
            except GridnodeError as e:
                self.jobs.metrics.upload_rejections.labels(e.code).inc()
                raise
            size = form.file_bound(length) if boundary is not None else length
            presets = ",".join(query.get("presets", [])).split(",")
            tenant = self.access.creator(request, [p for p in presets if p] or ["mp4-720p"], size)
            # admitted at the query's priority; a form's field counts once the body is in
            level = self.access.priority(request, asked)
            key = replay.key_of(request)
            # Whatever caps the caller's bytes (a token's max_size) is passed on as the body's limit:
            # it holds on the bytes received, so a chunked body cannot pass it either.
            limit = self.access.upload_limit(request)

            def sink(claim: Any = None) -> Any:
                spool = self.jobs.admit(size, limit=limit, level=level)  # a Deferred where the store is asked first
                if boundary is None:
                    return spool
                if isinstance(spool, Deferred):
                    return spool.addCallback(form.FormBody, boundary)
                return form.FormBody(spool, boundary)

            if key is None:
                return sink()
            notify = query.get("notify") or request.getHeader(b"notify")  # only where sent: older keys still match
            intent = Intent.of(tenant, key, JOB, length=length, name=query.get("name"), presets=query.get("presets"),
                               checksum=request.getHeader(b"upload-checksum"), **({"notify": notify} if notify else {}),
                               **({"priority": level} if "priority" in query else {}))
            return replay.route(self.ledger, request, intent, replay.job_fetcher(self.jobs, tenant),
                                replay.job_answer(self.result_urls.job_json), sink)
        return self.tus.route_body(method, path, request, length)

    def extra_headers(self, request: Any) -> list[tuple[str, str]]:
        return self.cors.headers_for(request.getHeader(b"origin")) + self.tus.extra_headers(request)

    @property
    def node_id(self) -> str:
        assert self.config.node_id is not None
        return self.config.node_id

    def health(self) -> dict[str, Any]:
        reasons = self.troubles()
        return {
            "node": self.node_id,
            "env": self.config.env,
            "pool": self.config.pool,
            "version": __version__,
            "state": "draining" if self.draining else "degraded" if reasons else "ok",
            "reasons": reasons,
            "store": self.store.url,
            # the node started only if this holds: a box for every child, or weak on purpose
            "sandbox": self.config.sandbox,
            "uptime": round(time.time() - self.started, 3),
            "registry": self.registry_health(),
            **self.jobs.load(),
            "members": self.membership.machine.live_count() if self.membership is not None else 1,
        }

    def troubles(self) -> list[str]:
        """Why the node cannot do all its work now (it still takes uploads: they wait in its spool)."""
        if self.store_health.error is not None:
            return [f"store unreachable: {self.store_health.error}"]
        if self.registry is not None and self.registry.last_error is not None:
            return [f"registry: {self.registry.last_error}"]
        return []

    def registry_health(self) -> dict[str, Any]:
        if self.registry is None:
            return {"registered": False, "error": None}
        return {"registered": self.registry.registered, "error": self.registry.last_error,
                "incarnation": self.registry.record.incarnation}
