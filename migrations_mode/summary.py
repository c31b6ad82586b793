"""The end-of-run summary: per cache and in total, as log events and as a table.

A cache's status says how its walk ended: ``completed`` (copied, or compared and found nothing),
``differences`` (a verification found objects that are not their rows' bytes), ``repaired`` (a
repair re-uploaded some), or ``failed``, ``interrupted``, ``cancelled`` (the walk did not end).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from migrations_mode.config import VerifyMode
from migrations_mode.progress import CacheStats
from migrations_mode.tables import render_table


class Status(StrEnum):
    """How a cache's walk ended."""

    COMPLETED = "completed"
    DIFFERENCES = "differences"
    REPAIRED = "repaired"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """The walk reached the end of the cache's rows."""
        return self in (Status.COMPLETED, Status.DIFFERENCES, Status.REPAIRED)


def differences_in(stats: CacheStats) -> int:
    """Objects a comparison found missing, other or without a row."""
    return stats.missing + stats.mismatched + stats.extra


def finished_status(mode: VerifyMode, stats: CacheStats) -> Status:
    """The status of a walk that reached its end: what it found, for a comparison."""
    if mode is VerifyMode.REPAIR and stats.repaired:
        return Status.REPAIRED
    if mode.compares and mode is not VerifyMode.REPAIR and differences_in(stats):
        return Status.DIFFERENCES
    return Status.COMPLETED


_COLUMNS = (
    "cache",
    "status",
    "processed",
    "uploaded",
    "skipped",
    "repaired",
    "vanished",
    "retried",
    "MiB",
    "elapsed s",
    "rows/s",
)


@dataclass(frozen=True)
class CacheOutcome:
    """A cache's stats and whether it finished."""

    stats: CacheStats
    status: Status

    @property
    def finished(self) -> bool:
        """The walk reached the end of the cache's rows."""
        return self.status.finished

    def as_fields(self) -> dict[str, object]:
        """The summary of this cache as log fields."""
        return summary_fields(self.stats.cache_type.value, self.status, [self.stats])


def summary_fields(name: str, status: str, stats: Sequence[CacheStats]) -> dict[str, object]:
    """Summed counts of some caches as log fields."""
    retries: Counter[str] = Counter()
    for item in stats:
        retries.update(item.retries)
    elapsed = max((item.elapsed_s for item in stats), default=0.0)
    processed = sum(item.processed for item in stats)
    return {
        "cache_type": name,
        "status": str(status),
        "processed": processed,
        "uploaded": sum(item.uploaded for item in stats),
        "skipped": sum(item.skipped for item in stats),
        "repaired": sum(item.repaired for item in stats),
        "vanished": sum(item.vanished for item in stats),
        "retried": sum(retries.values()),
        "retries_by_class": dict(retries),
        "bytes_uploaded": sum(item.bytes_uploaded for item in stats),
        "verified": sum(item.verified for item in stats),
        "missing": sum(item.missing for item in stats),
        "mismatched": sum(item.mismatched for item in stats),
        "extra": sum(item.extra for item in stats),
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(processed / elapsed, 1) if elapsed > 0 else 0.0,
    }


def total_fields(outcomes: Sequence[CacheOutcome]) -> dict[str, object]:
    """The whole run's counts as log fields."""
    statuses = {outcome.status for outcome in outcomes}
    if len(statuses) == 1:
        status = str(statuses.pop())
    elif all(outcome.finished for outcome in outcomes):
        # Some completed, some found (or repaired) differences: the run did the latter.
        status = str(Status.DIFFERENCES if Status.DIFFERENCES in statuses else Status.REPAIRED)
    else:
        status = "partial"
    return summary_fields("total", status, [outcome.stats for outcome in outcomes])


def _row(fields: dict[str, object]) -> list[str]:
    mib = int(str(fields["bytes_uploaded"])) / (1024 * 1024)
    return [
        str(fields["cache_type"]),
        str(fields["status"]),
        *(
            str(fields[name])
            for name in ("processed", "uploaded", "skipped", "repaired", "vanished", "retried")
        ),
        f"{mib:.1f}",
        f"{fields['elapsed_s']:.1f}",
        f"{fields['rows_per_s']:.0f}",
    ]


_COMPARE_FIELDS = {
    "checked": "processed",
    "ok": "verified",
    "missing": "missing",
    "mismatched": "mismatched",
    "extra": "extra",
    "repaired": "repaired",
    "retried": "retried",
}


def _compare_columns(mode: VerifyMode) -> tuple[str, ...]:
    """A verification's columns; a repair's say what it re-uploaded and not extras (which it
    does not look for)."""
    skipped = "extra" if mode is VerifyMode.REPAIR else "repaired"
    return tuple(column for column in _COMPARE_FIELDS if column != skipped)


def differences_found(outcomes: Sequence[CacheOutcome]) -> int:
    """Missing, mismatched and extra objects a comparison found, in total."""
    return sum(differences_in(outcome.stats) for outcome in outcomes)


def format_summary_table(
    outcomes: Sequence[CacheOutcome], mode: VerifyMode = VerifyMode.OFF
) -> str:
    """A plain-text table: one line per cache and a total (comparison columns when comparing)."""
    if not mode.compares:
        rows = [_row(outcome.as_fields()) for outcome in outcomes]
        total = _row(total_fields(outcomes))
        return render_table(_COLUMNS, rows, total=total, left_columns=2)
    columns = _compare_columns(mode)

    def row(fields: dict[str, object]) -> list[str]:
        values = [str(fields[_COMPARE_FIELDS[column]]) for column in columns]
        return [str(fields["cache_type"]), str(fields["status"]), *values]

    rows = [row(outcome.as_fields()) for outcome in outcomes]
    return render_table(
        ("cache", "status", *columns),
        rows,
        total=row(total_fields(outcomes)),
        left_columns=2,
    )
