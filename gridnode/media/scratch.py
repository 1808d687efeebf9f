"""
Scratch space: how much a job's outputs will take, whether the scratch filesystem has it,
and what a run that ran out of it needs next time. Plain functions and one object with
the free space injected; no I/O but ``free_bytes``.

- ``output_estimate``: the bytes a job's outputs take, from the probe: its duration times
  each preset's rate (HLS: its rungs' caps, +10 % for MPEG-TS; the CRF presets have no cap,
  so a nominal bits-per-pixel at 30 fps of their target size; a poster a byte a pixel), with
  25 % margin, at most ``presets.job_output_limit`` (more could never be stored). Not a
  fraction of the input's size: a 4 GB ProRes input makes a 100 MB mp4, and a 2 MB phone
  clip is no smaller at 720p than a 200 MB one. An estimate, never a bound: a noisy input
  runs over it, and the run-time check (``ran_out``) catches what it misses.
- ``ScratchSpace.fits``: the pool starts a job only when its estimate fits in the free
  space, less what the jobs already converting were promised.
- ``ran_out``: did a failed ffmpeg run out of space? Its stderr says ``No space left on
  device``, or the filesystem has less than ``FULL_BELOW`` free as it exits.
- ``learned_needs``: after such a run, the bytes the job needs: what it wrote, scaled to
  the whole by how far it got (+25 %; doubled when it got nowhere), so it waits for that much.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

from gridnode.errors import GridnodeError
from gridnode.media.interface import SCRATCH_FULL, SCRATCH_WAIT
from gridnode.media.presets import AUDIO_ONLY, LADDERS, Preset, hls_rungs, job_output_limit, target_size
from gridnode.media.probe import ProbeResult

#: frame rate assumed for a CRF preset's rate (the probe does not report one)
NOMINAL_FPS = 30
#: bits per pixel per frame a CRF encode of ordinary footage stays under, by video codec
BITS_PER_PIXEL = {"h264": 0.15, "hevc": 0.10, "av1": 0.10, "vp9": 0.10}
#: MPEG-TS packet and PES headers over an HLS rung's stream rates
TS_OVERHEAD = 1.10
MARGIN = 1.25
#: ffmpeg's own words for ENOSPC (strerror), in every muxer's error line
ENOSPC_TEXT = "No space left on device"
#: a filesystem with less free than this when a failed ffmpeg exits was full
FULL_BELOW = 1024 * 1024
#: below this progress, what was written says little about the whole
MIN_PROGRESS = 0.05
#: the longest a job waits for scratch space before it goes to the pool: the queue behind it
#: waits too, so not its conversion's own limit (up to 40 h for a 4 h input)
MAX_WAIT = 600.0


def preset_bytes(probe: ProbeResult, preset: Preset) -> float:
    """What one preset's outputs of ``probe`` take, without the margin."""
    seconds = max(preset.expected_duration(probe) or 0.0, 0.0)
    audio = probe.has_audio and bool(preset.audio)
    if preset.container == "hls":
        rate = sum(r.video_kbps + (r.audio_kbps if audio else 0) for r, _size in hls_rungs(probe, preset.ladder))
        return seconds * rate * 1000 / 8 * TS_OVERHEAD + 64 * 1024  # + playlists
    if preset.container in LADDERS:
        rate = sum(r.video_kbps for r, _size in hls_rungs(probe, preset.ladder)) + (preset.audio_kbps if audio else 0)
        return seconds * rate * 1000 / 8 + 64 * 1024  # + manifests and init segments
    if preset.container == "storyboard":
        return 2 * 1024 * 1024.0
    if preset.container in AUDIO_ONLY:
        return seconds * preset.audio_kbps * 1000 / 8 + 64 * 1024  # at most 3 sheets of 100 small tiles
    w, h = target_size(probe, preset.short_side)
    if preset.container == "jpeg":
        return float(w * h)
    video = w * h * NOMINAL_FPS * BITS_PER_PIXEL[preset.video]
    if preset.max_kbps:
        video = min(video, preset.max_kbps * 1000)
    return seconds * (video + (preset.audio_kbps * 1000 if audio else 0)) / 8 + 64 * 1024  # + headers


def output_estimate(probe: ProbeResult, presets: Iterable[Preset], per_output: int | None = None) -> int:
    """The scratch bytes a job's outputs are expected to take (module docstring)."""
    chosen = list(dict.fromkeys(presets))
    total = MARGIN * sum(preset_bytes(probe, p) for p in chosen)
    return min(int(total) + 1, job_output_limit(probe, chosen, per_output))


def learned_needs(needs: int, written: int, progress: float, limit: int) -> int:
    """The bytes a job needs after a run that ran out having written ``written`` bytes at
    ``progress`` (0..1): more than it wrote, and never less than it was thought to need;
    at most ``limit`` (its outputs' limit together)."""
    if progress >= MIN_PROGRESS:
        guess = int(written / progress * MARGIN)
    else:
        guess = 2 * max(needs, written)
    return min(limit, max(needs, guess, written + FULL_BELOW))


def ran_out(stderr: Sequence[str], free: int | None) -> bool:
    """Did a failed ffmpeg run out of scratch space? ``stderr``: its last lines; ``free``:
    the bytes free on the scratch filesystem as it exited (None: unknown)."""
    return (free is not None and free < FULL_BELOW) or any(ENOSPC_TEXT in line for line in stderr)


def wait_limit(max_time: float) -> float:
    """How long a job whose conversion may take ``max_time`` seconds waits for scratch space."""
    return min(max_time, MAX_WAIT)


def scratch_full(needs: int) -> GridnodeError:
    """A run ran out of scratch space; the job waits for ``needs`` bytes and runs again."""
    return GridnodeError(f"the scratch folder ran out of space; the job waits for {needs} bytes free and runs "
                         "again", code=SCRATCH_FULL, status=507)


def scratch_wait(needs: int, waited: float) -> GridnodeError:
    """A job waited its longest for ``needs`` bytes of scratch space: another node should have it."""
    return GridnodeError(f"waited {waited:.0f} s for {needs} bytes of scratch space; handed to the pool",
                         code=SCRATCH_WAIT, status=507)


def free_bytes(folder: str) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


class ScratchSpace:
    """The scratch filesystem's free space (``free``, injected: bytes free now)."""

    def __init__(self, free: Callable[[], int]) -> None:
        self.free = free

    def free_now(self) -> int | None:
        """The bytes free, or None where the filesystem cannot be asked."""
        try:
            return self.free()
        except OSError:
            return None

    def fits(self, needs: int, promised: int = 0) -> bool:
        """Is there room for ``needs`` more bytes, beside ``promised`` bytes the jobs already
        converting may still write? (What they wrote is counted twice: in use, and promised.
        That errs on the side of waiting, and only while they convert.) A filesystem that cannot
        be asked says yes: the run will tell."""
        free = self.free_now()
        return needs <= 0 or free is None or free - promised >= needs
