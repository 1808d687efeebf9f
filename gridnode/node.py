"""
The node as a service: it settles its configuration (reading EC2 user-data
when asked), opens the store, and starts the HTTP API. A failure to start is
one line on standard error and a non-zero exit, never a half-started node.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from typing import Any
from urllib.parse import parse_qs

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode import __version__, tokens
from gridnode.config import NodeConfig, build_config, endpoint_interface, endpoint_port, is_loopback, with_backlog
from gridnode.errors import ConfigError, GridnodeError
from gridnode.metrics import Metrics
from gridnode.pipeline import JobService
from gridnode.registry.service import Registry, first_incarnation
from gridnode.store import ObjectStore, open_backend
from gridnode.web.cors import CORS


class Node:
    """What the HTTP resources see of the node: settled config, store, counters."""

    def __init__(self, reactor: Any, config: NodeConfig, store: ObjectStore, jobs: JobService) -> None:
        self.reactor = reactor
        self.config = config
        self.store = store
        self.jobs = jobs
        self.started = time.time()
        self.registry: Registry | None = None
        self.membership: Any = None
        from gridnode.uploads.store import UploadStore, UploadSweep
        from gridnode.web import tus as tus_web

        self.cors = CORS(config.cors_origins, tus_web.ALLOW_HEADERS, tus_web.EXPOSE_HEADERS)
        self.upload_secret = read_secret(config.upload_secret, "upload-secret") if config.upload_secret else None
        uploads = UploadStore(reactor, jobs, store, max_upload_bytes=config.max_upload_bytes)
        self.upload_sweep = UploadSweep(uploads)
        self.tus = tus_web.TusHandler(uploads, authorize=self.authorize)

    @property
    def draining(self) -> bool:
        return self.jobs.draining

    def route_body(self, method: bytes, path: bytes, request: Any, length: int | None) -> Any:
        """Where an upload's body goes (see web/upload.py); None for small bodies."""
        if method == b"POST" and path.rstrip(b"/") == b"/jobs":
            query = parse_qs(getattr(request, "early_query", b"").decode("latin-1"))
            presets = ",".join(query.get("presets", [])).split(",")
            self.authorize(request, [p for p in presets if p] or ["mp4-720p"], length)
            return self.jobs.admit(length)
        return self.tus.route_body(method, path, request, length)

    def authorize(self, request: Any, presets: list[str], length: int | None) -> None:
        """With an upload secret, an upload needs a token that allows it."""
        if self.upload_secret is None:
            return
        header = request.getHeader(b"authorization") or b""
        token = header[7:].decode("latin-1") if header[:7].lower() == b"bearer " else None
        if token is None:
            query = parse_qs(getattr(request, "early_query", b"").decode("latin-1"))
            token = (query.get("token") or [None])[0]
        tokens.check(tokens.verify(self.upload_secret, token), presets, length)

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

    def load(self) -> dict[str, float]:
        return self.jobs.load()


class NodeService(MultiService):
    _log = Logger()

    def __init__(
        self, reactor: Any, config: NodeConfig, *, file: dict[str, Any] | None = None,
        cli: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.setName("node")
        self.reactor = reactor
        self.config = config
        self._file = file or {}
        self._cli = cli or {}
        self.node: Node | None = None
        self.ready: Deferred[Node] = Deferred()
        self._ports: list[Any] = []
        self._media: Service | None = None
        self._jobs: Service | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        d = self._start()
        d.addCallbacks(self.ready.callback, self._fatal)

    @inlineCallbacks
    def _start(self) -> Any:
        # Once the reactor runs (its own signal handlers are in place), SIGTERM is
        # ours: twistd would re-raise it after shutdown (exit status -15); an
        # operator scaling in wants a drain and exit 0.
        yield deferLater(self.reactor, 0, lambda: None)
        self._take_sigterm()
        config = self.config
        if config.instance_metadata:
            from gridnode.instance import fetch_instance

            info = yield fetch_instance(self.reactor, config.instance_metadata)
            config = build_config(file=self._file, user_data=info.user_data, cli=self._cli)
            config = config.with_identity(info.instance_id, info.public_hostname or info.local_ipv4)
        else:
            config = config.with_identity()
        self.config = config
        os.makedirs(config.work_dir, exist_ok=True)
        backend = open_backend(config.store, s3_endpoint=config.s3_endpoint, s3_region=config.s3_region)
        store = ObjectStore.threaded(backend, self.reactor)
        metrics = Metrics()
        store._run = metrics.timed_store(store._run)
        from gridnode.converter import Converter

        media = self._media = Converter(self.reactor, config)
        media.startService()
        jobs = self._jobs = JobService(self.reactor, config, store, media, metrics=metrics)
        # Recover before listening: the spool sweep must not meet uploads in flight.
        jobs.startService()
        yield jobs.recovered
        node = self.node = Node(self.reactor, config, store, jobs)

        from twisted.internet.endpoints import serverFromString

        from gridnode.web.api import api_root
        from gridnode.web.upload import GridSite

        site = GridSite(node.cors.wrap(api_root(node)), self.reactor, node.route_body, node.extra_headers,
                        on_refused=lambda e: metrics.upload_rejections.labels(e.code).inc())
        port = yield serverFromString(self.reactor, with_backlog(config.http)).listen(site)
        self._ports.append(port)
        address = port.getHost()
        http_url = f"http://{public_host(config.advertise, address.host)}:{address.port}"
        peer_port = endpoint_port(config.peer) or 0
        peer_addr = f"{public_host(config.advertise, endpoint_interface(config.peer) or '')}:{peer_port}"
        membership = node.membership = yield self._membership(node, peer_addr, metrics)
        node.registry = Registry(
            self.reactor, store, env=config.env, pool=config.pool, node_id=node.node_id, http_url=http_url,
            peer_addr=peer_addr, heartbeat=config.heartbeat, stale=config.stale, load=node.load,
            incarnation=lambda: membership.machine.incarnation,
        )
        node.registry.on_read.append(membership.registry_read)
        node.registry.wanted = membership.needs_record
        jobs.adopter.members = membership.live_members
        registry = node.registry
        jobs.adopter.earlier_life = lambda: registry.earlier_life
        membership.on_gone.append(node.registry.forget)
        node.registry.startService()
        membership.startService()
        node.upload_sweep.startService()
        self._log.info(
            "gridnode {node} ({env}/{pool}) serving HTTP on {host}:{port}, store {store}",
            node=node.node_id, env=config.env, pool=config.pool, host=address.host,
            port=address.port, store=store.url,
        )
        return node

    @inlineCallbacks
    def _membership(self, node: Node, peer_addr: str, metrics: Metrics) -> Any:
        """SWIM over AMP on --peer, keyed from the pool secret."""
        from twisted.internet.endpoints import serverFromString

        from gridnode.membership.service import MembershipService, new_machine
        from gridnode.membership.wire import peer_key

        config = node.config
        if config.secret_file:
            secret = read_secret(config.secret_file, "secret-file")
        elif is_loopback(config.peer):
            secret = b""  # a laptop: nothing beyond this machine can reach the port
        else:
            raise ConfigError(f"peer: {config.peer} is reachable from the network, so peers must authenticate: "
                              "set secret-file (a file of at least 16 random bytes, the same on every node)")
        machine = new_machine(node.node_id, peer_addr, first_incarnation(time.time()), time.time())

        def adopt(member: str) -> Any:
            return node.jobs.adopt_orphans(dead=frozenset({member}))

        @inlineCallbacks
        def dead(member: str, incarnation: int) -> Any:
            if node.registry is not None:
                yield node.registry.delete_dead(member, incarnation)
            yield adopt(member)

        service = MembershipService(
            self.reactor, machine, peer_key(secret, config.env, config.pool), metrics=metrics, stale=config.stale,
            # a drained node released its unfinished jobs just before it left: take them now too
            on_confirmed_dead=dead, on_left=adopt,
        )
        for state in ("alive", "suspect", "dead", "left"):
            metrics.members.labels(state).set_function(_members_in(machine, state))
        yield service.listen(serverFromString(self.reactor, config.peer))
        return service

    def _take_sigterm(self) -> None:
        # Only where the reactor installed its own handler (twistd, not tests).
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.shutdown)

    @inlineCallbacks
    def shutdown(self) -> Any:
        """SIGTERM: drain (no new uploads, running jobs finish or go back to the pool), leave, exit 0."""
        if self.node is not None and not self.node.jobs.draining:
            self._log.info("SIGTERM: draining for up to {timeout}s", timeout=self.config.drain_timeout)
            try:
                released = yield self.node.jobs.drain(self.config.drain_timeout)
                self._log.info("drained; {count} jobs released to the pool", count=released)
            except Exception:  # noqa: BLE001 - stopping anyway
                self._log.failure("drain failed")
        if self.reactor.running:
            self.reactor.stop()

    def _fatal(self, failure: Failure) -> None:
        error = failure.value
        message = error.message if isinstance(error, GridnodeError) else str(error) or repr(error)
        self._log.critical("gridnode cannot start: {reason}", reason=message)
        # twistd sends sys.stderr to its log; the operator's terminal is fd 2.
        os.write(2, f"twistd gridnode: {message}\n".encode())
        # twistd has no way to set its exit status; exit 1 once it has cleaned up.
        atexit.register(os._exit, 1)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        if self.node is not None:
            self.node.upload_sweep.stopService()
        if self.node is not None and self.node.membership is not None:
            yield self.node.membership.stopService()
        if self.node is not None and self.node.registry is not None:
            yield self.node.registry.stopService()
        if self._jobs is not None:
            yield self._jobs.stopService()
        if self._media is not None:
            yield self._media.stopService()
        for port in self._ports:
            yield port.stopListening()
        yield super().stopService()


def _members_in(machine: Any, state: str) -> Any:
    return lambda: sum(1 for v in machine.members() if v.state == state)


def read_secret(path: str, key: str) -> bytes:
    """A secret from a file: its bytes, stripped; at least 16 of them."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"{key}: {path} holds {len(secret)} bytes; use at least 16 random bytes "
                          "(e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return secret


def public_host(advertise: str | None, bound: str) -> str:
    """The host others should use: --advertise, else the bound interface (not 0.0.0.0)."""
    if advertise:
        return advertise
    if bound in ("", "0.0.0.0", "::"):
        import socket

        return socket.gethostname()
    return bound
