"""The store's health as the node's own calls see it (gridnode/store_health.py), and /health."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.task import Clock

from gridnode.errors import NotFound, StorageUnavailable
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.store_health import StoreHealth
from tests.test_access import MemoryNode


class StoreHealthTests:
    def test_outages_begin_and_end_with_calls(self) -> None:
        """A storage_unavailable failure starts an outage (its message the reason, its time kept
        through later failures); any answer, "no such key" included, ends it."""
        clock = Clock()
        health = StoreHealth(now=clock.seconds)
        backend = MemoryBackend()
        store = ObjectStore.synchronous(backend).wrapped(health.watch)
        down = {"on": True}
        real = backend.get_bytes

        def get_bytes(*a: Any, **kw: Any) -> Any:
            if down["on"]:
                raise StorageUnavailable("the bucket b does not exist at s3://b: create it")
            return real(*a, **kw)

        backend.get_bytes = get_bytes  # type: ignore[method-assign]
        results: list[Any] = []
        store.get_bytes("k").addErrback(results.append)
        assert health.error == "the bucket b does not exist at s3://b: create it" and health.since == 0
        clock.advance(5)
        store.get_bytes("k").addErrback(results.append)
        assert health.since == 0
        down["on"] = False
        store.get_bytes("k").addErrback(results.append)
        assert results[-1].check(NotFound) and health.error is None and health.since is None


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())


class HealthTests:
    def test_degraded_with_a_reason(self, node: MemoryNode) -> None:
        """/health: ok; degraded (still 200: uploads wait in the spool) with the store's reason while
        it is unreachable, or the registry's when only its heartbeat fails; draining is 503."""
        assert node.request("GET", "/health").json()["state"] == "ok"
        node.view.store_health.failed(StorageUnavailable("the bucket b does not exist at s3://b: create it"))
        r = node.request("GET", "/health")
        assert r.status_code == 200 and r.json()["state"] == "degraded"
        assert r.json()["reasons"] == ["store unreachable: the bucket b does not exist at s3://b: create it"]
        node.view.store_health.answered()
        node.view.registry = SimpleNamespace(last_error="could not register: it keeps changing", registered=True,  # type: ignore[assignment]
                                             record=SimpleNamespace(incarnation=1))
        assert node.request("GET", "/health").json()["reasons"] == ["registry: could not register: it keeps changing"]
        node.jobs.draining = True
        assert node.request("GET", "/health").status_code == 503
