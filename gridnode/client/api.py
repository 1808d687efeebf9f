"""
The Python client: upload, follow and fetch jobs across a pool, moving on
from a node that fails, hangs or is full.

Every call goes through treq with the HTTP client passed in (tests give a
StubTreq or a real client). Timeouts: a connect timeout; while uploading, a
stall timeout (no body byte accepted for that long, as with a frozen node);
after the body, a response timeout.

Choosing the node for an upload: two candidates sampled from the registry's
list, both asked ``GET /health`` at once (``check_timeout``), the one that
answered with the shorter expected wait first (``rank_checked``). Registry
figures are a heartbeat old and every client reads the same ones, so choosing
on them alone herds clients onto the nodes that looked idle at the last
heartbeat (bench/loadbalance.py).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, gatherResults
from twisted.internet.error import ConnectError, ConnectingCancelledError, TimeoutError
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.web.client import (
    FileBodyProducer,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
)

from gridnode.client.bodies import CountingFile, StreamReader, download, manifest_entries, playlist_entries, read_stream
from gridnode.client.failures import hint, network_failure
from gridnode.client.nodes import Candidates, NodeInfo, order_for_failover, rank_checked, with_live_load, with_sending
from gridnode.errors import GridnodeError
from gridnode.priority import DEFAULT as DEFAULT_PRIORITY

FINAL = {"done", "failed", "cancelled"}
#: failures after which another node is worth a try
NETWORK_ERRORS = (ConnectError, ConnectingCancelledError, TimeoutError, CancelledError, ResponseFailed,
                  RequestGenerationFailed, RequestTransmissionFailed, ConnectionError)


#: tries on one node while it answers that the upload's key is still being accepted
IN_USE_TRIES = 5


class NodeUnavailable(GridnodeError):
    """This node could not take the request now; another may. Its code says why: refused
    (``node_unavailable``), stalled (``timed_out``), cut (``connection_lost``), or the node's own."""

    code = "node_unavailable"
    status = 503


def unavailable(node: NodeInfo, e: BaseException) -> NodeUnavailable:
    code, reason = network_failure(e)
    return NodeUnavailable(f"{node.id} ({node.http_url}): {reason}", code=code)


def default_http(reactor: Any, connect_timeout: float = 5.0) -> Any:
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    pool.retryAutomatically = False
    return treq.client.HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=pool))


class BearerHTTP:
    """An HTTP client (treq's interface) that sends ``Authorization: Bearer <token>`` with every
    request: a pool with a token keyring answers nothing about jobs without one."""

    def __init__(self, http: Any, token: str) -> None:
        self.http = http
        self.token = token

    def _signed(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        headers = dict(kwargs.get("headers") or {})
        headers["Authorization"] = f"Bearer {self.token}"
        return {**kwargs, "headers": headers}

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        return self.http.request(method, url, **self._signed(kwargs))

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.http.get(url, **self._signed(kwargs))

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.http.post(url, **self._signed(kwargs))

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.http.delete(url, **self._signed(kwargs))


async def error_of(response: Any) -> GridnodeError:
    """The node's coded error from a response, or one made from its status."""
    import treq

    body = await treq.content(response)
    try:
        err = json.loads(body)["error"]
        error = GridnodeError(str(err["message"]), code=str(err["code"]), status=response.code)
    except (ValueError, KeyError, TypeError):
        error = GridnodeError(f"HTTP {response.code} from the node", code=f"http_{response.code}",
                              status=response.code)
    retry_after = response.headers.getRawHeaders(b"retry-after")
    if retry_after:
        try:
            error.retry_after = int(retry_after[0])  # type: ignore[attr-defined]
        except ValueError:
            pass
    return error


def retryable(error: GridnodeError) -> bool:
    return error.status >= 500 or error.status in (408, 429)


class GridClient:
    _log = Logger()

    def __init__(self, reactor: Any, http: Any, nodes: list[NodeInfo], *, stall_timeout: float = 15.0,
                 response_timeout: float = 60.0, request_timeout: float = 10.0, check_timeout: float = 2.0,
                 rng: random.Random | None = None, priority: str = DEFAULT_PRIORITY) -> None:
        self.reactor = reactor
        #: the priority of the jobs it uploads, which its choice of node weighs the queues by
        self.priority = priority
        self.http = http
        self.nodes = nodes
        self.stall_timeout = stall_timeout
        self.response_timeout = response_timeout
        self.request_timeout = request_timeout
        self.check_timeout = check_timeout
        self.rng = rng or random.Random()
        #: this client's uploads in flight, per node id: a node counts a job only once it has
        #: answered, so parallel uploads would otherwise all see the same idle node
        self.sending: dict[str, int] = {}

    def _order(self) -> list[NodeInfo]:
        if not self.nodes:
            raise GridnodeError("no live nodes in the registry; start a node or check --store/--env/--pool",
                                code="no_nodes", status=503)
        return order_for_failover(self.nodes, self.rng)

    async def _upload_order(self) -> list[NodeInfo]:
        """Two candidates (drawn by speed: ``Candidates``), checked live, ranked (``rank_checked``);
        then the rest."""
        order = self._order()
        if len(order) < 2 or self.check_timeout <= 0:
            return order
        pair = Candidates(order).draw(self.rng)
        checked = await gatherResults([ensureDeferred(self._check(n)) for n in pair])
        chosen = rank_checked([(with_sending(n, self.sending.get(n.id, 0)), ok) for n, ok in checked],
                              self.rng, self.priority)
        return chosen + [n for n in order if n.id not in {pair[0].id, pair[1].id}]

    async def check_all(self) -> list[tuple[NodeInfo, bool]]:
        """Every node with its live load, and whether it answered ``/health`` as ready (at once)."""
        return list(await gatherResults([ensureDeferred(self._check(n)) for n in self.nodes]))


    async def _check(self, node: NodeInfo) -> tuple[NodeInfo, bool]:
        """``node`` with its live load, and whether it answered ``/health`` as ready to work."""
        import treq

        try:
            response = await self.http.get(f"{node.http_url}/health", timeout=self.check_timeout)
            health = await treq.json_content(response)
        except (*NETWORK_ERRORS, ValueError) as e:
            self._log.debug("node {node} did not answer its health check: {reason}", node=node.id, reason=_reason(e))
            return node, False
        return with_live_load(node, health), response.code == 200

    # -- upload

    async def upload(self, path: str, *, presets: list[str], name: str | None = None,
                     on_progress: Callable[[int, int], None] | None = None,
                     idempotency_key: str | None = None) -> tuple[NodeInfo, dict[str, Any]]:
        """Upload a file to the first node that takes it; returns (node, job). Every try carries one
        Idempotency-Key (a new one unless given): a try whose answer was lost made its job already,
        and the next node answers that job instead of making a second."""
        size = os.path.getsize(path)
        key = idempotency_key or str(uuid.uuid4())
        last: GridnodeError | None = None
        for node in await self._upload_order():
            # counted from the choice on, with no wait between: the next upload's choice sees it
            self.sending[node.id] = self.sending.get(node.id, 0) + 1
            try:
                job = await self._upload_keyed(node, path, size, presets, name or os.path.basename(path),
                                               on_progress, key)
                return node, job
            except NodeUnavailable as e:
                self._log.info("node {node} unavailable: {reason}; trying another", node=node.id, reason=e.message)
                last = e
            finally:
                self.sending[node.id] -= 1
        assert last is not None
        tried = "the one node" if len(self.nodes) == 1 else "no node took the upload"
        raise GridnodeError(f"{tried}: {last.message}; {hint(last.code) or 'try again later'}", code=last.code,
                            status=last.status)

    async def _upload_keyed(self, node: NodeInfo, path: str, size: int, presets: list[str], name: str,
                            on_progress: Callable[[int, int], None] | None, key: str) -> dict[str, Any]:
        """`_upload_to`, asked again after its Retry-After while the node says that the first try with
        the key is still being accepted (a few times, then the next node)."""
        for _ in range(IN_USE_TRIES - 1):
            try:
                return await self._upload_to(node, path, size, presets, name, on_progress, key)
            except GridnodeError as e:
                if e.code != "idempotency_key_in_use":
                    raise
                await deferLater(self.reactor, float(getattr(e, "retry_after", 2)), lambda: None)
        try:
            return await self._upload_to(node, path, size, presets, name, on_progress, key)
        except GridnodeError as e:
            if e.code == "idempotency_key_in_use":
                raise NodeUnavailable(f"{node.http_url}: {e.message}") from None
            raise

    async def _upload_to(self, node: NodeInfo, path: str, size: int, presets: list[str], name: str,
                         on_progress: Callable[[int, int], None] | None, key: str | None = None) -> dict[str, Any]:
        sent = [0]
        quiet = [0.0]

        def on_read(n: int) -> None:
            sent[0] += n
            quiet[0] = 0.0
            if on_progress is not None:
                on_progress(sent[0], size)

        with open(path, "rb") as f:
            body = FileBodyProducer(CountingFile(f, on_read), readSize=256 * 1024)
            headers = {"content-type": "application/octet-stream"}
            if key is not None:
                headers["idempotency-key"] = key
            d = self.http.post(f"{node.http_url}/jobs", data=body,
                               params={"presets": ",".join(presets), "name": name, "priority": self.priority},
                               headers=headers)
            watchdog = LoopingCall(self._watch, d, sent, size, quiet)
            watchdog.clock = self.reactor
            watchdog.start(0.5, now=False)
            try:
                response = await d
                # A node may answer before the whole body is sent (a refusal, an Idempotency-Key's
                # replay): the rest of the body is not sent (started, as an answer came).
                body.stopProducing()
            except NETWORK_ERRORS as e:
                raise unavailable(node, e) from None
            finally:
                if watchdog.running:
                    watchdog.stop()
        if response.code == 201:
            import treq

            return dict(await treq.json_content(response))
        error = await error_of(response)
        if retryable(error):
            raise NodeUnavailable(f"{node.id}: {error.message}", code=error.code, status=error.status)
        raise error

    def _watch(self, d: Deferred[Any], sent: list[int], size: int, quiet: list[float]) -> None:
        quiet[0] += 0.5
        limit = self.stall_timeout if sent[0] < size else self.response_timeout
        if quiet[0] >= limit:
            # d.called is already true while it waits on the connection's Deferred; cancel()
            # reaches that one. Not from inside the LoopingCall: the waiting coroutine
            # resumes in its own call.
            quiet[0] = float("-inf")
            self.reactor.callLater(0, d.cancel)

    # -- status and progress

    async def get_job(self, job_id: str, prefer: NodeInfo | None = None) -> dict[str, Any]:
        """The job's record from any node (the owner first when known)."""
        import treq

        order = self._order()
        if prefer is not None:
            order = [prefer] + [n for n in order if n.id != prefer.id]
        last: Exception | None = None
        for node in order:
            try:
                response = await self.http.get(f"{node.http_url}/jobs/{job_id}", timeout=self.request_timeout)
            except NETWORK_ERRORS as e:
                last = e
                continue
            if response.code == 200:
                return dict(await treq.json_content(response))
            error = await error_of(response)
            if not retryable(error):
                raise error
            last = error
        code = "no_nodes"
        if isinstance(last, NETWORK_ERRORS):
            code = network_failure(last)[0]
        elif isinstance(last, GridnodeError):
            code = last.code
        raise GridnodeError(f"no node answered about job {job_id}: {_reason(last)}; {hint(code) or 'try again later'}",
                            code=code, status=503)

    async def wait(self, job_id: str, node: NodeInfo | None = None,
                   on_update: Callable[[dict[str, Any]], None] | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Follow a job to a final state: Server-Sent Events from its node, else polling any node."""
        if node is not None:
            try:
                job = await self._follow_events(node, job_id, on_update)
                if job is not None and job.get("state") in FINAL:
                    return job
            except NETWORK_ERRORS + (GridnodeError,) as e:  # noqa: B030
                self._log.info("events from {node} ended ({reason}); polling", node=node.id, reason=_reason(e))
        while True:
            job = await self.get_job(job_id, prefer=node)
            if on_update is not None:
                on_update(job)
            if job.get("state") in FINAL:
                return job
            await deferLater(self.reactor, poll, lambda: None)

    async def _follow_events(self, node: NodeInfo, job_id: str,
                             on_update: Callable[[dict[str, Any]], None] | None) -> dict[str, Any] | None:

        response = await self.http.get(f"{node.http_url}/jobs/{job_id}/events", timeout=self.request_timeout,
                                       unbuffered=True)
        if response.code != 200:
            raise await error_of(response)
        latest: list[dict[str, Any]] = []
        buffer = [b""]

        def chunk(data: bytes) -> None:
            buffer[0] += data
            while b"\n\n" in buffer[0]:
                event, buffer[0] = buffer[0].split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        job = json.loads(line[6:])
                        latest[:] = [job]
                        if on_update is not None:
                            on_update(job)

        await read_stream(response, chunk, self.reactor, lambda reader: self._guard_events(node, reader))
        return latest[0] if latest else None

    def _guard_events(self, node: NodeInfo, reader: StreamReader) -> None:
        """A node sends no event while a job waits in its queue, so silence alone says nothing: after
        ``stall_timeout`` of it, the node's ``/health`` is asked; if it does not answer (frozen, gone)
        the stream is dropped and the job is polled from any node instead."""
        if reader.checking or reader.quiet() < self.stall_timeout:
            return
        reader.checking = True

        def checked(result: tuple[NodeInfo, bool]) -> None:
            reader.checking = False
            if result[1]:
                reader.heard()
            else:
                reader.abort()

        ensureDeferred(self._check(node)).addCallback(checked)

    # -- results

    async def fetch(self, job: dict[str, Any], folder: str, node: NodeInfo | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None) -> list[str]:
        """Download every output of a done job into ``folder``; sizes are checked. An HLS
        output is its master playlist and everything the playlists name; a CMAF's, its DASH
        manifest too; a DASH output's, its manifest and the segments its timelines name; a
        storyboard's, its VTT and the sheets it names."""
        if job.get("state") != "done":
            raise GridnodeError(f"job {job.get('id')} is {job.get('state')}, not done; nothing to fetch",
                                code="not_done", status=409)
        os.makedirs(folder, exist_ok=True)
        nodes = ([node] if node else []) + [x for x in self._order() if node is None or x.id != node.id]
        paths: list[str] = []
        for output in job.get("outputs", []):
            name = str(output["name"])
            files = int(output.get("files") or 1)
            size = int(output["size"]) if output.get("size") is not None else None
            todo = [name]
            dash = output.get("dash")
            if isinstance(dash, str) and "/" in name:  # a CMAF's DASH manifest: over the same segments
                todo.append(name.rsplit("/", 1)[0] + "/" + dash.rsplit("/", 1)[-1])
            done: set[str] = set()
            got_total = 0
            while todo:
                current = todo.pop(0)
                if current in done:
                    continue  # CMAF: every media playlist and the master name the audio's files
                done.add(current)
                url = output["url"][: -len(name)] + current
                one = size if files == 1 else None
                target, got = await self._fetch_one(nodes, url, folder, current, one, on_progress)
                paths.append(target)
                got_total += got
                if current.endswith((".m3u8", ".vtt")):
                    todo += playlist_entries(current, target)
                elif current.endswith(".mpd"):
                    todo += manifest_entries(current, target)
            if size is not None and got_total != size:
                raise GridnodeError(f"{name}: got {got_total} bytes of {size}", code="short_download", status=502)
        return paths

    async def _fetch_one(self, nodes: list[NodeInfo], url: str, folder: str, name: str, size: int | None,
                         on_progress: Callable[[str, int, int], None] | None) -> tuple[str, int]:
        parts = [p for p in name.split("/") if p not in ("", ".", "..")]
        target = os.path.join(folder, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        last: Exception | None = None
        for n in nodes:
            try:
                response = await self.http.get(n.http_url + url, unbuffered=True, timeout=self.response_timeout)
            except NETWORK_ERRORS as e:
                last = e
                continue
            if response.code != 200:
                last = await error_of(response)
                continue
            try:
                got = await download(response, target + ".part", name, size or 0, on_progress, clock=self.reactor,
                                     stall_timeout=self.stall_timeout)
            except NETWORK_ERRORS as e:
                last = e
                continue
            if size is not None and got != size:
                last = GridnodeError(f"{name}: got {got} bytes of {size}", code="short_download")
                continue
            os.replace(target + ".part", target)
            return target, got
        raise GridnodeError(f"could not download {name}: {_reason(last)}", code="download_failed", status=503)


def _reason(e: BaseException | None) -> str:
    if e is None:
        return "no answer"
    if isinstance(e, GridnodeError):
        return f"{e.code}: {e.message}"
    if isinstance(e, NETWORK_ERRORS):
        return network_failure(e)[1]
    return str(e) or type(e).__name__


def run(coro: Any) -> Deferred[Any]:
    return ensureDeferred(coro)
