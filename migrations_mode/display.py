"""Progress you can see: rows done of an estimated total, rate, ETA, uploads in flight, retries.

``RateMeter`` (pure) turns (time, rows done) samples into a rate over a sliding window and an
ETA. ``progress_fields`` is the one place a cache's progress becomes fields; it feeds both outputs:
  * the structured ``backfill progress`` log event, once per checkpoint interval per cache, for
    Kubernetes logs (no terminal);
  * ``LiveProgress``, a ``rich`` live table redrawn twice a second on a terminal.
``LiveProgress.run`` loops until cancelled and then draws a last frame, so the final state stays
on screen. Log lines keep printing above the table while it is live.
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
from migrations_mode.tables import build_table

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


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s`` or ``?``."""
    if seconds is None:
        return "?"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressSource(Protocol):
    """What a running cache exposes for progress."""

    cache_type: CacheType
    completed: bool

    @property
    def stats(self) -> CacheStats:
        """Counts so far."""

    @property
    def rows_done(self) -> int:
        """Rows finished, including resumed runs."""

    def gauge_values(self) -> dict[str, float]:
        """Gauges: in flight, limit, estimates."""


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """One cache's progress, for the log event and the live table alike."""

    rows_done: int
    rows_total_estimate: int | None
    percent_complete: float | None
    rows_per_s: float
    eta_s: float | None
    uploads_in_flight: int
    upload_limit: int
    retried: int
    completed: bool

    def as_fields(self) -> dict[str, object]:
        """Log fields (rounded)."""
        return {
            "rows_done": self.rows_done,
            "rows_total_estimate": self.rows_total_estimate,
            "percent_complete": self.percent_complete,
            "rows_per_s": round(self.rows_per_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s),
            "uploads_in_flight": self.uploads_in_flight,
            "upload_limit": self.upload_limit,
            "retried": self.retried,
            "status": "completed" if self.completed else "running",
        }


def progress_report(source: ProgressSource, rate: float) -> ProgressReport:
    """A cache's progress now, given its current rate."""
    gauges = source.gauge_values()
    total = gauges.get("rows_total_estimate")
    remaining = gauges.get("rows_remaining_estimate")
    ratio = gauges.get("keyspace_done_ratio")
    if ratio is None and total:
        ratio = min(source.rows_done / total, 1.0)
    return ProgressReport(
        rows_done=source.rows_done,
        rows_total_estimate=None if total is None else int(total),
        percent_complete=None if ratio is None else round(100 * ratio, 1),
        rows_per_s=rate,
        eta_s=eta_seconds(None if remaining is None else int(remaining), rate),
        uploads_in_flight=int(gauges.get("uploads_in_flight", 0)),
        upload_limit=int(gauges.get("upload_concurrency_limit", 0)),
        retried=sum(source.stats.retries.values()),
        completed=source.completed,
    )


_LIVE_COLUMNS = ("cache", "done", "of ~", "%", "rows/s", "ETA", "in flight", "retries")


class LiveProgress:
    """A live ``rich`` table of every cache's progress, for terminals."""

    def __init__(self, sources: Sequence[ProgressSource], console: Console) -> None:
        self.sources = sources
        self.console = console
        self._meters = {source.cache_type: RateMeter() for source in sources}

    def render(self) -> Table:
        """The table for the current state."""
        rows = []
        now = time.monotonic()
        for source in self.sources:
            meter = self._meters[source.cache_type]
            meter.add(now, source.rows_done)
            report = progress_report(source, meter.rate)
            total = report.rows_total_estimate
            rows.append(
                (
                    source.cache_type.value,
                    f"{report.rows_done:,}",
                    "?" if total is None else f"{total:,}",
                    "?" if report.percent_complete is None else f"{report.percent_complete:.1f}",
                    f"{report.rows_per_s:,.0f}",
                    "done" if report.completed else format_duration(report.eta_s),
                    f"{report.uploads_in_flight}/{report.upload_limit}",
                    str(report.retried),
                )
            )
        return build_table(_LIVE_COLUMNS, rows, title="Layer cache backfill")

    async def run(self) -> None:
        """Redraw twice a second until cancelled, then draw the final frame."""
        with Live(self.render(), console=self.console, auto_refresh=False) as live:
            try:
                while True:
                    await asyncio.sleep(0.5)
                    live.update(self.render(), refresh=True)
            finally:
                live.update(self.render(), refresh=True)
