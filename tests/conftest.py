"""Fixtures: real servers for the whole session, fresh databases and buckets per test.

Postgres and S3 are real servers started once per session by ``devenv.servers``: containers
(PostgresContainer, MinIO) where a Docker engine answers, otherwise the local PostgreSQL binaries
and moto's standalone S3 server on free loopback ports. Each test gets its own database (with the
layer-db schema) and its own bucket prefix (with all ten buckets), so tests never see each
other's rows or objects.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aioboto3
import asyncpg
import pytest
from aiobotocore.config import AioConfig

from devenv.demo import service_environment
from devenv.servers import (
    PostgresEndpoint,
    PostgresServer,
    S3Endpoint,
    S3Server,
    create_buckets,
    start_postgres,
    start_s3,
)
from layer_cache.cache_types import CACHE_SPECS
from layer_cache.keys import bucket_name
from layer_cache.schema import migrate_layer_db
from services.settings import Settings, load_settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


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


@dataclass(frozen=True)
class LayerDb:
    """A fresh database with the layer-db schema, and a pool to it as the app role."""

    endpoint: PostgresEndpoint
    dbname: str
    pool: asyncpg.Pool


@pytest.fixture
async def layer_db(pg_server: PostgresServer) -> AsyncIterator[LayerDb]:
    endpoint = pg_server.endpoint
    dbname = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(endpoint.dsn(dbname="postgres", superuser=True))
    try:
        await admin.execute(f'CREATE DATABASE {dbname} OWNER "{endpoint.user}"')
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(endpoint.dsn(dbname=dbname), min_size=1, max_size=10)
    await migrate_layer_db(pool)
    try:
        yield LayerDb(endpoint, dbname, pool)
    finally:
        await pool.close()


@pytest.fixture
def bucket_prefix(s3_server: S3Server) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    create_buckets(
        s3_server.endpoint, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()]
    )
    return prefix


@pytest.fixture
async def s3_client(s3_server: S3Server) -> AsyncIterator[S3Client]:
    endpoint = s3_server.endpoint
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=AioConfig(s3={"addressing_style": "path"}),
    ) as client:
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
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()
