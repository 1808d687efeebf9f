"""
The node as a service: it settles its configuration (reading EC2 user-data
when asked), opens the store, and starts its parts as child services. A
failure to start is one line on standard error and a non-zero exit, never a
half-started node.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridnode import keys
from gridnode.config import NodeConfig, build_config
from gridnode.endpoints import endpoint_interface, endpoint_port, endpoint_scheme, is_loopback, with_backlog
from gridnode.errors import ConfigError, GridnodeError
from gridnode.keyring import Keyring, KeyringFile
from gridnode.metrics import Metrics
from gridnode.pipeline import JobService
from gridnode.registry.service import Registry, first_incarnation
from gridnode.store import ObjectStore, open_backend
from gridnode.store.base import THREADS
from gridnode.store.rate import BACKGROUND, Gate
from gridnode.store_health import StoreHealth
from gridnode.uploads.store import UploadStore
from gridnode.uploads.sweep import UploadSweep
from gridnode.web.view import NodeView


def pool_size(live: int, listed: int | None) -> int:
    """The pool's size as a node sees it, for its share of the store budget: the members its
    membership holds live, or the registry's records if more (a starting node, its membership not
    joined yet); 0 (unknown: the gate assumes a pool) before the registry's first listing."""
    return 0 if listed is None else max(live, listed)


class Listener(Service):
    """Listens on an endpoint while it runs; ``listening`` fires with the port (or the failure)."""

    def __init__(self, endpoint: Any, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.listening: Deferred[Any] = Deferred()
        self._port: Any = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()

        def listened(port: Any) -> Any:
            self._port = port
            return port

        self.endpoint.listen(self.factory).addCallback(listened).chainDeferred(self.listening)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted's name
        super().stopService()
        port, self._port = self._port, None
        return port.stopListening() if port is not None else None


#: seconds the parts of a stopping node have in all (after the drain) before each is left behind
STOP_BUDGET = 2.0
#: the same after a second SIGTERM
HURRIED_STOP = 0.5
#: the least one part is waited for
MIN_PART_STOP = 0.2


class NodeService(MultiService):
    """The node: its parts are its children, started in order once the configuration is settled
    (converter, job service, upload sweep, HTTP, registry, membership) and stopped one at a time
    in the reverse order: the membership leaves, the registry deletes our record, HTTP stops
    listening, then the loops and the ffmpeg children stop."""

    _log = Logger()

    def __init__(
        self, reactor: Any, config: NodeConfig, *, file: dict[str, Any] | None = None,
        cli: dict[str, Any] | None = None, file_path: str | None = None,
    ) -> None:
        super().__init__()
        self.setName("node")
        self.reactor = reactor
        self.config = config
        self._file = file or {}
        self._cli = cli or {}
        self._file_path = file_path
        self.view: NodeView | None = None
        self._media: Any = None
        #: this node's part in chunks run by the pool (gridnode/chunk_grid.py), once it runs
        self.chunks: Any = None
        self._successor: Any = None
        self.ready: Deferred[NodeView] = Deferred()

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
        config = yield self._settle()
        # Every file and folder the node makes is its own (0600/0700): spool, journal, store.
        os.umask(0o077)
        # Secrets first: a bad keyring stops the node before anything else starts.
        tokens = self._keyring(config.upload_secret, "upload-secret") if config.upload_secret else None
        peer_ring = self._keyring(config.secret_file, "secret-file") if config.secret_file else None
        try:
            os.makedirs(config.work_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"work-dir: cannot make {config.work_dir} ({e.strerror or e}); choose a folder "
                              "the node may create and write") from None
        metrics = Metrics()
        metrics.queue_capacity.set(config.queue)
        try:
            backend = open_backend(config.store, s3_endpoint=config.s3_endpoint, s3_region=config.s3_region,
                                   on_throttled=lambda operation: metrics.store_throttled.labels(operation).inc())
        except OSError as e:
            where = f" at {e.filename}" if e.filename else ""
            raise ConfigError(f"store: cannot open {config.store} ({e.strerror or e}{where}); a file: store needs "
                              "a folder the node may create and write") from None
        store_health = StoreHealth()
        store = ObjectStore.threaded(backend, self.reactor).wrapped(metrics.timed_store).wrapped(store_health.watch)
        # every request but bodies spends this node's budget (--store-rate), by lane
        gate = Gate(self.reactor, rate=config.store_rate, slots=THREADS)
        metrics.bind_gate(gate)
        store = store.gated(gate)
        from twisted.internet.endpoints import serverFromString

        from gridnode.converter import Converter
        from gridnode.web.api import api_root
        from gridnode.web.upload import GridSite

        media = self._media = Converter(self.reactor, config)
        media.setServiceParent(self)
        jobs = JobService(self.reactor, config, store, media, metrics=metrics)
        jobs.setServiceParent(self)
        hooks = self._webhooks(config, store, metrics, jobs)
        # Recover before listening: the spool sweep must not meet uploads in flight.
        yield jobs.recovered
        uploads = UploadStore(self.reactor, jobs, store, max_upload_bytes=config.max_upload_bytes)
        UploadSweep(uploads).setServiceParent(self)
        if config.retain_inputs or config.retain_outputs:
            from gridnode.retention import RetentionSweep

            RetentionSweep(self.reactor, store.in_lane(BACKGROUND), config.node_id or "", period=config.retention_sweep,
                           retain_inputs=config.retain_inputs, retain_outputs=config.retain_outputs,
                           metrics=metrics).setServiceParent(self)
        view = self.view = NodeView(config, store, jobs, uploads, tokens, store_health)
        site = GridSite(view.cors.wrap(api_root(view)), self.reactor, view.route_body, view.extra_headers,
                        on_refused=lambda e: metrics.upload_rejections.labels(e.code).inc())
        http = Listener(serverFromString(self.reactor, with_backlog(config.http)), site)
        http.setServiceParent(self)
        address = (yield http.listening).getHost()
        http_url = f"{endpoint_scheme(config.http)}://{public_host(config.advertise, address.host)}:{address.port}"
        peer_port = endpoint_port(config.peer) or 0
        peer_addr = f"{public_host(config.advertise, endpoint_interface(config.peer) or '')}:{peer_port}"
        membership = yield self._membership(config, jobs, peer_addr, metrics, peer_ring)
        grid = self.chunks = self._chunk_grid(config, view.node_id, store, media, jobs, membership, metrics)
        media.chunk_grid = grid
        announce = jobs.runner.on_final
        jobs.runner.on_final = lambda job: self._ended(grid, job, announce)
        registry = Registry(
            self.reactor, store.in_lane(BACKGROUND), env=config.env, pool=config.pool, node_id=view.node_id,
            http_url=http_url, peer_addr=peer_addr, heartbeat=config.heartbeat, stale=config.stale,
            load=lambda: jobs.load() | grid.load_figures(), incarnation=lambda: membership.machine.incarnation,
        )
        registry.on_read.append(membership.registry_read)
        registry.on_seed.append(membership.registry_seeds)
        registry.wanted = membership.needs_record
        registry.held = lambda: {v.member: v.state for v in membership.machine.members()}
        membership.on_gone.append(registry.forget)
        self._wire_adoption(jobs, membership, registry)
        if hooks is not None:
            hooks.members = lambda: {v.member: v.state for v in membership.machine.members()}
        gate.members = lambda: pool_size(len(membership.live_members()), registry.listed_count)
        gate.events = membership.unsettled
        view.registry, view.membership = registry, membership
        registry.setServiceParent(self)
        membership.setServiceParent(self)
        self._log.info(
            "gridnode {node} ({env}/{pool}) serving HTTP on {host}:{port}, store {store}",
            node=view.node_id, env=config.env, pool=config.pool, host=address.host,
            port=address.port, store=store.url,
        )
        return view

    def _chunk_grid(self, config: NodeConfig, node_id: str, store: ObjectStore, media: Any, jobs: JobService,
                    membership: Any, metrics: Metrics) -> Any:
        """This node's part in chunks run by the pool (gridnode/chunk_grid.py): peers' chunks on its
        idle workers, offered by notes; its own chunked jobs' chunks through ``run_task``."""
        from gridnode.chunk_grid import ChunkGrid, idle_workers, others_waiting
        from gridnode.chunk_run import pool_runner

        return ChunkGrid(
            self.reactor, store, membership, node_id=node_id, nodes_list=keys.nodes_list(config.env, config.pool),
            parse_presets=media.parse_presets, probe=media.probe,
            run_chunk=pool_runner(self.reactor, media.pool, lambda: media.sandbox, lambda: media.hurried),
            local_free=lambda: idle_workers(media.pool), draining=lambda: jobs.draining,
            others_waiting=lambda job_id: others_waiting(media.pool, job_id),
            gone=lambda member: jobs.adopter.gone(member), scratch=os.path.join(config.work_dir, "scratch", ".chunks"),
            ffmpeg=config.ffmpeg, threads=media.threads, input_limits=media.limits, children_user=lambda: media.user,
            metrics=metrics)

    @inlineCallbacks
    def _ended(self, grid: Any, job: Any, announce: Any) -> Any:
        """A job of ours is final: a chunked one's chunk records and archives go (not before: a
        run again, or an adopter, keeps the chunks done); then its end is announced."""
        if job.chunks:
            try:
                yield grid.end(job.id)
            except GridnodeError as e:
                self._log.warn("job {job}: its chunks not removed ({reason})", job=job.id, reason=e.message)
        if announce is not None:
            yield announce(job)

    @inlineCallbacks
    def _settle(self) -> Any:
        """The configuration with this instance's user-data layered in (--instance-metadata) and
        the node's identity."""
        config = self.config
        if config.instance_metadata:
            from gridnode.instance import fetch_instance

            info = yield fetch_instance(self.reactor, config.instance_metadata)
            config = build_config(file=self._file, user_data=info.user_data, cli=self._cli,
                                  file_path=self._file_path)
            config = config.with_identity(info.instance_id, info.public_hostname or info.local_ipv4)
        else:
            config = config.with_identity()
        self.config = config
        return config

    @inlineCallbacks
    def _membership(self, config: NodeConfig, jobs: JobService, peer_addr: str, metrics: Metrics,
                    ring: KeyringFile | None) -> Any:
        """SWIM over AMP on --peer, keyed from the pool secret, listening (not yet started)."""
        from twisted.internet.endpoints import serverFromString

        from gridnode.membership.service import MembershipService, new_machine
        from gridnode.membership.wire import fixed_keys, peer_key, peer_keys

        if ring is not None:
            keys = peer_keys(lambda: ring.ring().secrets, config.env, config.pool)
        elif is_loopback(config.peer):
            keys = fixed_keys(peer_key(b"", config.env, config.pool))  # a laptop: only this machine reaches it
        else:
            raise ConfigError(f"peer: {config.peer} is reachable from the network, so peers must authenticate: "
                              "set secret-file (a file of at least 16 random bytes, the same on every node)")
        assert config.node_id is not None
        machine = new_machine(config.node_id, peer_addr, first_incarnation(time.time()), time.time())
        service = MembershipService(
            self.reactor, machine, keys, metrics=metrics, stale=config.stale,
        )
        for state in ("alive", "suspect", "dead", "left"):
            metrics.members.labels(state).set_function(_members_in(machine, state))
        yield service.listen(serverFromString(self.reactor, config.peer))
        return service

    def _webhooks(self, config: NodeConfig, store: ObjectStore, metrics: Metrics, jobs: JobService) -> Any:
        """Signed webhooks of jobs' events, where the node has a webhook secret (gridnode/notify/)."""
        if not config.webhook_secret:
            return None
        from gridnode.notify.post import post
        from gridnode.notify.service import Webhooks
        from gridnode.notify.signing import Signer, check_ring
        from gridnode.notify.targets import AddressRule, parse_allow, system_resolver

        ring = self._keyring(config.webhook_secret, "webhook-secret")
        check_ring(ring.ring(), "webhook-secret")
        assert config.node_id is not None
        hooks = Webhooks(self.reactor, store.in_lane(BACKGROUND), config.node_id, Signer(ring.ring),
                         AddressRule(parse_allow(config.webhook_allow)), system_resolver(self.reactor), post,
                         metrics=metrics)
        jobs.webhooks = hooks
        jobs.runner.on_final = hooks.announce_end
        jobs.runner.on_change = hooks.progress
        jobs.adopter.on_ended = hooks.orphan_ended
        hooks.setServiceParent(self)
        return hooks

    def _keyring(self, path: str, setting: str) -> KeyringFile:
        """A keyring file the node follows while it runs (a rotation needs no restart)."""

        def changed(setting: str, ring: Keyring | None, error: str | None) -> None:
            if ring is None:
                self._log.error("{setting}: the changed keyring is not used: {reason}", setting=setting, reason=error)
            else:
                self._log.info("{setting}: keyring read again, keys {keys} (the first signs)", setting=setting,
                               keys=" ".join(k.id for k in ring.keys))

        return KeyringFile(path, setting, on_change=changed)

    def _wire_adoption(self, jobs: JobService, membership: Any, registry: Registry) -> None:
        """Who is gone, who acts on a death or a leave (its watchers, in ring order:
        gridnode/succession.py), whom our released jobs go to, who reads the old marker layout."""
        from gridnode.succession import MANY_HEIRS, Succession, Successor, heirs, is_gone

        machine = membership.machine

        def gone(node: str) -> bool:
            view = machine.member(node)
            listed = {r.id for r in registry.live}
            return is_gone(view.state if view is not None else None, machine.holds_dead(node),
                           (node in listed) if listed else None)

        @inlineCallbacks
        def act(member: str, incarnation: int | None) -> Any:
            if not gone(member):
                return  # back since (a remembered event whose turn came late)
            # each step finds out whether it is done already: a GET of the record, a LIST of the jobs
            if incarnation is not None:
                yield registry.delete_dead(member, incarnation)
            # what does not fit here stays for the next watcher in turn; the last hands it on
            yield jobs.adopter.take_over(member, hand_on=succession.last(member))

        succession = Succession(machine.me, lambda member: machine.watchers_of(member, heirs(machine.down_count())),
                                after=lambda: machine.successors(MANY_HEIRS))
        successor = self._successor = Successor(self.reactor, succession, act)
        membership.on_confirmed_dead = successor.dead
        # a death a peer declared: as one confirmed here (a watcher whose own timer had not run out)
        membership.on_declared_dead = successor.dead
        # a drained node released its unfinished jobs just before it left
        membership.on_left = successor.left
        adopter = jobs.adopter
        adopter.gone = gone
        adopter.members = membership.live_members
        adopter.heir = lambda: next(iter(machine.watchers_of(machine.me)), None)
        adopter.reads_legacy = registry.is_writer

    def _take_sigterm(self) -> None:
        # Only where the reactor installed its own handler (twistd, not tests).
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.shutdown)

    _stopping = False
    #: seconds the parts have in all to stop once the drain is over (each waits for what is left)
    stop_budget = STOP_BUDGET

    @inlineCallbacks
    def shutdown(self) -> Any:
        """SIGTERM: drain (no new uploads, running jobs finish or go back to the pool), then stop.
        A second SIGTERM stops at once: the drain waits no longer, the parts get a second to stop."""
        if self._stopping:
            self._log.warn("second SIGTERM: stopping now")
            self.stop_budget = HURRIED_STOP
            if self._media is not None:
                self._media.hurried = True  # its running ffmpegs are the pool's now: no flush waited for
            if self.view is not None:
                self.view.jobs.hurry()
            return
        self._stopping = True
        if self.view is not None and not self.view.jobs.draining:
            self._log.info("SIGTERM: draining for up to {timeout}s (a second SIGTERM stops at once)",
                           timeout=self.config.drain_timeout)
            try:
                released = yield self.view.jobs.drain(self.config.drain_timeout)
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
        # One part at a time, the last started first (MultiService would stop them all at once):
        # a peer hears we left before our record goes, and ffmpeg is stopped last.
        Service.stopService(self)
        if self._successor is not None:
            self._successor.stop()  # a turn to act on a peer's death that has not come is not ours now
        deadline = self.reactor.seconds() + self.stop_budget
        for part in reversed(list(self)):
            if not part.running:
                continue
            stopping = maybeDeferred(part.stopService)
            if part is self._media:
                yield stopping  # the ffmpeg children must go: its own timers bound it
                continue
            # A part whose stop needs the store (our record's delete, a record write in flight)
            # waits for it no longer than the budget: the store may be down.
            left = max(deadline - self.reactor.seconds(), MIN_PART_STOP)
            stopping.addTimeout(left, self.reactor)
            try:
                yield stopping
            except CancelledError:
                self._log.warn("{part} did not stop within {seconds:.1f}s; stopping the rest",
                               part=type(part).__name__, seconds=left)
            except Exception:  # noqa: BLE001 - stopping anyway
                self._log.failure("{part} failed to stop", part=type(part).__name__)


def _members_in(machine: Any, state: str) -> Any:
    return lambda: sum(1 for v in machine.members() if v.state == state)


def public_host(advertise: str | None, bound: str) -> str:
    """The host others should use: --advertise, else the bound interface (not 0.0.0.0)."""
    if advertise:
        return advertise
    if bound in ("", "0.0.0.0", "::"):
        import socket

        return socket.gethostname()
    return bound
