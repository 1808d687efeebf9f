"""
NodeConfig: the typed, validated settings of one node.

Layers, lowest to highest: built-in defaults < ``--config FILE`` (TOML) <
EC2 user-data < command line. Every layer uses the same key names (the long
option names, ``max-upload``; ``max_upload`` is accepted too). Validation
happens here, once, and fails with a `ConfigError` naming the key and what
is wrong; the rest of the code receives a `NodeConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gridnode.endpoints import default_node_id, endpoint_port, is_loopback
from gridnode.errors import ConfigError, GridnodeError
from gridnode.media.chunks import CHUNK_OVER, CHUNK_SECONDS, chunk_over_setting, chunk_seconds_setting
from gridnode.media.templates import Template, parse_templates
from gridnode.notify.targets import Defaults
from gridnode.retention import Retention
from gridnode.store import parse_store_url

DEFAULT_METADATA_URL = "http://169.254.169.254"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Setting:
    """One configuration key: its type, default and help text."""

    key: str
    default: Any
    help: str
    parse: Callable[[Any], Any]
    metavar: str = ""


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError("must be a whole number") from None
        if isinstance(value, float) and value != n:
            raise ValueError("must be a whole number")
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return n

    return parse


def _positive_float(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if not f > 0:
        raise ValueError("must be more than 0")
    return f


def _opt_megabytes(value: Any) -> float | None:
    """A size in MB, fractions allowed, up to 1 TiB; None: unset."""
    if value is None:
        return None
    f = _positive_float(value)
    if not f <= 1024 * 1024:
        raise ValueError("must be at most 1048576 (1 TiB)")
    return f


def _store_rate(value: Any) -> float | None:
    """Requests a second, or None for 'auto' (the node's share of the pool's budget)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise ValueError("must be 'auto' or a number of requests a second, such as 20")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be 'auto' or a number of requests a second, such as 20") from None
    if not 0.1 <= f <= 100000:
        raise ValueError("must be 'auto' or between 0.1 and 100000 requests a second")
    return f


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def _name(value: Any) -> str:
    """env, pool and node ids become key segments: keep them plain."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError("must be 1-63 of A-Z a-z 0-9 _ - (starting with a letter or digit)")
    return value


def _opt_name(value: Any) -> str | None:
    return None if value is None else _name(value)


def _sandbox(value: Any) -> str:
    if value not in ("bwrap", "weak"):
        raise ValueError("must be bwrap (a box of its own for every ffmpeg and ffprobe) or weak (none)")
    return str(value)


def _store(value: Any) -> str:
    parse_store_url(_str(value))  # raises ConfigError with its own message
    return str(value)


def _endpoint(value: Any) -> str:
    """A Twisted server endpoint string, parsed as Twisted will parse it at start (no socket yet)."""
    example = "a Twisted endpoint string such as tcp:8080:interface=127.0.0.1"
    text = _str(value)
    if ":" not in text:
        raise ValueError(f"must be {example}")
    from twisted.internet.endpoints import serverFromString  # not the reactor: nothing listens here

    try:
        serverFromString(None, text)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        raise ValueError(f"is not {example} ({str(e)[:120]})") from None
    port = endpoint_port(text)
    if port is not None and port > 65535:
        raise ValueError(f"has port {port}; ports go up to 65535")
    return text


def _url(value: Any) -> str | None:
    if value is None:
        return None
    text = _str(value)
    if not re.match(r"https?://[^/\s]+", text):
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def _metadata(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if value is True or value == "":
        return DEFAULT_METADATA_URL
    return _url(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", ""):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError("must be true or false")


LOG_LEVELS = ("debug", "info", "warn", "error")


def _table(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("must be a table of the config file ([templates.NAME] with description and outputs)")
    return value


def _log_level(value: Any) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return str(value)


def _origins(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of origins such as https://example.com")
    return tuple(value)


_NO_RETENTION = Retention()


def _retention(value: Any) -> Retention:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be DAYS, or TENANT=DAYS (repeatable, or space-separated)")
    return Retention.parse(value)


def _prefixes(value: Any) -> tuple[str, ...]:
    """Key prefixes jobs may take their input from in the store, each a folder (``incoming/``)."""
    from gridnode import keys

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of key prefixes such as incoming/")
    out = []
    for prefix in value:
        folder = prefix if prefix.endswith("/") else prefix + "/"
        try:
            keys.check_key(folder[:-1])
        except GridnodeError:
            raise ValueError(f"{prefix!r} is not a key prefix: segments of A-Z a-z 0-9 . _ - between /") from None
        if folder.split("/", 1)[0] + "/" in keys.NODE_PREFIXES:
            raise ValueError(f"{prefix!r} is where the node keeps its own objects: use a prefix of your own")
        out.append(folder)
    return tuple(out)


def _webhooks(value: Any) -> Defaults:
    from gridnode.notify.targets import NotifyRefused, parse_defaults

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be http(s) URLs (comma-separated), or TENANT=URLS")
    try:
        return parse_defaults(value)
    except NotifyRefused as e:
        raise ValueError(f"is refused: {e.message}") from None


def _cidrs(value: Any) -> tuple[str, ...]:
    from gridnode.notify.targets import parse_allow

    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be CIDRs such as 127.0.0.0/8")
    parse_allow(value)
    return tuple(value)


SETTINGS: tuple[Setting, ...] = (
    Setting("store", "file:gridnode-data", "where objects live: file:PATH or s3://BUCKET/PREFIX", _store, "URL"),
    Setting("s3-endpoint", None, "S3 endpoint URL, for S3-compatible servers", _url, "URL"),
    Setting("s3-region", None, "S3 region", _opt_str, "NAME"),
    Setting("store-rate", "auto", "store requests a second this node sends (bodies aside): a number, or 'auto', "
            "its share of 1,750/s across the live pool (see docs/operations.md)", _store_rate, "N"),
    Setting("env", "dev", "environment this node joins (staging, production, ...)", _name, "NAME"),
    Setting("pool", "default", "pool of nodes this node joins", _name, "NAME"),
    Setting("http", "tcp:8080:interface=127.0.0.1", "HTTP API endpoint (Twisted endpoint string)",
            _endpoint, "ENDPOINT"),
    Setting("peer", "tcp:8081:interface=127.0.0.1", "peer protocol endpoint (Twisted endpoint string)",
            _endpoint, "ENDPOINT"),
    Setting("advertise", None, "host name or address other nodes and clients use to reach this node",
            _opt_str, "HOST"),
    Setting("node-id", None, "this node's id (default: the EC2 instance-id, else HOSTNAME-HTTPPORT)",
            _opt_name, "ID"),
    Setting("workers", None, "concurrent ffmpeg processes (default: CPU count)", _int_range(1, 256), "N"),
    Setting("chunk-over", CHUNK_OVER, "inputs longer than this many seconds are converted in chunks, several "
            "workers at once (0: every input; 'off': none)", chunk_over_setting, "S"),
    Setting("chunk-seconds", CHUNK_SECONDS, "about how long each chunk is, in seconds", chunk_seconds_setting, "S"),
    Setting("queue", 32, "jobs waiting for a worker before uploads get 503", _int_range(0, 100000), "N"),
    Setting("max-upload", 4096, "largest upload accepted, in MB", _int_range(1, 1024 * 1024), "MB"),
    Setting("min-free", 512, "refuse uploads when the work folder has less free space, in MB",
            _int_range(0, 1024 * 1024), "MB"),
    Setting("max-duration", 4 * 3600, "longest input accepted, in seconds", _int_range(1, 7 * 24 * 3600), "S"),
    Setting("max-audio-duration", 24 * 3600, "longest input of audio alone accepted, in seconds",
            _int_range(1, 7 * 24 * 3600), "S"),
    Setting("max-pixels", 8192 * 4320, "largest input frame accepted, in pixels", _int_range(1, 1 << 31), "N"),
    Setting("max-output", None, "largest output, in MB: each file and each HLS rung; a job's outputs together "
            "may hold this times their number (default: 256, or 4 times the input when that is more)",
            _opt_megabytes, "MB"),
    Setting("heartbeat", 30.0, "seconds between registry record refreshes", _positive_float, "S"),
    Setting("stale", 300.0, "registry records older than this many seconds are ignored",
            _positive_float, "S"),
    Setting("job-lease", 30.0, "a node looks for jobs handed to it every 2 x this many seconds (a job is "
            "adopted when its owner is gone, not when this runs out: nothing is renewed)",
            _positive_float, "S"),
    Setting("drain-timeout", 60.0, "on SIGTERM, seconds running jobs get to finish before peers adopt them",
            _positive_float, "S"),
    Setting("work-dir", "gridnode-work", "local folder for upload spool and ffmpeg scratch files",
            _str, "DIR"),
    Setting("secret-file", None, "keyring file of the pool's peer secret (lines 'ID SECRET'; the first signs, "
            "all verify)", _opt_str, "FILE"),
    Setting("upload-secret", None, "keyring file of the access-token keys (lines 'ID SECRET'; the first signs, "
            "all verify): every job, upload, result and ops request then needs a JWT", _opt_str, "FILE"),
    Setting("result-url-ttl", 3600, "seconds a result URL in a job's JSON stays valid, where the node has an "
            "upload-secret (the URL is signed; a fresh one on every read of the job)", _int_range(1, 7 * 24 * 3600),
            "S"),
    Setting("allow-anonymous-uploads", False, "serve a non-loopback --http without tokens: anyone who reaches "
            "it may upload, and read, watch, download and cancel every job", _bool, "BOOL"),
    Setting("cors-origins", (), "page origins allowed to call the API from a browser (comma-separated)",
            _origins, "ORIGINS"),
    Setting("instance-metadata", None,
            f"read user-data and identity from the EC2 instance metadata service "
            f"(default URL {DEFAULT_METADATA_URL})", _metadata, "URL"),
    Setting("ffmpeg-user", "auto", "user ffmpeg and ffprobe run as: a name or uid, 'none' for the node's own, "
            "'auto' for nobody when the node runs as root", _str, "USER"),
    Setting("sandbox", "bwrap", "how ffmpeg and ffprobe are confined: 'bwrap', a box of their own (the node "
            "does not start where none can be made), or 'weak', none: accept that on purpose", _sandbox, "MODE"),
    Setting("log-level", "info", "the least level logged: debug (Twisted's per-connection lines too), info, "
            "warn, error", _log_level, "LEVEL"),
    Setting("retain-inputs", _NO_RETENTION, "days a finished job's input is kept, then deleted by the retention "
            "sweep (default: for ever); TENANT=DAYS for one tenant's jobs (repeatable, or space-separated)",
            _retention, "DAYS"),
    Setting("retain-outputs", _NO_RETENTION, "days a finished job's outputs are kept, then deleted by the retention "
            "sweep (default: for ever); TENANT=DAYS for one tenant's jobs (repeatable, or space-separated)",
            _retention, "DAYS"),
    Setting("retention-sweep", 3600.0, "seconds between retention sweeps (one node of the pool sweeps at a time)",
            _positive_float, "S"),
    Setting("input-prefixes", (), "key prefixes of the store a POST /jobs may name as its input (comma-separated; "
            "with tokens, only <prefix><tenant>/... of the caller's tenant)", _prefixes, "PREFIXES"),
    Setting("webhook-secret", None, "keyring file of the pool's webhook secrets (lines 'ID whsec_BASE64'; every "
            "key signs): jobs may then name notify URLs", _opt_str, "FILE"),
    Setting("webhook", Defaults(), "notify URLs of every job that names none: URLS (comma-separated) for every "
            "tenant, TENANT=URLS for one (repeatable, or space-separated)", _webhooks, "URLS"),
    Setting("webhook-allow", (), "address ranges webhooks may go to although not public (CIDR; repeatable, or "
            "comma-separated)", _cidrs, "CIDR"),
    Setting("templates", {}, "named output sets ([templates.NAME] tables of the config file; docs/api.md, "
            "\"Templates\")", _table, "TABLE"),
    Setting("watermark-dir", None, "folder of the PNG images outputs may lay over the picture as a watermark",
            _opt_str, "DIR"),
    Setting("ffmpeg", "ffmpeg", "ffmpeg binary", _str, "PATH"),
    Setting("ffprobe", "ffprobe", "ffprobe binary", _str, "PATH"),
)
BY_KEY = {s.key: s for s in SETTINGS}
#: keys that make no sense inside user-data or a config file
CLI_ONLY = frozenset({"config"})
#: keys only a file (the config file, user-data) can hold: tables
FILE_ONLY = frozenset({"templates"})
#: keys user-data may not set: where to read user-data from is decided before
USER_DATA_FORBIDDEN = frozenset({"instance-metadata"})


@dataclass(frozen=True)
class NodeConfig:
    store: str
    s3_endpoint: str | None
    s3_region: str | None
    store_rate: float | None
    env: str
    pool: str
    http: str
    peer: str
    advertise: str | None
    node_id: str | None
    workers: int
    chunk_over: float | None
    chunk_seconds: float
    queue: int
    max_upload: int
    min_free: int
    max_duration: int
    max_audio_duration: int
    max_pixels: int
    max_output: float | None
    heartbeat: float
    stale: float
    job_lease: float
    drain_timeout: float
    work_dir: str
    secret_file: str | None
    upload_secret: str | None
    result_url_ttl: int
    allow_anonymous_uploads: bool
    cors_origins: tuple[str, ...]
    instance_metadata: str | None
    ffmpeg_user: str
    sandbox: str
    log_level: str
    retain_inputs: Retention
    retain_outputs: Retention
    retention_sweep: float
    input_prefixes: tuple[str, ...]
    webhook_secret: str | None
    webhook: Defaults
    webhook_allow: tuple[str, ...]
    templates: Mapping[str, Template]
    watermark_dir: str | None
    ffmpeg: str
    ffprobe: str

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload * 1024 * 1024

    @property
    def max_output_bytes(self) -> int | None:
        return None if self.max_output is None else max(1, int(self.max_output * 1024 * 1024))

    def with_identity(self, instance_id: str | None = None, address: str | None = None) -> NodeConfig:
        """Fill node-id and advertise from the instance (EC2) or the host."""
        node_id = self.node_id or instance_id or default_node_id(self.http)
        return dataclasses.replace(self, node_id=node_id, advertise=self.advertise or address)


def normalize(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check a layer's keys (not values) and return them with canonical names."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        canon = str(key).replace("_", "-")
        if canon not in BY_KEY:
            raise ConfigError(
                f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(BY_KEY))}"
            )
        out[canon] = value
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """A TOML file of config keys, at the top level or in a [gridnode] table."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    if isinstance(data.get("gridnode"), dict):
        data = data["gridnode"]
    return normalize(data, f"config file {path}")


def build_config(
    *, file: Mapping[str, Any] | None = None, user_data: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None, file_path: str | None = None,
) -> NodeConfig:
    """Layer the sources and validate every value; raise ConfigError on the first bad one, naming
    its source (the config file by its path), key and value."""
    file_source = f"config file {file_path}" if file_path else "config file"
    layers = [(file_source, normalize(file or {}, file_source))]
    ud = normalize(user_data or {}, "user-data")
    for key in ud:
        if key in USER_DATA_FORBIDDEN:
            raise ConfigError(f"user-data: {key!r} cannot be set from user-data")
    layers.append(("user-data", ud))
    layers.append(("command line", normalize(cli or {}, "command line")))
    merged: dict[str, tuple[str, Any]] = {}
    for source, layer in layers:
        for key, value in layer.items():
            merged[key] = (source, value)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in merged:
            source, raw = merged[setting.key]
            try:
                value = setting.parse(raw)
            except ValueError as e:
                raise ConfigError(f"{source}: {setting.key} = {raw!r} {e}") from None
            except ConfigError as e:
                raise ConfigError(f"{source}: {e.message}") from None
        else:
            value = setting.default
        values[setting.key.replace("-", "_")] = value
    if values["workers"] is None:
        values["workers"] = cpu_count()
    values["store_rate"] = _store_rate(values["store_rate"])  # the default, 'auto', is None
    if values["watermark_dir"] is not None:
        values["watermark_dir"] = os.path.abspath(values["watermark_dir"])
    try:
        values["templates"] = parse_templates(values["templates"], watermarks=values["watermark_dir"])
    except GridnodeError as e:
        source = merged["templates"][0] if "templates" in merged else "config file"
        raise ConfigError(f"{source}: {e.message}") from None
    config = NodeConfig(**values)
    if not (config.upload_secret or config.allow_anonymous_uploads or is_loopback(config.http)):
        raise ConfigError(
            f"http: {config.http} is reachable from the network, so requests need tokens: set upload-secret "
            "(a keyring file), or allow-anonymous-uploads = true if anyone who reaches it may upload, read and "
            "cancel jobs"
        )
    if config.webhook and not config.webhook_secret:
        raise ConfigError("webhook: webhooks are signed; set webhook-secret (a keyring file of whsec_ secrets)")
    return config
