"""
schemathesis against a real ``twistd -n gridnode`` node (a ``file:`` store, a token keyring, real
ffmpeg): every operation of the OpenAPI document (gridnode/web/openapi.yaml), with an admin token
and with none, examples, coverage cases (edge and hostile values, methods the path does not take)
and fuzzing. No answer may be a 500 (or any 5xx but a busy, timed-out or full node's), and every
answer must match the document: its status, content type, headers and body schema.

The node holds a finished job and a tus upload in progress, and schemathesis draws their ids (and
the job's outputs and signed URL) half the time, so the answers of real jobs are checked too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import yaml
from openapi_spec_validator import validate

from gridnode.web.api import OPENAPI
from tests.helpers import free_port, poll
from tests.media_samples import Clips
from tests.nodes import BIN, NodeProcess, request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg="
#: what is checked of every answer (schemathesis's other checks judge an API's design, not its document)
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance")
#: 5xx answers that are no fault: a full node (busy), its store or ffprobe out of time, its disk full
EXPECTED = '["2xx", "3xx", "4xx", "503", "504", "507"]'


@dataclass(frozen=True)
class Live:
    node: NodeProcess
    admin: str
    job: dict[str, object]
    upload: str


def mint(sub: str, scope: str) -> str:
    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time() + 3600)}, SECRET, algorithm="HS256",
                      headers={"kid": "k1"})


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, media_clips: Clips) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("openapi")
    (tmp / "tokens.keys").write_text(f"k1 {SECRET}\n")
    node = NodeProcess(tmp / "node", ["--store", f"file:{tmp / 'store'}", "--min-free", "0",
                                      "--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
                                      "--upload-secret", str(tmp / "tokens.keys")])
    node.start()
    try:
        base = node.block_until_ready(30)
        admin = mint("root", "admin")
        bearer = {"Authorization": f"Bearer {admin}"}
        status, _, body = request("POST", f"{base}/jobs?presets=poster&name=clip.mp4",
                                  media_clips.portrait.read_bytes(),
                                  {"Content-Type": "application/octet-stream", **bearer})
        assert status == 201, body
        job_id = json.loads(body)["id"]

        def finished() -> dict[str, object] | None:
            job: dict[str, object] = json.loads(request("GET", f"{base}/jobs/{job_id}", None, bearer)[2])
            return job if job["state"] == "done" else None

        job = poll(finished, 120, "the seeded job to be done")
        status, head, _ = request("POST", f"{base}/files/", b"",
                                  {"Tus-Resumable": "1.0.0", "Upload-Length": "1000", **bearer})
        assert status == 201
        yield Live(node, admin, job, head["location"].rsplit("/", 1)[-1])
    finally:
        node.stop()


def operations() -> int:
    paths = yaml.safe_load(Path(OPENAPI).read_text())["paths"]
    return sum(1 for item in paths.values() for method in item if method in ("get", "head", "post", "put",
                                                                              "patch", "delete", "options"))


def run_schemathesis(live: Live, folder: Path, headers: list[str], examples: int) -> str:
    """schemathesis's whole run over the document, the live job's ids drawn half the time; its output."""
    folder.mkdir()
    outputs = live.job["outputs"]
    assert isinstance(outputs, list)
    signed = urllib.parse.urlsplit(str(outputs[0]["url"])).path.split("/")
    names = [str(o["name"]) for o in outputs] + ["nope.mp4", "style.css", "app.js"]  # results', /static's
    signatures = [s for s in signed if s.startswith("~")] + ["~1.k1." + "A" * 43]
    config = folder / "schemathesis.toml"
    config.write_text(f"""
[dictionaries]
jobs = {{ values = {json.dumps([live.job["id"]])} }}
uploads = {{ values = {json.dumps([live.upload])} }}
files = {{ values = {json.dumps(names)} }}
signatures = {{ values = {json.dumps(signatures)} }}

[parameters]
"path.id" = {{ dictionary = "jobs", probability = 0.5 }}
"path.upload" = {{ dictionary = "uploads", probability = 0.5 }}
"path.file" = {{ dictionary = "files", probability = 0.5 }}
"path.signature" = {{ dictionary = "signatures", probability = 0.5 }}

[checks.not_a_server_error]
expected-statuses = {EXPECTED}
""")
    # the packaged document, which the node serves byte for byte (test_the_served_document_validates)
    argv = [os.path.join(BIN, "st"), "--config-file", str(config), "run", OPENAPI, "--url", live.node.url,
            "--checks", CHECKS, "--phases", "examples,coverage,fuzzing", "--max-examples", str(examples),
            "--workers", "1", "--request-timeout", "15", "--no-shrink", "--no-color"]
    for header in headers:
        argv += ["-H", header]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.openapi_hooks", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-20000:]
    # every documented operation was tried: none skipped or errored
    assert re.search(rf"Tested: {operations()}\b", output), output[-4000:]
    assert "Errored" not in output, output[-4000:]
    return output


class SchemathesisTests:
    def test_the_served_document_validates(self, live: Live) -> None:
        """``GET /openapi.yaml`` with no token: YAML that openapi-spec-validator accepts, the packaged
        document byte for byte."""
        status, head, body = request("GET", f"{live.node.url}/openapi.yaml")
        assert (status, head["content-type"]) == (200, "application/yaml")
        validate(yaml.safe_load(body))
        assert body == Path(OPENAPI).read_bytes()

    def test_with_an_admin_token(self, live: Live, tmp_path: Path) -> None:
        """With an admin token (every scope, every tenant) every operation answers as documented, the
        live job's and upload's answers included; none is a 500."""
        run_schemathesis(live, tmp_path / "admin", [f"Authorization: Bearer {live.admin}"], 8)
        status, _, _ = request("GET", f"{live.node.url}/health")
        assert status == 200

    def test_without_a_token(self, live: Live, tmp_path: Path) -> None:
        """Without a token every operation answers as documented (the public ones, and 401 from the
        rest before any body is read); none is a 500."""
        run_schemathesis(live, tmp_path / "anonymous", [], 4)
        status, _, _ = request("GET", f"{live.node.url}/health")
        assert status == 200
