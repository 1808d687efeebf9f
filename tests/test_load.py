"""A bounded load on one node over loopback: excess uploads are told to come back, nothing leaks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.helpers import free_port, sleep
from tests.media_samples import Clips
from tests.nodes import NodeProcess, get_json, upload, wait_job

pytestmark = pytest.mark.integration


class LoadTests:
    @pytest_twisted.inlineCallbacks
    def test_two_hundred_concurrent_uploads(self, tmp_path: Path, media_clips: Clips) -> None:
        """200 concurrent uploads to a node with room for 6 jobs: the excess gets 503 + Retry-After,
        every accepted job finishes, and no spool or scratch file is left."""
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                      f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                      "--workers", "2", "--queue", "4"])
        node.start()
        try:
            base = yield node.wait_ready()

            resets = []

            def one(_: int) -> tuple[int, dict[str, str], dict[str, object]]:
                try:
                    return upload(base, media_clips.portrait, "poster")
                except ConnectionResetError:
                    # Seen under this burst on a loaded machine while the node listened with
                    # Twisted's default backlog of 50 (now 1024: endpoints.with_backlog); a client
                    # retries once, as clients do.
                    resets.append(1)
                    return upload(base, media_clips.portrait, "poster")

            def burst() -> list[tuple[int, dict[str, str], dict[str, object]]]:
                with ThreadPoolExecutor(max_workers=200) as pool:
                    return list(pool.map(one, range(200)))

            results = yield deferToThread(burst)
            accepted = [body for status, _, body in results if status == 201]
            refused = [(head, body) for status, head, body in results if status != 201]
            assert len(accepted) + len(refused) == 200
            assert len(resets) <= 20, f"{len(resets)} connections reset"
            assert 1 <= len(accepted) <= 200
            assert refused, "a node with room for 6 jobs refused nothing"
            for head, body in refused:
                assert body["error"]["code"] == "busy" and int(head["retry-after"]) > 0  # type: ignore[index]
            for body in accepted:
                job = yield wait_job(base, str(body["id"]), timeout=180)
                assert job["state"] == "done", job
            status, health = get_json(base + "/health")
            assert status == 200 and health["state"] == "ok"
            work = tmp_path / "gridnode-work"
            for _ in range(300):  # bounded: a job's spool file goes a moment after it shows done
                if not os.listdir(work / "spool") and not os.listdir(work / "scratch"):
                    break
                yield sleep(0.1)
            assert os.listdir(work / "spool") == [] and os.listdir(work / "scratch") == []
        finally:
            node.stop()
