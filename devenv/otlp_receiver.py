"""A real OTLP/gRPC metrics receiver for tests: ``MetricsService/Export`` served by grpcio.

No OpenTelemetry Collector binary is obtainable from the registries this project uses, so the
tests receive OTLP over gRPC with the protocol's own service definition (the
``opentelemetry-proto`` package's generated servicer, the same one the collector implements):
HTTP/2, protobuf ``ExportMetricsServiceRequest``, gRPC status codes. Each request is kept as
received; ``points`` flattens them into (resource attributes, metric name, attributes, value),
and ``prometheus_names`` names each metric as the collector's Prometheus exporter would
(``collector_series_names``). The server listens on a free loopback port (plaintext, like a
collector's default ``:4317``) on grpcio's thread pool, so it keeps answering while a test waits
on a subprocess; ``stop`` ends it with a short grace period.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from devenv.process import free_port


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


@dataclass(frozen=True)
class Point:
    """One received data point (sums and gauges: the value; histograms: the count)."""

    resource: dict[str, Any]
    metric: str
    attributes: dict[str, Any]
    value: float


# The OpenTelemetry collector's Prometheus exporter with its default add_metric_suffixes
# (pkg/translator/prometheus, normalizeName): the name is split into words at every character
# that is not a letter or a digit; the unit's word is appended unless the name has it; a monotonic
# sum gets "total" last (any "total" word moved there); words are joined with "_". Units beyond
# these are refused rather than guessed.
COLLECTOR_UNIT_WORDS = {"ms": "milliseconds", "s": "seconds", "By": "bytes"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def collector_series_names(name: str, unit: str, kind: str, monotonic: bool) -> set[str]:
    """The Prometheus series names of one OTLP metric (``kind``: ``sum``, ``gauge``,
    ``histogram``) as the collector's Prometheus exporter names them."""
    words = [word for word in re.split(r"[^A-Za-z0-9]+", name) if word]
    if unit:
        if unit not in COLLECTOR_UNIT_WORDS:
            raise ValueError(f"{name}: unit {unit!r} has no translation here")
        if COLLECTOR_UNIT_WORDS[unit] not in words:
            words.append(COLLECTOR_UNIT_WORDS[unit])
    if kind == "sum" and monotonic:
        words = [word for word in words if word != "total"] + ["total"]
    base = "_".join(words)
    if kind == "histogram":
        return {base + suffix for suffix in HISTOGRAM_SUFFIXES}
    return {base}


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: list[ExportMetricsServiceRequest], lock: threading.Lock) -> None:
        self._received = received
        self._lock = lock

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        with self._lock:
            self._received.append(request)
        return ExportMetricsServiceResponse()


class OtlpGrpcReceiver:
    """A running receiver; ``endpoint`` is what ``OTEL_EXPORTER_OTLP_ENDPOINT`` should say."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._lock = threading.Lock()
        self._received: list[ExportMetricsServiceRequest] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsService(self._received, self._lock), self._server
        )
        if self._server.add_insecure_port(f"127.0.0.1:{port}") != port:
            raise RuntimeError(f"cannot listen on 127.0.0.1:{port} for OTLP/gRPC: port taken")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[ExportMetricsServiceRequest]:
        with self._lock:
            return list(self._received)

    def points(self) -> list[Point]:
        """Every data point of every request received so far, in arrival order."""
        found = []
        for request in self.requests:
            for resource_metrics in request.resource_metrics:
                resource = _attributes(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points:
                            if kind == "histogram":
                                value = float(point.count)
                            else:
                                value = float(getattr(point, point.WhichOneof("value")))
                            found.append(
                                Point(resource, metric.name, _attributes(point.attributes), value)
                            )
        return found

    def prometheus_names(self) -> set[str]:
        """Every series name the received metrics get through the collector's Prometheus
        exporter."""
        found: set[str] = set()
        for request in self.requests:
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        monotonic = kind == "sum" and metric.sum.is_monotonic
                        found |= collector_series_names(metric.name, metric.unit, kind, monotonic)
        return found

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=1).wait(5)


@contextmanager
def otlp_grpc_receiver(port: int | None = None) -> Iterator[OtlpGrpcReceiver]:
    """A receiver on ``port`` (a free loopback port by default) for the life of the block;
    a port already taken is a ``RuntimeError`` naming it."""
    receiver = OtlpGrpcReceiver(free_port() if port is None else port)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
