"""
Upload throughput: `S3Backend.put_file` against boto3's own ``upload_file``
(default TransferConfig) of the same file, to a moto server this script
starts on loopback. Both run in the same process against the same server,
interleaved (the order flips every round) and repeated; the figure is the
ratio of the medians, store / boto3 (goal: 0.9 or more).

    .venv/bin/python bench/store_upload.py                 # 1 GiB, 3 rounds
    .venv/bin/python bench/store_upload.py --size-mb 256 --rounds 5 --json

moto keeps objects in memory (a multipart object briefly twice), so each
object is deleted after its upload; a 1 GiB run needs about 3 GiB of RAM.
moto and the client share the machine's cores, so absolute MB/s say more
about moto than about S3; the ratio is what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gridnode.store.s3 import MB, S3Backend  # noqa: E402
from tests.s3server import CREDENTIALS, MotoServer, client  # noqa: E402


def make_file(path: str, size: int) -> None:
    block = os.urandom(8 * MB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1] if left else block  # parts differ from each other


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="file size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each uploads once with each (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed uploads with each first (default 1)")
    ap.add_argument("--max-seconds", type=float, default=480.0,
                    help="stop starting new rounds after this long (default 480)")
    ap.add_argument("--part-mb", type=int, default=None, help="override S3Backend's part size (MiB)")
    ap.add_argument("--concurrency", type=int, default=None, help="override S3Backend's concurrency")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args(argv)

    os.environ.update(CREDENTIALS)
    size = args.size_mb * MB
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gridnode-bench-") as tmp:
        server = MotoServer(Path(tmp) / "moto_server.log")
        endpoint = server.start()
        try:
            src = os.path.join(tmp, "upload.bin")
            make_file(src, size)
            s3 = client(endpoint)
            s3.create_bucket(Bucket="bench")
            tuning: dict[str, Any] = {}
            if args.part_mb is not None:
                tuning["part_size"] = args.part_mb * MB
                tuning["multipart_threshold"] = max(args.part_mb * MB, 16 * MB)
            if args.concurrency is not None:
                tuning["concurrency"] = args.concurrency
            store = S3Backend("bench", endpoint_url=endpoint, **tuning)

            def with_store() -> None:
                store.put_file("bench/store.bin", src)
                s3.delete_object(Bucket="bench", Key="bench/store.bin")

            def with_boto3() -> None:
                s3.upload_file(src, "bench", "bench/boto3.bin")
                s3.delete_object(Bucket="bench", Key="bench/boto3.bin")

            # Untimed warm-up, one full upload each: connection and thread pools,
            # and moto's process growing its heap to hold a whole object.
            for _ in range(args.warmup):
                with_boto3()
                with_store()

            times: dict[str, list[float]] = {"store": [], "boto3": []}
            for r in range(args.rounds):
                if r and time.monotonic() - started > args.max_seconds:
                    break
                order = [("store", with_store), ("boto3", with_boto3)]
                for name, fn in order if r % 2 == 0 else reversed(order):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)  # includes the delete: same for both
            store.close()
        finally:
            server.stop()

    mb = size / MB
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["boto3"] / med["store"]  # throughput ratio = inverse time ratio
    result = {
        "benchmark": "store_upload",
        "size_mb": args.size_mb,
        "rounds": len(times["store"]),
        "store_seconds": [round(t, 3) for t in times["store"]],
        "boto3_seconds": [round(t, 3) for t in times["boto3"]],
        "store_mb_s": round(mb / med["store"], 1),
        "boto3_mb_s": round(mb / med["boto3"], 1),
        "ratio": round(ratio, 3),
        "goal": 0.9,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"size {args.size_mb} MiB, {result['rounds']} rounds, moto on loopback")
        print(f"S3Backend.put_file  {result['store_mb_s']:8.1f} MB/s  (median of {result['store_seconds']} s)")
        print(f"boto3 upload_file   {result['boto3_mb_s']:8.1f} MB/s  (median of {result['boto3_seconds']} s)")
        print(f"ratio store/boto3 = {result['ratio']:.3f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
