"""
What "acknowledged means stored" costs: the answer of a POST /jobs now waits until the input, the
job record and the active marker are in the store. Three figures, each side by side in one run
(the sides alternate, round after round; a figure is a ratio or difference of medians):

  ack       upload complete -> 201, median, a 64 MiB body (a short clip padded with an mp4
            ``free`` box: probed as a video, converted in a moment), S3 store (moto on
            loopback) vs the same node on the file: store; goal: the S3 wait after the last
            byte <= 0.25 s. Also the node's own view (its JSON log): last byte received ->
            input, record and marker stored.
  ingest    a 1 GiB POST /jobs on the file: store until its 201 (input copied into the store
            and fsynced, record and marker too) vs `cp` of the file on the same filesystem;
            cp time / upload time, goal >= 0.6
  memory    peak RSS growth of the node's twistd over its idle baseline while it receives a
            2 GiB upload into the S3 store (streamed into a multipart upload as it arrives),
            goal <= 64 MiB; beside it the same node on the file: store

    PYTHONPATH=. python bench/durable.py                    # all three (~3 min on 2 cores)
    PYTHONPATH=. python bench/durable.py --quick            # smaller sizes
    PYTHONPATH=. python bench/durable.py --only ack --json

Needs ffmpeg, ffprobe, cp and moto_server (the test extras). moto keeps a completed object in
memory while it joins its parts (about twice the object at its peak, ~4-5 GiB for 2 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _nodes
from _nodes import ServerProcess, memory, post_file, wait_idle

MiB = 1024 * 1024
FIGURES = ("ack", "ingest", "memory")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def padded_clip(path: Path, size: int) -> None:
    """A 2 s 320x240 clip, padded to ``size`` bytes with an mp4 ``free`` box of random-ish bytes
    (ffprobe skips it): a body of any size that is accepted as a video and converted at once."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-y", "-f", "lavfi",
         "-i", "testsrc2=size=320x240:rate=30:duration=2", "-c:v", "libx264", "-preset", "veryfast",
         "-pix_fmt", "yuv420p", str(path)], check=True)
    pad = size - path.stat().st_size
    assert 8 < pad < 2**32, pad
    block = os.urandom(8 * MiB)
    with open(path, "ab") as f:
        f.write(struct.pack(">I", pad) + b"free")
        left = pad - 8
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[4097:] + block[:4097]


@contextlib.contextmanager
def moto(tmp: Path) -> Iterator[str]:
    """A moto S3 server on loopback with a bucket ``bench``; its endpoint."""
    from tests.s3server import CREDENTIALS, MotoServer, client

    os.environ.update(CREDENTIALS)
    server = MotoServer(tmp / "moto.log")
    endpoint = server.start()
    try:
        client(endpoint).create_bucket(Bucket="bench")
        yield endpoint
    except BaseException:
        say(f"moto's log ends:\n{(tmp / 'moto.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        server.stop()


def s3_args(endpoint: str) -> list[str]:
    return ["--store", "s3://bench/grid", "--s3-endpoint", endpoint]


def node(folder: Path, max_mib: int, *args: str) -> ServerProcess:
    return _nodes.node(folder, "--workers", "1", "--max-upload", str(max_mib + 64), "--min-free", "0",
                       "--sandbox", "weak", *args, json_log=True)


def stored_after_received(log: Path, job: str) -> tuple[float, float] | None:
    """From the node's JSON log: seconds from the last byte received to the input stored, and to
    the job durably stored (input, record, marker)."""
    marks: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            message = str(event.get("message", "")) if isinstance(event, dict) else ""
            for step in ("received", "input stored", "stored"):
                if message.startswith(f"job {job} {step}"):
                    marks.setdefault(step, float(event["time"]))
    if len(marks) < 3:
        return None
    return marks["input stored"] - marks["received"], marks["stored"] - marks["received"]


def post_paced(host: str, port: int, target: str, path: Path, rate: float) -> Any:
    """POST ``path`` at ``rate`` bytes/s at most (1 MiB at a time, by sendfile), as a client on a
    real network sends; the same timestamps as ``post_file``."""
    size = path.stat().st_size
    head = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection((host, port)) as s, open(path, "rb") as f:
        wall, started = time.time(), time.monotonic()
        s.sendall(head)
        offset = 0
        while offset < size:
            n = min(MiB, size - offset)
            s.sendfile(f, offset, n)
            offset += n
            ahead = started + offset / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        sent = time.monotonic()
        raw = b"".join(iter(lambda: s.recv(65536), b""))
        answered = time.monotonic()
    head_block, _, payload = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_block.lower():
        payload = _nodes.dechunk(payload)
    return _nodes.Posted(int(head_block.split()[1]), json.loads(payload), started, sent, answered, wall)


def post_video(server: ServerProcess, body: Path, rate: float | None = None) -> Any:
    target = f"/jobs?name={body.name}&presets=poster"
    if rate is None:
        p = post_file(server.host, server.port, target, body)
    else:
        p = post_paced(server.host, server.port, target, body, rate)
    if p.status != 201:
        raise RuntimeError(f"expected 201, got {p.status} {p.body}")
    wait_idle(f"http://{server.host}:{server.port}")
    return p


def moto_completion(endpoint: str, body: Path) -> float:
    """The floor the server sets: seconds moto takes for CompleteMultipartUpload alone, of the
    body in 8 MiB parts put beforehand (boto3 directly)."""
    from tests.s3server import client

    c = client(endpoint)
    upload = c.create_multipart_upload(Bucket="bench", Key="floor")["UploadId"]
    parts = []
    with open(body, "rb") as f:
        for number, chunk in enumerate(iter(lambda: f.read(8 * MiB), b""), start=1):
            etag = c.upload_part(Bucket="bench", Key="floor", UploadId=upload, PartNumber=number, Body=chunk)["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
    began = time.monotonic()
    c.complete_multipart_upload(Bucket="bench", Key="floor", UploadId=upload, MultipartUpload={"Parts": parts})
    return time.monotonic() - began


def fig_ack(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = args.ack_mib * MiB
    body = tmp / "ack.mp4"
    padded_clip(body, size)
    rate = args.ack_rate * MiB
    sides = {"s3": None, "file": None, "s3-paced": rate}  # side -> client rate (None: as fast as loopback)
    wait: dict[str, list[float]] = {side: [] for side in sides}
    floor: list[float] = []
    node_wait: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    with moto(tmp) as endpoint:
        with node(tmp / "ack-s3", args.ack_mib, *s3_args(endpoint)) as s3, \
                node(tmp / "ack-file", args.ack_mib) as local:
            servers = {"s3": s3, "file": local, "s3-paced": s3}
            for server in (s3, local):
                post_video(server, body)  # warm-up, untimed
            for r in range(args.ack_rounds):
                for side in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                    p = post_video(servers[side], body, sides[side])
                    wait[side].append(p.answered - p.sent)
                    seen = stored_after_received(servers[side].log, p.body["id"])
                    if seen is not None:
                        node_wait[side].append(seen)
                    say(f"  ack round {r + 1}: {side} answer {wait[side][-1]:.3f}s after the last byte "
                        f"(node: input stored, job stored after {seen})")
                floor.append(moto_completion(endpoint, body))
                say(f"  ack round {r + 1}: moto's CompleteMultipartUpload alone {floor[-1]:.3f}s")
    body.unlink()
    med = {side: statistics.median(values) for side, values in wait.items()}
    nodes = {side: tuple(statistics.median(v[i] for v in values) for i in (0, 1)) if values else (0.0, 0.0)
             for side, values in node_wait.items()}
    return {"figure": "ack", "title": f"upload complete -> 201, {args.ack_mib} MiB, S3 (moto) vs file:",
            "goal": "S3 wait after the last byte <= 0.25 s",
            "measured": f"moto's CompleteMultipartUpload alone {statistics.median(floor):.3f} s; "
                        f"S3 {med['s3']:.3f} s, S3 with the client at {args.ack_rate} MiB/s {med['s3-paced']:.3f} s, "
                        f"file: {med['file']:.3f} s after the last byte; node, last byte -> input stored / job "
                        f"stored: S3 {nodes['s3'][0]:.3f} / {nodes['s3'][1]:.3f} s, paced {nodes['s3-paced'][0]:.3f}"
                        f" / {nodes['s3-paced'][1]:.3f} s, file: {nodes['file'][0]:.3f} / {nodes['file'][1]:.3f} s",
            "pass": med["s3-paced"] <= 0.25, "answer_s": wait, "node_s": node_wait, "median_s": med,
            "moto_completion_s": floor}


def fig_ingest(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = args.ingest_mib * MiB
    body = tmp / "ingest.mp4"
    padded_clip(body, size)
    copy = tmp / "copy.bin"
    times: dict[str, list[float]] = {"upload": [], "cp": [], "cp+sync": []}
    with node(tmp / "ingest", args.ingest_mib) as server:
        post_video(server, body)  # warm-up, untimed
        for r in range(args.ingest_rounds):
            for side in (list(times) if r % 2 == 0 else list(reversed(times))):
                if side == "upload":
                    p = post_video(server, body)
                    times[side].append(p.answered - p.started)
                else:
                    # cp: the page cache only; cp+sync: until the copy is on disk, as a 201 now is
                    began = time.monotonic()
                    subprocess.run(["cp", str(body), str(copy)], check=True)
                    if side == "cp+sync":
                        subprocess.run(["sync", str(copy)], check=True)
                    times[side].append(time.monotonic() - began)
                    copy.unlink()
                say(f"  ingest round {r + 1}: {side} {times[side][-1]:.2f}s")
                os.sync()  # untimed: what one side left dirty does not tax the other
    body.unlink()
    u, c, cs = (statistics.median(times[side]) for side in ("upload", "cp", "cp+sync"))
    return {"figure": "ingest", "title": f"ingest to a durable 201, {args.ingest_mib} MiB, file: store, vs cp",
            "goal": ">= 0.6", "measured": f"upload to 201 {size / u / MiB:.0f} MiB/s ({u:.2f} s) vs cp "
                                          f"{size / c / MiB:.0f} MiB/s ({c:.2f} s): {c / u:.2f}; vs cp + sync FILE "
                                          f"{size / cs / MiB:.0f} MiB/s ({cs:.2f} s): {cs / u:.2f}",
            "pass": c / u >= 0.6, "times_s": times, "ratio": c / u, "ratio_vs_cp_sync": cs / u}


def peak_growth(server: ServerProcess, body: Path) -> tuple[int, int, int]:
    """(baseline RSS, peak RSS, status) of ``server`` receiving ``body`` (one job, then idle)."""
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
        p = post_video(server, body)
    finally:
        stop.set()
        sampler.join()
    rss, hwm = memory(server.pid)
    if hwm > hwm0:
        peak = max(peak, hwm)
    return baseline, max(peak, rss), p.status


def fig_memory(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = args.memory_mib * MiB
    body = tmp / "memory.mp4"
    padded_clip(body, size)
    warm = tmp / "warm.mp4"
    padded_clip(warm, 24 * MiB)
    growth: dict[str, list[int]] = {"s3": [], "file": []}
    with moto(tmp) as endpoint:
        for r in range(args.memory_rounds):
            for side in (["s3", "file"] if r % 2 == 0 else ["file", "s3"]):
                folder = tmp / f"mem-{side}-{r}"
                extra = s3_args(endpoint) if side == "s3" else []
                with node(folder, args.memory_mib, *extra) as server:
                    post_video(server, warm)  # the streaming code paths warmed, untimed
                    base, peak, status = peak_growth(server, body)
                shutil.rmtree(folder, ignore_errors=True)
                growth[side].append(peak - base)
                say(f"  memory round {r + 1}: {side} baseline {base / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, "
                    f"growth {(peak - base) / MiB:.1f} MiB (answer {status})")
    body.unlink()
    warm.unlink()
    s, f = statistics.median(growth["s3"]), statistics.median(growth["file"])
    return {"figure": "memory", "title": f"node RSS growth receiving {args.memory_mib} MiB into the S3 store",
            "goal": "<= 64 MiB", "measured": f"S3 +{s / MiB:.1f} MiB vs file: +{f / MiB:.1f} MiB",
            "pass": s <= 64 * MiB, "s3_growth_bytes": growth["s3"], "file_growth_bytes": growth["file"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=FIGURES)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--ack-mib", type=int, default=64)
    ap.add_argument("--ack-rounds", type=int, default=None, help="default 7; quick 3")
    ap.add_argument("--ack-rate", type=int, default=100, help="MiB/s of the paced client (default 100)")
    ap.add_argument("--ingest-mib", type=int, default=None, help="default 1024; quick 256")
    ap.add_argument("--ingest-rounds", type=int, default=None, help="default 3; quick 2")
    ap.add_argument("--memory-mib", type=int, default=None, help="default 2048; quick 512")
    ap.add_argument("--memory-rounds", type=int, default=1)
    args = ap.parse_args()
    for name, full, quick in (("ack_rounds", 7, 3), ("ingest_mib", 1024, 256), ("ingest_rounds", 3, 2),
                              ("memory_mib", 2048, 512)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    chosen = args.only or list(FIGURES)
    run = {"ack": fig_ack, "ingest": fig_ingest, "memory": fig_memory}
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="gridnode-durable-") as folder:
        os.chmod(folder, 0o711)  # the node's unprivileged ffmpeg user passes to its work folder
        for name in chosen:
            say(f"{name}...")
            tmp = Path(folder) / name
            tmp.mkdir(mode=0o711)
            results.append(run[name](tmp, args))
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    print("| figure | goal | measured | verdict |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['title']} | {r['goal']} | {r['measured']} | {'PASS' if r['pass'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
