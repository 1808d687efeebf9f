"""
Following a job another node runs (or adopted) through its record in the store: the
subscriber's callback is called on every change it sees, polling at the subscriber's own pace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from gridnode.errors import GridnodeError
from gridnode.jobs import Job
from gridnode.timers import JitteredLoop


def follow_record(get: Callable[[str], Deferred[Job]], every: Callable[[Callable[[], object]], JitteredLoop],
                  job_id: str, callback: Callable[[Job], None]) -> Callable[[], None]:
    """Read ``job_id`` with ``get`` on the loop ``every`` makes, call ``callback`` with each new
    version, stop once the job is final; returns the unsubscribe."""
    last: list[bytes] = []

    @inlineCallbacks
    def check() -> Any:
        try:
            job = yield get(job_id)
        except GridnodeError:
            return  # unreachable for now: try again at the next poll
        data = job.dumps()
        if not last or data != last[0]:
            last[:] = [data]
            callback(job)
        if job.final and loop.running:
            loop.stop()

    loop = every(check)

    def unsubscribe() -> None:
        if loop.running:
            loop.stop()

    return unsubscribe
