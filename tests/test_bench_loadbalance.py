"""
The load-balancing simulator in bench/loadbalance.py: it runs, it is
deterministic for a seed, and two choices on stale figures beat random choice.
Behaviour only; the benchmark itself prints the figures.
"""

from __future__ import annotations

import json

import pytest

from bench.loadbalance import Params, arrival_rate, main, simulate, speeds

SMALL = Params(nodes=20, refresh=2.0, seed=7, arrivals=3_000, warmup_durations=3.0)


class SimulatorTests:
    def test_runs_and_reports_sane_figures(self) -> None:
        """A short run measures the asked number of arrivals and a mean near the offered load."""
        r = simulate(SMALL, "random")
        assert r.arrivals == SMALL.arrivals
        assert 7.0 < r.mean < 13.0
        assert r.max >= r.mean
        assert r.peak >= r.max
        assert r.max_over_mean == pytest.approx(r.max / r.mean)

    def test_deterministic_for_a_seed(self) -> None:
        """The same parameters give the same result; another seed gives another one."""
        a = simulate(SMALL, "two-choices")
        assert simulate(SMALL, "two-choices") == a
        other = simulate(Params(nodes=20, refresh=2.0, seed=8, arrivals=3_000, warmup_durations=3.0), "two-choices")
        assert other != a

    def test_two_choices_beat_random(self) -> None:
        """On the same job stream, two choices give a clearly lower max/mean than random choice."""
        rand = simulate(SMALL, "random")
        two = simulate(SMALL, "two-choices")
        assert two.max_over_mean < rand.max_over_mean - 0.2

    def test_unknown_policy_is_refused(self) -> None:
        """A policy name the simulator does not know is an error, not a silent random run."""
        with pytest.raises(ValueError):
            simulate(SMALL, "three-choices")

    def test_rate_gives_the_offered_jobs_per_node(self) -> None:
        """rate * mean duration * mean(1/speed) / N is the offered jobs per node."""
        p = Params(nodes=10, refresh=2.0, jobs_per_node=10.0, mean_duration=60.0)
        inv = sum(1 / s for s in speeds(10)) / 10
        assert arrival_rate(p) * 60.0 * inv / 10 == pytest.approx(10.0)
        assert sorted(speeds(10)) == [1.0] * 6 + [2.0] * 3 + [4.0]


class CommandLineTests:
    def test_json_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one JSON object with a result per planned run."""
        assert main(["--nodes", "20", "--refresh", "2", "--mix", "uniform", "--arrivals", "500", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [r["policy"] for r in out["results"]] == ["random", "two-choices"]
        assert out["params"]["nodes"] == [20]

    def test_table_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --json the figures come as a markdown table, speed variant included for mixed speeds."""
        assert main(["--nodes", "20", "--refresh", "2", "--arrivals", "500"]) == 0
        out = capsys.readouterr().out
        assert "| policy | speeds | N | refresh s |" in out
        assert "| two-choices/speed | mixed | 20 | 2 |" in out

    def test_bad_arguments_exit(self) -> None:
        """Nonsense arguments stop with a usage error."""
        with pytest.raises(SystemExit):
            main(["--nodes", "1"])
