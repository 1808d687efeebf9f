"""ffmpeg and ffprobe children: the chain that starts them (perl, bwrap, prlimit), the box, the
mode the node settles at start, the node's own folders, and an attacker in a box."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.errors import ConfigError
from gridnode.media.sandbox import (
    Box,
    ChildLimits,
    Host,
    Sandbox,
    Tools,
    announce,
    check_reachable,
    child_env,
    choose,
    find_host,
    let_read,
    private_folder,
    resolve_user,
    sandboxed_argv,
    share_with,
    system_view,
    take_back,
)
from tests.helpers import free_port, sleep
from tests.media_samples import Clips
from tests.nodes import NodeProcess, boxes_here, get_json, request, run_twistd, spool_emptied, upload, wait_job

TOOLS = Tools(perl="/p/perl", prlimit="/p/prlimit", bwrap="/p/bwrap")
VIEW = ["--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--proc", "/proc"]


def after(argv: list[str], option: str, count: int = 1) -> list[str]:
    """The ``count`` arguments after the first ``option``."""
    i = argv.index(option)
    return argv[i + 1:i + 1 + count]


def pairs(argv: list[str], option: str) -> list[tuple[str, str]]:
    return [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv) if a == option]


class ArgvTests:
    def test_weak_chain(self) -> None:
        """No box: perl (group, nice, user), then prlimit without a process limit (outside a box
        it would count every process of the user), then the binary by its real path."""
        limits = ChildLimits(cpu_seconds=77, file_size=5, open_files=50, niceness=7, user="65534:65534")
        argv = sandboxed_argv(["/usr/bin/ffprobe", "-v"], limits, found=TOOLS)
        assert argv[:2] == ["/p/perl", "-e"] and argv[3:5] == ["7", "65534:65534"]
        assert "/p/bwrap" not in argv
        assert argv[5:] == ["/p/prlimit", f"--as={8 * 1024**3}", "--cpu=77", "--fsize=5", "--nofile=50", "--",
                            os.path.realpath("/usr/bin/ffprobe"), "-v"]

    def test_box_chain(self) -> None:
        """A box: bwrap with every namespace, no way back to capabilities or a new user
        namespace, dying with its parent; the system view, the input read-only and the output
        folder writable at their own paths, the node's working folder, a read-only root; then
        prlimit with the process limit, then the binary."""
        box = Box(reads=("/w/spool/J",), writes=("/w/scratch/J/out",))
        limits = ChildLimits(processes=99, box=box)
        argv = sandboxed_argv(["/usr/bin/ffmpeg", "-i", "x"], limits, found=TOOLS, view=VIEW, cwd="/w")
        bwrap = argv.index("/p/bwrap")
        assert argv[bwrap + 1:bwrap + 8] == ["--unshare-all", "--unshare-user", "--disable-userns",
                                             "--die-with-parent", "--as-pid-1", "--cap-drop", "ALL"]
        assert argv[bwrap + 8:bwrap + 8 + len(VIEW)] == VIEW
        assert pairs(argv, "--ro-bind")[1:] == [("/w/spool/J", "/w/spool/J")]  # after /usr
        assert pairs(argv, "--bind") == [("/w/scratch/J/out", "/w/scratch/J/out")]
        end = argv.index("--", bwrap)
        assert argv[end - 6:end] == ["--dir", "/w", "--chdir", "/w", "--remount-ro", "/"]
        assert argv[end + 1] == "/p/prlimit" and "--nproc=99" in argv[end + 1:]
        assert argv[-3:] == [os.path.realpath("/usr/bin/ffmpeg"), "-i", "x"]
        assert "--share-net" not in argv and "--new-session" not in argv  # see sandbox.py on sessions

    def test_a_binary_outside_the_view_is_bound_alone(self, tmp_path: Path) -> None:
        """A binary the system view does not show (a static build, a test's script) is bound
        read-only by itself; one under /usr is not bound again."""
        script = tmp_path / "ffmpeg"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755)
        outside = sandboxed_argv([str(script)], ChildLimits(box=Box()), found=TOOLS, view=VIEW, cwd="/")
        assert (str(script), str(script)) in pairs(outside, "--ro-bind")
        inside = sandboxed_argv(["/usr/bin/env"], ChildLimits(box=Box()), found=TOOLS, view=VIEW, cwd="/")
        assert pairs(inside, "--ro-bind") == [("/usr", "/usr")]

    def test_system_view(self) -> None:
        """Merged /usr shows /bin as the same link; a real folder is bound read-only; what the
        host lacks is left out; /etc gives the loader's cache and alternatives; no tty."""
        view = system_view({"usr": None, "bin": "usr/bin", "lib64": "usr/lib64"})
        assert pairs(view, "--ro-bind") == [("/usr", "/usr")]
        assert pairs(view, "--symlink") == [("usr/bin", "/bin"), ("usr/lib64", "/lib64")]
        assert pairs(view, "--ro-bind-try") == [("/etc/ld.so.cache", "/etc/ld.so.cache"),
                                                ("/etc/alternatives", "/etc/alternatives")]
        devices = [src for src, _ in pairs(view, "--dev-bind-try")]
        assert "/dev/null" in devices and not any("tty" in d or "pts" in d for d in devices)
        assert "--dev" not in view and after(view, "--proc") == ["/proc"]

    def test_sandbox_limits(self) -> None:
        """A boxed sandbox gives a child's limits its user and a box of absolute paths; a weak one
        the user alone, and the process limit is then left out."""
        base = ChildLimits(cpu_seconds=1)
        boxed = Sandbox(boxed=True, user="1:2").limits(base, reads=["in"], writes=["out"])
        assert boxed.user == "1:2" and boxed.cpu_seconds == 1
        assert boxed.box == Box((os.path.abspath("in"),), (os.path.abspath("out"),))
        assert ("nproc", 256) in boxed.rlimits()
        weak = Sandbox(boxed=False, user="1:2").limits(base, reads=["in"])
        assert weak.box is None and weak.user == "1:2" and "nproc" not in dict(weak.rlimits())
        assert (Sandbox(boxed=True).mode, Sandbox(boxed=False).mode) == ("bwrap", "weak")

    def test_child_env_is_an_allowlist(self) -> None:
        """A child's environment: a PATH of its own, the locale and SVT-AV1's log level, never a
        credential or a variable its wrapper would obey."""
        env = child_env({"AWS_SECRET_ACCESS_KEY": "s", "AWS_ACCESS_KEY_ID": "k", "HOME": "/root",
                         "PATH": "/root/bin:/usr/bin", "PERL5OPT": "-Mx", "LD_PRELOAD": "/x.so",
                         "LC_ALL": "C", "LANG": "de_DE.UTF-8", "FFREPORT": "file=/tmp/r"})
        assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "de_DE.UTF-8", "LC_ALL": "C", "SVT_LOG": "1"}
        assert child_env({})["LANG"] == "C.UTF-8"


def completed(code: int, stderr: bytes = b"") -> Any:
    return lambda argv, **kw: subprocess.CompletedProcess(argv, code, b"", stderr)


class ModeTests:
    def test_choose(self) -> None:
        """bwrap where a trial box ran; weak only when asked for, whatever the host offers."""
        works = Host("/usr/bin/bwrap")
        assert choose("bwrap", works, "65534:65534") == Sandbox(boxed=True, user="65534:65534")
        assert choose("weak", works, None) == Sandbox(boxed=False, user=None)
        assert choose("weak", Host(None), None) == Sandbox(boxed=False)

    def test_no_box_is_a_refusal_saying_what_to_do(self) -> None:
        """Wanted a box and none can be made: the node does not start, and says how to get one
        or how to accept less; a missing perl or prlimit stops either mode."""
        with pytest.raises(ConfigError) as missing:
            choose("bwrap", Host(None), None)
        assert "apt-get install bubblewrap" in missing.value.message and "--sandbox weak" in missing.value.message
        with pytest.raises(ConfigError) as refused:
            choose("bwrap", Host("/usr/bin/bwrap", refused="bwrap: No permissions to create new namespace"),
                   "65534:65534")
        message = refused.value.message
        assert "No permissions" in message and "user 65534" in message and "--sandbox weak" in message
        for wanted in ("bwrap", "weak"):
            with pytest.raises(ConfigError, match="perl"):
                choose(wanted, Host("/usr/bin/bwrap", missing="perl"), None)

    def test_find_host_tries_the_box_the_children_get(self) -> None:
        """The trial is a box as the children's user, running the trial binary; its last
        words are kept when it fails; without ``trial`` nothing runs."""
        ran: list[list[str]] = []

        def run(argv: list[str], **kw: Any) -> Any:
            ran.append(argv)
            return completed(1, b"bwrap: setting up uid map: Permission denied\n")(argv)

        host = find_host("65534:65534", trial_binary="sh", run=run)
        assert host.refused == "bwrap: setting up uid map: Permission denied"
        argv = ran[0]
        assert argv[4] == "65534:65534" and "--unshare-all" in argv and argv[-1] == "-version"
        assert find_host(None, run=completed(0)).refused is None
        ran.clear()
        find_host(None, trial=False, run=run)
        assert ran == []

    def test_announce(self) -> None:
        """One line at start: the box, or WEAK in capitals."""
        assert announce(Sandbox(boxed=True, user="65534:65534")).startswith("sandbox: bwrap")
        assert "WITHOUT a box" in announce(Sandbox(boxed=False))


class ConverterStartTests:
    def config(self, tmp_path: Path, sandbox: str) -> Any:
        from gridnode.config import build_config

        return build_config(cli={"work-dir": str(tmp_path), "ffmpeg-user": "none", "sandbox": sandbox,
                                 "workers": 1}).with_identity("n1")

    def test_no_box_no_start(self, tmp_path: Path) -> None:
        """The converter settles the sandbox as it starts: where the trial box fails, the node
        does not start (ConfigError, one line)."""
        from twisted.internet.task import Clock

        from gridnode.converter import Converter

        asked: list[Any] = []

        def find(user: str | None, **kw: Any) -> Host:
            asked.append((user, kw["trial"]))
            return Host("/usr/bin/bwrap", refused="bwrap: Creating new namespace failed: Operation not permitted")

        converter = Converter(Clock(), self.config(tmp_path, "bwrap"), find=find)
        with pytest.raises(ConfigError, match="trial box failed .*Operation not permitted.*--sandbox weak"):
            converter.startService()
        assert asked == [(None, True)]

    def test_weak_on_purpose(self, tmp_path: Path) -> None:
        """--sandbox weak: no trial box, the children unboxed, and the spool and scratch folders the
        node's own all the same."""
        from twisted.internet.task import Clock

        from gridnode.converter import Converter

        converter = Converter(Clock(), self.config(tmp_path, "weak"), find=lambda user, **kw: Host(None))
        converter.startService()
        assert converter.sandbox == Sandbox(boxed=False, user=None)
        for sub in ("spool", "scratch"):
            assert stat.S_IMODE((tmp_path / sub).stat().st_mode) == 0o700


class FolderTests:
    def test_private_folder(self, tmp_path: Path) -> None:
        """0700 for the node alone; 0710 in the children's group when they run as another user
        (they may pass to what their box binds, not list); an existing folder is closed too."""
        mine = tmp_path / "spool"
        mine.mkdir(mode=0o755)
        private_folder(str(mine), None)
        assert stat.S_IMODE(mine.stat().st_mode) == 0o700
        group = tmp_path / "scratch"
        private_folder(str(group), f"{os.getuid()}:{os.getgid()}")
        st = group.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (0o710, os.getgid(), os.geteuid())

    def test_check_reachable(self, open_folder: Path) -> None:
        """The work folder is let pass; a folder above it that does not let the user pass stops
        the node with what to do."""
        above = open_folder / "above"
        work = above / "work"
        work.mkdir(parents=True)
        work.chmod(0o700)
        above.chmod(0o700)
        user = "65534:65534"
        with pytest.raises(ConfigError, match="cannot reach .*above.*chmod o\\+x"):
            check_reachable(user, str(work), "nobody")
        above.chmod(0o711)
        check_reachable(user, str(work), "nobody")
        assert work.stat().st_mode & 0o001


@pytest.mark.integration  # real children: the kernel applies the limits, the uid and the group
class WrapperTests:
    def test_limits_apply_in_the_child(self) -> None:
        """The chain sets the limits, a process group and the niceness before exec, and the pid
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
        """A group of its own, not a session, boxed or not: under autogroup scheduling a session
        of its own would make its nice level count for nothing against the node."""
        code = "import os; print(os.getsid(0))"
        out = subprocess.run(sandboxed_argv([sys.executable, "-c", code], ChildLimits()), capture_output=True,
                             text=True, timeout=30)
        assert out.stdout.split() == [str(os.getsid(0))], out.stderr
        if boxes_here() is None:
            box = sandboxed_argv(["sh", "-c", "echo up; sleep 1"], ChildLimits(box=Box()))
            child = subprocess.Popen(box, stdout=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None and child.stdout.readline() == "up\n"
                assert os.getsid(child.pid) == os.getsid(0) and os.getpgid(child.pid) == child.pid
            finally:
                child.communicate(timeout=30)

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


def ffmpeg_users(job_id: str) -> dict[int, tuple[str, ...]]:
    """pid -> (real, effective, saved, filesystem) user names of every running ffmpeg (the binary
    itself, by its command name) working on ``job_id``."""
    import pwd

    found: dict[int, tuple[str, ...]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/comm").read_text().strip() != "ffmpeg":
                continue
            if job_id.encode() not in Path(f"/proc/{entry}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # it ended meanwhile
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        found[int(entry)] = tuple(pwd.getpwuid(int(uid)).pw_name for uid in uids)
    return found


def root_node(folder: Path, node_id: str, *extra: str, env: dict[str, str] | None = None) -> NodeProcess:
    """A node on loopback that runs its children as nobody (the node being root)."""
    return NodeProcess(folder, ["--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer",
                                f"tcp:{free_port()}:interface=127.0.0.1", "--min-free", "0",
                                "--ffmpeg-user", "auto", "--node-id", node_id, *extra], env=env)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
class RootNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_root_node_converts_as_nobody(self, open_folder: Path, media_clips: Clips, long_clip: Path) -> None:
        """A node run as root converts with ffmpeg running as nobody; its folders are its own.

        Only the ffmpeg process itself is looked at: the wrapper in front of it (perl, which
        switches to nobody and then runs bwrap and prlimit) has ffmpeg and the job id in its
        argv and runs as root for a moment, which a sample of every process mentioning ffmpeg
        once caught. A long clip keeps ffmpeg running until it is seen; that job is cancelled."""
        node = root_node(open_folder, "rootnode")
        node.start()
        try:
            base = yield node.wait_ready()
            status, _, long_job = upload(base, long_clip, "mp4-480p")
            assert status == 201, long_job
            users: dict[int, tuple[str, ...]] = {}
            for _ in range(600):  # until its ffmpeg runs (bounded: 60 s)
                users = ffmpeg_users(long_job["id"])
                if users:
                    break
                yield sleep(0.1)
            assert users and all(set(names) == {"nobody"} for names in users.values()), users
            request("DELETE", f"{base}/jobs/{long_job['id']}")
            status, _, job = upload(base, media_clips.landscape, "mp4-480p")
            assert status == 201, job
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
            status, _, data = request("GET", base + job["outputs"][0]["url"])
            assert status == 200 and len(data) == job["outputs"][0]["size"]
            # the input is readable by ffmpeg's user while its spool file (a hard link) lives
            yield spool_emptied(open_folder / "gridnode-work" / "spool", job["id"])
            store = open_folder / "gridnode-data"
            assert stat.S_IMODE(store.stat().st_mode) == 0o700
            for path in store.rglob("*"):
                mode = stat.S_IMODE(path.lstat().st_mode)
                assert mode == (0o700 if path.is_dir() else 0o600), path
            work = open_folder / "gridnode-work"
            for sub in ("spool", "scratch"):
                assert stat.S_IMODE((work / sub).stat().st_mode) == 0o710
        finally:
            node.stop()

    @pytest_twisted.inlineCallbacks
    def test_weak_root_node_says_so(self, open_folder: Path, media_clips: Clips) -> None:
        """--sandbox weak: the node says so at start and in /health, and still converts as nobody
        through its group's way to the work folder."""
        node = root_node(open_folder, "weaknode", "--sandbox", "weak")
        node.start()
        try:
            base = yield node.wait_ready()
            assert "SANDBOX WEAK" in node.text()
            status, health = get_json(base + "/health")
            assert health["sandbox"] == "weak"
            status, _, job = upload(base, media_clips.landscape, "mp4-480p")
            assert status == 201, job
            job = yield wait_job(base, job["id"])
            assert job["state"] == "done", job
        finally:
            node.stop()

    def test_take_back_freezes_what_the_child_wrote(self, tmp_path: Path) -> None:
        """After the child, every folder it had is the node's again (0710: its group may pass,
        not list, add or rename), so it can no longer swap what the node reads; a link it planted
        is neither followed nor its target changed."""
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
        gid = int(nobody.split(":")[1])
        for folder in (scratch, scratch / "out", scratch / "out" / "hls"):
            st = folder.stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.geteuid(), gid, 0o710), folder
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
def test_sandbox_benchmark_prints_its_sides() -> None:
    """bench/sandbox.py runs (a tiny run: the figure itself is for the README, not asserted)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "sandbox.py"), "--children", "2", "--rounds", "1",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["figure"] == "sandbox"
    assert min(result["bare_ms"], result["weak_ms"]) > 0
    assert result["box_ms"] is None or result["box_ms"] > 0
