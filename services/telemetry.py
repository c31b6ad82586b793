"""OpenTelemetry metrics: one MeterProvider for the process, flushed on the way out.

The resource is ``service.name`` from ``OTEL_SERVICE_NAME`` (default ``sdf``) and
``service.namespace`` ``si``, as upstream. When an OTLP endpoint is configured through the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` variables,
metrics are exported over OTLP/HTTP every ``OTEL_METRIC_EXPORT_INTERVAL`` ms; otherwise they are
only aggregated in-process (and read by tests through an in-memory reader). ``shutdown`` forces a
final export, so counts made just before a SIGTERM still arrive.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server

DEFAULT_SERVICE_NAME = "sdf"
SERVICE_NAMESPACE = "si"
METER_NAME = "si-layer-cache"
_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")


@dataclass(frozen=True)
class Telemetry:
    """The process's meter and the provider behind it."""

    provider: MeterProvider
    meter: Meter
    scrape_server: WSGIServer | None = None

    @property
    def scrape_port(self) -> int | None:
        """The port the Prometheus endpoint listens on (useful with port 0)."""
        return None if self.scrape_server is None else int(self.scrape_server.server_port)

    def shutdown(self) -> None:
        """Flush and stop every reader, then close the scrape endpoint; call once at exit."""
        self.provider.force_flush(timeout_millis=5_000)
        self.provider.shutdown(timeout_millis=5_000)
        if self.scrape_server is not None:
            self.scrape_server.shutdown()
            self.scrape_server.server_close()


def otlp_configured() -> bool:
    """True when the standard env vars name an OTLP endpoint."""
    return any(os.environ.get(name) for name in _OTLP_ENDPOINT_VARS)


def start_telemetry(
    extra_readers: Sequence[MetricReader] = (),
    *,
    prometheus_port: int | None = None,
    prometheus_host: str = "0.0.0.0",
) -> Telemetry:
    """Build the MeterProvider (OTLP exporter and scrape endpoint only when configured)."""
    readers = list(extra_readers)
    scrape_server: WSGIServer | None = None
    if prometheus_port is not None:
        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
        scrape_server, _thread = start_http_server(
            prometheus_port, addr=prometheus_host, registry=registry
        )
    if otlp_configured():
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
            "service.namespace": SERVICE_NAMESPACE,
        }
    )
    provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(provider, provider.get_meter(METER_NAME), scrape_server)
