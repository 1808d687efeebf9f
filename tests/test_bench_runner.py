"""
The benchmark runner (bench/__main__.py): how it reads benchmarks' JSON, builds the table, and
turns a failing, silent or overrunning benchmark into an ERROR row instead of crashing. The
benchmarks here are tiny fake commands; nothing measures the machine.
"""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import (
    GRACE_S,
    TOTAL_S,
    Bench,
    Row,
    cell,
    header,
    main,
    parse_json_lines,
    read_encode,
    read_loadbalance,
    read_membership_detect,
    read_membership_fp,
    read_membership_join,
    read_membership_scale,
    read_membership_sync,
    read_pipeline,
    read_pool_cost,
    read_split,
    read_store_upload,
    run_bench,
    select,
    suite,
    table,
    unignore_sigint,
)

PY = sys.executable


def fake(name: str, code: str, interpret: Any = None, budget: float = 20.0) -> Bench:
    """A benchmark whose command is ``python -c CODE``."""

    def first(objects: list[dict[str, Any]]) -> list[Row]:
        o = objects[0]
        return [Row(name, "<= 1", str(o["x"]), str(o["x"]), "PASS" if o["x"] <= 1 else "FAIL")]

    return Bench(name, "fake", f"fake {name}", "<= 1", ((PY, "-c", code),), budget, interpret or first)


@pytest.mark.integration  # real child processes: their output, exit status, signals and budgets
class RunBenchTests:
    def test_json_output_becomes_rows(self) -> None:
        """A benchmark that prints a JSON line (among other lines) gives the rows its reader builds."""
        rows = run_bench(fake("ok", "import json; print('hello'); print(json.dumps({'x': 0.5}))"))
        assert rows == [Row("ok", "<= 1", "0.5", "0.5", "PASS")]

    def test_nonzero_exit_is_an_error_row_with_stderr_tail(self) -> None:
        """Exit status 1 gives one ERROR row naming the status and carrying the end of stderr."""
        code = "import sys; print('line one', file=sys.stderr); print('it broke | badly', file=sys.stderr); sys.exit(1)"
        rows = run_bench(fake("bad", code))
        assert len(rows) == 1
        assert rows[0].verdict == "ERROR"
        assert rows[0].figure == "fake bad"
        assert "exit status 1" in rows[0].measured
        assert "it broke | badly" in rows[0].measured
        assert "\\|" in table(rows)  # the pipe is escaped in the table

    def test_timeout_is_an_error_row_and_the_process_is_stopped(self, tmp_path: Path) -> None:
        """A benchmark past its budget is interrupted (SIGINT first, so it can clean up) and reported."""
        marker = tmp_path / "cleaned"
        # A suite started in the background inherits an ignored SIGINT (sh's `&`): the child
        # takes Python's own handler back, as a benchmark started by `bench/run` gets it.
        code = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                "try:\n    print('starting', file=sys.stderr, flush=True)\n"
                f"    time.sleep(60)\nfinally:\n    open({str(marker)!r}, 'w').close()\n")
        started = time.monotonic()
        rows = run_bench(fake("slow", code, budget=3.0), grace=5.0)
        assert time.monotonic() - started < 12
        assert rows[0].verdict == "ERROR"
        assert "timed out" in rows[0].measured
        assert "starting" in rows[0].measured
        assert marker.exists()

    def test_a_runner_started_in_the_background_hands_on_a_default_sigint(self) -> None:
        """sh's `&` leaves SIGINT ignored, and children inherit that; after unignore_sigint a
        benchmark starts with Python's own SIGINT handler again."""
        probe = [PY, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "True"
            unignore_sigint()
            assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "False"
        finally:
            signal.signal(signal.SIGINT, before)

    def test_timeout_of_a_process_ignoring_sigint_ends_with_sigkill(self) -> None:
        """A benchmark that ignores SIGINT and SIGTERM is still killed within the grace periods."""
        code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n")
        started = time.monotonic()
        rows = run_bench(fake("stubborn", code, budget=0.5), grace=1.0)
        assert time.monotonic() - started < 6
        assert rows[0].verdict == "ERROR"

    def test_no_json_is_an_error_row(self) -> None:
        """A benchmark that exits 0 without a JSON object is an ERROR, not an empty table."""
        rows = run_bench(fake("silent", "print('a table, not JSON')"))
        assert rows[0].verdict == "ERROR"
        assert "no JSON" in rows[0].measured

    def test_reader_failure_is_an_error_row(self) -> None:
        """JSON without the expected fields makes an ERROR row naming the missing field."""
        rows = run_bench(fake("odd", "print('{\"y\": 1}')"))
        assert rows[0].verdict == "ERROR"
        assert "KeyError" in rows[0].measured

    def test_missing_program_is_an_error_row(self) -> None:
        """A command that cannot start is an ERROR row."""
        bench = Bench("nope", "fake", "fake nope", "-", (("/nonexistent/program",),), 5.0, read_pipeline)
        rows = run_bench(bench)
        assert rows[0].verdict == "ERROR"
        assert "could not start" in rows[0].measured

    def test_several_commands_feed_one_reader(self) -> None:
        """The objects of every command of a benchmark reach its reader in order."""
        commands = tuple((PY, "-c", f"print('{{\"nodes\": {n}, \"loss\": 0.01, \"msgs_per_node_s\": 2.0, "
                                    f"\"sync_bytes_per_node_s\": 5.0}}')") for n in (10, 1000))
        bench = Bench("scale", "fake", "scale", "-", commands, 20.0, read_membership_scale)
        rows = run_bench(bench)
        assert [r.verdict for r in rows] == ["PASS", "PASS"]
        assert "N=1000: 2.00" in rows[0].measured


class ReaderTests:
    def test_read_encode(self) -> None:
        """bench/encode.py: a row per codec and source, against its own goal, with its speed."""
        o = {"source": "noise", "height": 360, "seconds": 4.0, "speed": "fast",
             "h264": {"crf": 23, "bytes": 1000, "ssim": 0.95, "fps_per_core": 90.0},
             "hevc": {"crf": 27, "bytes": 700, "ssim": 0.951, "interpolated": False, "saving": 0.3, "goal": 0.25,
                      "fps_per_core": 30.0},
             "av1": {"crf": None, "bytes": 700, "ssim": 0.95, "interpolated": True, "saving": 0.3, "goal": 0.35,
                     "fps_per_core": 20.0}}
        hevc, av1 = read_encode([o])
        assert (hevc.ratio, hevc.verdict, av1.verdict) == ("30 %", "PASS", "FAIL")
        assert "crf 27" in hevc.measured and "interpolated" in av1.measured and "30.0 vs 90.0" in hevc.measured

    def test_read_split(self) -> None:
        """bench/split.py: four rows (wall, CPU, SSIM, size), each against its goal."""
        figure = {"measured": "m", "ratio": 1.9, "goal": ">= 1.8", "pass": True}
        o = {"seconds": 60.0, "frame_size": "640x360", "chunks": 4, "parallel": 2, "wall": figure,
             "cpu": {**figure, "ratio": 1.2, "pass": False}, "ssim": figure, "size": figure}
        rows = read_split([o])
        assert [r.verdict for r in rows] == ["PASS", "FAIL", "PASS", "PASS"]
        assert rows[0].figure.startswith("split: wall") and "4 chunks 2 at a time" in rows[0].figure

    def test_pipeline_rows_keep_title_goal_and_verdict(self) -> None:
        """pipeline.py's objects become rows; PASS/FAIL leave the ratio text for the verdict column."""
        rows = read_pipeline([
            {"title": "pool overhead", "goal": "<= 1.03", "measured": "node 1 s", "verdict": "1.05 FAIL (CPU 1.06)",
             "pass": False},
            {"title": "memory", "goal": "<= 64 MiB", "measured": "+0 MiB", "verdict": "0.1x stock; PASS", "pass": True},
        ])
        assert rows[0] == Row("pool overhead", "<= 1.03", "node 1 s", "1.05 (CPU 1.06)", "FAIL")
        assert rows[1].ratio == "0.1x stock"
        assert rows[1].verdict == "PASS"

    def test_store_upload(self) -> None:
        """The store/boto3 ratio is checked against 0.9."""
        o = {"size_mb": 64, "rounds": 2, "store_mb_s": 90.0, "boto3_mb_s": 100.0, "ratio": 0.9, "goal": 0.9}
        assert read_store_upload([o])[0].verdict == "PASS"
        assert read_store_upload([{**o, "ratio": 0.89}])[0].verdict == "FAIL"

    def test_loadbalance_picks_two_choices_at_the_shortest_refresh(self) -> None:
        """One row per N, from two-choices with the mixed speeds at the shortest refresh period."""
        results = [
            {"policy": "random", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 10, "max_over_mean": 1.7},
            {"policy": "two-choices", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 9, "max_over_mean": 1.2},
            {"policy": "two-choices", "mix": "mixed", "nodes": 10, "refresh": 30.0, "mean": 9, "max_over_mean": 1.5},
            {"policy": "two-choices", "mix": "mixed", "nodes": 1000, "refresh": 2.0, "mean": 9,
             "max_over_mean": 1.49},
        ]
        rows = read_loadbalance([{"results": results}])
        assert [(r.ratio, r.verdict) for r in rows] == [("1.200", "PASS"), ("1.490", "FAIL")]
        assert "random 1.700" in rows[0].measured

    def test_loadbalance_reads_the_clients_live_rule_first(self) -> None:
        """With the live-check rule in the results, the row is about it; the stale figure is beside."""
        results = [
            {"policy": "random", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 10, "max_over_mean": 1.7},
            {"policy": "two-choices", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 9, "max_over_mean": 1.27},
            {"policy": "two-choices/probed", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 9,
             "max_over_mean": 1.24},
        ]
        rows = read_loadbalance([{"results": results}])
        assert [(r.ratio, r.verdict) for r in rows] == [("1.240", "PASS")]
        assert "read live" in rows[0].measured and "stale registry loads 1.270" in rows[0].measured

    def test_loadbalance_wait_rows_come_first_against_the_central_dispatcher(self) -> None:
        """With --wait results, one row per N and mix of speeds holds the client's p99 over the
        central dispatcher's against 1.5; max/mean rows, from a default run, follow."""
        def w(policy: str, mix: str, n: int, p99: float) -> dict[str, object]:
            return {"policy": policy, "mix": mix, "nodes": n, "p99": p99, "mean": p99 / 5}

        wait = [w("random", "thirds", 10, 600.0), w("client", "thirds", 10, 225.0), w("central", "thirds", 10, 214.0),
                w("client", "thirds", 1000, 330.0), w("central", "thirds", 1000, 200.0),
                w("client", "mixed", 1000, 100.0), w("central", "mixed", 1000, 100.0)]
        results = [{"policy": "two-choices/probed", "mix": "mixed", "nodes": 10, "refresh": 2.0, "mean": 9,
                    "max_over_mean": 1.9}]
        rows = read_loadbalance([{"wait": wait}, {"results": results}])
        assert [(r.ratio, r.verdict) for r in rows] == [("1.051", "PASS"), ("1.650", "FAIL"), ("1.000", "PASS"),
                                                        ("1.900", "FAIL")]
        assert "N=1000, a third of the nodes 2x" in rows[1].figure and rows[1].goal == "<= 1.5"
        assert "random 600 s" in rows[0].measured and "random" not in rows[1].measured
        assert read_loadbalance([{"wait": wait}])[0].ratio == "1.051"
        with pytest.raises(ValueError):
            read_loadbalance([{"other": 1}])

    def test_membership_detection_rows(self) -> None:
        """Median and p99 get their own rows; a kill never seen dead everywhere fails both."""
        o = {"nodes": 1000, "loss": 0.01, "kills": 5, "seconds": 90, "dead_everywhere_median_s": 4.0,
             "dead_everywhere_p99_s": 9.0, "kills_not_dead_everywhere": 0, "detect_first_s": 1.5}
        assert [r.verdict for r in read_membership_detect([o])] == ["PASS", "FAIL"]
        assert [r.verdict for r in read_membership_detect([{**o, "kills_not_dead_everywhere": 1}])] == ["FAIL"] * 2
        rows = read_membership_detect([{**o, "kill_mode": "process"}, {**o, "kill_mode": "host"}])
        assert len(rows) == 4 and "refused" in rows[0].figure and "silence" in rows[2].figure

    def test_membership_null_figure_is_an_error(self) -> None:
        """A figure the simulation could not measure (null) is not read as a pass."""
        with pytest.raises(ValueError):
            read_membership_join([{"nodes": 10, "loss": 0.05, "joins": 1, "join_converged_s": None}])

    def test_membership_false_positives_and_short_run_note(self) -> None:
        """Any false positive fails; a run shorter than an hour says so in the figure column."""
        o = {"nodes": 1000, "loss": 0.05, "stall_fraction": 0.05, "seconds": 600, "false_positives": 0}
        row = read_membership_fp([o])[0]
        assert row.verdict == "PASS"
        assert "600 s simulated" in row.figure
        assert read_membership_fp([{**o, "false_positives": 2}])[0].verdict == "FAIL"

    def test_membership_scale_flatness(self) -> None:
        """Messages must stay within ±10% of N=10 and under 4; sync bytes must not grow."""
        objs = [{"nodes": n, "loss": 0.01, "msgs_per_node_s": m, "sync_bytes_per_node_s": s}
                for n, m, s in ((10, 2.0, 4.0), (100, 2.1, 4.1), (1000, 2.3, 6.0))]
        msgs, sync = read_membership_scale(objs)
        assert msgs.verdict == "FAIL"  # 2.3 is 15% over 2.0
        assert sync.verdict == "FAIL"  # 6.0 / 4.0 = 1.5
        assert sync.ratio == "1.50"

    def test_membership_sync_rows(self) -> None:
        """A row per scenario: PASS when level and nothing over the limit; the whole table is a note."""
        base = {"nodes": 5000, "limit": 60_000, "members_sent": 1}
        rows = read_membership_sync([
            {**base, "scenario": "missed", "messages": 4, "bytes": 107_000, "max_message_bytes": 49_675,
             "over_limit": 0, "converged": True},
            {**base, "scenario": "joiner", "messages": 12, "bytes": 540_000, "max_message_bytes": 59_805,
             "over_limit": 0, "converged": False},
            {**base, "scenario": "whole", "messages": 1, "bytes": 526_315, "max_message_bytes": 526_315,
             "over_limit": 1, "converged": None}])
        assert [r.verdict for r in rows] == ["PASS", "FAIL"]
        assert "526,315 B" in rows[0].measured and "NOT level" in rows[1].measured

    def test_membership_scale_counts_every_message_and_the_largest(self) -> None:
        """With the simulator's byte figures: a row for all messages' bytes, one for the largest."""
        objs = [{"nodes": n, "loss": 0.01, "msgs_per_node_s": 2.0, "sync_bytes_per_node_s": 5.0,
                 "bytes_per_node_s": b, "max_message_bytes": big, "max_message_limit": 60_000,
                 "oversized_messages": over}
                for n, b, big, over in ((10, 800.0, 400, 0), (1000, 1000.0, 61_000, 1))]
        _, _, every, largest = read_membership_scale(objs)
        assert every.verdict == "FAIL" and every.ratio == "1.25" and "N=1000: 1000" in every.measured
        assert largest.verdict == "FAIL" and "61,000 bytes; 1 over" in largest.measured

    def test_pool_cost_rows_one_per_goal_with_the_runs_figures(self) -> None:
        """A row per PASS/FAIL goal (N/A ones left out); a steady run's row carries its requests, dollars
        and busiest prefix; the linear object is a row of its own."""
        run = {"requests_per_s": 390.8, "dollars_per_day": 84.38,
               "busiest": {"busiest_prefix": "jobs/", "busiest_share": 0.085},
               "goals": [{"goal": "steady, N=100: requests", "target": "<= 0.1", "measured": 3.9, "verdict": "FAIL"},
                         {"goal": "inbound", "target": "none", "measured": "not modelled", "verdict": "N/A"}]}
        linear = {"linear": {"goal": "grows linearly", "target": "never faster", "measured": "3.7 -> 3.9",
                             "verdict": "PASS"}}
        rows = read_pool_cost([run, linear])
        assert [r.verdict for r in rows] == ["FAIL", "PASS"]
        assert "390.8 req/s, $84.38/day, busiest jobs/ 8.5%" in rows[0].measured
        with pytest.raises(ValueError):
            read_pool_cost([{"goals": []}])


class TableTests:
    def test_table_shape(self) -> None:
        """A header, a separator and one line per row, five columns each."""
        text = table([Row("a", "b", "c\nd", "e", "PASS")])
        lines = text.splitlines()
        assert lines[0] == "| figure | goal | measured | ratio | verdict |"
        assert lines[2] == "| a | b | c d | e | PASS |"
        assert cell("x | y") == "x \\| y"

    def test_header_names_date_cores_cpu_and_command(self) -> None:
        """The header line carries the date, nproc, the CPU model and the exact command."""
        text = header("python -m bench --quick", datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.UTC))
        assert text.startswith("2026-01-02 03:04 UTC")
        assert "nproc " in text
        assert "CPU " in text
        assert "`python -m bench --quick`" in text

    def test_parse_json_lines_skips_other_lines(self) -> None:
        """Progress text and broken lines are ignored; each JSON object is kept."""
        text = "progress\n{\"a\": 1}\n{broken\n[1, 2]\n" + json.dumps({"b": 2}) + "\n"
        assert parse_json_lines(text) == [{"a": 1}, {"b": 2}]


class SuiteTests:
    def test_every_benchmark_is_in_the_suite_with_a_budget(self) -> None:
        """The suite runs every script in bench/ with --json, each under a budget within the suite's limit,
        and that limit plus the grace periods of an overrun stays within 10 minutes."""
        assert TOTAL_S + 1.5 * GRACE_S <= 600
        for quick in (False, True):
            benches = suite(quick)
            scripts = {c[1] for b in benches for c in b.commands}
            assert scripts == {"bench/pipeline.py", "bench/store_upload.py", "bench/loadbalance.py",
                               "bench/membership_sim.py", "bench/membership_sync.py", "bench/pool_cost.py",
                               "bench/encode.py", "bench/split.py"}
            assert all(0 < b.budget_s <= TOTAL_S for b in benches)
            assert all(any("--json" in c for c in b.commands) for b in benches)

    def test_select_by_name_and_group(self) -> None:
        """--only takes a benchmark's name or its group; an unknown name is refused."""
        benches = suite()
        assert [b.name for b in select(benches, ["pool"])] == ["pool"]
        assert {b.name for b in select(benches, ["membership"])} == {
            "membership_detect", "membership_fp", "membership_scale", "membership_join", "membership_sync"}
        with pytest.raises(ValueError):
            select(benches, ["nosuch"])

    @pytest.mark.integration  # runs its fake benchmarks as processes
    def test_main_prints_and_writes_the_table(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """main() runs the chosen benchmarks, prints header and table, writes --markdown, and exits 1
        when a row is ERROR."""
        benches = [fake("good", "print('{\"x\": 2}')"), fake("broken", "raise SystemExit(3)")]
        monkeypatch.setattr("bench.__main__.suite", lambda quick=False: benches)
        out = tmp_path / "table.md"
        assert main(["--markdown", str(out)]) == 1
        printed = capsys.readouterr().out
        assert "| good | <= 1 | 2 | 2 | FAIL |" in printed
        assert "| fake broken |" in printed and "ERROR" in printed
        assert out.read_text() == printed
        assert main(["--only", "good"]) == 0

    @pytest.mark.integration  # runs its fake benchmarks as processes
    def test_suite_limit_skips_what_does_not_fit(self, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
        """Once the suite's time limit is spent, the remaining benchmarks are ERROR rows, not run."""
        benches = [fake("slow", "import time; time.sleep(30)", budget=2.0), fake("later", "print('{\"x\": 0}')")]
        monkeypatch.setattr("bench.__main__.suite", lambda quick=False: benches)
        monkeypatch.setattr("bench.__main__.GRACE_S", 1.0)
        started = time.monotonic()
        assert main(["--total-seconds", "6.5"]) == 1
        assert time.monotonic() - started < 6
        printed = capsys.readouterr().out
        assert "timed out" in printed
        assert "| fake later |" in printed and "not run" in printed
