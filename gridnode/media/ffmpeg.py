"""
Running ffmpeg: progress, timeouts, cancellation (buildbot-worker's habits).

- ``ProgressParser`` is sans-I/O: fed with the bytes of ``-progress pipe:1``,
  it yields progress 0..1 against the probed duration, never going down.
- ``FfmpegProcess`` is ffmpeg's ``child.ChildProcess`` (timeouts, SIGTERM then
  SIGKILL to the whole process group, the backup timer): it keeps the last 64
  stderr lines and reports progress. ``deferred`` fires with ``FfmpegResult`` or
  fails with ``GridnodeError``: ``ffmpeg_failed`` (exit status != 0; message ends
  with stderr's tail), ``timeout`` and ``cancelled``; ``too_large`` and
  ``too_many_streams`` when a stderr line says a limit stopped a decoder or the
  demuxer (``probe.limit_refusal``), and whatever its ``on_tick`` answers on a
  progress report (``verify.OutputWatch``: ``output_too_large``): the child is
  stopped then. It only fires once the child is gone (or the backup timer gave up
  on it), so a caller may remove the scratch folder then.
- ``spawn_ffmpeg`` starts any argv that way; ``start_transcode`` starts the
  argv of ``presets.build_argv``; ``collect_outputs`` lists what was written.

The clock and the signal function are injected, so the timeout and kill logic
is tested with ``task.Clock`` and a fake transport, without processes.
"""

from __future__ import annotations

import glob
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gridnode.errors import GridnodeError
from gridnode.media.child import ChildProcess, Timeouts, spawn_child
from gridnode.media.presets import (
    Preset,
    build_argv,
    default_output_limit,
    folders,
    job_output_limit,
    output_too_large,
)
from gridnode.media.probe import Limits, ProbeResult, limit_refusal
from gridnode.media.sandbox import ChildLimits, Sandbox, ffmpeg_processes, let_read, sandboxed_argv, share_with

STDERR_LINES = 64
_MAX_LINE = 4096  # longer lines are cut: ffmpeg never writes them, a broken child might
NICENESS = 10


class ProgressParser:
    """Turns ffmpeg's ``-progress`` key=value stream into progress 0..1.

    ``feed(bytes)`` returns the new progress values, each higher than the one
    before. Times come from ``out_time_us``, else ``out_time_ms`` (which ffmpeg
    also writes in microseconds, despite its name), else ``out_time``;
    ``progress=end`` means 1.0. ``ticks`` counts the reports (each ends with ``progress=``);
    ``out_seconds`` is the last time reported: ffmpeg ends a failed run's reports with
    ``progress=end`` too, so that time alone says how far it got.
    """

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.progress = 0.0
        self.ended = False
        self.ticks = 0
        self.out_seconds = 0.0
        self.fields: dict[str, str] = {}  # the latest value of every key
        self._buffer = b""

    def feed(self, data: bytes) -> list[float]:
        updates: list[float] = []
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            self._buffer = b""
        for raw in lines:
            value = self._line(raw[:_MAX_LINE].decode("utf-8", "replace").strip())
            if value is not None and value > self.progress:
                self.progress = value
                updates.append(value)
        return updates

    def _line(self, line: str) -> float | None:
        key, sep, value = line.partition("=")
        if not sep:
            return None
        key, value = key.strip(), value.strip()
        self.fields[key] = value
        if key == "progress":
            self.ticks += 1
        if key == "progress" and value == "end":
            self.ended = True
            return 1.0
        seconds: float | None = None
        if key in ("out_time_us", "out_time_ms"):
            try:
                seconds = int(value) / 1e6
            except ValueError:
                return None
        elif key == "out_time" and "out_time_us" not in self.fields and "out_time_ms" not in self.fields:
            seconds = _clock_time(value)
        if seconds is None:
            return None
        self.out_seconds = max(self.out_seconds, seconds)
        if self.duration <= 0:
            return None
        return min(1.0, max(0.0, seconds / self.duration))


def _clock_time(value: str) -> float | None:
    """``HH:MM:SS.micro`` -> seconds; ``N/A`` and junk -> None."""
    negative = value.startswith("-")
    parts = value.lstrip("-").split(":")
    if len(parts) != 3:
        return None
    try:
        seconds = int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    except ValueError:
        return None
    return -seconds if negative else seconds


class StderrTail:
    """The last ``lines`` lines of a byte stream."""

    def __init__(self, lines: int = STDERR_LINES) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        """Take ``data``; returns the lines it completed."""
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        if len(self._partial) > _MAX_LINE:
            complete.append(self._partial)
            self._partial = b""
        added = []
        for raw in complete:
            text = raw[:_MAX_LINE].decode("utf-8", "replace").rstrip("\r")
            if text.strip():
                self.lines.append(text)
                added.append(text)
        return added

    def tail(self) -> list[str]:
        partial = self._partial[:_MAX_LINE].decode("utf-8", "replace").strip()
        return list(self.lines) + ([partial] if partial else [])


def max_time_for(duration: float) -> float:
    """The default ceiling on one conversion: ten times the input, at least a minute."""
    return max(60.0, 10.0 * duration)


@dataclass(frozen=True)
class FfmpegResult:
    elapsed: float
    stderr_tail: tuple[str, ...]


class FfmpegProcess(ChildProcess[FfmpegResult]):
    """One ffmpeg child (``child.ChildProcess``): its progress on stdout, the tail of its
    stderr. ``cancel()`` stops it; ``deferred`` tells how it ended. ``on_tick`` is asked
    after each progress report; an error it answers stops the child with that error."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        duration: float,
        on_progress: Callable[[float], object] | None = None,
        on_tick: Callable[[], GridnodeError | None] | None = None,
        timeouts: Timeouts = Timeouts(),
        killpg: Callable[[int, int], None] = os.killpg,
        label: str = "ffmpeg",
    ) -> None:
        max_time = timeouts.max_time if timeouts.max_time is not None else max_time_for(duration)
        super().__init__(clock, timeouts=replace(timeouts, max_time=max_time), killpg=killpg, label=label)
        self.parser = ProgressParser(duration)
        self.stderr = StderrTail()
        self._on_progress = on_progress
        self._on_tick = on_tick

    def outReceived(self, data: bytes) -> None:
        ticks = self.parser.ticks
        for value in self.parser.feed(data):
            self._report(value)
        if self._on_tick is not None and self.parser.ticks > ticks and not self.stopping:
            error = self._on_tick()
            if error is not None:
                self.stop(error)

    def errReceived(self, data: bytes) -> None:
        for line in self.stderr.feed(data):
            # ffmpeg goes on past a frame a decoder refused: stop it at the first.
            error = limit_refusal(line)
            if error is not None:
                self.stop(error)

    def outcome(self, reason: Failure) -> FfmpegResult | Failure:
        if reason.check(ProcessDone):
            elapsed = self.elapsed
            self._report(1.0)
            self._log.info("{label} pid {pid} done in {elapsed:.1f}s", label=self.label, pid=self.pid,
                           elapsed=elapsed)
            return FfmpegResult(elapsed, tuple(self.stderr.tail()))
        err = reason.value
        how = (f"was killed by signal {err.signal}" if isinstance(err, ProcessTerminated) and err.signal
               else f"exited with status {getattr(err, 'exitCode', '?')}")
        tail = self.stderr.tail()
        self._log.warn("{label} pid {pid} {how}", label=self.label, pid=self.pid, how=how)
        error = GridnodeError(
            f"the conversion failed: ffmpeg {how}" + (":\n" + "\n".join(tail) if tail else ""),
            code="ffmpeg_failed", status=422)
        error.stderr_tail = tail  # type: ignore[attr-defined]
        return Failure(error)

    def timeout_error(self, idle: bool) -> GridnodeError:
        if idle:
            return GridnodeError(f"ffmpeg wrote nothing for {self.timeouts.idle:.0f} s and was stopped",
                                 code="timeout", status=504)
        return GridnodeError(f"the conversion took longer than {self.timeouts.max_time:.0f} s and was stopped",
                             code="timeout", status=504)

    def cancel(self, at_once: bool = False) -> None:
        """Stop the child; ``deferred`` fails with ``cancelled`` once it is gone (``at_once``: by
        SIGKILL, not waiting for ffmpeg to flush what nobody will keep)."""
        self.stop(GridnodeError("the job was cancelled", code="cancelled", status=409), at_once=at_once)

    def _report(self, value: float) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(value)
        except Exception:  # noqa: BLE001 - a listener's bug must not kill the conversion
            self._log.failure("progress listener failed")


def wrapped_argv(argv: Sequence[str], niceness: int = NICENESS, limits: ChildLimits | None = None) -> list[str]:
    """``argv`` behind the sandbox wrapper (gridnode/media/sandbox.py)."""
    limits = limits or ChildLimits(niceness=niceness)
    return sandboxed_argv(argv, limits)


def spawn_ffmpeg(
    reactor: Any,
    argv: Sequence[str],
    *,
    duration: float,
    on_progress: Callable[[float], object] | None = None,
    on_tick: Callable[[], GridnodeError | None] | None = None,
    timeouts: Timeouts = Timeouts(),
    niceness: int = NICENESS,
    env: Mapping[str, str] | None = None,
    label: str = "ffmpeg",
    limits: ChildLimits | None = None,
) -> FfmpegProcess:
    """Start ``argv`` (a list, never a shell) in its own process group at lower priority,
    under ``limits`` (default: the sandbox's defaults at ``niceness``).

    ``reactor`` provides IReactorProcess and IReactorTime. Returns the running
    ``FfmpegProcess``; wait on its ``deferred``, stop it with ``cancel()``.
    """
    proto = FfmpegProcess(reactor, duration=duration, on_progress=on_progress, on_tick=on_tick, timeouts=timeouts,
                          label=label)
    full = wrapped_argv(argv, niceness, limits)
    spawn_child(reactor, proto, full, env=env)
    return proto


def start_transcode(
    reactor: Any,
    probe: ProbeResult,
    input_path: str,
    out_dir: str,
    presets: Iterable[Preset],
    *,
    ffmpeg: str = "ffmpeg",
    on_progress: Callable[[float], object] | None = None,
    on_tick: Callable[[], GridnodeError | None] | None = None,
    timeouts: Timeouts = Timeouts(),
    max_output_bytes: int | None = None,
    threads: int | None = None,
    label: str = "ffmpeg",
    sandbox: Sandbox = Sandbox(),
    input_limits: Limits = Limits(),
) -> FfmpegProcess:
    """Make every preset's outputs of ``input_path`` in ``out_dir`` (created if missing), in a
    box of its own as ``sandbox`` says, under limits scaled to the input; ``on_tick``: see
    ``FfmpegProcess`` (the converter watches the output folder's size with it)."""
    presets = list(presets)
    os.makedirs(out_dir, exist_ok=True)
    inner = [os.path.join(out_dir, name) for name in folders(presets)]
    for folder in inner:
        os.makedirs(folder, exist_ok=True)  # the dash muxer and image2 make no folder
    let_read(sandbox.user, input_path)
    share_with(sandbox.user, out_dir, *inner)
    argv, limits = transcode_command(probe, input_path, out_dir, presets, ffmpeg=ffmpeg, timeouts=timeouts,
                                     max_output_bytes=max_output_bytes, threads=threads, sandbox=sandbox,
                                     input_limits=input_limits)
    return spawn_ffmpeg(reactor, argv, duration=probe.duration, on_progress=on_progress, on_tick=on_tick,
                        timeouts=timeouts, label=label, limits=limits)


def transcode_command(
    probe: ProbeResult,
    input_path: str,
    out_dir: str,
    presets: Iterable[Preset],
    *,
    ffmpeg: str = "ffmpeg",
    timeouts: Timeouts = Timeouts(),
    max_output_bytes: int | None = None,
    threads: int | None = None,
    sandbox: Sandbox = Sandbox(),
    input_limits: Limits = Limits(),
) -> tuple[list[str], ChildLimits]:
    """The ffmpeg argv of a job and the limits it runs under, scaled to the input, in a box
    that shows it ``input_path``, ``out_dir`` and the outputs' watermark images alone
    (``sandboxed_argv(*transcode_command(...))`` is what the node starts)."""
    presets = list(presets)
    max_time = timeouts.max_time if timeouts.max_time is not None else max_time_for(probe.duration)
    out_limit = max_output_bytes if max_output_bytes is not None else default_output_limit(probe)
    limits = sandbox.limits(ChildLimits(cpu_seconds=int(max_time * max(1, threads or os.cpu_count() or 1)) + 60,
                                        file_size=out_limit + 1024 * 1024, processes=ffmpeg_processes()),
                            reads=[input_path, *watermarks(presets)], writes=[out_dir])
    argv = build_argv(ffmpeg, probe, input_path, out_dir, presets, max_output_bytes=max_output_bytes,
                      threads=threads, input_limits=input_limits)
    return argv, limits


def watermarks(presets: Iterable[Preset]) -> list[str]:
    """The watermark images a job's outputs lay over the picture: its box shows them, read-only
    (the operator's files, left as they are: readable by ``--ffmpeg-user``, docs/operations.md)."""
    return list(dict.fromkeys(p.watermark.path for p in presets if p.watermark is not None))


@dataclass(frozen=True)
class ProducedFile:
    preset: str
    name: str  # relative to the output folder, "/"-separated: the object key's tail
    path: str
    size: int
    content_type: str
    #: seconds, as measured once ffmpeg has exited (``verify.measure_outputs``), on each
    #: preset's first file; None for a poster
    duration: float | None = None


def collect_outputs(
    out_dir: str, probe: ProbeResult, presets: Iterable[Preset], *, max_output_bytes: int | None = None
) -> list[ProducedFile]:
    """The files ffmpeg wrote, as the presets declare them.

    Fails with ``ffmpeg_failed`` when a declared output is missing or empty,
    and with ``output_too_large`` (413) when one reached the ``-fs`` limit
    (ffmpeg stops writing there and still exits 0) or all of them together passed
    ``job_output_limit`` (a job may end between two checks of ``verify.OutputWatch``).
    """
    limit = max_output_bytes if max_output_bytes is not None else default_output_limit(probe)
    presets = list(dict.fromkeys(presets))
    root = os.path.realpath(out_dir)
    found: list[ProducedFile] = []
    for preset in presets:
        for declared in preset.outputs(probe):
            pattern = os.path.join(out_dir, *declared.name.split("/"))
            paths = sorted(glob.glob(glob.escape(pattern).replace(glob.escape("*"), "*")))
            if not paths:
                raise GridnodeError(f"ffmpeg did not write {declared.name}", code="ffmpeg_failed", status=422)
            for path in paths:
                relative = os.path.relpath(path, out_dir)
                name = relative.replace(os.sep, "/")
                st = os.lstat(path)
                if not plain_file(st, path, os.path.join(root, relative)):
                    raise GridnodeError(f"ffmpeg wrote {name} as something other than a plain file",
                                        code="ffmpeg_failed", status=422)
                size = st.st_size
                if size == 0:
                    raise GridnodeError(f"ffmpeg wrote an empty {declared.name}", code="ffmpeg_failed",
                                        status=422)
                if size >= limit:
                    raise GridnodeError(f"the output {declared.name} passed the size limit of {limit} bytes",
                                        code="output_too_large", status=413)
                found.append(ProducedFile(preset.name, name, path, size, declared.content_type))
    together = job_output_limit(probe, presets, limit)
    total = sum(f.size for f in found)
    if total > together:
        raise output_too_large(together, total)
    return found


def plain_file(st: os.stat_result, path: str, inside: str) -> bool:
    """``path`` (``st``: its lstat) is a regular file with one name, reached through no symbolic
    link (``inside``: where it lies if no link below the output folder is followed): never a
    link (or a folder behind one) to something outside that the node may read and the child
    may not. Sound once the folder is the node's again (``sandbox.take_back``)."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and os.path.realpath(path) == inside
