"""Form uploads on a real node: curl's own multipart/form-data (``curl -F``), twistd, ffmpeg."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers import free_port
from tests.media_samples import Clips
from tests.nodes import NodeProcess, spool_emptied, wait_job

pytestmark = pytest.mark.integration


def curl(*args: str) -> tuple[int, dict[str, object]]:
    """curl's answer: (status, JSON body)."""
    out = subprocess.run(["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


class CurlFormTests:
    @pytest_twisted.inlineCallbacks
    def test_curl_form_converts(self, tmp_path: Path, media_clips: Clips) -> None:
        """``curl -F file=@clip.mp4 URL/jobs`` converts; the form's presets field is used and the
        job's sha256 is the file's; a form without a file part is 400 bad_form and leaves nothing."""
        node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "f1",
                                      "--min-free", "0"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, job = curl("-F", f"file=@{media_clips.landscape}", "-F", "presets=poster", f"{base}/jobs")
            assert status == 201, job
            assert job["presets"] == ["poster"] and job["name"] == media_clips.landscape.name
            assert job["sha256"] == hashlib.sha256(media_clips.landscape.read_bytes()).hexdigest()
            done = yield wait_job(base, str(job["id"]))
            assert done["state"] == "done", done
            status, answer = curl("-F", "presets=poster", f"{base}/jobs")
            assert status == 400 and answer["error"]["code"] == "bad_form", answer  # type: ignore[index]
            assert (yield spool_emptied(tmp_path / "gridnode-work" / "spool")) == []
        finally:
            node.stop()
