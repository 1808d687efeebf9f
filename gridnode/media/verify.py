"""
What is checked of a conversion while ffmpeg runs and once it has exited: what the job
actually made, not what its input declared.

- ``OutputWatch``: the output folder's total size, measured on ffmpeg's progress ticks
  (about two a second) and less often when the folder holds thousands of files. Over the
  job's limit (``presets.job_output_limit``) it answers ``output_too_large`` and
  ``FfmpegProcess`` stops the process group: ``-fs`` bounds each file, not HLS segments.
- ``hls_duration``: a media playlist's length, the sum of its ``#EXTINF``; ``dash_duration``: a
  DASH manifest's ``mediaPresentationDuration``.
- ``truncation``: an output shorter than the input by more than ``tolerance`` means the
  input could not be read to its end: ``input_truncated``, with ffmpeg's own lines.
- ``measure_outputs``: after ffmpeg exited, how long each output lasts (mp4 and webm:
  their headers, read in Python by ``headers``; HLS and CMAF: their media playlists; DASH: its
  manifest), checked by
  ``truncation``; the durations go into the job JSON.

``OutputWatch`` takes its clock and its measure, so it is tested on a fake of each.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from twisted.internet.interfaces import IReactorTime

from gridnode.errors import GridnodeError
from gridnode.media.ffmpeg import ProducedFile
from gridnode.media.headers import mp4_duration, opus_duration, webm_duration
from gridnode.media.presets import Preset, hls_rungs, output_too_large
from gridnode.media.probe import ProbeResult

#: ffmpeg's -progress period: no point measuring more often
MIN_INTERVAL = 0.5
#: a walk costs a few µs per file: 1 ms of waiting per file keeps it under 1 % of the reactor
SECONDS_PER_FILE = 0.001
#: more files than a legitimate job makes (4 h of 6 s segments in 3 rungs: 7,200)
MAX_FILES = 20_000
#: longer than any playlist gridnode writes (4 h of 6 s segments: ~100 kB)
MAX_PLAYLIST = 4 * 1024 * 1024
#: an output may end this much before its input: one frame at 1 fps, an audio encoder's
#: padding, HLS segment times rounded; plus 1 % for containers whose stated duration is
#: an estimate (mpegts, avi without index)
TOLERANCE_SECONDS = 1.0
TOLERANCE_SHARE = 0.01
#: ffmpeg's lines kept in an input_truncated message
STDERR_LINES = 20


def folder_size(folder: str, max_files: int = MAX_FILES) -> tuple[int, int]:
    """(bytes, entries) of everything below ``folder``, links not followed; the walk stops past
    ``max_files`` entries. Entries that go while it walks (ffmpeg renames its playlists into
    place) or cannot be read are skipped: this runs on the reactor, and must not raise."""
    total = files = 0
    stack = [folder]
    while stack and files <= max_files:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if files > max_files:
                        break
                    files += 1  # a folder counts too: a million empty ones must not hold the reactor
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                            continue
                        total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total, files


class OutputWatch:
    """Checks a running job's output folder against ``limit`` bytes; ``tick()`` on each of
    ffmpeg's progress reports answers ``output_too_large`` once it is over, else None."""

    def __init__(self, clock: IReactorTime, folder: str, limit: int, *,
                 measure: Callable[[str], tuple[int, int]] = folder_size) -> None:
        self.clock = clock
        self.folder = folder
        self.limit = limit
        self.total = 0
        self._measure = measure
        self._next = float("-inf")  # clock time before which a tick measures nothing

    def tick(self) -> GridnodeError | None:
        now = self.clock.seconds()
        if now < self._next:
            return None
        self.total, files = self._measure(self.folder)
        self._next = now + max(MIN_INTERVAL, files * SECONDS_PER_FILE)
        if files > MAX_FILES:
            return output_too_large(self.limit, files=files)
        if self.total > self.limit:
            return output_too_large(self.limit, self.total)
        return None


def hls_duration(text: str) -> float | None:
    """The length of an HLS media playlist: its ``#EXTINF`` times added up. None unless it
    is whole (``#EXT-X-ENDLIST``) with at least one segment and every time a number >= 0."""
    total = 0.0
    segments = 0
    ended = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#EXTINF:"):
            try:
                seconds = float(line[len("#EXTINF:"):].split(",", 1)[0])
            except ValueError:
                return None
            if not 0 <= seconds < float("inf"):
                return None
            total += seconds
            segments += 1
        elif line == "#EXT-X-ENDLIST":
            ended = True
    return total if ended and segments else None


_PRESENTATION = re.compile(r'\bmediaPresentationDuration="PT(?:(\d{1,6})H)?(?:(\d{1,6})M)?'
                           r'(?:(\d{1,9}(?:\.\d{1,9})?)S)?"')


def dash_duration(text: str) -> float | None:
    """The length a DASH manifest states (``mediaPresentationDuration``, as ffmpeg's muxer
    writes it once every segment is out: ``PT1H2M3.5S``); None when it states none."""
    m = _PRESENTATION.search(text)
    if m is None or not any(m.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


def tolerance(expected: float) -> float:
    """How much shorter than ``expected`` seconds an output may be and still be whole."""
    return TOLERANCE_SECONDS + TOLERANCE_SHARE * expected


def stderr_excerpt(lines: Sequence[str], count: int = STDERR_LINES, width: int = 300) -> str:
    """ffmpeg's last ``count`` lines, each cut at ``width`` characters, for a job's message."""
    return "\n".join(line[:width] for line in list(lines)[-count:])


def truncation(expected: float, durations: Mapping[str, float], stderr: Sequence[str] = ()) -> GridnodeError | None:
    """``input_truncated`` when the shortest output (``durations``: name -> seconds) is shorter
    than ``expected`` by more than ``tolerance(expected)``, else None."""
    if not durations:
        return None
    name, got = min(durations.items(), key=lambda item: item[1])
    if expected - got <= tolerance(expected):
        return None
    message = (f"only {got:.1f} s of the input's {expected:.1f} s could be read ({100 * got / expected:.0f} %; "
               f"{name} is that long): the file is cut short or damaged, as an interrupted upload or copy "
               "leaves it; upload the whole file again")
    excerpt = stderr_excerpt(stderr)
    if excerpt:
        message += "\nffmpeg said:\n" + excerpt
    return GridnodeError(message, code="input_truncated", status=422)


def unreadable_output(name: str, why: str) -> GridnodeError:
    return GridnodeError(f"ffmpeg wrote {name}, but it cannot be read back ({why})", code="ffmpeg_failed",
                         status=422)


def output_duration(output: ProducedFile, kind: str) -> float:
    """Seconds ``output`` (a plain file: ``ffmpeg.collect_outputs``) lasts: an mp4's or webm's
    header (``headers``), or an HLS media playlist's segments. ``ffmpeg_failed`` when unreadable."""
    # O_NOFOLLOW: where the file lies was checked; it is read, never followed.
    fd = os.open(output.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if kind in ("hls", "dash"):
            data = f.read(MAX_PLAYLIST + 1)
            text = data.decode("utf-8", "replace")
            seconds = (hls_duration if kind == "hls" else dash_duration)(text) if len(data) <= MAX_PLAYLIST else None
        else:
            read = {"mp4": mp4_duration, "m4a": mp4_duration, "opus": opus_duration}.get(kind, webm_duration)
            seconds = read(f, size)  # mkv: as webm
    if seconds is None:
        raise unreadable_output(output.name, "no duration in it")
    return seconds


def measure_outputs(found: Sequence[ProducedFile], probe: ProbeResult, presets: Sequence[Preset],
                    stderr: Sequence[str] = ()) -> list[ProducedFile]:
    """``found`` (from ``ffmpeg.collect_outputs``) with each preset's first file carrying how
    long the preset's output lasts (mp4, webm: the file; HLS: its shortest rung's playlist;
    posters: None). Raises ``input_truncated`` (``truncation``, with ``stderr``: ffmpeg's last
    lines) or ``ffmpeg_failed`` (an output without a readable duration)."""
    by_preset: dict[str, float] = {}
    for preset in dict.fromkeys(presets):
        mine = [f for f in found if f.preset == preset.name]
        if preset.container in ("mp4", "webm", "mkv", "m4a", "opus"):
            measured = mine[:1]
        elif preset.container == "hls":
            # Every rung must be whole; the preset is as long as its shortest.
            measured = [f for f in mine if f.name.endswith("/index.m3u8")]
        elif preset.container == "cmaf":
            # The video rungs' playlists: the audio's ends short on purpose (``cmaf.audio_chain``).
            rungs = {f"{preset.name}/media_{n}.m3u8" for n in range(len(hls_rungs(probe, preset.ladder)))}
            measured = [f for f in mine if f.name in rungs]
        elif preset.container == "dash":
            measured = mine[:1]  # the manifest: no playlist per rung
        else:
            continue
        kind = "hls" if preset.container == "cmaf" else preset.container
        lengths = {output.name: output_duration(output, kind) for output in measured}
        if measured:
            by_preset[preset.name] = min(lengths.values())
        # A clip is held to its own length, the rest to the input's.
        error = truncation(preset.expected_duration(probe) or 0.0, lengths, stderr)
        if error is not None:
            raise error
    first = {f.preset: f for f in reversed(found)}  # each preset's first file: what the job lists
    return [replace(f, duration=by_preset[f.preset]) if first[f.preset] is f and f.preset in by_preset else f
            for f in found]
