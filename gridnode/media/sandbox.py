"""
How every ffmpeg and ffprobe child starts: in a process group of its own, at
lower CPU priority, under resource limits, and, when the node runs as root,
as an unprivileged user.

Twisted's spawnProcess has no preexec_fn, so a tiny Python wrapper does it
and then execs the binary: the pid Twisted holds stays the binary's own
(exec keeps it) and ``os.killpg(pid, ...)`` reaches it and anything it
starts. Limits (setrlimit in the child) are the equivalent of util-linux
prlimit without another binary: address space, CPU seconds, file size, open
files. It costs ~7 ms of CPU per child (bench/sandbox.py).

Not a session of its own (setsid): where the kernel schedules by autogroup
(``kernel.sched_autogroup_enabled = 1``, as on the machine the benchmarks run
on), every session is a group that gets an equal share of the CPU whatever
its members' nice levels, so a niced ffmpeg in a session of its own competes
with the node as an equal (measured: a busy node kept 64 % of a core against
two such children, 100 % against two in its own session). A chain of
util-linux programs (setsid, prlimit, nice, setpriv) would cost ~2.5 ms
instead of ~7, but util-linux has no program that makes a process group
without a session.
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
        """The limits as the wrapper reads them: "AS=...,NOFILE=..."."""
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


def sandboxed_argv(argv: Sequence[str], limits: ChildLimits) -> list[str]:
    """``argv`` behind the wrapper. The binary is looked up here: after dropping to
    another user the wrapper may no longer read Python's own library to search PATH."""
    binary = shutil.which(argv[0]) or argv[0]
    return [sys.executable, "-I", "-S", "-c", _WRAPPER, str(limits.niceness), limits.spec(), limits.user or "",
            binary, *argv[1:]]


def share_with(user: str | None, *paths: str) -> None:
    """Give the child's user a folder to write in (no-op without one); ``take_back`` ends it."""
    if not user:
        return
    uid, gid = map(int, user.split(":"))
    for path in paths:
        os.chown(path, uid, gid)


def let_read(user: str | None, path: str) -> None:
    """Let the child's user read an input, and no more: the file stays the node's, in that
    user's group, mode 0640 (no-op without a user). Were it the child's own, any child could
    rewrite the input of another job, whose path ``ps`` shows to every user."""
    if not user:
        return
    os.chown(path, os.geteuid(), int(user.split(":")[1]))
    os.chmod(path, 0o640)


def take_back(user: str | None, folder: str) -> None:
    """Undo ``share_with`` on a folder a child wrote in, before the node reads from it.

    Every folder in it becomes the node's again, mode 0700, and is listed only after that,
    so nothing running as ``user`` (a child left behind, another job's child) can add,
    rename or swap an entry once the node has looked. Links are never followed and files are
    left as they are: their bytes are the child's to decide anyway; where they lie is not.
    Without this, a child that planted a symbolic link to a file only the node can read
    would have the node store and serve that file as an output (no-op without ``user``).
    """
    if not user:
        return
    uid, gid = os.geteuid(), os.getegid()

    def take(path: str) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, 0o700)
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    take(entry.path)

    take(folder)
