"""Fixtures: real servers for the whole session, fresh databases and buckets per test.

Postgres and S3 are real servers started once per session by ``devenv``: containers
(PostgresContainer, MinIO) where a Docker engine answers, otherwise the local PostgreSQL binaries
and moto's standalone S3 server on free loopback ports. Each test gets its own database (with the
layer-db schema) and its own bucket prefix (with all ten buckets), so tests never see each
other's rows or objects.

Tests that need an S3 server which checks SigV4 signatures, ``Content-MD5`` and permissions use
the ``verifying_*`` fixtures instead: SeaweedFS (``SeaweedS3``), always, with Docker or without.
Besides its admin it knows two least-privilege identities, ``READ_LIST_WRITE`` and ``READ_LIST``,
allowed only on buckets named ``SCOPED_BUCKET_PREFIX…``, which is where ``verifying_bucket_prefix``
puts each test's buckets.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aioboto3
import asyncpg
import pytest
from aiobotocore.config import AioConfig

from devenv.environment import service_environment
from devenv.postgres import PostgresEndpoint, PostgresServer, start_postgres
from devenv.s3 import S3Endpoint, S3Identity, S3Server, SeaweedS3, create_buckets, start_s3
from layer_cache.cache_types import CACHE_SPECS
from layer_cache.keys import bucket_name
from layer_cache.schema import migrate_layer_db
from services.settings import Settings, load_settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@pytest.fixture(scope="session", autouse=True)
def no_default_otlp_export() -> Iterator[None]:
    """Services contexts opened in the test process export no metrics over OTLP: without an
    endpoint they would export to the default one, where no collector listens here. The tests of
    the export pass their own variables (``start_telemetry(environ=…)``, or the CLI's env)."""
    previous = os.environ.get("OTEL_METRICS_EXPORTER")
    os.environ["OTEL_METRICS_EXPORTER"] = "none"
    yield
    if previous is None:
        del os.environ["OTEL_METRICS_EXPORTER"]
    else:
        os.environ["OTEL_METRICS_EXPORTER"] = previous


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_s3()
    yield server
    server.stop()


SCOPED_BUCKET_PREFIX = "scoped"
READ_LIST_WRITE = S3Identity.on_buckets(
    "backfill-read-list-write",
    ("Read", "List", "Write"),
    [f"{SCOPED_BUCKET_PREFIX}*"],
    access_key="backfill-rw",
    secret_key="backfill-rw-secret",
)
READ_LIST = S3Identity.on_buckets(
    "backfill-read-list",
    ("Read", "List"),
    [f"{SCOPED_BUCKET_PREFIX}*"],
    access_key="backfill-ro",
    secret_key="backfill-ro-secret",
)


@pytest.fixture(scope="session")
def verifying_s3_server() -> Iterator[SeaweedS3]:
    """SeaweedFS: checks signatures, Content-MD5 and each identity's permissions."""
    server = SeaweedS3(identities=[READ_LIST_WRITE, READ_LIST])
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class LayerDb:
    """A database of the test's own, and a pool to it as the app role."""

    endpoint: PostgresEndpoint
    dbname: str
    pool: asyncpg.Pool


@asynccontextmanager
async def fresh_database(
    endpoint: PostgresEndpoint, *, prefix: str = "t", pool_size: int = 10
) -> AsyncIterator[LayerDb]:
    """A new, empty database owned by the app role, and a pool to it as that role (closed
    afterwards; the database goes with the session's server)."""
    dbname = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(endpoint.dsn(dbname="postgres", superuser=True))
    try:
        await admin.execute(f'CREATE DATABASE {dbname} OWNER "{endpoint.user}"')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(endpoint.dsn(dbname=dbname), min_size=1, max_size=pool_size)
    try:
        yield LayerDb(endpoint, dbname, pool)
    finally:
        await pool.close()


@pytest.fixture
async def layer_db(pg_server: PostgresServer) -> AsyncIterator[LayerDb]:
    """A fresh database with the layer-db schema."""
    async with fresh_database(pg_server.endpoint) as db:
        await migrate_layer_db(db.pool)
        yield db


@pytest.fixture
def bucket_prefix(s3_server: S3Server) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    create_buckets(
        s3_server.endpoint, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()]
    )
    return prefix


@pytest.fixture
def verifying_bucket_prefix(verifying_s3_server: SeaweedS3) -> str:
    """A fresh prefix with all ten buckets on SeaweedFS, in the scoped identities' reach."""
    prefix = f"{SCOPED_BUCKET_PREFIX}{uuid.uuid4().hex[:10]}"
    create_buckets(
        verifying_s3_server.endpoint,
        [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()],
    )
    return prefix


@asynccontextmanager
async def open_s3_client(
    endpoint: S3Endpoint, *, max_attempts: int | None = None
) -> AsyncIterator[S3Client]:
    """An aioboto3 S3 client for ``endpoint`` with path-style addressing (and botocore's
    default retries unless ``max_attempts`` is given)."""
    retries = None if max_attempts is None else {"max_attempts": max_attempts}
    async with aioboto3.Session().client(
        "s3",
        **endpoint.client_options(),
        config=AioConfig(s3={"addressing_style": "path"}, retries=retries),
    ) as client:
        yield client


@pytest.fixture
async def s3_client(s3_server: S3Server) -> AsyncIterator[S3Client]:
    async with open_s3_client(s3_server.endpoint) as client:
        yield client


@pytest.fixture
async def verifying_s3_client(verifying_s3_server: SeaweedS3) -> AsyncIterator[S3Client]:
    """A client of the SeaweedFS server, signing as its admin."""
    async with open_s3_client(verifying_s3_server.endpoint) as client:
        yield client


def service_env(
    db: LayerDb, s3: S3Endpoint, bucket_prefix: str, *, persister_mode: str = "DualWrite"
) -> dict[str, str]:
    """The SI_SDF__ environment an operator would set for this database and S3 server."""
    return service_environment(
        db.endpoint,
        s3,
        bucket_prefix=bucket_prefix,
        dbname=db.dbname,
        persister_mode=persister_mode,
    )


@pytest.fixture
def env(layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str) -> dict[str, str]:
    return service_env(layer_db, s3_server.endpoint, bucket_prefix)


@pytest.fixture
def verifying_env(
    layer_db: LayerDb, verifying_s3_server: SeaweedS3, verifying_bucket_prefix: str
) -> dict[str, str]:
    """The service environment for SeaweedFS, signing as its admin."""
    return service_env(layer_db, verifying_s3_server.endpoint, verifying_bucket_prefix)


@pytest.fixture
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()
