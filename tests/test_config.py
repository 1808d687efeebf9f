"""What NodeConfig accepts, in which order the layers win, and how it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from gridnode.config import build_config, load_config_file
from gridnode.endpoints import HTTP_BACKLOG, default_node_id, endpoint_port, with_backlog
from gridnode.errors import ConfigError


class LayeringTests:
    def test_defaults(self) -> None:
        """With nothing given, the embedded default: file store, loopback ports."""
        c = build_config()
        assert c.store == "file:gridnode-data"
        assert c.http == "tcp:8080:interface=127.0.0.1"
        assert c.peer == "tcp:8081:interface=127.0.0.1"
        assert (c.env, c.pool) == ("dev", "default")
        assert c.workers >= 1
        assert c.instance_metadata is None

    def test_order(self) -> None:
        """defaults < config file < user-data < command line, key by key."""
        c = build_config(
            file={"env": "staging", "pool": "a", "queue": 5, "workers": 3},
            user_data={"pool": "b", "queue": 6},
            cli={"queue": "7"},
        )
        assert (c.env, c.pool, c.queue, c.workers) == ("staging", "b", 7, 3)

    def test_underscores_accepted(self) -> None:
        """max_upload and max-upload are the same key."""
        assert build_config(file={"max_upload": 10}).max_upload == 10
        assert build_config(user_data={"max-upload": 11}).max_upload == 11

    def test_max_output(self) -> None:
        """--max-output in MB, fractions allowed; unset: the per-input default (None)."""
        assert build_config().max_output_bytes is None
        assert build_config(cli={"max-output": "0.5"}).max_output_bytes == 512 * 1024
        assert build_config(file={"max-output": 300}).max_output_bytes == 300 * 1024 * 1024

    def test_chunking(self) -> None:
        """--chunk-over in seconds (0: every job), or off; --chunk-seconds a number of seconds."""
        c = build_config()
        assert (c.chunk_over, c.chunk_seconds) == (300.0, 60.0)
        assert build_config(cli={"chunk-over": "off"}).chunk_over is None
        assert build_config(file={"chunk-over": "OFF"}).chunk_over is None
        assert build_config(cli={"chunk-over": "0"}).chunk_over == 0
        assert build_config(file={"chunk-over": 90, "chunk-seconds": 2.5}).chunk_seconds == 2.5

    def test_instance_metadata_default_url(self) -> None:
        """--instance-metadata with no URL means the EC2 link-local service."""
        assert build_config(cli={"instance-metadata": ""}).instance_metadata == "http://169.254.169.254"
        assert build_config(file={"instance-metadata": True}).instance_metadata == "http://169.254.169.254"
        assert build_config(cli={"instance-metadata": "http://127.0.0.1:9/"}).instance_metadata == (
            "http://127.0.0.1:9"
        )

    def test_cors_origins(self) -> None:
        """Origins come as a comma-separated string or a list."""
        assert build_config(cli={"cors-origins": "https://a, https://b"}).cors_origins == (
            "https://a", "https://b")
        assert build_config(file={"cors-origins": ["https://c"]}).cors_origins == ("https://c",)

    def test_identity(self) -> None:
        """node-id: explicit, else the instance id, else HOSTNAME-PORT."""
        c = build_config()
        assert c.with_identity("i-0abc").node_id == "i-0abc"
        assert build_config(cli={"node-id": "n1"}).with_identity("i-0abc").node_id == "n1"
        assert c.with_identity().node_id == default_node_id(c.http)
        assert default_node_id("tcp:9000:interface=127.0.0.1").endswith("-9000")
        assert c.with_identity(address="10.0.0.5").advertise == "10.0.0.5"

    def test_endpoint_port(self) -> None:
        """The HTTP port is read from endpoint strings in both spellings."""
        assert endpoint_port("tcp:8080:interface=127.0.0.1") == 8080
        assert endpoint_port("tcp:port=81") == 81
        assert endpoint_port("unix:/tmp/x") is None
        assert endpoint_port("tcp:\u00b2") is None and endpoint_port("tcp:port=\u0663") is None

    def test_http_backlog(self) -> None:
        """TCP endpoints get a deep accept queue unless they set one; others are left alone."""
        assert with_backlog("tcp:8080:interface=127.0.0.1") == f"tcp:8080:interface=127.0.0.1:backlog={HTTP_BACKLOG}"
        assert with_backlog("tcp:8080:backlog=10") == "tcp:8080:backlog=10"
        assert with_backlog("tcp6:8080:interface=\\:\\:1").endswith(f":backlog={HTTP_BACKLOG}")
        assert with_backlog("unix:/tmp/x") == "unix:/tmp/x"


class RefusalTests:
    @pytest.mark.parametrize(
        ("layer", "values", "needle"),
        [
            ("cli", {"store": "ftp://x"}, "unknown scheme"),
            ("cli", {"workers": "many"}, "workers = 'many' must be a whole number"),
            ("cli", {"workers": "0"}, "between 1 and 256"),
            ("file", {"colour": "red"}, "unknown key 'colour'"),
            ("file", {"env": "prod/../x"}, "env = "),
            ("file", {"queue": 1.5}, "whole number"),
            ("user_data", {"pool": ""}, "user-data: pool"),
            ("user_data", {"instance-metadata": "http://x"}, "cannot be set from user-data"),
            ("cli", {"http": "8080"}, "endpoint string"),
            ("cli", {"s3-endpoint": "localhost:9000"}, "http:// or https://"),
            ("cli", {"heartbeat": "-1"}, "more than 0"),
            ("cli", {"max-output": "0"}, "more than 0"),
            ("file", {"max-output": "lots"}, "must be a number"),
            ("cli", {"max-output": "inf"}, "at most 1048576"),
            ("cli", {"store": "s3://"}, "needs a bucket"),
            ("cli", {"http": "tcp:notaport"}, "command line: http = 'tcp:notaport' is not a Twisted endpoint"),
            ("cli", {"peer": "tcp:7000:bogus=1"}, "peer = 'tcp:7000:bogus=1' is not a Twisted endpoint"),
            ("cli", {"http": "nope:1"}, "Unknown endpoint type"),
            ("cli", {"http": "tcp:70000"}, "ports go up to 65535"),
            ("cli", {"chunk-over": "never"}, "chunk-over = 'never' must be 'off' or a number of seconds"),
            ("cli", {"chunk-over": "-1"}, "between 0 and 604800"),
            ("cli", {"chunk-over": "nan"}, "must be 'off' or a number"),
            ("file", {"chunk-over": True}, "must be 'off' or a number"),
            ("file", {"chunk-over": [300]}, "must be 'off' or a number"),
            ("cli", {"chunk-seconds": "0.5"}, "a chunk is at least a second"),
            ("cli", {"chunk-seconds": "inf"}, "chunk-seconds = 'inf' must be a number of seconds"),
            ("cli", {"chunk-seconds": "off"}, "must be a number of seconds"),
        ],
    )
    def test_bad_values(self, layer: str, values: dict[str, object], needle: str) -> None:
        """Each bad key or value is refused with a message that names it."""
        with pytest.raises(ConfigError) as e:
            build_config(**{layer: values})  # type: ignore[arg-type]
        assert needle in e.value.message
        assert "\n" not in e.value.message

    def test_config_file(self, tmp_path: Path) -> None:
        """A TOML file is read at the top level or from its [gridnode] table."""
        f = tmp_path / "a.toml"
        f.write_text('env = "staging"\npool = "east"\n')
        assert load_config_file(str(f)) == {"env": "staging", "pool": "east"}
        f.write_text('[gridnode]\nmax_upload = 9\n')
        assert load_config_file(str(f)) == {"max-upload": 9}

    def test_a_bad_value_names_the_file_and_key(self, tmp_path: Path) -> None:
        """``workers = 'two'`` in a config file: the message names the file, the key and the value."""
        f = tmp_path / "node.toml"
        f.write_text("workers = 'two'\n")
        with pytest.raises(ConfigError) as e:
            build_config(file=load_config_file(str(f)), file_path=str(f))
        assert e.value.message.startswith(f"config file {f}: workers = 'two' must be a whole number")

    def test_a_bad_endpoint_is_named_before_the_token_rule(self) -> None:
        """A bad --http is about the endpoint, not about upload tokens."""
        with pytest.raises(ConfigError) as e:
            build_config(cli={"http": "tcp:notaport"})
        assert "http = 'tcp:notaport'" in e.value.message and "token" not in e.value.message

    def test_config_file_errors(self, tmp_path: Path) -> None:
        """Unreadable files, bad TOML and unknown keys name the file."""
        with pytest.raises(ConfigError, match="cannot read"):
            load_config_file(str(tmp_path / "missing.toml"))
        bad = tmp_path / "bad.toml"
        bad.write_text("env = \n")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config_file(str(bad))
        bad.write_text('colour = "red"\n')
        with pytest.raises(ConfigError, match="unknown key 'colour'"):
            load_config_file(str(bad))
