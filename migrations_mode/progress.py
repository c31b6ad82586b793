"""Per-cache counts, kept once and reported twice: as the run summary and as OTel metrics.

``CacheProgress`` is the only thing the per-cache loop calls to count; each call updates the
in-memory ``CacheStats`` (for the summary and log lines) and the matching OTel instrument, so the
two can never disagree. Gauges are read from each running cache when metrics are collected
(``GaugeSource``). No instrument has a unit, so Prometheus names stay exactly upstream's
(``layer_cache_backfill_items_processed_total``); units are in the names instead. Nothing to shut
down: the MeterProvider belongs to ``services.telemetry``. The metric list: README, Observability.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.metrics import Counter as Counter_

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind

_PREFIX = "layer_cache.backfill."


@dataclass
class CacheStats:
    """What one cache's backfill did."""

    cache_type: CacheType
    processed: int = 0
    uploaded: int = 0
    skipped: int = 0
    repaired: int = 0
    vanished: int = 0
    bytes_uploaded: int = 0
    verified: int = 0
    missing: int = 0
    mismatched: int = 0
    extra: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def elapsed_s(self) -> float:
        """Seconds from start to finish (or to now while running)."""
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return end - self.started_at

    @property
    def rows_per_s(self) -> float:
        """Processed rows per second over the elapsed time."""
        elapsed = self.elapsed_s
        return self.processed / elapsed if elapsed > 0 else 0.0


UPLOAD_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GAUGES = {
    "uploads_in_flight": "Uploads in flight",
    "upload_concurrency_limit": "Current upload concurrency limit (lowered when throttled)",
    "checkpoint_lag_seconds": "Cutoff minus the resumable checkpoint (newest-first order)",
    "keyspace_done_ratio": "Share of this shard's key space walked (key order)",
    "rows_total_estimate": "Rows to walk, from planner statistics until counted",
    "rows_remaining_estimate": "Rows left to walk, estimated",
}

# The counters that export a ``CacheStats`` count, in batches (``CacheProgress.export``): the
# name (after the prefix), the description, and the count.
STATS_COUNTERS: tuple[tuple[str, str, Callable[[CacheStats], int]], ...] = (
    ("items_processed", "Rows finished", lambda s: s.processed),
    ("items_uploaded", "Rows PUT to S3", lambda s: s.uploaded),
    ("items_skipped", "Rows already in S3", lambda s: s.skipped),
    ("bytes_uploaded", "Value bytes PUT to S3", lambda s: s.bytes_uploaded),
    (
        "items_repaired",
        "Rows re-uploaded because the stored object had the wrong size",
        lambda s: s.repaired,
    ),
    ("items_vanished", "Rows deleted between listing and reading", lambda s: s.vanished),
)


class GaugeSource(Protocol):
    """A running cache whose state the gauges read."""

    cache_type: CacheType

    def gauge_values(self) -> dict[str, float]:
        """Current values, keyed by the names in ``GAUGES`` (absent = unknown)."""


class BackfillMetrics:
    """The OTel instruments of the backfill, created once per run."""

    def __init__(self, meter: Meter) -> None:
        self._sources: list[GaugeSource] = []
        self.upload_duration = meter.create_histogram(
            _PREFIX + "upload_duration_seconds",
            description="Seconds per PUT, retries included",
            explicit_bucket_boundaries_advisory=list(UPLOAD_DURATION_BUCKETS_S),
        )
        for name, description in GAUGES.items():
            meter.create_observable_gauge(
                _PREFIX + name, callbacks=[self._observer(name)], description=description
            )
        self.stats_counters = [
            (name, meter.create_counter(_PREFIX + name, description=description), count)
            for name, description, count in STATS_COUNTERS
        ]
        self.retries = meter.create_counter(
            _PREFIX + "retries", description="Retried calls by error class"
        )
        self.errors = meter.create_counter(
            _PREFIX + "errors", description="Failed calls by error class"
        )
        self.rate_limit_wait_seconds = meter.create_counter(
            _PREFIX + "rate_limit_wait_seconds",
            description="Seconds uploads waited for the process's rate limits (summed over "
            "uploads)",
        )

    def per_cache_counters(self) -> tuple[Counter_, ...]:
        """The counters with only a ``cache_type`` attribute."""
        return (*(counter for _, counter, _ in self.stats_counters), self.rate_limit_wait_seconds)

    def watch(self, source: GaugeSource) -> None:
        """Report a cache's gauges from now on."""
        self._sources.append(source)

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for source in self._sources:
                value = source.gauge_values().get(name)
                if value is not None:
                    yield Observation(value, {"cache_type": source.cache_type.value})

        return observe


# Counters are exported in batches: one OTel add per counter every this many rows (and when
# the cache finishes or logs a checkpoint), instead of several per row on the hot path.
EXPORT_EVERY_ROWS = 64


class CacheProgress:
    """Counts for one cache: its stats, exported to the metrics in batches."""

    def __init__(self, cache_type: CacheType, metrics: BackfillMetrics) -> None:
        self.stats = CacheStats(cache_type)
        self._metrics = metrics
        self._attributes = {"cache_type": cache_type.value}
        self._exported: dict[str, int] = {}
        self._exported_at = 0
        # Start every series at zero, so rates and alerts work before the first event.
        for counter in metrics.per_cache_counters():
            counter.add(0, self._attributes)
        for kind in ErrorKind:
            labelled = self._attributes | {"error_class": kind.value}
            metrics.errors.add(0, labelled)
            if kind.retryable:
                metrics.retries.add(0, labelled)

    def upload_took(self, seconds: float) -> None:
        """How long one PUT took, retries included."""
        self._metrics.upload_duration.record(seconds, self._attributes)

    def rate_limited(self, seconds: float) -> None:
        """An upload waited this long for the rate limits before its PUT."""
        self._metrics.rate_limit_wait_seconds.add(seconds, self._attributes)

    def uploaded(self, size: int, *, repaired: bool, row_done: bool = True) -> None:
        """A row was PUT (``repaired`` when it replaced a wrong-sized object). ``row_done``
        False: the row is counted as processed by its comparison instead (a repair)."""
        self.stats.uploaded += 1
        self.stats.bytes_uploaded += size
        if repaired:
            self.stats.repaired += 1
        if row_done:
            self._processed()

    def skipped(self) -> None:
        """A row was already in S3 with the right size."""
        self.stats.skipped += 1
        self._processed()

    def vanished(self) -> None:
        """A listed row was gone by the time its value was read."""
        self.stats.vanished += 1
        self._processed()

    def verified(self, difference: str | None) -> None:
        """A row was compared with its object: the same (None), ``missing``, or another size or
        other bytes (``size``, ``content``: counted as mismatched)."""
        if difference is None:
            self.stats.verified += 1
        elif difference == "missing":
            self.stats.missing += 1
        else:
            self.stats.mismatched += 1
        self._processed()

    def extra(self, count: int) -> None:
        """Objects in the walked range with no row in the table."""
        self.stats.extra += count

    def retried(self, error_class: str) -> None:
        """A call failed with a retryable error and will be tried again."""
        self.stats.retries[error_class] += 1
        self._metrics.retries.add(1, self._attributes | {"error_class": error_class})

    def failed(self, error_class: str) -> None:
        """A call failed for good."""
        self._metrics.errors.add(1, self._attributes | {"error_class": error_class})

    def export(self) -> None:
        """Add what the counters have not seen yet."""
        self._exported_at = self.stats.processed
        for name, counter, count in self._metrics.stats_counters:
            value = count(self.stats)
            delta = value - self._exported.get(name, 0)
            if delta:
                counter.add(delta, self._attributes)
                self._exported[name] = value

    def finish(self) -> None:
        """Stop the clock and export the last counts."""
        self.stats.finished_at = time.monotonic()
        self.export()

    def _processed(self) -> None:
        self.stats.processed += 1
        if self.stats.processed - self._exported_at >= EXPORT_EVERY_ROWS:
            self.export()
