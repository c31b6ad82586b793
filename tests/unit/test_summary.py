from __future__ import annotations

from collections import Counter

from layer_cache.cache_types import CacheType
from migrations_mode.progress import CacheStats
from migrations_mode.summary import CacheOutcome, format_summary_table, total_fields


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
        CacheOutcome(stats(CacheType.CAS, 10, 5), "completed"),
        CacheOutcome(stats(CacheType.CHANGE_BATCH, 3, 0), "interrupted"),
    ]
    total = total_fields(outcomes)
    assert total["processed"] == 18
    assert total["uploaded"] == 13
    assert total["retried"] == 4
    assert total["retries_by_class"] == {"throttled": 4}
    assert total["status"] == "partial"
    assert total["rows_per_s"] == 9.0


def test_table_has_a_line_per_cache_and_a_total() -> None:
    table = format_summary_table([CacheOutcome(stats(CacheType.CAS, 10, 5), "completed")])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["cache", "status", "processed"]
    assert lines[2].split()[:5] == ["cas", "completed", "15", "10", "5"]
    assert lines[-1].split()[:3] == ["total", "completed", "15"]


def test_verification_table_has_the_verification_columns() -> None:
    checked = CacheStats(
        CacheType.CAS,
        processed=12,
        verified=9,
        missing=2,
        mismatched=1,
        extra=4,
        started_at=0.0,
        finished_at=1.0,
    )
    table = format_summary_table([CacheOutcome(checked, "completed")], verifying=True)
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
    assert lines[2].split() == ["cas", "completed", "12", "9", "2", "1", "4", "0"]
    assert lines[-1].split()[:3] == ["total", "completed", "12"]
