"""
EC2 instance metadata: the IMDSv2 conversation, retries, time limits and
user-data parsing. Most tests run in memory (StubTreq against the stand-in's
Resource tree, task.Clock for time limits and backoff); `LoopbackTests` use a
real loopback TCP port.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any, TypeVar

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from gridnode.errors import ConfigError, GridnodeError
from gridnode.instance import InstanceInfo, fetch_instance, parse_user_data
from tests.helpers import closed_port
from tests.imds_standin import ImdsStandin, imds

__all__ = ["imds"]  # the fixture, imported for the loopback tests

T = TypeVar("T")

BASE = "http://169.254.169.254"
TOKEN = "PUT /latest/api/token"
READS = [
    "GET /latest/meta-data/instance-id",
    "GET /latest/meta-data/local-ipv4",
    "GET /latest/meta-data/public-hostname",
    "GET /latest/user-data",
]


def drive(d: Deferred[Any], clock: task.Clock, stub: StubTreq, limit: int = 1000) -> None:
    """Run the in-memory world until ``d`` fires or nothing is left to happen,
    jumping the clock straight to each next scheduled call."""
    for _ in range(limit):
        stub.flush()
        if d.called:
            return
        calls = clock.getDelayedCalls()
        if not calls:
            return
        clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))


def result_of(d: Deferred[T]) -> T:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def failure_of(d: Deferred[Any]) -> BaseException:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), f"expected a failure, got {results[0]!r}"
    return results[0].value  # type: ignore[no-any-return]


def fetch(standin: ImdsStandin, **kwargs: Any) -> tuple[Deferred[InstanceInfo], task.Clock]:
    """fetch_instance in memory, run to completion; the stand-in logs clock times."""
    clock = task.Clock()
    standin.clock = clock
    stub = StubTreq(standin.resource())
    d = fetch_instance(clock, BASE, http=stub, **kwargs)
    drive(d, clock, stub)
    return d, clock


class InstanceFetchTests:
    def test_token_flow(self) -> None:
        """One token PUT with the 6-hour TTL header, then four reads that each carry that token."""
        standin = ImdsStandin(user_data="env = 'staging'\n")
        d, clock = fetch(standin)
        info = result_of(d)
        assert info == InstanceInfo(
            instance_id="i-0123456789abcdef0",
            local_ipv4="10.0.1.23",
            public_hostname="ec2-203-0-113-25.compute-1.amazonaws.com",
            user_data={"env": "staging"},
            user_data_text="env = 'staging'\n",
        )
        assert standin.requests() == [TOKEN, *READS]
        assert set(standin.statuses()) == {200}
        (token,) = standin.tokens
        assert [r.token for r in standin.log] == [None, token, token, token, token]
        assert standin.log[0].ttl == "21600"
        assert clock.getDelayedCalls() == []

    def test_missing_public_hostname_and_user_data(self) -> None:
        """A 404 on public-hostname gives None, a 404 on user-data means no user-data: {}."""
        standin = ImdsStandin(public_hostname=None, user_data=None)
        info = result_of(fetch(standin)[0])
        assert info.public_hostname is None
        assert info.user_data == {}
        assert info.user_data_text == ""
        assert standin.statuses()[-2:] == [404, 404]

    def test_values_are_stripped(self) -> None:
        """Trailing newlines are not part of the id, and an empty public name is None."""
        standin = ImdsStandin(instance_id="i-abc\n", public_hostname="")
        info = result_of(fetch(standin)[0])
        assert info.instance_id == "i-abc"
        assert info.public_hostname is None

    def test_user_data_sections(self) -> None:
        """User-data is parsed into gridnode's keys: here a [gridnode] TOML table."""
        standin = ImdsStandin(user_data='[gridnode]\npool = "gpu"\n[other]\nx = 1\n')
        info = result_of(fetch(standin)[0])
        assert info.user_data == {"pool": "gpu"}

    def test_gzipped_user_data(self) -> None:
        """Gzip-compressed user-data (as cloud-init allows) is decompressed and parsed."""
        standin = ImdsStandin(user_data=gzip.compress(b'{"env": "production"}'))
        info = result_of(fetch(standin)[0])
        assert info.user_data == {"env": "production"}
        assert info.user_data_text == '{"env": "production"}'

    def test_cloud_init_user_data(self) -> None:
        """A shell script as user-data is normal on EC2: no keys, no error."""
        standin = ImdsStandin(user_data="#!/bin/sh\necho hello\n")
        info = result_of(fetch(standin)[0])
        assert info.user_data == {}
        assert info.user_data_text.startswith("#!")

    def test_bad_user_data(self) -> None:
        """User-data that is neither TOML nor JSON fails with bad_config, not as unavailable."""
        standin = ImdsStandin(user_data="env = \n")
        error = failure_of(fetch(standin)[0])
        assert isinstance(error, ConfigError)
        assert error.code == "bad_config"
        assert error.message.startswith("user-data is neither TOML nor JSON: ")

    def test_retries_after_transient_500s(self) -> None:
        """Two 500s, then success: tries at 0, 0.5 and 1.5 s (exponential backoff on the clock)."""
        standin = ImdsStandin(fail_first=2)
        info = result_of(fetch(standin)[0])
        assert info.instance_id == "i-0123456789abcdef0"
        assert standin.requests() == [TOKEN, TOKEN, TOKEN, *READS]
        assert standin.statuses()[:3] == [500, 500, 200]
        assert [r.at for r in standin.log[:3]] == [0.0, 0.5, 1.5]

    def test_retries_each_request(self) -> None:
        """A read that fails transiently is retried on its own, with the same token."""
        standin = ImdsStandin(fail_on={"/latest/meta-data/local-ipv4": 2})
        info = result_of(fetch(standin)[0])
        assert info.local_ipv4 == "10.0.1.23"
        assert standin.requests() == [TOKEN, READS[0], READS[1], READS[1], READS[1], READS[2], READS[3]]
        assert len({r.token for r in standin.log[1:]}) == 1
        assert [r.at for r in standin.log[2:5]] == [0.0, 0.5, 1.5]

    def test_gives_up_with_instance_metadata_unavailable(self) -> None:
        """A service that keeps answering 500 gives instance_metadata_unavailable after `attempts`
        tries, with a message that names the URL and says what to do."""
        standin = ImdsStandin(fail_first=100)
        d, clock = fetch(standin, attempts=3)
        error = failure_of(d)
        assert isinstance(error, GridnodeError)
        assert error.code == "instance_metadata_unavailable"
        assert error.status == 503
        assert f"{BASE}/latest/api/token" in error.message
        assert "HTTP 500" in error.message
        assert "not on EC2? drop --instance-metadata" in error.message
        assert "\n" not in error.message
        assert standin.requests() == [TOKEN] * 3
        assert clock.seconds() == 1.5

    def test_hanging_server_times_out(self) -> None:
        """A service that never answers: each try is cut at `timeout`, then the fetch fails."""
        standin = ImdsStandin(hang_first=100)
        d, clock = fetch(standin, timeout=2.0, attempts=2, backoff=0.5)
        error = failure_of(d)
        assert isinstance(error, GridnodeError)
        assert error.code == "instance_metadata_unavailable"
        assert "timed out after 2s" in error.message
        assert [r.at for r in standin.log] == [0.0, 2.5]
        assert clock.seconds() == 4.5
        assert clock.getDelayedCalls() == []

    def test_one_hang_then_success(self) -> None:
        """A request that hangs once is retried after its time limit and the fetch succeeds."""
        standin = ImdsStandin(hang_first=1)
        d, _ = fetch(standin, timeout=1.0)
        assert result_of(d).local_ipv4 == "10.0.1.23"
        assert standin.statuses()[:2] == [None, 200]

    def test_expired_token_is_refetched(self) -> None:
        """A 401 on a read (token expired) fetches a new token once and repeats that read."""
        standin = ImdsStandin(expire_tokens_after=2)
        info = result_of(fetch(standin)[0])
        assert info.public_hostname == "ec2-203-0-113-25.compute-1.amazonaws.com"
        assert standin.requests() == [TOKEN, READS[0], READS[1], READS[2], TOKEN, READS[2], READS[3]]
        assert standin.statuses()[3] == 401
        first, second = standin.log[0], standin.log[4]
        assert standin.log[5].token != standin.log[1].token
        assert first.status == second.status == 200

    def test_token_refused_twice_fails(self) -> None:
        """A fresh token refused as well is not refetched again: the fetch fails."""
        standin = ImdsStandin(expire_tokens_after=0)
        error = failure_of(fetch(standin)[0])
        assert isinstance(error, GridnodeError)
        assert error.code == "instance_metadata_unavailable"
        assert "instance-id" in error.message and "401" in error.message
        assert standin.requests() == [TOKEN, READS[0], TOKEN, READS[0]]

    def test_missing_instance_id_fails_at_once(self) -> None:
        """A 404 where a value is required is not transient: no retries, a clear error."""
        standin = ImdsStandin(instance_id=None)
        error = failure_of(fetch(standin)[0])
        assert isinstance(error, GridnodeError)
        assert error.code == "instance_metadata_unavailable"
        assert f"{BASE}/latest/meta-data/instance-id: HTTP 404" in error.message
        assert standin.requests() == [TOKEN, READS[0]]

    def test_cancel_stops(self) -> None:
        """Cancelling the fetch during a backoff wait ends it: no further request, no timer left."""
        standin = ImdsStandin(fail_first=100)
        clock = task.Clock()
        stub = StubTreq(standin.resource())
        d = fetch_instance(clock, BASE, http=stub)
        stub.flush()
        assert standin.requests() == [TOKEN]
        d.cancel()
        assert isinstance(failure_of(d), CancelledError)
        clock.advance(60)
        stub.flush()
        assert standin.requests() == [TOKEN]
        assert clock.getDelayedCalls() == []

    def test_cancel_during_a_request(self) -> None:
        """Cancelling while a request hangs ends the fetch as cancelled, not retried as a timeout."""
        standin = ImdsStandin(hang_first=100)
        clock = task.Clock()
        stub = StubTreq(standin.resource())
        d = fetch_instance(clock, BASE, http=stub)
        stub.flush()
        d.cancel()
        assert isinstance(failure_of(d), CancelledError)
        clock.advance(60)
        assert standin.requests() == [TOKEN]
        assert clock.getDelayedCalls() == []


class ImdsStandinTests:
    def test_read_without_token_is_401(self) -> None:
        """The stand-in, like IMDSv2, refuses a read without a valid token."""
        stub = StubTreq(ImdsStandin().resource())
        response = result_of(stub.get(f"{BASE}/latest/meta-data/instance-id"))
        assert response.code == 401
        response = result_of(stub.get(f"{BASE}/latest/meta-data/instance-id",
                                      headers={"X-aws-ec2-metadata-token": "made-up"}))
        assert response.code == 401

    def test_token_needs_ttl_header(self) -> None:
        """A token PUT without a TTL header, or with one out of 1..21600, is a 400."""
        standin = ImdsStandin()
        stub = StubTreq(standin.resource())
        assert result_of(stub.put(f"{BASE}/latest/api/token")).code == 400
        bad = {"X-aws-ec2-metadata-token-ttl-seconds": "21601"}
        assert result_of(stub.put(f"{BASE}/latest/api/token", headers=bad)).code == 400
        assert result_of(stub.get(f"{BASE}/latest/api/token")).code == 405
        assert standin.tokens == {}

    def test_unknown_path_is_404_with_token(self) -> None:
        """Unknown paths answer 404 once the token is good, and are logged like the rest."""
        standin = ImdsStandin()
        stub = StubTreq(standin.resource())
        ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "60"}
        token = result_of(result_of(stub.put(f"{BASE}/latest/api/token", headers=ttl)).text())
        response = result_of(stub.get(f"{BASE}/latest/meta-data/nope",
                                      headers={"X-aws-ec2-metadata-token": token}))
        assert response.code == 404
        assert standin.requests() == [TOKEN, "GET /latest/meta-data/nope"]


class UserDataTests:
    def test_toml(self) -> None:
        """TOML at the top level gives its keys as they are (validation is config.py's job)."""
        assert parse_user_data('env = "production"\nqueue = 8\nunknown = true\n') == {
            "env": "production", "queue": 8, "unknown": True,
        }

    def test_toml_starting_with_a_comment(self) -> None:
        """A TOML document may start with a comment; it is not mistaken for a script."""
        assert parse_user_data("# gridnode settings\npool = 'gpu'\n") == {"pool": "gpu"}

    def test_json(self) -> None:
        """A document starting with '{' is JSON."""
        assert parse_user_data('  {"env": "staging", "workers": 2}') == {"env": "staging", "workers": 2}

    def test_gridnode_section(self) -> None:
        """A [gridnode] table (TOML) or "gridnode" object (JSON) holds gridnode's keys."""
        toml_text = '[gridnode]\nenv = "staging"\n\n[monitoring]\nendpoint = "x"\n'
        assert parse_user_data(toml_text) == {"env": "staging"}
        json_text = json.dumps({"gridnode": {"pool": "a"}, "other-tool": {"x": 1}})
        assert parse_user_data(json_text) == {"pool": "a"}

    def test_empty(self) -> None:
        """Empty or blank user-data has no keys."""
        assert parse_user_data("") == {}
        assert parse_user_data(" \n\t\n") == {}
        assert parse_user_data("\ufeff") == {}

    @pytest.mark.parametrize("text", [
        "#!/bin/bash\nyum -y install ffmpeg\n",
        "#cloud-config\npackages:\n  - ffmpeg\n",
        "#include\nhttps://example.com/setup\n",
        'Content-Type: multipart/mixed; boundary="==X=="\nMIME-Version: 1.0\n',
    ])
    def test_cloud_init_payloads(self, text: str) -> None:
        """Scripts, cloud-config and MIME multipart user-data are cloud-init's: {} and no error."""
        assert parse_user_data(text) == {}

    @pytest.mark.parametrize("text", ["env = \n", "[gridnode\n", '{"env": }', "{not json"])
    def test_invalid(self, text: str) -> None:
        """Invalid TOML or JSON is bad_config with the parser's message, on one line."""
        with pytest.raises(ConfigError) as info:
            parse_user_data(text)
        assert info.value.code == "bad_config"
        assert info.value.message.startswith("user-data is neither TOML nor JSON: ")
        assert len(info.value.message) > len("user-data is neither TOML nor JSON: ")
        assert "\n" not in info.value.message

    @given(st.dictionaries(
        st.text(min_size=1).filter(lambda k: k != "gridnode"),
        st.one_of(st.integers(), st.text(), st.booleans()),
    ))
    def test_json_round_trip(self, data: dict[str, object]) -> None:
        """Any JSON object without a "gridnode" key comes back as it was written."""
        assert parse_user_data(json.dumps(data)) == data


@pytest.mark.integration  # the default treq client over real loopback TCP; the rest runs in memory
class LoopbackTests:
    @pytest_twisted.ensureDeferred
    async def test_reads_over_tcp(self, imds: ImdsStandin) -> None:
        """With the default treq client, the whole conversation works over a real TCP port."""
        from twisted.internet import reactor

        imds.user_data = b'[gridnode]\nenv = "staging"\n'
        info = await fetch_instance(reactor, imds.url)
        assert info.instance_id == "i-0123456789abcdef0"
        assert info.user_data == {"env": "staging"}
        assert imds.requests() == [TOKEN, *READS]

    @pytest_twisted.ensureDeferred
    async def test_one_connection_closed_when_done(self, imds: ImdsStandin) -> None:
        """The default client asks all five questions on one connection and closes it afterwards."""
        from twisted.internet import reactor

        await fetch_instance(reactor, imds.url)
        assert imds.connections_made == 1
        for _ in range(1000):  # bounded: the standin sees the close a moment later
            if not imds.open_connections:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert not imds.open_connections

    @pytest_twisted.ensureDeferred
    async def test_closed_port_is_unavailable(self) -> None:
        """Nothing listening: instance_metadata_unavailable after the retries, in bounded time."""
        from twisted.internet import reactor

        url = f"http://127.0.0.1:{closed_port()}"
        started = time.monotonic()
        with pytest.raises(GridnodeError) as info:
            await fetch_instance(reactor, url, timeout=1.0, attempts=3, backoff=0.05)
        assert time.monotonic() - started < 15.0  # bounded: no 30 s default timeout, no endless retry
        assert info.value.code == "instance_metadata_unavailable"
        assert f"{url}/latest/api/token" in info.value.message
        assert "no answer after 3 tries" in info.value.message

    @pytest_twisted.ensureDeferred
    async def test_hanging_server_over_tcp(self, imds: ImdsStandin) -> None:
        """A server that accepts and never answers: cut at the time limit, then unavailable."""
        from twisted.internet import reactor

        imds.hang_first = 100
        started = time.monotonic()
        with pytest.raises(GridnodeError) as info:
            await fetch_instance(reactor, imds.url, timeout=0.2, attempts=2, backoff=0.05)
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 15.0
        assert info.value.code == "instance_metadata_unavailable"
        assert "timed out after 0.2s" in info.value.message
        assert imds.requests() == [TOKEN, TOKEN]
