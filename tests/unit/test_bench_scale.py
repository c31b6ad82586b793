"""bench.scale's pure parts: the verdicts from the runs' summaries, and the extrapolation."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scale import Extrapolation, scale_figures


def run(rows: int, seconds: float, rss: float, tuples: float | None) -> dict[str, Any]:
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_rss_mib": rss,
        "pg_tuples_per_row": tuples,
    }


def test_linear_flat_and_few_tuples_hold() -> None:
    figures = scale_figures(
        run(250_000, 250.0, 160.0, 2.2),
        run(1_000_000, 1_100.0, 170.0, 2.21),
        {2: run(250_000, 150.0, 90.0, 2.3), 4: run(250_000, 125.0, 90.0, 2.4)},
    )
    assert (figures["rows_ratio"], figures["time_ratio"]) == (4.0, 4.4)
    assert figures["linear"] is True
    assert (figures["rss_growth_mib"], figures["rss_flat"]) == (10.0, True)
    assert figures["tuples_ok"] is True
    assert figures["shards_speedup"] == {"2": pytest.approx(1.67, abs=0.01), "4": 2.0}
    assert figures["ms_per_row"] == {"smaller": 1.0, "larger": 1.1}


@pytest.mark.parametrize(
    ("larger", "failed"),
    [
        (run(1_000_000, 1_251.0, 160.0, 2.2), "linear"),  # 5.004 x time for 4 x rows
        (run(1_000_000, 1_000.0, 210.1, 2.2), "rss_flat"),  # grew 50.1 MiB
        (run(1_000_000, 1_000.0, 160.0, 3.1), "tuples_ok"),  # more than 3 per row
        (run(1_000_000, 1_000.0, 160.0, 2.5), "tuples_ok"),  # not flat: 2.2 -> 2.5
        (run(1_000_000, 1_000.0, 160.0, None), "tuples_ok"),  # not measured
    ],
)
def test_each_verdict_fails_past_its_limit(larger: dict[str, Any], failed: str) -> None:
    figures = scale_figures(run(250_000, 250.0, 160.0, 2.2), larger, {})
    verdicts = {name: figures[name] for name in ("linear", "rss_flat", "tuples_ok")}
    assert [name for name, holds in verdicts.items() if not holds] == [failed]


def test_extrapolation_to_a_hundred_million_rows() -> None:
    extrapolation = Extrapolation(measured_rows_per_s=1_000.0, cpu_ms_per_object=0.5)
    assert extrapolation.cpu_bound_rows_per_s == 2_000.0
    document = extrapolation.as_json([1, 4])
    assert document["hours_at_measured_rate"] == {"1": 27.78, "4": 6.94}
    assert document["hours_cpu_bound_one_core_per_pod"] == {"1": 13.89, "4": 3.47}
