"""
Where the client looks for its pool, the same from any folder: the command line
(``--node``, ``--store``, ``--registry-url``), else the environment
(``GRIDNODE_STORE``, ``GRIDNODE_REGISTRY_URL``), else the user's config file
(``$XDG_CONFIG_HOME/gridnode/client.toml``, by default ``~/.config/...``), else
the embedded default ``file:gridnode-data`` in the current folder. ``env``,
``pool`` and the S3 settings follow the same order, each on its own.

Pure: the environment and the file reader are passed in, and nothing here
creates a file or folder (the store is opened read-only later).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gridnode.errors import GridnodeError

DEFAULT_STORE = "file:gridnode-data"
#: config-file keys, with the environment variable that overrides each
KEYS = {"store": "GRIDNODE_STORE", "registry-url": "GRIDNODE_REGISTRY_URL", "env": "GRIDNODE_ENV",
        "pool": "GRIDNODE_POOL", "s3-endpoint": "GRIDNODE_S3_ENDPOINT", "s3-region": "GRIDNODE_S3_REGION"}
DEFAULTS = {"env": "dev", "pool": "default"}
#: the largest config file read (a user's file: a few lines)
MAX_CONFIG_BYTES = 64 * 1024


@dataclass(frozen=True)
class Where:
    """The pool the client talks to, and where that came from (for the "no nodes" line)."""

    kind: str  # "store", "registry" or "nodes"
    store: str | None = None
    registry_url: str | None = None
    nodes: tuple[str, ...] = ()
    origin: str = "the default"
    env: str = "dev"
    pool: str = "default"
    s3_endpoint: str | None = None
    s3_region: str | None = None
    config_path: str = ""
    settings: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """What was read, for a user: ``file:/abs/path (env dev, pool default; from GRIDNODE_STORE)``."""
        if self.kind == "nodes":
            return f"{', '.join(self.nodes)} (from --node)"
        if self.kind == "registry":
            return f"{self.registry_url} (from {self.origin})"
        store = self.store or DEFAULT_STORE
        if store.startswith("file:"):
            store = "file:" + os.path.abspath(store[len("file:"):])
        return f"{store} (env {self.env}, pool {self.pool}; from {self.origin})"

    def no_nodes_hint(self) -> str:
        looked = f"--store, GRIDNODE_STORE, {self.config_path}" if self.origin == "the default" else self.origin
        return (f"no live nodes in {self.describe()}; start a pool (`gridnode pool`) or say where it is "
                f"(looked at: {looked})")


def config_path(environ: Mapping[str, str]) -> str:
    """The user's client config file (XDG base directory rules)."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "gridnode", "client.toml")


def parse_config(text: bytes, path: str) -> dict[str, str]:
    """A client.toml's settings (top level or a ``[gridnode]`` table; ``registry_url`` is taken for
    ``registry-url``); a bad file or key is an error naming both."""
    if len(text) > MAX_CONFIG_BYTES:
        raise GridnodeError(f"{path}: over {MAX_CONFIG_BYTES} bytes; a client config is a few lines",
                            code="bad_config", status=400)
    try:
        data: dict[str, Any] = tomllib.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise GridnodeError(f"{path}: not TOML ({e}); fix or remove it", code="bad_config", status=400) from None
    if isinstance(data.get("gridnode"), dict):
        data = data["gridnode"]
    out: dict[str, str] = {}
    for raw, value in data.items():
        key = raw.replace("_", "-")
        if key not in KEYS:
            raise GridnodeError(f"{path}: unknown key {raw!r}; known: {', '.join(KEYS)}", code="bad_config",
                                status=400)
        if not isinstance(value, str) or not value.strip():
            raise GridnodeError(f"{path}: {raw} must be a non-empty string", code="bad_config", status=400)
        out[key] = value.strip()
    return out


def read_if_there(path: str) -> bytes | None:
    """The file's bytes, or None where there is none (never creates anything)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise GridnodeError(f"{path}: cannot be read ({e.strerror}); fix its permissions or remove it",
                            code="bad_config", status=400) from None


def find_where(cli: Mapping[str, Any], environ: Mapping[str, str],
               read: Callable[[str], bytes | None] = read_if_there) -> Where:
    """Where the pool is: ``cli`` holds the command line's values (None where not given, ``node``
    a list), ``environ`` the environment."""
    path = config_path(environ)
    text = read(path)
    config = parse_config(text, path) if text is not None else {}

    def setting(key: str) -> tuple[str | None, str]:
        value = cli.get(key.replace("-", "_"))
        if value:
            return str(value), f"--{key}"
        if environ.get(KEYS[key]):
            return environ[KEYS[key]], KEYS[key]
        if config.get(key):
            return config[key], path
        return DEFAULTS.get(key), "the default"

    common: dict[str, Any] = {
        "env": setting("env")[0], "pool": setting("pool")[0], "s3_endpoint": setting("s3-endpoint")[0],
        "s3_region": setting("s3-region")[0], "config_path": path, "settings": config,
    }
    if cli.get("node"):
        return Where("nodes", nodes=tuple(u.rstrip("/") for u in cli["node"]), origin="--node", **common)
    store, store_from = setting("store")
    registry, registry_from = setting("registry-url")
    rank = {"--store": 0, "--registry-url": 0, "GRIDNODE_STORE": 1, "GRIDNODE_REGISTRY_URL": 1, path: 2}
    if registry and (not store or rank.get(registry_from, 3) < rank.get(store_from, 3)):
        return Where("registry", registry_url=registry, origin=registry_from, **common)
    return Where("store", store=store or DEFAULT_STORE, origin=store_from, **common)
