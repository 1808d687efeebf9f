"""Sealing and opening peer messages: HMAC, time window, replays, size, version."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridnode.membership import swim, wire

KEY = wire.peer_key(b"pool secret of some length", "prod", "east")


def ping() -> swim.Ping:
    return swim.Ping("b", "127.0.0.1:2", "a", "127.0.0.1:1", 3, 9,
                     [swim.Update("c", "127.0.0.1:3", 4, swim.SUSPECT, "a")])


def open_(opener: wire.Opener, args: dict[str, object], command: str = "Ping") -> swim.Message:
    return opener.open(command, args["version"], args["sent"], args["nonce"], args["payload"],  # type: ignore[arg-type]
                       args["mac"])  # type: ignore[arg-type]


class WireTests:
    def test_round_trip(self) -> None:
        """A sealed message opens to the same message."""
        command, args = wire.seal(KEY, ping(), now=1000.0)
        assert command is wire.Ping
        assert open_(wire.Opener(KEY, lambda: 1001.0), args) == ping()

    def test_keys_differ_by_pool(self) -> None:
        """The same secret gives another key in another pool."""
        assert wire.peer_key(b"s", "prod", "east") != wire.peer_key(b"s", "prod", "west")

    @pytest.mark.parametrize("reason", ["bad_mac", "stale", "replay", "version", "malformed", "oversized"])
    def test_drops(self, reason: str) -> None:
        """Each kind of bad message is dropped with its reason."""
        opener = wire.Opener(KEY, lambda: 1000.0)
        command, args = wire.seal(KEY, ping(), now=1000.0)
        name = "Ping"
        if reason == "bad_mac":
            args["payload"] = bytes(args["payload"]).replace(b'"seq":9', b'"seq":8')  # type: ignore[arg-type]
        elif reason == "stale":
            command, args = wire.seal(KEY, ping(), now=900.0)
        elif reason == "replay":
            open_(opener, args)
        elif reason == "version":
            args["version"] = 2
        elif reason == "malformed":
            name = "Ack"  # the payload says Ping: the MAC covers the command name, so re-seal as Ack
            payload = bytes(args["payload"])  # type: ignore[arg-type]
            args["mac"] = wire._mac(KEY, name, 1, 1000.0, bytes(args["nonce"]), payload)  # type: ignore[arg-type]
        elif reason == "oversized":
            args["payload"] = b"x" * (wire.MAX_PAYLOAD + 1)
        with pytest.raises(wire.Dropped) as e:
            open_(opener, args, name)
        assert e.value.reason == reason

    @given(st.binary(max_size=200), st.binary(max_size=40))
    def test_garbage_never_opens(self, payload: bytes, mac: bytes) -> None:
        """Arbitrary payloads and MACs are dropped, never crash the opener."""
        with pytest.raises(wire.Dropped):
            wire.Opener(KEY, lambda: 0.0).open("Ping", 1, 0.0, b"n" * 12, payload, mac)
