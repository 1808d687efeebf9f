"""The client reads its two candidates' loads live before an upload (real HTTP on loopback)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from gridnode.client.api import GridClient, default_http
from gridnode.client.nodes import NodeInfo

# Real HTTP on loopback, with the body streamed from a file: treq's timeout runs on the global
# reactor (GridClient does not hand it its own), so a hanging candidate cannot be driven by a Clock.
pytestmark = pytest.mark.integration


class FakeNode(Resource):
    """Answers /health with fixed load figures and takes POST /jobs; or never answers at all."""

    isLeaf = True

    def __init__(self, name: str, running: int, queued: int, *, frozen: bool = False) -> None:
        super().__init__()
        self.name = name
        self.health = {"node": name, "state": "ok", "running": running, "queued": queued, "workers": 2}
        self.frozen = frozen
        self.uploads = 0
        self.priorities: list[str] = []
        self.hanging: list[Any] = []

    def render(self, request: Any) -> Any:
        if self.frozen:
            self.hanging.append(request)  # the connection hangs, as with SIGSTOP
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/health":
            return json.dumps(self.health).encode()
        if request.method == b"POST" and request.path == b"/jobs":
            self.uploads += 1
            self.priorities += [v.decode() for v in request.args.get(b"priority", [])]
            request.setResponseCode(201)
            return json.dumps({"id": f"{self.name}-job", "state": "queued"}).encode()
        request.setResponseCode(404)
        return b'{"error": {"code": "not_found", "message": "no"}}'


def serve(resource: FakeNode) -> tuple[Any, NodeInfo]:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    # the registry's figures, a heartbeat old, say the opposite of the live ones
    stale = {"running": 0.0, "queued": 0.0, "workers": 2.0} if resource.health["queued"] else \
        {"running": 2.0, "queued": 9.0, "workers": 2.0}
    return port, NodeInfo(resource.name, f"http://127.0.0.1:{port.getHost().port}", stale)


@pytest_twisted.ensureDeferred
async def test_upload_goes_to_the_less_busy_node_by_its_live_load(tmp_path: Path) -> None:
    """Registry figures say n0 is idle and n1 busy; their /health says the opposite: n1 gets every upload."""
    busy, idle = FakeNode("n0", 2, 8), FakeNode("n1", 0, 0)
    ports, nodes = zip(*(serve(r) for r in (busy, idle)), strict=True)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 1000)
    client = GridClient(reactor, default_http(reactor), list(nodes), rng=random.Random(1))
    try:
        for _ in range(6):
            node, job = await client.upload(str(clip), presets=["poster"])
            assert node.id == "n1" and job["id"] == "n1-job"
        assert (idle.uploads, busy.uploads) == (6, 0)
    finally:
        for p in ports:
            await p.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_frozen_candidate_costs_one_check_timeout(tmp_path: Path) -> None:
    """A candidate whose health check hangs is ranked after the one that answered."""
    frozen, ok = FakeNode("n0", 0, 0, frozen=True), FakeNode("n1", 2, 8)
    ports, nodes = zip(*(serve(r) for r in (frozen, ok)), strict=True)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 1000)
    client = GridClient(reactor, default_http(reactor), list(nodes), check_timeout=0.5, rng=random.Random(2))
    try:
        node, _ = await client.upload(str(clip), presets=["poster"])
        assert node.id == "n1" and ok.uploads == 1
    finally:
        for request in frozen.hanging:
            request.transport.abortConnection()
        for p in ports:
            await p.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_priority_upload_ranks_by_the_work_ahead_of_it(tmp_path: Path) -> None:
    """n0's queue is all low work, n1's normal work: a normal upload goes to n0 (its queue waits
    behind the job), a low one to n1; each upload names its priority."""
    lows, normals = FakeNode("n0", 2, 8), FakeNode("n1", 2, 2)
    lows.health.update(work=580.0, queued_high=0, queued_normal=0, queued_low=8, work_high=0.0, work_normal=0.0,
                       work_low=480.0)
    normals.health.update(work=220.0, queued_high=0, queued_normal=2, queued_low=0, work_high=0.0,
                          work_normal=120.0, work_low=0.0)
    ports, nodes = zip(*(serve(r) for r in (lows, normals)), strict=True)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x" * 1000)
    try:
        for level, want in (("normal", "n0"), ("low", "n1")):
            client = GridClient(reactor, default_http(reactor), list(nodes), rng=random.Random(3), priority=level)
            node, _ = await client.upload(str(clip), presets=["poster"])
            assert node.id == want, level
        assert (lows.priorities, normals.priorities) == (["normal"], ["low"])
    finally:
        for p in ports:
            await p.stopListening()
