"""
The counting store (bench/counting_store.py) counts each request as S3 would bill and throttle
it, by prefix, second and cause; the pool simulator (bench/pool_cost.py) runs the real registry
and job layer at a small N and reports what the store was sent. Behaviour only: the benchmark
prints the figures.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock

from bench.counting_store import (
    CausalGate,
    CountingBackend,
    busiest,
    cause,
    caused,
    dollars,
    per_class,
    prefix_of,
)
from bench.pool_cost import Run, _job_of, main, simulate
from bench.pool_sim import PoolClock, job_id
from gridnode import keys
from gridnode.errors import NotFound, PreconditionFailed
from gridnode.store.base import ObjectStore
from gridnode.store.rate import BACKGROUND


class CountingStoreTests:
    def test_each_call_is_one_request_of_its_class_failures_too(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        b = CountingBackend()
        info = b.put_bytes("jobs/a.json", b"{}")
        b.get_bytes("jobs/a.json")
        b.stat("jobs/a.json")
        b.get_file("jobs/a.json", str(tmp_path / "a"))  # MemoryBackend reads through get_bytes: one GET
        with pytest.raises(PreconditionFailed):
            b.put_bytes("jobs/a.json", b"{}", if_none_match="*")
        with pytest.raises(NotFound):
            b.get_bytes("jobs/missing.json")
        b.list("jobs/")
        b.delete("jobs/a.json", if_match=info.etag)
        assert dict(b.ops) == {"PUT": 2, "GET": 3, "HEAD": 1, "LIST": 1, "DELETE": 1}
        assert b.total() == 8
        assert per_class(b.ops) == {"put_copy_post_list": 3, "get_head": 4, "delete": 1}
        assert dollars(b.ops) == pytest.approx(3 * 0.005 / 1000 + 4 * 0.0004 / 1000)

    def test_multipart_calls_count_as_s3_sends_them(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        b = CountingBackend()
        body = tmp_path / "body"
        body.write_bytes(b"x" * 10)
        b.put_bytes("inputs/src", b"y")
        upload = b.begin_upload("outputs/o")
        e1 = b.put_part("outputs/o", upload, 1, str(body), 0, 10)
        e2 = b.copy_part("outputs/o", upload, 2, "inputs/src")
        b.finish_upload("outputs/o", upload, [(e1, 10), (e2, 1)])  # one POST, not a PUT more
        b.list_uploads("outputs/")
        b.abort_upload("outputs/o", b.begin_upload("outputs/o"))
        assert dict(b.ops) == {"PUT": 2, "POST": 3, "COPY": 1, "LIST": 1, "DELETE": 1}
        assert b.get_bytes("outputs/o")[0] == b"x" * 10 + b"y"

    def test_prefixes_seconds_and_the_busiest_share(self) -> None:
        now = [0.0]
        b = CountingBackend(lambda: now[0], depth=1)
        for _ in range(7):
            b.put_bytes("jobs/a.json", b"1")
        now[0] = 1.5
        for _ in range(11):
            b.get_bytes("jobs/a.json")
        b.list("registry/prod/main/nodes/")
        assert b.by_prefix["jobs/", "PUT"] == 7
        assert b.by_prefix["registry/", "LIST"] == 1
        assert b.by_second[0]["jobs/", "write"] == 7
        assert b.by_second[1]["jobs/", "read"] == 11
        top = busiest(b)
        assert top["busiest_prefix"] == "jobs/"
        assert top["prefixes"]["jobs/"]["write_peak"] == 7
        assert top["busiest_share"] == pytest.approx(max(7 / 3500, 11 / 5500), abs=1e-4)
        assert busiest(b, since=1)["prefixes"]["jobs/"]["write_peak"] == 0
        assert prefix_of("registry/prod/main/nodes/x.json", 3) == "registry/prod/main/"
        assert prefix_of("nodes.json", 2) == "nodes.json"

    def test_listing_pages_in_key_order_as_memory_does(self) -> None:
        b = CountingBackend()
        for k in ("active/c", "active/a", "jobs/z.json", "active/b", "activez"):
            b.put_bytes(k, b"")
        b.delete("active/b")
        first = b.list("active/", limit=1)
        assert [i.key for i in first.items] == ["active/a"] and first.next_after == "active/a"
        rest = b.list("active/", start_after=first.next_after, limit=5)
        assert [i.key for i in rest.items] == ["active/c"] and rest.next_after is None
        assert b.ops["LIST"] == 2

    def test_a_request_is_its_askers_cause_through_inline_callbacks_and_the_gate(self) -> None:
        b = CountingBackend()
        clock = Clock()
        gate = CausalGate(clock, rate=1.0, slots=8)
        store = ObjectStore.synchronous(b).gated(gate).in_lane(BACKGROUND)

        @inlineCallbacks
        def work(n: int):  # type: ignore[no-untyped-def]
            for i in range(n):
                yield store.put_bytes(f"jobs/{i}.json", b"")

        with cause("death"):
            work(3)  # the first goes at once, the others wait for tokens
        caused("scan", work)(2)
        for _ in range(20):  # a token a second
            clock.advance(1)
        assert b.by_cause["death", "PUT"] == 3
        assert b.by_cause["scan", "PUT"] == 2
        b.reset()
        assert b.total() == 0 and not b.by_second


class HarnessTests:
    def test_pool_clock_runs_calls_in_time_order(self) -> None:
        clock = PoolClock()
        seen: list[tuple[str, float]] = []
        clock.callLater(2, lambda: seen.append(("b", clock.seconds())))
        a = clock.callLater(1, lambda: seen.append(("a", clock.seconds())))
        clock.callLater(1.5, lambda: seen.append(("c", clock.seconds())))
        a.reset(3)
        clock.callLater(0.5, lambda: seen.append(("x", clock.seconds()))).cancel()
        clock.run_until(10)
        assert seen == [("c", 1.5), ("b", 2.0), ("a", 3.0)]

    def test_ids_are_gridnode_ids_and_keys_name_their_job(self) -> None:
        import random

        j = job_id(random.Random(1), 1_764_700_000_000)
        assert keys.is_id(j)
        assert _job_of(keys.job_record(j)) == j
        assert _job_of(f"active/i-0123456789abcdef0/{j}") == j
        assert _job_of("registry/prod/main/nodes/i-0.json") == ""

    def test_steady_state_runs_the_real_layers_and_counts_them(self) -> None:
        r = Run("steady", nodes=6, warmup=40, window=60, jobs=4, running=1, seed=3)
        o = simulate(r)
        # no lease renewals: a job's record is written when its state changes (none here)
        assert "jobs/" not in o["by_prefix_per_s"]
        # each node lists its own markers every 2 x lease (60 s), give or take the jitter
        assert 6 / 60 * 0.5 <= o["by_cause_per_s"]["own"] <= 6 / 60 * 1.5
        assert o["by_prefix_per_s"]["active/"] == {"LIST": o["by_cause_per_s"]["own"]}
        assert o["by_prefix_per_s"]["registry/"]["PUT"] > 0  # heartbeats
        assert o["msgs_per_node_s"] > 0 and o["bytes_per_node_s"] > 0
        assert o["dollars_per_day"] > 0

    def test_a_crash_is_acted_on_by_its_watchers_and_its_jobs_claimed_once(self) -> None:
        o = simulate(Run("crash", nodes=6, warmup=40, window=45, jobs=3, running=1, seed=2))
        crash = o["crash"]
        assert crash["confirmed_after_kill_s"] is not None
        assert crash["unclaimed"] == 0 and crash["claimed_twice"] == 0
        # one actor: one record delete and each job's old marker once, not one of each per peer (5 here)
        assert crash["death_requests_by_op"]["DELETE"] == 1 + crash["jobs"]
        overhead = crash["death_requests"] - crash["death_requests_on_its_jobs"]
        assert 0 < overhead <= 2 + 3 * 2  # the first watcher's, and two standbys' checks at most
        assert o["goals"][0]["verdict"] == "PASS"
        assert o["membership"]["confirmed_true_deaths"] > 0

    def test_the_command_prints_goals(self, capsys) -> None:  # type: ignore[no-untyped-def]
        assert main(["--scenario", "steady", "--nodes", "4,6", "--warmup", "30", "--window", "10", "--jobs", "2"]) == 0
        out = capsys.readouterr().out
        assert "steady, N=4" in out and "grow linearly" in out
