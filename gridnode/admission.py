"""
Admission: whether a node takes a new upload, decided before any body byte is read, and the
spool file (or the slot) it gets when it does.

A node refuses while it drains, when it is full for the job's priority (``503 busy``: the rule
is gridnode/priority.py's ``admits``: jobs of that priority or higher, and the uploads in
flight, under ``workers + queue``; every job under ``workers + 2 x queue``), over the size
limits (413), and with too little disk (507). An upload in flight holds a slot until its body
is over or its job is active, so a burst of uploads cannot overrun the node before any is a job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gridnode import keys, priority
from gridnode.config import NodeConfig
from gridnode.errors import Busy, GridnodeError
from gridnode.metrics import Metrics
from gridnode.spool import FreeSpace, Spool, SpoolFile
from gridnode.store.base import ObjectStore
from gridnode.store.streamed import StreamedPut


class Admission:
    """The node's door: ``held()`` is its jobs by priority now, ``draining()`` whether it drains."""

    def __init__(self, config: NodeConfig, store: ObjectStore, spool: Spool, space: FreeSpace, metrics: Metrics,
                 now: Callable[[], float], held: Callable[[], Mapping[str, int]],
                 draining: Callable[[], bool]) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.space = space
        self.metrics = metrics
        self.now = now
        self.held = held
        self.draining = draining
        #: names of the uploads in flight (their bodies not over, or their jobs not active yet)
        self.uploading: set[str] = set()

    def admit(self, length: int | None, limit: int | None = None,
              level: str = priority.DEFAULT) -> SpoolFile | Deferred[SpoolFile]:
        """A spool file for a new upload of ``length`` bytes (None: not declared) of priority
        ``level``, or the coded reason it is refused now. ``limit`` is the caller's own cap on the
        bytes received (an upload token's ``max_size``), under ``--max-upload``; both hold on a
        chunked body too. On a store that takes parts the body goes there as it arrives: a Deferred
        then, once its multipart upload is begun (``503 storage_unavailable`` with nothing read,
        when the store cannot be reached)."""
        try:
            spool = self._admit(length, limit, level)
        except GridnodeError as e:
            self.metrics.upload_rejections.labels(e.code).inc()
            raise
        put = StreamedPut(self.store, keys.input_source(os.path.basename(spool.path)), spool.path)
        spool.follower = put
        if not put.streams(length):
            return spool

        def refused(failure: Failure) -> Failure:
            spool.discard()
            self.metrics.upload_rejections.labels(getattr(failure.value, "code", "error")).inc()
            return failure

        return put.begin().addCallbacks(lambda _: spool, refused)

    def hold(self, name: str, length: int | None, limit: int | None = None,
             level: str = priority.DEFAULT) -> Callable[[], None]:
        """The same admission for a body that goes elsewhere (a tus chunk, a bucket input): the
        coded refusal, or a slot held for ``name`` until the function returned is called."""
        try:
            self.check(length, limit, level)
        except GridnodeError as e:
            self.metrics.upload_rejections.labels(e.code).inc()
            raise
        return self.slot(name)

    def check(self, length: int | None, limit: int | None = None, level: str = priority.DEFAULT) -> None:
        """Draining or full for ``level`` (503 busy), over the limit (413), too little disk (507);
        nothing is held."""
        if self.draining():
            raise Busy("this node is draining; upload to another node of the pool", retry_after=30)
        held = self.held()
        if not priority.admits(level, held, len(self.uploading), self.config.workers, self.config.queue):
            raise Busy(f"this node is full for {level}-priority jobs ({sum(held.values())} jobs, "
                       f"{len(self.uploading)} uploads); try another node or retry later")
        limit = self.limit(limit)
        if length is not None and length > limit:
            raise GridnodeError(f"the upload is {length} bytes; at most {limit} are allowed here (this node's "
                                "--max-upload, or your upload token's max_size)", code="too_large", status=413)
        self.space.check(length)

    def limit(self, limit: int | None = None) -> int:
        """The most bytes a body may bring: ``--max-upload``, or less where the caller says so."""
        node = self.config.max_upload_bytes
        return node if limit is None else min(node, max(limit, 0))

    def _admit(self, length: int | None, limit: int | None, level: str) -> SpoolFile:
        self.check(length, limit, level)
        name = keys.new_id(self.now())
        spool = self.spool.new(name, limit=self.limit(limit), meter=self.space.meter())
        if length:
            try:
                spool.reserve(length)  # a race with other uploads for the last free space ends here
            except GridnodeError:
                spool.discard()
                raise
        spool.on_release = self.slot(name)
        return spool

    def slot(self, name: str) -> Callable[[], None]:
        """An upload in flight holds a slot until its body is over (or its job is active)."""
        self.uploading.add(name)
        return lambda: self.uploading.discard(name)


def by_priority(jobs: Any) -> dict[str, int]:
    """Jobs (anything with a ``priority``) counted by priority."""
    out = dict.fromkeys(priority.PRIORITIES, 0)
    for job in jobs:
        out[job.priority] = out.get(job.priority, 0) + 1
    return out
