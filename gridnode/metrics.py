"""
Prometheus metrics of one node, on a registry of its own (several nodes can
live in one test process). ``GET /metrics`` serves them in the text format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

_DURATIONS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
_STORE = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.jobs_finished = Counter("gridnode_jobs_finished", "Jobs that reached a final state here",
                                     ["state", "preset"], registry=r)
        self.jobs_accepted = Counter("gridnode_jobs_accepted", "Uploads accepted as jobs", ["preset"], registry=r)
        self.jobs_adopted = Counter("gridnode_jobs_adopted", "Orphaned jobs this node claimed", registry=r)
        self.jobs_active = Gauge("gridnode_jobs_active", "Jobs on this node by state", ["state"], registry=r)
        self.jobs_purged = Counter("gridnode_jobs_purged", "Jobs purged through this node (DELETE ?purge=true)",
                                   registry=r)
        self.retention_deleted = Counter("gridnode_retention_deleted", "Jobs whose input or outputs this node's "
                                         "retention sweep deleted", ["what"], registry=r)
        self.job_seconds = Histogram("gridnode_job_duration_seconds", "Accepted to final state",
                                     ["state"], buckets=_DURATIONS, registry=r)
        self.phase_seconds = Histogram("gridnode_job_phase_duration_seconds",
                                       "Time in each phase: probe, store_input, queue, transcode, store_outputs",
                                       ["phase"], buckets=_DURATIONS, registry=r)
        self.ffmpeg_speed = Histogram("gridnode_ffmpeg_speed_ratio", "Seconds of input converted per second",
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.scratch_full = Counter("gridnode_scratch_full", "Jobs that found too little scratch space: held "
                                    "before ffmpeg (start) or ffmpeg ran out (run)", ["when"], registry=r)
        self.scratch_waiting = Gauge("gridnode_jobs_waiting_scratch", "Jobs waiting for scratch space",
                                     registry=r)
        self.queue_length = Gauge("gridnode_queue_length", "Jobs waiting for a worker", registry=r)
        # the `queue` setting, so an alert can say "near full" without knowing each node's config
        self.queue_capacity = Gauge("gridnode_queue_capacity", "Jobs that may wait for a worker (queue)",
                                    registry=r)
        self.workers_busy = Gauge("gridnode_workers_busy", "Workers running ffmpeg", registry=r)
        self.workers = Gauge("gridnode_workers", "Configured workers", registry=r)
        self.upload_bytes = Counter("gridnode_upload_bytes", "Upload body bytes received", registry=r)
        self.upload_rejections = Counter("gridnode_upload_rejections", "Uploads refused, by error code",
                                         ["reason"], registry=r)
        self.idempotent_replays = Counter("gridnode_idempotent_replays", "Requests answered with the job or upload "
                                          "their Idempotency-Key made before, by kind", ["kind"], registry=r)
        self.auth_refusals = Counter("gridnode_auth_refusals", "Requests refused for their token, by error code",
                                     ["code"], registry=r)
        self.store_seconds = Histogram("gridnode_store_operation_duration_seconds", "Store calls",
                                       ["operation"], buckets=_STORE, registry=r)
        self.store_errors = Counter("gridnode_store_errors", "Failed store calls", ["operation", "code"],
                                    registry=r)
        self.store_token_wait = Histogram("gridnode_store_token_wait_seconds", "Time store calls waited for a "
                                          "token of the node's request budget (--store-rate), by lane",
                                          ["lane"], buckets=_STORE, registry=r)
        self.store_waiting = Gauge("gridnode_store_waiting", "Store calls waiting for a token now, by lane",
                                   ["lane"], registry=r)
        self.store_rate = Gauge("gridnode_store_rate", "Store requests a second this node may send now "
                                "(--store-rate, or its share of the pool's)", registry=r)
        self.store_throttled = Counter("gridnode_store_throttled", "Store answers that asked us to slow down "
                                       "(S3's 503 SlowDown), each try; botocore retries them",
                                       ["operation"], registry=r)
        self.webhook_deliveries = Counter("gridnode_webhook_deliveries", "Webhook attempts by event and result "
                                          "(delivered, rejected, unreachable, refused, gave_up)",
                                          ["event", "result"], registry=r)
        self.members = Gauge("gridnode_members", "Membership view by state", ["state"], registry=r)
        self.probes = Counter("gridnode_probes", "Peer probes sent", ["result"], registry=r)
        self.suspicions = Counter("gridnode_suspicions", "Peers this node began to suspect", registry=r)
        self.host_checks = Counter("gridnode_peer_host_checks", "Checks of a suspect peer's kernel, by verdict",
                                   ["verdict"], registry=r)
        self.refutations = Counter("gridnode_refutations", "Suspicions of this node it refuted", registry=r)
        self.deaths = Counter("gridnode_dead_declarations", "Peers this node declared dead", ["confirmed"],
                              registry=r)
        self.peer_dropped = Counter("gridnode_peer_messages_dropped", "Peer messages dropped", ["reason"],
                                    registry=r)
        # chunks run by the pool: this node's jobs' (the owner's side), and peers' made here
        self.chunks_finished = Counter("gridnode_chunks_finished", "Chunks of this node's jobs by how they ended: "
                                       "made_here, collected (a peer's), failed (code), cancelled",
                                       ["result", "code"], registry=r)
        self.chunks_redone = Counter("gridnode_chunks_redone", "Chunks of this node's jobs open again: "
                                     "lost_holder (it died), bad_archive", ["reason"], registry=r)
        self.chunk_offers_sent = Counter("gridnode_chunk_offers_sent", "Offers of this node's chunks sent to "
                                         "idle peers", registry=r)
        self.peer_chunk_offers = Counter("gridnode_peer_chunk_offers", "Peers' chunks offered here, by answer: "
                                         "claimed, busy, taken, ended, bad_record", ["answer"], registry=r)
        self.peer_chunks_finished = Counter("gridnode_peer_chunks_finished", "Peers' chunks claimed here by how "
                                            "they ended: done, failed, released, lost (reason: the failure's "
                                            "code, or why released)", ["result", "reason"], registry=r)
        self.peer_chunk_seconds = Histogram("gridnode_peer_chunk_duration_seconds", "A peer's chunk here, claim "
                                            "to end", ["result"], buckets=_DURATIONS, registry=r)
        self.peer_chunks_running = Gauge("gridnode_peer_chunks_running", "Peers' chunks claimed here and not "
                                         "ended", registry=r)

    def bind_load(self, load: Callable[[], dict[str, float]]) -> None:
        """Gauges read from the job service when scraped."""
        self.queue_length.set_function(lambda: load().get("queued", 0.0))
        self.workers_busy.set_function(lambda: load().get("running", 0.0))
        self.workers.set_function(lambda: load().get("workers", 0.0))

    def bind_tenants(self, jobs: Callable[[], Iterable[Any]]) -> None:
        """``gridnode_tenant_jobs{tenant, state}``: the node's jobs (anything with ``tenant`` and
        ``state``) by tenant, queued or running, read when scraped. Only tenants with a job here
        have a series, so the labels are bounded by the jobs a node holds, and a tenant's series
        goes when its last job does."""
        self.registry.register(_TenantJobs(jobs))

    def bind_gate(self, gate: Any) -> None:
        """The store's request gate (gridnode/store/rate.py): its waits, queues and rate."""
        from gridnode.store.rate import LANES

        gate.waited = lambda lane, seconds: self.store_token_wait.labels(lane).observe(seconds)
        for lane in LANES:
            self.store_waiting.labels(lane).set_function(partial(gate.waiting, lane))
        self.store_rate.set_function(lambda: gate.rate)

    def timed_store(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap an ObjectStore runner so each call is timed and its errors counted."""
        import time

        from gridnode.errors import GridnodeError

        def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            name = getattr(fn, "__name__", "call")
            started = time.monotonic()

            def done(result: Any) -> Any:
                self.store_seconds.labels(name).observe(time.monotonic() - started)
                return result

            def failed(failure: Any) -> Any:
                self.store_seconds.labels(name).observe(time.monotonic() - started)
                code = failure.value.code if isinstance(failure.value, GridnodeError) else "error"
                if code != "not_found":
                    self.store_errors.labels(name, code).inc()
                return failure

            return run(fn, *args, **kwargs).addCallbacks(done, failed)

        return timed


class _TenantJobs:
    """A collector of the jobs by tenant (prometheus_client's custom collector protocol)."""

    NAME = "gridnode_tenant_jobs"

    def __init__(self, jobs: Callable[[], Iterable[Any]]) -> None:
        self.jobs = jobs

    def describe(self) -> list[Any]:
        return [GaugeMetricFamily(self.NAME, _TENANT_HELP, labels=["tenant", "state"])]

    def collect(self) -> Iterator[Any]:
        counts: dict[tuple[str, str], int] = {}
        for job in self.jobs():
            state = "running" if job.state in ("transcoding", "storing") else "queued"
            counts[(job.tenant, state)] = counts.get((job.tenant, state), 0) + 1
        family = GaugeMetricFamily(self.NAME, _TENANT_HELP, labels=["tenant", "state"])
        for (tenant, state), n in sorted(counts.items()):
            family.add_metric([tenant, state], n)
        yield family


_TENANT_HELP = "Jobs on this node by tenant (the token's sub; empty without tokens): queued or running"
