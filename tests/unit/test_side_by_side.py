"""The side-by-side comparison's pure core: what two runs' outcomes must share."""

from __future__ import annotations

import json
from typing import Any

from devenv.side_by_side import differences, outcome_of


def line(event: str, level: str = "info", **fields: Any) -> str:
    return json.dumps({"event": event, "level": level, "timestamp": "t", **fields})


SUMMARY = "completed backfill"


def test_the_same_run_at_another_speed_has_no_differences() -> None:
    old = outcome_of(
        0,
        [
            line("backfill progress", rows=1, rows_per_s=10.0),
            line("backfill progress", rows=2, rows_per_s=12.0),
            line(SUMMARY, uploaded=300, skipped=0, elapsed_s=4.2),
            "not JSON: a stray line",
        ],
    )
    new = outcome_of(
        0,
        [
            line("backfill progress", rows=3, rows_per_s=99.0),
            line(SUMMARY, uploaded=300, skipped=0, elapsed_s=1.0),
        ],
    )
    assert differences(old, new) == []


def test_a_different_count_status_or_event_is_named() -> None:
    old = outcome_of(0, [line(SUMMARY, uploaded=300, skipped=0), line("row retried")])
    new = outcome_of(1, [line(SUMMARY, uploaded=299, skipped=1), line("row retried", "warning")])
    found = differences(old, new)
    assert found[0] == "exit status 0 != 1"
    assert any("'row retried', 'info'" in entry and "1 x old, 0 x new" in entry for entry in found)
    assert any(entry.startswith("new only:") and '"uploaded": 299' in entry for entry in found)
    assert any(entry.startswith("old only:") and '"uploaded": 300' in entry for entry in found)


def test_a_periodic_event_is_compared_by_its_fields_not_its_count() -> None:
    old = outcome_of(0, [line("backfill checkpoint", rows=1)] * 3)
    same = outcome_of(0, [line("backfill checkpoint", rows=7)])
    renamed = outcome_of(0, [line("backfill checkpoint", rows_done=7)])
    assert differences(old, same) == []
    assert differences(old, renamed) == [
        "periodic event ('backfill checkpoint', ('level', 'rows')) only in old",
        "periodic event ('backfill checkpoint', ('level', 'rows_done')) only in new",
    ]
