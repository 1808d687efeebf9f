"""What `Options` parses and what `makeService` assembles (no reactor runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock

from gridnode.node import NodeService
from gridnode.tap import Options, makeService


class OptionsTests:
    def test_every_setting_is_an_option(self) -> None:
        """Each config key of the contract has a long option."""
        names = {p[0] for p in Options.optParameters}
        for key in ["config", "store", "s3-endpoint", "s3-region", "env", "pool", "http", "peer",
                    "advertise", "node-id", "workers", "queue", "max-upload", "secret-file",
                    "instance-metadata", "ffmpeg", "ffprobe"]:
            assert key in names

    def test_parse(self) -> None:
        """Given options land in the config; the rest keep their defaults."""
        o = Options()
        o.parseOptions(["--env", "production", "--workers", "3", "--store", "s3://b/p"])
        assert o.node_config is not None
        assert (o.node_config.env, o.node_config.workers, o.node_config.store) == ("production", 3, "s3://b/p")
        assert o.node_config.pool == "default"

    def test_instance_metadata_optional_url(self) -> None:
        """--instance-metadata works with and without a URL."""
        o = Options()
        o.parseOptions(["--instance-metadata", "--env", "x"])
        assert o.node_config is not None and o.node_config.instance_metadata == "http://169.254.169.254"
        o = Options()
        o.parseOptions(["--instance-metadata", "http://127.0.0.1:1234"])
        assert o.node_config is not None and o.node_config.instance_metadata == "http://127.0.0.1:1234"

    def test_config_file_then_cli(self, tmp_path: Path) -> None:
        """The command line wins over the config file."""
        f = tmp_path / "node.toml"
        f.write_text('env = "staging"\npool = "east"\n')
        o = Options()
        o.parseOptions(["--config", str(f), "--env", "production"])
        assert o.node_config is not None
        assert (o.node_config.env, o.node_config.pool) == ("production", "east")

    def test_bad_value_is_one_line_exit(self) -> None:
        """A bad value exits with one line naming it, not twistd's whole usage."""
        with pytest.raises(SystemExit) as e:
            Options().parseOptions(["--store", "ftp://x"])
        assert str(e.value).startswith("twistd gridnode: command line: store:")
        assert "\n" not in str(e.value)


class MakeServiceTests:
    def test_assembles_node_service(self) -> None:
        """makeService returns a MultiService holding the node, not yet started."""
        o = Options()
        o.parseOptions(["--node-id", "n1"])
        top = makeService(o, MemoryReactorClock())
        assert IServiceCollection.providedBy(top)
        node = top.getServiceNamed("node")  # type: ignore[attr-defined]
        assert isinstance(node, NodeService)
        assert node.config.node_id == "n1"
        assert not node.running
