"""PgBouncer in transaction pool mode in front of the layer db (as often in front of RDS).

A real ``pgbouncer`` (devenv.pgbouncer) shares two server connections among all clients. asyncpg's
statement cache keeps named prepared statements in the server session, which transaction mode
hands to other clients; ``…__PG_POOL_CONFIG__STATEMENT_CACHE_SIZE=0`` turns it off. The tests
show the failure with the cache on, that the pool opened by the services context really has no
named statements with it off, and a whole backfill through PgBouncer with it off.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from devenv.pgbouncer import LocalPgBouncer
from devenv.postgres import PostgresEndpoint, PostgresServer
from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from services.context import open_pg_pool
from services.settings import PgPoolConfig, PgSslMode
from tests.cli_harness import cli
from tests.conftest import LayerDb, service_env
from tests.support import (
    CUTOFF,
    CUTOFF_RFC3339,
    SeedRow,
    cache_objects,
    expected_objects,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CACHES = (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT)
STATEMENT_CACHE_SIZE = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__STATEMENT_CACHE_SIZE"


@pytest.fixture
def pgbouncer(pg_server: PostgresServer) -> Iterator[PostgresEndpoint]:
    with LocalPgBouncer(pg_server.endpoint, pool_mode="transaction", pool_size=2) as bouncer:
        yield bouncer.endpoint


def pool_config(
    endpoint: PostgresEndpoint, dbname: str, *, statement_cache_size: int
) -> PgPoolConfig:
    return PgPoolConfig.model_validate(
        {
            "hostname": endpoint.host,
            "port": endpoint.port,
            "user": endpoint.user,
            "password": endpoint.password,
            "dbname": dbname,
            "sslmode": PgSslMode.DISABLE,
            "pool_max_size": 8,
            "statement_cache_size": statement_cache_size,
        }
    )


async def parameterised_queries(pool: asyncpg.Pool, count: int = 40) -> list[BaseException]:
    """Many clients' worth of parameterised queries at once (each one prepared by asyncpg), all
    run to the end (no query is left to be cancelled); the errors they raised."""

    async def one(number: int) -> None:
        assert await pool.fetchval("SELECT $1::int + 1", number) == number + 1

    outcomes = await asyncio.gather(
        *(one(number) for number in range(count)), return_exceptions=True
    )
    return [outcome for outcome in outcomes if isinstance(outcome, BaseException)]


PREPARED_STATEMENT_ERRORS = (
    asyncpg.exceptions.DuplicatePreparedStatementError,
    asyncpg.exceptions.InvalidSQLStatementNameError,
)


async def test_statement_cache_breaks_behind_transaction_pooling(
    pgbouncer: PostgresEndpoint, layer_db: LayerDb
) -> None:
    """The control: with asyncpg's default cache, clients collide on named statements."""
    pool = await open_pg_pool(pool_config(pgbouncer, layer_db.dbname, statement_cache_size=100))
    try:
        errors = [error for _ in range(5) for error in await parameterised_queries(pool)]
    finally:
        await pool.close()
    assert errors
    assert all(isinstance(error, PREPARED_STATEMENT_ERRORS) for error in errors), errors


async def test_statement_cache_off_works_behind_transaction_pooling(
    pgbouncer: PostgresEndpoint, layer_db: LayerDb
) -> None:
    pool = await open_pg_pool(pool_config(pgbouncer, layer_db.dbname, statement_cache_size=0))
    try:
        errors = [error for _ in range(5) for error in await parameterised_queries(pool)]
    finally:
        await pool.close()
    assert errors == []


@pytest.mark.parametrize(("statement_cache_size", "named_statements"), [(100, True), (0, False)])
async def test_pool_keeps_named_statements_only_with_the_cache_on(
    layer_db: LayerDb, statement_cache_size: int, named_statements: bool
) -> None:
    """Straight to Postgres: a session's named statements are in ``pg_prepared_statements``."""
    config = pool_config(
        layer_db.endpoint, layer_db.dbname, statement_cache_size=statement_cache_size
    )
    pool = await open_pg_pool(config)
    try:
        async with pool.acquire() as connection:
            assert await connection.fetchval("SELECT $1::int", 7) == 7
            count = await connection.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert (count > 0) is named_statements
    finally:
        await pool.close()


async def test_backfill_through_pgbouncer_in_transaction_mode(
    pgbouncer: PostgresEndpoint,
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
) -> None:
    rng = random.Random(7)
    for cache_type in CACHES:
        rows = [
            SeedRow(
                random_key(rng),
                rng.randbytes(rng.randint(1, 2000)),
                CUTOFF - timedelta(seconds=rng.randint(1, 86_400)),
            )
            for _ in range(150)
        ]
        await insert_rows(layer_db.pool, cache_type, rows)
    expected = {c: await rows_below(layer_db.pool, c, CUTOFF) for c in CACHES}
    through_bouncer = LayerDb(pgbouncer, layer_db.dbname, layer_db.pool)
    env = service_env(through_bouncer, s3_server.endpoint, bucket_prefix) | {
        STATEMENT_CACHE_SIZE: "0"
    }
    args = [
        "--migration-mode",
        "backfillLayerCache",
        "--log-json",
        "--backfill-cutoff-timestamp",
        CUTOFF_RFC3339,
        "--backfill-cache-types",
        ",".join(CACHES),
        "--backfill-key-batch-size",
        "40",
        "--backfill-progress-store",
        "postgres",
    ]

    result = await cli(args, env, within_s=120)

    assert result.status == 0, result.stderr[-3000:]
    for cache_type, below_cutoff in expected.items():
        objects = await cache_objects(s3_client, bucket_prefix, cache_type)
        assert objects == expected_objects(below_cutoff), cache_type
