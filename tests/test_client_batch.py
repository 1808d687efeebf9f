"""The batch scheduler: bounded parallelism, one failure named and the rest carried on; on fakes."""

from __future__ import annotations

import json
import random

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from gridnode.client.api import GridClient
from gridnode.client.batch import FileResult, result_folder, run_batch, table, upload_folder
from gridnode.client.failures import user_error
from gridnode.client.nodes import NodeInfo
from gridnode.errors import GridnodeError


class Fakes:
    """Each file's work waits on a Deferred the test fires; how many run at once is recorded."""

    def __init__(self) -> None:
        self.waiting: dict[int, Deferred[None]] = {}
        self.running = 0
        self.most = 0

    async def one(self, index: int, result: FileResult) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            d: Deferred[None] = Deferred()
            self.waiting[index] = d
            await d
            if result.path.endswith(".txt"):
                raise GridnodeError("not a video", code="not_a_video", status=422)
            if result.path.endswith(".bug"):
                raise KeyError("detail")
            result.job, result.node, result.state = f"J{index}", f"node{index % 2}", "done"
        finally:
            self.running -= 1


def start(paths: list[str], parallel: int, clock: Clock, failed: list[FileResult]) -> tuple[Fakes, Deferred]:
    fakes = Fakes()
    d = ensureDeferred(run_batch(paths, fakes.one, parallel=parallel, clock=clock.seconds, to_error=user_error,
                                 on_failed=failed.append))
    return fakes, d


class RunBatchTests:
    def test_at_most_parallel_at_once_and_all_run(self) -> None:
        """6 files, --parallel 4: four start, the others start as those finish; all come back in order."""
        clock, failed = Clock(), []
        fakes, d = start([f"f{i}.mp4" for i in range(6)], 4, clock, failed)
        assert sorted(fakes.waiting) == [0, 1, 2, 3]
        clock.advance(2)
        fakes.waiting[1].callback(None)
        assert sorted(fakes.waiting) == [0, 1, 2, 3, 4]
        for i in (0, 2, 3, 4):
            fakes.waiting[i].callback(None)
        fakes.waiting[5].callback(None)
        results = self.successResultOf(d)
        assert fakes.most == 4
        assert [r.path for r in results] == [f"f{i}.mp4" for i in range(6)]
        assert [r.state for r in results] == ["done"] * 6 and failed == []
        assert results[1].seconds == 2.0

    def test_a_bad_file_is_named_and_the_rest_carry_on(self) -> None:
        """A not_a_video file and a client bug are each reported once; the others finish."""
        clock, failed = Clock(), []
        fakes, d = start(["a.mp4", "notes.txt", "b.mp4", "x.bug"], 2, clock, failed)
        for _ in range(4):
            for i in list(fakes.waiting):
                if not fakes.waiting[i].called:
                    fakes.waiting[i].callback(None)
        results = self.successResultOf(d)
        assert [(r.state, r.error.code if r.error else None) for r in results] == [
            ("done", None), ("error", "not_a_video"), ("done", None), ("error", "internal_error")]
        assert [r.path for r in failed] == ["notes.txt", "x.bug"]
        assert [r.failed for r in results] == [False, True, False, True]

    def successResultOf(self, d: Deferred) -> list[FileResult]:  # noqa: N802 - trial's name
        out: list[list[FileResult]] = []
        d.addCallback(out.append)
        assert out, "the batch did not finish"
        return out[0]


class TableTests:
    def test_header_and_rows(self) -> None:
        """One header row, one row a file, columns aligned, the error's code last."""
        rows = [FileResult("/in/a.mp4", "J1", "node1", "done", 1.25),
                FileResult("notes.txt", None, None, "error", 0.1, GridnodeError("m", code="not_a_video"))]
        lines = table(rows).splitlines()
        assert lines[0].split() == ["FILE", "JOB", "NODE", "STATE", "SECONDS", "ERROR"]
        assert lines[1].split() == ["a.mp4", "J1", "node1", "done", "1.2"]
        assert lines[2].split() == ["notes.txt", "-", "-", "error", "0.1", "not_a_video"]
        assert len({line.index("JOB") if "JOB" in line else lines[0].index("JOB") for line in lines}) == 1

    def test_results_layout(self) -> None:
        """fetch goes to DIR/<job>/; a job id cannot climb out."""
        assert result_folder("out", "01ABC") == "out/01ABC"
        assert result_folder("out", "../x") == "out/x"

    def test_upload_results_are_named_for_the_file(self) -> None:
        """upload --output: DIR/<file name without extension>/; two files of one name in a batch
        get their job id too, so neither overwrites the other; a job id cannot climb out."""
        paths = ["a/movie.mov", "b/movie.mp4", "c/talk.mp4", "d/.hidden", "e/notes"]
        assert upload_folder("out", "c/talk.mp4", "J3", paths) == "out/talk"
        assert upload_folder("out", "a/movie.mov", "J1", paths) == "out/movie-J1"
        assert upload_folder("out", "b/movie.mp4", "../J2", paths) == "out/movie-J2"
        assert upload_folder("out", "d/.hidden", "J4", paths) == "out/.hidden"
        assert upload_folder("out", "e/notes", "J5", paths) == "out/notes"


class SpreadTests:
    def test_uploads_in_flight_count_when_choosing(self) -> None:
        """Nodes answer /health all idle (a node counts a job only once it answered the upload): the
        client's own uploads in flight make the second choice another node, for any seed."""
        class Health(Resource):
            isLeaf = True

            def render_GET(self, request: object) -> bytes:  # noqa: N802 - Twisted's name
                return json.dumps({"state": "ok", "running": 0, "queued": 0, "workers": 1}).encode()

        nodes = [NodeInfo(f"n{i}", f"http://n{i}.test") for i in range(3)]
        for seed in range(20):
            client = GridClient(Clock(), StubTreq(Health()), nodes, rng=random.Random(seed))
            first = self.result(ensureDeferred(client._upload_order()))[0]
            client.sending[first.id] = 1
            second = self.result(ensureDeferred(client._upload_order()))[0]
            assert second.id != first.id, seed

    def result(self, d: Deferred) -> list:
        out: list = []
        d.addBoth(out.append)
        assert out and isinstance(out[0], list), out
        return out[0]
