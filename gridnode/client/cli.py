"""
``gridnode``: the command line client.

    gridnode upload FILE... [--preset P]... [--wait] [--output DIR] [--idempotency-key KEY]
    gridnode status JOB
    gridnode nodes
    gridnode fetch JOB DIR
    gridnode token --secret-file F --sub TENANT --scope "upload read" [--ttl 1h]

A pool with a token keyring wants ``--token`` (or ``GRIDNODE_TOKEN``): a JWT
from your application, or from ``gridnode token``.

Nodes are found from ``--store URL`` (+ ``--env``, ``--pool``), or from
``--registry-url URL`` (a public nodes.json), or named with ``--node URL``.
Progress bars are drawn only on a terminal; ``--json`` prints JSON lines.
A failure exits non-zero with one line: what happened and what to try.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from gridnode import __version__
from gridnode.client.nodes import NodeInfo, describe
from gridnode.errors import GridnodeError


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("where the pool is")
    where.add_argument("--store", default=os.environ.get("GRIDNODE_STORE", "file:gridnode-data"),
                       help="the pool's store: file:PATH or s3://BUCKET/PREFIX (default: %(default)s)")
    where.add_argument("--s3-endpoint", default=os.environ.get("GRIDNODE_S3_ENDPOINT"),
                       help="endpoint of an S3-compatible server")
    where.add_argument("--s3-region", default=os.environ.get("GRIDNODE_S3_REGION"))
    where.add_argument("--env", default=os.environ.get("GRIDNODE_ENV", "dev"))
    where.add_argument("--pool", default=os.environ.get("GRIDNODE_POOL", "default"))
    where.add_argument("--registry-url", help="a public nodes.json URL, instead of --store")
    where.add_argument("--node", action="append", default=[], metavar="URL",
                       help="a node's HTTP URL, instead of the registry (repeatable)")
    where.add_argument("--stale", type=float, default=300.0, help="ignore node records older than this (s)")
    common.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    common.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a node may stay silent before the next one is tried (default: %(default)s)")
    common.add_argument("--token", default=os.environ.get("GRIDNODE_TOKEN"),
                        help="access token (JWT) sent to the nodes, for a pool with a token keyring "
                             "(default: $GRIDNODE_TOKEN)")

    p = argparse.ArgumentParser(prog="gridnode", description="Upload videos to a gridnode pool and fetch results.")
    p.add_argument("--version", action="version", version=f"gridnode {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", parents=[common], help="upload videos, optionally wait and download")
    up.add_argument("files", nargs="+", metavar="FILE")
    up.add_argument("--preset", action="append", default=[], help="output preset (repeatable; default mp4-720p)")
    up.add_argument("--wait", action="store_true", help="follow the conversion to its end")
    up.add_argument("--output", metavar="DIR", help="download the results here (implies --wait)")
    up.add_argument("--idempotency-key", metavar="KEY",
                    help="the upload's Idempotency-Key (the Nth of several files: KEY-N), so that running the "
                         "same command again within 24 h gets the same jobs instead of new ones; without it, "
                         "each file gets a new key, kept over its tries")
    st = sub.add_parser("status", parents=[common], help="show a job")
    st.add_argument("job")
    sub.add_parser("nodes", parents=[common], help="list the live nodes")
    fe = sub.add_parser("fetch", parents=[common], help="download a done job's results")
    fe.add_argument("job")
    fe.add_argument("dir")
    tk = sub.add_parser("token", help="print an access token (JWT) signed with a keyring's first key")
    tk.add_argument("--secret-file", required=True, metavar="FILE", help="the pool's token keyring (upload-secret)")
    tk.add_argument("--sub", required=True, metavar="TENANT", help="the tenant the token acts for")
    tk.add_argument("--scope", required=True, help='space-separated among: upload read cancel ops admin')
    tk.add_argument("--ttl", default="1h", type=duration, help="lifetime: 90s, 15m, 1h, 7d (default: %(default)s)")
    tk.add_argument("--presets", help="comma-separated presets its uploads may ask for (default: any)")
    tk.add_argument("--max-size", type=size, metavar="BYTES", help="largest upload: bytes, or 500M, 2G")
    return p


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds."""
    m = re.fullmatch(r"\s*(\d{1,9})\s*([smhd]?)\s*", text.lower())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 1h or 7d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def size(text: str) -> int:
    """``1048576``, ``500M``, ``2G`` -> bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 1048576, 500M or 2G")
    return int(m.group(1)) * _SIZES[m.group(2)]


def mint_token(args: argparse.Namespace) -> str:
    from gridnode import tokens
    from gridnode.keyring import read_keyring

    try:
        scopes = tokens.parse_scope(args.scope)
    except ValueError as e:
        raise GridnodeError(f"--scope: {e}", code="bad_argument") from None
    if not scopes:
        raise GridnodeError("--scope: name at least one of upload read cancel ops admin", code="bad_argument")
    if not 0 < len(args.sub) <= tokens.MAX_TENANT:
        raise GridnodeError(f"--sub: the tenant is 1-{tokens.MAX_TENANT} characters", code="bad_argument")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets else None
    ring = read_keyring(args.secret_file, "--secret-file")
    return tokens.mint(ring, sub=args.sub, scopes=scopes, ttl=args.ttl, presets=presets, max_size=args.max_size)


class Output:
    """Text or JSON lines, and progress bars only on a terminal."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stdout.isatty() and not as_json
        self.bar: Any = None

    def event(self, kind: str, text: str, **fields: Any) -> None:
        self.close_bar()
        if self.as_json:
            print(json.dumps({"event": kind, **fields}, sort_keys=True), flush=True)
        else:
            print(text, flush=True)

    def progress(self, label: str, done: float, total: float, unit: str = "B") -> None:
        if not self.tty:
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.desc != label:
            self.close_bar()
            self.bar = tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B", leave=False)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


async def find_nodes(reactor: Any, args: argparse.Namespace, http: Any) -> list[NodeInfo]:
    if args.node:
        return [NodeInfo(f"node{i}", u.rstrip("/")) for i, u in enumerate(args.node)]
    if args.registry_url:
        import treq

        from gridnode.client.nodes import nodes_from_json

        try:
            response = await http.get(args.registry_url, timeout=args.timeout)
        except Exception as e:  # noqa: BLE001 - any failure here is the user's one line
            raise GridnodeError(f"cannot read {args.registry_url}: {e}", code="registry_unreachable") from None
        if response.code != 200:
            raise GridnodeError(f"{args.registry_url} answered HTTP {response.code}", code="registry_unreachable")
        return nodes_from_json(await treq.content(response))
    from twisted.internet.threads import deferToThread

    from gridnode.client.nodes import nodes_from_store
    from gridnode.store import open_backend

    backend = open_backend(args.store, s3_endpoint=args.s3_endpoint, s3_region=args.s3_region)
    return list(await deferToThread(nodes_from_store, backend, args.env, args.pool, args.stale))


async def command(reactor: Any, args: argparse.Namespace) -> int:
    from gridnode.client.api import BearerHTTP, GridClient, default_http

    out = Output(args.json)
    http = default_http(reactor, connect_timeout=min(args.timeout, 10.0))
    nodes = await find_nodes(reactor, args, http)  # a registry URL never sees the token
    to_nodes = BearerHTTP(http, args.token) if args.token else http
    client = GridClient(reactor, to_nodes, nodes, stall_timeout=args.timeout, response_timeout=2 * args.timeout,
                        request_timeout=args.timeout, check_timeout=min(2.0, args.timeout))

    if args.command == "nodes":
        if args.json:
            for entry in describe(nodes):
                print(json.dumps(entry, sort_keys=True))
        else:
            if not nodes:
                print("no live nodes")
            for n in nodes:
                load = ", ".join(f"{k} {v:g}" for k, v in sorted(n.load.items()) if k != "free_disk")
                print(f"{n.id}  {n.http_url}  {load}")
        return 0

    if args.command == "status":
        job = await client.get_job(args.job)
        out.event("job", _job_line(job), job=job)
        return 0 if job.get("state") != "failed" else 1

    if args.command == "fetch":
        job = await client.get_job(args.job)
        paths = await client.fetch(job, args.dir, on_progress=lambda n, d, t: out.progress(n, d, t))
        for p in paths:
            out.event("fetched", p, path=p, job=job["id"])
        return 0

    failures = 0
    for number, path in enumerate(args.files, start=1):
        if not os.path.isfile(path):
            raise GridnodeError(f"{path}: no such file", code="no_such_file")
        label = os.path.basename(path)
        key = args.idempotency_key
        if key is not None and len(args.files) > 1:
            key = f"{key}-{number}"
        node, job = await client.upload(path, presets=args.preset or ["mp4-720p"], idempotency_key=key,
                                        on_progress=lambda d, t: out.progress(label, d, t))  # noqa: B023
        out.event("uploaded", f"{path}: job {job['id']} on {node.id} ({node.http_url})", job=job, node=node.id)
        if not (args.wait or args.output):
            continue

        def update(j: dict[str, Any]) -> None:
            if j.get("state") == "transcoding":
                out.progress(f"{j['id'][:10]} converting", round(float(j.get("progress") or 0) * 100, 1), 100, "%")
            elif args.json:
                out.event("job", _job_line(j), job=j)

        final = await client.wait(job["id"], node, on_update=update)
        out.event("finished", _job_line(final), job=final)
        if final.get("state") != "done":
            failures += 1
            continue
        if args.output:
            paths = await client.fetch(final, os.path.join(args.output, final["id"]), node,
                                       on_progress=lambda n, d, t: out.progress(n, d, t))
            for p in paths:
                out.event("fetched", p, path=p, job=final["id"])
    if failures:
        raise GridnodeError(f"{failures} of {len(args.files)} jobs did not finish", code="job_failed")
    return 0


def _job_line(job: dict[str, Any]) -> str:
    line = f"{job.get('id')}  {job.get('state')}"
    if job.get("state") == "transcoding":
        line += f"  {float(job.get('progress') or 0) * 100:.0f}%"
    if job.get("error"):
        line += f"  {job['error'].get('code')}: {job['error'].get('message')}"
    for o in job.get("outputs") or []:
        line += f"\n  {o.get('name')}  {o.get('size')} bytes  {o.get('url')}"
    return line


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "token":
        try:
            print(mint_token(args))
        except GridnodeError as e:
            print(f"gridnode: {e.code}: {e.message}", file=sys.stderr)
            raise SystemExit(1) from None
        return
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    def run(reactor: Any) -> Any:
        async def go() -> int:
            try:
                return await command(reactor, args)
            except GridnodeError as e:
                print(f"gridnode: {e.code}: {e.message}", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - one line, never a traceback
                print(f"gridnode: error: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
            return 1

        def exit_with(code: int) -> None:
            # Raised from a callback, not inside the coroutine: react() reads it as the exit status.
            if code:
                raise SystemExit(code)

        return ensureDeferred(go()).addCallback(exit_with)

    react(run)


if __name__ == "__main__":
    main()
