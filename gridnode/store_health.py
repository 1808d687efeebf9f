"""
What the node's own store calls say about the store: unreachable (the bucket missing, refused
credentials, a server that does not answer) from the first call that fails with
``storage_unavailable`` until one succeeds again. Every call counts, not only the registry's
heartbeat: a node that is transcoding learns of an outage with its next record write. No I/O of
its own; `watch` wraps an `ObjectStore`'s runner (``ObjectStore.wrapped``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

from gridnode.errors import GridnodeError


class StoreHealth:
    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        #: why the store cannot be used now (None: its last call was answered)
        self.error: str | None = None
        #: since when (the first failing call of this outage)
        self.since: float | None = None

    def answered(self) -> None:
        """A call was answered (also "no such key", "changed meanwhile": the store is there)."""
        self.error, self.since = None, None

    def failed(self, error: GridnodeError) -> None:
        if error.code != "storage_unavailable":
            self.answered()
            return
        if self.since is None:
            self.since = self.now()
        self.error = error.message

    def watch(self, run: Callable[..., Any]) -> Callable[..., Any]:
        """``run`` (an ObjectStore's), each call's outcome noted."""

        def watched(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            def done(result: Any) -> Any:
                if isinstance(result, Failure) and isinstance(result.value, GridnodeError):
                    self.failed(result.value)
                elif not isinstance(result, Failure):
                    self.answered()
                return result

            return run(fn, *args, **kwargs).addBoth(done)

        return watched
