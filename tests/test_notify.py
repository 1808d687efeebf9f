"""Webhooks (gridnode/notify/): which URLs and addresses, Standard Webhooks signatures, and the
deliveries on a memory store and a fake clock: retries with one id, the entry's life, what a dead
owner owed, a host whose DNS turned private."""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import time
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from gridnode import jobs, keys
from gridnode.errors import ConfigError, GridnodeError
from gridnode.jobs import Job
from gridnode.keyring import parse_keyring
from gridnode.metrics import Metrics
from gridnode.notify.service import FIRST_DELAY, RETRY_FOR, Webhooks, message_id, notify_urls, retry_delay
from gridnode.notify.signing import Signer, check_ring
from gridnode.notify.targets import AddressRule, NotifyRefused, literal, parse_allow, parse_url, parse_urls
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend

SECRETS = ["whsec_" + base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2)]
RING = parse_keyring(f"new {SECRETS[0]}\nold {SECRETS[1]}\n".encode(), "test")
PUBLIC = ipaddress.ip_address("93.184.215.14")

REFUSED = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
           "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fd00:ec2::254", "ff02::1",
           "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:a9fe:a9fe::1", "64:ff9b::a9fe:a9fe",
           "2001:0:4136:e378:8000:63bf:80ff:fffe"]


@pytest.mark.parametrize("address", REFUSED)
def test_addresses_inside_the_pool_are_refused(address: str) -> None:
    """Loopback, private, link-local (metadata), shared, unspecified, multicast, IPv4 inside
    IPv6 (mapped, 6to4, NAT64, Teredo): each refused with a reason."""
    assert AddressRule().refusal(ipaddress.ip_address(address)) is not None


def test_public_addresses_pass_and_an_allow_rule_opens_a_range() -> None:
    rule = AddressRule()
    assert rule.refusal(PUBLIC) is None and rule.refusal(ipaddress.ip_address("2606:4700::1111")) is None
    loop = AddressRule(parse_allow(["127.0.0.0/8"]))
    assert loop.refusal(ipaddress.ip_address("127.0.0.1")) is None
    assert loop.refusal(ipaddress.ip_address("::ffff:127.0.0.1")) is None  # judged as what it carries
    assert loop.refusal(ipaddress.ip_address("169.254.169.254")) is not None
    with pytest.raises(ValueError):
        parse_allow(["not-a-cidr"])


def test_every_resolved_address_must_pass() -> None:
    """A name that resolves to a public and a private address is refused: either could be used."""
    target = parse_url("https://hooks.example.com/in")
    assert AddressRule().check(target, [PUBLIC]) == PUBLIC
    with pytest.raises(NotifyRefused) as e:
        AddressRule().check(target, [PUBLIC, ipaddress.ip_address("10.0.0.1")])
    assert e.value.code == "notify_refused" and e.value.status == 400 and "--webhook-allow" in e.value.message
    with pytest.raises(NotifyRefused):
        AddressRule().check(target, [])


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "http://", "http:///x",
                                 "http://user:pw@example.com/", "http://example.com/#frag", "http://exa mple.com/",
                                 "http://example.com:99999/", "http://example.com/\r\nX: y", "javascript:alert(1)",
                                 "http://ex\u00e4mple.com/", "x" * 3000, ""])
def test_hostile_urls_are_refused_with_a_code(url: str) -> None:
    with pytest.raises(NotifyRefused) as e:
        parse_url(url)
    assert e.value.code == "notify_refused"


def test_url_lists() -> None:
    assert parse_urls(None) == []
    assert parse_urls(" http://a.example/x , https://b.example:8443/y,http://a.example/x") == [
        "http://a.example/x", "https://b.example:8443/y"]
    with pytest.raises(NotifyRefused):
        parse_urls(",".join(f"http://h{i}.example/" for i in range(5)))
    t = parse_url("HTTPS://[2606:4700::1111]/p?q=1")
    assert (t.scheme, t.host, t.port) == ("https", "2606:4700::1111", 443)


def test_every_key_signs_and_standardwebhooks_verifies_with_any() -> None:
    """One v1 signature per key of the ring: a receiver with either secret verifies; a third
    secret, a changed body or another id does not."""
    body = b'{"id": "x", "state": "done"}'
    headers = Signer(lambda: RING).headers("msg_1", time.time(), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in SECRETS:
        assert Webhook(secret).verify(body, headers) == {"id": "x", "state": "done"}
    stranger = "whsec_" + base64.b64encode(b"\x09" * 32).decode()
    for secret, data, hdrs in ((stranger, body, headers), (SECRETS[0], body + b" ", headers),
                               (SECRETS[0], body, {**headers, "webhook-id": "msg_2"})):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(data, hdrs)


@pytest.mark.parametrize("secret", ["k " + "a" * 40, "k whsec_!!!!" + "a" * 40, "k whsec_" + "QUFB" * 4,
                                    "k whsec_" + base64.b64encode(b"x" * 65).decode()])
def test_a_ring_of_non_webhook_secrets_is_refused(secret: str) -> None:
    with pytest.raises(ConfigError):
        check_ring(parse_keyring(secret.encode(), "f"), "webhook-secret")


def test_retry_delays_grow_and_reach_past_a_day() -> None:
    rng = random.Random(3)
    delays = [retry_delay(n, rng) for n in range(1, 40)]
    assert FIRST_DELAY * 0.75 <= delays[0] <= FIRST_DELAY * 1.25
    assert all(later > earlier for earlier, later in zip(delays[:6], delays[1:7], strict=True))
    assert sum(delays) > RETRY_FOR


class Receiver:
    """A fake POST: answers from a list (then the last), records each request."""

    def __init__(self, statuses: list[int], store: MemoryBackend | None = None, entry: str | None = None) -> None:
        self.statuses = list(statuses)
        self.seen: list[tuple[str, dict[str, str], bytes, Any]] = []
        self.store, self.entry = store, entry
        self.entry_there: list[bool] = []

    def __call__(self, reactor: Any, target: Any, address: Any, body: bytes, headers: dict[str, str]) -> Any:
        self.seen.append((target.url, headers, body, address))
        if self.store is not None and self.entry is not None:
            self.entry_there.append(any(i.key.endswith(self.entry) for i in self.store.list("webhooks/").items))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status == 0:
            return fail(ConnectionRefusedError())
        return succeed(status)


def done_job(notify: list[str], node: str = "n1", state: str = jobs.DONE) -> Job:
    job = Job.new(keys.new_id(1.0), name="m.mov", presets=["mp4-720p"], node=node, size=5, now=1.0,
                  notify=notify)
    job.advance(jobs.PROBING, 1.0)
    job.accept(1.0, 30.0)
    if state == jobs.DONE:
        job.advance(jobs.TRANSCODING, 2.0)
        job.advance(jobs.STORING, 3.0)
        job.advance(jobs.DONE, 4.0)
    elif state == jobs.FAILED:
        job.fail("ffmpeg_failed", "no", 4.0)
    return job


class DeliveryTests:
    @pytest.fixture(autouse=True)
    def setup(self) -> None:
        self.backend = MemoryBackend()
        self.store = ObjectStore.synchronous(self.backend)
        self.clock = Clock()
        self.metrics = Metrics()
        self.answers: dict[str, list[Any]] = {}
        self.base = time.time()  # a wall-clock start, so that standardwebhooks takes the timestamps

    def resolve(self, host: str, port: int) -> Any:
        ip = literal(host)  # as system_resolver: an address is its own answer
        return succeed([ip] if ip is not None else self.answers.get(host, [PUBLIC]))

    def hooks(self, node: str, receiver: Receiver) -> Webhooks:
        hooks = Webhooks(self.clock, self.store, node, Signer(lambda: RING), AddressRule(), self.resolve, receiver,
                         metrics=self.metrics, now=lambda: self.base + self.clock.seconds(),
                         rng=random.Random(7))
        hooks.running = True  # its loops aside: these tests call scan and adopt themselves
        return hooks

    def counted(self, event: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value("gridnode_webhook_deliveries_total",
                                                       {"event": event, "result": result})
        return value or 0.0

    def entries(self) -> list[str]:
        return [i.key for i in self.backend.list("webhooks/").items]

    def test_500_twice_then_200_is_three_posts_of_one_id(self) -> None:
        """The entry is in the store before the first POST and gone after the 2xx; every POST
        carries the same webhook-id and body, each signature verifies."""
        job = done_job(["https://hooks.example.com/a"])
        receiver = Receiver([500, 500, 200], self.backend, message_id(job.id, "job.done", 0) + ".json")
        hooks = self.hooks("n1", receiver)
        hooks.announce_end(job)
        self.clock.advance(0)
        assert len(receiver.seen) == 1
        self.clock.advance(FIRST_DELAY * 1.25)
        assert len(receiver.seen) == 2
        self.clock.pump([1.0] * 30)
        assert len(receiver.seen) == 3
        self.clock.pump([60.0] * 10)
        assert len(receiver.seen) == 3
        assert receiver.entry_there == [True, True, True] and self.entries() == [] and hooks.pending == {}
        ids = {h["webhook-id"] for _, h, _, _ in receiver.seen}
        assert ids == {f"msg_{job.id}_done_0"}
        for _, headers, body, address in receiver.seen:
            assert address == PUBLIC
            expected = {k: v for k, v in job.to_json().items() if k != "notify"}  # no receiver learns another's URL
            assert Webhook(SECRETS[1]).verify(body, headers) == expected  # the library reads the wall clock
        assert (self.counted("job.done", "rejected"), self.counted("job.done", "delivered")) == (2.0, 1.0)

    def test_a_receiver_down_for_a_day_is_given_up_on_and_the_entry_goes(self) -> None:
        job = done_job(["https://hooks.example.com/a"], state=jobs.FAILED)
        receiver = Receiver([0])
        self.hooks("n1", receiver).announce_end(job)
        for _ in range(200):
            if not self.entries():
                break
            self.clock.advance(3600.0)
        assert self.entries() == []
        assert self.clock.seconds() >= RETRY_FOR
        assert 10 <= len(receiver.seen) <= 40
        assert self.counted("job.failed", "unreachable") == len(receiver.seen)
        assert self.counted("job.failed", "gave_up") == 1.0

    def test_dns_turned_private_at_delivery_is_refused_and_retried(self) -> None:
        """Checked at submission, the host later resolves to the metadata address: that attempt
        sends nothing; once DNS is public again, the next attempt delivers."""
        receiver = Receiver([200])
        hooks = self.hooks("n1", receiver)
        self.answers["hooks.example.com"] = [ipaddress.ip_address("169.254.169.254")]
        hooks.announce_end(done_job(["https://hooks.example.com/a"]))
        self.clock.advance(0)
        assert receiver.seen == [] and self.counted("job.done", "refused") == 1.0
        self.answers["hooks.example.com"] = [PUBLIC]
        self.clock.advance(FIRST_DELAY * 1.25)
        assert len(receiver.seen) == 1 and self.entries() == []

    def test_a_resolver_that_breaks_is_one_more_retry(self) -> None:
        receiver = Receiver([200])
        hooks = self.hooks("n1", receiver)
        hooks.resolve = lambda host, port: fail(RuntimeError("resolver thread pool gone"))
        hooks.announce_end(done_job(["https://hooks.example.com/a"]))
        self.clock.advance(0)
        assert receiver.seen == [] and self.counted("job.done", "unreachable") == 1.0 and len(self.entries()) == 1
        hooks.resolve = self.resolve
        self.clock.advance(FIRST_DELAY * 1.25)
        assert len(receiver.seen) == 1 and self.entries() == []

    def test_a_dead_owners_entries_are_taken_by_one_peer_and_delivered(self) -> None:
        """n1 stored the entry and died before delivering; n2 and n3 are both told: exactly one
        takes it (a conditional write), moves it under its name and delivers, with n1's id."""
        job = done_job(["https://hooks.example.com/a", "https://other.example.net/b"])
        down = Receiver([0])
        self.hooks("n1", down).announce_end(job)
        assert len(self.entries()) == 2 and all(k.startswith("webhooks/n1/") for k in self.entries())
        r2, r3 = Receiver([200]), Receiver([200])
        h2, h3 = self.hooks("n2", r2), self.hooks("n3", r3)
        # n3 read the entries too, before n2's claim: its conditional write then loses
        reads = {k: self.backend.get_bytes(k)[1] for k in self.entries()}
        assert self.result(h2.adopt("n1")) == 2
        self.clock.advance(0)
        for key in reads:
            with pytest.raises(GridnodeError):
                self.backend.put_bytes(key, b"{}", if_match=reads[key].etag)
        assert self.result(h3.adopt("n1")) == 0
        assert sorted(u for u, _, _, _ in r2.seen) == job.notify and r3.seen == []
        assert {h["webhook-id"] for _, h, _, _ in r2.seen} == {f"msg_{job.id}_done_0", f"msg_{job.id}_done_1"}
        assert self.entries() == []

    def test_a_member_newly_dead_or_left_is_adopted_once_without_waiting_for_a_scan(self) -> None:
        """A member the membership's view holds dead has what it owed taken at the next watch, once."""
        self.hooks("n1", Receiver([0])).announce_end(done_job(["https://a.example/1"]))
        self.clock.advance(0)
        receiver = Receiver([200])
        me = self.hooks("n2", receiver)
        view = {"n1": "alive", "n2": "alive"}
        me.members = lambda: view
        self.result(me.watch())
        assert receiver.seen == []
        view["n1"] = "dead"
        self.result(me.watch())
        self.clock.advance(0)
        assert len(receiver.seen) == 1 and self.entries() == []
        self.result(me.watch())
        assert len(receiver.seen) == 1

    def test_forged_entries_reach_nothing_inside(self) -> None:
        """Anyone who can write the bucket can write an entry: one aimed at the metadata address
        is taken but never sent (checked at each attempt); an id that cannot be a key, an unknown
        event or garbage is left alone."""
        forged = {"id": "msg_x_done_0", "event": "job.done", "url": "http://169.254.169.254/latest/meta-data/",
                  "job": "x", "created": self.base, "owner": "dead", "claimed_by": "", "body": "{}"}
        self.backend.put_bytes("webhooks/dead/msg_x_done_0.json", json.dumps(forged).encode())
        for name, change in (("bad1", {"id": "../../x"}), ("bad2", {"event": "job.evil", "id": "msg_bad2"})):
            self.backend.put_bytes(f"webhooks/dead/{name}.json", json.dumps({**forged, **change}).encode())
        self.backend.put_bytes("webhooks/dead/bad3.json", b"\xff not json")
        receiver = Receiver([200])
        me = self.hooks("me", receiver)
        me.members = lambda: {"dead": "dead"}
        assert self.result(me.scan()) == 1
        self.clock.advance(0)
        assert receiver.seen == [] and self.counted("job.done", "refused") == 1.0
        assert sorted(self.entries()) == ["webhooks/dead/bad1.json", "webhooks/dead/bad2.json",
                                          "webhooks/dead/bad3.json", "webhooks/me/msg_x_done_0.json"]

    def test_a_scan_takes_the_dead_and_an_earlier_life_but_not_the_living(self) -> None:
        self.hooks("alive", Receiver([0])).announce_end(done_job(["https://a.example/1"]))
        self.hooks("dead", Receiver([0])).announce_end(done_job(["https://a.example/2"]))
        self.hooks("me", Receiver([0])).announce_end(done_job(["https://a.example/3"]))
        receiver = Receiver([200])
        me = self.hooks("me", receiver)  # a new life: holds nothing yet
        me.members = lambda: {"alive": "alive", "dead": "dead", "me": "alive"}
        assert self.result(me.scan()) == 2
        self.clock.advance(0)
        assert sorted(u for u, _, _, _ in receiver.seen) == ["https://a.example/2", "https://a.example/3"]
        assert [k.split("/")[1] for k in self.entries()] == ["alive"]

    def test_a_final_job_found_marked_is_owed_again_only_when_its_owner_is_gone(self) -> None:
        """The adopter's ``on_ended``: an owner alive is between its last record and its entries (it
        sees to them); a dead one's end is owed by the adopter; announcing twice owes once."""
        receiver = Receiver([0])
        me = self.hooks("n2", receiver)
        me.members = lambda: {"n1": "alive", "n9": "dead"}
        self.result(me.orphan_ended(done_job(["https://a.example/1"], node="n1")))
        assert self.entries() == []
        job = done_job(["https://a.example/2"], node="n9")
        self.result(me.orphan_ended(job))
        self.result(me.announce_end(job))
        self.clock.advance(0)
        assert self.entries() == [f"webhooks/n2/msg_{job.id}_done_0.json"] and len(receiver.seen) == 1
        poisoned = done_job(["https://a.example/3"], node="n1", state=jobs.QUEUED)
        poisoned.fail("poison", "quarantined", 9.0)  # by this adopter, its owner alive but stalled
        self.result(me.orphan_ended(poisoned))
        assert f"webhooks/n2/msg_{poisoned.id}_failed_0.json" in self.entries()

    def test_progress_is_opt_in_at_most_every_few_seconds_and_stores_nothing(self) -> None:
        receiver = Receiver([200])
        hooks = self.hooks("n1", receiver)
        job = done_job(["https://a.example/p"], state=jobs.QUEUED)
        job.advance(jobs.TRANSCODING, 2.0)
        hooks.progress(job)
        assert receiver.seen == []
        job.notify_progress = True
        for _ in range(10):
            job.set_progress(job.progress + 0.05, self.clock.seconds())
            hooks.progress(job)
            self.clock.advance(0)
            self.clock.advance(1.0)
        assert 2 <= len(receiver.seen) <= 3 and self.backend.list("webhooks/").items == []
        assert len({h["webhook-id"] for _, h, _, _ in receiver.seen}) == len(receiver.seen)

    def test_submission_checks(self) -> None:
        """No webhook secret: a job naming a URL is refused (webhooks_off); the metadata address
        is refused (notify_refused); the pool's default applies to a job naming none."""
        with pytest.raises(GridnodeError) as e:
            notify_urls(None, (), ["https://a.example/"])
        assert (e.value.code, e.value.status) == ("webhooks_off", 400)
        assert self.result(notify_urls(None, (), None)) == []
        hooks = self.hooks("n1", Receiver([200]))
        failure = self.failure(notify_urls(hooks, (), ["http://169.254.169.254/latest/meta-data/"]))
        assert (failure.code, failure.status) == ("notify_refused", 400)
        self.answers["internal.example"] = [ipaddress.ip_address("10.0.0.8")]
        assert self.failure(notify_urls(hooks, (), ["https://internal.example/x"])).code == "notify_refused"
        assert self.result(notify_urls(hooks, ("https://pool.example/h",), None)) == ["https://pool.example/h"]

    @staticmethod
    def result(d: Any) -> Any:
        got: list[Any] = []
        d.addBoth(got.append)
        assert got and not hasattr(got[0], "raiseException"), got
        return got[0]

    @staticmethod
    def failure(d: Any) -> Any:
        got: list[Any] = []
        d.addBoth(got.append)
        assert got and hasattr(got[0], "value"), got
        return got[0].value


def test_the_adopter_tells_of_a_final_job_still_marked_and_of_poison() -> None:
    """gridnode/adoption.py's ``on_ended``: called before the marker of a final job goes, and for a
    job it quarantines; not for one it claims to run."""
    from gridnode.adoption import MAX_ATTEMPTS, Adopter
    from tests.test_adoption import FakeHost

    backend = MemoryBackend()
    store = ObjectStore.synchronous(backend)
    ended: list[tuple[str, bool]] = []
    adopter = Adopter(store, FakeHost(), "n2", 30.0, now=lambda: 100.0, rng=random.Random(1))
    adopter.on_ended = lambda job: ended.append((job.state, backend.list("active/").items != [])) or succeed(None)
    final = done_job(["https://a.example/"], node="gone")
    poison = done_job(["https://a.example/"], node="gone", state=jobs.QUEUED)
    poison.attempts = MAX_ATTEMPTS
    poison.lease_until = 10.0
    for job in (final, poison):
        backend.put_bytes(keys.job_record(job.id), job.dumps())
    adopter.gone = lambda node: True
    backend.put_bytes(keys.active_marker("gone", final.id), b"")
    adopter.claim(final.id, "gone")
    assert ended == [(jobs.DONE, True)] and backend.list("active/").items == []
    backend.put_bytes(keys.active_marker("gone", poison.id), b"")
    adopter.claim(poison.id, "gone")
    assert ended[1] == (jobs.FAILED, True) and backend.list("active/").items == []
