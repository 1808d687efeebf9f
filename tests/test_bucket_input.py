"""
``POST /jobs`` with a JSON body: the request's parser (gridnode/job_request.py) and a job of an
object already in the bucket (gridnode/bucket_input.py), through a whole node's resource tree
with tokens (tests/test_access.py's `MemoryNode`), tried as an attacker would. Real nodes on S3:
tests/test_jobs_api_nodes.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from gridnode import keys
from gridnode.config import build_config
from gridnode.errors import ConfigError, GridnodeError
from gridnode.job_request import JobRequest
from tests.test_access import ADMIN, ALICE, BOB, MemoryNode, bearer, code, mint

JSON = {"Content-Type": "application/json"}


def post(node: MemoryNode, headers: dict[str, str], body: object) -> object:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return node.request("POST", "/jobs", {**headers, **JSON}, data)


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    n = MemoryNode(tmp_path, Clock())
    n.jobs.config = dataclasses.replace(n.jobs.config, input_prefixes=("incoming/",))
    n.store.backend.put_bytes("incoming/alice/movie.mov", b"alice's video")
    n.store.backend.put_bytes("incoming/bob/clip.mov", b"bob's video")
    n.store.backend.put_bytes("elsewhere/alice/movie.mov", b"not an input")
    return n


class ParseTests:
    def test_a_request(self) -> None:
        asked = JobRequest.parse(b'{"input": {"key": "incoming/a/m.mov"}, "presets": ["poster"], "name": "m"}')
        assert asked.input.key == "incoming/a/m.mov" and asked.presets == ("poster",) and asked.name == "m"
        assert JobRequest.parse(b'{"input": {"key": "k"}}').presets is None
        inline = JobRequest.parse(b'{"input": {"key": "k"}, "outputs": [{"name": "a", "container": "mp4"}]}')
        assert inline.outputs == ({"name": "a", "container": "mp4"},)

    @pytest.mark.parametrize("body", [
        b"", b"not json", b"[]", b'"x"', b"{}", b'{"input": "incoming/a"}', b'{"input": {}}',
        b'{"input": {"key": 5}}', b'{"input": {"key": ""}}', b'{"input": {"key": "k", "url": "http://x"}}',
        b'{"input": {"key": "k"}, "notify": "http://x"}', b'{"input": {"key": "k"}, "presets": "poster"}',
        b'{"input": {"key": "k"}, "presets": []}', b'{"input": {"key": "k"}, "presets": [1]}',
        b'{"input": {"key": "k"}, "input": {"key": "j"}}', b'{"input": {"key": "k"}, "name": 7}',
        b'{"input": {"key": "k"}, "outputs": []}', b'{"input": {"key": "k"}, "outputs": {"name": "a"}}',
        b'{"input": {"key": "k"}, "outputs": [' + b"{}, " * 16 + b'{}]}',
        b'\xff\xfe', b'{"input": {"key": "k"}, "name": "' + b"x" * 300 + b'"}',
    ])
    def test_hostile_bodies(self, body: bytes) -> None:
        """Anything but one object of known fields, each of its type: 400 bad_body."""
        with pytest.raises(GridnodeError) as e:
            JobRequest.parse(body)
        assert (e.value.code, e.value.status) == ("bad_body", 400)

    def test_prefixes_setting(self) -> None:
        """--input-prefixes: folders of the user's own; the node's own prefixes or a bad key refused."""
        assert build_config(cli={"input-prefixes": "incoming, media/raw/"}).input_prefixes == ("incoming/",
                                                                                               "media/raw/")
        for bad in ("jobs/", "inputs", "../x", "a//b", "outputs/x/"):
            with pytest.raises(ConfigError):
                build_config(cli={"input-prefixes": bad})


class BucketInputTests:
    def test_a_job_from_the_bucket(self, node: MemoryNode) -> None:
        """alice's key under incoming/alice/: 201, her job, named after the key; its input is the
        object's bytes and the object stays; it lists and converts as an upload's would."""
        r = post(node, ALICE, {"input": {"key": "incoming/alice/movie.mov"}, "presets": ["poster"]})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["tenant"] == "alice" and job["name"] == "movie.mov" and job["presets"] == ["poster"]
        assert r.headers["location"] == f"/jobs/{job['id']}"
        assert node.store.backend.get_bytes(keys.input_source(job["id"]))[0] == b"alice's video"
        assert node.store.backend.get_bytes("incoming/alice/movie.mov")[0] == b"alice's video"
        assert job["sha256"] == hashlib.sha256(b"alice's video").hexdigest()
        assert [j["id"] for j in node.request("GET", "/jobs", ALICE).json()["jobs"]] == [job["id"]]

    def test_refusals(self, node: MemoryNode, tmp_path: Path) -> None:
        """Outside the prefixes 403 input_forbidden (existing or not); another tenant's key 404, whether
        it exists or not; a missing key 404; a bad key 400; an unknown preset 400; over the token's max_size
        413; a malformed Idempotency-Key 400; nothing is spooled or stored for any of them."""
        before = {i.key for i in node.store.backend.list("").items}
        cases = [
            (ALICE, {"input": {"key": "elsewhere/alice/movie.mov"}}, (403, "input_forbidden")),
            (ALICE, {"input": {"key": "jobs/x.json"}}, (403, "input_forbidden")),
            (BOB, {"input": {"key": "incoming/alice/movie.mov"}}, (404, "not_found")),
            (BOB, {"input": {"key": "incoming/bob/none.mov"}}, (404, "not_found")),
            (ALICE, {"input": {"key": "incoming/alice/../bob/clip.mov"}}, (400, "bad_body")),
            (ALICE, {"input": {"key": "incoming/alice//movie.mov"}}, (400, "bad_body")),
            (ALICE, {"input": {"key": "incoming/alice/movie.mov"}, "presets": ["nope"]}, (400, "unknown_preset")),
            (bearer(mint("alice", "upload", max_size=5)), {"input": {"key": "incoming/alice/movie.mov"}},
             (413, "too_large")),
            (bearer(mint("alice", "upload", presets=["mp4-720p"])),
             {"input": {"key": "incoming/alice/movie.mov"}, "presets": ["poster"]}, (403, "forbidden")),
            (bearer(mint("alice", "read")), {"input": {"key": "incoming/alice/movie.mov"}}, (403, "forbidden")),
            ({}, {"input": {"key": "incoming/alice/movie.mov"}}, (401, "unauthorized")),
            (ALICE, {"input": {"key": "incoming/alice/movie.mov"}, "notify": "https://x.example"}, (400, "bad_body")),
        ]
        for headers, body, want in cases:
            assert code(post(node, headers, body)) == want, body
        r = node.request("POST", "/jobs", {**ALICE, **JSON, "Idempotency-Key": ""},
                         b'{"input": {"key": "incoming/alice/movie.mov"}}')
        assert code(r) == (400, "bad_idempotency_key")
        # whether alice's object exists is not told to bob: the same answer as for a key she lacks
        theirs = post(node, BOB, {"input": {"key": "incoming/alice/movie.mov"}}).json()["error"]["message"]
        absent = post(node, BOB, {"input": {"key": "incoming/alice/other.mov"}}).json()["error"]["message"]
        assert theirs.replace("movie.mov", "other.mov") == absent
        assert {i.key for i in node.store.backend.list("").items} == before and node.spooled() == []

    def test_inline_outputs(self, node: MemoryNode) -> None:
        """``outputs`` in the body: checked before any transfer (a bad spec: 400 bad_spec, nothing
        kept), kept in the job's record for an adopter; a token that names its presets allows none."""
        before = {i.key for i in node.store.backend.list("").items}
        assert code(post(node, ALICE, {"input": {"key": "incoming/alice/movie.mov"},
                                       "outputs": [{"container": "mp4"}]})) == (400, "bad_spec")
        claimed = bearer(mint("alice", "upload", presets=["mp4-720p"]))
        assert code(post(node, claimed, {"input": {"key": "incoming/alice/movie.mov"},
                                         "outputs": [{"name": "mp4-720p"}]})) == (403, "forbidden")
        assert {i.key for i in node.store.backend.list("").items} == before and node.spooled() == []
        r = post(node, ALICE, {"input": {"key": "incoming/alice/movie.mov"}, "outputs": [{"name": "small"}]})
        assert r.status_code == 201, r.text
        record = json.loads(node.store.backend.get_bytes(keys.job_record(r.json()["id"]))[0])
        assert record["spec"] == [{"name": "small"}] and record["presets"] == []

    def test_admin_and_no_prefixes(self, node: MemoryNode) -> None:
        """An admin takes any key under the prefixes; a node without --input-prefixes takes none."""
        r = post(node, ADMIN, {"input": {"key": "incoming/bob/clip.mov"}, "presets": ["poster"]})
        assert r.status_code == 201 and r.json()["tenant"] == "root"
        node.jobs.config = dataclasses.replace(node.jobs.config, input_prefixes=())
        assert code(post(node, ALICE, {"input": {"key": "incoming/alice/movie.mov"}})) == (403, "input_forbidden")

    def test_idempotency_key(self, node: MemoryNode) -> None:
        """The same JSON body with the same key makes one job (the retry answered it, replayed);
        another body with that key is 422 idempotency_key_reused; bob's same key is his own."""
        body = json.dumps({"input": {"key": "incoming/alice/movie.mov"}, "presets": ["poster"]}).encode()
        keyed = {**ALICE, **JSON, "Idempotency-Key": "movie-1"}
        first = node.request("POST", "/jobs", keyed, body)
        again = node.request("POST", "/jobs", keyed, body)
        assert first.status_code == again.status_code == 201, again.text
        assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        other = json.dumps({"input": {"key": "incoming/alice/movie.mov"}, "presets": ["mp4-720p"]}).encode()
        assert code(node.request("POST", "/jobs", keyed, other)) == (422, "idempotency_key_reused")
        bobs = json.dumps({"input": {"key": "incoming/bob/clip.mov"}}).encode()
        r = node.request("POST", "/jobs", {**BOB, **JSON, "Idempotency-Key": "movie-1"}, bobs)
        assert r.status_code == 201 and r.json()["id"] != first.json()["id"]
        assert len(node.request("GET", "/jobs", ALICE).json()["jobs"]) == 1
