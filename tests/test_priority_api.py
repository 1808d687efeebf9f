"""
Priorities and the per-tenant defaults over HTTP, on a whole node's resource tree in memory
(tests/test_access.py's MemoryNode: fakes, a token keyring, no sockets): ``priority`` from the
query, a form's field, the JSON body and tus metadata; a token's ``priority`` claim; the 503
rule by priority; the load figures and the metric by tenant; ``notify`` in the JSON body;
``--webhook TENANT=URLS``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from gridnode.config import build_config
from gridnode.errors import ConfigError, GridnodeError
from gridnode.metrics import Metrics
from gridnode.notify.service import Webhooks
from gridnode.notify.signing import Signer
from gridnode.notify.targets import AddressRule, Defaults, literal, parse_defaults
from tests.test_access import ALICE, BOB, MemoryNode, bearer, code, mint
from tests.test_notify import PUBLIC, RING
from tests.test_tus import TUS, metadata

VIDEO = {"Content-Type": "video/mp4"}


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    n = MemoryNode(tmp_path, Clock())
    n.jobs.config = dataclasses.replace(n.jobs.config, input_prefixes=("incoming/",))
    n.store.backend.put_bytes("incoming/alice/movie.mov", b"alice's video")
    return n


def with_webhooks(node: MemoryNode) -> None:
    """The node sends webhooks; every host resolves to a public address but literal ones."""
    node.jobs.webhooks = Webhooks(Clock(), node.store, "n1", Signer(lambda: RING), AddressRule(),
                                  lambda host, port: succeed([literal(host) or PUBLIC]),
                                  lambda *_: succeed(200), metrics=Metrics())


def form(fields: dict[str, str], video: bytes = b"video") -> tuple[dict[str, str], bytes]:
    boundary = "XyZ"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    body = ("".join(parts) + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.mov"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode() + video + f"\r\n--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


def stored_keys(node: MemoryNode) -> list[str]:
    return [i.key for i in node.store.backend.list("").items if not i.key.startswith("incoming/")]


class PriorityTests:
    def test_every_way_of_submitting_names_the_priority(self, node: MemoryNode) -> None:
        """The query, a form's field (the query wins over it), the JSON body and tus metadata each
        set the job's priority, kept in its record and JSON and given to the queue; none is normal."""
        r = node.request("POST", "/jobs", {**ALICE, **VIDEO}, b"video")
        assert r.status_code == 201 and r.json()["priority"] == "normal"
        r = node.request("POST", "/jobs?priority=HIGH", {**ALICE, **VIDEO}, b"video")
        assert r.json()["priority"] == "high" and node.media.places[r.json()["id"]] == (0, "alice")
        headers, body = form({"priority": "low"})
        r = node.request("POST", "/jobs", {**ALICE, **headers}, body)
        assert r.status_code == 201 and r.json()["priority"] == "low", r.text
        r = node.request("POST", "/jobs?priority=normal", {**ALICE, **headers}, body)
        assert r.json()["priority"] == "normal"
        r = node.request("POST", "/jobs", {**ALICE, "Content-Type": "application/json"},
                         json.dumps({"input": {"key": "incoming/alice/movie.mov"}, "priority": "low"}).encode())
        assert r.status_code == 201 and r.json()["priority"] == "low", r.text
        stored = json.loads(node.store.backend.get_bytes(f"jobs/{r.json()['id']}.json")[0])
        assert stored["priority"] == "low" and node.media.places[r.json()["id"]] == (2, "alice")
        r = node.request("POST", "/files/", {**ALICE, **TUS, "Upload-Length": "5",
                                             "Upload-Metadata": metadata(priority="high")})
        assert r.status_code == 201, r.text
        r = node.request("PATCH", r.headers["Location"], {**ALICE, **TUS, "Upload-Offset": "0",
                                                          "Content-Type": "application/offset+octet-stream"},
                         b"video")
        job_id = r.headers["Gridnode-Job"]
        assert node.jobs.active[job_id].job.priority == "high" and node.media.places[job_id] == (0, "alice")

    @pytest.mark.parametrize("value", ["urgent", "", "high%2Clow", "%00", "1", "x" * 300])
    def test_a_bad_priority_is_refused_and_nothing_kept(self, node: MemoryNode, value: str) -> None:
        """A priority that is not high, normal or low is 400 bad_priority wherever it is given, the
        query's before any body byte; nothing reaches the spool or the store."""
        r = node.request("POST", f"/jobs?priority={value}", {**ALICE, **VIDEO}, b"x" * 100_000)
        assert code(r) == (400, "bad_priority"), value
        headers, body = form({"priority": value})
        assert code(node.request("POST", "/jobs", {**ALICE, **headers}, body)) == (400, "bad_priority")
        for level in (value, 3, ["high"]):
            r = node.request("POST", "/jobs", {**ALICE, "Content-Type": "application/json"},
                             json.dumps({"input": {"key": "incoming/alice/movie.mov"}, "priority": level}).encode())
            assert code(r) == (400, "bad_priority"), level
        r = node.request("POST", "/files/", {**ALICE, **TUS, "Upload-Length": "5",
                                             "Upload-Metadata": metadata(priority=value)})
        assert code(r) == (400, "bad_priority")
        assert node.spooled() == [] and stored_keys(node) == []

    def test_a_token_caps_the_priority(self, node: MemoryNode) -> None:
        """A token whose ``priority`` claim is normal may ask normal or low, never high (403
        forbidden, however it asks); a claim that is not a priority makes the token invalid."""
        capped = bearer(mint("carol", "upload read", priority="normal"))
        assert node.request("POST", "/jobs?priority=low", {**capped, **VIDEO}, b"v").status_code == 201
        assert node.request("POST", "/jobs", {**capped, **VIDEO}, b"v").json()["priority"] == "normal"
        assert code(node.request("POST", "/jobs?priority=high", {**capped, **VIDEO}, b"v")) == (403, "forbidden")
        headers, body = form({"priority": "high"})
        assert code(node.request("POST", "/jobs", {**capped, **headers}, body)) == (403, "forbidden")
        r = node.request("POST", "/files/", {**capped, **TUS, "Upload-Length": "5",
                                             "Upload-Metadata": metadata(priority="high")})
        assert code(r) == (403, "forbidden")
        for claim in ("urgent", ["high"], 0):
            bad = bearer(mint("carol", "upload read", priority=claim))
            assert code(node.request("POST", "/jobs", {**bad, **VIDEO}, b"v")) == (401, "unauthorized")

    def test_a_node_full_of_low_work_still_takes_higher_work(self, node: MemoryNode) -> None:
        """workers 2, queue 8: ten low jobs fill the node for low (503 busy); normal and high
        jobs still come in, up to workers + 2 x queue = 18 jobs in all; then 503 for every one."""
        for _ in range(10):
            assert node.request("POST", "/jobs?priority=low", {**ALICE, **VIDEO}, b"v").status_code == 201
        assert code(node.request("POST", "/jobs?priority=low", {**BOB, **VIDEO}, b"v")) == (503, "busy")
        for _ in range(8):
            assert node.request("POST", "/jobs?priority=normal", {**BOB, **VIDEO}, b"v").status_code == 201
        assert code(node.request("POST", "/jobs?priority=high", {**BOB, **VIDEO}, b"v")) == (503, "busy")
        load = node.jobs.load()
        assert (load["queued_low"], load["queued_normal"], load["queued_high"]) == (10, 8, 0)

    def test_an_idempotency_key_covers_the_priority(self, node: MemoryNode) -> None:
        """A retry with the key and the same priority is answered the first job; another priority
        with the key is another request (422 idempotency_key_reused)."""
        headers = {**ALICE, **VIDEO, "Idempotency-Key": "k-prio"}
        first = node.request("POST", "/jobs?priority=low", headers, b"video")
        assert first.status_code == 201, first.text
        again = node.request("POST", "/jobs?priority=low", headers, b"video")
        assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
        assert code(node.request("POST", "/jobs?priority=high", headers, b"video")) == (422, "idempotency_key_reused")

    def test_the_metric_counts_jobs_by_tenant_while_they_last(self, node: MemoryNode) -> None:
        """``gridnode_tenant_jobs``: a series per tenant with jobs here, queued or running, gone
        with the tenant's last job."""
        ids = [node.request("POST", "/jobs", {**who, **VIDEO}, b"v").json()["id"] for who in (ALICE, ALICE, BOB)]
        node.media.hooks[ids[0]][0]()  # alice's first starts
        sample = node.jobs.metrics.registry.get_sample_value
        assert sample("gridnode_tenant_jobs", {"tenant": "alice", "state": "running"}) == 1
        assert sample("gridnode_tenant_jobs", {"tenant": "alice", "state": "queued"}) == 1
        assert sample("gridnode_tenant_jobs", {"tenant": "bob", "state": "queued"}) == 1
        node.media.hooks[ids[2]][0]()
        node.media.finish(ids[2])
        assert sample("gridnode_tenant_jobs", {"tenant": "bob", "state": "queued"}) is None
        assert sample("gridnode_tenant_jobs", {"tenant": "bob", "state": "running"}) is None


class JsonNotifyTests:
    def test_notify_in_the_json_body_is_checked_as_the_querys(self, node: MemoryNode) -> None:
        """``notify`` in the JSON body: refused without webhooks (webhooks_off); the metadata address,
        a private one, a non-http URL or more than 4 URLs are 400 notify_refused; a list of anything
        but strings, or a notify_progress that is not a boolean, is 400 bad_body; nothing is kept."""
        def post(**fields: Any) -> Any:
            body = {"input": {"key": "incoming/alice/movie.mov"}, **fields}
            return node.request("POST", "/jobs", {**ALICE, "Content-Type": "application/json"},
                                json.dumps(body).encode())

        assert code(post(notify=["https://hooks.example.com/in"])) == (400, "webhooks_off")
        with_webhooks(node)
        for urls in (["http://169.254.169.254/latest/meta-data/"], ["http://10.0.0.1/"], ["gopher://x/"],
                     ["http://[::ffff:127.0.0.1]/"], [f"https://h{i}.example/" for i in range(5)]):
            assert code(post(notify=urls)) == (400, "notify_refused"), urls
        for fields in ({"notify": "https://a.example/"}, {"notify": [1]}, {"notify": [["https://a.example/"]]},
                       {"notify_progress": "yes"}):
            assert code(post(**fields)) == (400, "bad_body"), fields
        assert node.spooled() == [] and stored_keys(node) == []
        r = post(notify=["https://a.example/1", "https://a.example/1"], notify_progress=True)
        assert r.status_code == 201, r.text
        assert (r.json()["notify"], r.json()["notify_progress"]) == (["https://a.example/1"], True)


class TenantDefaultsTests:
    def test_parsed(self) -> None:
        """``URLS`` is the pool's, ``TENANT=URLS`` a tenant's (a URL's own ``=`` in its query is no
        tenant); repeated values and space-separated items add up; a tenant without its own gets
        the pool's."""
        d = parse_defaults(["https://pool.example/h?a=b", "alice=https://a.example/1,https://a.example/2",
                            "bob=https://b.example/ alice=https://a.example/3"])
        assert d.pool == ("https://pool.example/h?a=b",)
        assert d.of("alice") == ("https://a.example/1", "https://a.example/2", "https://a.example/3")
        assert d.of("bob") == ("https://b.example/",) and d.of("carol") == d.of("") == d.pool
        assert not Defaults() and bool(parse_defaults(["bob=https://b.example/"]))
        config = build_config(cli={"webhook": "alice=https://a.example/ https://pool.example/",
                                   "webhook-secret": "whsec.keys"})
        assert config.webhook.of("alice") == ("https://a.example/",) and config.webhook.pool == ("https://pool.example/",)

    def test_repeated_on_the_command_line(self, tmp_path: Path) -> None:
        """``--webhook`` given several times adds up, each value URLS or TENANT=URLS."""
        from gridnode.tap import Options

        options = Options()
        options.parseOptions(["--work-dir", str(tmp_path), "--webhook-secret", "whsec.keys",
                              "--webhook", "alice=https://a.example/,https://a.example/2",
                              "--webhook", "https://pool.example/", "--webhook", "bob=https://b.example/"])
        assert options.node_config is not None
        hooks = options.node_config.webhook
        assert hooks.of("alice") == ("https://a.example/", "https://a.example/2")
        assert hooks.of("bob") == ("https://b.example/",) and hooks.of("carol") == ("https://pool.example/",)

    @pytest.mark.parametrize("value", ["alice=", "=https://a.example/", "a:b=https://a.example/", "alice=ftp://x/",
                                       "alice=https://u:p@a.example/", "a/b=https://x.example/", "not a url",
                                       "alice=https://x.example/#frag", "https://a.example/,alice=https://b/",
                                       " ".join(f"alice=https://h{i}.example/" for i in range(5))])
    def test_hostile_values_stop_the_node(self, value: str) -> None:
        """An item that is neither URLS nor TENANT=URLS, a bad URL, a tenant with ':' or '/', or a
        tenant with more than 4 URLs is a configuration error that names ``webhook``."""
        with pytest.raises((ConfigError, GridnodeError)) as e:
            build_config(cli={"webhook": value, "webhook-secret": "whsec.keys"})
        assert "webhook" in str(e.value)

    def test_a_tenants_default_goes_to_its_jobs_only(self, node: MemoryNode) -> None:
        """alice's jobs that name no URL get alice's default, bob's the pool's; a job that names its
        own URLs gets those alone."""
        with_webhooks(node)
        webhook = parse_defaults(["https://pool.example/", "alice=https://alice.example/"])
        node.jobs.config = dataclasses.replace(node.jobs.config, webhook=webhook)
        assert node.request("POST", "/jobs", {**ALICE, **VIDEO}, b"v").json()["notify"] == ["https://alice.example/"]
        assert node.request("POST", "/jobs", {**BOB, **VIDEO}, b"v").json()["notify"] == ["https://pool.example/"]
        r = node.request("POST", "/jobs?notify=https://own.example/", {**ALICE, **VIDEO}, b"v")
        assert r.json()["notify"] == ["https://own.example/"]
