"""
The frame grid of a video output: the constant rate it is made at, and a chunk of a split job
as a range of that grid's slots. Plain data, no I/O.

Every video output goes through ffmpeg's fps filter (``rate_filter``), made in the filter graph
rather than by ffmpeg's own frame-rate conversion after it, so which source frame fills each
slot of the output depends on timestamps alone: a chunk decoded from a keyframe before its cut
fills its slots as the whole encode does (``chunks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from gridnode.media.probe import ProbeResult


def _num(x: float) -> str:
    """A number for a filter argument: fixed point, no exponent, millisecond precision."""
    r = round(x, 3)
    return f"{int(r)}.0" if r == int(r) else f"{r:.3f}".rstrip("0")


def rate_filter(probe: ProbeResult, cap: float = 0.0) -> list[str]:
    """The fps filter an output's video goes through: its ``cap`` (an output's ``fps``) where
    the source is faster, else the source's nominal rate (none when unknown)."""
    rate = probe.frame_rate
    if cap and rate is not None and rate > cap + 0.01:
        return [f"fps={_num(cap)}"]
    if probe.rate is None:
        return []
    if cap and probe.rate > cap + 0.01:
        return [f"fps={_num(cap)}"]
    return [f"fps={probe.rate.numerator}/{probe.rate.denominator}"]


@dataclass(frozen=True)
class Cut:
    """One chunk of a split job as its argv sees it (``chunks.py`` plans them): decoded from
    ``seek`` s (from the keyframe at or before it, every frame kept, timestamps put back as the
    whole's), the output frames ``first`` to ``end`` (exclusive; None: to the input's end) of
    the frame grid, from 0; ``start`` and ``stop`` its time range, seconds (None: the last
    chunk), for the images of its frames."""

    seek: int
    first: int
    end: int | None
    start: float = 0.0
    stop: float | None = None

    def holds(self, seconds: float) -> bool:
        return self.start <= seconds and (self.stop is None or seconds < self.stop)

    def trim(self) -> str:
        """The chunk's slots of the fps filter's grid (its time base: one tick a slot)."""
        end = "" if self.end is None else f":end_pts={self.end}"
        return f"trim=start_pts={self.first}{end},setpts=PTS-STARTPTS"
