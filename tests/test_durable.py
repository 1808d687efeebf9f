"""
Acknowledged means stored: a POST /jobs body streams into the store as it arrives, and the job is
answered only once its input, record and active marker are there (on fakes: an in-memory store
whose calls the test releases one by one, a fake clock, fake media).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from gridnode import jobs
from gridnode.config import build_config
from gridnode.errors import GridnodeError, StorageUnavailable
from gridnode.job_list import entries
from gridnode.jobs import Job
from gridnode.pipeline import JobService
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend
from gridnode.store.streamed import StreamedPut
from tests.fakes import FakeMedia

PART = 1024


class HeldStore:
    """Runs a backend's calls only when the test says: ``calls`` holds them, in order."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], Deferred[Any], Callable[[], Any]]] = []
        self.store = ObjectStore(backend, self.run)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((fn.__name__, args, d, lambda: fn(*args, **kwargs)))
        return d

    def release_all(self, limit: int = 1000) -> list[str]:
        """Run every held call (and those they lead to), oldest first; their names."""
        names = []
        for _ in range(limit):
            if not self.calls:
                return names
            name, _, d, call = self.calls.pop(0)
            names.append(name)
            maybeDeferred(call).chainDeferred(d)
        raise AssertionError("calls keep coming")


class DurableTests:
    @pytest.fixture(autouse=True)
    def setup(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.backend = MemoryBackend(part_size=PART)
        self.held = HeldStore(self.backend)
        self.media = FakeMedia(tmp_path)
        config = build_config(cli={"work-dir": str(tmp_path / "work"), "workers": 1, "queue": 2,
                                   "min-free": 0}).with_identity("n1")
        self.jobs = JobService(self.clock, config, self.held.store, self.media, now=self.clock.seconds)

    def admitted(self, length: int | None) -> Any:
        route = self.jobs.admit(length)
        assert isinstance(route, Deferred)  # a body of more than a part streams: begun first
        got: list[Any] = []
        route.addBoth(got.append)
        assert self.held.release_all() == ["begin_upload"]
        return got[0]

    def test_no_answer_before_input_record_and_marker(self) -> None:
        """The job's answer waits for the completion of the input, then the active marker, then the
        record; when it comes, all three are in the store. Should the node die at any point before
        it, no record is left without its marker: a retried Idempotency-Key is answered with the
        record's job, and only a marked job is adopted (one unmarked would be a 201 for a job no
        node runs)."""
        body = os.urandom(3 * PART + 100)
        spool = self.admitted(len(body))
        spool.write(body)
        assert [c[0] for c in self.held.calls] == ["put_part"] * 3  # full parts go as they arrive
        answered: list[Any] = []
        self.jobs.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(answered.append)
        order = []
        while self.held.calls:
            name, args, d, call = self.held.calls.pop(0)
            order.append((name, args[0] if name.startswith("put") else None))
            assert not answered, f"answered before {name} ran"
            maybeDeferred(call).chainDeferred(d)
            if order[-1][1] is not None and order[-1][1].startswith("jobs/"):
                job_id = order[-1][1][len("jobs/"):-len(".json")]
                assert self.backend.get_bytes(f"active/n1/{job_id}"), "a record without its marker"
        job = answered[0]
        assert job.state == jobs.QUEUED
        assert order == [("put_part", f"inputs/{job.id}/source")] * 4 + [("finish_upload", None),
                                                                          ("put_bytes", f"active/n1/{job.id}"),
                                                                          ("put_bytes", f"jobs/{job.id}.json"),
                                                                          *(("put_bytes", k) for k in entries(job))]
        assert self.backend.get_bytes(f"inputs/{job.id}/source")[0] == body
        assert self.backend.list_uploads("") == []

    def test_parts_in_flight_are_bounded(self) -> None:
        """However fast the body arrives, at most IN_FLIGHT parts are on their way (memory stays
        bounded); the rest follow as they finish."""
        spool = self.admitted(None)
        spool.write(b"x" * (10 * PART))
        assert len(self.held.calls) == 4
        self.held.release_all()
        assert len(self.backend._uploads[self.backend.list_uploads("")[0][1]][1]) == 10

    def test_store_down_at_admission(self) -> None:
        """The multipart upload cannot be begun: 503 storage_unavailable before any body byte,
        with no spool file and no slot held."""
        route = self.jobs.admit(None)
        got: list[Any] = []
        route.addBoth(got.append)
        _, _, d, _ = self.held.calls.pop(0)
        d.errback(StorageUnavailable("bucket unreachable"))
        assert got[0].value.code == "storage_unavailable" and got[0].value.retry_after > 0
        assert os.listdir(self.jobs.spool.folder) == [] and not self.jobs.uploading

    def test_store_down_mid_stream(self) -> None:
        """A part the store refused (after the client's retries) refuses the body at its next
        bytes with 503 storage_unavailable; discarded, the upload leaves nothing in the store."""
        spool = self.admitted(None)
        spool.write(b"x" * (2 * PART))
        _, _, d, _ = self.held.calls.pop(0)
        d.errback(StorageUnavailable("bucket unreachable"))
        with pytest.raises(GridnodeError) as e:
            spool.write(b"y")
        assert e.value.code == "storage_unavailable" and e.value.status == 503
        spool.discard()
        self.held.release_all()
        assert self.backend.list_uploads("") == [] and self.backend.list("").items == []
        assert not os.path.exists(spool.path) and not self.jobs.uploading

    def test_cut_upload_aborts(self) -> None:
        """A body cut off mid-way (the request's abort) aborts its multipart upload once the parts
        in flight have landed: nothing is left behind."""
        spool = self.admitted(None)
        spool.write(b"x" * (3 * PART))
        spool.abort()
        assert self.held.release_all()[-1] == "abort_upload"
        assert self.backend.list_uploads("") == [] and self.backend.list("").items == []

    def test_refused_after_the_input_is_stored(self) -> None:
        """Not a video: the probe refuses it while the input completes; the stored object is
        deleted, and the record is never written."""
        self.media.probe_error = GridnodeError("not a video", code="not_a_video", status=422)
        spool = self.admitted(2 * PART)
        spool.write(b"x" * (2 * PART))
        answered: list[Any] = []
        self.jobs.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(answered.append)
        self.held.release_all()
        assert answered[0].value.code == "not_a_video"
        assert self.backend.list("").items == [] and self.backend.list_uploads("") == []

    def test_small_body_is_one_put(self) -> None:
        """A body no longer than a part is put whole once complete: no multipart upload."""
        spool = self.jobs.admit(PART)
        assert not isinstance(spool, Deferred)
        spool.write(b"v" * PART)
        answered: list[Any] = []
        self.jobs.submit(spool, name="m.mov", presets=None, checksum=None).addBoth(answered.append)
        assert self.held.release_all() == ["put_file", "put_bytes", "put_bytes", "put_bytes", "put_bytes"]
        assert self.backend.get_bytes(f"inputs/{answered[0].id}/source")[0] == b"v" * PART

    def test_streams_only_on_a_parted_store(self) -> None:
        """A store without a part size (a local folder) takes bodies whole."""
        put = StreamedPut(ObjectStore.synchronous(MemoryBackend()), "inputs/J/source", "/nonexistent")
        assert not put.streams(None) and not put.streams(10**9)


class CopyFirstTests:
    def test_stored_parts_are_copied_not_sent(self, tmp_path: Path) -> None:
        """A tus upload's committed chunks (5 MiB or more each) become the input's first parts by
        copies inside the store; only the bytes past them are read from the file and sent."""
        mib = 1024 * 1024
        backend = MemoryBackend(part_size=8 * mib)
        first, second, tail = os.urandom(5 * mib), os.urandom(6 * mib), b"last chunk"
        backend.put_bytes("uploads/U/part-1", first)
        backend.put_bytes("uploads/U/part-2", second)
        path = tmp_path / "assembled"
        path.write_bytes(first + second + tail)
        held = HeldStore(backend)
        put = StreamedPut(held.store, "inputs/U/source", str(path))
        assert put.copy_first([("uploads/U/part-1", len(first)), ("uploads/U/part-2", len(second))])
        done: list[Any] = []
        put.finish(path.stat().st_size).addBoth(done.append)
        calls = []
        while held.calls:
            name, args, d, call = held.calls.pop(0)
            seen = {"put_part": args[2:3] + args[4:], "copy_part": args[-1]}.get(name)
            calls.append((name, seen))
            maybeDeferred(call).chainDeferred(d)
        assert calls == [("begin_upload", None), ("copy_part", "uploads/U/part-1"),
                         ("copy_part", "uploads/U/part-2"), ("put_part", (3, 11 * mib, len(tail))),
                         ("finish_upload", None)]
        assert done[0].size == path.stat().st_size
        assert backend.get_bytes("inputs/U/source")[0] == first + second + tail

    def test_small_chunks_are_put_whole(self, tmp_path: Path) -> None:
        """A chunk under S3's smallest part cannot be copied as one: the assembled file is put
        whole instead."""
        put = StreamedPut(ObjectStore.synchronous(MemoryBackend(part_size=8 * 1024 * 1024)), "inputs/U/source",
                          str(tmp_path / "f"))
        assert not put.copy_first([("uploads/U/part-1", 1000)])
        assert not StreamedPut(ObjectStore.synchronous(MemoryBackend()), "k/x", "f").copy_first([("a/b", 10**8)])


class HttpTests:
    """The same, through a node's whole HTTP side (tests/test_limits.py's Site) on a parted store."""

    def site(self, tmp_path: Path) -> Any:
        from tests.test_limits import Site

        return Site(tmp_path, max_upload_mb=4, backend=MemoryBackend(part_size=64 * 1024))

    def test_201_comes_with_input_record_and_marker(self, tmp_path: Path) -> None:
        """A chunked POST /jobs streams in parts; its 201 finds the input, record and marker stored."""
        from tests.test_limits import chunked

        node = self.site(tmp_path)
        body = os.urandom(300 * 1024)
        r, _ = node.post(chunked("/jobs?name=m.mov", {}, body))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert node.backend.get_bytes(f"inputs/{job_id}/source")[0] == body
        record = Job.loads(node.backend.get_bytes(f"jobs/{job_id}.json")[0])
        assert {i.key for i in node.backend.list("").items} == {f"inputs/{job_id}/source", f"jobs/{job_id}.json",
                                                               f"active/{node.jobs.node_id}/{job_id}", *entries(record)}

    def test_store_down_at_admission_reads_no_body(self, tmp_path: Path) -> None:
        """The store refuses to begin the upload: 503 storage_unavailable with Retry-After, before
        the body is read; nothing kept."""
        from tests.test_limits import Connection, chunked

        node = self.site(tmp_path)

        def down(*a: Any, **kw: Any) -> Any:
            raise StorageUnavailable("bucket unreachable")

        node.backend.begin_upload = down  # type: ignore[method-assign]
        conn = Connection(node.site)
        request = chunked("/jobs?name=m.mov", {}, os.urandom(2 * 1024 * 1024))
        head = request.index(b"\r\n\r\n") + 4
        conn.send(request[:head])  # the answer comes before any body byte
        r = conn.answer("POST")
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
        assert int(r.headers["Retry-After"]) > 0
        assert node.spool() == [] and not node.jobs.uploading

    def test_store_down_mid_stream(self, tmp_path: Path) -> None:
        """A part the store refuses stops the body: 503 storage_unavailable + Retry-After, the
        connection closed, no spool file, no multipart upload and no object left."""
        from tests.test_limits import chunked

        node = self.site(tmp_path)
        real = node.backend.put_part
        calls: list[int] = []

        def flaky(*a: Any, **kw: Any) -> Any:
            calls.append(1)
            if len(calls) > 2:
                raise StorageUnavailable("bucket unreachable")
            return real(*a, **kw)

        node.backend.put_part = flaky  # type: ignore[method-assign]
        r, conn = node.post(chunked("/jobs?name=m.mov", {}, os.urandom(2 * 1024 * 1024)))
        assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
        assert int(r.headers["Retry-After"]) > 0 and r.headers["Connection"] == "close"
        assert node.spool() == [] and not node.jobs.uploading
        assert node.backend.list_uploads("") == [] and node.backend.list("").items == []


class S3CompletionTests:
    def test_a_retried_completion_that_had_landed(self) -> None:
        """CompleteMultipartUpload retried after a timeout meets NoSuchUpload (the first try
        completed the object): the object of the right size is the answer, not a failure."""
        from botocore.exceptions import ClientError

        from gridnode.store.s3 import S3Backend

        class Client:
            size = 10

            def complete_multipart_upload(self, **kw: Any) -> Any:
                raise ClientError({"Error": {"Code": "NoSuchUpload"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                                  "CompleteMultipartUpload")

            def head_object(self, **kw: Any) -> Any:
                return {"ContentLength": self.size, "ETag": '"abc-2"'}

        client = Client()
        backend = S3Backend("bucket", client=client)
        info = backend.finish_upload("inputs/J/source", "u1", [("e1", 6), ("e2", 4)])
        assert (info.size, info.etag) == (10, "abc-2")
        client.size = 3  # another object there: the completion did fail
        with pytest.raises(GridnodeError) as e:
            backend.finish_upload("inputs/J/source", "u1", [("e1", 6), ("e2", 4)])
        assert e.value.code == "not_found"
