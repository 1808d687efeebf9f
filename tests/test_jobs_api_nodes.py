"""
The job API on real ``twistd -n gridnode`` nodes sharing a bucket on a real S3-compatible server
(moto on loopback), with tokens minted by PyJWT: the pool-wide listing (gridnode/job_list.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridnode import job_list, keys
from gridnode.jobs import DONE, QUEUED, Job
from tests.helpers import free_port, poll
from tests.media_samples import Clips
from tests.nodes import NodeProcess
from tests.test_auth_nodes import K1, auth, call, done, error, mint, post_clip

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

PREFIX = "grid/"
ALICE, BOB = auth(mint("alice", "upload read cancel")), auth(mint("bob", "upload read cancel"))
ADMIN = auth(mint("ops-team", "admin"))


@pytest.fixture
def pool_args() -> list[str]:
    return []


@pytest.fixture
def pool(tmp_path: Path, s3_endpoint: str, s3_bucket: str, pool_args: list[str]) -> Iterator[list[NodeProcess]]:
    keyring = tmp_path / "tokens.keys"
    keyring.write_text(f"k1 {K1}\n")
    nodes = [NodeProcess(tmp_path / f"n{i}", [
        "--store", f"s3://{s3_bucket}/grid", "--s3-endpoint", s3_endpoint, "--node-id", f"n{i}", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
        "--upload-secret", str(keyring), *pool_args]) for i in range(2)]
    for n in nodes:
        n.start()
    try:
        for n in nodes:
            n.block_until_ready(30)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def keys_of(s3: Any, bucket: str) -> set[str]:
    found: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX):
        found.update(o["Key"][len(PREFIX):] for o in page.get("Contents", []))
    return found


def settled_keys(s3: Any, bucket: str) -> set[str] | None:
    """The bucket's keys once no owner marker is left: a done job's marker goes a moment after
    its done record, and a listing taken between the two races the cleanup."""
    found = keys_of(s3, bucket)
    return None if any(k.startswith("active/") for k in found) else found


def pages(base: str, headers: dict[str, str], limit: int = 100) -> list[list[str]]:
    """Every page of ``GET /jobs`` (bounded), as lists of ids."""
    got: list[list[str]] = []
    cursor = ""
    for _ in range(20):
        status, _, body = call("GET", f"{base}/jobs?limit={limit}{cursor}", headers)
        assert status == 200, body
        got.append([j["id"] for j in body["jobs"]])
        if body["next"] is None:
            return got
        cursor = f"&cursor={body['next']}"
    raise AssertionError("the listing did not end")


class ListingTests:
    def test_250_jobs_of_two_tenants(self, pool: list[NodeProcess], media_clips: Clips, s3_client: Any,
                                     s3_bucket: str) -> None:
        """A job of alice's and one of bob's, converted, and 248 more stored as a node stores them:
        each tenant lists only its own, pages of 100 newest first with no duplicate or gap, and both
        nodes give the same answer; an admin lists both tenants."""
        a, b = pool[0].url, pool[1].url
        real = {}
        for who, headers, node in (("alice", ALICE, a), ("bob", BOB, b)):
            status, _, body = post_clip(node, media_clips.portrait, headers)
            assert status == 201, body
            real[who] = body["id"]
            assert done(node, body["id"], headers)["state"] == DONE
        made: dict[str, list[str]] = {"alice": [real["alice"]], "bob": [real["bob"]]}
        start = time.time() - 10_000
        for n in range(248):
            tenant = ("alice", "bob")[n % 2]
            job = Job.new(keys.new_id(start + n), name=f"c{n}.mov", presets=["poster"], node="n0", size=1,
                          now=start + n, tenant=tenant)
            s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + keys.job_record(job.id), Body=job.dumps())
            for entry in job_list.entries(job):
                s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + entry, Body=b"")
            made[tenant].append(job.id)
        for tenant, headers in (("alice", ALICE), ("bob", BOB)):
            want = sorted(made[tenant], reverse=True)
            from_a, from_b = pages(a, headers), pages(b, headers)
            assert from_a == from_b
            assert [len(p) for p in from_a] == [100, 25]
            assert [i for p in from_a for i in p] == want
        everyone = [i for p in pages(b, ADMIN) for i in p]
        assert everyone == sorted(made["alice"] + made["bob"], reverse=True)
        assert error(call("GET", f"{a}/jobs?tenant=alice", BOB)) == (403, "forbidden")
        status, _, body = call("GET", f"{a}/jobs?state=done", BOB)
        assert [j["id"] for j in body["jobs"]] == [real["bob"]] and json.dumps(body).count('"tenant": "bob"') == 1


class PurgeTests:
    def test_purge_removes_every_key(self, pool: list[NodeProcess], media_clips: Clips, s3_client: Any,
                                     s3_bucket: str) -> None:
        """alice's converted job, purged through the other node: the bucket, listed before and after,
        has lost every key of the job but its tombstone; its GET is 404 gone from both nodes; bob's
        job is untouched."""
        a, b = pool[0].url, pool[1].url
        status, _, body = post_clip(a, media_clips.portrait, ALICE)
        assert status == 201, body
        job = body["id"]
        status, _, theirs = post_clip(a, media_clips.portrait, BOB)
        assert status == 201, theirs
        assert done(a, job, ALICE)["state"] == DONE and done(a, theirs["id"], BOB)["state"] == DONE
        before = poll(lambda: settled_keys(s3_client, s3_bucket), 30, "finished jobs' markers gone")
        mine = {k for k in before if job in k or keys.reversed_id(job) in k}
        assert {f"inputs/{job}/source", f"jobs/{job}.json", f"outputs/{job}/poster.jpg",
                keys.listing_entry("alice", job), keys.listing_entry(None, job)} <= mine
        assert error(call("DELETE", f"{b}/jobs/{job}?purge=true", BOB)) == (404, "not_found")
        status, _, stone = call("DELETE", f"{b}/jobs/{job}?purge=true", ALICE)
        assert status == 200 and stone["state"] == "gone", stone
        _, _, text = call("GET", f"{b}/metrics", auth(mint("prometheus", "ops")))
        assert "\ngridnode_jobs_purged_total 1.0\n" in (text.decode() if isinstance(text, bytes) else text)
        assert keys_of(s3_client, s3_bucket) == (before - mine) | {keys.tombstone(job)}
        for node in (a, b):
            assert error(call("GET", f"{node}/jobs/{job}", ALICE)) == (404, "gone")
        assert call("GET", f"{b}/jobs/{theirs['id']}", BOB)[0] == 200


class RetentionTests:
    @pytest.fixture
    def pool_args(self) -> list[str]:
        return ["--retain-inputs", "0", "--retention-sweep", "1"]

    def test_zero_days(self, pool: list[NodeProcess], media_clips: Clips, long_clip: Path, s3_client: Any,
                       s3_bucket: str) -> None:
        """--retain-inputs 0: a converted job's input is deleted at a sweep, its outputs and record
        kept; a job converting meanwhile keeps its input through the sweeps, and loses it once
        cancelled; a queued job's input (a record written as a node writes it, a day old) is left
        alone; one node holds the sweep's lease."""
        a = pool[0].url
        # two outputs of 30 s of 720p: still converting after another job and a sweep, however fast the machine
        status, _, running = call("POST", f"{a}/jobs?presets=mp4-720p,webm-480p",
                                  {"Content-Type": "application/octet-stream", **ALICE}, long_clip.read_bytes())
        assert status == 201, running
        poll(lambda: call("GET", f"{a}/jobs/{running['id']}", ALICE)[2]["state"] == "transcoding", 60,
             "the long job to start")
        waiting = Job.new(keys.new_id(time.time() - 86400), name="w.mov", presets=["poster"], node="elsewhere",
                          size=5, now=time.time() - 86400, tenant="alice")
        waiting.state = QUEUED
        s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + keys.job_record(waiting.id), Body=waiting.dumps())
        s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + keys.input_source(waiting.id), Body=b"bytes")
        status, _, body = post_clip(a, media_clips.portrait, ALICE)
        assert status == 201, body
        job = body["id"]
        assert done(a, job, ALICE)["state"] == DONE
        poll(lambda: f"inputs/{job}/source" not in keys_of(s3_client, s3_bucket), 30, "the input to be swept")
        left = keys_of(s3_client, s3_bucket)
        assert f"jobs/{job}.json" in left and f"outputs/{job}/poster.jpg" in left
        assert keys.input_source(waiting.id) in left
        # the sweep that took the first input ran while the long job converted, and left its input
        assert call("GET", f"{a}/jobs/{running['id']}", ALICE)[2]["state"] == "transcoding"
        assert keys.input_source(running["id"]) in left
        assert call("DELETE", f"{a}/jobs/{running['id']}", ALICE)[2]["state"] == "cancelled"
        poll(lambda: keys.input_source(running["id"]) not in keys_of(s3_client, s3_bucket), 30,
             "the cancelled job's input to be swept")
        lease = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=PREFIX + keys.retention_lease())["Body"].read())
        assert lease["node"] in ("n0", "n1")
        assert "retention: job" in pool[0].text() + pool[1].text()


class BucketInputTests:
    @pytest.fixture
    def pool_args(self) -> list[str]:
        return ["--input-prefixes", "incoming/"]

    def test_a_job_from_a_key(self, pool: list[NodeProcess], long_clip: Path, s3_client: Any, s3_bucket: str) -> None:
        """A 24 MB video already in the bucket under incoming/alice/: alice's JSON POST converts it with
        no upload (its input copied inside the bucket: UploadPartCopy); bob's POST of it is 404, a
        key outside the prefixes 403, both coded."""
        b = pool[1].url
        s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + "incoming/alice/long.mp4", Body=long_clip.read_bytes())
        s3_client.put_object(Bucket=s3_bucket, Key=PREFIX + "private/alice/long.mp4", Body=b"x")
        body = json.dumps({"input": {"key": "incoming/alice/long.mp4"}, "presets": ["poster"]}).encode()
        json_type = {"Content-Type": "application/json"}
        assert error(call("POST", f"{b}/jobs", {**BOB, **json_type}, body)) == (404, "not_found")
        outside = json.dumps({"input": {"key": "private/alice/long.mp4"}}).encode()
        assert error(call("POST", f"{b}/jobs", {**ALICE, **json_type}, outside)) == (403, "input_forbidden")
        status, _, job = call("POST", f"{b}/jobs", {**ALICE, **json_type}, body)
        assert status == 201, job
        assert job["name"] == "long.mp4" and job["input"]["size"] == long_clip.stat().st_size
        assert done(b, job["id"], ALICE)["state"] == DONE
        stored = s3_client.head_object(Bucket=s3_bucket, Key=PREFIX + keys.input_source(job["id"]))
        assert stored["ContentLength"] == long_clip.stat().st_size
        assert "stored parts copied inside the store" in pool[1].text()
        assert "poster.jpg" in json.dumps(call("GET", f"{b}/jobs/{job['id']}", ALICE)[2])
