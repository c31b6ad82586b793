"""Instruments that reach Prometheus under upstream's series names, so upstream's dashboard
(``dev/config/grafana/provisioning/dashboards/layer-cache-metrics.json``) reads them.

Upstream records through tracing-opentelemetry, without units, and exports over OTLP to an
OpenTelemetry collector whose Prometheus exporter names the series by the OTel-to-Prometheus rules
(OpenTelemetry's Python ``PrometheusMetricReader`` applies the same ones): dots become
underscores; a monotonic counter gains ``_total`` (once: a name ending in ``_total`` keeps it); a
histogram becomes ``_bucket``/``_sum``/``_count``; an up-down counter (upstream's ``counter.``
prefix) and a gauge keep their name; and a unit is appended as a word unless the name already has
that word (unit ``ms`` turns ``…_duration_ms`` into ``…_duration_ms_milliseconds``). So an
instrument whose name says its unit (``…_ms``, ``…_seconds``) sets no unit here, as upstream's.

``UpstreamCounter`` is a counter that, where upstream's dashboard queries the name *without*
``_total`` (a name upstream's own exporter never produces for its counters, so those panels are
empty upstream: ``layer_cache_retry_queue_enqueued``, ``layer_cache_persister_write_success``…),
is also kept as an up-down counter of that bare name, which Prometheus exports as is. Both count
the same events; the ``_total`` series is the one alerts and new queries should use.

Histograms take bucket boundaries fit for their unit (``MS_BUCKETS``, ``SECONDS_BUCKETS``): the
SDK's defaults (0 to 10,000 in steps meant for milliseconds) would put every in-memory hit below
5 ms and every persistence latency below 5 s in one bucket.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.metrics import Histogram, Meter

TOTAL_SUFFIX = "_total"


def one_two_five(low: float, high: float) -> tuple[float, ...]:
    """The 1-2.5-5 series from ``low`` to ``high`` (both powers of ten): 0.1, 0.25, 0.5, 1, …"""
    bounds: list[float] = []
    decade = low
    while decade < high:
        bounds.extend(round(decade * step, 12) for step in (1, 2.5, 5))
        decade *= 10
    return (*bounds, high)


MS_BUCKETS: tuple[float, ...] = (0.05, *one_two_five(0.1, 10_000), 30_000)
"""Boundaries of a ``…_ms`` histogram: from an in-memory hit (tens of µs) to a 30 s stall."""

SECONDS_BUCKETS: tuple[float, ...] = (*one_two_five(0.001, 10), 30, 60, 300, 900, 3_600)
"""Boundaries of a ``…_seconds`` histogram: a write on the request path to a queued write held
through an hour's outage."""


class UpstreamCounter:
    """A counter exported as ``<name>_total``; with ``bare_too``, also as ``<name>`` (an up-down
    counter, for the queries of upstream's dashboard that leave out ``_total``)."""

    def __init__(self, meter: Meter, name: str, *, description: str, bare_too: bool = False):
        bare = name.removesuffix(TOTAL_SUFFIX)
        # Two instruments of one meter need two names: the counter's carries the suffix that
        # Prometheus would add anyway, so its series name is the same either way.
        self._total = meter.create_counter(
            bare + TOTAL_SUFFIX if bare_too else name, description=description
        )
        self._bare = (
            meter.create_up_down_counter(bare, description=f"{description} (as {bare}_total)")
            if bare_too
            else None
        )

    def add(self, amount: int, attributes: Mapping[str, str]) -> None:
        self._total.add(amount, attributes)
        if self._bare is not None:
            self._bare.add(amount, attributes)


def ms_histogram(meter: Meter, name: str, description: str) -> Histogram:
    """A histogram of milliseconds named ``…_ms`` (no unit: the name says it)."""
    return meter.create_histogram(
        name, description=description, explicit_bucket_boundaries_advisory=MS_BUCKETS
    )


def seconds_histogram(meter: Meter, name: str, description: str) -> Histogram:
    """A histogram of seconds named ``…_seconds`` (no unit: the name says it)."""
    return meter.create_histogram(
        name, description=description, explicit_bucket_boundaries_advisory=SECONDS_BUCKETS
    )
