"""ffmpeg and ffprobe children: limits, and an unprivileged user when the node is root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted

from gridnode.media.sandbox import ChildLimits, let_read, resolve_user, sandboxed_argv, share_with, take_back
from tests.helpers import free_port
from tests.media_samples import Clips
from tests.nodes import NodeProcess, request, run_twistd, upload, wait_job


class ResolveUserTests:
    def test_unknown_user(self) -> None:
        """An unknown --ffmpeg-user is a configuration error."""
        from gridnode.errors import ConfigError

        with pytest.raises(ConfigError):
            resolve_user("no-such-user-here")
        assert resolve_user("none") is None


@pytest.mark.integration  # real children: the kernel applies the limits, the uid and the group
class WrapperTests:
    def test_limits_apply_in_the_child(self) -> None:
        """The wrapper sets the limits, a process group and the niceness before exec, and the pid
        is the one that was spawned (nothing on the way forks)."""
        code = ("import os, resource; print(resource.getrlimit(resource.RLIMIT_FSIZE), "
                "resource.getrlimit(resource.RLIMIT_NOFILE), resource.getrlimit(resource.RLIMIT_CPU), "
                "os.getpgid(0) == os.getpid(), os.nice(0), os.getpid())")
        argv = sandboxed_argv([sys.executable, "-c", code],
                              ChildLimits(file_size=12345, open_files=50, cpu_seconds=77, niceness=7))
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = child.communicate(timeout=30)
        assert out.split() == ["(12345,", "12345)", "(50,", "50)", "(77,", "77)", "True", "7", str(child.pid)], err

    def test_the_child_stays_in_the_nodes_session(self) -> None:
        """A group of its own, not a session: under autogroup scheduling a session of its own
        would make its nice level count for nothing against the node."""
        code = "import os; print(os.getsid(0))"
        out = subprocess.run(sandboxed_argv([sys.executable, "-c", code], ChildLimits()), capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.split() == [str(os.getsid(0))], out.stderr

    def test_file_size_limit_stops_writes(self, tmp_path: Path) -> None:
        """A child over its file-size limit cannot grow a file past it."""
        code = f"open({str(tmp_path / 'big')!r}, 'wb').write(b'x' * 100000)"
        argv = sandboxed_argv([sys.executable, "-c", code], ChildLimits(file_size=1000))
        subprocess.run(argv, capture_output=True, timeout=30)
        assert (tmp_path / "big").stat().st_size <= 1000

    def test_missing_binary_exits_127(self) -> None:
        """A binary that is not there: exit status 127 and a line that names it."""
        out = subprocess.run(sandboxed_argv(["/nonexistent/ffmpeg"], ChildLimits()),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 127
        assert "/nonexistent/ffmpeg" in out.stderr and "No such file or directory" in out.stderr

    @pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
    def test_runs_as_nobody(self) -> None:
        """auto means nobody when root: the child's uid, gid and groups are nobody's alone."""
        user = resolve_user("auto")
        assert user is not None
        argv = sandboxed_argv(["sh", "-c", "id -u; id -g; id -G"], ChildLimits(user=user))
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        uid, gid = user.split(":")
        assert out.stdout.split() == [uid, gid, gid] and uid != "0", out.stderr

    @pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
    def test_an_input_is_readable_not_writable(self, open_folder: Path) -> None:
        """A child may read the input it was given, not change it (nor another job's)."""
        user = resolve_user("auto")
        assert user is not None
        source = open_folder / "source"
        source.write_bytes(b"upload\n")
        source.chmod(0o600)
        let_read(user, str(source))
        argv = sandboxed_argv(["sh", "-c", f"cat {source}; echo x >> {source} || echo refused"],
                              ChildLimits(user=user))
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["upload", "refused"], out.stderr
        assert source.read_bytes() == b"upload\n" and source.stat().st_uid == os.geteuid()


def root_node(folder: Path, node_id: str, *extra: str) -> NodeProcess:
    """A node on loopback that runs its children as nobody (the node being root)."""
    return NodeProcess(folder, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                "--ffmpeg-user", "auto", "--node-id", node_id, *extra])


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
class RootNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_root_node_converts_as_nobody(self, open_folder: Path, media_clips: Clips) -> None:
        """A node run as root converts with ffmpeg running as nobody."""
        node = root_node(open_folder, "rootnode")
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

    def test_take_back_freezes_what_the_child_wrote(self, tmp_path: Path) -> None:
        """After the child, every folder it had is the node's again (0700), so it can no longer
        swap what the node reads; a link it planted is neither followed nor its target changed."""
        nobody = resolve_user("auto")
        assert nobody is not None
        uid = int(nobody.split(":")[0])
        scratch = tmp_path / "scratch"
        (scratch / "out" / "hls").mkdir(parents=True)
        outside = tmp_path / "outside"
        outside.mkdir()
        for folder in (scratch, scratch / "out", scratch / "out" / "hls", outside):
            share_with(nobody, str(folder))
        (scratch / "out" / "hls").chmod(0o777)  # as a child could leave it
        (scratch / "out" / "escape").symlink_to(outside)
        (scratch / "out" / "video.mp4").write_bytes(b"v")
        share_with(nobody, str(scratch / "out" / "video.mp4"))
        take_back(nobody, str(scratch))
        for folder in (scratch, scratch / "out", scratch / "out" / "hls"):
            st = folder.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700), folder
        assert outside.stat().st_uid == uid and (scratch / "out" / "escape").is_symlink()
        assert (scratch / "out" / "video.mp4").stat().st_uid == uid  # files stay as they are

    @pytest_twisted.inlineCallbacks
    def test_a_planted_link_is_not_an_output(self, open_folder: Path, media_clips: Clips) -> None:
        """An ffmpeg that leaves a symbolic link to a file only root may read, in place of its
        output, fails its job (ffmpeg_failed); the file is neither stored nor served."""
        secret = open_folder / "secret"
        secret.write_bytes(b"gridnode-test-secret-0123456789")
        secret.chmod(0o600)
        fake = open_folder / "fake-ffmpeg"
        fake.write_text(f"#!/bin/sh\nfor last; do :; done\nln -s {secret} \"$last\"\n")
        fake.chmod(0o755)
        node = root_node(open_folder, "planted", "--ffmpeg", str(fake))
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, job = upload(base, media_clips.landscape, "mp4-480p")
            assert status == 201, job
            job = yield wait_job(base, job["id"])
            assert job["state"] == "failed", job
            assert job["error"]["code"] == "ffmpeg_failed" and "plain file" in job["error"]["message"]
            stored = [p for p in open_folder.rglob("*") if p.is_file() and not p.is_symlink()]
            assert not [p for p in stored if p != secret and secret.read_bytes() in p.read_bytes()]
        finally:
            node.stop()

    def test_unreachable_work_folder(self, tmp_path: Path) -> None:
        """As root in a folder nobody may enter, the node says what to do and exits non-zero."""
        out = run_twistd(tmp_path, "--ffmpeg-user", "auto", "--http", f"tcp:{free_port()}:interface=127.0.0.1")
        assert out.returncode != 0
        assert "cannot reach" in out.stderr and "--ffmpeg-user none" in out.stderr


@pytest.mark.integration  # runs bench/sandbox.py as a process
def test_sandbox_benchmark_prints_its_three_sides() -> None:
    """bench/sandbox.py runs (a tiny run: the figure itself is for the README, not asserted)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "sandbox.py"), "--children", "2", "--rounds", "1",
                          "--json"], capture_output=True, text=True, timeout=60, cwd=root)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["figure"] == "sandbox"
    assert min(result["bare_ms"], result["chain_ms"], result["wrapper_ms"]) > 0
