"""
``twistd gridnode`` as a user runs it: the installed plugin, its help, its
refusals and a node answering /health. These start real processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import pytest_twisted

from tests.helpers import free_port, sleep
from tests.nodes import NodeProcess, get_json, run_twistd, twistd

pytestmark = pytest.mark.integration


class PluginTests:
    def test_twistd_lists_gridnode(self, tmp_path: Path) -> None:
        """The installed package's plugin is found by twistd from any folder."""
        out = subprocess.run([twistd(), "--help"], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0
        assert "gridnode" in out.stdout

    def test_help_documents_the_options(self, tmp_path: Path) -> None:
        """``twistd gridnode --help`` shows every option of the contract."""
        out = subprocess.run([twistd(), "gridnode", "--help"], cwd=tmp_path, capture_output=True, text=True)
        for option in ["--store", "--s3-endpoint", "--s3-region", "--env", "--pool", "--http", "--peer",
                       "--advertise", "--node-id", "--workers", "--queue", "--max-upload",
                       "--secret-file", "--instance-metadata", "--ffmpeg", "--ffprobe", "--config"]:
            assert option + "=" in out.stdout, option

    def test_plugin_imports_nothing_heavy(self, tmp_path: Path) -> None:
        """Loading the plugin and the Options imports neither the reactor, treq nor boto3."""
        code = (
            "import sys\n"
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "[p.options for p in getPlugins(IServiceMaker) if p.tapname == 'gridnode'][0]()\n"
            "bad = [m for m in ('twisted.internet.reactor', 'treq', 'boto3') if m in sys.modules]\n"
            "print(bad)\n"
        )
        out = subprocess.run([twistd().replace("twistd", "python"), "-c", code], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.stdout.strip() == "[]", out.stderr


class RefusalTests:
    def test_unknown_store_scheme(self, tmp_path: Path) -> None:
        """--store ftp://x: non-zero exit, one line, no traceback."""
        out = run_twistd(tmp_path, "--store", "ftp://x")
        assert out.returncode != 0
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert "store" in lines[0] and "ftp" in lines[0]
        assert "Traceback" not in out.stderr

    def test_config_errors_name_the_key(self, tmp_path: Path) -> None:
        """A bad --http names the endpoint, a --store folder that cannot be made names store, a bad
        value in a config file names the file: one line each, exit 1, no traceback."""
        (tmp_path / "node.toml").write_text("workers = 'two'\n")
        cases = [(["--http", "tcp:notaport"], "http = 'tcp:notaport' is not a Twisted endpoint"),
                 (["--store", "file:/proc/nope/data", "--http", "tcp:0:interface=127.0.0.1"],
                  "store: cannot open file:/proc/nope/data"),
                 (["--config", "node.toml"], "config file node.toml: workers = 'two' must be a whole number")]
        for args, needle in cases:
            out = run_twistd(tmp_path, *args)
            lines = [line for line in out.stderr.splitlines() if line.strip()]  # the log is on stdout
            assert out.returncode == 1 and len(lines) == 1 and needle in lines[0], (args, lines)
            assert "Traceback" not in out.stderr and "token" not in lines[0]

    def test_unknown_config_key(self, tmp_path: Path) -> None:
        """A config file with an unknown key: non-zero exit, one line naming the key."""
        (tmp_path / "node.toml").write_text('env = "staging"\ncolour = "red"\n')
        out = run_twistd(tmp_path, "--config", "node.toml")
        assert out.returncode != 0
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and "colour" in lines[0], lines

    def test_port_in_use(self, tmp_path: Path) -> None:
        """An HTTP port already taken: non-zero exit with a line that says so."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            out = run_twistd(tmp_path, "--http", f"tcp:{port}:interface=127.0.0.1", "--node-id", "x",
                             "--ffmpeg-user", "none")
        assert out.returncode != 0
        assert "twistd gridnode:" in out.stderr and "Traceback" not in out.stderr


class HealthTests:
    @pytest_twisted.inlineCallbacks
    def test_health_and_clean_stop(self, tmp_path: Path) -> None:
        """A node on the embedded default answers /health and exits 0 on SIGTERM."""
        port = free_port()
        node = NodeProcess(tmp_path, ["--http", f"tcp:{port}:interface=127.0.0.1", "--env", "staging"])
        node.start()
        try:
            url = yield node.wait_ready()
            status, health = get_json(url + "/health")
            assert status == 200
            assert health["env"] == "staging" and health["pool"] == "default"
            assert health["state"] == "ok" and health["version"]
            assert health["node"].endswith(f"-{port}")
            status, err = get_json(url + "/no/such/thing")
            assert status == 404 and err["error"]["code"] == "not_found"
            assert (tmp_path / "gridnode-data").is_dir()
        finally:
            assert node.stop() == 0

    @pytest_twisted.inlineCallbacks
    def test_json_log_lines(self, tmp_path: Path) -> None:
        """``--logger gridnode.logs.json_observer`` writes one JSON object per line with named fields."""
        port = free_port()
        node = NodeProcess(tmp_path, ["--http", f"tcp:{port}:interface=127.0.0.1", "--node-id", "jsonnode"],
                           json_log=True)
        node.start()
        try:
            yield node.wait_ready()
            records = [json.loads(line) for line in node.text().splitlines() if line.startswith("{")]
            ready = [r for r in records if "serving HTTP" in r["message"]]
            assert ready and ready[0]["node"] == "jsonnode" and ready[0]["level"] == "info"
        finally:
            assert node.stop() == 0


class LayeringTests:
    @pytest_twisted.inlineCallbacks
    def test_file_then_user_data_then_command_line(self, tmp_path: Path) -> None:
        """Config file sets env+pool, user-data overrides pool, the command line overrides env;
        the node id is the instance-id from IMDSv2."""
        from tests.imds_standin import start_imds

        url, standin, port = start_imds(user_data='[gridnode]\npool = "from-user-data"\n',
                                        instance_id="i-0feedc0ffee123456")
        (tmp_path / "node.toml").write_text('env = "staging"\npool = "from-file"\n')
        node = NodeProcess(tmp_path, ["--config", "node.toml", "--env", "production",
                                      "--instance-metadata", url, "--http", f"tcp:{free_port()}:interface=127.0.0.1"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, health = get_json(base + "/health")
            assert status == 200
            assert (health["env"], health["pool"], health["node"]) == (
                "production", "from-user-data", "i-0feedc0ffee123456")
            assert standin.requests()[:2] == ["PUT /latest/api/token", "GET /latest/meta-data/instance-id"]
        finally:
            assert node.stop() == 0
            standin.close()
            yield port.stopListening()

    @pytest_twisted.inlineCallbacks
    def test_metadata_unreachable(self, tmp_path: Path) -> None:
        """No metadata service: the node exits non-zero with one line naming the URL."""
        dead = f"http://127.0.0.1:{free_port()}"
        node = NodeProcess(tmp_path, ["--instance-metadata", dead, "--http", f"tcp:{free_port()}:interface=127.0.0.1"])
        node.start()
        assert node.process is not None
        for _ in range(300):
            if node.process.poll() is not None:
                break
            yield sleep(0.1)
        assert node.process.returncode == 1
        assert "instance_metadata_unavailable" in node.text() or dead in node.text()
