"""
How every ffmpeg and ffprobe child starts: in a box of its own (``--sandbox bwrap``, the
default) or, where the operator accepted less (``--sandbox weak``), in a process group only.

The argv ``sandboxed_argv`` builds is a chain, each step exec'ing the next, so the pid the
node holds stays the first step's and is the leader of a process group of its own:

  perl      the process group (in the node's session), the niceness, the child's user
  bwrap     box only: namespaces of its own (user, pid, network, mount, ipc, uts, cgroup), a
            file-system view of the system's binaries and libraries, read-only, plus the
            child's input (read-only) and output folder (writable), a fresh /proc, no
            terminal. The child is the box's pid 1: when it ends, on any path, the kernel
            kills every other process in the box before bwrap, and so the node, hears of the
            end; ``--die-with-parent`` ends the box with its bwrap, which dies with the node
  prlimit   the resource limits; in a box also RLIMIT_NPROC, which the kernel (5.14 and
            later) counts per user namespace, so a fork bomb is bounded per box and never
            starves another job's ffmpeg (root, uid 0, is never limited)
  binary    ffmpeg or ffprobe, its environment an allowlist (``child_env``)

Why perl rather than Python or util-linux: the first step must make a process group without
a session (a session of its own is an autogroup of its own where the kernel schedules by
autogroup, ``kernel.sched_autogroup_enabled = 1`` as on the benchmark machine, and there a
niced child competes with the node as an equal: a busy node kept 64 % of a core against two
such children, 100 % against two in its own session). util-linux has no program for that,
bwrap's ``--new-session`` is exactly the session, and a Python interpreter costs ~9 ms of CPU
to start; perl-base (Essential on Debian) does it in ~1.3 ms. bubblewrap resolves the paths it
binds as the user it runs as, so the user is dropped before it, and the folders on the way to
a child's files let that user's group through (``private_folder``).

Where the node runs as root, the child's user (``--ffmpeg-user``, ``nobody`` by default) is
who runs bwrap, so the box's user namespace belongs to that user and RLIMIT_NPROC counts
in it; a node that is not root runs bwrap as itself. Either way bwrap runs unprivileged and
needs user namespaces for that user (Debian and Fedora allow them). ``find_host`` tries a box once at start and
``choose`` turns what it found and what was asked into the node's ``Sandbox``, or a refusal.
bench/sandbox.py measures what each step costs.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from gridnode.errors import ConfigError

#: the modes of ``--sandbox``
MODES = ("bwrap", "weak")


def ffmpeg_processes(cpus: int | None = None) -> int:
    """RLIMIT_NPROC of a boxed ffmpeg. Threads count too (a decoder's up to 17, a filter
    graph's CPU count + 1, each encoder's ``-threads``), so past 96 cores it grows with them."""
    return max(256, 2 * (cpus or os.cpu_count() or 1) + 64)


_WRAPPER = (
    "my ($nice, $user) = splice @ARGV, 0, 2;"
    "setpgrp(0, 0) or die qq{setpgid: $!\\n};"
    "setpriority(0, 0, getpriority(0, 0) + $nice) or die qq{setpriority: $!\\n};"
    "if ($user) {"
    " my ($u, $g) = split /:/, $user;"
    " $) = qq{$g $g}; $( = $g; ($<, $>) = ($u, $u);"
    " die qq{cannot become $user\\n} if $< != $u || $> != $u || $( != $g || $) != $g;"
    "}"
    "exec { $ARGV[0] } @ARGV or do { print STDERR qq{cannot run $ARGV[0]: $!\\n}; exit 127 };"
)

#: top-level folders of the system a box shows read-only (a link, as merged /usr makes
#: /bin, is shown as the same link)
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: what a box shows of /etc: the loader's cache and Debian's alternatives (libblas.so.3 is
#: a link through /etc/alternatives); nothing else, no passwd, no ssl, no resolver
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/alternatives")
#: the only devices; no tty (a child in the node's session must not reach its terminal)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
#: what a child's environment may hold (``child_env``): the locale, and a PATH of our own
ENV_KEYS = ("LANG", "LANGUAGE")
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Box:
    """What a boxed child sees of the node's files, at their own paths: ``reads`` read-only,
    ``writes`` (folders) writable. Besides them, only the system (``system_view``)."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChildLimits:
    """How one child starts: resource limits (None leaves one as it is), niceness, user, box."""

    address_space: int | None = 8 * 1024**3
    cpu_seconds: int | None = None
    file_size: int | None = None
    open_files: int | None = 256
    #: RLIMIT_NPROC, applied in a box only: outside one the kernel counts every process of the
    #: user, the node's own threads (or every other job's) included
    processes: int | None = 256
    niceness: int = 10
    #: "uid:gid" to run as, or None to keep the node's own user
    user: str | None = None
    #: the box it runs in; None: none (``--sandbox weak``, or a caller that asks for none)
    box: Box | None = None

    def rlimits(self) -> list[tuple[str, int]]:
        """(prlimit option name, value) of each limit that is set and applies."""
        pairs = [("as", self.address_space), ("cpu", self.cpu_seconds), ("fsize", self.file_size),
                 ("nofile", self.open_files), ("nproc", self.processes if self.box is not None else None)]
        return [(name, int(value)) for name, value in pairs if value is not None]


@dataclass(frozen=True)
class Sandbox:
    """How this node runs its children, decided once at start (``choose``): in a box of
    their own (``boxed``) or not, as ``user`` ("uid:gid"; None: the node's own)."""

    boxed: bool = True
    user: str | None = None

    @property
    def mode(self) -> str:
        return "bwrap" if self.boxed else "weak"

    def limits(self, base: ChildLimits, *, reads: Sequence[str] = (), writes: Sequence[str] = ()) -> ChildLimits:
        """``base`` for a child of this node that reads ``reads`` and writes in ``writes``."""
        box = Box(tuple(map(os.path.abspath, reads)), tuple(map(os.path.abspath, writes))) if self.boxed else None
        return replace(base, user=self.user, box=box)


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
        entry = pwd.getpwuid(int(name)) if name.isascii() and name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"ffmpeg-user: no such user {name!r}") from None
    return f"{entry.pw_uid}:{entry.pw_gid}"


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the programs the chain runs (``tools()``: found on PATH)."""

    perl: str = "/usr/bin/perl"
    prlimit: str = "/usr/bin/prlimit"
    bwrap: str = "/usr/bin/bwrap"


@functools.cache
def tools() -> Tools:
    found = {name: shutil.which(name, path=CHILD_PATH) for name in ("perl", "prlimit", "bwrap")}
    return Tools(**{name: path or getattr(Tools, name) for name, path in found.items()})


def system_view(links: Mapping[str, str | None]) -> list[str]:
    """The bwrap options showing the system read-only: ``links`` maps each of
    ``SYSTEM_DIRS`` present on the host to its link target, or None for a real folder."""
    view: list[str] = []
    for name in SYSTEM_DIRS:
        if name not in links:
            continue
        target = links[name]
        view += ["--symlink", target, "/" + name] if target is not None else ["--ro-bind", "/" + name, "/" + name]
    for path in SYSTEM_FILES:
        view += ["--ro-bind-try", path, path]
    view += ["--proc", "/proc"]
    for device in DEVICES:
        view += ["--dev-bind-try", device, device]
    return view


@functools.cache
def host_view() -> tuple[str, ...]:
    """``system_view`` of this host."""
    links: dict[str, str | None] = {}
    for name in SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            links[name] = os.readlink(path)
        elif os.path.isdir(path):
            links[name] = None
    return tuple(system_view(links))


def _shown(path: str, view: Sequence[str]) -> bool:
    """Whether the system part of ``view`` already shows ``path``."""
    return any(view[i] == "--ro-bind" and (path + "/").startswith(view[i + 2] + "/") for i in range(len(view) - 2))


def bwrap_argv(box: Box, binary: str, *, bwrap: str = "/usr/bin/bwrap", view: Sequence[str] = (),
               cwd: str = "/") -> list[str]:
    """bwrap and its options for ``box``, ending in ``--`` (the command follows)."""
    # --as-pid-1: the child is the box's pid 1, so this bwrap waits for it, and its end is the end
    # of the pid namespace: the kernel kills and waits for every other process in it first.
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--as-pid-1",
            "--cap-drop", "ALL", *view]
    if not _shown(binary, view):
        argv += ["--ro-bind", binary, binary]  # a binary outside /usr (a static build, a test's script)
    for path in box.reads:
        argv += ["--ro-bind", path, path]
    for path in box.writes:
        argv += ["--bind", path, path]
    # relative paths in the child's argv mean what they mean to the node
    return [*argv, "--dir", cwd, "--chdir", cwd, "--remount-ro", "/", "--"]


def sandboxed_argv(argv: Sequence[str], limits: ChildLimits, *, found: Tools | None = None,
                   view: Sequence[str] | None = None, cwd: str | None = None) -> list[str]:
    """``argv`` behind the chain (module docstring): in ``limits.box`` when it has one. The
    binary is looked up here, on the node's PATH, and given by its real path."""
    found = found or tools()
    binary = os.path.realpath(shutil.which(argv[0]) or argv[0])
    chain = [found.perl, "-e", _WRAPPER, str(limits.niceness), limits.user or ""]
    if limits.box is not None:
        chain += bwrap_argv(limits.box, binary, bwrap=found.bwrap, view=host_view() if view is None else view,
                            cwd=os.getcwd() if cwd is None else cwd)
    chain += [found.prlimit, *(f"--{name}={value}" for name, value in limits.rlimits()), "--"]
    return [*chain, binary, *argv[1:]]


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's whole environment: a PATH of its own and the node's locale, nothing else
    (no credential, no AWS_*, no PERL5OPT for the wrapper to obey). SVT_LOG=1: SVT-AV1 logs
    errors only, as ``-v error`` has ffmpeg do (else its banner fills a job's stderr tail)."""
    environ = os.environ if environ is None else environ
    env = {key: value for key, value in environ.items() if key in ENV_KEYS or key.startswith("LC_")}
    return {"PATH": CHILD_PATH, "LANG": "C.UTF-8", "SVT_LOG": "1", **env}


# -- at start: what the host offers, and the mode the node runs in

@dataclass(frozen=True)
class Host:
    """What ``find_host`` found: bwrap's path (None: not installed) and, when a trial box
    failed, why (its last words; None: it ran, or none was tried); ``missing``: the programs
    the chain needs that are not there."""

    bwrap: str | None
    refused: str | None = None
    missing: str | None = None


def find_host(user: str | None, *, trial: bool = True, trial_binary: str | None = None,
              run: Callable[..., subprocess.CompletedProcess[bytes]] = subprocess.run) -> Host:
    """What is installed and, with ``trial``, whether a box runs as the node's children would
    (``user``): ``trial_binary -version`` (ffprobe: its libraries must be in the view), or
    ``true``. Blocking; at start only."""
    found = {name: shutil.which(name, path=CHILD_PATH) for name in ("perl", "prlimit")}
    missing = ", ".join(name for name, path in found.items() if path is None) or None
    bwrap = shutil.which("bwrap", path=CHILD_PATH)
    if not trial or bwrap is None or missing:
        return Host(bwrap, missing=missing)
    binary = shutil.which(trial_binary) if trial_binary else None
    argv = [binary, "-version"] if binary else ["true"]
    limits = ChildLimits(user=user, box=Box(), processes=64, niceness=0)
    try:
        out = run(sandboxed_argv(argv, limits, cwd="/"), env=child_env(), capture_output=True, timeout=60,
                  stdin=subprocess.DEVNULL, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as e:
        return Host(bwrap, refused=str(e))
    if out.returncode == 0:
        return Host(bwrap)
    words = out.stderr.decode("utf-8", "replace").strip().splitlines()
    return Host(bwrap, refused=words[-1] if words else f"exit status {out.returncode}")


def choose(wanted: str, host: Host, user: str | None) -> Sandbox:
    """The node's ``Sandbox`` for ``--sandbox wanted`` on ``host``; ConfigError (the node does
    not start) when a box is wanted and none can be made. Never a box silently dropped."""
    if host.missing:
        raise ConfigError(f"sandbox: {host.missing} not found; every child starts through it "
                          "(Debian: perl-base, util-linux)")
    if wanted == "weak":
        return Sandbox(boxed=False, user=user)
    if host.bwrap is None:
        raise ConfigError("sandbox: bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) "
                          "or start with --sandbox weak to run ffmpeg without a box")
    if host.refused is not None:
        who = f"user {user.split(':')[0]}" if user else "the node's user"
        raise ConfigError(f"sandbox: a trial box failed ({host.refused}); {who} needs user namespaces "
                          "(sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 on "
                          "older Debian, kernel.apparmor_restrict_unprivileged_userns = 0 on Ubuntu), or start "
                          "with --sandbox weak to run ffmpeg without a box")
    return Sandbox(boxed=True, user=user)


def announce(sandbox: Sandbox) -> str:
    """The one line the node logs at start about its children."""
    who = f"as uid:gid {sandbox.user}" if sandbox.user else "as the node's user"
    if sandbox.boxed:
        return (f"sandbox: bwrap; every ffmpeg and ffprobe runs {who} in a box of its own (no network, "
                "its own processes, only its input and output folder)")
    return (f"SANDBOX WEAK (--sandbox weak): ffmpeg and ffprobe run {who} WITHOUT a box; a hostile upload that "
            "takes over one can reach the network and whatever that user may read")


# -- the node's folders, and what a child may touch in them

def private_folder(path: str, user: str | None) -> None:
    """Make ``path`` (created if missing) the node's own: 0700, or 0710 with the group of
    ``user`` (the children's, when they run as another user) so that their boxes can be
    built on paths in it, and nothing else: that group may pass, not list."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    if user is None:
        os.chmod(path, 0o700)
        return
    os.chown(path, os.geteuid(), int(user.split(":")[1]))
    os.chmod(path, 0o710)


def check_reachable(user: str, work_dir: str, name: str) -> None:
    """The children's user must pass every folder down to the work folder, where bwrap finds
    what it binds. The work folder is let pass (o+x) if it is not yet: it holds only the
    spool and the scratch folder (``private_folder``); one above it that does not let pass
    stops the node with what to do."""
    uid, gid = map(int, user.split(":"))

    def passes(st: os.stat_result) -> bool:
        return bool(st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)
                    or (st.st_gid == gid and st.st_mode & 0o010))

    folder = os.path.abspath(work_dir)
    if not passes(os.stat(folder)):
        os.chmod(folder, os.stat(folder).st_mode | 0o001)
    while folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
        if not passes(os.stat(folder)):
            raise ConfigError(f"ffmpeg-user {name} cannot reach {folder} (no o+x): allow it "
                              f"(chmod o+x {folder}), move --work-dir, or set --ffmpeg-user none")


def share_with(user: str | None, *paths: str) -> None:
    """Give the child's user a folder to write in (no-op without one); ``take_back`` ends it."""
    if not user:
        return
    uid, gid = map(int, user.split(":"))
    for path in paths:
        os.chown(path, uid, gid)


def let_read(user: str | None, path: str) -> None:
    """Let the child's user read an input, and no more: the file stays the node's, in that
    user's group, mode 0640 (no-op without a user), in a folder that group may pass but not
    list (``private_folder``); inside a box the child sees it alone, bound read-only."""
    if not user:
        return
    os.chown(path, os.geteuid(), int(user.split(":")[1]))
    os.chmod(path, 0o640)


def take_back(user: str | None, folder: str) -> None:
    """Undo ``share_with`` on a folder a child wrote in, before the node reads from it.

    Every folder in it becomes the node's again, mode 0710 in ``user``'s group (as
    ``private_folder``: a later box, an ffprobe of the outputs, may pass to what it binds), and
    is listed only after that, so nothing running as ``user`` can add, rename or swap an entry
    once the node has looked. Links are never followed and files are left as they are: their
    bytes are the child's to decide anyway; where they lie is not. Without this, a child that
    planted a symbolic link to a file only the node can read would have the node store and
    serve that file as an output (no-op without ``user``).
    """
    if not user:
        return
    uid, gid = os.geteuid(), int(user.split(":")[1])

    def take(path: str) -> None:
        os.chown(path, uid, gid, follow_symlinks=False)
        os.chmod(path, 0o710)
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    take(entry.path)

    take(folder)
