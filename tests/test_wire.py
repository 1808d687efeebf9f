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
        assert open_(wire.Opener(wire.fixed_keys(KEY), lambda: 1001.0), args) == ping()

    def test_keys_differ_by_pool(self) -> None:
        """The same secret gives another key in another pool."""
        assert wire.peer_key(b"s", "prod", "east") != wire.peer_key(b"s", "prod", "west")

    @pytest.mark.parametrize("reason", ["bad_mac", "stale", "replay", "version", "malformed", "oversized"])
    def test_drops(self, reason: str) -> None:
        """Each kind of bad message is dropped with its reason."""
        opener = wire.Opener(wire.fixed_keys(KEY), lambda: 1000.0)
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

    def test_a_ring_seals_with_its_first_key_and_opens_with_any(self) -> None:
        """Rotation: a node holding (new, old) opens what nodes on either key send, and what it
        sends opens on a node still holding (old, new); a node that holds neither drops it."""
        old, new = (wire.peer_key(s, "prod", "east") for s in (b"o" * 32, b"n" * 32))
        rotated = wire.Opener(wire.fixed_keys(new, old), lambda: 1000.0)
        behind = wire.Opener(wire.fixed_keys(old, new), lambda: 1000.0)
        for key in (old, new):
            _, args = wire.seal(key, ping(), now=1000.0)
            assert open_(rotated, args) == ping()
        _, args = wire.seal(wire.fixed_keys(new, old)()[0], ping(), now=1000.0)
        assert open_(behind, args) == ping()
        with pytest.raises(wire.Dropped) as e:
            open_(wire.Opener(wire.fixed_keys(old), lambda: 1000.0), args)
        assert e.value.reason == "bad_mac"

    def test_peer_keys_follow_the_secrets(self) -> None:
        """The derived keys change when the keyring does, in its order, and are bound to the pool."""
        secrets = [b"a" * 32]
        keys = wire.peer_keys(lambda: secrets, "prod", "east")
        assert list(keys()) == [wire.peer_key(b"a" * 32, "prod", "east")]
        secrets = [b"b" * 32, b"a" * 32]
        assert list(keys()) == [wire.peer_key(b"b" * 32, "prod", "east"), wire.peer_key(b"a" * 32, "prod", "east")]

    @given(st.binary(max_size=200), st.binary(max_size=40))
    def test_garbage_never_opens(self, payload: bytes, mac: bytes) -> None:
        """Arbitrary payloads and MACs are dropped, never crash the opener."""
        with pytest.raises(wire.Dropped):
            wire.Opener(wire.fixed_keys(KEY), lambda: 0.0).open("Ping", 1, 0.0, b"n" * 12, payload, mac)
