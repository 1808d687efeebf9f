"""
Authorization over HTTP (gridnode/web/access.py): the route table, and a whole
node's resource tree behind a real GridSite driven in memory (the memory store,
fake media, a task.Clock; no sockets), with tokens minted by PyJWT, not by
gridnode's code. The same flows against a real twistd node: tests/test_auth_nodes.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from gridnode.config import build_config
from gridnode.keyring import KeyringFile
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.uploads.store import UploadStore
from gridnode.web.access import Access, need, redact_uri, redacted_log_line, segments
from gridnode.web.api import api_root
from gridnode.web.upload import GridSite
from gridnode.web.view import NodeView
from tests.fakes import FakeMedia
from tests.test_tus import READ, STREAM, TUS, Response, metadata, parse_answer, request_bytes

SECRET = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="


def mint(sub: str, scope: str, ttl: float = 600, **claims: Any) -> str:
    """A token as an application mints it (PyJWT)."""
    body = {"sub": sub, "scope": scope, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(body, SECRET, algorithm="HS256", headers={"kid": "k1"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ALICE = bearer(mint("alice", "upload read cancel"))
BOB = bearer(mint("bob", "upload read cancel"))
ADMIN = bearer(mint("root", "admin"))


class RouteTests:
    @pytest.mark.parametrize(("method", "path", "scope", "query_token"), [
        ("GET", "/", None, False), ("GET", "/status", None, False), ("GET", "/static/app.js", None, False),
        ("GET", "/health", None, False), ("GET", "/registry/nodes.json", None, False),
        ("OPTIONS", "/files/", None, False), ("OPTIONS", "/jobs", None, False),
        ("POST", "/jobs", "upload", False), ("POST", "/%6Aobs", "upload", False), ("POST", "/j%6fbs", "upload", False),
        ("GET", "/jobs", "read", False), ("HEAD", "/jobs", "read", False),
        ("GET", "/jobs/01J0000000000000000000000", "read", False),
        ("GET", "/jobs/01J0000000000000000000000/events", "read", True),
        ("GET", "/jobs/01J0000000000000000000000/%65vents", "read", True),
        ("DELETE", "/jobs/01J0000000000000000000000", "cancel", False),
        ("DELETE", "/jobs", "any", False), ("POST", "/jobs/01J0000000000000000000000", "any", False),
        ("GET", "/results/01J0000000000000000000000/mp4-720p.mp4", "read", True),
        ("DELETE", "/results/01J0000000000000000000000/mp4-720p.mp4", "any", False),
        ("POST", "/files/", "upload", False), ("PATCH", "/files/01J0000000000000000000000", "upload", False),
        ("HEAD", "/files/01J0000000000000000000000", "upload", False),
        ("DELETE", "/files/01J0000000000000000000000", "upload", False), ("GET", "/%66iles/x", "upload", False),
        ("GET", "/metrics", "ops", False), ("GET", "/peers", "ops", False), ("GET", "/m%65trics", "ops", False),
        ("GET", "/no-such-thing", "any", False), ("GET", "/metrics/../jobs", "ops", False),
    ])
    def test_the_table(self, method: str, path: str, scope: str | None, query_token: bool) -> None:
        """Every route's scope, read on the path decoded as the resource tree decodes it."""
        got = need(method.encode(), segments(path.encode()))
        assert (got.scope, got.query_token) == (scope, query_token)

    def test_segments_decode_like_twisted(self) -> None:
        """Each segment is percent-decoded on its own: %2F stays inside its segment."""
        assert segments(b"/%6Aobs") == [b"jobs"]
        assert segments(b"/results/ID/hls%2Fmaster.m3u8") == [b"results", b"ID", b"hls/master.m3u8"]

    def test_public_routes_reach_no_job(self) -> None:
        """With a keyring, a request that came by a public route passes, but whatever asks who it is
        (a job, an upload) gets 401: a public path that ever led to job data would fail closed."""
        from gridnode.errors import GridnodeError
        from gridnode.keyring import parse_keyring

        access = Access(lambda: parse_keyring(SECRET.encode(), "test"))
        request = DummyRequest([b""])
        assert access.authorize(request, b"GET", b"//jobs", b"").grant is None
        with pytest.raises(GridnodeError) as e:
            access.owner_filter(request)
        assert e.value.code == "unauthorized"

    def test_no_keyring_is_open(self) -> None:
        """Without a keyring every request goes on, as every tenant's."""
        access = Access(None)
        caller = access.authorize(DummyRequest([b"jobs"]), b"DELETE", b"/jobs/x", b"")
        assert caller.grant is None and caller.tenant_filter is None and caller.sees("anyone")


class LogTests:
    @pytest.mark.parametrize(("uri", "logged"), [
        (b"/jobs/X/events?token=abc.def.ghi", b"/jobs/X/events?token=REDACTED"),
        (b"/results/X/a.mp4?a=1&token=abc&b=2", b"/results/X/a.mp4?a=1&token=REDACTED&b=2"),
        (b"/x?%74oken=abc", b"/x?token=REDACTED"),
        (b"/x?TOKEN=abc&token=d", b"/x?token=REDACTED&token=REDACTED"),
        (b"/jobs?presets=poster", b"/jobs?presets=poster"),
        (b"/jobs", b"/jobs"),
    ])
    def test_uris(self, uri: bytes, logged: bytes) -> None:
        """Every spelling of a token parameter is redacted; nothing else changes."""
        assert redact_uri(uri) == logged

    def test_the_access_log_line(self) -> None:
        """twisted.web's combined log line, with the token's value gone."""
        request = DummyRequest([b"jobs"])
        request.uri = b"/jobs/X/events?token=eyJsecret"
        request.method = b"GET"
        request.code, request.sentLength = 200, 10  # set by twisted.web's own Request as it answers
        line = redacted_log_line("[01/Jan/2025:00:00:00 +0000]", request)
        assert "eyJsecret" not in line and "GET /jobs/X/events?token=REDACTED" in line


class MemoryNode:
    """A node's resource tree behind a real GridSite, with a token keyring, in memory."""

    def __init__(self, tmp_path: Path, clock: Clock, file: dict[str, Any] | None = None) -> None:
        keyring = tmp_path / "tokens"
        keyring.write_text(f"k1 {SECRET}\n")  # ends in a newline, as editors write it
        config = build_config(file=file, cli={"work-dir": str(tmp_path / "work"), "workers": 2, "queue": 8,
                                              "min-free": 0, "max-upload": 4,
                                              "upload-secret": str(keyring)}).with_identity("n1")
        self.store = ObjectStore.synchronous(MemoryBackend())
        self.media = FakeMedia(tmp_path)
        self.jobs = JobService(clock, config, self.store, self.media)
        uploads = UploadStore(clock, self.jobs, self.store, max_upload_bytes=config.max_upload_bytes)
        self.view = NodeView(config, self.store, self.jobs, uploads, KeyringFile(str(keyring), "upload-secret"))
        self.site = GridSite(self.view.cors.wrap(api_root(self.view)), clock, self.view.route_body,
                             self.view.extra_headers)

    def raw(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            data: bytes | None = None) -> bytes:
        """What the connection answered (possibly a stream still open), closed afterwards; ``data``:
        the request's bytes as they are, instead of one made of the rest."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        if data is None:
            data = request_bytes(method, path, headers or {}, len(body)) + body
        for at in range(0, len(data), READ):
            channel.dataReceived(data[at:at + READ])
        answer = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        return bytes(answer)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> Response:
        return parse_answer(self.raw(method, path, headers, body), method)

    def upload(self, headers: dict[str, str], body: bytes = b"video bytes", path: str = "/jobs") -> Response:
        return self.request("POST", f"{path}?presets=poster&name=clip.mov",
                            {**headers, "Content-Type": "application/octet-stream"}, body)

    def spooled(self) -> list[str]:
        folder = self.jobs.spool.folder
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())


def code(r: Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"] if r.content and r.status_code >= 400 else ""


class NodeTests:
    def test_no_token(self, node: MemoryNode) -> None:
        """Without a token: 401 unauthorized on every job, result, upload, tus and ops route, before
        any body byte is spooled; the public routes answer."""
        routes = [("GET", "/jobs"), ("GET", f"/jobs/{'0' * 26}"), ("GET", f"/jobs/{'0' * 26}/events"),
                  ("DELETE", f"/jobs/{'0' * 26}"), ("GET", f"/results/{'0' * 26}/poster.jpg"),
                  ("GET", "/metrics"), ("GET", "/peers"), ("GET", "/nothing-here")]
        for method, path in routes:
            assert code(node.request(method, path)) == (401, "unauthorized"), path
        assert code(node.upload({}, b"x" * 200_000)) == (401, "unauthorized")
        r = node.request("POST", "/files/", {**STREAM, "Upload-Length": "10"}, b"x" * 10)
        assert code(r) == (401, "unauthorized") and r.headers["Tus-Resumable"] == "1.0.0"
        assert node.spooled() == []
        counted = node.jobs.metrics.registry.get_sample_value("gridnode_auth_refusals_total", {"code": "unauthorized"})
        assert counted == len(routes) + 2  # the metric operators alert on
        for path in ("/health", "/", "/status"):
            assert node.request("GET", path).status_code == 200, path

    def test_tenants_see_their_own_jobs_only(self, node: MemoryNode) -> None:
        """bob cannot list, read, watch or cancel alice's job: 404, word for word as for no job at all;
        admin sees both; alice cancels hers."""
        r = node.upload(ALICE)
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        assert r.json()["tenant"] == "alice"
        assert node.upload(BOB).status_code == 201
        missing = "0" * 26
        for method, path in [("GET", f"/jobs/{job}"), ("DELETE", f"/jobs/{job}"), ("GET", f"/jobs/{job}/events"),
                             ("GET", f"/results/{job}/poster.jpg")]:
            theirs, nothing = node.request(method, path, BOB), node.request(method, path.replace(job, missing), BOB)
            assert code(theirs) == (404, "not_found"), path
            assert theirs.json()["error"]["message"] == nothing.json()["error"]["message"].replace(missing, job)
        assert node.jobs.active[job].job.state != "cancelled"  # bob's DELETE did nothing
        listed = {who: [j["id"] for j in node.request("GET", "/jobs?view=node", h).json()["active"]]
                  for who, h in (("alice", ALICE), ("bob", BOB), ("admin", ADMIN))}
        assert listed["alice"] == [job] and job not in listed["bob"] and len(listed["bob"]) == 1
        assert sorted(listed["admin"]) == sorted(listed["alice"] + listed["bob"])
        assert node.request("GET", f"/jobs/{job}", ADMIN).json()["id"] == job
        assert node.raw("GET", f"/jobs/{job}/events", ALICE).startswith(b"HTTP/1.1 200")
        assert node.request("DELETE", f"/jobs/{job}", ALICE).json()["state"] == "cancelled"

    def test_scopes(self, node: MemoryNode) -> None:
        """A read-only token cannot cancel or upload (403 forbidden); ops reaches /metrics and /peers but
        not jobs; an expired token is 401 token_expired."""
        job = node.upload(ALICE).json()["id"]
        reader = bearer(mint("alice", "read"))
        assert node.request("GET", f"/jobs/{job}", reader).status_code == 200
        assert code(node.request("DELETE", f"/jobs/{job}", reader)) == (403, "forbidden")
        assert code(node.upload(reader, b"x" * 200_000)) == (403, "forbidden")
        assert all(name.startswith(job) for name in node.spooled())  # the refused body never reached it
        ops = bearer(mint("prometheus", "ops"))
        # (/metrics answers from the global reactor's threads: tests/test_auth_nodes.py reads it)
        assert node.request("GET", "/peers", ops).status_code == 200
        assert code(node.request("GET", "/jobs", ops)) == (403, "forbidden")
        expired = bearer(mint("alice", "read", ttl=-3600))
        assert code(node.request("GET", f"/jobs/{job}", expired)) == (401, "token_expired")

    def test_the_decoded_path_is_checked(self, node: MemoryNode) -> None:
        """POST /%6Aobs is POST /jobs: refused without a token, an upload (201) with one; never a 500."""
        assert code(node.upload({}, path="/%6Aobs")) == (401, "unauthorized")
        r = node.upload(ALICE, path="/%6Aobs")
        assert r.status_code == 201 and r.json()["tenant"] == "alice"

    def test_public_prefixes_lead_nowhere_else(self, node: MemoryNode) -> None:
        """Paths that start public but name a protected resource after it reach no job data: the
        public resources are leaves (or refuse '..'), so the tree never walks on to /jobs."""
        job = node.upload(ALICE).json()["id"]
        for path in ("//jobs", "/status/../jobs", "/health/../jobs", "/registry/../jobs", f"//jobs/{job}",
                     "/%2Fjobs", f"/status/%2E%2E/jobs/{job}", "/static/..%2Fjobs", "/openapi.yaml/../jobs",
                     f"/openapi.yaml/%2E%2E/jobs/{job}"):
            raw = node.raw("GET", path)
            assert b'"active"' not in raw and job.encode() not in raw, (path, raw[:200])
        assert node.raw("DELETE", f"/status/../jobs/{job}").split(b" ")[1] != b"200"
        assert node.jobs.active[job].job.state != "cancelled"

    def test_query_tokens_only_where_headers_cannot_go(self, node: MemoryNode) -> None:
        """?token= works on /events (EventSource sends no headers) and /results, nowhere else."""
        job = node.upload(ALICE).json()["id"]
        token = ALICE["Authorization"].split()[1]
        assert node.raw("GET", f"/jobs/{job}/events?token={token}").startswith(b"HTTP/1.1 200")
        r = node.request("GET", f"/jobs/{job}?token={token}")
        assert code(r) == (401, "unauthorized") and "Authorization: Bearer" in r.json()["error"]["message"]
        assert code(node.request("POST", f"/jobs?token={token}", {}, b"x")) == (401, "unauthorized")

    def test_presets_and_size_of_the_token(self, node: MemoryNode) -> None:
        """A token's presets and max_size bound what an upload may ask for, before its body."""
        narrow = bearer(mint("alice", "upload", presets=["mp4-720p"], max_size=100))
        assert code(node.upload(narrow)) == (403, "forbidden")  # asks for poster
        r = node.request("POST", "/jobs?presets=mp4-720p", {**narrow, "Content-Type": "video/mp4"}, b"x" * 101)
        assert code(r) == (413, "too_large")
        # chunked: no length to check before the body, so the bytes themselves are counted
        head = (f"POST /jobs?presets=mp4-720p HTTP/1.1\r\nHost: gridnode\r\nTransfer-Encoding: chunked\r\n"
                f"Authorization: {narrow['Authorization']}\r\n\r\n").encode()
        chunks = b"".join(b"%x\r\n%s\r\n" % (40, b"y" * 40) for _ in range(4)) + b"0\r\n\r\n"
        answer = parse_answer(node.raw("POST", "/jobs", data=head + chunks), "POST")
        assert code(answer) == (413, "too_large") and node.spooled() == []
        small = b"".join(b"%x\r\n%s\r\n" % (40, b"y" * 40) for _ in range(2)) + b"0\r\n\r\n"
        assert node.raw("POST", "/jobs", data=head + small).startswith(b"HTTP/1.1 201")

    def test_tus_uploads_belong_to_their_creator(self, node: MemoryNode) -> None:
        """bob's HEAD, PATCH and DELETE of alice's upload answer 404 and change nothing; alice (and an
        admin) go on; the finished upload is alice's job."""
        r = node.request("POST", "/files/", {**TUS, **ALICE, "Upload-Length": "8",
                                             "Upload-Metadata": metadata(presets="poster")})
        assert r.status_code == 201, r.text
        upload = r.headers["Location"].rsplit("/", 1)[1]
        path = f"/files/{upload}"
        assert code(node.request("HEAD", path, {**TUS, **BOB}))[0] == 404
        assert code(node.request("PATCH", path, {**STREAM, **BOB, "Upload-Offset": "0"}, b"1234")) == (404, "not_found")
        assert code(node.request("DELETE", path, {**TUS, **BOB})) == (404, "not_found")
        assert node.request("HEAD", path, TUS).status_code == 401
        assert node.request("HEAD", path, {**TUS, **ALICE}).headers["Upload-Offset"] == "0"
        assert node.request("PATCH", path, {**STREAM, **ALICE, "Upload-Offset": "0"}, b"1234").status_code == 204
        assert node.request("HEAD", path, {**TUS, **ADMIN}).headers["Upload-Offset"] == "4"
        r = node.request("PATCH", path, {**STREAM, **ALICE, "Upload-Offset": "4"}, b"5678")
        assert r.status_code == 204 and r.headers["Gridnode-Job"] == upload
        assert node.request("GET", f"/jobs/{upload}", ALICE).json()["tenant"] == "alice"
        assert code(node.request("HEAD", path, {**TUS, **BOB}))[0] == 404  # finished: still not bob's


#: a config file's templates: one of alice's (and carol's), one every tenant may use
TENANT_TEMPLATES = {"templates": {
    "alice-ladder": {"description": "alice's own", "tenants": ["alice", "carol"],
                     "outputs": [{"container": "mp4", "size": 360}]},
    "shared-small": {"outputs": [{"container": "mp4", "size": 240}]},
}}


class TenantTemplateTests:
    def test_a_tenants_template_is_unknown_to_every_other_tenant(self, tmp_path: Path) -> None:
        """Another tenant's template is answered as a name that does not exist (400
        unknown_preset, before the body, nothing spooled; the message names no other template
        of a tenant's), and GET /presets lists a caller only the templates it may use."""
        node = MemoryNode(tmp_path, Clock(), TENANT_TEMPLATES)
        bob = bearer(mint("bob", "upload read"))
        r = node.request("POST", "/jobs?presets=alice-ladder&name=clip.mov",
                         {**bob, "Content-Type": "application/octet-stream"}, b"video bytes")
        assert code(r) == (400, "unknown_preset") and node.spooled() == []
        assert "alice-ladder" in r.json()["error"]["message"]  # the name asked for, nothing more
        r = node.request("POST", "/jobs?presets=mp4-720p,alice-ladder&name=clip.mov",
                         {**bob, "Content-Type": "application/octet-stream"}, b"video bytes")
        assert code(r) == (400, "unknown_preset") and node.spooled() == []
        r = node.request("POST", "/jobs?presets=no-such&name=clip.mov",
                         {**bob, "Content-Type": "application/octet-stream"}, b"video bytes")
        assert code(r) == (400, "unknown_preset") and "alice-ladder" not in r.json()["error"]["message"]

        def listed(headers: dict[str, str]) -> list[str]:
            r = node.request("GET", "/presets", headers)
            assert r.status_code == 200
            return [t["name"] for t in r.json()["presets"]]

        assert "alice-ladder" not in listed(bob) and "shared-small" in listed(bob)
        for who in ("alice", "carol"):
            assert "alice-ladder" in listed(bearer(mint(who, "read")))
        assert "alice-ladder" in listed(bearer(mint("ops", "admin")))  # every tenant's

    def test_its_tenant_may_use_it(self, tmp_path: Path) -> None:
        """The owner's upload naming its template gets past the check (FakeMedia then parses
        built-in names only, so the job itself is tried with a preset it knows)."""
        node = MemoryNode(tmp_path, Clock(), TENANT_TEMPLATES)
        alice = bearer(mint("alice", "upload"))
        assert node.view.access.owners == {"alice-ladder": frozenset({"alice", "carol"})}
        r = node.request("POST", "/jobs?presets=alice-ladder&name=clip.mov",
                         {**alice, "Content-Type": "application/octet-stream"}, b"video bytes")
        assert code(r) != (400, "unknown_preset") or "GET /presets" not in r.json()["error"]["message"]
