"""
This node's conversion speed, as clients rank it: seconds of input converted
per second of ffmpeg wall time, per worker (the runner's
``gridnode_ffmpeg_speed_ratio`` of each job, smoothed). It goes out in the
node's load (``/health`` and its registry record) as ``speed``, so a client
can tell a busy fast node from an idle slow one (gridnode/client/nodes.py).
"""

from __future__ import annotations

import math

from gridnode.registry.records import MAX_SPEED, MIN_SPEED

#: weight of the newest job: the last ~5 jobs make the figure, so one odd file (a still image,
#: a 4K master) moves it a little and a change of instance type shows within a few jobs
ALPHA = 0.2


class Speed:
    """The smoothed speed; None before the first job (clients then take the other candidate's:
    a default number would either starve a new node or flood it)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def observe(self, ratio: float) -> None:
        """One job's input seconds over its ffmpeg seconds; clamped to what readers take."""
        if not math.isfinite(ratio) or ratio <= 0:
            return
        ratio = min(MAX_SPEED, max(MIN_SPEED, ratio))
        self.value = ratio if self.value is None else self.value + ALPHA * (ratio - self.value)
