"""ffmpeg and ffprobe children: limits, and an unprivileged user when the node is root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from gridnode.media.sandbox import ChildLimits, resolve_user, sandboxed_argv
from tests.media_samples import Clips
from tests.nodes import NodeProcess, free_port, request, run_twistd, upload, wait_job


class WrapperTests:
    def test_limits_apply_in_the_child(self) -> None:
        """The wrapper sets the limits, a process group and the niceness before exec."""
        code = ("import os, resource; print(resource.getrlimit(resource.RLIMIT_FSIZE)[0], "
                "resource.getrlimit(resource.RLIMIT_NOFILE)[0], os.getpgid(0) == os.getpid(), os.nice(0))")
        argv = sandboxed_argv([sys.executable, "-c", code], ChildLimits(file_size=12345, open_files=50, niceness=7))
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["12345", "50", "True", "7"], out.stderr

    def test_file_size_limit_stops_writes(self, tmp_path: Path) -> None:
        """A child over its file-size limit cannot grow a file past it."""
        code = f"open({str(tmp_path / 'big')!r}, 'wb').write(b'x' * 100000)"
        argv = sandboxed_argv([sys.executable, "-c", code], ChildLimits(file_size=1000))
        subprocess.run(argv, capture_output=True, timeout=30)
        assert (tmp_path / "big").stat().st_size <= 1000

    @pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
    def test_runs_as_nobody(self) -> None:
        """auto means nobody when root: the child's uid is nobody's."""
        user = resolve_user("auto")
        assert user is not None
        argv = sandboxed_argv(["id", "-u"], ChildLimits(user=user))
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == user.split(":")[0] != "0"

    def test_unknown_user(self) -> None:
        """An unknown --ffmpeg-user is a configuration error."""
        from gridnode.errors import ConfigError

        with pytest.raises(ConfigError):
            resolve_user("no-such-user-here")
        assert resolve_user("none") is None



@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
class RootNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_root_node_converts_as_nobody(self, open_folder: Path, media_clips: Clips) -> None:
        """A node run as root converts with ffmpeg running as nobody."""
        node = NodeProcess(open_folder, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                         f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                         "--ffmpeg-user", "auto", "--node-id", "rootnode"])
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, media_clips.landscape, "mp4-480p")
            assert status == 201, job
            job = yield wait_job(base, job["id"], {"transcoding"}, timeout=60)
            out = subprocess.run(["ps", "-ww", "-eo", "user:20,args"], capture_output=True, text=True).stdout
            users = {line.split()[0] for line in out.splitlines() if "ffmpeg" in line and job["id"] in line}
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
            assert users <= {"nobody"}
            status, _, data = request("GET", base + job["outputs"][0]["url"])
            assert status == 200 and len(data) == job["outputs"][0]["size"]
        finally:
            node.stop()

    def test_unreachable_work_folder(self, tmp_path: Path) -> None:
        """As root in a folder nobody may enter, the node says what to do and exits non-zero."""
        out = run_twistd(tmp_path, "--ffmpeg-user", "auto", "--http", f"tcp:{free_port()}:interface=127.0.0.1")
        assert out.returncode != 0
        assert "cannot reach" in out.stderr and "--ffmpeg-user none" in out.stderr
