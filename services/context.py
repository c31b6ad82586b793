"""The services context: every shared resource, opened in one place and closed in reverse.

``open_services_context(settings)`` enters, on one ``AsyncExitStack``: telemetry, the asyncpg pool
for the layer db and (when the persister mode uses S3, or a caller asks) one aiobotocore S3
client, its endpoint resolved once per bucket (``services.s3_endpoints``). It yields a frozen
``ServicesContext``; leaving the block closes the S3 client, then the pool (waiting for
connections to be released), then flushes telemetry. The entrypoint and the tests use this same
function, so what the tests exercise is what production opens.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aioboto3
import aiobotocore
import asyncpg
import structlog
from aiobotocore.config import AioConfig
from opentelemetry.sdk.metrics.export import MetricReader

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, PgLayerError, SettingsError, map_pg_connect_errors
from layer_cache.keys import bucket_name
from layer_cache.pg import PgLayer
from layer_cache.s3 import ConditionalPuts, S3Layer
from services.pg_lifetime import lifetime_pool_arguments
from services.pg_tls import (
    TLS_REQUIRED,
    fetch_remote_ca,
    pg_ssl_option,
    remote_ca_url,
    server_offers_tls,
)
from services.s3_continue import expect_continue_only_for_large_bodies
from services.s3_endpoints import memoize_endpoint_resolution
from services.settings import PgPoolConfig, Settings, StaticCredentialsAuth
from services.telemetry import Telemetry, start_telemetry

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


log = structlog.get_logger("services.context")


def pg_pool_tuning(config: PgPoolConfig) -> dict[str, Any]:
    """asyncpg pool arguments beyond the connection: the statement cache (0 for pgbouncer in
    transaction mode, where a prepared statement may not outlive its transaction) and the idle
    lifetime (upstream's ``pool_idle_connection_lifetime_secs``; asyncpg's default otherwise)."""
    tuning: dict[str, Any] = {"statement_cache_size": config.statement_cache_size}
    if config.pool_idle_connection_lifetime_secs is not None:
        tuning["max_inactive_connection_lifetime"] = config.pool_idle_connection_lifetime_secs
    return tuning


async def open_pg_pool(config: PgPoolConfig) -> asyncpg.Pool:
    """A pool to the layer db; fails now (not on first use) if the database is unreachable.

    The TLS settings are checked before connecting (``SettingsError``), and a ``remote`` CA is
    fetched once (``PgLayerError`` when it cannot be). Every connection the pool opens, now or
    later to replace a lost or retired one, goes through ``map_pg_connect_errors``: a socket
    error while connecting is a transient ``PgLayerError``, wherever the pool connects. When
    the first connection fails and the settings require TLS, the server is asked whether it
    offers TLS at all; if not, the error says so (``TLS_REFUSED``) instead of "cannot reach".
    Connections are retired at ``pool_total_connection_lifetime_secs`` (``pg_lifetime``).
    """
    url = remote_ca_url(config)
    remote_ca = None if url is None else await fetch_remote_ca(url)
    ssl_option = pg_ssl_option(config, remote_ca=remote_ca)
    where = f"connecting to Postgres at {config.hostname}:{config.port}"

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        with map_pg_connect_errors(where):
            connection: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
        return connection

    try:
        with map_pg_connect_errors(where):
            pool: asyncpg.Pool = await asyncpg.create_pool(
                host=config.hostname,
                port=config.port,
                user=config.user,
                password=config.password.get_secret_value(),
                database=config.dbname,
                ssl=ssl_option,
                connect=connect,
                min_size=1,
                max_size=config.pool_max_size,
                timeout=config.connect_timeout_secs,
                server_settings={"application_name": config.application_name},
                **pg_pool_tuning(config),
                **lifetime_pool_arguments(config.pool_total_connection_lifetime_secs),
            )
    except PgLayerError as exc:
        if exc.kind is ErrorKind.TRANSIENT and config.sslmode in TLS_REQUIRED:
            offered = await server_offers_tls(
                config.hostname, config.port, timeout_s=config.connect_timeout_secs
            )
            if offered is False:
                raise PgLayerError(
                    f"{where} failed: sslmode {config.sslmode} needs TLS and the server "
                    "answered the SSLRequest with N (no TLS)",
                    kind=ErrorKind.TLS_REFUSED,
                ) from exc
        raise
    return pool


# Client CPU per request that the backfill does not need (docs/bench.md, "Client CPU per object"):
# botocore's client-side parameter validation (every call passes typed arguments; the server
# checks them anyway) and the User-Agent rebuilt twice per request from ~30 sanitised parts (a
# fixed string instead: it is informational, and no AWS feature depends on it).
LEAN_CLIENT_OPTIONS: dict[str, Any] = {
    "parameter_validation": False,
    "user_agent": f"si-layer-cache aiobotocore/{aiobotocore.__version__}",
}


CA_BUNDLE_ENV = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__CA_BUNDLE"


def check_ca_bundle(path: Path) -> None:
    """The CA bundle file can be read and holds a certificate, or ``SettingsError`` naming the
    setting: botocore would only find out at the first request."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except OSError as exc:  # missing, unreadable, a directory, no certificate (ssl.SSLError)
        raise SettingsError(
            f"{CA_BUNDLE_ENV}: cannot read the CA bundle {path} ({type(exc).__name__}: {exc})"
        ) from exc


def s3_client_arguments(settings: Settings, *, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for ``session.client("s3", …)`` from the object storage settings; the
    CA bundle, when set, is checked here (``SettingsError``) and replaces botocore's default
    trust (and ``AWS_CA_BUNDLE``) for https endpoints."""
    storage = settings.layer_db_config.object_storage_config
    config = AioConfig(
        s3={"addressing_style": "path"},
        # One attempt per call: the backfill retries itself, classified and counted.
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=max_connections,
        connect_timeout=10,
        read_timeout=120,
        # Content-MD5 is set explicitly on every PUT; it works on every S3-compatible server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        **LEAN_CLIENT_OPTIONS,
    )
    arguments: dict[str, Any] = {"config": config}
    if storage.ca_bundle is not None:
        check_ca_bundle(storage.ca_bundle)
        arguments["verify"] = str(storage.ca_bundle)
    if not isinstance(storage.auth, StaticCredentialsAuth):
        return arguments  # iam_role: the standard AWS chain decides credentials and region
    credentials = storage.auth.static_credentials
    arguments |= {
        "endpoint_url": storage.endpoint,
        "region_name": storage.region,
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key.get_secret_value(),
    }
    return arguments


@dataclass(frozen=True)
class ServicesContext:
    """Handles to the shared resources; build per-cache layers from it."""

    settings: Settings
    pg_pool: asyncpg.Pool
    s3_client: S3Client | None
    telemetry: Telemetry
    s3_conditional_puts: ConditionalPuts = field(default_factory=ConditionalPuts)
    """What the S3 client's server does with ``If-None-Match``, learnt once for all layers."""

    def pg_layer(self, cache_type: CacheType) -> PgLayer:
        """The Postgres layer for one cache type."""
        return PgLayer(self.pg_pool, CACHE_SPECS[cache_type])

    def s3_layer(self, cache_type: CacheType) -> S3Layer:
        """The S3 layer for one cache type (the context must have been opened with S3)."""
        if self.s3_client is None:
            raise RuntimeError("the services context was opened without S3")
        storage = self.settings.layer_db_config.object_storage_config
        spec = CACHE_SPECS[cache_type]
        return S3Layer(
            self.s3_client,
            spec,
            bucket=bucket_name(spec.table, storage.bucket_prefix, storage.bucket_suffix),
            key_prefix=storage.key_prefix,
            conditional_puts=self.s3_conditional_puts,
        )


@asynccontextmanager
async def open_services_context(
    settings: Settings,
    *,
    with_s3: bool | None = None,
    s3_max_connections: int = 64,
    metric_readers: Sequence[MetricReader] = (),
) -> AsyncIterator[ServicesContext]:
    """Open telemetry, the Postgres pool and the S3 client; close them in reverse on exit."""
    if with_s3 is None:
        with_s3 = settings.layer_db_config.persister_mode.uses_s3
    # Built (and the CA bundle checked) before anything is opened: a bad setting is exit 2.
    s3_arguments = (
        s3_client_arguments(settings, max_connections=s3_max_connections) if with_s3 else None
    )
    async with AsyncExitStack() as stack:
        telemetry = start_telemetry(metric_readers, prometheus_port=settings.metrics_port)
        stack.callback(telemetry.shutdown)
        pool = await open_pg_pool(settings.layer_db_config.pg_pool_config)
        stack.push_async_callback(pool.close)
        s3_client: S3Client | None = None
        if s3_arguments is not None:
            session = aioboto3.Session()
            s3_client = await stack.enter_async_context(session.client("s3", **s3_arguments))
            if not memoize_endpoint_resolution(s3_client):
                log.debug("S3 endpoint resolution not memoized: unexpected client internals")
            expect_continue_only_for_large_bodies(s3_client)
        yield ServicesContext(settings, pool, s3_client, telemetry)
