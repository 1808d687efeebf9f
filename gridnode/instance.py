"""
EC2 instance metadata (IMDSv2): the instance's identity, addresses and user-data.

`fetch_instance` asks the metadata service for a session token
(``PUT /latest/api/token``), then reads ``instance-id``, ``local-ipv4``,
``public-hostname`` and ``user-data`` with that token. The HTTP client is a
parameter (treq's `HTTPClient`, the ``treq`` module, or `treq.testing.StubTreq`)
and the reactor is passed in, so the whole exchange runs against a fake in tests.

Every request has its own time limit and is tried a few times, with an
exponential backoff on the reactor's clock, when the service does not answer
or answers 5xx/429. Any other unexpected answer fails at once. A 401 on a read
means the token expired: a new token is fetched, once per read. When the
service stays unreachable the result is an `InstanceMetadataUnavailable`
whose one-line message names the URL and says what to do.

`parse_user_data` turns user-data into a dict of config keys, which
`gridnode.config` validates:

- empty user-data: ``{}``;
- a document starting with ``{``: JSON; anything else: TOML;
- in either, a ``gridnode`` table/object, when present, holds gridnode's keys
  (so one user-data document can also carry other tools' settings); otherwise
  the top level does;
- cloud-init payloads (``#!`` scripts, ``#cloud-config``, ``#include``,
  ``#cloud-boothook``, ``#part-handler``, ``#upstart-job``, MIME multipart,
  and the same gzip-compressed) are normal on EC2 and are not ours: ``{}``,
  without error. gridnode does not look for its keys inside them;
- anything else that is neither valid TOML nor JSON: `ConfigError`
  (``bad_config``).
"""

from __future__ import annotations

import gzip
import json
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed

from gridnode.errors import ConfigError, GridnodeError

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

__all__ = [
    "DEFAULT_BASE_URL",
    "TOKEN_TTL_SECONDS",
    "HTTPRequester",
    "InstanceInfo",
    "InstanceMetadataUnavailable",
    "decode_user_data",
    "fetch_instance",
    "parse_user_data",
]

_log = Logger()

DEFAULT_BASE_URL = "http://169.254.169.254"
#: the longest token life IMDS grants (6 hours)
TOKEN_TTL_SECONDS = 21600

TOKEN_PATH = "/latest/api/token"
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
LOCAL_IPV4_PATH = "/latest/meta-data/local-ipv4"
PUBLIC_HOSTNAME_PATH = "/latest/meta-data/public-hostname"
USER_DATA_PATH = "/latest/user-data"

TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"

_ADVICE = (
    "not on EC2? drop --instance-metadata; on EC2, check that the instance's metadata "
    "service is enabled (and its hop limit is 2 or more when the node runs in a container)"
)

#: first lines of user-data meant for cloud-init, not for gridnode
_CLOUD_INIT_MARKERS = (
    "#!", "#cloud-config", "#include", "#cloud-boothook", "#part-handler", "#upstart-job",
    "content-type:", "mime-version:",
)
_GZIP_MAGIC = b"\x1f\x8b"


class InstanceMetadataUnavailable(GridnodeError):
    """The metadata service could not be reached or refused to answer."""

    code = "instance_metadata_unavailable"
    status = 503


_Headers = dict[bytes | str, bytes | str]


class HTTPRequester(Protocol):
    """What `fetch_instance` needs of an HTTP client: treq's ``request``."""

    def request(self, method: str, url: str, *, headers: _Headers, reactor: Any) -> Deferred[Any]: ...


@dataclass(frozen=True)
class InstanceInfo:
    """What the metadata service says about this instance."""

    instance_id: str
    local_ipv4: str
    #: None where the instance has no public DNS name (the service answers 404)
    public_hostname: str | None
    #: gridnode's keys from user-data, not yet validated (see `parse_user_data`)
    user_data: dict[str, object] = field(default_factory=dict)
    #: the user-data as it came (decompressed when gzipped); "" when there is none
    user_data_text: str = ""


def parse_user_data(text: str) -> dict[str, object]:
    """gridnode's keys in a user-data document; see the module docstring for the rules."""
    body = text.lstrip("\ufeff \t\r\n")
    if not body:
        return {}
    if body.lower().startswith(_CLOUD_INIT_MARKERS):
        return {}
    data: Any
    try:
        data = json.loads(body) if body.startswith("{") else tomllib.loads(body)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"user-data is neither TOML nor JSON: {e}") from None
    section = data.get("gridnode")
    if isinstance(section, dict):
        data = section
    return dict(data)


def decode_user_data(body: bytes) -> str:
    """The text of raw user-data bytes: gunzipped when gzipped, UTF-8 (a BOM is dropped)."""
    if body.startswith(_GZIP_MAGIC):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as e:
            raise ConfigError(f"user-data looks gzipped but does not decompress: {e}") from None
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"user-data is not UTF-8 text: {e}") from None


def fetch_instance(
    reactor: IReactorTime,
    base_url: str = DEFAULT_BASE_URL,
    *,
    http: HTTPRequester | None = None,
    timeout: float = 2.0,
    attempts: int = 4,
    backoff: float = 0.5,
) -> Deferred[InstanceInfo]:
    """
    Read this instance's identity and user-data from the IMDSv2 service at ``base_url``.

    ``reactor`` provides the clock for time limits and backoff (and, when
    ``http`` is None, the TCP connections: a real reactor then). ``http`` is
    anything with treq's ``request(method, url, headers=..., reactor=...)``;
    None builds a treq client whose connections are closed when done.
    Each request gets ``timeout`` seconds and up to ``attempts`` tries, waiting
    ``backoff``, 2x``backoff``, 4x``backoff``... between them.

    Fails with `InstanceMetadataUnavailable` (``instance_metadata_unavailable``)
    when the service cannot be read, and with `ConfigError` (``bad_config``)
    when the user-data is neither TOML, JSON nor a cloud-init payload.
    Cancelling the Deferred stops at once.
    """
    if attempts < 1:
        raise ValueError("attempts must be 1 or more")
    pool: HTTPConnectionPool | None = None
    client: HTTPRequester
    if http is not None:
        client = http
    else:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        # One connection for the five requests; closed when done, so no idle
        # connection to the metadata service outlives start-up. The reactor
        # must then be a real one (IReactorTCP as well as IReactorTime).
        pool = HTTPConnectionPool(reactor, persistent=True)
        client = HTTPClient(Agent(cast(Any, reactor), connectTimeout=timeout, pool=pool))
    fetcher = _Fetcher(reactor, base_url.rstrip("/"), client, timeout, attempts, backoff)
    return Deferred.fromCoroutine(fetcher.run(pool))


class _Timeout(Exception):
    """One try got no complete answer within its time limit."""


class _Retryable(Exception):
    """An HTTP answer worth asking again for (5xx, 429)."""


#: failures of one exchange that another try may fix
_TRANSIENT: tuple[type[BaseException], ...] = (
    _Timeout, _Retryable, ConnectError, ConnectionClosed, OSError,
    ResponseFailed, RequestTransmissionFailed,
)


def _is_cancellation(error: BaseException) -> bool:
    """Whether an exchange failed because its Deferred was cancelled."""
    if isinstance(error, CancelledError):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(r.check(CancelledError) for r in reasons)


def _describe(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(error).strip()
    if isinstance(error, (_Timeout, _Retryable)):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Fetcher:
    """One run of the IMDSv2 conversation."""

    def __init__(
        self, reactor: IReactorTime, base_url: str, http: HTTPRequester,
        timeout: float, attempts: int, backoff: float,
    ) -> None:
        self._reactor = reactor
        self._base = base_url
        self._http = http
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff
        self._token = ""

    async def run(self, pool: HTTPConnectionPool | None) -> InstanceInfo:
        try:
            return await self._read_all()
        finally:
            if pool is not None:
                await pool.closeCachedConnections()

    async def _read_all(self) -> InstanceInfo:
        self._token = await self._new_token()
        instance_id = await self._read(INSTANCE_ID_PATH)
        local_ipv4 = await self._read(LOCAL_IPV4_PATH)
        public_hostname = await self._read(PUBLIC_HOSTNAME_PATH, missing_ok=True)
        raw = await self._read_bytes(USER_DATA_PATH, missing_ok=True)
        if instance_id is None or not instance_id.strip():
            raise self._unavailable(INSTANCE_ID_PATH, "the service answered an empty instance-id")
        if local_ipv4 is None or not local_ipv4.strip():
            raise self._unavailable(LOCAL_IPV4_PATH, "the service answered an empty local-ipv4")
        text = decode_user_data(raw) if raw else ""
        user_data = parse_user_data(text)
        info = InstanceInfo(
            instance_id=instance_id.strip(),
            local_ipv4=local_ipv4.strip(),
            public_hostname=(public_hostname or "").strip() or None,
            user_data=user_data,
            user_data_text=text,
        )
        _log.info(
            "instance {instance_id} ({local_ipv4}, {public_hostname}) read from {url}; "
            "user-data: {user_data_bytes} bytes, keys {user_data_keys}",
            instance_id=info.instance_id, local_ipv4=info.local_ipv4,
            public_hostname=info.public_hostname, url=self._base,
            user_data_bytes=len(raw or b""), user_data_keys=sorted(user_data),
        )
        return info

    async def _new_token(self) -> str:
        ttl: _Headers = {TTL_HEADER: str(TOKEN_TTL_SECONDS)}
        code, body = await self._exchange("PUT", TOKEN_PATH, ttl)
        token = body.decode("ascii", "replace").strip()
        if code != 200 or not token:
            what = f"HTTP {code}" if code != 200 else "an empty token"
            raise self._unavailable(TOKEN_PATH, f"the token request got {what} (IMDSv2 disabled?)")
        return token

    def _token_header(self) -> _Headers:
        return {TOKEN_HEADER: self._token}

    async def _read(self, path: str, *, missing_ok: bool = False) -> str | None:
        body = await self._read_bytes(path, missing_ok=missing_ok)
        return None if body is None else body.decode("utf-8", "replace")

    async def _read_bytes(self, path: str, *, missing_ok: bool = False) -> bytes | None:
        """The body at ``path``; None for a 404 where ``missing_ok``."""
        code, body = await self._exchange("GET", path, self._token_header())
        if code == 401:
            _log.info("instance metadata token refused at {url}: fetching a new one",
                      url=self._base + path)
            self._token = await self._new_token()
            code, body = await self._exchange("GET", path, self._token_header())
        if code == 200:
            return body
        if code == 404 and missing_ok:
            return None
        if code == 401:
            raise self._unavailable(path, "a fresh token was refused too (HTTP 401)")
        raise self._unavailable(path, f"HTTP {code}")

    async def _exchange(self, method: str, path: str, headers: _Headers) -> tuple[int, bytes]:
        """One request with retries: the status and body of the first non-transient answer."""
        url = self._base + path
        last = ""
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._once(method, url, headers)
            except _TRANSIENT as e:
                last = _describe(e)
            if attempt < self._attempts:
                delay = self._backoff * 2 ** (attempt - 1)
                _log.warn(
                    "instance metadata {method} {url} failed ({reason}); "
                    "try {attempt} of {attempts}, next in {delay}s",
                    method=method, url=url, reason=last, attempt=attempt,
                    attempts=self._attempts, delay=delay,
                )
                await deferLater(self._reactor, delay, lambda: None)
        raise self._unavailable(path, f"no answer after {self._attempts} tries (last: {last})")

    async def _once(self, method: str, url: str, headers: _Headers) -> tuple[int, bytes]:
        """One request and its body, within the time limit; 5xx/429 raise `_Retryable`."""
        timed_out = False
        d = Deferred.fromCoroutine(self._request(method, url, headers))

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._reactor.callLater(self._timeout, expire)
        try:
            code, body = await d
        except Exception as e:
            if timed_out:
                raise _Timeout(f"timed out after {self._timeout:g}s") from None
            if _is_cancellation(e):
                raise CancelledError() from e
            raise
        finally:
            if timer.active():
                timer.cancel()
        if code >= 500 or code == 429:
            raise _Retryable(f"HTTP {code}")
        return code, body

    async def _request(self, method: str, url: str, headers: _Headers) -> tuple[int, bytes]:
        response = await self._http.request(method, url, headers=headers, reactor=self._reactor)
        body = await response.content()
        return int(response.code), bytes(body)

    def _unavailable(self, path: str, reason: str) -> InstanceMetadataUnavailable:
        return InstanceMetadataUnavailable(
            f"instance metadata unavailable at {self._base + path}: {reason}; {_ADVICE}"
        )
