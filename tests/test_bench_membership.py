"""
The membership simulator in bench/membership_sim.py: a run that is saved part way and resumed
later gives exactly the figures of the same run made in one go. Behaviour only; the benchmark
itself prints the figures.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.membership_sim import Params, Sim, load, save
from gridnode.membership.swim import SUSPECT

SMALL = Params(nodes=30, loss=0.05, stall_fraction=0.2, seconds=300, kill=2, seed=5)


def test_a_saved_run_resumes_exactly(tmp_path: Path) -> None:
    """Stopped after a checkpoint and resumed from it, the run ends as an uninterrupted one does."""
    whole = Sim(SMALL).run()
    path = str(tmp_path / "sim.pkl")
    first = Sim(SMALL)
    first.setup()
    first.set_up = True
    assert not first.advance(150.0)  # a session ends here...
    assert first.now == 150.0
    save(first, path)
    resumed = load(path).run(path, every=100.0)  # ...and the next one goes on
    assert resumed == whole
    assert whole["kills"] == 2 and whole["events"] > 10_000


def test_a_run_saved_by_other_code_does_not_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint is tied to the machine's and the simulator's source: changed code refuses it."""
    import bench.membership_sim as ms

    path = str(tmp_path / "sim.pkl")
    sim = Sim(SMALL)
    sim.setup()
    save(sim, path)
    monkeypatch.setattr(ms, "code_digest", lambda: "another")
    with pytest.raises(SystemExit, match="another version"):
        load(path)


def test_peek_reports_a_saved_run_so_far(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/membership_peek.py prints how far a saved run got and its false positives so far."""
    import json

    from bench.membership_peek import main

    path = str(tmp_path / "sim.pkl")
    sim = Sim(SMALL)
    sim.setup()
    sim.set_up = True
    sim.advance(100.0)
    save(sim, path)
    assert main([path]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert seen["simulated_s"] == 100.0 and seen["nodes"] == 30 and seen["false_positives"] == 0
    assert seen["same_code"] is True


def test_peek_reads_a_run_saved_by_other_code(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A save made by other code is still read (and said to be so): only going on is refused."""
    import json

    import bench.membership_sim as ms
    from bench.membership_peek import main

    path = str(tmp_path / "sim.pkl")
    save(Sim(SMALL), path)
    monkeypatch.setattr(ms, "code_digest", lambda: "another")
    assert main([path]) == 0
    seen = json.loads(capsys.readouterr().out)
    assert seen["same_code"] is False and seen["simulated_s"] == 0.0


def test_a_killed_process_is_suspected_by_its_watchers_at_once() -> None:
    """A killed process's kernel closes its standing connections: each watcher reconnects at once,
    is refused and suspects it within a few round trips, long before its next probe would."""
    sim = Sim(Params(nodes=20, loss=0.0, seconds=120, kill=1, kill_mode="process", seed=3))
    sim.setup()
    sim.set_up = True
    while not sim.kill_at:
        assert not sim.advance(sim.now + 0.01)
    (victim, killed), = sim.kill_at.items()
    watchers = [n for n in sim.nodes if n.up and n.watch.get(victim)]
    assert len(watchers) == 3
    sim.advance(killed + 0.05)
    assert [n.id for n in watchers if n.m.member(victim).state == SUSPECT] == [n.id for n in watchers]


def test_the_simulator_counts_message_sizes_exactly() -> None:
    """Its quick count of a payload's bytes is the encoding's length, for every kind of message."""
    import bench.membership_sim as ms
    from gridnode.membership import swim

    names = random.Random(4)
    a, b = (ms.ec2_id(names), ms.ec2_address(names)), (ms.ec2_id(names), ms.ec2_address(names))
    u = swim.Update(a[0], a[1], 12, swim.SUSPECT, b[0])
    hdr = (*a, *b, 3)
    msgs = [swim.Ping(*hdr, 17, []), swim.Ack(*hdr, 0, [u, u]), swim.Nack(*hdr, 5),
            swim.PingReq(*hdr, 1, *b, [u]), swim.Gossip(*hdr, []), swim.SyncDigest(*hdr, "0" * 32, 5),
            swim.SyncState(*hdr, [u] * 3, True, 4, [1, 2]), swim.SyncState(*hdr, [], False, 0, [])]
    assert [ms.payload_size(m) for m in msgs] == [swim.encoded_size(m) for m in msgs]
    assert a[0].startswith("i-") and len(a[0]) == 19 and a[1].endswith(".compute-1.amazonaws.com:8081")


def test_the_simulator_reports_bytes_of_every_message() -> None:
    """Bytes per node per second count every message (probes too), not the syncs alone; nothing is
    over the wire's limit."""
    figures = Sim(Params(nodes=40, loss=0.01, seconds=60, joins=0, seed=2)).run()
    assert figures["bytes_per_node_s"] > 10 * figures["sync_bytes_per_node_s"] > 0
    assert figures["oversized_messages"] == 0 and 0 < figures["max_message_bytes"] <= figures["max_message_limit"]


def test_the_sync_bench_converges_within_the_limit() -> None:
    """bench/membership_sync.py: each scenario ends level and under the limit; the whole table as
    one message (the sync before buckets) is the one over it."""
    from bench.membership_sync import run

    results = {o["scenario"]: o for o in run(1200, 12, 1)}
    assert all(results[s]["converged"] and not results[s]["over_limit"] for s in ("steady", "missed", "joiner"))
    assert results["steady"]["messages"] == 1
    assert results["missed"]["members_sent"] < 1200 // 2
    assert results["whole"]["over_limit"] == 1


def test_a_cut_off_node_is_level_again_after_the_partition() -> None:
    """The simulator's partition_level_s: the node cut off for 30 s, held dead by all and missing
    every update meanwhile, ends with the pool's table (by anti-entropy and refutation)."""
    figures = Sim(Params(nodes=40, loss=0.01, seconds=150, partition_one=True, joins=3, seed=2)).run()
    assert figures["partition_level_s"] is not None and figures["partition_confirmed_dead"] == 0
