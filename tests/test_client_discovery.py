"""Where the client looks for its pool: command line, environment, config file, default; pure."""

from __future__ import annotations

from typing import Any

import pytest

from gridnode.client.discovery import DEFAULT_STORE, config_path, find_where, parse_config
from gridnode.errors import GridnodeError

HOME = {"HOME": "/home/ann"}
CONFIG = "/home/ann/.config/gridnode/client.toml"


def files(**by_path: str) -> Any:
    """A reader over a dict of files; every path read is recorded."""
    read: list[str] = []

    def reader(path: str) -> bytes | None:
        read.append(path)
        text = by_path.get(path)
        return None if text is None else text.encode()

    reader.read = read  # type: ignore[attr-defined]
    return reader


def cli(**values: Any) -> dict[str, Any]:
    return {"store": None, "registry_url": None, "env": None, "pool": None, "s3_endpoint": None,
            "s3_region": None, "node": [], **values}


class OrderTests:
    def test_default_is_the_embedded_store_here(self) -> None:
        """Nothing anywhere: file:gridnode-data, env dev, pool default, and the hint lists where it looked."""
        where = find_where(cli(), HOME, files())
        assert (where.kind, where.store, where.env, where.pool, where.origin) == (
            "store", DEFAULT_STORE, "dev", "default", "the default")
        hint = where.no_nodes_hint()
        assert "GRIDNODE_STORE" in hint and CONFIG in hint and "gridnode pool" in hint

    def test_config_file_beats_the_default(self) -> None:
        """A client.toml's store, env and pool are used when neither option nor environment says."""
        where = find_where(cli(), HOME, files(**{CONFIG: 'store = "file:/p/store"\nenv = "qa"\n'}))
        assert (where.store, where.env, where.pool, where.origin) == ("file:/p/store", "qa", "default", CONFIG)

    def test_environment_beats_the_config_file(self) -> None:
        """GRIDNODE_STORE wins over the file; GRIDNODE_POOL too, each key on its own."""
        env = {**HOME, "GRIDNODE_STORE": "file:/e", "GRIDNODE_POOL": "east"}
        where = find_where(cli(), env, files(**{CONFIG: 'store = "file:/p"\nenv = "qa"\n'}))
        assert (where.store, where.env, where.pool, where.origin) == ("file:/e", "qa", "east", "GRIDNODE_STORE")

    def test_command_line_beats_everything(self) -> None:
        """--store over the environment and the file."""
        env = {**HOME, "GRIDNODE_STORE": "file:/e"}
        where = find_where(cli(store="s3://b/p"), env, files(**{CONFIG: 'store = "file:/p"\n'}))
        assert (where.store, where.origin) == ("s3://b/p", "--store")

    def test_registry_url_from_the_environment_beats_a_config_store(self) -> None:
        """GRIDNODE_REGISTRY_URL (environment) outranks the config file's store."""
        env = {**HOME, "GRIDNODE_REGISTRY_URL": "https://x/nodes.json"}
        where = find_where(cli(), env, files(**{CONFIG: 'store = "file:/p"\n'}))
        assert (where.kind, where.registry_url) == ("registry", "https://x/nodes.json")

    def test_store_option_beats_a_registry_from_the_environment(self) -> None:
        env = {**HOME, "GRIDNODE_REGISTRY_URL": "https://x/nodes.json"}
        assert find_where(cli(store="file:/s"), env, files()).kind == "store"

    def test_named_nodes(self) -> None:
        """--node URLs are used as given, trailing slash dropped."""
        where = find_where(cli(node=["http://a:1/", "http://b:2"]), HOME, files())
        assert (where.kind, where.nodes) == ("nodes", ("http://a:1", "http://b:2"))

    def test_xdg_config_home(self) -> None:
        """XDG_CONFIG_HOME moves the config file."""
        assert config_path({"XDG_CONFIG_HOME": "/x", **HOME}) == "/x/gridnode/client.toml"
        reader = files()
        find_where(cli(), {"XDG_CONFIG_HOME": "/x", **HOME}, reader)
        assert reader.read == ["/x/gridnode/client.toml"]


class ConfigFileTests:
    def test_table_and_underscores(self) -> None:
        """A [gridnode] table and registry_url spelled with an underscore are read."""
        assert parse_config(b'[gridnode]\nregistry_url = "https://x"\n', "f") == {"registry-url": "https://x"}

    @pytest.mark.parametrize("text", [b"store = ", b'stor = "file:x"', b"store = 3", b'store = ""', b"\xff",
                                      b"a" * 70000])
    def test_bad_files_name_the_file(self, text: bytes) -> None:
        """Not TOML, an unknown key, a non-string, an empty value, not UTF-8, too big: bad_config naming it."""
        with pytest.raises(GridnodeError) as e:
            parse_config(text, "/cfg/client.toml")
        assert e.value.code == "bad_config" and "/cfg/client.toml" in e.value.message


class ReadOnlyStoreTests:
    def test_looking_creates_nothing(self, tmp_path: Any) -> None:
        """The client reads a file: store read-only: a missing folder stays missing, a file put by
        hand gets no ETag written, and no .gridnode/ appears."""
        from gridnode.client.nodes import nodes_from_store
        from gridnode.store import open_backend

        missing = tmp_path / "gridnode-data"
        assert nodes_from_store(open_backend(f"file:{missing}", read_only=True), "dev", "default") == []
        assert not missing.exists()
        there = tmp_path / "by-hand"
        (there / "registry").mkdir(parents=True)
        (there / "registry" / "x").write_bytes(b"hello")
        backend = open_backend(f"file:{there}", read_only=True)
        assert backend.get_bytes("registry/x")[0] == b"hello"
        assert sorted(p.name for p in there.iterdir()) == ["registry"]
