"""
The membership simulator in bench/membership_sim.py: a run that is saved part way and resumed
later gives exactly the figures of the same run made in one go. Behaviour only; the benchmark
itself prints the figures.
"""

from __future__ import annotations

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
