"""
The pool-wide job listing (gridnode/job_list.py): its keys, its query and cursor, pages read from
the memory store, and ``GET /jobs`` through a whole node's resource tree with tokens
(tests/test_access.py's `MemoryNode`). Real nodes: tests/test_job_list_nodes.py.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from gridnode import job_list, keys
from gridnode.errors import GridnodeError
from gridnode.jobs import DONE, FAILED, QUEUED, Job
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from tests.test_access import ADMIN, ALICE, BOB, MemoryNode, code

T0 = 1_790_000_000.0


def seed(store: ObjectStore, count: int, tenants: tuple[str, ...] = ("alice", "bob")) -> dict[str, list[str]]:
    """``count`` jobs stored as a node stores them (record and listing entries), one a second,
    tenants in turn, every third failed; each tenant's ids, newest first."""
    ids: dict[str, list[str]] = {t: [] for t in tenants}
    for n in range(count):
        now = T0 + n
        job_id = keys.new_id(now)
        tenant = tenants[n % len(tenants)]
        job = Job.new(job_id, name=f"clip{n}.mov", presets=["poster"], node="n1", size=10, now=now, tenant=tenant)
        job.state = FAILED if n % 3 == 0 else DONE
        store.backend.put_bytes(keys.job_record(job_id), job.dumps())
        for entry in job_list.entries(job):
            store.backend.put_bytes(entry, b"")
        ids[tenant].insert(0, job_id)
    return ids


def read_all(store: ObjectStore, query: job_list.Query, most: int = 40) -> list[list[Job]]:
    pages: list[list[Job]] = []
    while len(pages) < most:
        got: dict[str, Any] = {}
        job_list.page(store, query).addCallback(got.update)
        pages.append(got["jobs"])
        if got["next"] is None:
            return pages
        query = query.resumed(got["next"])
    raise AssertionError("the listing did not end")


class KeyTests:
    @given(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 48) - 1))
    def test_reversed_ids_sort_newest_first(self, a: int, b: int) -> None:
        """An id made later sorts before an earlier one once reversed; reversing twice is the id."""
        x, y = keys.first_id(a / 1000), keys.first_id(b / 1000)
        assert (x < y) == (keys.reversed_id(x) > keys.reversed_id(y))
        assert keys.reversed_id(keys.reversed_id(x)) == x and keys.is_id(keys.reversed_id(x))

    def test_ids_carry_their_time(self) -> None:
        """`new_id` and `first_id` agree on the millisecond; `id_seconds` reads it back."""
        made = keys.new_id(T0 + 0.123)
        assert made[:10] == keys.first_id(T0 + 0.123)[:10] and keys.id_seconds(made) == pytest.approx(T0 + 0.123)

    @given(st.text(min_size=1, max_size=256), st.text(min_size=1, max_size=256))
    def test_tenants_never_share_a_prefix(self, a: str, b: str) -> None:
        """Any two distinct subs get distinct, valid prefixes, neither a prefix of the other's."""
        pa, pb = keys.listing_prefix(a), keys.listing_prefix(b)
        assert keys.check_prefix(pa) and (a == b) == (pa == pb)
        assert a == b or not (pa.startswith(pb) or pb.startswith(pa))
        assert pa != keys.listing_prefix(None) and pa != keys.listing_prefix("")
        assert keys.check_key(keys.listing_entry(a, keys.new_id()))  # a job of any tenant can be listed

    def test_the_longest_tenants(self) -> None:
        """256 characters of 4 UTF-8 bytes each still make an entry within the 1024-byte key limit."""
        for sub in ("\U0001F600" * 256, "a" * 256, "é" * 256):
            assert len(keys.listing_entry(sub, keys.new_id()).encode()) <= 1024


class QueryTests:
    def test_hostile_parameters(self) -> None:
        """Each bad parameter is a coded 400 (403 for another tenant), never a 500."""
        for args, want in [({"state": "nope"}, "bad_query"), ({"limit": "0"}, "bad_query"),
                           ({"limit": "101"}, "bad_query"), ({"limit": "-1"}, "bad_query"),
                           ({"limit": "1e3"}, "bad_query"), ({"limit": "\u00b2"}, "bad_query"),
                           ({"limit": "\u0663"}, "bad_query"), ({"since": "yesterday"}, "bad_query"),
                           ({"since": "nan"}, "bad_query"), ({"until": "inf"}, "bad_query"),
                           ({"since": "2026-01-01T00:00:00"}, "bad_query"), ({"until": "-5"}, "bad_query"),
                           ({"cursor": "!!!"}, "bad_cursor"), ({"cursor": "x" * 500}, "bad_cursor"),
                           ({"cursor": base64.urlsafe_b64encode(b"1.../..x").decode()}, "bad_cursor"),
                           ({"cursor": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "bad_cursor"),
                           ({"tenant": "bob"}, "forbidden")]:
            with pytest.raises(GridnodeError) as e:
                job_list.Query.parse(args, "alice")
            assert e.value.code == want and e.value.status in (400, 403), args

    def test_a_cursor_is_bound_to_its_query(self) -> None:
        """A cursor made for one query is refused for another (tenant, state, since, until); its
        limit may change."""
        first = job_list.Query.parse({"state": "done"}, "alice")
        cursor = first.cursor(keys.reversed_id(keys.new_id(T0)))
        assert job_list.Query.parse({"state": "done", "cursor": cursor, "limit": "7"}, "alice").after
        for args, tenant in [({"state": "failed"}, "alice"), ({"state": "done"}, "bob"), ({}, "alice"),
                             ({"state": "done", "since": "5"}, "alice")]:
            with pytest.raises(GridnodeError) as e:
                job_list.Query.parse({**args, "cursor": cursor}, tenant)
            assert e.value.code == "bad_cursor"

    def test_times(self) -> None:
        """since/until take Unix seconds or ISO 8601 with a zone."""
        q = job_list.Query.parse({"since": "2026-01-02T00:00:00Z", "until": "1767400000.5"}, None)
        assert q.since == 1767312000.0 and q.until == 1767400000.5 and q.tenant is None


class PageTests:
    def test_250_jobs_of_two_tenants(self) -> None:
        """Each tenant lists only its own, pages of 100 newest first, no duplicate and no gap; the
        pool's listing (an admin's) has them all."""
        store = ObjectStore.synchronous(MemoryBackend())
        ids = seed(store, 250)
        for tenant in ("alice", "bob"):
            pages = read_all(store, job_list.Query(tenant, limit=100))
            assert [len(p) for p in pages] == [100, 25]
            assert [j.id for p in pages for j in p] == ids[tenant]
            assert {j.tenant for p in pages for j in p} == {tenant}
        everyone = [j.id for p in read_all(store, job_list.Query(None, limit=100)) for j in p]
        assert everyone == sorted(ids["alice"] + ids["bob"], reverse=True)

    def test_one_list_per_page(self) -> None:
        """A page costs one LIST and a GET per job listed."""
        store = ObjectStore.synchronous(MemoryBackend())
        seed(store, 30)
        calls: list[str] = []
        for name in ("list", "get_bytes"):
            real = getattr(store.backend, name)
            setattr(store.backend, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
        got: dict[str, Any] = {}
        job_list.page(store, job_list.Query("alice", limit=10)).addCallback(got.update)
        assert len(got["jobs"]) == 10 and got["next"]
        assert calls.count("list") == 1 and calls.count("get_bytes") == 10

    def test_filters(self) -> None:
        """state keeps the jobs in that state (a page may be short); since/until bound by creation time."""
        store = ObjectStore.synchronous(MemoryBackend())
        ids = seed(store, 60)
        failed = [j.id for p in read_all(store, job_list.Query("alice", state=FAILED, limit=7)) for j in p]
        assert failed and all(store_state(store, i) == FAILED for i in failed)
        assert failed == [i for i in ids["alice"] if store_state(store, i) == FAILED]
        window = [j.id for p in read_all(store, job_list.Query("alice", since=T0 + 10, until=T0 + 20, limit=3))
                  for j in p]
        assert window == [i for i in ids["alice"] if T0 + 10 <= keys.id_seconds(i) < T0 + 20]
        assert read_all(store, job_list.Query("alice", state=QUEUED)) == [[]]

    def test_a_purged_record_is_left_out(self) -> None:
        """An entry whose record is gone does not break the page."""
        store = ObjectStore.synchronous(MemoryBackend())
        ids = seed(store, 10)
        store.backend.delete(keys.job_record(ids["bob"][1]))
        listed = [j.id for p in read_all(store, job_list.Query("bob")) for j in p]
        assert listed == [ids["bob"][0]] + ids["bob"][2:]


def store_state(store: ObjectStore, job_id: str) -> str:
    return Job.loads(store.backend.get_bytes(keys.job_record(job_id))[0]).state


@pytest.fixture
def node(tmp_path: Path) -> MemoryNode:
    return MemoryNode(tmp_path, Clock())


class HttpTests:
    def test_tenants_list_their_own(self, node: MemoryNode) -> None:
        """Jobs uploaded by alice and bob: each lists its own (from the store), newest first; an
        admin lists all, or one tenant with tenant=; bob cannot name alice (403)."""
        made = {"alice": [], "bob": []}
        for who, headers in [("alice", ALICE), ("bob", BOB), ("alice", ALICE)]:
            r = node.upload(headers)
            assert r.status_code == 201, r.text
            made[who].insert(0, r.json()["id"])
        for who, headers in [("alice", ALICE), ("bob", BOB)]:
            r = node.request("GET", "/jobs", headers)
            assert r.status_code == 200 and [j["id"] for j in r.json()["jobs"]] == made[who]
            assert r.json()["next"] is None
        assert len(node.request("GET", "/jobs", ADMIN).json()["jobs"]) == 3
        assert [j["id"] for j in node.request("GET", "/jobs?tenant=bob", ADMIN).json()["jobs"]] == made["bob"]
        assert code(node.request("GET", "/jobs?tenant=alice", BOB)) == (403, "forbidden")
        assert [j["id"] for j in node.request("GET", "/jobs?tenant=bob", BOB).json()["jobs"]] == made["bob"]

    def test_pages_and_hostile_queries(self, node: MemoryNode) -> None:
        """limit and cursor page through; a forged, foreign or repeated parameter is a coded 400."""
        seed(node.store, 9)
        first = node.request("GET", "/jobs?limit=2", ALICE).json()
        second = node.request("GET", f"/jobs?limit=2&cursor={first['next']}", ALICE).json()
        assert len(first["jobs"]) == len(second["jobs"]) == 2 and first["jobs"][-1]["id"] > second["jobs"][0]["id"]
        assert code(node.request("GET", f"/jobs?cursor={first['next']}", BOB)) == (400, "bad_cursor")
        forged = base64.urlsafe_b64encode(b"1." + b"Z" * 26 + b".0000000000000000").decode()
        assert code(node.request("GET", f"/jobs?cursor={forged}", ALICE)) == (400, "bad_cursor")
        for query in ("limit=1&limit=2", "sort=name", "state=%00", "view=all", "since=1e400", "view=node&limit=5"):
            assert code(node.request("GET", f"/jobs?{query}", ALICE)) == (400, "bad_query"), query


def all_keys(node: MemoryNode) -> set[str]:
    return {i.key for i in node.store.backend.list("").items}


class PurgeTests:
    def test_purge_removes_every_key_of_the_job(self, node: MemoryNode) -> None:
        """A done job purged: every key of it is gone but its tombstone; its GET is 404 gone (to
        its tenant; bob's is the plain 404); its results 404; bob's job is untouched."""
        job = node.upload(ALICE).json()["id"]
        other = node.upload(BOB).json()["id"]
        node.media.hooks[job][0]()  # ffmpeg started
        node.media.finish(job)
        assert node.request("GET", f"/jobs/{job}", ALICE).json()["state"] == "done"
        before = all_keys(node)
        mine = {k for k in before if job in k or keys.reversed_id(job) in k}
        assert {f"inputs/{job}/source", f"jobs/{job}.json", f"outputs/{job}/video.mp4"} <= mine
        assert code(node.request("DELETE", f"/jobs/{job}", ALICE)) == (409, "already_final")
        assert code(node.request("DELETE", f"/jobs/{job}?purge=true", BOB)) == (404, "not_found")
        assert code(node.request("DELETE", f"/jobs/{job}?purge=yes", ALICE)) == (400, "bad_query")
        r = node.request("DELETE", f"/jobs/{job}?purge=true", ALICE)
        assert r.status_code == 200 and r.json()["state"] == "gone", r.text
        after = all_keys(node)
        assert after == (before - mine) | {keys.tombstone(job)}
        assert code(node.request("GET", f"/jobs/{job}", ALICE)) == (404, "gone")
        assert code(node.request("GET", f"/jobs/{job}", BOB)) == (404, "not_found")
        assert code(node.request("DELETE", f"/jobs/{job}?purge=true", ALICE)) == (404, "gone")
        assert code(node.request("GET", f"/results/{job}/video.mp4", ALICE)) == (404, "not_found")
        assert job not in node.request("GET", "/jobs", ALICE).text
        assert node.request("GET", f"/jobs/{other}", BOB).status_code == 200

    def test_a_running_job_is_cancelled_first(self, node: MemoryNode) -> None:
        """Purging a job still converting cancels it, then removes it; nothing of it is left."""
        job = node.upload(ALICE).json()["id"]
        r = node.request("DELETE", f"/jobs/{job}?purge=true", ALICE)
        assert r.status_code == 200, r.text
        assert {k for k in all_keys(node) if job in k or keys.reversed_id(job) in k} == {keys.tombstone(job)}
        assert code(node.request("GET", f"/jobs/{job}", ADMIN)) == (404, "gone")
