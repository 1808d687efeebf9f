"""
The node registry in the store (Lei Zhu's "special bucket").

``registry/<env>/<pool>/nodes/<node-id>.json`` holds one record per live
node; ``registry/<env>/<pool>/nodes.json`` is the live list browsers and the
command line read. A node:

- registers at start with a conditional write: a record from an earlier life
  of the same id is read first and replaced only by its ETag, with a higher
  incarnation;
- refreshes its record every heartbeat with its load; if the record vanished
  (a peer declared it dead) it registers again;
- reads everyone's records every heartbeat: one LIST, then a GET only for the
  records it needs in full. The writer needs them all (nodes.json carries
  every load); the others only those of nodes their membership does not hold
  alive (``wanted``), at most `READ_LIMIT` a heartbeat, and take a changed ETag
  as that node's heartbeat, seen then. N nodes GETting N records each
  heartbeat would be N² requests; this is N + the few that matter;
- starts without reading every record: in a pool of over `SMALL_POOL` nodes
  it GETs `SEEDS` records of the listing's first page for ``on_seed`` (the
  membership joins through them; its join sync brings every member), and is
  no writer until it has read the whole listing;
- deletes its record on a clean stop, and a dead peer's record when the
  membership confirms the death (``delete_dead``), only if it still holds the
  dead life.

``nodes.json`` is rewritten by one node at a time, the live node with the
lowest id, and only when its content changed: after each heartbeat's read, and
soon after the membership's view changes (``follow``, a look every ``settle``
seconds, itself the debounce): a member it holds dead (even before the death is
confirmed: the list only guides clients, who check a node's /health anyway) or
left is left out, and a member it holds alive but the list lacks (a node that
just started) is read in, so a node appears within seconds of joining and
disappears within seconds of dying, without waiting for a heartbeat. Records
are read by `records.RecordReader`, which validates every one (size, schema)
and skips malformed ones (logged here); stale ones are left out of the list.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import DeferredLock, inlineCallbacks, succeed
from twisted.logger import Logger

from gridnode import keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.registry.records import MAX_RECORD_BYTES, NodeRecord, RecordReader, live_list, nodes_json, parse_record
from gridnode.store.base import ObjectStore
from gridnode.store.rate import EVENT, KEEP
from gridnode.timers import SPREAD, JitteredLoop, jittered

#: records a node that is not the writer GETs at most per read (chosen at random): a node whose
#: membership does not know the pool yet never reads every record at once
READ_LIMIT = 32
#: a pool of at most this many records is read whole even by a starting node
SMALL_POOL = 32
#: records a starting node reads in a larger pool: its membership joins through them
SEEDS = 3


def first_incarnation(now: float) -> int:
    """A new life's incarnation: the clock in milliseconds. A node that left cleanly deleted its
    record, so only the clock says its next life is later, and a restart can take well under a
    second (in seconds, the new life could equal the one its peers hold ``left``). A life refutes
    far fewer than a thousand times a second, so it never climbs past the next life's start."""
    return int(now * 1000)


class Registry(Service):
    """One node's presence in the registry, driven by an injected clock: registered and refreshed
    every heartbeat while the service runs, deleted when it stops."""

    _log = Logger()

    def __init__(
        self, clock: Any, store: ObjectStore, *, env: str, pool: str, node_id: str, http_url: str,
        peer_addr: str, heartbeat: float = 30.0, stale: float = 300.0,
        load: Callable[[], dict[str, float]] = dict, now: Callable[[], float] = time.time,
        incarnation: Callable[[], int] | None = None, settle: float = 1.0,
        rng: random.Random | None = None, spread: float = SPREAD,
    ) -> None:
        self.clock = clock
        self.store = store
        #: our own record's writes: a heartbeat keeps this node listed, so it waits for no scan
        self.keeping = store.in_lane(KEEP)
        #: acting on a member's death (its record's delete): the store's EVENT lane
        self.acting = store.in_lane(EVENT)
        #: heartbeats (and the looks at the membership) are `spread` apart from their period, so
        #: nodes started together do not write together for ever
        self.rng = rng or random.Random()
        self.spread = spread
        self.env = env
        self.pool = pool
        self.node_id = node_id
        self.key = keys.node_record(env, pool, node_id)
        self.prefix = keys.node_records_prefix(env, pool)
        self.reader = RecordReader(self.prefix)
        self.list_key = keys.nodes_list(env, pool)
        self.heartbeat = heartbeat
        self.stale = stale
        self.load = load
        self.now = now
        self.record = NodeRecord(node_id, http_url, peer_addr, now(), 0, 0.0)
        #: the membership's incarnation, when there is one: the record carries the same number
        self.incarnation = incarnation
        self.etag: str | None = None
        self.registered = False
        self.last_error: str | None = None
        self.live: list[NodeRecord] = []
        #: called with (records) after each read of the registry
        self.on_read: list[Callable[[list[NodeRecord]], None]] = []
        #: called with a few records (`SEEDS`) by a node starting in a large pool, instead of a read
        self.on_seed: list[Callable[[list[NodeRecord]], None]] = []
        #: whether the whole listing was read once (until then this node is no writer)
        self.read_once = False
        #: records in the last listing (a starting node's first page included); None: none yet
        self.listed_count: int | None = None
        #: id -> the highest incarnation the membership saw leave or confirmed dead
        self.gone: dict[str, int] = {}
        #: whether a changed record must be read in full (None: always); the writer reads them all
        self.wanted: Callable[[str], bool] | None = None
        self._published: bytes | None = None
        #: whether we were the writer when we last asked (`takes_writing`)
        self._writing = False
        self._publishing = DeferredLock()
        self._next: Any = None
        self._backoff = 1.0
        #: the membership's view: member id -> "alive", "suspect", "dead" or "left" (None: no membership)
        self.held: Callable[[], Mapping[str, str]] | None = None
        #: seconds between looks at the membership's view (`follow`)
        self.settle = settle
        self._follower: JitteredLoop | None = None
        self._following = False
        #: members held alive but not listed, last looked for in the store; when to look again
        self._sought: frozenset[str] = frozenset()
        self._seek_again = 0.0
        self._seek_delay = settle
        #: a publish by `follow` failed: leave it to the heartbeats until one succeeds
        self._follow_failed = False

    # -- life cycle

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        """Register now and refresh every heartbeat; failures are retried with backoff."""
        super().startService()
        self._tick()
        if self.held is not None:
            self._follower = JitteredLoop(self.clock, self.follow, self.settle, self.rng, self.spread)
            self._follower.start(now=False).addErrback(
                lambda f: self._log.failure("following the membership stopped", f))

    def _tick(self) -> None:
        self._next = None
        d = self.beat()
        d.addCallback(self._schedule)

    def _schedule(self, ok: bool) -> None:
        """One chain of beats: the next after a heartbeat, or sooner with backoff after a failure."""
        if not self.running:
            return
        delay = self.heartbeat
        if not ok:
            delay = min(self._backoff, self.heartbeat)
            self._backoff = min(self._backoff * 2, max(self.heartbeat, 1.0))
        self._next = self.clock.callLater(jittered(delay, self.rng, self.spread), self._tick)

    @inlineCallbacks
    def stopService(self) -> Any:  # noqa: N802 - Twisted's name
        """Stop the heartbeat and delete our record (only the version we wrote)."""
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._follower is not None and self._follower.running:
            self._follower.stop()
        if not self.registered or self.etag is None:
            return
        writer = self.is_writer()
        try:
            yield self.store.delete(self.key, if_match=self.etag)
        except GridnodeError as e:
            self._log.warn("could not delete registry record {key}: {reason}", key=self.key, reason=e.message)
            return
        self.registered = False
        self._log.info("deleted registry record {key}", key=self.key)
        self.live = [r for r in self.live if r.id != self.node_id]
        if not writer:
            return
        try:
            # our view is up to a heartbeat old: a node that registered since must not be left
            # out of the last list we write
            records = yield self.read(True)
            self.live = [r for r in self._live_of(records) if r.id != self.node_id]
            yield self.publish()
        except GridnodeError as e:
            self._log.warn("could not publish {key} on leaving: {reason}; the next writer will",
                           key=self.list_key, reason=e.message)

    @inlineCallbacks
    def beat(self) -> Any:
        """One heartbeat: write our record, read everyone's, maybe publish nodes.json.
        Fires True, or False after a failure (logged, never raised)."""
        try:
            yield self.write()
            if not self.read_once and self.held is not None and self._knows_no_one():
                listing = yield self.seed()
                if listing is None:
                    return self._beat_done()  # seeded: the next heartbeat reads
                everything, records = True, (yield self.read(True, listing))  # a small pool: whole
            else:
                everything = self.is_writer() or (self.held is None and not self.read_once)
                records = yield self.read(everything)
            if not everything and self._writes(self._live_of(records)):
                records = yield self.read(True)  # we just became the writer: publish exact loads
            # A record deleted since it was forgotten needs no memory; one written again by a
            # later life (higher incarnation) is live again.
            self.gone = {i: n for i, n in self.gone.items() if any(r.id == i and r.incarnation <= n for r in records)}
            self.live = self._live_of(records)
            for callback in self.on_read:
                callback(self.live)
            if self.takes_writing():
                # written every heartbeat (its loads changed anyway): another writer may have written
                # since, while we stalled or both of us held the other dead
                self._published = None
                yield self.publish()
            return self._beat_done()
        except GridnodeError as e:
            self.last_error = e.message
            self._log.warn("registry unreachable ({code}): {reason}; retrying in {delay}s",
                           code=e.code, reason=e.message, delay=min(self._backoff, self.heartbeat))
        except Exception:  # noqa: BLE001 - the heartbeat must never die
            self.last_error = "internal error"
            self._log.failure("registry heartbeat failed")
        return False

    def _beat_done(self) -> bool:
        self._backoff = 1.0
        self.last_error = None
        self._follow_failed = False
        return True

    def _knows_no_one(self) -> bool:
        """Whether our membership holds no other member alive (a node starting)."""
        held = self.held() if self.held is not None else {}
        return not any(state in ("alive", "suspect") for m, state in held.items() if m != self.node_id)

    # -- our record

    @inlineCallbacks
    def write(self) -> Any:
        """Write our record: by ETag while registered, else (re-)register."""
        self.record.heartbeat = self.now()
        self.record.load = self.load()
        if self.incarnation is not None:
            self.record.incarnation = max(self.record.incarnation, self.incarnation())
        if self.registered and self.etag is not None:
            try:
                info = yield self.keeping.put_bytes(self.key, self.record.dumps(), if_match=self.etag,
                                                    content_type="application/json")
                self.etag = info.etag
                return
            except (NotFound, PreconditionFailed) as e:
                self._log.warn("our registry record changed under us ({code}); registering again", code=e.code)
                self.registered = False
        yield self.register()

    @inlineCallbacks
    def register(self) -> Any:
        """Write our record conditionally: if there is none (a new node: one request), else
        replacing an earlier life's record by its ETag, after reading it."""
        etag: str | None = None
        previous: NodeRecord | None = None
        for _ in range(5):
            # Higher than any earlier life: peers may still remember that one as dead.
            # The membership's own number when there is one: the two must agree, or a peer that saw
            # this life leave at the machine's number would take the record for a later life.
            life = self.incarnation() if self.incarnation is not None else first_incarnation(self.now())
            self.record.incarnation = max(self.record.incarnation,
                                          (previous.incarnation + 1) if previous else 0, life)
            try:
                if etag is None:
                    info = yield self.keeping.put_bytes(self.key, self.record.dumps(), if_none_match="*",
                                                        content_type="application/json")
                else:
                    info = yield self.keeping.put_bytes(self.key, self.record.dumps(), if_match=etag,
                                                        content_type="application/json")
            except (PreconditionFailed, NotFound):
                # a record is there (an earlier life's), or it changed: read it, replace it by its ETag
                try:
                    data, got = yield self.keeping.get_bytes(self.key, max_size=MAX_RECORD_BYTES)
                except NotFound:
                    etag, previous = None, None
                    continue
                etag = got.etag
                try:
                    previous = parse_record(data, self.node_id)
                except GridnodeError:
                    previous = None
                continue
            self.etag = info.etag
            self.registered = True
            self._log.info("registered as {node} incarnation {incarnation} in {key}", node=self.node_id,
                           incarnation=self.record.incarnation, key=self.key)
            return
        raise GridnodeError(f"could not register {self.key}: it keeps changing", code="registry_conflict")

    # -- everyone's records

    @inlineCallbacks
    def seed(self) -> Any:
        """A starting node's first look: one page of the listing. Fires with it when it is a small
        pool's whole listing (read it all); else GETs `SEEDS` records at random, hands the fresh
        ones to ``on_seed`` and fires None."""
        page = yield self.store.list(self.prefix)
        if page.next_after is None and len(page.items) <= SMALL_POOL:
            return page.items
        self.listed_count = max(self.listed_count or 0, len(page.items))
        others = [i for i in page.items if i.key != self.key]
        read = RecordReader(self.prefix).begin(self.rng.sample(others, min(SEEDS, len(others))), self.now())
        yield self._fetch(read)
        seeds = live_list(read.done(), self.now(), self.stale)
        self._log.info("starting in a pool of {count}+ nodes: joining through {seeds}", count=len(page.items),
                       seeds=", ".join(r.id for r in seeds) or "none (trying again at the next heartbeat)")
        for callback in self.on_seed:
            callback(seeds)
        return None

    @inlineCallbacks
    def read(self, everything: bool = True, listing: Any = None) -> Any:
        """Every valid record under the prefix; malformed ones are logged and skipped. A record is
        fetched when it is needed in full (``everything``, or ``wanted``: at most `READ_LIMIT`) and
        new or changed. ``listing``: the prefix's listing, when the caller has it."""
        if listing is None:
            listing = yield self.store.list_all(self.prefix)
        read = self.reader.begin(listing, self.now(), None if everything else self.wanted,
                                 limit=None if everything else READ_LIMIT, rng=self.rng)
        yield self._fetch(read)
        records = read.done()
        self.read_once = True
        self.listed_count = len(records)
        return records

    @inlineCallbacks
    def _fetch(self, read: Any) -> Any:
        """GET what ``read`` asks for, one after another; skipped records are logged."""
        try:
            for key in read.fetch:
                try:
                    data, info = yield self.store.get_bytes(key, max_size=MAX_RECORD_BYTES)
                except GridnodeError as e:
                    read.failed(key, e)
                else:
                    read.got(key, data, info.etag)
        finally:
            for key, reason in read.skipped:
                self._log.warn("ignoring registry record {key}: {reason}", key=key, reason=reason)

    def _live_of(self, records: list[NodeRecord]) -> list[NodeRecord]:
        return [r for r in live_list(records, self.now(), self.stale) if not self._forgotten(r)]

    @inlineCallbacks
    def delete_dead(self, member: str, incarnation: int) -> Any:
        """The membership confirmed ``member`` dead at ``incarnation``: delete its record if it
        still holds that life or an earlier one (a conditional delete on the ETag we read), so a
        node that came back keeps its new record. Never fails (logged)."""
        try:
            key = keys.node_record(self.env, self.pool, member)
            data, info = yield self.acting.get_bytes(key, max_size=MAX_RECORD_BYTES)
            record = parse_record(data, member)
            if record.incarnation > incarnation:
                self._log.info("peer {peer} is back with incarnation {incarnation}; record kept",
                               peer=member, incarnation=record.incarnation)
                return
            yield self.acting.delete(key, if_match=info.etag)
            self._log.info("deleted the registry record of dead peer {peer}", peer=member)
        except (NotFound, PreconditionFailed):
            pass  # gone already, or rewritten by the node itself: not ours to delete
        except GridnodeError as e:
            self._log.warn("could not delete the record of {peer}: {reason}", peer=member, reason=e.message)

    def forget(self, node_id: str, incarnation: int) -> Any:
        """The membership saw ``node_id`` leave, or confirmed it dead, at ``incarnation``: drop its
        records up to that incarnation from the live list, and republish now if we are the writer.
        Never fails (a failed publish is logged; the next heartbeat publishes again)."""
        self.gone[node_id] = max(incarnation, self.gone.get(node_id, incarnation))
        live = [r for r in self.live if not self._forgotten(r)]
        changed = len(live) != len(self.live)
        self.live = live
        # the writer as the list stands now: a dead writer's successor publishes
        if not (self.takes_writing() and changed):
            return succeed(None)
        self._log.info("{peer} left or was confirmed dead: publishing the live list now", peer=node_id)
        d = self.publish()
        d.addErrback(lambda f: self._log.warn("could not publish {key}: {reason}", key=self.list_key,
                                              reason=getattr(f.value, "message", str(f.value))))
        return d

    def _forgotten(self, record: NodeRecord) -> bool:
        return record.id in self.gone and record.incarnation <= self.gone[record.id]

    def _held_down(self) -> set[str]:
        """The members our membership holds dead or left (only the list leaves them out: their
        records go when a death is confirmed)."""
        held = self.held() if self.held is not None else {}
        return {m for m, state in held.items() if state in ("dead", "left") and m != self.node_id}

    def listed(self) -> list[NodeRecord]:
        """The live records nodes.json lists: not those of members held dead or left."""
        down = self._held_down()
        return [r for r in self.live if r.id not in down]

    def is_writer(self) -> bool:
        """The listed node with the lowest id writes nodes.json (a node that has not read the whole
        listing yet does not know whether it is)."""
        return self.read_once and self._writes(self.listed())

    def takes_writing(self) -> bool:
        """`is_writer`, noting a takeover: a node that just became the writer publishes its list
        once even if it wrote the same before (another writer may have written since)."""
        writer = self.is_writer()
        if writer and not self._writing:
            self._published = None
        self._writing = writer
        return writer

    def _writes(self, live: list[NodeRecord]) -> bool:
        down = self._held_down()
        ids = [r.id for r in live if r.id not in down] + ([self.node_id] if self.registered else [])
        return bool(ids) and min(ids) == self.node_id

    # -- following the membership

    def follow(self) -> Any:
        """A look at the membership's view (every ``settle`` s): the writer publishes what changed
        (no request when nothing did), and reads the records in when a member it holds alive is
        not listed (a LIST and that record's GET; again after 2, 4, ... s while it is missing)."""
        if not self.registered or self.held is None or self._following or self._follow_failed:
            return succeed(None)
        if not self.takes_writing():
            return succeed(None)
        self._following = True
        listed = {r.id for r in self.live}
        missing = frozenset(m for m, state in self.held().items()
                            if state == "alive" and m != self.node_id and m not in listed)
        if missing and (missing != self._sought or self.now() >= self._seek_again):
            self._seek_delay = 2 * self.settle if missing != self._sought else min(2 * self._seek_delay, self.heartbeat)
            self._sought, self._seek_again = missing, self.now() + self._seek_delay
            self._log.info("{peers} joined: reading the registry for the live list", peers=", ".join(sorted(missing)))
            work = self._read_in()
        else:
            work = self.publish()

        def failed(f: Any) -> None:
            self._follow_failed = True
            self._log.warn("could not publish {key}: {reason}; the next heartbeat will", key=self.list_key,
                           reason=getattr(f.value, "message", str(f.value)))

        def done(_: Any) -> None:
            self._following = False

        return work.addErrback(failed).addBoth(done)

    @inlineCallbacks
    def _read_in(self) -> Any:
        records = yield self.read(True)
        self.live = self._live_of(records)
        for callback in self.on_read:
            callback(self.live)
        if self.is_writer():
            yield self.publish()

    def publish(self) -> Any:
        """Write the live list as it is when our turn comes: one write at a time, so an older list
        never lands over a newer one."""
        return self._publishing.run(self._publish)

    @inlineCallbacks
    def _publish(self) -> Any:
        if any(r.listed_only for r in self.listed()):
            # we became the writer holding records known from the listing alone: read them first
            records = yield self.read(True)
            self.live = self._live_of(records)
        records = self.listed()
        body = nodes_json(records, self.env, self.pool)
        if body == self._published:
            return
        yield self.store.put_bytes(self.list_key, body, content_type="application/json")
        self._published = body
        self._log.info("published {count} live nodes to {key}", count=len(records), key=self.list_key)
