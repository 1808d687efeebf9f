"""
Small parts of the HTTP contract (docs/api.md) on a whole node's resource tree in memory
(tests/test_access.py's MemoryNode: fakes, no sockets): an empty ``presets=``, malformed job ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from tests.test_access import ALICE, MemoryNode, code


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
