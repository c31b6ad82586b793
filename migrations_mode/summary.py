"""The end-of-run summary: per cache and in total, as log events and as a table.

A cache's status says how its walk ended: ``completed`` (copied, or compared and found nothing),
``differences`` (a verification found objects that are not their rows' bytes), ``repaired`` (a
repair re-uploaded some), or ``failed``, ``interrupted``, ``cancelled`` (the walk did not end).
A cache whose saved progress already said complete does nothing and has no rate (``rows_per_s``
null, ``-`` in the table).

The table fits 100 columns with the longest cache name and any count: counts from a million up
are shown to four significant digits (``123.5M``; the log events keep them exact), bytes in
binary units, the rarely non-zero ``repaired`` of a copy only when some cache has one, and the
run's elapsed time, retries by class and vanished rows on lines under the table.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from migrations_mode.config import VerifyMode
from migrations_mode.progress import CacheStats
from migrations_mode.tables import (
    build_table,
    format_bytes,
    format_count,
    format_duration,
    render_table,
)


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


@dataclass(frozen=True)
class Summary:
    """The summed counts of some caches (one, or all: the total)."""

    cache_type: str  # the cache's name, or "total"
    status: str
    already_complete: bool  # saved progress said complete for each: nothing ran
    processed: int
    uploaded: int
    skipped: int
    repaired: int
    vanished: int
    bytes_uploaded: int
    verified: int
    missing: int
    mismatched: int
    extra: int
    retries_by_class: dict[str, int]
    elapsed_s: float

    @classmethod
    def of(
        cls, name: str, status: str, stats: Sequence[CacheStats], *, already_complete: bool
    ) -> Summary:
        """The sum of ``stats``; the elapsed time is the longest (caches run side by side)."""
        retries: Counter[str] = Counter()
        for item in stats:
            retries.update(item.retries)
        return cls(
            cache_type=name,
            status=str(status),
            already_complete=already_complete,
            processed=sum(item.processed for item in stats),
            uploaded=sum(item.uploaded for item in stats),
            skipped=sum(item.skipped for item in stats),
            repaired=sum(item.repaired for item in stats),
            vanished=sum(item.vanished for item in stats),
            bytes_uploaded=sum(item.bytes_uploaded for item in stats),
            verified=sum(item.verified for item in stats),
            missing=sum(item.missing for item in stats),
            mismatched=sum(item.mismatched for item in stats),
            extra=sum(item.extra for item in stats),
            retries_by_class=dict(retries),
            elapsed_s=max((item.elapsed_s for item in stats), default=0.0),
        )

    @property
    def retried(self) -> int:
        """Storage calls retried, whatever the class."""
        return sum(self.retries_by_class.values())

    @property
    def rows_per_s(self) -> float | None:
        """Rows processed a second over the elapsed time; None when nothing ran."""
        if self.already_complete:
            return None
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_fields(self) -> dict[str, object]:
        """The ``backfill summary`` log fields."""
        rate = self.rows_per_s
        return {
            "cache_type": self.cache_type,
            "status": self.status,
            "already_complete": self.already_complete,
            "processed": self.processed,
            "uploaded": self.uploaded,
            "skipped": self.skipped,
            "repaired": self.repaired,
            "vanished": self.vanished,
            "retried": self.retried,
            "retries_by_class": self.retries_by_class,
            "bytes_uploaded": self.bytes_uploaded,
            "verified": self.verified,
            "missing": self.missing,
            "mismatched": self.mismatched,
            "extra": self.extra,
            "elapsed_s": round(self.elapsed_s, 3),
            "rows_per_s": None if rate is None else round(rate, 1),
        }


@dataclass(frozen=True)
class CacheOutcome:
    """A cache's stats, how its walk ended, and whether its saved progress already said
    complete (then it did nothing this run, and has no rate)."""

    stats: CacheStats
    status: Status
    already_complete: bool = False

    @property
    def finished(self) -> bool:
        """The walk reached the end of the cache's rows."""
        return self.status.finished

    def summary(self) -> Summary:
        """This cache's summary."""
        return Summary.of(
            self.stats.cache_type.value,
            self.status,
            [self.stats],
            already_complete=self.already_complete,
        )

    def as_fields(self) -> dict[str, object]:
        """The summary of this cache as log fields."""
        return self.summary().as_fields()


def total_summary(outcomes: Sequence[CacheOutcome]) -> Summary:
    """The whole run's counts."""
    statuses = {outcome.status for outcome in outcomes}
    if len(statuses) == 1:
        status = str(statuses.pop())
    elif all(outcome.finished for outcome in outcomes):
        # Some completed, some found (or repaired) differences: the run did the latter.
        status = str(Status.DIFFERENCES if Status.DIFFERENCES in statuses else Status.REPAIRED)
    else:
        status = "partial"
    return Summary.of(
        "total",
        status,
        [outcome.stats for outcome in outcomes],
        already_complete=bool(outcomes) and all(outcome.already_complete for outcome in outcomes),
    )


def total_fields(outcomes: Sequence[CacheOutcome]) -> dict[str, object]:
    """The whole run's counts as log fields."""
    return total_summary(outcomes).as_fields()


def differences_found(outcomes: Sequence[CacheOutcome]) -> int:
    """Missing, mismatched and extra objects a comparison found, in total."""
    return sum(differences_in(outcome.stats) for outcome in outcomes)


def format_rate(rows_per_s: float | None) -> str:
    """A rate as a table cell: ``-`` when there is none."""
    return "-" if rows_per_s is None else format_count(round(rows_per_s))


SUMMARY_WIDTH = 100  # what the table fits in, with the longest names and the largest counts

Column = tuple[str, Callable[[Summary], str]]

# A copy's columns; ``repaired`` (a re-upload over an object of another size, rare) only when
# some cache has one. A comparison's: what it checked and found; a repair's show what it
# re-uploaded instead of extras (which it does not look for).
_COPY_COLUMNS: tuple[Column, ...] = (
    ("processed", lambda s: format_count(s.processed)),
    ("uploaded", lambda s: format_count(s.uploaded)),
    ("skipped", lambda s: format_count(s.skipped)),
    ("repaired", lambda s: format_count(s.repaired)),
    ("bytes", lambda s: format_bytes(s.bytes_uploaded)),
)
_COMPARE_COLUMNS: tuple[Column, ...] = (
    ("checked", lambda s: format_count(s.processed)),
    ("ok", lambda s: format_count(s.verified)),
    ("missing", lambda s: format_count(s.missing)),
    ("mismatched", lambda s: format_count(s.mismatched)),
    ("extra", lambda s: format_count(s.extra)),
    ("repaired", lambda s: format_count(s.repaired)),
)
_RATE_COLUMN: Column = ("rows/s", lambda s: format_rate(s.rows_per_s))


def _columns(mode: VerifyMode, total: Summary) -> list[Column]:
    if not mode.compares:
        left_out = "" if total.repaired else "repaired"
        columns = [column for column in _COPY_COLUMNS if column[0] != left_out]
    else:
        left_out = "extra" if mode is VerifyMode.REPAIR else "repaired"
        columns = [column for column in _COMPARE_COLUMNS if column[0] != left_out]
    return [*columns, _RATE_COLUMN]


def _notes(total: Summary) -> list[str]:
    """The lines under the table: the run's time, and what its columns leave out."""
    notes = [f"elapsed {format_duration(total.elapsed_s)}"]
    if total.retried:
        by_class = ", ".join(
            f"{kind} {format_count(count)}"
            for kind, count in sorted(total.retries_by_class.items())
        )
        notes.append(f"retried {format_count(total.retried)} storage calls: {by_class}")
    if total.vanished:
        notes.append(
            f"vanished {format_count(total.vanished)} rows: deleted between listing and reading"
        )
    return [line for note in notes for line in textwrap.wrap(note, SUMMARY_WIDTH)]


def format_summary_table(
    outcomes: Sequence[CacheOutcome], mode: VerifyMode = VerifyMode.OFF
) -> str:
    """The summary as plain text, at most ``SUMMARY_WIDTH`` columns whatever the counts: a
    line per cache and a total (a comparison's columns when comparing), then the elapsed time,
    retries by class and vanished rows."""
    total = total_summary(outcomes)
    columns = _columns(mode, total)

    def row(summary: Summary) -> list[str]:
        return [summary.cache_type, summary.status, *(cell(summary) for _name, cell in columns)]

    table = build_table(
        ("cache", "status", *(name for name, _cell in columns)),
        [row(outcome.summary()) for outcome in outcomes],
        total=row(total),
        left_columns=2,
        narrow=True,
    )
    return "\n".join([render_table(table), *_notes(total)])
