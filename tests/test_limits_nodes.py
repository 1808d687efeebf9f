"""
Limits on the bytes actually received, tried on real twistd nodes as an attacker would: a chunked
body over ``--max-upload`` or over its token's ``max_size``, a 300 MB PATCH to an upload that does
not exist, and bodies that would cross ``--min-free`` on a small work filesystem while a job runs.
Each gets a coded JSON error, nothing is left on disk, the running job ends done, and the node
stays healthy. The same rules on in-memory transports: tests/test_limits.py.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode import keys, tokens
from gridnode.keyring import parse_keyring
from tests.helpers import free_port
from tests.nodes import NodeProcess, get_json, upload, wait_job

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SECRET = b"limits-test-secret-0123456789abcdef"


def mint(max_size: int | None = None) -> str:
    return tokens.mint(parse_keyring(SECRET, "test"), sub="t", scopes={"upload", "read"}, ttl=3600,
                       max_size=max_size)


def start(tmp_path: Path, *extra: str) -> NodeProcess:
    node = NodeProcess(tmp_path, ["--http", f"tcp:{free_port()}:interface=127.0.0.1",
                                  "--peer", f"tcp:{free_port()}:interface=127.0.0.1", "--node-id", "l1", *extra])
    node.start()
    return node


def used_bytes(folder: Path) -> int:
    """Disk the files under ``folder`` take (allocated blocks: a reservation counts)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class _Answer:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse(data: bytes) -> tuple[int, dict[str, str], Any]:
    answer = http.client.HTTPResponse(_Answer(data))  # type: ignore[arg-type]
    answer.begin()
    body = answer.read()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, json.loads(body) if body else None


def read_answer(sock: socket.socket, watch: Callable[[], None] = lambda: None, timeout: float = 30.0) -> bytes:
    """Everything the node sends until it closes its side (it half-closes after a refusal)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        watch()
        if select.select([sock], [], [], 0.02)[0]:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
    return data


def head_lines(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_chunked(node: NodeProcess, method: str, path: str, headers: dict[str, str], total: int,
                 piece: int = MiB, watch: Callable[[], None] = lambda: None) -> tuple[int, dict[str, str], Any]:
    """A chunked body of up to ``total`` bytes, sent as a client that watches for an early answer
    does (curl): it stops sending once the node has answered."""
    with socket.create_connection((node.host, node.port), timeout=30) as sock:
        sock.sendall(head_lines(method, path, {**headers, "Transfer-Encoding": "chunked"}))
        block = os.urandom(piece)
        sent = 0

        def answered() -> bool:
            return bool(select.select([sock], [], [], 0)[0])

        while sent < total and not answered():
            try:
                sock.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
            except OSError:
                break
            sent += len(block)
            watch()
        if sent >= total and not answered():
            sock.sendall(b"0\r\n\r\n")
        return parse(read_answer(sock))


def refused_on_headers(node: NodeProcess, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """Send only a request's head (its body announced): a refusal comes without a byte of the body."""
    with socket.create_connection((node.host, node.port), timeout=30) as sock:
        sock.sendall(head_lines(method, path, {**headers, "Connection": "close"}))
        status, _, body = parse(read_answer(sock, timeout=10))
        return status, body


def healthy(node: NodeProcess) -> None:
    status, health = get_json(node.url + "/health")
    assert status == 200 and health["state"] == "ok", health


class ChunkedBodyTests:
    @pytest_twisted.inlineCallbacks
    def test_chunked_bodies_over_the_limits_are_413(self, tmp_path: Path) -> None:
        """--max-upload 2 and a token allowing 1 MiB: chunked bodies of 8 MiB are stopped with 413 too_large as
        they pass each limit, the spool is left empty, and an upload within both is still accepted."""
        (tmp_path / "upload.secret").write_bytes(SECRET)
        node = start(tmp_path, "--max-upload", "2", "--upload-secret", str(tmp_path / "upload.secret"))
        try:
            yield node.wait_ready()
            wide = {"Authorization": "Bearer " + mint()}
            narrow = {"Authorization": "Bearer " + mint(max_size=MiB)}
            for headers in (wide, narrow):
                status, head, body = send_chunked(node, "POST", "/jobs?name=flood.mov", headers, 8 * MiB)
                assert (status, body["error"]["code"]) == (413, "too_large"), body
                assert head["connection"] == "close"
            assert os.listdir(tmp_path / "gridnode-work" / "spool") == []
            healthy(node)
            status, _, body = send_chunked(node, "POST", "/jobs?name=small.bin", narrow, MiB // 2, piece=MiB // 4)
            assert (status, body["error"]["code"]) == (422, "not_a_video")  # within the limits: read and probed
        finally:
            assert node.stop() == 0


class UnknownUploadTests:
    @pytest_twisted.inlineCallbacks
    def test_300_mb_patch_to_an_unknown_upload(self, tmp_path: Path) -> None:
        """A client pushing 300 MB at PATCH /files/<unknown id> as fast as it can gets 404 not_found before
        its body is read: less than 1 MB reaches the work folder at any time (nor is written by the node at
        all), the node drops what it is sent up to its bound, closes, and stays healthy."""
        node = start(tmp_path)
        try:
            yield node.wait_ready()
            work = tmp_path / "gridnode-work"
            written_before = self.written(node)
            sock = socket.create_connection((node.host, node.port), timeout=30)
            sock.sendall(head_lines("PATCH", f"/files/{keys.new_id()}", {
                "Tus-Resumable": "1.0.0", "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": "0", "Content-Length": str(300 * 1000 * 1000)}))
            sent = [0]
            flood = threading.Thread(target=self.flood, args=(sock, 300 * 1000 * 1000, sent), daemon=True)
            flood.start()
            peak = [0]

            def watch() -> None:
                peak[0] = max(peak[0], used_bytes(work))

            status, head, body = parse(read_answer(sock, watch))
            while flood.is_alive():  # the node drops the rest up to its bound, then closes
                watch()
                flood.join(0.05)
            sock.close()
            assert peak[0] < MiB, peak
            assert self.written(node) - written_before < MiB
            assert (status, body["error"]["code"]) == (404, "not_found"), body
            assert head["tus-resumable"] == "1.0.0" and head["connection"] == "close"
            assert sent[0] < 300 * 1000 * 1000  # the node closed on the flood
            assert os.listdir(work / "spool") == []
            healthy(node)
        finally:
            assert node.stop() == 0

    @staticmethod
    def flood(sock: socket.socket, total: int, sent: list[int]) -> None:
        block = bytes(MiB)
        try:
            while sent[0] < total:
                sock.sendall(block)
                sent[0] += len(block)
        except OSError:
            pass

    @staticmethod
    def written(node: NodeProcess) -> int:
        """Bytes the node's process passed to write(2) so far (its files, logs included)."""
        with open(f"/proc/{node.pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 MiB tmpfs to hold a node's work folder, so that --min-free is met for real."""
    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the work folder")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(folder)],
                             capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


class MinFreeTests:
    @pytest_twisted.inlineCallbacks
    def test_bodies_that_would_cross_min_free(self, tmp_path: Path, small_disk: Path, long_clip: Path) -> None:
        """A 160 MiB work folder, --min-free 96, one job converting: a chunked upload is stopped with 507
        insufficient_storage as the folder crosses 96 MiB free; a declared body and a tus upload too large
        for what is left are 507 before their body. Nothing of them is left, the job ends done, and the
        node is healthy and takes a small upload afterwards."""
        work = small_disk / "work"
        node = start(tmp_path, "--work-dir", str(work), "--min-free", "96", "--workers", "1")
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, long_clip, "mp4-480p")
            assert status == 201, job
            yield wait_job(base, job["id"], {"transcoding"}, min_progress=0.01)
            lowest = [160 * MiB]

            def watch() -> None:
                st = os.statvfs(small_disk)
                lowest[0] = min(lowest[0], st.f_bavail * st.f_frsize)

            status, _, body = send_chunked(node, "POST", "/jobs?name=flood.mov", {}, 150 * MiB, watch=watch)
            assert (status, body["error"]["code"]) == (507, "insufficient_storage"), body
            # stopped within one look (4 MiB) of the line, give or take what ffmpeg wrote meanwhile
            assert lowest[0] >= (96 - 8) * MiB, lowest
            status, body = refused_on_headers(node, "POST", "/jobs?name=declared.mov",
                                              {"Content-Length": str(100 * MiB)})
            assert (status, body["error"]["code"]) == (507, "insufficient_storage")
            status, body = refused_on_headers(node, "POST", "/files/", {
                "Tus-Resumable": "1.0.0", "Upload-Length": str(100 * MiB), "Content-Length": "0"})
            assert (status, body["error"]["code"]) == (507, "insufficient_storage")
            assert sorted(os.listdir(work / "spool")) == [job["id"], f"{job['id']}.json"]
            healthy(node)
            final = yield wait_job(base, job["id"])
            assert final["state"] == "done", final
        finally:
            assert node.stop() == 0
