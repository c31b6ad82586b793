"""The OTLP export settings (pure), the counting exporter and the bounded shutdown."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from structlog.testing import capture_logs

from devenv.otlp_receiver import collector_series_names
from devenv.process import free_port
from layer_cache.errors import SettingsError
from services.logging import configure_logging
from services.telemetry import (
    DEFAULT_EXPORT_INTERVAL_MS,
    DEFAULT_EXPORT_TIMEOUT_MS,
    SHUTDOWN_TIMEOUT_S,
    CountingExporter,
    OtlpExport,
    OtlpProtocol,
    otlp_export_from_env,
    package_version,
    shown_endpoint,
    start_telemetry,
)

GRPC_ENDPOINT = "http://collector:4317"


NO_OTLP = {"OTEL_METRICS_EXPORTER": "none"}


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, "http://localhost:4317"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http://localhost:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, "http://localhost:4317"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http://localhost:4318/v1/metrics"),
        ({"OTEL_METRICS_EXPORTER": "otlp"}, "http://localhost:4317"),
    ],
)
def test_no_endpoint_means_the_specs_default_endpoint_as_upstream_sdf_exports(
    env: dict[str, str], endpoint: str
) -> None:
    export = otlp_export_from_env(env)

    assert export is not None
    assert (export.endpoint, export.endpoint_setting) == (endpoint, "default")


@pytest.mark.parametrize(
    "env",
    [
        NO_OTLP,
        {"OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_ENDPOINT},
        {"OTEL_METRICS_EXPORTER": "prometheus"},
        {"OTEL_SDK_DISABLED": "true"},
    ],
)
def test_otlp_is_off_only_when_the_standard_variables_say_so(env: dict[str, str]) -> None:
    assert otlp_export_from_env(env) is None


def test_an_exporter_this_program_lacks_is_a_settings_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="OTEL_METRICS_EXPORTER"):
        otlp_export_from_env({"OTEL_METRICS_EXPORTER": "console"})


@pytest.mark.parametrize(
    ("env", "prometheus_port", "says"),
    [
        ({}, None, "OTLP grpc http://localhost:4317 (default: OTEL_EXPORTER_OTLP_ENDPOINT unset)"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:pw@collector:4317"},
            None,
            "OTLP grpc http://collector:4317",
        ),
        (
            NO_OTLP,
            None,
            "nowhere (OTEL_METRICS_EXPORTER turns OTLP off and there is no --metrics-port)",
        ),
        (NO_OTLP, 0, "Prometheus scrape on port "),
    ],
)
def test_the_start_up_line_says_where_metrics_go(
    env: dict[str, str], prometheus_port: int | None, says: str
) -> None:
    telemetry = start_telemetry(environ=env, prometheus_port=prometheus_port)
    try:
        assert telemetry.destination.startswith(says)
        assert "pw" not in telemetry.destination
    finally:
        telemetry.shutdown()


def test_the_resource_names_the_service_version() -> None:
    reader = InMemoryMetricReader()
    telemetry = start_telemetry([reader], environ=NO_OTLP)
    telemetry.meter.create_counter("probe").add(1)
    data = reader.get_metrics_data()
    telemetry.shutdown()

    assert data is not None
    [resource_metrics] = data.resource_metrics
    assert resource_metrics.resource.attributes["service.version"] == package_version()
    assert package_version() != "unknown"


def test_exit_does_not_wait_for_a_collector_that_is_not_there() -> None:
    port = free_port()  # nothing listens
    telemetry = start_telemetry(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    telemetry.meter.create_counter("probe").add(1)
    started = time.monotonic()

    with capture_logs() as logs:
        telemetry.shutdown()

    assert time.monotonic() - started < 2.0
    [report] = [entry for entry in logs if entry["event"] == "metrics export failures"]
    assert report["reason"] == f"nothing listens at http://127.0.0.1:{port}"
    assert "OTEL_METRICS_EXPORTER=none" in report["hint"]
    assert [entry["event"] for entry in logs] == ["metrics export failures"]


def test_grpc_is_the_default_protocol_with_upstreams_interval_and_timeout() -> None:
    export = otlp_export_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_ENDPOINT})

    assert export == OtlpExport(
        protocol=OtlpProtocol.GRPC,
        protocol_setting="default",
        endpoint=GRPC_ENDPOINT,
        endpoint_setting="OTEL_EXPORTER_OTLP_ENDPOINT",
        interval_ms=DEFAULT_EXPORT_INTERVAL_MS,
        timeout_ms=DEFAULT_EXPORT_TIMEOUT_MS,
    )
    assert (DEFAULT_EXPORT_INTERVAL_MS, DEFAULT_EXPORT_TIMEOUT_MS) == (1_000, 10_000)


@pytest.mark.parametrize(
    ("env", "protocol", "endpoint", "endpoint_setting"),
    [
        # The generic endpoint is a base URL over HTTP: /v1/metrics is appended.
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            },
            OtlpProtocol.HTTP_PROTOBUF,
            "http://collector:4318/v1/metrics",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        # A per-signal endpoint is used as is, and wins over the generic one.
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://prom:9090/api/v1/otlp/v1/metrics",
            },
            OtlpProtocol.HTTP_PROTOBUF,
            "http://prom:9090/api/v1/otlp/v1/metrics",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ),
        # The per-signal protocol wins over the generic one; case does not matter.
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "GRPC",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4317",
            },
            OtlpProtocol.GRPC,
            "https://collector:4317",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        # gRPC also takes a bare host:port (TLS unless OTEL_EXPORTER_OTLP_INSECURE=true).
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "collector:4317"},
            OtlpProtocol.GRPC,
            "collector:4317",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ),
    ],
)
def test_protocol_and_endpoint_resolve_as_the_spec_says(
    env: dict[str, str], protocol: OtlpProtocol, endpoint: str, endpoint_setting: str
) -> None:
    export = otlp_export_from_env(env)

    assert export is not None
    assert (export.protocol, export.endpoint, export.endpoint_setting) == (
        protocol,
        endpoint,
        endpoint_setting,
    )
    assert export.suspicions == ()


def test_interval_and_timeout_come_from_the_standard_variables() -> None:
    export = otlp_export_from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_ENDPOINT,
            "OTEL_METRIC_EXPORT_INTERVAL": "250",
            "OTEL_METRIC_EXPORT_TIMEOUT": "3000",
        }
    )

    assert export is not None
    assert (export.interval_ms, export.timeout_ms) == (250, 3000)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        ),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "1s"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, "OTEL_METRIC_EXPORT_INTERVAL"),
        ({"OTEL_METRIC_EXPORT_TIMEOUT": "-5"}, "OTEL_METRIC_EXPORT_TIMEOUT"),
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "c:4318",
            },
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://collector:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:43x7"},
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        ),
    ],
)
def test_unusable_values_are_settings_errors_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        otlp_export_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_ENDPOINT} | env)

    message = str(raised.value)
    assert named in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        (
            {
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            },
            "port 4317 is OTLP/gRPC's",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "port 4318 is OTLP/HTTP's"),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://prom:9090/api/v1/otlp/v1/metrics"},
            "a gRPC endpoint has no path",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318",
            },
            "it ends in /v1/metrics",
        ),
    ],
)
def test_an_endpoint_of_the_other_protocol_is_suspected(env: dict[str, str], reason: str) -> None:
    export = otlp_export_from_env(env)

    assert export is not None
    assert any(reason in suspicion for suspicion in export.suspicions), export.suspicions


def test_logged_endpoints_lose_user_info_and_query() -> None:
    assert shown_endpoint("https://user:pa55@collector:4318/v1/metrics?token=x") == (
        "https://collector:4318/v1/metrics"
    )
    assert shown_endpoint("user:pa55@collector:4317") == "collector:4317"


class _ScriptedExporter(MetricExporter):
    """Answers exports from a script: a result, or an exception to raise."""

    def __init__(self, script: Sequence[MetricExportResult | Exception]) -> None:
        super().__init__()
        self.script = list(script)
        self.shut_down = threading.Event()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        step = self.script.pop(0) if self.script else MetricExportResult.SUCCESS
        if isinstance(step, Exception):
            raise step
        return step

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.shut_down.set()


EXPORT = OtlpExport(
    OtlpProtocol.HTTP_PROTOBUF,
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "http://user:secret@collector:4317/v1/metrics",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    1000,
    1000,
)


def test_counting_exporter_counts_failures_and_logs_the_first_one_only() -> None:
    script: list[MetricExportResult | Exception] = [
        MetricExportResult.SUCCESS,
        MetricExportResult.FAILURE,
        ConnectionError("refused"),
        MetricExportResult.FAILURE,
    ]
    exporter = CountingExporter(_ScriptedExporter(script), EXPORT)
    data = MetricsData(resource_metrics=[])

    with capture_logs() as logs:
        results = [exporter.export(data) for _ in script]

    assert results == [MetricExportResult.SUCCESS] + [MetricExportResult.FAILURE] * 3
    assert (exporter.attempts, exporter.failures) == (4, 3)
    failed = [entry for entry in logs if entry["event"] == "otlp metrics export failed"]
    assert len(failed) == 1
    assert failed[0]["endpoint"] == "http://collector:4317/v1/metrics"
    assert failed[0]["protocol_setting"] == "OTEL_EXPORTER_OTLP_PROTOCOL"
    assert "secret" not in repr(logs)


def test_shutdown_reports_failed_exports_in_one_warning() -> None:
    telemetry = start_telemetry(environ=NO_OTLP)
    telemetry.exporter = CountingExporter(
        _ScriptedExporter([MetricExportResult.FAILURE] * 2), EXPORT
    )
    data = MetricsData(resource_metrics=[])
    telemetry.exporter.export(data)
    telemetry.exporter.export(data)

    with capture_logs() as logs:
        telemetry.shutdown()
        telemetry.shutdown()  # a second call does nothing

    [report] = [entry for entry in logs if entry["event"] == "metrics export failures"]
    assert report["log_level"] == "warning"
    assert (report["failed_exports"], report["exports"]) == (2, 2)
    assert telemetry.failed_exports == 2


class _StuckExporter(_ScriptedExporter):
    """An export that hangs until the exporter is shut down (a retry loop against a dead
    endpoint)."""

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.shut_down.wait(60)
        return MetricExportResult.FAILURE


def test_shutdown_is_bounded_when_the_final_export_hangs() -> None:
    stuck = _StuckExporter([])
    # A collector that accepts connections and never answers.
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    export = OtlpExport(
        OtlpProtocol.GRPC, "default", endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT", 60_000, 60_000
    )
    telemetry = start_telemetry(
        environ={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        }
    )
    assert telemetry.exporter is not None
    telemetry.exporter.inner.shutdown()  # the real gRPC exporter is not used here
    telemetry.exporter.inner = stuck
    telemetry.exporter.export_settings = export
    telemetry.meter.create_counter("probe").add(1)

    started = time.monotonic()
    with capture_logs() as logs:
        telemetry.shutdown()
    took = time.monotonic() - started

    listener.close()
    assert took < SHUTDOWN_TIMEOUT_S + 3
    assert stuck.shut_down.is_set(), "the exporter's retries must be aborted"
    events = [entry["event"] for entry in logs]
    assert "metrics flush timed out" in events
    assert "metrics export failures" in events


def test_otlp_settings_error_is_raised_before_anything_starts() -> None:
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        start_telemetry(
            prometheus_port=0,
            environ={
                "OTEL_EXPORTER_OTLP_ENDPOINT": GRPC_ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "udp",
            },
        )


def test_suspicious_endpoint_is_one_warning_naming_both_settings() -> None:
    with capture_logs() as logs:
        telemetry = start_telemetry(
            environ={
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            }
        )
    telemetry.provider.shutdown(timeout_millis=100)

    [warning] = [e for e in logs if e["event"] == "otlp endpoint looks like the other protocol's"]
    assert warning["protocol_setting"] == "OTEL_EXPORTER_OTLP_PROTOCOL"
    assert warning["endpoint_setting"] == "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert warning["endpoint"] == "http://127.0.0.1:4317/v1/metrics"


def test_in_memory_readers_still_see_the_metrics_without_otlp() -> None:
    reader = InMemoryMetricReader()
    telemetry = start_telemetry([reader], environ=NO_OTLP)
    telemetry.meter.create_counter("layer_cache.backfill.items_processed").add(3)

    data = reader.get_metrics_data()
    telemetry.shutdown()

    assert data is not None
    [resource_metrics] = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "sdf"
    assert resource_metrics.resource.attributes["service.namespace"] == "si"
    assert telemetry.exporter is None
    assert telemetry.failed_exports == 0


def test_sdk_exporter_logs_reach_the_structlog_renderer() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").error(
            "Failed to export %s to %s, error code: %s", "metrics", "collector:4318", "UNAVAILABLE"
        )
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers = []

    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "Failed to export metrics to collector:4318, error code: UNAVAILABLE"
    assert event["level"] == "error"
    assert event["logger"] == "opentelemetry.exporter.otlp.proto.grpc.exporter"


@pytest.mark.parametrize(
    ("name", "unit", "kind", "monotonic", "expected"),
    [
        # upstream's monotonic!(layer_cache_backend_resolved = 1): a counter gains _total
        ("layer_cache_backend_resolved", "", "sum", True, {"layer_cache_backend_resolved_total"}),
        # once: a name ending in _total keeps one
        ("layer_cache_requests_total", "", "sum", True, {"layer_cache_requests_total"}),
        # upstream's metric!(counter.…): an up-down counter keeps its name
        (
            "layer_cache_persister_write_attempted",
            "",
            "sum",
            False,
            {"layer_cache_persister_write_attempted"},
        ),
        # histogram!(layer_cache.read_latency_ms = …): dots become underscores
        (
            "layer_cache.read_latency_ms",
            "",
            "histogram",
            False,
            {f"layer_cache_read_latency_ms{suffix}" for suffix in ("_bucket", "_sum", "_count")},
        ),
        # a unit is appended as a word unless the name has it
        (
            "evict_duration_ms",
            "ms",
            "histogram",
            False,
            {f"evict_duration_ms_milliseconds{suffix}" for suffix in ("_bucket", "_sum", "_count")},
        ),
        ("queue_oldest_age_seconds", "s", "gauge", False, {"queue_oldest_age_seconds"}),
    ],
)
def test_the_collectors_prometheus_names(
    name: str, unit: str, kind: str, monotonic: bool, expected: set[str]
) -> None:
    assert collector_series_names(name, unit, kind, monotonic) == expected


def test_a_unit_without_a_known_word_is_refused() -> None:
    with pytest.raises(ValueError, match="unit"):
        collector_series_names("requests", "{request}/s", "sum", True)
