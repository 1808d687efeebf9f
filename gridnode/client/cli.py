"""
``gridnode``: the command line client.

    gridnode pool [--nodes 3] [--dir gridnode-pool]
    gridnode upload FILE... [--preset P]... [--wait] [--output DIR] [--parallel N] [--idempotency-key KEY]
    gridnode status JOB
    gridnode nodes
    gridnode fetch JOB DIR
    gridnode token --secret-file F --sub TENANT --scope "upload read" [--ttl 1h]

A pool with a token keyring wants ``--token`` (or ``GRIDNODE_TOKEN``): a JWT
from your application, or from ``gridnode token``.

Where the pool is: gridnode/client/discovery.py (the same from any folder).
Progress bars are drawn only on a terminal; ``--json`` prints JSON lines only.
A failure exits non-zero with one line, ``gridnode: <code>: <what to try>``;
results go to ``DIR/<file name>/`` for ``upload --output DIR`` and ``DIR/<job>/`` for
``fetch JOB DIR``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Any

from gridnode import __version__
from gridnode.client.api import NETWORK_ERRORS, BearerHTTP, GridClient, default_http
from gridnode.client.batch import FileResult, align, result_folder, run_batch, table, upload_folder
from gridnode.client.discovery import Where, find_where
from gridnode.client.failures import network_failure, printable, user_error
from gridnode.client.nodes import NodeInfo, describe, with_live_load
from gridnode.client.output import Output
from gridnode.errors import GridnodeError
from gridnode.keys import check_segment
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY
from gridnode.priority import PRIORITIES


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group(
        "where the pool is", "each: this option, else its environment variable, else "
        "~/.config/gridnode/client.toml ($XDG_CONFIG_HOME), else the default")
    where.add_argument("--store", help="the pool's store: file:PATH or s3://BUCKET/PREFIX "
                                       "($GRIDNODE_STORE; default: file:gridnode-data)")
    where.add_argument("--s3-endpoint", help="endpoint of an S3-compatible server ($GRIDNODE_S3_ENDPOINT)")
    where.add_argument("--s3-region", help="$GRIDNODE_S3_REGION")
    where.add_argument("--env", help="$GRIDNODE_ENV (default: dev)")
    where.add_argument("--pool", help="$GRIDNODE_POOL (default: default)")
    where.add_argument("--registry-url", help="a public nodes.json URL, instead of a store ($GRIDNODE_REGISTRY_URL)")
    where.add_argument("--node", action="append", default=[], metavar="URL",
                       help="a node's HTTP URL, instead of the registry (repeatable)")
    where.add_argument("--stale", type=float, default=300.0, help="ignore node records older than this (s)")
    common.add_argument("--json", action="store_true", help="print JSON lines only, errors included")
    common.add_argument("--debug", action="store_true", help="print an unexpected error's detail (for a bug report)")
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
    up.add_argument("--priority", choices=PRIORITIES, default=DEFAULT_PRIORITY,
                    help="the jobs' priority: a node serves high first (default: %(default)s)")
    up.add_argument("--wait", action="store_true", help="follow the conversion to its end")
    up.add_argument("--output", metavar="DIR", help="download each file's results to DIR/<file name>/ (implies --wait)")
    up.add_argument("--parallel", type=parallel, default=4, metavar="N",
                    help="files uploaded and followed at once, across the pool (default: %(default)s)")
    up.add_argument("--idempotency-key", metavar="KEY",
                    help="the upload's Idempotency-Key (the Nth of several files: KEY-N), so that running the "
                         "same command again within 24 h gets the same jobs instead of new ones; without it, "
                         "each file gets a new key, kept over its tries")
    st = sub.add_parser("status", parents=[common], help="show a job")
    st.add_argument("job")
    sub.add_parser("nodes", parents=[common], help="list the live nodes")
    fe = sub.add_parser("fetch", parents=[common], help="download a done job's results to DIR/<job>/")
    fe.add_argument("job")
    fe.add_argument("dir")
    tk = sub.add_parser("token", help="print an access token (JWT) signed with a keyring's first key")
    tk.add_argument("--secret-file", required=True, metavar="FILE", help="the pool's token keyring (upload-secret)")
    tk.add_argument("--sub", required=True, metavar="TENANT", help="the tenant the token acts for")
    tk.add_argument("--scope", required=True, help='space-separated among: upload read cancel ops admin')
    tk.add_argument("--ttl", default="1h", type=duration, help="lifetime: 90s, 15m, 1h, 7d (default: %(default)s)")
    tk.add_argument("--presets", help="comma-separated presets its uploads may ask for (default: any)")
    tk.add_argument("--max-size", type=size, metavar="BYTES", help="largest upload: bytes, or 500M, 2G")
    tk.add_argument("--priority", choices=PRIORITIES, help="the highest priority its jobs may ask (default: any)")
    from gridnode.client import lifecycle
    from gridnode.client.pool import add_arguments

    add_arguments(sub.add_parser("pool", help="run a local pool of nodes here until Ctrl-C"))
    lifecycle.add_arguments(sub.add_parser("lifecycle", help="print (--apply: set) the bucket's S3 lifecycle rules"))
    return p


def parallel(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of files from 1 to 64")
    return int(text)


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
    return tokens.mint(ring, sub=args.sub, scopes=scopes, ttl=args.ttl, presets=presets, max_size=args.max_size,
                       priority=args.priority)


async def find_nodes(reactor: Any, where: Where, args: argparse.Namespace, http: Any) -> list[NodeInfo]:
    """The pool's nodes, from where ``find_where`` said; a file: store is read without creating
    anything in it."""
    if where.kind == "nodes":
        return await _named_nodes(where.nodes, http, min(2.0, args.timeout))
    if where.kind == "registry":
        import treq

        from gridnode.client.nodes import nodes_from_json

        try:
            response = await http.get(where.registry_url, timeout=args.timeout)
        except NETWORK_ERRORS as e:
            raise GridnodeError(f"cannot read {where.registry_url}: {network_failure(e)[1]}; check the URL",
                                code="registry_unreachable") from None
        if response.code != 200:
            raise GridnodeError(f"{where.registry_url} answered HTTP {response.code}; check the URL",
                                code="registry_unreachable")
        return nodes_from_json(await treq.content(response))
    from twisted.internet.threads import deferToThread

    from gridnode.client.nodes import nodes_from_store
    from gridnode.store import open_backend

    assert where.store is not None
    backend = open_backend(where.store, s3_endpoint=where.s3_endpoint, s3_region=where.s3_region, read_only=True)
    return list(await deferToThread(nodes_from_store, backend, where.env, where.pool, args.stale))


async def _named_nodes(urls: tuple[str, ...], http: Any, timeout: float) -> list[NodeInfo]:
    """Nodes named by URL, each called by the id its ``/health`` gives (its URL where it does not
    answer: the upload then moves past it as usual)."""
    import treq
    from twisted.internet.defer import ensureDeferred, gatherResults

    async def one(url: str) -> NodeInfo:
        try:
            health = await treq.json_content(await http.get(f"{url}/health", timeout=timeout))
        except (*NETWORK_ERRORS, ValueError):
            return NodeInfo(url, url)
        node = health.get("node") if isinstance(health, dict) else None
        try:  # a node id is a key segment; anything else (a hostile answer) is not shown
            node_id = check_segment(node, "node id") if isinstance(node, str) and len(node) <= 128 else url
        except GridnodeError:
            node_id = url
        return with_live_load(NodeInfo(node_id, url), health)

    return list(await gatherResults([ensureDeferred(one(u)) for u in urls]))


async def command(reactor: Any, args: argparse.Namespace, out: Output) -> int:
    http = default_http(reactor, connect_timeout=min(args.timeout, 10.0))
    where = find_where(vars(args), os.environ)
    nodes = await find_nodes(reactor, where, args, http)  # a registry URL never sees the token
    if not nodes:
        raise GridnodeError(where.no_nodes_hint(), code="no_nodes", status=503)
    to_nodes = BearerHTTP(http, args.token) if args.token else http
    client = GridClient(reactor, to_nodes, nodes, stall_timeout=args.timeout, response_timeout=2 * args.timeout,
                        request_timeout=args.timeout, check_timeout=min(2.0, args.timeout),
                        priority=getattr(args, "priority", DEFAULT_PRIORITY))

    if args.command == "nodes":
        return await _nodes(client, out)
    if args.command == "status":
        job = await client.get_job(args.job)
        out.event("job", _job_line(job), job=job)
        return 0 if job.get("state") != "failed" else 1
    if args.command == "fetch":
        job = await client.get_job(args.job)
        paths = await client.fetch(job, result_folder(args.dir, job["id"]),
                                   on_progress=lambda n, d, t: out.progress(0, n, d, t))
        out.close()
        for p in paths:
            out.event("fetched", p, path=p, job=job["id"])
        return 0
    return await _upload(reactor, client, args, out)


async def _nodes(client: GridClient, out: Output) -> int:
    """One row a node, read live from its ``/health`` (the registry's figures are a heartbeat old)."""
    checked = await client.check_all()
    if out.as_json:
        for entry, (_, ok) in zip(describe([n for n, _ in checked]), checked, strict=True):
            out.event("node", None, **entry, ready=ok)
        return 0
    rows = [["NODE", "URL", "STATE", "RUNNING", "QUEUED", "WORKERS"]]
    for n, ok in checked:
        rows.append([n.id, n.http_url, "ok" if ok else "not answering",
                     *(f"{n.load[k]:g}" if k in n.load else "-" for k in ("running", "queued", "workers"))])
    out.event("nodes", align(rows))
    return 0


async def _upload(reactor: Any, client: GridClient, args: argparse.Namespace, out: Output) -> int:
    wait = bool(args.wait or args.output)
    presets = args.preset or ["mp4-720p"]

    async def one(index: int, result: FileResult) -> None:
        path = result.path
        label = os.path.basename(path) or path
        if not os.path.isfile(path):
            raise GridnodeError("no such file", code="no_such_file", status=400)
        key = args.idempotency_key
        if key is not None and len(args.files) > 1:
            key = f"{key}-{index + 1}"
        node, job = await client.upload(path, presets=presets, idempotency_key=key,
                                        on_progress=lambda d, t: out.progress(index, f"{label} uploading", d, t))
        result.job, result.node, result.state = job["id"], node.id, str(job.get("state") or "queued")
        out.event("uploaded", f"{label}: job {job['id']} on {node.id}", file=path, job=job, node=node.id)
        if not wait:
            out.close(index)
            return

        def update(j: dict[str, Any]) -> None:
            result.state = str(j.get("state"))
            progress = j.get("progress")
            if j.get("state") == "transcoding" and isinstance(progress, (int, float)):
                out.progress(index, f"{label} converting", round(float(progress) * 100, 1), 100, "%")
            else:
                out.event("job", None, file=path, job=j, node=node.id)

        final = await client.wait(job["id"], node, on_update=update)
        out.close(index)
        result.state = str(final.get("state"))
        out.event("finished", f"{label}: {_job_line(final)}", file=path, job=final, node=node.id)
        if result.state != "done":
            error = final.get("error") or {}
            raise GridnodeError(str(error.get("message") or f"the job ended {result.state}"),
                                code=str(error.get("code") or "job_failed"))
        if args.output:
            result.outputs = await client.fetch(final, upload_folder(args.output, path, final["id"], args.files), node,
                                                on_progress=lambda n, d, t: out.progress(index, n, d, t))
            out.close(index)
            for p in result.outputs:
                out.event("fetched", p, path=p, job=final["id"], file=path)

    def report(result: FileResult) -> None:
        assert result.error is not None
        error = result.error
        named = GridnodeError(f"{os.path.basename(result.path)}: {error.message}", code=error.code)
        out.failed(named, file=result.path)

    def to_error(e: BaseException) -> GridnodeError:
        if args.debug and not isinstance(e, GridnodeError):
            _log_detail(e)
        return user_error(e, network_errors=NETWORK_ERRORS)

    results = await run_batch(args.files, one, parallel=args.parallel, clock=reactor.seconds, to_error=to_error,
                              on_failed=report)
    out.close()
    if len(results) > 1 or wait:
        out.event("summary", table(results), files=[r.to_json() for r in results])
    return 1 if any(r.failed for r in results) else 0


def _log_detail(e: BaseException) -> None:
    """--debug: the exception's detail on stderr, for a bug report."""
    import traceback

    traceback.print_exception(e, file=sys.stderr)


def _job_line(job: dict[str, Any]) -> str:
    """A job on one line: id, state, progress while converting, the error, the outputs' names
    (whatever shape the node's JSON has: a field of the wrong type is left out)."""
    line = f"{job.get('id')}  {job.get('state')}"
    progress = job.get("progress")
    if job.get("state") == "transcoding" and isinstance(progress, (int, float)):
        line += f"  {float(progress) * 100:.0f}%"
    error = job.get("error")
    if isinstance(error, dict):
        line += f"  {error.get('code')}: {error.get('message')}"
    outputs = job.get("outputs")
    names = [str(o.get("name")) for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []
    if names:
        line += "  " + " ".join(names)
    return printable(line)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "token":
        try:
            print(mint_token(args))
        except GridnodeError as e:
            Output(False).failed(e)
            raise SystemExit(1) from None
        return
    if args.command == "lifecycle":
        from gridnode.client.lifecycle import run as lifecycle

        raise SystemExit(lifecycle(args))
    if args.command == "pool":
        from gridnode.client.pool import run_pool

        raise SystemExit(run_pool(args))
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    out = Output(args.json)
    #: Ctrl-C (or SIGTERM) seen: the work in flight is cancelled, and what it reports is not shown
    stopped: list[int] = []
    interrupted = GridnodeError("stopped by Ctrl-C; jobs already uploaded go on (`gridnode status JOB`)",
                                code="interrupted", status=499)

    def run(reactor: Any) -> Any:
        async def go() -> int:
            try:
                code = await command(reactor, args, out)
            except Exception as e:  # noqa: BLE001 - one coded line, never a traceback
                out.close()
                if args.debug and not isinstance(e, GridnodeError):
                    _log_detail(e)
                if not stopped:
                    out.failed(user_error(e, network_errors=NETWORK_ERRORS))
                code = 1
            finally:
                sys.stdout.flush()
            if stopped:
                out.quiet = False
                out.failed(interrupted)
                return 128 + stopped[0]
            return code

        def exit_with(code: int) -> None:
            # Raised from a callback, not inside the coroutine: react() reads it as the exit status.
            if code:
                raise SystemExit(code)

        done = ensureDeferred(go()).addCallback(exit_with)

        def stop(number: int, _frame: Any) -> None:
            # Without this, Twisted's own handler stops the reactor and the client exits 0, silently.
            if stopped:
                os._exit(128 + number)  # a second Ctrl-C: at once
            stopped.append(number)
            out.close()
            out.quiet = True
            reactor.callFromThread(done.cancel)

        def install() -> None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, stop)

        reactor.callWhenRunning(install)
        return done

    react(run)


if __name__ == "__main__":
    main()
