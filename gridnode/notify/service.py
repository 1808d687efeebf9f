"""
`Webhooks`: a job's events POSTed to its ``notify`` URLs, at least once, even when the node that
owes them dies.

Each owed delivery of ``job.queued`` and of a job's end (``job.done``, ``job.failed``,
``job.cancelled``) is an entry in the store, ``webhooks/<owner>/<message id>.json``, written
before its first attempt and deleted once a 2xx answers it (or after `RETRY_FOR` of failures).
Its message id is the same on every attempt and on every node (``msg_<job>_<event>_<url index>``),
so a receiver deduplicates on ``webhook-id``. Attempts back off exponentially with jitter
(`retry_delay`); they cost the store nothing, only the entry's write and delete do.

An entry's folder names its owner. When the membership holds a node dead or left (`watch`, then
`adopt`), and every `SCAN_SECONDS` for owners known dead or long unknown (`scan`), a node takes
what the owner owed: it marks the entry with a conditional write (one node wins), writes it under its own name,
deletes the old one and delivers. A node that finds entries under its own name it does not hold
delivers them too (an earlier life's). A job whose owner died between its last record and its
entries is finished by its adopter (`orphan_ended`, gridnode/adoption.py's ``on_ended``).

``job.progress`` is opt-in, at most one every `PROGRESS_SECONDS` per job, retried from memory
only (the next one, or the job's end, says more): no store request.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.logger import Logger

from gridnode import jobs, keys
from gridnode.errors import GridnodeError, NotFound, PreconditionFailed
from gridnode.jobs import Job
from gridnode.metrics import Metrics
from gridnode.notify.signing import Signer
from gridnode.notify.targets import AddressRule, NotifyRefused, Resolve, parse_url
from gridnode.store.base import ObjectStore
from gridnode.timers import JitteredLoop, jittered

EVENTS = {jobs.QUEUED: "job.queued", jobs.DONE: "job.done", jobs.FAILED: "job.failed",
          jobs.CANCELLED: "job.cancelled"}
PROGRESS = "job.progress"
#: the first retry's wait; each next one FACTOR times longer, up to MAX_DELAY (all jittered)
FIRST_DELAY, FACTOR, MAX_DELAY = 2.0, 3.0, 4 * 3600.0
#: failed deliveries are retried until at least this long after the event
RETRY_FOR = 24 * 3600.0
#: seconds between two scans of webhooks/ for what dead owners left
SCAN_SECONDS = 60.0
#: seconds between two looks at the membership's view for members newly dead or gone (no request)
WATCH_SECONDS = 1.0
#: an owner the membership has never heard of is taken for gone once its entry is this old
STRANGER_AGE = 3600.0
#: the least time between two job.progress events of one job
PROGRESS_SECONDS = 5.0
#: an entry larger than this is not read (a job record is at most 256 KiB)
MAX_ENTRY = 512 * 1024


def retry_delay(attempt: int, rng: random.Random) -> float:
    """Seconds before attempt ``attempt + 1``, after ``attempt`` (1, 2, ...) failed."""
    return jittered(min(MAX_DELAY, FIRST_DELAY * FACTOR ** (attempt - 1)), rng)


def payload(job: Job) -> bytes:
    """What a webhook carries: the job's JSON, less its notify URLs (a receiver learns no other's,
    which may hold a secret of its own)."""
    record = job.to_json()
    record.pop("notify", None)
    return json.dumps(record, sort_keys=True).encode()


def message_id(job_id: str, event: str, index: int) -> str:
    return f"msg_{job_id}_{event.split('.', 1)[1]}_{index}"


@dataclass
class Delivery:
    """One event owed to one URL."""

    msg_id: str
    event: str
    url: str
    job: str
    body: bytes
    created: float
    key: str | None = None  # its entry in the store; None: kept in memory only (progress)
    attempt: int = 0
    timer: Any = None

    def entry(self, owner: str) -> bytes:
        return json.dumps({"id": self.msg_id, "event": self.event, "url": self.url, "job": self.job,
                           "created": self.created, "owner": owner, "claimed_by": "",
                           "body": self.body.decode()}, sort_keys=True).encode()

    @classmethod
    def from_entry(cls, data: bytes, key: str) -> Delivery:
        raw = json.loads(data)
        d = cls(str(raw["id"]), str(raw["event"]), str(raw["url"]), str(raw["job"]), str(raw["body"]).encode(),
                float(raw["created"]), key=key)
        keys.check_segment(d.msg_id, "message id")  # it names the entry taken over, and is a header
        if not d.msg_id.startswith("msg_") or (d.event not in EVENTS.values()):
            raise ValueError(f"not a webhook entry: {d.msg_id!r} {d.event!r}")
        return d


def require_webhooks(webhooks: Webhooks | None, urls: list[str]) -> list[str]:
    """``urls``, unless there are some and the node sends no webhooks (400 webhooks_off)."""
    if urls and webhooks is None:
        raise GridnodeError("this node sends no webhooks (it has no --webhook-secret); submit without notify, "
                            "or ask its operator", code="webhooks_off", status=400)
    return urls


def notify_urls(webhooks: Webhooks | None, defaults: tuple[str, ...], notify: list[str] | None) -> Deferred[list[str]]:
    """A new job's notify URLs (none named: the pool's ``--webhook``), once each passed its checks."""
    urls = require_webhooks(webhooks, list(notify or defaults))
    if not urls or webhooks is None:
        return succeed(urls)
    return webhooks.check(urls).addCallback(lambda _: urls)


class Webhooks(Service):
    _log = Logger()

    def __init__(self, reactor: Any, store: ObjectStore, node_id: str, signer: Signer, rule: AddressRule,
                 resolve: Resolve, post: Callable[..., Deferred[int]], *, metrics: Metrics,
                 now: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.node_id = node_id
        self.signer = signer
        self.rule = rule
        self.resolve = resolve
        self.post = post
        self.metrics = metrics
        self.now = now
        self.rng = rng or random.Random()
        #: the membership's view: each member's state ("alive", "suspect", "dead", "left")
        self.members: Callable[[], dict[str, str]] = dict
        self._gone_seen: set[str] = set()
        #: what this node delivers, by message id and URL
        self.pending: dict[tuple[str, str], Delivery] = {}
        self._progress_at: dict[str, float] = {}
        self._progress_seq: dict[str, int] = {}
        self._loops: list[JitteredLoop] = []

    # -- life cycle

    def startService(self) -> None:  # noqa: N802 - Twisted's name
        super().startService()
        self._loops = [JitteredLoop(self.reactor, self.scan, SCAN_SECONDS, self.rng),
                       JitteredLoop(self.reactor, self.watch, WATCH_SECONDS, self.rng)]
        for loop in self._loops:
            loop.start(now=True).addErrback(lambda f: self._log.failure("a webhook loop stopped", f))

    def stopService(self) -> None:  # noqa: N802 - Twisted's name
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for d in self.pending.values():
            if d.timer is not None and d.timer.active():
                d.timer.cancel()

    # -- at submission

    @inlineCallbacks
    def check(self, urls: list[str]) -> Any:
        """Each URL parses and its host resolves to addresses a webhook may go to; else
        `NotifyRefused` (400 notify_refused)."""
        for url in urls:
            target = parse_url(url)
            addresses = yield self.resolve(target.host, target.port)
            self.rule.check(target, addresses)

    # -- events

    def announce(self, job: Job, event: str) -> Deferred[None]:
        """Owe ``event`` of ``job`` to each of its notify URLs: entries stored, then delivered.
        Fires once the entries are written (or could not be: then delivered from memory)."""
        if not job.notify:
            return succeed(None)
        body = payload(job)
        writes = [self._owe(Delivery(message_id(job.id, event, i), event, url, job.id, body, self.now(),
                                     key=keys.webhook_entry(self.node_id, message_id(job.id, event, i))))
                  for i, url in enumerate(job.notify) if (message_id(job.id, event, i), url) not in self.pending]
        return DeferredList(writes, consumeErrors=True).addCallback(lambda _: None)

    def announce_end(self, job: Job) -> Deferred[None]:
        """A final job's event (job.done, job.failed or job.cancelled)."""
        self.forget(job.id)
        event = EVENTS.get(job.state)
        return self.announce(job, event) if job.final and event else succeed(None)

    def orphan_ended(self, job: Job) -> Deferred[None]:
        """The adopter found ``job`` final but still marked: its owner may have stopped between its
        last record and the entries of its end. Owed again unless that owner is alive (then it is
        between the two, and sees to it). A job the adopter quarantined is its own to announce."""
        poison = job.error is not None and job.error.get("code") == "poison"
        if not poison and job.node != self.node_id and self.members().get(job.node) in ("alive", "suspect"):
            return succeed(None)
        return self.announce_end(job)

    def progress(self, job: Job) -> None:
        """A running job moved: a job.progress event, if the job asked for them and the last
        one is `PROGRESS_SECONDS` old."""
        if not job.notify or not job.notify_progress or job.state != jobs.TRANSCODING:
            return
        now = self.now()
        if now - self._progress_at.get(job.id, -PROGRESS_SECONDS) < PROGRESS_SECONDS:
            return
        self._progress_at[job.id] = now
        seq = self._progress_seq[job.id] = self._progress_seq.get(job.id, 0) + 1
        body = payload(job)
        for i, url in enumerate(job.notify):
            # the attempt in the id: a node that adopts the job counts its progress events anew
            d = Delivery(f"msg_{job.id}_progress{job.attempts}-{seq}_{i}", PROGRESS, url, job.id, body, now)
            self.pending[(d.msg_id, d.url)] = d
            self._schedule(d, 0.0)

    def forget(self, job_id: str) -> None:
        """A job ended here: no more progress events of it."""
        self._progress_at.pop(job_id, None)
        self._progress_seq.pop(job_id, None)

    @inlineCallbacks
    def _owe(self, d: Delivery) -> Any:
        self.pending[(d.msg_id, d.url)] = d  # before the write: a scan must not take it for an orphan
        assert d.key is not None
        try:
            yield self.store.put_bytes(d.key, d.entry(self.node_id), content_type="application/json")
        except GridnodeError as e:
            self._log.warn("webhook {id}: its entry could not be stored ({reason}); delivered from memory",
                           id=d.msg_id, reason=e.message)
            d.key = None
        self._schedule(d, 0.0)

    # -- attempts

    def _schedule(self, d: Delivery, delay: float) -> None:
        if self.running or delay == 0.0:
            d.timer = self.reactor.callLater(delay, self._attempt, d)

    @inlineCallbacks
    def _attempt(self, d: Delivery) -> Any:
        d.timer = None
        d.attempt += 1
        result = yield self._send(d)
        self.metrics.webhook_deliveries.labels(d.event, result).inc()
        if result == "delivered":
            self._log.info("webhook {id} ({event}) delivered to {url} (attempt {attempt})", id=d.msg_id,
                           event=d.event, url=d.url, attempt=d.attempt)
            yield self._settle(d)
        elif self.now() - d.created >= RETRY_FOR or d.key is None and d.event == PROGRESS and d.attempt >= 3:
            self.metrics.webhook_deliveries.labels(d.event, "gave_up").inc()
            self._log.warn("webhook {id} ({event}) to {url}: given up after {attempt} attempts ({result})",
                           id=d.msg_id, event=d.event, url=d.url, attempt=d.attempt, result=result)
            yield self._settle(d)
        elif self.running:
            delay = retry_delay(d.attempt, self.rng)
            self._log.info("webhook {id} ({event}) to {url}: {result}; attempt {next} in {delay:.0f}s", id=d.msg_id,
                           event=d.event, url=d.url, result=result, next=d.attempt + 1, delay=delay)
            self._schedule(d, delay)

    @inlineCallbacks
    def _send(self, d: Delivery) -> Any:
        """One attempt: the address checked again, signed, POSTed. The result, a metric label."""
        try:
            target = parse_url(d.url)
            addresses = yield self.resolve(target.host, target.port)
            address = self.rule.check(target, addresses)
        except NotifyRefused as e:
            self._log.warn("webhook {id} to {url} refused: {reason}", id=d.msg_id, url=d.url, reason=e.message)
            return "refused"
        except Exception as e:  # noqa: BLE001 - a resolver that failed otherwise: tried again later
            self._log.warn("webhook {id} to {url}: its host could not be resolved ({error!r})", id=d.msg_id,
                           url=d.url, error=e)
            return "unreachable"
        headers = self.signer.headers(d.msg_id, self.now(), d.body)
        try:
            status = yield self.post(self.reactor, target, address, d.body, headers)
        except Exception as e:  # noqa: BLE001 - any failure to reach the receiver is one more retry
            self._log.debug("webhook {id} to {url}: {error!r}", id=d.msg_id, url=d.url, error=e)
            return "unreachable"
        return "delivered" if 200 <= status < 300 else "rejected"

    @inlineCallbacks
    def _settle(self, d: Delivery) -> Any:
        """Delivered or given up: its entry goes, then it is forgotten (in that order: a scan
        meanwhile sees it held)."""
        if d.key is not None:
            try:
                yield self.store.delete(d.key)
            except GridnodeError as e:
                self._log.warn("webhook {id}: its entry stays ({reason}); it may be delivered again",
                               id=d.msg_id, reason=e.message)
        self.pending.pop((d.msg_id, d.url), None)

    # -- what others owed

    def watch(self) -> Deferred[Any]:
        """Take what each member the membership newly holds dead or left owed (suspected, dead
        is enough: a duplicate delivery is allowed, a late one is what this is for)."""
        gone = {m for m, state in self.members().items() if state in ("dead", "left")}
        new, self._gone_seen = gone - self._gone_seen, gone
        return DeferredList([self.adopt(m) for m in sorted(new) if m != self.node_id], consumeErrors=True)

    def _gone(self, owner: str, modified: float) -> bool:
        state = self.members().get(owner)
        if state is None:
            return self.now() - modified > STRANGER_AGE
        return state in ("dead", "left")

    @inlineCallbacks
    def adopt(self, owner: str) -> Any:
        """Take over what ``owner`` (dead, or left) owed; fires with how many were taken."""
        try:
            infos = yield self.store.list_all(keys.webhooks_prefix(owner))
        except GridnodeError as e:
            self._log.warn("cannot list the webhooks {owner} owed: {reason}", owner=owner, reason=e.message)
            return 0
        taken = 0
        for info in infos:
            taken += int((yield self._take(info.key, owner)))
        return taken

    @inlineCallbacks
    def scan(self) -> Any:
        """Deliver what dead owners, or an earlier life of this node, left under ``webhooks/``."""
        try:
            infos = yield self.store.list_all(keys.webhooks_prefix())
        except GridnodeError as e:
            self._log.warn("cannot scan for owed webhooks: {reason}", reason=e.message)
            return 0
        held = {d.key for d in self.pending.values()}
        taken = 0
        for info in infos:
            owner = info.key[len(keys.webhooks_prefix()):].split("/", 1)[0]
            if info.key in held or not (owner == self.node_id or self._gone(owner, info.modified)):
                continue
            taken += int((yield self._take(info.key, owner)))
        return taken

    @inlineCallbacks
    def _take(self, key: str, owner: str) -> Any:
        try:
            data, info = yield self.store.get_bytes(key, max_size=MAX_ENTRY)
            raw = json.loads(data)
            d = Delivery.from_entry(data, key)
        except NotFound:
            return False
        except (GridnodeError, ValueError, KeyError, TypeError) as e:
            self._log.warn("webhook entry {key} unreadable ({error}); left alone", key=key, error=e)
            return False
        if (d.msg_id, d.url) in self.pending:
            return False
        if owner != self.node_id:
            claimer = str(raw.get("claimed_by") or "")
            if claimer and claimer != self.node_id and not self._gone(claimer, info.modified):
                return False  # a live peer is moving it
            raw["claimed_by"] = self.node_id
            try:
                yield self.store.put_bytes(key, json.dumps(raw, sort_keys=True).encode(), if_match=info.etag,
                                           content_type="application/json")
            except (PreconditionFailed, NotFound):
                return False  # another node took it
            d.key = keys.webhook_entry(self.node_id, d.msg_id)
            self.pending[(d.msg_id, d.url)] = d
            try:
                yield self.store.put_bytes(d.key, d.entry(self.node_id), content_type="application/json")
                yield self.store.delete(key)
            except GridnodeError as e:
                self._log.warn("webhook {id}: moving its entry failed ({reason})", id=d.msg_id, reason=e.message)
        else:
            self.pending[(d.msg_id, d.url)] = d
        self._log.info("webhook {id} ({event}) taken over from {owner}", id=d.msg_id, event=d.event, owner=owner)
        self._schedule(d, 0.0)
        return True
