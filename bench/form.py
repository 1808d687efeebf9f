"""
Memory while a node receives a form upload (``multipart/form-data``, as ``curl -F`` sends it) vs
the same bytes as a raw body, side by side in one run (the two sides alternate, round after
round; the figure is the median of each).

    .venv/bin/python bench/form.py                  # 1 GiB, 2 rounds (~1 min on 2 cores)
    .venv/bin/python bench/form.py --size-mib 256 --rounds 1 --json

For each side: a fresh node, a warm-up upload of 1 MiB of that kind, 0.5 s to settle, the idle
baseline ``VmRSS`` of the twistd process, then the upload (a 256 MiB file of random-ish bytes
sent repeatedly with sendfile; the form side wraps it in one file part). ``VmRSS`` is sampled
every 10 ms, and the final ``VmHWM`` taken as the peak if it moved. Figure: peak - baseline of
the form side, goal <= 64 MiB (the raw side, which is spliced, is the reference). Both answer
422 not_a_video after the probe: the bytes are not a video.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _nodes
from _nodes import ServerProcess, memory, post_file
from pipeline import Figure, MiB, drop_dirty, make_body, median, mib, say

BOUNDARY = "------------------------benchformboundary01"
TARGET = "/jobs?name=body.bin"


def post_form(host: str, port: int, target: str, path: Path, size: int) -> int:
    """POST ``path`` (repeated to ``size`` bytes) as the one file part of a form; the answer's status."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"body.bin\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    request = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
               f"Content-Length: {len(head) + size + len(tail)}\r\nConnection: close\r\n\r\n").encode()
    file_size = path.stat().st_size
    with socket.create_connection((host, port)) as s, open(path, "rb") as f:
        s.sendall(request + head)
        left = size
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while left > 0:
                n = min(left, file_size)
                s.sendfile(f, 0, n)
                left -= n
            s.sendall(tail)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    status_line = answer.partition(b"\r\n")[0]
    return int(status_line.split()[1]) if status_line else 0


def growth(server: ServerProcess, send: Callable[[int], int], size: int) -> tuple[int, int, int]:
    """(baseline RSS, peak RSS, answer status) of ``server`` receiving ``send(size)``."""
    send(MiB)  # warm the code paths
    time.sleep(0.5)
    baseline, hwm0 = memory(server.pid)
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak = max(peak, memory(server.pid)[0])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status = send(size)
    finally:
        stop.set()
        sampler.join()
    rss, hwm = memory(server.pid)
    if hwm > hwm0:
        peak = max(peak, hwm)
    return baseline, max(peak, rss), status


def run(tmp: Path, size: int, rounds: int) -> Figure:
    chunk = tmp / "chunk.bin"
    make_body(chunk, min(size, 256 * MiB))
    grown: dict[str, list[int]] = {"form": [], "raw": []}
    for r in range(rounds):
        for side in (["form", "raw"] if r % 2 == 0 else ["raw", "form"]):
            folder = tmp / f"{side}-{r}"
            server = _nodes.node(folder, "--workers", "1", "--max-upload", str(size // MiB + 64), "--min-free", "0",
                                 "--sandbox", "weak", "--ffmpeg-user", "none")
            def send(n: int, side: str = side, server: ServerProcess = server) -> int:
                if side == "form":
                    return post_form(server.host, server.port, TARGET, chunk, n)
                return post_file(server.host, server.port, TARGET, chunk, size=n).status

            with server:
                base, peak, status = growth(server, send, size)
            shutil.rmtree(folder, ignore_errors=True)
            grown[side].append(peak - base)
            say(f"  round {r + 1}: {side} baseline {mib(base)}, peak {mib(peak)}, growth {mib(peak - base)} "
                f"(answer {status})")
            drop_dirty()
    chunk.unlink()
    f, raw = median([float(x) for x in grown["form"]]), median([float(x) for x in grown["raw"]])
    ok = f <= 64 * MiB
    return Figure("form_memory", f"node RSS growth receiving a {size // MiB} MiB form upload", "<= 64 MiB",
                  f"form +{mib(f)} vs raw body +{mib(raw)}", f"{'PASS' if ok else 'FAIL'}", ok,
                  {"form_growth_bytes": grown["form"], "raw_growth_bytes": grown["raw"], "form_median_bytes": f,
                   "raw_median_bytes": raw, "bytes": size})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--tmp", default=None, help="folder for the nodes and the body (default: the system's)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gridnode-bench-form-", dir=args.tmp))
    tmp.chmod(0o755)
    try:
        figure = run(tmp, args.size_mib * MiB, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(figure.as_json()))
    else:
        print(f"{figure.title}: {figure.measured} (goal {figure.goal}): {figure.ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
