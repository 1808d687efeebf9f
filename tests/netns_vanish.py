"""Run inside a new network namespace (``unshare -n``, as root): real nodes, one on its own host.

Three nodes listen for peers on 10.77.0.1 (this namespace); a fourth, the victim, runs in a
namespace of its own behind a veth pair, at 10.77.0.2: a host of its own on a real link. First
the victim's process is stopped for 3 s (SIGSTOP: a stalled node, whose kernel still answers):
it must not be declared dead. Then its link goes down and its process is killed (the host
vanished: silence). Prints one JSON object: whether it survived the stall, how long until every
other node held it dead, whether its record was deleted, and the nodes' host-check counts after
the stall and at the end.

    unshare -n python tests/netns_vanish.py FOLDER
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import poll

BIN = os.path.dirname(sys.executable)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def peers(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/peers", timeout=5) as r:
        return json.loads(r.read())


def states(http_port: int) -> dict[str, str]:
    try:
        return {p["id"]: p["state"] for p in peers(http_port)["peers"]}
    except OSError:
        return {}


def until(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until ``predicate`` held (``poll`` every 50 ms)."""
    start = time.monotonic()
    poll(predicate, timeout, what, interval=0.05)
    return time.monotonic() - start


def main(folder: Path) -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "gv0", "type", "veth", "peer", "name", "gv1")
    sh("ip", "addr", "add", "10.77.0.1/24", "dev", "gv0")
    sh("ip", "link", "set", "gv0", "up")
    host = subprocess.Popen(["unshare", "-n", "sleep", "600"])
    procs: list[subprocess.Popen[bytes]] = [host]
    try:
        time.sleep(0.2)
        sh("ip", "link", "set", "gv1", "netns", str(host.pid))
        inside = ("nsenter", "-t", str(host.pid), "-n")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", "10.77.0.2/24", "dev", "gv1")
        sh(*inside, "ip", "link", "set", "gv1", "up")
        store = folder / "store"
        secret = folder / "secret"
        secret.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")  # a keyring of one key, as written by hand
        names = ["v0", "v1", "v2", "victim"]
        http = {n: 18080 + i for i, n in enumerate(names)}
        for n in names:
            addr = "10.77.0.2" if n == "victim" else "10.77.0.1"
            args = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "gridnode", "--store", f"file:{store}",
                    "--node-id", n, "--heartbeat", "1", "--min-free", "0", "--ffmpeg-user", "none",
                    "--secret-file", str(secret), "--http", f"tcp:{http[n]}:interface=127.0.0.1",
                    "--peer", f"tcp:{19090 + names.index(n)}:interface={addr}"]
            (folder / n).mkdir(parents=True)
            with open(folder / n / "twistd.out", "wb") as out:
                procs.append(subprocess.Popen([*inside, *args] if n == "victim" else args, cwd=folder / n,
                                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        victim = procs[-1]
        others = [n for n in names if n != "victim"]
        until(lambda: all(states(http[n]) == dict.fromkeys(names, "alive") for n in others), 30, "all alive")
        time.sleep(2)
        # a stall: no answers for 3 s, but the kernel acknowledges; nobody may declare it dead
        os.kill(victim.pid, signal.SIGSTOP)
        stalled_views = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            stalled_views.append([states(http[n]).get("victim") for n in others])
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGCONT)
        until(lambda: all(states(http[n]).get("victim") == "alive" for n in others), 20, "victim alive again")
        survived = not any("dead" in v for v in stalled_views)
        after_stall = {n: peers(http[n])["host_checks"] for n in others}
        time.sleep(2)
        # the host vanishes: its link goes down, nothing answers any more, and nothing runs there
        # (its node would otherwise go on writing its record into the shared folder)
        sh(*inside, "ip", "link", "set", "gv1", "down")
        victim.kill()
        took = until(lambda: all(states(http[n]).get("victim") == "dead" for n in others), 30, "victim dead")
        until(lambda: not (store / "registry" / "dev" / "default" / "nodes" / "victim.json").exists(), 15,
              "victim's record deleted")
        checks = {n: peers(http[n])["host_checks"] for n in others}
        print(json.dumps({"stall_survived": survived, "dead_everywhere_s": round(took, 2),
                          "record_deleted": True, "checks_after_stall": after_stall, "host_checks": checks}))
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
