"""
An ffmpeg taken over by a hostile upload, as an attacker would try it (issue 18's acceptance):
a node running as root, its children as nobody in boxes of their own, a fake ``--ffmpeg`` that
tries in one run to read, reach, write, signal, trace, fork and outlive, then runs the real
ffmpeg with its findings and its environment written into its output, which the node stores.
Every attempt fails, no secret of the node's reaches any stored object, nothing of it is left
once its job is done, and the job beside it ends with its own, correct output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gridnode.media.sandbox import ENV_KEYS, resolve_user
from tests.helpers import free_port, sleep
from tests.media_samples import Clips, ffprobe_json
from tests.nodes import NodeProcess, boxes_here, get_json, request, upload, wait_job

pytest_plugins = ["tests.s3server"]

SECRET = "gridnode-acceptance-secret-5b0d1e"
MARKER = "gridnode-left-behind-4c1f"
FORKS = 500

#: the other job's ffmpeg: waits (its box shows it only its own folders) until the test says go,
#: so it is running all through the attack, then converts as the real one does
VICTIM = """#!/usr/bin/python3 -I
import os, sys, time
go = os.path.join(os.path.dirname(sys.argv[-1]), "go")
deadline = time.monotonic() + 90
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.1)
os.execv("/usr/bin/ffmpeg", ["ffmpeg", *sys.argv[1:]])
"""

ATTACKER = """#!/usr/bin/python3 -I
import ctypes, errno, json, os, signal, socket, subprocess, sys, time

T = json.loads(%r)
report = {}


def attempt(name, act):
    try:
        act()
    except OSError as e:
        report[name] = "denied: " + errno.errorcode.get(e.errno, str(e.errno))
    else:
        report[name] = "SUCCEEDED"


def read(path):
    def act():
        with open(path, "rb") as f:
            f.read(1)
    return act


def write(path):
    def act():
        with open(path, "ab") as f:
            f.write(b"planted")
    return act


def connect(port):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close()


def ptrace(pid):
    def act():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "ptrace")
    return act


attempt("list the store", lambda: os.listdir(T["store"]))
attempt("read the other job's record", read(T["store_record"]))
attempt("read the other job's input", read(T["victim_input"]))
attempt("list the other job's output folder", lambda: os.listdir(T["victim_out"]))
attempt("write the other job's output", write(os.path.join(T["victim_out"], "mp4-480p.mp4")))
attempt("list /root", lambda: os.listdir("/root"))
attempt("read the node's environment", read("/proc/%%d/environ" %% T["node_pid"]))
attempt("connect to the node's HTTP port", connect(T["node_port"]))
attempt("connect to the S3 server", connect(T["s3_port"]))
attempt("write in the work folder", write(os.path.join(T["work"], "planted")))
attempt("write in /tmp", write("/tmp/planted"))
attempt("write its own input", write(sys.argv[sys.argv.index("-i") + 1].removeprefix("file:")))
attempt("signal the other job's ffmpeg", lambda: os.kill(T["victim_pid"], signal.SIGKILL))
attempt("trace the other job's ffmpeg", ptrace(T["victim_pid"]))
forked = []
for _ in range(T["forks"]):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked.append(pid)
report["forked"] = len(forked)
for pid in forked:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(120)", T["marker"]])
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(120)", T["marker"]])
report["env"] = dict(os.environ)
payload = json.dumps(report)
sys.stderr.write(payload + "\\n")
os.execv("/usr/bin/ffmpeg", ["ffmpeg", *sys.argv[1:-1], "-metadata", "comment=" + payload, sys.argv[-1]])
"""


def install(path: Path, text: str) -> None:
    """Replace the fake ffmpeg at once (a box binds the file it finds when it starts)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def processes(*needles: str) -> dict[int, str]:
    """Live processes whose command line holds every needle: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in line for n in needles):
            found[int(entry)] = line
    return found


def stored_output(base: str, job: dict[str, Any], folder: Path) -> dict[str, Any]:
    status, _, data = request("GET", base + job["outputs"][0]["url"])
    assert status == 200
    path = folder / f"{job['id']}.mp4"
    path.write_bytes(data)
    return ffprobe_json(path)


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="the node runs as root here, its children as nobody (CI runs as root)")
class AttackerTests:
    @pytest_twisted.inlineCallbacks
    def test_a_taken_over_ffmpeg_gets_nothing(self, open_folder: Path, media_clips: Clips,
                                              s3_endpoint: str) -> None:
        nobody = resolve_user("auto")
        why = boxes_here(nobody)
        if why is not None:
            pytest.skip(f"no box for nobody here: {why}")
        fake = open_folder / "fake-ffmpeg"
        install(fake, VICTIM)
        node = NodeProcess(open_folder, [
            "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
            "--min-free", "0", "--ffmpeg-user", "auto", "--node-id", "attacked", "--workers", "2",
            "--ffmpeg", str(fake)], env={"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIDGRIDNODETEST"})
        node.start()
        try:
            base = yield node.wait_ready()
            assert get_json(base + "/health")[1]["sandbox"] == "bwrap"
            status, _, victim = upload(base, media_clips.landscape, "mp4-480p")
            assert status == 201, victim
            yield wait_job(base, victim["id"], {"transcoding"}, timeout=60)
            work, store = open_folder / "gridnode-work", open_folder / "gridnode-data"
            victim_out = work / "scratch" / victim["id"] / "out"
            running = {}
            for _ in range(600):  # bounded: the box starts the fake (bwrap, then python)
                running = {pid: line for pid, line in processes(str(fake), victim["id"]).items()
                           if line.startswith("/usr/bin/python3")}
                if running:
                    break
                yield sleep(0.1)
            assert len(running) == 1, running
            records = [p for p in store.rglob("*") if p.is_file() and victim["id"] in p.name]
            targets = {"store": str(store), "store_record": str(records[0]), "work": str(work),
                       "victim_input": str(work / "spool" / victim["id"]), "victim_out": str(victim_out),
                       "victim_pid": next(iter(running)), "node_pid": node.pid, "node_port": node.port,
                       "s3_port": int(s3_endpoint.rsplit(":", 1)[1].strip("/")), "forks": FORKS,
                       "marker": MARKER}
            install(fake, ATTACKER % json.dumps(targets))
            status, _, attacker = upload(base, media_clips.portrait, "mp4-480p")
            assert status == 201, attacker
            attacker = yield wait_job(base, attacker["id"], timeout=90)
            (victim_out / "go").touch()
            victim = yield wait_job(base, victim["id"], timeout=90)

            assert attacker["state"] == "done", attacker
            report = json.loads(stored_output(base, attacker, open_folder)["format"]["tags"]["comment"])
            env, forked = report.pop("env"), report.pop("forked")
            assert len(report) == 14 and all(v.startswith("denied") for v in report.values()), report
            assert forked < FORKS
            # PWD: bwrap's, the working folder it changed to
            # SVT_LOG=1: set by the node (SVT-AV1's banner off), never inherited
            assert set(env) <= {"PATH", "PWD", "SVT_LOG", *ENV_KEYS} | {k for k in env if k.startswith("LC_")}, env
            assert env.get("SVT_LOG", "1") == "1", env
            for path in [*store.rglob("*"), *work.rglob("*")]:
                if path.is_file() and not path.is_symlink():
                    assert SECRET.encode() not in path.read_bytes(), path
            assert not (work / "planted").exists()
            for _ in range(300):  # bounded
                if not processes(MARKER):
                    break
                yield sleep(0.1)
            assert processes(MARKER) == {}

            assert victim["state"] == "done", victim
            out = stored_output(base, victim, open_folder)
            assert float(out["format"]["duration"]) == pytest.approx(4.0, abs=0.2)
            assert "comment" not in out["format"].get("tags", {})
            video = [s for s in out["streams"] if s["codec_type"] == "video"][0]
            assert (video["width"], video["height"]) == (640, 360)  # never upscaled
        finally:
            for pid in processes(MARKER):
                os.kill(pid, 9)
            node.stop()
