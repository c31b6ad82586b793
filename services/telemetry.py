"""OpenTelemetry metrics: one MeterProvider for the process, flushed (bounded) on the way out.

``otlp_export_from_env`` (pure) turns the standard ``OTEL_*`` variables into one ``OtlpExport``
(protocol, endpoint as the spec resolves it, interval, timeout) or raises ``SettingsError`` (exit
2) before anything starts; an endpoint that looks like the other protocol's is one warning. Export
failures are never silent and never fatal: ``CountingExporter`` counts them and logs the first
with the settings involved. ``Telemetry.shutdown`` flushes and stops the readers on a helper
thread bounded by ``SHUTDOWN_TIMEOUT_S`` (aborting the exporter's retries past it), then logs the
number of failed exports. Without OTLP the metrics are only aggregated in-process (Prometheus
scrape, or in-memory readers in tests). The Prometheus endpoint (``--metrics-port``) logs the
port it bound once at start (``metrics endpoint listening``, ``metrics_port``: port 0 picks
one). The variables and their defaults: README, Observability.
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

import structlog
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server

from layer_cache.errors import SettingsError

DEFAULT_SERVICE_NAME = "sdf"
SERVICE_NAMESPACE = "si"
METER_NAME = "si-layer-cache"
PACKAGE_NAME = "si-layer-cache"
# Upstream's PeriodicReader: every 1 s, 10 s per export (lib/telemetry-application-rs).
DEFAULT_EXPORT_INTERVAL_MS = 1_000
DEFAULT_EXPORT_TIMEOUT_MS = 10_000
# The whole final flush and stop; past it the exporter's retries are aborted.
SHUTDOWN_TIMEOUT_S = 5.0
ABORT_GRACE_S = 1.0
GRPC_PORT = 4317
HTTP_PORT = 4318
HTTP_METRICS_PATH = "/v1/metrics"

ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
METRICS_ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
PROTOCOL_VAR = "OTEL_EXPORTER_OTLP_PROTOCOL"
METRICS_PROTOCOL_VAR = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"
INTERVAL_VAR = "OTEL_METRIC_EXPORT_INTERVAL"
TIMEOUT_VAR = "OTEL_METRIC_EXPORT_TIMEOUT"
EXPORTER_VAR = "OTEL_METRICS_EXPORTER"
SDK_DISABLED_VAR = "OTEL_SDK_DISABLED"
DEFAULT_ENDPOINT_SETTING = "default"

log = structlog.get_logger("services.telemetry")


class OtlpProtocol(StrEnum):
    """The OTLP transports we export over (the spec's names)."""

    GRPC = "grpc"
    HTTP_PROTOBUF = "http/protobuf"


# The OTLP spec's default endpoints, used when no endpoint variable is set.
DEFAULT_ENDPOINTS: dict[OtlpProtocol, str] = {
    OtlpProtocol.GRPC: f"http://localhost:{GRPC_PORT}",
    OtlpProtocol.HTTP_PROTOBUF: f"http://localhost:{HTTP_PORT}",
}


@dataclass(frozen=True)
class OtlpExport:
    """Where and how metrics go over OTLP, resolved from the environment."""

    protocol: OtlpProtocol
    protocol_setting: str  # the variable that chose the protocol, or "default"
    endpoint: str  # as handed to the exporter
    endpoint_setting: str
    interval_ms: int
    timeout_ms: int
    suspicions: tuple[str, ...] = ()  # why the endpoint looks like the other protocol's

    @property
    def shown_endpoint(self) -> str:
        """The endpoint without user info or query (they may carry credentials)."""
        return shown_endpoint(self.endpoint)


def shown_endpoint(endpoint: str) -> str:
    """``endpoint`` fit for a log line: scheme, host, port and path only."""
    if "://" not in endpoint:
        return endpoint.rpartition("@")[2]
    parts = urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def _first_set(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return name, value
    return None


def _milliseconds(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(f"{name} must be a whole number of milliseconds above 0, got {raw!r}")
    return value


def _protocol(env: Mapping[str, str]) -> tuple[OtlpProtocol, str]:
    chosen = _first_set(env, METRICS_PROTOCOL_VAR, PROTOCOL_VAR)
    if chosen is None:
        return OtlpProtocol.GRPC, "default"
    name, raw = chosen
    try:
        return OtlpProtocol(raw.lower()), name
    except ValueError:
        raise SettingsError(
            f"{name} must be grpc or http/protobuf, got {raw!r}"
            + (" (no OTLP/JSON exporter here)" if raw.lower() == "http/json" else "")
        ) from None


def _check_url(name: str, value: str, protocol: OtlpProtocol) -> None:
    """A URL the exporter can use: http(s) with a host; gRPC also takes a bare host:port."""
    if "://" not in value:
        if protocol is OtlpProtocol.GRPC:
            return
        raise SettingsError(
            f"{name} must be an http:// or https:// URL, got {shown_endpoint(value)!r}"
        )
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise SettingsError(f"{name} has an invalid port: {shown_endpoint(value)!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            f"{name} must be an http:// or https:// URL with a host, got {shown_endpoint(value)!r}"
        )


def endpoint_suspicions(
    protocol: OtlpProtocol, endpoint: str, *, per_signal: bool
) -> tuple[str, ...]:
    """Why ``endpoint`` looks like it belongs to the other OTLP transport (empty: it does not)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    port, path = parts.port, parts.path.rstrip("/")
    found: list[str] = []
    if protocol is OtlpProtocol.HTTP_PROTOBUF:
        if port == GRPC_PORT:
            found.append(f"port {GRPC_PORT} is OTLP/gRPC's; OTLP/HTTP listens on {HTTP_PORT}")
        if per_signal and not path.endswith(HTTP_METRICS_PATH):
            found.append(
                f"a per-signal OTLP/HTTP endpoint is used as is: it ends in {HTTP_METRICS_PATH}"
            )
    else:
        if port == HTTP_PORT:
            found.append(f"port {HTTP_PORT} is OTLP/HTTP's; OTLP/gRPC listens on {GRPC_PORT}")
        if path:
            found.append("a gRPC endpoint has no path; a URL path means an OTLP/HTTP endpoint")
    return tuple(found)


def otlp_wanted(env: Mapping[str, str]) -> bool:
    """Whether metrics go over OTLP: yes unless ``OTEL_METRICS_EXPORTER`` says ``none`` (or
    ``prometheus``: scrape ``--metrics-port`` instead) or ``OTEL_SDK_DISABLED`` is true."""
    if env.get(SDK_DISABLED_VAR, "").strip().lower() == "true":
        return False
    raw = env.get(EXPORTER_VAR, "").strip().lower()
    names = {name.strip() for name in raw.split(",") if name.strip()} or {"otlp"}
    unknown = names - {"otlp", "none", "prometheus"}
    if unknown:
        raise SettingsError(
            f"{EXPORTER_VAR} must be otlp, none or prometheus (with --metrics-port), got {raw!r}"
        )
    return "otlp" in names


def otlp_export_from_env(env: Mapping[str, str]) -> OtlpExport | None:
    """The OTLP export the standard variables ask for: without an endpoint, the spec's default
    for the protocol (gRPC ``http://localhost:4317``), as upstream sdf exports; None when
    ``otlp_wanted`` says no.

    Raises ``SettingsError`` for a value that cannot be used."""
    if not otlp_wanted(env):
        return None
    protocol, protocol_setting = _protocol(env)
    interval_ms = _milliseconds(env, INTERVAL_VAR, DEFAULT_EXPORT_INTERVAL_MS)
    timeout_ms = _milliseconds(env, TIMEOUT_VAR, DEFAULT_EXPORT_TIMEOUT_MS)
    endpoint_setting, endpoint = _first_set(env, METRICS_ENDPOINT_VAR, ENDPOINT_VAR) or (
        DEFAULT_ENDPOINT_SETTING,
        DEFAULT_ENDPOINTS[protocol],
    )
    _check_url(endpoint_setting, endpoint, protocol)
    per_signal = endpoint_setting == METRICS_ENDPOINT_VAR
    suspicions = endpoint_suspicions(protocol, endpoint, per_signal=per_signal)
    if protocol is OtlpProtocol.HTTP_PROTOBUF and not per_signal:
        endpoint = endpoint.rstrip("/") + HTTP_METRICS_PATH
    return OtlpExport(
        protocol, protocol_setting, endpoint, endpoint_setting, interval_ms, timeout_ms, suspicions
    )


def _settings_fields(export: OtlpExport) -> dict[str, Any]:
    return {
        "protocol": export.protocol.value,
        "protocol_setting": export.protocol_setting,
        "endpoint": export.shown_endpoint,
        "endpoint_setting": export.endpoint_setting,
    }


class CountingExporter(MetricExporter):
    """Wraps the OTLP exporter: counts export attempts and failures (an exception is a failure,
    never raised into the SDK's thread) and logs the first failure with the settings behind it."""

    def __init__(self, inner: MetricExporter, export: OtlpExport) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.export_settings = export
        self._lock = threading.Lock()
        self.attempts = 0
        self.failures = 0
        self.report_first_failure = True  # off once the exit report will say it anyway

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        try:
            result = self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception as exc:  # the SDK would only log it; count it as a failed export
            result = MetricExportResult.FAILURE
            log.warning("otlp metrics export raised", error=repr(exc))
        with self._lock:
            self.attempts += 1
            first_failure = result is MetricExportResult.FAILURE and self.failures == 0
            if result is MetricExportResult.FAILURE:
                self.failures += 1
        if first_failure and self.report_first_failure:
            log.warning(
                "otlp metrics export failed",
                **_settings_fields(self.export_settings),
                hint="later failures are counted and reported at exit; check that the "
                "endpoint speaks the protocol",
            )
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def build_exporter(export: OtlpExport) -> MetricExporter:
    """The OTel SDK's OTLP exporter for ``export`` (headers, TLS and insecure from env)."""
    timeout_s = export.timeout_ms / 1000
    if export.protocol is OtlpProtocol.GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=export.endpoint, timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(endpoint=export.endpoint, timeout=timeout_s)


@dataclass
class Telemetry:
    """The process's meter and the provider behind it."""

    provider: MeterProvider
    meter: Meter
    scrape_server: WSGIServer | None = None
    exporter: CountingExporter | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def scrape_port(self) -> int | None:
        """The port the Prometheus endpoint listens on (useful with port 0)."""
        return None if self.scrape_server is None else int(self.scrape_server.server_port)

    @property
    def destination(self) -> str:
        """Where metrics go, for the start-up line: OTLP (and from which setting), a scrape
        port, or nowhere."""
        places = []
        if self.exporter is not None:
            export = self.exporter.export_settings
            where = f"OTLP {export.protocol.value} {export.shown_endpoint}"
            if export.endpoint_setting == DEFAULT_ENDPOINT_SETTING:
                where += f" (default: {ENDPOINT_VAR} unset)"
            places.append(where)
        if self.scrape_port is not None:
            places.append(f"Prometheus scrape on port {self.scrape_port}")
        if not places:
            return f"nowhere ({EXPORTER_VAR} turns OTLP off and there is no --metrics-port)"
        return " and ".join(places)

    @property
    def failed_exports(self) -> int:
        """OTLP exports that failed so far (0 without OTLP)."""
        return 0 if self.exporter is None else self.exporter.failures

    def _flush_and_stop(self) -> None:
        timeout_ms = SHUTDOWN_TIMEOUT_S * 1000
        try:
            self.provider.force_flush(timeout_millis=timeout_ms)
        except Exception as exc:  # a reader that timed out: reported below, never raised
            log.warning("metrics flush incomplete", error=str(exc).splitlines()[0])
        try:
            self.provider.shutdown(timeout_millis=timeout_ms)
        except Exception as exc:
            log.warning("metrics shutdown incomplete", error=str(exc).splitlines()[0])

    def _final_export_futile(self) -> str | None:
        """Why a final export cannot get through (then nothing waits for one), or None."""
        if self.exporter is None or self.exporter.attempts > self.exporter.failures:
            return None  # no OTLP, or some export got through: the last one may too
        if self.exporter.attempts:
            return "no export got through"
        endpoint = self.exporter.export_settings.endpoint
        if endpoint_refuses(endpoint):
            return f"nothing listens at {shown_endpoint(endpoint)}"
        return None

    def shutdown(self) -> None:
        """Flush and stop every reader (bounded), report failed exports, then close the scrape
        endpoint; call once at exit. When no export got through (or none was tried and nothing
        listens at the endpoint: a run without a collector), the exit does not wait for one
        more: the exporter is stopped first, so the readers' last export fails at once."""
        if self._stopped:
            return
        self._stopped = True
        futile = self._final_export_futile()
        if futile is not None and self.exporter is not None:
            self.exporter.report_first_failure = False
            self.exporter.inner.shutdown()
        worker = threading.Thread(
            target=self._flush_and_stop, name="telemetry-shutdown", daemon=True
        )
        worker.start()
        worker.join(SHUTDOWN_TIMEOUT_S)
        if worker.is_alive():
            if self.exporter is not None:
                self.exporter.inner.shutdown()  # ends the retry wait and closes the channel
            worker.join(ABORT_GRACE_S)
            log.warning("metrics flush timed out", timeout_s=SHUTDOWN_TIMEOUT_S)
        if self.exporter is not None and (self.exporter.failures or futile is not None):
            log.warning(
                "metrics export failures",
                failed_exports=self.exporter.failures,
                exports=self.exporter.attempts,
                **_settings_fields(self.exporter.export_settings),
                **({} if futile is None else {"reason": futile}),
                hint=f"set {ENDPOINT_VAR} to a collector, or {EXPORTER_VAR}=none",
            )
        if self.scrape_server is not None:
            self.scrape_server.shutdown()
            self.scrape_server.server_close()


ENDPOINT_PROBE_TIMEOUT_S = 0.5


def endpoint_refuses(endpoint: str, timeout_s: float = ENDPOINT_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the endpoint's host and port is refused or fails within
    ``timeout_s`` (a collector that is there but slow counts as there)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    default_port = 443 if parts.scheme == "https" else GRPC_PORT
    try:
        with socket.create_connection(
            (parts.hostname or "localhost", parts.port or default_port), timeout_s
        ):
            return False
    except TimeoutError:
        return False
    except OSError:
        return True


def package_version() -> str:
    """This program's version, as installed (``service.version``, ``--version``)."""
    try:
        return importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _warn_suspicions(export: OtlpExport) -> None:
    for reason in export.suspicions:
        log.warning(
            "otlp endpoint looks like the other protocol's",
            **_settings_fields(export),
            reason=reason,
        )


def start_telemetry(
    extra_readers: Sequence[MetricReader] = (),
    *,
    prometheus_port: int | None = None,
    prometheus_host: str = "0.0.0.0",
    environ: Mapping[str, str] | None = None,
) -> Telemetry:
    """Build the MeterProvider (OTLP exporter and scrape endpoint only when configured).

    Raises ``SettingsError`` for unusable OTLP settings before anything is started."""
    env = os.environ if environ is None else environ
    export = otlp_export_from_env(env)
    readers = list(extra_readers)
    exporter: CountingExporter | None = None
    if export is not None:
        _warn_suspicions(export)
        exporter = CountingExporter(build_exporter(export), export)
        readers.append(
            PeriodicExportingMetricReader(
                exporter,
                export_interval_millis=export.interval_ms,
                export_timeout_millis=export.timeout_ms,
            )
        )
    scrape_server: WSGIServer | None = None
    if prometheus_port is not None:
        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
        scrape_server, _thread = start_http_server(
            prometheus_port, addr=prometheus_host, registry=registry
        )
        # Once, in every mode, with the port bound: what a scraper needs with --metrics-port 0.
        log.info(
            "metrics endpoint listening",
            host=prometheus_host,
            metrics_port=int(scrape_server.server_port),
            path="/metrics",
        )
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME,
            "service.namespace": SERVICE_NAMESPACE,
            "service.version": package_version(),
        }
    )
    provider = MeterProvider(resource=resource, metric_readers=readers)
    return Telemetry(provider, provider.get_meter(METER_NAME), scrape_server, exporter)
