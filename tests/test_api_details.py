"""
Small parts of the HTTP contract (docs/api.md) on a whole node's resource tree in memory
(tests/test_access.py's MemoryNode: fakes, no sockets): an empty ``presets=``, malformed job ids,
the event stream's keep-alive.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gridnode.metrics import Metrics
from gridnode.notify.service import Webhooks
from gridnode.notify.signing import Signer
from gridnode.notify.targets import AddressRule, literal
from tests.test_access import ALICE, MemoryNode, code
from tests.test_notify import PUBLIC, RING
from tests.test_priority_api import form
from tests.test_tus import request_bytes


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())


class PresetsTests:
    def test_empty_presets_is_refused_before_the_body(self, node: MemoryNode) -> None:
        """``?presets=`` (empty) is 400 unknown_preset, before any body byte is spooled; left out, the
        default applies."""
        for query in ("?presets=", "?presets=,", "?presets=&presets="):
            r = node.request("POST", f"/jobs{query}", {**ALICE, "Content-Type": "video/mp4"}, b"x" * 200_000)
            assert code(r) == (400, "unknown_preset"), query
        assert node.spooled() == []
        r = node.request("POST", "/jobs", {**ALICE, "Content-Type": "video/mp4"}, b"video")
        assert r.status_code == 201 and r.json()["presets"] == ["mp4-720p"]


class JobIdTests:
    def test_malformed_ids_are_400(self, node: MemoryNode) -> None:
        """A path segment that cannot be a job id is 400 bad_job_id on every job route and on results;
        a well-formed id of no job stays 404 not_found."""
        for method, path in [("GET", "/jobs/nope"), ("GET", "/jobs/nope/events"), ("DELETE", "/jobs/nope"),
                             ("GET", f"/jobs/{'0' * 25}"), ("GET", f"/jobs/{'0' * 27}"), ("GET", "/jobs/%00"),
                             ("GET", "/results/nope/video.mp4")]:
            r = node.request(method, path, ALICE)
            assert code(r) == (400, "bad_job_id"), path
        assert code(node.request("GET", f"/jobs/{'0' * 26}", ALICE)) == (404, "not_found")
        assert code(node.request("GET", f"/results/{'0' * 26}", ALICE)) == (404, "not_found")


class NotifyTests:
    def test_notify_urls_on_post_jobs(self, node: MemoryNode) -> None:
        """Query ``notify`` or a ``Notify`` header: a node without a webhook secret refuses them
        (webhooks_off); with one, the metadata address and a hostile URL are 400 notify_refused and
        nothing is stored; a public URL becomes the job's, with job.progress when asked."""
        url = "https%3A%2F%2Fhooks.example.com%2Fin"
        r = node.request("POST", f"/jobs?notify={url}", {**ALICE, "Content-Type": "video/mp4"}, b"video")
        assert code(r) == (400, "webhooks_off")
        node.jobs.webhooks = Webhooks(Clock(), node.store, "n1", Signer(lambda: RING), AddressRule(),
                                      lambda host, port: succeed([literal(host) or PUBLIC]),
                                      lambda *_: succeed(200), metrics=Metrics())
        for query, headers in (("?notify=http://169.254.169.254/latest/", {}), ("", {"Notify": "gopher://x/"}),
                               ("", {"Notify": "http://[::ffff:10.0.0.1]/"}), ("?notify=http://u:p@a.example/", {})):
            r = node.request("POST", f"/jobs{query}", {**ALICE, **headers, "Content-Type": "video/mp4"}, b"video")
            assert code(r) == (400, "notify_refused"), (query, headers)
        assert [k for k in node.store.backend.list("").items] == []
        r = node.request("POST", f"/jobs?notify={url}&notify_progress=true", {**ALICE, "Content-Type": "video/mp4"},
                         b"video")
        assert r.status_code == 201, r.text
        assert (r.json()["notify"], r.json()["notify_progress"]) == (["https://hooks.example.com/in"], True)
        r = node.request("POST", "/jobs", {**ALICE, "Notify": "https://a.example/1, https://b.example/2",
                                           "Content-Type": "video/mp4"}, b"video")
        assert r.json()["notify"] == ["https://a.example/1", "https://b.example/2"]
        assert r.json()["notify_progress"] is False

    def test_a_forms_notify_fields(self, node: MemoryNode) -> None:
        """A browser form's ``notify`` and ``notify_progress`` fields, checked as the query is: a
        metadata address is 400 notify_refused and nothing is kept."""
        node.jobs.webhooks = Webhooks(Clock(), node.store, "n1", Signer(lambda: RING), AddressRule(),
                                      lambda host, port: succeed([literal(host) or PUBLIC]),
                                      lambda *_: succeed(200), metrics=Metrics())
        headers, body = form({"notify": "https://hooks.example.com/in", "notify_progress": "true"})
        r = node.request("POST", "/jobs", {**ALICE, **headers}, body)
        assert r.status_code == 201, r.text
        assert (r.json()["notify"], r.json()["notify_progress"]) == (["https://hooks.example.com/in"], True)
        before = sorted(i.key for i in node.store.backend.list("").items)
        headers, body = form({"notify": "http://169.254.169.254/latest/"})
        assert code(node.request("POST", "/jobs", {**ALICE, **headers}, body)) == (400, "notify_refused")
        assert sorted(i.key for i in node.store.backend.list("").items) == before

    def test_an_idempotency_key_covers_the_notify_urls(self, node: MemoryNode) -> None:
        """The same key with other notify URLs is another request: 422 idempotency_key_reused."""
        node.jobs.webhooks = Webhooks(Clock(), node.store, "n1", Signer(lambda: RING), AddressRule(),
                                      lambda host, port: succeed([PUBLIC]), lambda *_: succeed(200),
                                      metrics=Metrics())
        headers = {**ALICE, "Idempotency-Key": "k-1", "Content-Type": "video/mp4"}
        r = node.request("POST", "/jobs", {**headers, "Notify": "https://a.example/1"}, b"video")
        assert r.status_code == 201, r.text
        again = node.request("POST", "/jobs", {**headers, "Notify": "https://a.example/1"}, b"video")
        assert again.status_code == 201 and again.json()["id"] == r.json()["id"]
        other = node.request("POST", "/jobs", {**headers, "Notify": "https://evil.example/"}, b"video")
        assert code(other) == (422, "idempotency_key_reused")


class EventStreamTests:
    def test_a_quiet_stream_gets_a_comment_every_15_s_until_it_ends(self, tmp_path: Path) -> None:
        """A job that makes no event for a minute still sends bytes (a comment line EventSource
        ignores) so a proxy's idle cut does not end the stream; the beat stops with the stream."""
        clock = Clock()
        node = MemoryNode(tmp_path, clock)
        job = node.upload(ALICE).json()["id"]
        channel = node.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request_bytes("GET", f"/jobs/{job}/events", ALICE, 0))
        opened = transport.value()
        assert opened.startswith(b"HTTP/1.1 200") and b": keep-alive" not in opened
        clock.advance(14)
        assert b": keep-alive" not in transport.value()
        clock.pump([1, 15, 15, 15])
        assert transport.value().count(b": keep-alive\n\n") == 4
        node.request("DELETE", f"/jobs/{job}", ALICE)
        assert b"event: cancelled" in transport.value()
        clock.pump([15] * 4)
        assert transport.value().count(b": keep-alive\n\n") == 4
        assert not [c for c in clock.getDelayedCalls() if getattr(getattr(c.func, "f", None), "__name__", "")
                    == "keep_alive"]
        channel.connectionLost(Failure(ConnectionDone()))


class StaticTests:
    def test_static_answers_files_only_with_json_404s(self, node: MemoryNode) -> None:
        """A missing file of /static/, a folder (no listing, no redirect to one) and a name that is
        not UTF-8 answer a coded JSON 404, never twisted.web's HTML pages. (Its files are served in
        tests/test_openapi_nodes.py: twisted.web streams them, which this in-memory transport does not.)"""
        for path in ("/static/nope.js", "/static", "/static/vendor", "/static/vendor/",
                     "/static/%ff", "/static/style.css/x"):
            r = node.request("GET", path)
            assert code(r) == (404, "not_found"), path
            assert r.headers["content-type"] == "application/json", path
        assert node.request("HEAD", "/static/vendor").status_code == 404


class MethodTests:
    def test_a_method_a_route_does_not_take_is_a_coded_405(self, node: MemoryNode) -> None:
        """PUT, TRACE or DELETE where a route does not take them answer 405 method_not_allowed as JSON
        with Allow (twisted.web answered an HTML 405, or 501 for a method it does not know); a HEAD
        of a GET route still answers as the GET does, without the body."""
        admin = {"Authorization": ALICE["Authorization"]}
        for method, path, allowed in (("PUT", "/jobs", {"GET", "POST"}), ("TRACE", "/health", {"GET"}),
                                      ("DELETE", "/presets", {"GET"}), ("POST", f"/jobs/{'0' * 26}", {"GET", "DELETE"}),
                                      ("PATCH", "/openapi.yaml", {"GET"})):
            r = node.request(method, path, admin)
            assert code(r) == (405, "method_not_allowed"), (method, path)
            assert r.headers["content-type"] == "application/json"
            assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, (method, path)
        r = node.request("HEAD", "/health")
        assert r.status_code == 200 and r.content == b""
