"""
A store that asks the node to slow down (S3's ``503 SlowDown``), on fakes: the
S3 backend's translation and count of it (botocore's Stubber, no socket), and
a throttling spell of any length: nothing is renewed, so nothing is lost to it
and no healthy job looks orphaned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
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


class ThrottlingTests:
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

    def test_a_spell_of_ten_leases_adopts_nothing_and_writes_nothing_more(self) -> None:
        """The store refuses every record write for ten times the old lease while a job runs: its
        owner sends no record write in that time (nothing is renewed), its peer's looks at its own
        markers and a takeover of the owner's (the owner is not gone) claim nothing, and the job
        ends done on its owner, attempt 1."""
        n1, m1 = self.service("n1")
        n2, _ = self.service("n2", seed=2)
        job = self.upload(n1, m1)
        n1.startService()
        n2.startService()
        self.backend.throttled = True
        claimed: list[Any] = []
        for _ in range(300):
            self.clock.advance(1)
            if self.clock.seconds() % 15 == 0:
                n2.adopter.take_over("n1").addBoth(claimed.append)
        assert self.backend.refused == 0 and set(claimed) == {0} and not n2.active
        self.backend.throttled = False
        m1.finish(job.id)
        record = self.record(job.id)
        assert (record["state"], record["node"], record["attempts"]) == ("done", "n1", 1)

    def test_a_state_write_refused_in_a_spell_lands_after_it(self) -> None:
        """The job ends while the store throttles: its last record write is retried (jittered
        waits) until the spell ends, then lands; nobody adopted the job meanwhile."""
        n1, m1 = self.service("n1")
        job = self.upload(n1, m1)
        self.backend.throttled = True
        m1.finish(job.id)
        for _ in range(120):
            self.clock.advance(1)
        assert self.backend.refused >= 2 and self.record(job.id)["state"] == "transcoding"
        self.backend.throttled = False
        for _ in range(60):
            self.clock.advance(1)
        assert self.record(job.id)["state"] == "done" and job.id not in n1.active


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
