"""The latency section's pure parts: the verdict, the SlowDown share and the report."""

from __future__ import annotations

import re

import pytest

from bench.latency import (
    client_costs,
    finalists,
    judged,
    latency_report,
    parse_args,
    rotated,
    slowdown_share,
    verdict,
)


def test_the_verdict_compares_tuned_with_the_fastest_fixed_level() -> None:
    found = verdict({4: 100.0, 32: 450.0, 128: 400.0}, tuned_rows_per_s=410.0)
    assert (found.best_fixed, found.best_fixed_rows_per_s) == (32, 450.0)
    assert found.holds  # 410 / 450 = 0.91
    assert "0.91x the best fixed (C=32, 450 rows/s); >= 0.9x: yes" in found.line(20)
    assert not verdict({8: 500.0}, tuned_rows_per_s=440.0).holds


def test_the_finalists_are_the_fastest_levels_of_the_sweep_fastest_first() -> None:
    assert finalists({8: 280.0, 16: 450.0, 64: 690.0, 128: 660.0}) == [64, 128]
    assert finalists({8: 280.0}) == [8]


def test_each_round_starts_one_place_further_in() -> None:
    rounds = [rotated([128, 64, None], turn) for turn in range(2, 5)]
    assert rounds == [[None, 128, 64], [128, 64, None], [64, None, 128]]
    assert rotated([], 3) == []


def test_levels_and_tuned_are_judged_by_their_medians_beside_the_sweep_alone() -> None:
    # the sweep's single run at C=64 was lucky; its two repeats were not
    fixed_runs = {32: [500.0], 64: [760.0, 610.0, 600.0], 128: [700.0, 690.0, 720.0]}
    tuned_runs = [640.0, 660.0, 650.0, 700.0]
    on_medians, sweep_only = judged(fixed_runs, tuned_runs)
    assert (on_medians.best_fixed, on_medians.best_fixed_rows_per_s) == (128, 700.0)
    assert on_medians.tuned_rows_per_s == 655.0  # the median of four
    assert on_medians.holds  # 655 / 700 = 0.94
    assert (sweep_only.best_fixed, sweep_only.best_fixed_rows_per_s) == (64, 760.0)
    assert sweep_only.tuned_rows_per_s == 650.0  # the mean of the first two
    assert not sweep_only.holds  # 650 / 760 = 0.86


def test_latency_flags_out_of_range_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--latency-repeat", "-1"])
    assert exited.value.code == 2
    assert "--latency-repeat >= 0" in capsys.readouterr().err


def test_the_slowdown_share_counts_outcomes_not_their_per_method_copies() -> None:
    counts = {"forwarded": 90, "slowdown": 10, "PUT:forwarded": 90, "PUT:slowdown": 10}
    assert slowdown_share(counts) == 0.1
    assert slowdown_share({}) == 0.0


def test_client_costs_are_the_baselines_runs_and_the_medians_of_the_backfill_runs() -> None:
    def summary(rows_per_s: float, cpu: float) -> dict[str, float]:
        return {"rows_per_s": rows_per_s, "cpu_ms_per_object": cpu}

    runs = {
        "tuned-1": summary(400, 0.9),
        "fixed-16": summary(300, 1.0),
        "fixed-64": summary(500, 0.8),
        "tuned-2": summary(480, 1.1),
        "fixed-64-2": summary(520, 0.7),
        "fixed-64-3": summary(510, 0.75),
        "tuned-3": summary(460, 1.0),
        "bare_put": summary(530, 1.2),
        "upstream": summary(260, 2.4),
    }
    assert client_costs(runs, 64) == {
        "bare_put (C=64)": summary(530, 1.2),
        "upstream (C=64)": summary(260, 2.4),
        "backfill (C=64)": summary(510, 0.75),
        "backfill (tuned)": summary(460, 1.0),
    }


def test_the_report_has_a_row_per_latency_the_verdicts_and_the_throttling_lines() -> None:
    sweep = {
        "latency_ms": 20.0,
        "delay": "relay",
        "fixed_rows_per_s": {"4": 100.0, "64": 500.0},
        "fixed_runs_rows_per_s": {"4": [100.0], "64": [520.0, 500.0, 490.0]},
        "tuned_rows_per_s": 480.0,
        "tuned_runs_rows_per_s": [470.0, 480.0, 490.0, 480.0],
        "ratio_to_best": 0.96,
        "verdict": "+20 ms: tuned ...",
        "sweep_only": {"best_fixed": 64, "best_fixed_rows_per_s": 520.0, "ratio_to_best": 0.91},
        "clients": {
            "bare_put (C=64)": {"rows_per_s": 530.0, "cpu_ms_per_object": 1.2},
            "upstream (C=64)": {"rows_per_s": 260.0, "cpu_ms_per_object": 2.4},
            "backfill (C=64)": {"rows_per_s": 500.0, "cpu_ms_per_object": 0.9},
        },
    }
    run = {"rows_per_s": 140.0, "slowdowns": 12, "requests": 3000, "slowdown_share": 0.004}
    text = latency_report(
        {
            "sweeps": [sweep],
            "throttle": {
                "latency_ms": 20.0,
                "rate_per_s": 150.0,
                "fixed": run | {"storm": False},
                "tuned": run | {"storm": False},
            },
        }
    )
    assert "behind a delay (the TCP relay;" in text
    assert "C=4" in text
    assert "C=64" in text
    assert "500 (3)" in text  # a level's median and its number of runs
    assert "480 (4)" in text
    assert "0.96" in text
    assert "the best single run against tuned's first two): 0.91x (C=64, 520 rows/s)" in text
    assert "+20 ms: tuned ..." in text
    assert "each way to copy at each latency" in text
    assert re.search(r"upstream \(C=64\)\s+260\s+2\.400\s+2\.00", text)
    assert re.search(r"backfill \(C=64\)\s+500\s+0\.900\s+0\.75", text)
    assert "12 SlowDown of 3,000 requests (0.4%); storm (> 5%): no" in text
