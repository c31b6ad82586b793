"""Progress you can see: rows processed, rows left, rate, ETA, uploads in flight, retries.

``RateMeter`` (pure) turns (time, rows processed) samples into a rate over a sliding window, and
``eta_seconds`` a rate into an ETA. ``progress_report`` is the one place a cache's progress
becomes fields (named as in ``migrations_mode.log_fields``); it feeds both outputs:
  * the structured ``backfill progress`` log event, once per checkpoint interval per cache, for
    Kubernetes logs (no terminal);
  * ``LiveProgress``, a ``rich`` live table redrawn twice a second on a terminal, whose columns
    are the same fields: ``processed`` is this run's (the summary's), ``left ~`` and ``%`` the
    cache's walk, resumed runs included.
``LiveProgress.run`` loops until cancelled and then draws a last frame, so the final state stays
on screen. Given the run's outcomes first (``finish``), that frame is drawn from them, the
summary's own figures (counts, status, rate), so the last frame and the summary printed under it
agree, after Ctrl-C too. Log lines keep printing above the table while it is live.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

from layer_cache.cache_types import CacheType
from migrations_mode.summary import CacheOutcome, format_rate
from migrations_mode.tables import build_table, format_count, format_duration

if TYPE_CHECKING:
    from migrations_mode.progress import CacheStats

RATE_WINDOW_S = 60.0


@dataclass
class RateMeter:
    """Rows per second over a sliding window of samples."""

    window_s: float = RATE_WINDOW_S
    _samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, rows_done: int) -> None:
        """Record a sample."""
        self._samples.append((now, rows_done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    @property
    def rate(self) -> float:
        """Rows per second between the oldest and newest sample in the window."""
        if len(self._samples) < 2:
            return 0.0
        (t0, done0), (t1, done1) = self._samples[0], self._samples[-1]
        return (done1 - done0) / (t1 - t0) if t1 > t0 else 0.0


def eta_seconds(remaining: int | None, rate: float) -> float | None:
    """Seconds to go at ``rate``, or None when unknown."""
    if remaining is None:
        return None
    if remaining <= 0:
        return 0.0
    return remaining / rate if rate > 0 else None


class ProgressSource(Protocol):
    """What a running cache exposes for progress."""

    cache_type: CacheType

    @property
    def completed(self) -> bool:
        """Every row of the walk is done."""

    @property
    def stats(self) -> CacheStats:
        """Counts so far, this run's."""

    @property
    def rows_done(self) -> int:
        """Rows finished in walk order, including resumed runs."""

    def gauge_values(self) -> dict[str, float]:
        """Gauges: in flight, limit, estimates."""


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """One cache's progress, for the log event and the live table alike."""

    processed: int
    rows_done_all_runs: int
    rows_total_estimate: int | None
    rows_remaining_estimate: int | None
    percent_complete: float | None
    recent_rows_per_s: float
    eta_s: float | None
    uploads_in_flight: int
    upload_concurrency_limit: int
    retried: int
    completed: bool

    def as_fields(self) -> dict[str, object]:
        """The ``backfill progress`` log fields (rounded)."""
        return {
            "processed": self.processed,
            "rows_done_all_runs": self.rows_done_all_runs,
            "rows_total_estimate": self.rows_total_estimate,
            "rows_remaining_estimate": self.rows_remaining_estimate,
            "percent_complete": self.percent_complete,
            "recent_rows_per_s": round(self.recent_rows_per_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s),
            "uploads_in_flight": self.uploads_in_flight,
            "upload_concurrency_limit": self.upload_concurrency_limit,
            "retried": self.retried,
            "status": "completed" if self.completed else "running",
        }


def progress_report(source: ProgressSource, rate: float) -> ProgressReport:
    """A cache's progress now, given its current rate (rows processed a second)."""
    gauges = source.gauge_values()
    total = gauges.get("rows_total_estimate")
    remaining = gauges.get("rows_remaining_estimate")
    ratio = gauges.get("keyspace_done_ratio")
    if ratio is None and total:
        ratio = min(source.rows_done / total, 1.0)
    left = None if remaining is None else int(remaining)
    return ProgressReport(
        processed=source.stats.processed,
        rows_done_all_runs=source.rows_done,
        rows_total_estimate=None if total is None else int(total),
        rows_remaining_estimate=left,
        percent_complete=None if ratio is None else round(100 * ratio, 1),
        recent_rows_per_s=rate,
        eta_s=eta_seconds(left, rate),
        uploads_in_flight=int(gauges.get("uploads_in_flight", 0)),
        upload_concurrency_limit=int(gauges.get("upload_concurrency_limit", 0)),
        retried=sum(source.stats.retries.values()),
        completed=source.completed,
    )


_LIVE_COLUMNS = ("cache", "processed", "left ~", "%", "rows/s", "ETA", "in flight", "retries")


def _rows_left(rows: int | None) -> str:
    return "?" if rows is None else format_count(rows)


def _percent(percent: float | None) -> str:
    return "?" if percent is None else f"{percent:.1f}"


class LiveProgress:
    """A live ``rich`` table of every cache's progress, for terminals."""

    def __init__(self, sources: Sequence[ProgressSource], console: Console) -> None:
        self.sources = sources
        self.console = console
        self._meters = {source.cache_type: RateMeter() for source in sources}
        self._outcomes: dict[CacheType, CacheOutcome] = {}

    def finish(self, outcomes: Sequence[CacheOutcome]) -> None:
        """The run's outcomes: the last frame shows them (call before cancelling ``run``)."""
        self._outcomes = {outcome.stats.cache_type: outcome for outcome in outcomes}

    def render(self) -> Table:
        """The table for the current state (the outcomes', once ``finish`` gave them)."""
        rows = []
        now = time.monotonic()
        for source in self.sources:
            meter = self._meters[source.cache_type]
            meter.add(now, source.stats.processed)
            report = progress_report(source, meter.rate)
            outcome = self._outcomes.get(source.cache_type)
            if outcome is not None:
                rows.append(self._final_row(source, report, outcome))
                continue
            rows.append(
                (
                    source.cache_type.value,
                    format_count(report.processed),
                    _rows_left(report.rows_remaining_estimate),
                    _percent(report.percent_complete),
                    format_count(round(report.recent_rows_per_s)),
                    "done" if report.completed else format_duration(report.eta_s),
                    f"{report.uploads_in_flight}/{report.upload_concurrency_limit}",
                    format_count(report.retried),
                )
            )
        return build_table(_LIVE_COLUMNS, rows, title="Layer cache backfill", narrow=True)

    @staticmethod
    def _final_row(
        source: ProgressSource, report: ProgressReport, outcome: CacheOutcome
    ) -> tuple[str, ...]:
        """A cache's last row: the summary's counts, status (for the ETA) and rate."""
        summary = outcome.summary()
        finished = outcome.finished
        left = 0 if finished else report.rows_remaining_estimate
        percent = 100.0 if finished else report.percent_complete
        return (
            source.cache_type.value,
            format_count(summary.processed),
            _rows_left(left),
            _percent(percent),
            format_rate(summary.rows_per_s),
            summary.status,
            f"{report.uploads_in_flight}/{report.upload_concurrency_limit}",
            format_count(summary.retried),
        )

    async def run(self) -> None:
        """Redraw twice a second until cancelled, then draw the final frame."""
        with Live(self.render(), console=self.console, auto_refresh=False) as live:
            try:
                while True:
                    await asyncio.sleep(0.5)
                    live.update(self.render(), refresh=True)
            finally:
                live.update(self.render(), refresh=True)
