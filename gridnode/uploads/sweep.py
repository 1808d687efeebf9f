"""`UploadSweep`: the service that sweeps expired and orphaned uploads from the store."""

from __future__ import annotations

import random

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from gridnode.timers import JitteredLoop
from gridnode.uploads.store import UploadStore


class UploadSweep(Service):
    """Sweeps expired and orphaned uploads from the store every ``interval`` seconds (by default a
    quarter of the expiry, at most an hour; each wait jittered: gridnode/timers.py) while it runs,
    on the store's clock."""

    def __init__(self, uploads: UploadStore, interval: float | None = None,
                 rng: random.Random | None = None) -> None:
        self.uploads = uploads
        self.interval = interval or min(3600.0, uploads.expiry / 4)
        self.rng = rng or random.Random()
        self._loop: JitteredLoop | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._loop = JitteredLoop(self.uploads.clock, self.uploads.sweep, self.interval, self.rng)
        self._loop.start(now=False)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted's name
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()
