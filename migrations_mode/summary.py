"""The end-of-run summary: per cache and in total, as log events and as a table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from migrations_mode.progress import CacheStats
from migrations_mode.tables import render_table

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
    status: str  # completed | interrupted | failed | cancelled

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
        "status": status,
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
    status = statuses.pop() if len(statuses) == 1 else "partial"
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


_VERIFY_COLUMNS = ("cache", "status", "checked", "ok", "missing", "mismatched", "extra", "retried")


def _verify_row(fields: dict[str, object]) -> list[str]:
    names = ("processed", "verified", "missing", "mismatched", "extra", "retried")
    return [str(fields["cache_type"]), str(fields["status"]), *(str(fields[n]) for n in names)]


def differences_found(outcomes: Sequence[CacheOutcome]) -> int:
    """Missing, mismatched and extra objects a verification found, in total."""
    return sum(o.stats.missing + o.stats.mismatched + o.stats.extra for o in outcomes)


def format_summary_table(outcomes: Sequence[CacheOutcome], *, verifying: bool = False) -> str:
    """A plain-text table: one line per cache and a total (verification columns if verifying)."""
    columns, make_row = (_VERIFY_COLUMNS, _verify_row) if verifying else (_COLUMNS, _row)
    rows = [make_row(outcome.as_fields()) for outcome in outcomes]
    return render_table(columns, rows, total=make_row(total_fields(outcomes)), left_columns=2)
