"""
A store that asks the node to slow down (S3's ``503 SlowDown``), on fakes: the
S3 backend's translation and count of it (botocore's Stubber, no socket), and
lease renewals that outlast a throttling spell, so no healthy job looks orphaned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.errors import StorageUnavailable
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectInfo, ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.fakes import FakeMedia


class ThrottledBackend(MemoryBackend):
    """A memory store that, while ``throttled``, refuses every write of a job record as the S3
    backend does once botocore's retries of ``503 SlowDown`` are spent."""

    def __init__(self) -> None:
        super().__init__()
        self.throttled = False
        self.refused = 0

    def put_bytes(self, key: str, data: bytes, **kw: Any) -> ObjectInfo:
        if self.throttled and key.startswith("jobs/"):
            self.refused += 1
            raise StorageUnavailable(f"s3://b/ asks this node to slow down (SlowDown on PutObject {key}) after "
                                     "retries; the node tries again later (see --store-rate)")
        return super().put_bytes(key, data, **kw)


class RenewalTests:
    @pytest.fixture(autouse=True)
    def fresh(self, tmp_path: Path) -> None:
        self.setup(tmp_path)

    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.backend = ThrottledBackend()
        self.tmp = tmp_path

    def service(self, node: str, store: ObjectStore | None = None, seed: int = 1) -> tuple[JobService, FakeMedia]:
        media = FakeMedia(self.tmp)
        config = build_config(cli={"work-dir": str(self.tmp / node), "workers": 2, "queue": 2, "min-free": 0,
                                   "job-lease": 30}).with_identity(node)
        svc = JobService(self.clock, config, store or ObjectStore.synchronous(self.backend), media,
                         now=self.clock.seconds, rng=random.Random(seed))
        return svc, media

    def upload(self, svc: JobService, media: FakeMedia) -> Any:
        spool = svc.admit(5)
        spool.write(b"video")
        results: list[Any] = []
        svc.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(results.append)
        job = results[0]
        media.hooks[job.id][0]()  # transcoding
        return job

    def record(self, job_id: str) -> dict[str, Any]:
        return json.loads(self.backend.get_bytes(f"jobs/{job_id}.json")[0])

    def test_a_throttling_spell_shorter_than_the_lease_adopts_nothing(self, tmp_path: Path) -> None:
        """The store refuses record writes (SlowDown) from 5 s after the job's last write until 2 s
        before its lease would run out, longer than a renewal round: the renewal tries again
        after short jittered waits and lands once the spell ends, so a peer scanning every second
        never finds the lease run out, whatever the rounds' jitter (8 seeds). Renewals tried once
        a round lost the job on some: their next round came after the lease."""
        for seed in range(8):
            self.setup(tmp_path / str(seed))
            n1, m1 = self.service("n1", seed=seed)
            job = self.upload(n1, m1)
            written = self.record(job.id)["lease_until"]
            n1.startService()
            n2, _ = self.service("n2", seed=100 + seed)
            claimed: list[Any] = []
            for tick in range(4 * 90):
                self.clock.advance(0.25)
                self.backend.throttled = 1005 <= self.clock.seconds() < written - 2
                if tick % 4 == 0:
                    n2.adopt_orphans().addBoth(claimed.append)
            assert self.backend.refused > 1  # it was tried during the spell
            assert claimed == [0] * 90 and job.id not in n2.active, seed
            record = self.record(job.id)
            assert record["node"] == "n1" and record["attempts"] == 1
            assert record["lease_until"] > self.clock.seconds()
            n1.stopService()

    def test_a_renewal_gives_up_after_a_lease(self) -> None:
        """A spell longer than the lease: the round's retries end a lease after it began (the
        record has run out by then anyway) and the next round tries afresh; nothing is left on the
        clock once the service stops."""
        n1, m1 = self.service("n1")
        job = self.upload(n1, m1)
        n1.startService()
        self.backend.throttled = True
        for _ in range(4 * 120):
            self.clock.advance(0.25)
        refused = self.backend.refused
        assert refused >= 8
        self.backend.throttled = False
        for _ in range(4 * 20):
            self.clock.advance(0.25)
        assert self.record(job.id)["lease_until"] > self.clock.seconds()
        stopped: list[Any] = []
        n1.stopService().addCallback(stopped.append)
        assert stopped == [None] and self.clock.getDelayedCalls() == []

    def test_one_slow_renewal_does_not_hold_back_the_others(self) -> None:
        """A renewal whose write the store does not answer (held in botocore's retries) must not
        hold back the renewal of the node's other jobs: they are renewed together."""
        hung: list[str] = []

        def run(fn: Any, *args: Any, **kw: Any) -> Deferred[Any]:
            if getattr(fn, "__name__", "") == "put_bytes" and hung and args[0] == f"jobs/{hung[0]}.json":
                return Deferred()  # never answered
            try:
                return succeed(fn(*args, **kw))
            except Exception as e:  # noqa: BLE001 - as ObjectStore.synchronous
                return fail(e)

        n1, m1 = self.service("n1", store=ObjectStore(self.backend, run))
        first, second = self.upload(n1, m1), self.upload(n1, m1)
        hung.append(first.id)
        before = self.record(second.id)["lease_until"]
        self.clock.advance(5)
        n1.runner.renew_leases()
        assert self.record(second.id)["lease_until"] > before


# urllib3 probes for IPv6 by making (not connecting) a socket when botocore first imports it
@pytest.mark.filterwarnings("ignore:A test tried to use socket.socket")
class S3SlowDownTests:
    @pytest.fixture
    def stubbed(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        from botocore.stub import Stubber

        from gridnode.store.s3 import S3Backend

        for name, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s"),
                            ("AWS_EC2_METADATA_DISABLED", "true")):
            monkeypatch.setenv(name, value)
        throttled: list[str] = []
        backend = S3Backend("b", endpoint_url="http://127.0.0.1:9", on_throttled=throttled.append)
        with Stubber(backend._client) as stub:
            yield backend, stub, throttled
        backend.close()

    def test_slowdown_after_retries_is_storage_unavailable(self, stubbed: Any) -> None:
        """A SlowDown that outlasts botocore's retries is `storage_unavailable` (the node waits and
        tries again; a client is told 503 with Retry-After), saying the store asks to slow down."""
        backend, stub, _ = stubbed
        stub.add_client_error("put_object", service_error_code="SlowDown", service_message="Please reduce your "
                              "request rate.", http_status_code=503)
        with pytest.raises(StorageUnavailable) as e:
            backend.put_bytes("jobs/x.json", b"{}")
        assert "slow down" in e.value.message and "SlowDown" in e.value.message

    def test_every_throttled_answer_is_counted(self, stubbed: Any) -> None:
        """Each answer S3 gives is seen (each try of a call, botocore's retries included): the 503
        SlowDown ones are counted by operation, the others not."""
        backend, _, throttled = stubbed
        events = backend._client.meta.events
        events.emit("response-received.s3.PutObject", parsed_response={"Error": {"Code": "SlowDown"}},
                    response_dict={"status_code": 503}, context={}, exception=None)
        events.emit("response-received.s3.GetObject", parsed_response={"Error": {"Code": "NoSuchKey"}},
                    response_dict={"status_code": 404}, context={}, exception=None)
        events.emit("response-received.s3.ListObjectsV2", parsed_response=None, response_dict=None, context={},
                    exception=ConnectionError("reset"))
        events.emit("response-received.s3.HeadObject", parsed_response={}, response_dict={"status_code": 503},
                    context={}, exception=None)
        assert throttled == ["PutObject", "HeadObject"]
