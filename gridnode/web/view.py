"""
What the HTTP side sees of a node: its settled configuration, store, jobs
and uploads, and (once they run) its registry and membership. It decides
where an upload's body goes and whether a token allows it; the resources
under it render what it holds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from gridnode import __version__, tokens
from gridnode.config import NodeConfig, read_secret
from gridnode.web import tus as tus_web
from gridnode.web.cors import CORS

if TYPE_CHECKING:
    from gridnode.membership.service import MembershipService
    from gridnode.pipeline import JobService
    from gridnode.registry.service import Registry
    from gridnode.store.base import ObjectStore
    from gridnode.uploads.store import UploadStore


class NodeView:
    def __init__(self, config: NodeConfig, store: ObjectStore, jobs: JobService, uploads: UploadStore) -> None:
        self.config = config
        self.store = store
        self.jobs = jobs
        self.started = time.time()
        self.registry: Registry | None = None
        self.membership: MembershipService | None = None
        self.cors = CORS(config.cors_origins, tus_web.ALLOW_HEADERS, tus_web.EXPOSE_HEADERS)
        self.upload_secret = read_secret(config.upload_secret, "upload-secret") if config.upload_secret else None
        self.tus = tus_web.TusHandler(uploads, authorize=self.authorize)

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    def route_body(self, method: bytes, path: bytes, request: Any, length: int | None) -> Any:
        """Where an upload's body goes (see web/upload.py); None for small bodies."""
        if method == b"POST" and path.rstrip(b"/") == b"/jobs":
            query = parse_qs(getattr(request, "early_query", b"").decode("latin-1"))
            presets = ",".join(query.get("presets", [])).split(",")
            # Whatever caps the caller's bytes (a token's max_size) is passed on as the body's limit:
            # it holds on the bytes received, so a chunked body cannot pass it either.
            limit = self.authorize(request, [p for p in presets if p] or ["mp4-720p"], length)
            return self.jobs.admit(length, limit=limit)
        return self.tus.route_body(method, path, request, length)

    def authorize(self, request: Any, presets: list[str], length: int | None) -> int | None:
        """With an upload secret, an upload needs a token that allows it; returns the most bytes
        the token allows (None: no cap of its own)."""
        if self.upload_secret is None:
            return None
        header = request.getHeader(b"authorization") or b""
        token = header[7:].decode("latin-1") if header[:7].lower() == b"bearer " else None
        if token is None:
            query = parse_qs(getattr(request, "early_query", b"").decode("latin-1"))
            token = (query.get("token") or [None])[0]
        grant = tokens.verify(self.upload_secret, token)
        tokens.check(grant, presets, length)
        return grant.max_size

    def extra_headers(self, request: Any) -> list[tuple[str, str]]:
        return self.cors.headers_for(request.getHeader(b"origin")) + self.tus.extra_headers(request)

    @property
    def node_id(self) -> str:
        assert self.config.node_id is not None
        return self.config.node_id

    def health(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "env": self.config.env,
            "pool": self.config.pool,
            "version": __version__,
            "state": "draining" if self.draining else "ok",
            "store": self.store.url,
            "uptime": round(time.time() - self.started, 3),
            "registry": self.registry_health(),
            **self.jobs.load(),
            "members": self.membership.machine.live_count() if self.membership is not None else 1,
        }

    def registry_health(self) -> dict[str, Any]:
        if self.registry is None:
            return {"registered": False, "error": None}
        return {"registered": self.registry.registered, "error": self.registry.last_error,
                "incarnation": self.registry.record.incarnation}
