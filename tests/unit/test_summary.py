from __future__ import annotations

from collections import Counter

import pytest

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CacheType
from layer_cache.errors import ErrorKind
from migrations_mode.config import VerifyMode
from migrations_mode.progress import CacheStats
from migrations_mode.summary import (
    SUMMARY_WIDTH,
    CacheOutcome,
    Status,
    finished_status,
    format_summary_table,
    total_fields,
)
from migrations_mode.tables import format_bytes, format_count


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
    assert total["already_complete"] is False


def test_table_has_a_line_per_cache_and_a_total_then_the_time_and_retries() -> None:
    table = format_summary_table([CacheOutcome(stats(CacheType.CAS, 10, 5), Status.COMPLETED)])
    lines = table.splitlines()
    assert lines[0].split() == [
        *("cache", "status", "processed", "uploaded", "skipped", "bytes", "rows/s")
    ]
    assert lines[2].split() == ["cas", "completed", "15", "10", "5", "10.0MiB", "8"]
    assert lines[4].split() == ["total", "completed", "15", "10", "5", "10.0MiB", "8"]
    assert lines[5:] == ["elapsed 2s", "retried 2 storage calls: throttled 2"]


def test_a_copy_shows_repaired_and_vanished_only_when_there_are_some() -> None:
    quiet = format_summary_table([CacheOutcome(stats(CacheType.CAS, 1, 0), Status.COMPLETED)])
    assert "repaired" not in quiet
    assert "vanished" not in quiet
    eventful = CacheStats(
        CacheType.CAS, processed=4, uploaded=3, repaired=1, vanished=1, bytes_uploaded=3
    )
    lines = format_summary_table([CacheOutcome(eventful, Status.COMPLETED)]).splitlines()
    assert lines[0].split()[2:6] == ["processed", "uploaded", "skipped", "repaired"]
    assert lines[2].split()[2:6] == ["4", "3", "0", "1"]
    assert "vanished 1 rows: deleted between listing and reading" in lines


def huge_stats(cache_type: CacheType) -> CacheStats:
    """Every count non-zero and nine digits long, a day and more of run time."""
    count = 987_654_321
    return CacheStats(
        cache_type,
        processed=count,
        uploaded=count,
        skipped=count,
        repaired=count,
        vanished=count,
        bytes_uploaded=count * 4 * 1024 * 1024,
        verified=count,
        missing=count,
        mismatched=count,
        extra=count,
        retries=Counter({kind.value: count for kind in ErrorKind}),
        started_at=0.0,
        finished_at=30 * 3600.0,
    )


@pytest.mark.parametrize("mode", list(VerifyMode))
def test_the_table_fits_100_columns_with_the_longest_names_and_the_largest_counts(
    mode: VerifyMode,
) -> None:
    longest = max(BACKFILLABLE_CACHE_TYPES, key=len)
    assert longest == "split_snapshot_rebase_batch"
    outcomes = [
        CacheOutcome(huge_stats(cache_type), status)
        for cache_type, status in zip(
            [longest, *BACKFILLABLE_CACHE_TYPES], [*Status, *Status], strict=False
        )
    ]

    table = format_summary_table(outcomes, mode)

    widths = [len(line) for line in table.splitlines()]
    assert max(widths) <= SUMMARY_WIDTH, table
    assert longest in table
    assert "interrupted" in table
    assert "987.7M" in table  # counts shown, not cut
    assert "repaired" in table.splitlines()[0] or mode in (VerifyMode.SIZE, VerifyMode.CONTENT)


def test_a_cache_that_was_already_complete_has_no_rate() -> None:
    done = CacheStats(CacheType.CAS, started_at=0.0, finished_at=0.01)
    ran = stats(CacheType.CHANGE_BATCH, 10, 0)
    outcomes = [
        CacheOutcome(done, Status.COMPLETED, already_complete=True),
        CacheOutcome(ran, Status.COMPLETED),
    ]

    assert outcomes[0].as_fields()["rows_per_s"] is None
    assert outcomes[0].as_fields()["already_complete"] is True
    assert outcomes[1].as_fields()["rows_per_s"] == 5.0
    assert total_fields(outcomes)["rows_per_s"] == 5.0
    assert total_fields(outcomes[:1])["rows_per_s"] is None
    lines = format_summary_table(outcomes).splitlines()
    assert lines[2].split() == ["cas", "completed", "0", "0", "0", "0B", "-"]
    assert lines[3].split()[-1] == "5"


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0"),
        (999_999, "999,999"),
        (1_000_000, "1.000M"),
        (12_345_678, "12.35M"),
        (987_654_321, "987.7M"),
        (999_999_999, "1.000B"),
        (7_901_234_568, "7.901B"),
    ],
)
def test_counts_are_exact_below_a_million_then_four_digits(count: int, shown: str) -> None:
    assert format_count(count) == shown


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (10 * 1024 * 1024, "10.0MiB"),
        (10_235, "10.0KiB"),
        (1024**2 - 1, "1024KiB"),
        (3 * 1024**5, "3.00PiB"),
    ],
)
def test_bytes_are_in_binary_units_at_most_seven_characters(size: int, shown: str) -> None:
    assert format_bytes(size) == shown
    assert len(shown) <= 7


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
        "rows/s",
    ]
    assert lines[2].split() == ["cas", "differences", "12", "9", "2", "1", "4", "12"]
    assert lines[4].split()[:3] == ["total", "differences", "12"]
    assert lines[5:] == ["elapsed 1s"]


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
        "rows/s",
    ]
    assert lines[2].split()[:7] == ["cas", "repaired", "12", "9", "2", "1", "3"]


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
