"""
Rolling upgrades: what a node reads of records and peer messages written by the release before
it and the release after it (docs/operations.md, "Rolling upgrades"). Fields a reader does not know
are ignored; a node record of a higher format, or a peer message of another protocol version, is
skipped with its reason, never a crash. (No earlier release was published, so there is no old wheel
to run against: these tests write the other releases' records and messages by hand, and put such a
record beside real nodes.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from gridnode.client.nodes import nodes_from_json
from gridnode.errors import GridnodeError
from gridnode.membership import swim, wire
from gridnode.registry.records import (
    FORMAT,
    MAX_RECORD_BYTES,
    BadRecord,
    NodeRecord,
    RecordReader,
    nodes_json,
    parse_record,
)
from gridnode.store.memory import MemoryBackend
from tests.helpers import free_port, sleep, wait_for
from tests.nodes import NodeProcess, get_json

PREFIX = "registry/prod/east/nodes/"
KNOWN = {"id", "http_url", "peer_addr", "started", "incarnation", "heartbeat", "load", "version", "format"}


def record(node_id: str = "n1", **changes: Any) -> dict[str, Any]:
    raw = NodeRecord(node_id, f"http://10.0.0.1:8080/{node_id}", "10.0.0.1:8081", 100.0, 7, 1000.0,
                     {"running": 1.0}).to_json()
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


def data(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw).encode()


class RecordFormatTests:
    def test_a_record_says_its_format(self) -> None:
        """Records and the public nodes.json carry the format this release writes."""
        assert record()["format"] == FORMAT == 1
        body = json.loads(nodes_json([parse_record(data(record()))], "prod", "east"))
        assert body["format"] == FORMAT

    def test_the_previous_release_record_reads(self) -> None:
        """A record written before `format` existed (no such field) is format 1 and reads whole."""
        raw = record(format=None)
        assert "format" not in raw
        assert parse_record(data(raw), "n1") == parse_record(data(record()), "n1")

    @given(st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda k: k not in KNOWN),
                           st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                        lambda inner: st.lists(inner, max_size=3)
                                        | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                        max_leaves=8),
                           max_size=6))
    def test_fields_a_later_release_adds_are_ignored(self, extra: dict[str, Any]) -> None:
        """A record of the same format with fields this release does not know (what a later
        release that only adds fields writes) reads to the same record."""
        assert parse_record(data({**record(), **extra}), "n1") == parse_record(data(record()), "n1")

    def test_a_later_load_figure_is_kept_and_a_non_number_dropped(self) -> None:
        """A load figure a later release adds passes through to nodes.json; one that is not a
        number is dropped, not fatal."""
        parsed = parse_record(data(record(load={"running": 1, "gpu_busy": 0.5, "note": "x"})))
        assert parsed.load == {"running": 1.0, "gpu_busy": 0.5}

    def test_a_higher_format_is_refused_with_a_reason(self) -> None:
        """A record of a format this release cannot read is refused, and the reason names both
        formats and what to do."""
        with pytest.raises(BadRecord) as e:
            parse_record(data(record(format=FORMAT + 1, version="9.0.0", http_url=["changed", "shape"])))
        assert f"record format {FORMAT + 1}" in e.value.message and "'9.0.0'" in e.value.message
        assert "upgrade" in e.value.message

    @pytest.mark.parametrize("bad", ["2", True, 0, -1, 1.5, [1]])
    def test_a_format_that_is_not_a_number_is_refused(self, bad: Any) -> None:
        """`format` must be a positive integer: anything else is a bad record, not a guess."""
        with pytest.raises(BadRecord):
            parse_record(data({**record(), "format": bad}))


class ReaderAcrossVersionsTests:
    """The reader every node and the client use, in a pool half upgraded."""

    def setup_method(self) -> None:
        self.backend = MemoryBackend()
        self.reader = RecordReader(PREFIX)

    def read(self) -> tuple[list[str], list[NodeRecord], list[tuple[str, str]]]:
        read = self.reader.begin(self.backend.list(PREFIX).items, 1000.0)
        fetched = list(read.fetch)
        for key in read.fetch:
            try:
                body, info = self.backend.get_bytes(key, max_size=MAX_RECORD_BYTES)
            except GridnodeError as e:
                read.failed(key, e)
            else:
                read.got(key, body, info.etag)
        return fetched, read.done(), read.skipped

    def test_old_new_and_newer_records_side_by_side(self) -> None:
        """Records of the previous release, this one and a compatible later one are read; one of an
        incompatible later format is skipped with its reason, once: not fetched again while it
        is unchanged, not reported again when it changes for the same reason (a heartbeat), and
        read as soon as it is of a format this node knows."""
        self.backend.put_bytes(PREFIX + "a.json", data(record("a", format=None)))
        self.backend.put_bytes(PREFIX + "b.json", data(record("b")))
        self.backend.put_bytes(PREFIX + "c.json", data(record("c", extra={"x": 1})))
        self.backend.put_bytes(PREFIX + "d.json", data(record("d", format=FORMAT + 1)))
        fetched, records, skipped = self.read()
        assert len(fetched) == 4
        assert [r.id for r in records] == ["a", "b", "c"]
        assert [key for key, _ in skipped] == [PREFIX + "d.json"] and "upgrade" in skipped[0][1]

        fetched, records, skipped = self.read()
        assert fetched == [] and skipped == [] and [r.id for r in records] == ["a", "b", "c"]

        self.backend.put_bytes(PREFIX + "d.json", data(record("d", format=FORMAT + 1, heartbeat=1030.0)))
        fetched, records, skipped = self.read()
        assert fetched == [PREFIX + "d.json"] and skipped == [] and [r.id for r in records] == ["a", "b", "c"]

        self.backend.put_bytes(PREFIX + "d.json", data(record("d", heartbeat=1060.0)))
        fetched, records, skipped = self.read()
        assert fetched == [PREFIX + "d.json"] and skipped == []
        assert [r.id for r in records] == ["a", "b", "c", "d"]

    def test_a_record_that_breaks_again_is_reported_again(self) -> None:
        """A record skipped, then readable, then unreadable again is reported each time it turns bad."""
        self.backend.put_bytes(PREFIX + "a.json", b"not json")
        assert len(self.read()[2]) == 1
        self.backend.put_bytes(PREFIX + "a.json", data(record("a")))
        assert self.read()[2] == []
        self.backend.put_bytes(PREFIX + "a.json", b"still not json")
        assert len(self.read()[2]) == 1

    def test_the_client_reads_a_later_nodes_json(self) -> None:
        """The command line reads a nodes.json with fields it does not know, at the top and in
        each node's entry."""
        body = json.loads(nodes_json([parse_record(data(record()))], "prod", "east"))
        body["format"] = FORMAT + 1
        body["region"] = "eu-west-1"
        body["nodes"][0]["zone"] = "eu-west-1a"
        [node] = nodes_from_json(json.dumps(body).encode())
        assert node.id == "n1" and node.http_url == "http://10.0.0.1:8080/n1"


KEY = b"k" * 32


def ping() -> swim.Ping:
    return swim.Ping("b", "127.0.0.1:2", "a", "127.0.0.1:1", 3, 9,
                     [swim.Update("c", "127.0.0.1:3", 4, swim.SUSPECT, "a")])


class PeerMessageVersionTests:
    def seal_payload(self, payload: dict[str, Any], version: int = wire.VERSION) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        nonce = b"n" * 12
        return {"version": version, "sent": 1000.0, "nonce": nonce, "payload": body,
                "mac": wire._mac(KEY, "Ping", version, 1000.0, nonce, body)}

    def open(self, args: dict[str, Any]) -> swim.Message:
        return wire.Opener(wire.fixed_keys(KEY), lambda: 1000.0).open(
            "Ping", args["version"], args["sent"], args["nonce"], args["payload"], args["mac"])

    def test_a_field_a_later_release_adds_is_ignored(self) -> None:
        """A message of this protocol version with a payload field this release does not know
        opens to the message it would be without it."""
        _, args = wire.seal(KEY, ping(), now=1000.0)
        payload = json.loads(args["payload"])
        assert self.open(self.seal_payload(payload)) == ping()
        assert self.open(self.seal_payload({**payload, "zone": "eu-west-1a", "load": [1, 2]})) == ping()

    @pytest.mark.parametrize("version", [wire.VERSION - 1, wire.VERSION + 1])
    def test_another_protocol_version_is_dropped_not_crashed_on(self, version: int) -> None:
        """A message of another peer protocol version, however well sealed, is dropped and counted
        as `version`: the receiver does not try to read it."""
        _, args = wire.seal(KEY, ping(), now=1000.0)
        payload = json.loads(args["payload"])
        with pytest.raises(wire.Dropped) as e:
            self.open(self.seal_payload({**payload, "updates": "a shape no one knows"}, version))
        assert e.value.reason == "version"


@pytest.mark.integration
class MixedPoolTests:
    @pytest_twisted.inlineCallbacks
    def test_nodes_carry_on_beside_a_newer_record(self, tmp_path: Path) -> Any:
        """Two real nodes sharing a store with the record of a node of a newer, incompatible format:
        both keep serving and list each other in nodes.json, leave the newer node out, and each
        logs why once, however often that record changes."""
        store = tmp_path / "store"
        folder = store / "registry" / "dev" / "p1" / "nodes"
        nodes = [NodeProcess(tmp_path / f"n{i}", [
            "--store", f"file:{store}", "--pool", "p1", "--node-id", f"n{i}", "--heartbeat", "0.5",
            "--http", f"tcp:{free_port()}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1"]) for i in range(2)]
        for node in nodes:
            node.start()
        try:
            for node in nodes:
                yield node.wait_ready()
            yield wait_for(lambda: (folder / "n0.json").exists() and (folder / "n1.json").exists(), 60)
            newer = record("n9", format=FORMAT + 1, version="9.0.0", http_url={"moved": "elsewhere"})
            (folder / "n9.json").write_bytes(data(newer))
            why = "ignoring registry record registry/dev/p1/nodes/n9.json: record format 2"
            yield wait_for(lambda: all(why in node.text() for node in nodes), 60)
            for beat in range(3):  # the newer node heartbeats: its record changes, for the same reason
                (folder / "n9.json").write_bytes(data({**newer, "heartbeat": 2000.0 + beat}))
                yield sleep(1.5)
            assert [node.text().count(why) for node in nodes] == [1, 1]
            for node in nodes:
                status, listing = get_json(node.url + "/registry/nodes.json")
                assert status == 200 and [n["id"] for n in listing["nodes"]] == ["n0", "n1"]
                assert listing["format"] == FORMAT
                assert get_json(node.url + "/health")[1]["state"] == "ok"
        finally:
            for node in nodes:
                node.stop()
