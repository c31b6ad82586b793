from __future__ import annotations

from collections import Counter

import pytest

from layer_cache.cache_types import CacheType
from migrations_mode.config import VerifyMode
from migrations_mode.progress import CacheStats
from migrations_mode.summary import (
    CacheOutcome,
    Status,
    finished_status,
    format_summary_table,
    total_fields,
)


def stats(cache_type: CacheType, uploaded: int, skipped: int) -> CacheStats:
    return CacheStats(
        cache_type,
        processed=uploaded + skipped,
        uploaded=uploaded,
        skipped=skipped,
        bytes_uploaded=uploaded * 1024 * 1024,
        retries=Counter({"throttled": 2}),
        started_at=0.0,
        finished_at=2.0,
    )


def test_total_sums_caches_and_reports_partial_status() -> None:
    outcomes = [
        CacheOutcome(stats(CacheType.CAS, 10, 5), Status.COMPLETED),
        CacheOutcome(stats(CacheType.CHANGE_BATCH, 3, 0), Status.INTERRUPTED),
    ]
    total = total_fields(outcomes)
    assert total["processed"] == 18
    assert total["uploaded"] == 13
    assert total["retried"] == 4
    assert total["retries_by_class"] == {"throttled": 4}
    assert total["status"] == "partial"
    assert total["rows_per_s"] == 9.0


def test_table_has_a_line_per_cache_and_a_total() -> None:
    table = format_summary_table([CacheOutcome(stats(CacheType.CAS, 10, 5), Status.COMPLETED)])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["cache", "status", "processed"]
    assert lines[2].split()[:5] == ["cas", "completed", "15", "10", "5"]
    assert lines[-1].split()[:3] == ["total", "completed", "15"]


CHECKED = CacheStats(
    CacheType.CAS,
    processed=12,
    verified=9,
    missing=2,
    mismatched=1,
    extra=4,
    started_at=0.0,
    finished_at=1.0,
)


def test_verification_table_has_the_verification_columns_and_says_differences() -> None:
    status = finished_status(VerifyMode.CONTENT, CHECKED)
    table = format_summary_table([CacheOutcome(CHECKED, status)], VerifyMode.CONTENT)
    lines = table.splitlines()
    assert lines[0].split() == [
        "cache",
        "status",
        "checked",
        "ok",
        "missing",
        "mismatched",
        "extra",
        "retried",
    ]
    assert lines[2].split() == ["cas", "differences", "12", "9", "2", "1", "4", "0"]
    assert lines[-1].split()[:3] == ["total", "differences", "12"]


def test_repair_table_says_what_it_reuploaded() -> None:
    repaired = CacheStats(
        CacheType.CAS, processed=12, verified=9, missing=2, mismatched=1, repaired=3, uploaded=3
    )
    status = finished_status(VerifyMode.REPAIR, repaired)
    lines = format_summary_table([CacheOutcome(repaired, status)], VerifyMode.REPAIR).splitlines()
    assert lines[0].split() == [
        "cache",
        "status",
        "checked",
        "ok",
        "missing",
        "mismatched",
        "repaired",
        "retried",
    ]
    assert lines[2].split() == ["cas", "repaired", "12", "9", "2", "1", "3", "0"]


@pytest.mark.parametrize(
    ("mode", "found", "status"),
    [
        (VerifyMode.OFF, CacheStats(CacheType.CAS, repaired=2), Status.COMPLETED),
        (VerifyMode.SIZE, CacheStats(CacheType.CAS, verified=3), Status.COMPLETED),
        (VerifyMode.SIZE, CacheStats(CacheType.CAS, extra=1), Status.DIFFERENCES),
        (VerifyMode.CONTENT, CacheStats(CacheType.CAS, mismatched=1), Status.DIFFERENCES),
        (VerifyMode.REPAIR, CacheStats(CacheType.CAS, missing=1, repaired=1), Status.REPAIRED),
        (VerifyMode.REPAIR, CacheStats(CacheType.CAS, verified=5), Status.COMPLETED),
    ],
)
def test_a_finished_walk_says_what_it_found(
    mode: VerifyMode, found: CacheStats, status: Status
) -> None:
    assert finished_status(mode, found) is status
    assert status.finished


def test_a_run_whose_caches_all_finished_is_not_partial() -> None:
    outcomes = [
        CacheOutcome(CHECKED, Status.DIFFERENCES),
        CacheOutcome(CacheStats(CacheType.CHANGE_BATCH, processed=3), Status.COMPLETED),
    ]
    assert total_fields(outcomes)["status"] == "differences"
