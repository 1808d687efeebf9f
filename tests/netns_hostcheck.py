"""Run inside a new network namespace (``unshare -n``, as root): HostCheck against a real kernel.

A peer process accepts our connection, and is then stopped (SIGSTOP: a stalled reactor; its
kernel still acknowledges). Then the namespace's loopback goes down (a vanished host: nothing
acknowledges). Prints one JSON object: the verdict of each check.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from twisted.internet import reactor, task
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from gridnode.membership.hostcheck import HostCheck
from gridnode.membership.peer import PeerProtocol

PEER = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()
time.sleep(120)
"""


@inlineCallbacks
def main() -> object:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    peer = subprocess.Popen([sys.executable, "-c", PEER], stdout=subprocess.PIPE, text=True)
    verdicts: dict[str, object] = {}
    try:
        assert peer.stdout is not None
        port = int(peer.stdout.readline())
        proto = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), PeerProtocol())
        proto.transport.setTcpNoDelay(True)
        yield task.deferLater(reactor, 0.2, lambda: None)
        verdicts["running"] = yield HostCheck(reactor, proto).run()
        os.kill(peer.pid, signal.SIGSTOP)
        verdicts["stalled"] = yield HostCheck(reactor, proto).run()
        subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
        verdicts["vanished"] = yield HostCheck(reactor, proto).run()
    finally:
        peer.kill()
    print(json.dumps(verdicts))
    return None


if __name__ == "__main__":
    socket.setdefaulttimeout(10)
    task.react(lambda _: main())
