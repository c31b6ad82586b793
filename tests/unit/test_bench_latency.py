"""The latency section's pure parts: the verdict, the SlowDown share and the report."""

from __future__ import annotations

from bench.latency import latency_report, slowdown_share, verdict


def test_the_verdict_compares_tuned_with_the_fastest_fixed_level() -> None:
    found = verdict({4: 100.0, 32: 450.0, 128: 400.0}, tuned_rows_per_s=410.0)
    assert (found.best_fixed, found.best_fixed_rows_per_s) == (32, 450.0)
    assert found.holds  # 410 / 450 = 0.91
    assert "0.91x the best fixed (C=32, 450 rows/s); >= 0.9x: yes" in found.line(20)
    assert not verdict({8: 500.0}, tuned_rows_per_s=440.0).holds


def test_the_slowdown_share_counts_outcomes_not_their_per_method_copies() -> None:
    counts = {"forwarded": 90, "slowdown": 10, "PUT:forwarded": 90, "PUT:slowdown": 10}
    assert slowdown_share(counts) == 0.1
    assert slowdown_share({}) == 0.0


def test_the_report_has_a_row_per_latency_the_verdicts_and_the_throttling_lines() -> None:
    sweep = {
        "latency_ms": 20.0,
        "fixed_rows_per_s": {"4": 100.0, "64": 500.0},
        "tuned_rows_per_s": 480.0,
        "ratio_to_best": 0.96,
        "verdict": "+20 ms: tuned ...",
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
    assert "C=4" in text
    assert "C=64" in text
    assert "0.96" in text
    assert "+20 ms: tuned ..." in text
    assert "12 SlowDown of 3,000 requests (0.4%); storm (> 5%): no" in text
