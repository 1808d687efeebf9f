"""
``Idempotency-Key`` on POST /jobs and tus creation, on a node's whole HTTP side in memory
(tests/test_access.py's `MemoryNode`: tokens for alice and bob, memory store, fake media, a
Clock). Real nodes, a cut connection and a retry on another node: tests/test_idempotency_nodes.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gridnode import idempotency, keys
from gridnode.errors import GridnodeError
from gridnode.idempotency import JOB, Claim, Entry, Found, Intent, Ledger
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.test_access import ALICE, BOB, MemoryNode, code
from tests.test_tus import READ, STREAM, TUS, Response, metadata, parse_answer, request_bytes, result

BODY = b"video bytes, the first try"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(tmp_path: Path, clock: Clock) -> MemoryNode:
    return MemoryNode(tmp_path, clock)


def post(node: MemoryNode, who: dict[str, str], key: str | None, body: bytes = BODY,
         name: str = "clip.mov") -> Response:
    headers = {**who, "Content-Type": "application/octet-stream"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return node.request("POST", f"/jobs?presets=poster&name={name}", headers, body)


def create(node: MemoryNode, who: dict[str, str], key: str, length: int = 30, body: bytes = b"",
           filename: str = "clip.mov") -> Response:
    headers = {**who, **(STREAM if body else TUS), "Upload-Length": str(length),
               "Upload-Metadata": metadata(filename=filename), "Idempotency-Key": key}
    return node.request("POST", "/files/", headers, body)


def entries(node: MemoryNode) -> list[str]:
    return [i.key for i in node.store.backend.list(keys.idempotency_prefix()).items]


class Connection:
    """A request sent in pieces, to interleave two of them."""

    def __init__(self, node: MemoryNode) -> None:
        self.channel = node.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        for at in range(0, len(data), READ):
            self.channel.dataReceived(data[at:at + READ])

    def answer(self, method: str = "POST") -> Response:
        answer = parse_answer(self.transport.value(), method)
        self.channel.connectionLost(Failure(ConnectionDone()))
        return answer


class KeyTests:
    @pytest.mark.parametrize("raw", [b"", b"k" * 256, b"a\nb", b"a\rb", b"a\x00b", b"tab\there", b"del\x7f",
                                     "caf\u00e9".encode()])
    def test_bad_keys_are_refused(self, raw: bytes) -> None:
        """Empty, over 255 bytes, control or non-ASCII characters: 400 bad_idempotency_key."""
        with pytest.raises(GridnodeError) as e:
            idempotency.parse_key([raw])
        assert (e.value.status, e.value.code) == (400, "bad_idempotency_key")

    def test_one_key_only(self) -> None:
        """Two Idempotency-Key headers: refused, not one of them picked."""
        with pytest.raises(GridnodeError, match="more than once"):
            idempotency.parse_key([b"a", b"b"])
        assert idempotency.parse_key(None) is None
        assert idempotency.parse_key([b"k" * 255]) == "k" * 255

    @given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
    def test_tenants_are_namespaces(self, tenant_a: str, key_a: str, tenant_b: str, key_b: str) -> None:
        """Two (tenant, key) pairs share an entry only when both are equal (no "a"+"bc" = "ab"+"c"),
        and every entry's name is a valid store key."""
        a, b = Intent.of(tenant_a, key_a, JOB), Intent.of(tenant_b, key_b, JOB)
        assert (a.object_key == b.object_key) == ((tenant_a, key_a) == (tenant_b, key_b))
        assert keys.check_key(a.object_key).startswith("idempotency/")


class LedgerTests:
    """The decisions, on a memory store and a settable clock."""

    def setup_method(self) -> None:
        self.now = 1000.0
        self.store = ObjectStore.synchronous(MemoryBackend())
        self.ledger = Ledger(self.store, now=lambda: self.now)
        self.intent = Intent.of("alice", "k1", JOB, length=10)
        self.jobs: dict[str, str] = {}

    def fetch(self, target: str) -> Any:
        from twisted.internet.defer import succeed

        return succeed(self.jobs.get(target))

    def find(self, intent: Intent | None = None) -> Any:
        return result(self.ledger.find(intent or self.intent, self.fetch))

    def test_claim_then_find(self) -> None:
        """A claimed key finds its work; a claim that loses the race is a Replay of the winner's."""
        claim = self.find()
        assert isinstance(claim, Claim) and claim.replaces is None
        target = keys.new_id()
        result(claim.claim(target))
        self.jobs[target] = "job"
        assert self.find() == Found(target, "job")
        late = Claim(self.ledger, self.intent, None)
        with pytest.raises(idempotency.Replay) as e:
            result(late.claim(keys.new_id()))
        assert e.value.target == target

    def test_another_request_under_the_key(self) -> None:
        """The same key with another request: 422 idempotency_key_reused, at lookup and at claim."""
        result(self.find().claim(keys.new_id()))
        other = Intent.of("alice", "k1", JOB, length=11)
        with pytest.raises(GridnodeError) as e:
            self.find(other)
        assert (e.value.status, e.value.code) == (422, "idempotency_key_reused")
        with pytest.raises(GridnodeError, match="different request"):
            result(Claim(self.ledger, other, None).claim(keys.new_id()))

    def test_work_not_found_yet_then_never(self) -> None:
        """An entry whose work cannot be read: 409 in use (Retry-After) while it may be being accepted, then
        free, overwritten conditionally on its ETag."""
        result(self.find().claim(keys.new_id()))
        with pytest.raises(idempotency.KeyInUse) as e:
            self.find()
        assert e.value.status == 409 and e.value.retry_after == idempotency.RETRY_AFTER
        self.now += idempotency.PENDING
        claim = self.find()
        assert isinstance(claim, Claim) and claim.replaces is not None
        result(claim.claim(keys.new_id()))

    def test_a_day_later_the_key_is_free(self) -> None:
        """After 24 h a key makes new work, even for another request."""
        target = keys.new_id()
        result(self.find().claim(target))
        self.jobs[target] = "job"
        self.now += idempotency.TTL
        claim = self.find(Intent.of("alice", "k1", JOB, length=99))
        assert isinstance(claim, Claim)
        result(claim.claim(keys.new_id()))

    def test_release_frees_the_key(self) -> None:
        """Work refused after its claim releases the entry: the retry is not held up."""
        claim = self.find()
        result(claim.claim(keys.new_id()))
        result(claim.release())
        assert isinstance(self.find(), Claim)
        assert self.store.backend.list("idempotency/").items == []

    def test_unreadable_entry_is_overwritten(self) -> None:
        """Garbage under a key's name is replaced, not a 500."""
        self.store.backend.put_bytes(self.intent.object_key, b"{not json")
        claim = self.find()
        assert isinstance(claim, Claim) and claim.replaces is not None
        result(claim.claim(keys.new_id()))
        data, _ = self.store.backend.get_bytes(self.intent.object_key)
        assert Entry.loads(data).request == self.intent.request


class JobsTests:
    def test_retry_answers_the_same_job_without_reading_the_body(self, node: MemoryNode) -> None:
        """The retry of a POST /jobs: 201 again, the same job (Location, body), Idempotent-Replayed, before its
        body is read: no second job, nothing new spooled; one entry in the store."""
        first = post(node, ALICE, "upload-1")
        assert first.status_code == 201, first.text
        job = first.json()["id"]
        assert "Idempotent-Replayed" not in first.headers
        spooled = node.spooled()
        again = post(node, ALICE, "upload-1")
        assert again.status_code == 201, again.text
        assert again.json()["id"] == job and again.headers["Location"] == f"/jobs/{job}"
        assert again.headers["Idempotent-Replayed"] == "true" and again.headers["Connection"] == "close"
        assert list(node.jobs.active) == [job] and node.spooled() == spooled
        assert len(entries(node)) == 1
        replays = node.jobs.metrics.registry.get_sample_value("gridnode_idempotent_replays_total", {"kind": "job"})
        assert replays == 1

    def test_another_tenant_with_the_same_key_gets_its_own_job(self, node: MemoryNode) -> None:
        """bob sending alice's key string makes bob's own job; alice's is never answered to him."""
        alices = post(node, ALICE, "shared").json()["id"]
        r = post(node, BOB, "shared")
        assert r.status_code == 201 and r.json()["id"] != alices and r.json()["tenant"] == "bob"
        assert "Idempotent-Replayed" not in r.headers
        assert post(node, BOB, "shared").json()["id"] == r.json()["id"]

    def test_same_key_another_body(self, node: MemoryNode) -> None:
        """The same key with another length or name: 422 idempotency_key_reused before the body; no job."""
        post(node, ALICE, "k")
        for r in (post(node, ALICE, "k", body=BODY + b"!"), post(node, ALICE, "k", name="other.mov")):
            assert code(r) == (422, "idempotency_key_reused")
        assert len(node.jobs.active) == 1

    def test_hostile_keys(self, node: MemoryNode) -> None:
        """A huge key, or one with a control character: 400 bad_idempotency_key before the body; nothing
        spooled or stored; the node goes on. (A bare newline ends the header line: twisted.web answers 400
        before any of this.)"""
        assert code(post(node, ALICE, "k" * 10_000, body=b"x" * 200_000)) == (400, "bad_idempotency_key")
        assert code(post(node, ALICE, "a\x01b")) == (400, "bad_idempotency_key")
        assert node.spooled() == [] and entries(node) == []
        # A key folded over two lines (obs-fold) arrives as one line: "a b", a key like any other.
        head = request_bytes("POST", "/jobs?presets=poster&name=clip.mov",
                             {**ALICE, "Idempotency-Key": "a", "Content-Type": "application/octet-stream"}, len(BODY))
        folded = head.replace(b"Idempotency-Key: a\r\n", b"Idempotency-Key: a\r\n b\r\n")
        r = parse_answer(node.raw("POST", "", data=folded + BODY), "POST")
        assert r.status_code == 201, r.text
        assert post(node, ALICE, "a b").json()["id"] == r.json()["id"]
        assert post(node, ALICE, "fine").status_code == 201

    def test_a_refused_job_does_not_hold_its_key(self, node: MemoryNode) -> None:
        """A job refused (not a video) leaves no entry: the retry with the same key is accepted."""
        node.media.probe_error = GridnodeError("not a video", code="not_a_video", status=422)
        assert code(post(node, ALICE, "k")) == (422, "not_a_video")
        node.media.probe_error = None
        assert entries(node) == []
        assert post(node, ALICE, "k").status_code == 201

    def test_racing_requests_with_one_key_make_one_job(self, node: MemoryNode) -> None:
        """Two requests with one key, both looked up before either was accepted: the second to be accepted
        drops its job and answers the first's (201, Idempotent-Replayed); one job, one spooled input."""
        head = request_bytes("POST", "/jobs?presets=poster&name=clip.mov",
                             {**ALICE, "Idempotency-Key": "race", "Content-Type": "application/octet-stream"},
                             len(BODY))
        slow = Connection(node)
        slow.send(head + BODY[:5])  # looked up, admitted, its body still arriving
        fast = Connection(node)
        fast.send(head + BODY)
        won = fast.answer()
        assert won.status_code == 201
        slow.send(BODY[5:])
        lost = slow.answer()
        assert lost.status_code == 201, lost.text
        assert lost.json()["id"] == won.json()["id"] and lost.headers["Idempotent-Replayed"] == "true"
        assert list(node.jobs.active) == [won.json()["id"]]
        assert node.jobs.metrics.registry.get_sample_value("gridnode_idempotent_replays_total", {"kind": "job"}) == 1
        assert all(name.startswith(won.json()["id"]) for name in node.spooled())
        assert not node.jobs.uploading

    def test_pending_then_a_day_later(self, node: MemoryNode, clock: Clock) -> None:
        """An entry whose job cannot be found (its node died accepting it): 409 idempotency_key_in_use with
        Retry-After for a minute, then a new job; 24 h on, the key makes another."""
        intent = Intent.of("alice", "k", JOB, length=len(BODY), name=["clip.mov"], presets=["poster"], checksum=None)
        node.store.backend.put_bytes(intent.object_key, Entry(keys.new_id(), intent.request, clock.seconds()).dumps())
        r = post(node, ALICE, "k")
        assert code(r) == (409, "idempotency_key_in_use") and r.headers["Retry-After"] == "2"
        clock.advance(idempotency.PENDING)
        first = post(node, ALICE, "k")
        assert first.status_code == 201 and post(node, ALICE, "k").json()["id"] == first.json()["id"]
        clock.advance(idempotency.TTL)
        assert post(node, ALICE, "k").json()["id"] != first.json()["id"]

    def test_a_draining_node_still_answers_a_retry(self, node: MemoryNode) -> None:
        """The key is looked up before admission: a draining node answers a retry (201, the job, for POST /jobs;
        the upload for tus) and refuses new work (503 busy)."""
        job = post(node, ALICE, "k").json()["id"]
        upload = create(node, ALICE, "t").headers["Location"]
        node.jobs.draining = True
        assert post(node, ALICE, "k").json()["id"] == job
        assert create(node, ALICE, "t").headers["Location"] == upload
        assert code(post(node, ALICE, "new")) == (503, "busy")
        assert code(create(node, ALICE, "new-t")) == (503, "busy")

    def test_without_a_key_nothing_changes(self, node: MemoryNode) -> None:
        """No header: two POSTs, two jobs, nothing under idempotency/."""
        assert post(node, ALICE, None).json()["id"] != post(node, ALICE, None).json()["id"]
        assert entries(node) == []


class TusTests:
    def test_retried_creation_answers_the_same_upload(self, node: MemoryNode) -> None:
        """A retried creation: 201, the same Location, the upload's offset now; bob's same key string makes
        his own upload."""
        first = create(node, ALICE, "tus-1")
        assert first.status_code == 201, first.text
        location = first.headers["Location"]
        upload_id = location.rsplit("/", 1)[1]
        r = node.request("PATCH", location, {**ALICE, **STREAM, "Upload-Offset": "0"}, b"x" * 10)
        assert r.status_code == 204, r.text
        again = create(node, ALICE, "tus-1")
        assert again.status_code == 201 and again.headers["Location"] == location
        assert again.headers["Upload-Offset"] == "10" and again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Tus-Resumable"] == "1.0.0"
        bobs = create(node, BOB, "tus-1")
        assert bobs.status_code == 201 and bobs.headers["Location"] != location
        assert len([k for k in node.store.backend.list("uploads/").items if k.key.endswith("/info")]) == 2
        assert keys.is_id(upload_id)

    def test_retried_creation_with_upload_of_the_whole_file(self, node: MemoryNode) -> None:
        """A creation-with-upload that completed the upload, retried: the same Location, the whole length as
        offset and the job's id; its body is not read; one job."""
        body = b"v" * 30
        first = create(node, ALICE, "whole", body=body)
        assert first.status_code == 201 and "Gridnode-Job" in first.headers, first.text
        again = create(node, ALICE, "whole", body=body)
        assert again.status_code == 201 and again.headers["Location"] == first.headers["Location"]
        assert again.headers["Upload-Offset"] == "30" and again.headers["Gridnode-Job"] == first.headers["Gridnode-Job"]
        assert list(node.jobs.active) == [first.headers["Gridnode-Job"]]

    def test_same_key_another_upload(self, node: MemoryNode) -> None:
        """Another Upload-Length or file name under the key: 422 idempotency_key_reused; a bad key: 400."""
        create(node, ALICE, "k")
        assert code(create(node, ALICE, "k", length=31)) == (422, "idempotency_key_reused")
        assert code(create(node, ALICE, "k", filename="b.mov")) == (422, "idempotency_key_reused")
        assert code(create(node, ALICE, "k" * 300)) == (400, "bad_idempotency_key")
        assert code(post(node, ALICE, "k")) == (422, "idempotency_key_reused")  # another endpoint, too

    def test_racing_creations_with_upload(self, node: MemoryNode) -> None:
        """Two creation-with-upload requests with one key: the loser's chunk is dropped and it answers the
        winner's upload and offset; one upload in the store."""
        headers = {**ALICE, **STREAM, "Upload-Length": "40", "Idempotency-Key": "race"}
        head = request_bytes("POST", "/files/", headers, 10)
        slow = Connection(node)
        slow.send(head + b"a" * 4)
        fast = Connection(node)
        fast.send(head + b"b" * 10)
        won = fast.answer()
        assert won.status_code == 201 and won.headers["Upload-Offset"] == "10", won.text
        slow.send(b"a" * 6)
        lost = slow.answer()
        assert lost.status_code == 201, lost.text
        assert lost.headers["Location"] == won.headers["Location"] and lost.headers["Upload-Offset"] == "10"
        assert len([i for i in node.store.backend.list("uploads/").items if i.key.endswith("/info")]) == 1
        assert not node.jobs.uploading
        assert json.loads(node.store.backend.get_bytes(entries(node)[0])[0])["target"] in won.headers["Location"]
