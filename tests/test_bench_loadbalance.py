"""
The load-balancing simulator in bench/loadbalance.py: it runs, it is
deterministic for a seed, two choices on stale figures beat random choice, and
reading the two candidates' figures live undoes the staleness.
Behaviour only; the benchmark itself prints the figures.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from bench.loadbalance import DEFAULT_POLICIES, Params, arrival_rate, averaged, left_right, main, plan, simulate, speeds
from bench.loadwait import Central, Pool, WaitParams, averaged_wait, simulate_wait

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

    def test_live_candidates_undo_the_staleness(self) -> None:
        """On identical nodes with a 30 s refresh, two choices on the published figures herd; the
        same rule on the two candidates' current figures does better, and better still going left.
        (With mixed speeds the client's rule puts more jobs on the fast nodes on purpose: job
        counts are not its figure there, waits are: WaitTests.)"""
        slow = replace(SMALL, refresh=30.0, mix="uniform")
        stale = simulate(slow, "two-choices").max_over_mean
        assert simulate(slow, "two-choices/probed").max_over_mean < stale - 0.05
        assert simulate(slow, "two-choices/left+probed").max_over_mean < stale - 0.15

    def test_left_right_halves(self) -> None:
        """The split is into halves (the left one takes the odd node), covers every node once, and
        does not depend on the order the ids come in."""
        ids = [f"node-{i}" for i in range(11)]
        left, right = left_right(ids)
        assert (len(left), len(right)) == (6, 5)
        assert sorted(left + right) == list(range(11))
        shuffled = ids[::-1]
        left2, right2 = left_right(shuffled)
        assert {shuffled[i] for i in left2} == {ids[i] for i in left}
        assert {shuffled[i] for i in right2} == {ids[i] for i in right}

    def test_averaged_over_seeds(self) -> None:
        """--seeds averages the per-seed figures and keeps their range."""
        runs = [simulate(replace(SMALL, seed=s), "two-choices") for s in (7, 8, 9)]
        avg = averaged(SMALL, "two-choices", 3)
        assert avg.seeds == 3
        assert avg.max_over_mean == pytest.approx(sum(r.max_over_mean for r in runs) / 3)
        assert avg.max_over_mean_lo == min(r.max_over_mean for r in runs)
        assert avg.max_over_mean_hi == max(r.max_over_mean for r in runs)
        assert avg.arrivals == 3 * SMALL.arrivals

    def test_plan_runs_refresh_free_policies_once(self) -> None:
        """Random and the probed policies read no published figure: one run per mix and N."""
        runs = plan([10], [2.0, 30.0], ["uniform"], DEFAULT_POLICIES)
        count = {pol: sum(1 for *_, p in runs if p == pol) for pol in DEFAULT_POLICIES}
        assert count == {"random": 1, "two-choices": 2, "two-choices/left": 2, "two-choices/probed": 1,
                         "two-choices/left+probed": 1}

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


WAIT = WaitParams(nodes=30, seed=3, arrivals=4_000, warmup_durations=3.0)


def key(pool: Pool, i: int, t: float) -> tuple[float, float]:
    """What the real ``NodeInfo`` says of node i at t: its expected wait at its true speed, its busyness."""
    info = pool.info(i, t)
    return round(info.expected_wait(pool.speed[i]), 6), info.busy


class WaitTests:
    def test_runs_deterministic_and_ordered(self) -> None:
        """A short run measures the asked arrivals, is the same for the same seed, and ranks the
        policies as they must rank: the central dispatcher and the client's rule far below random
        (whose slow nodes get 0.93 of their capacity), the client near the central."""
        runs = {p: simulate_wait(WAIT, p) for p in ("random", "client", "central")}
        assert all(r.arrivals == WAIT.arrivals for r in runs.values())
        assert simulate_wait(WAIT, "client") == runs["client"]
        assert runs["central"].p99 < runs["random"].p99 / 1.5
        assert runs["client"].p99 < runs["random"].p99 / 1.5
        assert runs["client"].p99 < 1.5 * runs["central"].p99
        assert runs["client"].on_fast > runs["random"].on_fast  # the fast third takes more than a third
        assert runs["central"].queue_p99 <= runs["central"].p99

    def test_central_picks_the_least_expected_wait_of_all(self) -> None:
        """The dispatcher's heaps find what the real ``NodeInfo.expected_wait`` says of every node
        (at its true speed): the least wait, the least busy among equal waits."""
        pool = Pool(WaitParams(nodes=40, seed=9))
        rng = random.Random(4)
        t = 100.0
        central = Central(pool, rng)
        for step in range(300):
            i = rng.randrange(pool.n)
            if pool.running[i] < pool.k:
                end = t + rng.uniform(1, 200)
                pool.running[i] += 1
                pool.finishes[i] += end
            else:
                d = rng.uniform(1, 200)
                pool.queues[i].append((d, step))
                pool.queued_work[i] += d
            central.changed(i)
            t += rng.uniform(0, 0.5)    # no job ends in this test: every end is after t

            chosen = central.choose(t)
            assert key(pool, chosen, t) == min(key(pool, j, t) for j in range(pool.n))

    def test_averaged_over_seeds(self) -> None:
        """--seeds averages the per-seed figures."""
        runs = [simulate_wait(replace(WAIT, seed=s), "client") for s in (3, 4)]
        avg = averaged_wait(WAIT, "client", 2)
        assert avg.p99 == pytest.approx((runs[0].p99 + runs[1].p99) / 2)
        assert avg.arrivals == 2 * WAIT.arrivals

    def test_unknown_policy_is_refused(self) -> None:
        with pytest.raises(ValueError):
            simulate_wait(WAIT, "fastest")


class CommandLineTests:
    def test_json_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints one JSON object with a result per planned run."""
        assert main(["--nodes", "20", "--refresh", "2", "--mix", "uniform", "--arrivals", "500", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [r["policy"] for r in out["results"]] == list(DEFAULT_POLICIES)
        assert out["params"]["nodes"] == [20]

    def test_table_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --json the figures come as a markdown table; the speed variant only when asked,
        and only for mixed speeds."""
        assert main(["--nodes", "20", "--refresh", "2", "--arrivals", "500"]) == 0
        out = capsys.readouterr().out
        assert "| policy | speeds | N | refresh s |" in out
        assert "| two-choices/probed | mixed | 20 | any |" in out
        assert main(["--nodes", "20", "--refresh", "2", "--arrivals", "500", "--seeds", "2",
                     "--policies", "random,two-choices"]) == 0
        out = capsys.readouterr().out
        assert "| two-choices | mixed | 20 | 2 |" in out
        assert "seeds' range" in out

    def test_wait_output(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--wait prints the three policies' waits per mix and N, as JSON or as a table."""
        assert main(["--wait", "--nodes", "12", "--arrivals", "300", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [(r["policy"], r["mix"], r["nodes"]) for r in out["wait"]] == [
            ("random", "thirds", 12), ("client", "thirds", 12), ("central", "thirds", 12)]
        assert out["params"]["workers"] == 4 and out["params"]["utilization"] == 0.7
        assert main(["--wait", "--nodes", "12", "--arrivals", "300", "--mix", "mixed"]) == 0
        assert "| central | mixed | 12 |" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main(["--wait", "--utilization", "1.2"])
        with pytest.raises(SystemExit):
            main(["--wait", "--mix", "fast"])

    def test_bad_arguments_exit(self) -> None:
        """Nonsense arguments stop with a usage error."""
        with pytest.raises(SystemExit):
            main(["--nodes", "1"])
        with pytest.raises(SystemExit):
            main(["--policies", "three-choices"])
        with pytest.raises(SystemExit):
            main(["--seeds", "0"])
