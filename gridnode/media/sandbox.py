"""
How every ffmpeg and ffprobe child starts: in a session and process group of
its own, at lower CPU priority, under resource limits, and, when the node runs
as root, as an unprivileged user.

Twisted's spawnProcess has no preexec_fn, so the child first runs a chain of
small programs, each of which changes one thing about itself and execs the
next: util-linux ``setsid``, ``prlimit`` and ``setpriv``, coreutils ``nice``.
exec keeps the pid, so the pid Twisted holds stays the binary's own and
``os.killpg(pid, ...)`` reaches it and anything it starts. (setsid(1) forks
only when its caller leads a process group; a child just spawned never does,
and nothing here makes it one.) The chain costs ~2.5 ms of CPU per child
(bench/sandbox.py); where those programs are missing (not Linux), a tiny
Python wrapper does the same work at ~7 ms.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass

_WRAPPER = (
    "import os, sys, resource\n"
    "os.setpgid(0, 0)\n"
    "os.nice(int(sys.argv[1]))\n"
    "for item in filter(None, sys.argv[2].split(',')):\n"
    "    name, value = item.split('=')\n"
    "    resource.setrlimit(getattr(resource, 'RLIMIT_' + name), (int(value), int(value)))\n"
    "if sys.argv[3]:\n"
    "    uid, gid = map(int, sys.argv[3].split(':'))\n"
    "    os.setgroups([])\n"
    "    os.setgid(gid)\n"
    "    os.setuid(uid)\n"
    "try:\n"
    "    os.execv(sys.argv[4], sys.argv[4:])\n"
    "except OSError as e:\n"
    "    sys.stderr.write('cannot run %s: %s\\n' % (sys.argv[4], e.strerror))\n"
    "    sys.exit(127)\n"
)


@dataclass(frozen=True)
class ChildLimits:
    """Resource limits of one child; None leaves a limit as it is."""

    address_space: int | None = 8 * 1024**3
    cpu_seconds: int | None = None
    file_size: int | None = None
    open_files: int | None = 256
    niceness: int = 10
    #: "uid:gid" to run as, or None to keep the node's own user
    user: str | None = None

    def rlimits(self) -> list[tuple[str, int]]:
        """(RLIMIT_ name without the prefix, value) of each limit that is set."""
        pairs = [("AS", self.address_space), ("CPU", self.cpu_seconds), ("FSIZE", self.file_size),
                 ("NOFILE", self.open_files)]
        return [(name, int(value)) for name, value in pairs if value is not None]

    def spec(self) -> str:
        return ",".join(f"{name}={value}" for name, value in self.rlimits())


def resolve_user(name: str | None) -> str | None:
    """``--ffmpeg-user``: a user name or uid to "uid:gid"; "auto" means nobody when root."""
    if name in (None, "", "none"):
        return None
    import pwd

    if name == "auto":
        if os.geteuid() != 0:
            return None
        name = "nobody"
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        from gridnode.errors import ConfigError

        raise ConfigError(f"ffmpeg-user: no such user {name!r}") from None
    return f"{entry.pw_uid}:{entry.pw_gid}"


def sandboxed_argv(argv: Sequence[str], limits: ChildLimits, *, chain: bool = True) -> list[str]:
    """``argv`` behind the chain (or, without its programs or with ``chain=False``, the
    Python wrapper). The binary is looked up here: after dropping to another user the
    child may no longer be able to search PATH."""
    binary = shutil.which(argv[0]) or argv[0]
    if chain:
        found = _chain(limits)
        if found is not None:
            return [*found, binary, *argv[1:]]
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(limits.niceness), limits.spec(), limits.user or "",
            binary, *argv[1:]]


def _chain(limits: ChildLimits) -> list[str] | None:
    """The programs before the binary, or None when one of them is not on PATH."""
    steps = [["setsid"], ["prlimit", *(f"--{name.lower()}={value}" for name, value in limits.rlimits())]]
    if limits.niceness:
        steps.append(["nice", "-n", str(limits.niceness)])
    if limits.user:
        uid, gid = limits.user.split(":")
        steps.append(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"])
    chain = []
    for program, *options in steps:
        path = shutil.which(program)
        if path is None:
            return None
        chain += [path, *options]
    return chain


def share_with(user: str | None, *paths: str) -> None:
    """Let the child's user read an input and write an output folder (no-op without one)."""
    if not user:
        return
    uid, gid = map(int, user.split(":"))
    for path in paths:
        os.chown(path, uid, gid)
