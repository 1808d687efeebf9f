"""`UploadSweep`: the service that sweeps expired and orphaned uploads from the store."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from gridnode.uploads.store import UploadStore


class UploadSweep(Service):
    """Sweeps expired and orphaned uploads from the store every ``interval`` seconds (by default a
    quarter of the expiry, at most an hour) while it runs, on the store's clock."""

    def __init__(self, uploads: UploadStore, interval: float | None = None) -> None:
        self.uploads = uploads
        self.interval = interval or min(3600.0, uploads.expiry / 4)
        self._loop: LoopingCall | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._loop = LoopingCall(self.uploads.sweep)
        self._loop.clock = self.uploads.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted's name
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()
