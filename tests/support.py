"""What the tests share: the recorded cutoff, the names of the settings they set, seeding rows and
reading buckets (the CLI is run by ``tests.cli_harness``, the server by ``tests.server_support``).
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name, object_key
from migrations_mode.progress_store import S3_PROGRESS_PREFIX

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from tests.conftest import LayerDb

REPO_ROOT = Path(__file__).resolve().parent.parent

# The cutoff of the recorded sdf environment (tests/data/sdf_env.json): when DualWrite was
# switched on. Rows are seeded around it; runs are given it as the flag's RFC 3339 text.
CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)
CUTOFF_RFC3339 = "2026-01-13T17:30:26.445817Z"

# The settings' names, as an operator sets them.
PG = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__"
STORAGE = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"
S3_ENDPOINT = STORAGE + "ENDPOINT"
CACHE = "SI_SDF__LAYER_DB_CONFIG__CACHE_CONFIG__"
SERVER = "SI_SDF__SERVER__"
S3_ACCESS_KEY = STORAGE + "AUTH__STATIC_CREDENTIALS__ACCESS_KEY"
S3_SECRET_KEY = STORAGE + "AUTH__STATIC_CREDENTIALS__SECRET_KEY"


@dataclass(frozen=True)
class SeedRow:
    """A layer-cache row to insert, with an explicit created_at."""

    key: str
    value: bytes
    created_at: datetime


def random_key(rng: random.Random, length: int = 64) -> str:
    """A lowercase hex key like the content hashes in production."""
    return "".join(rng.choice("0123456789abcdef") for _ in range(length))


def rows_around_cutoff(rng: random.Random, count: int, *, tie_every: int = 1) -> list[SeedRow]:
    """Half below the cutoff, half at or after it; ``tie_every`` rows share each created_at."""
    rows = []
    for index in range(count):
        offset = timedelta(milliseconds=index // tie_every - count // (2 * tie_every))
        value = rng.randbytes(rng.randint(1, 2048))
        rows.append(SeedRow(random_key(rng, rng.choice((32, 64))), value, CUTOFF + offset))
    return rows


async def seed_every_cache(db: LayerDb, rng: random.Random, per_cache: int) -> None:
    """``rows_around_cutoff`` (every 3 sharing a created_at) into every backfillable cache."""
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await insert_rows(db.pool, cache_type, rows_around_cutoff(rng, per_cache, tie_every=3))


async def insert_rows(pool: asyncpg.Pool, cache_type: CacheType, rows: Sequence[SeedRow]) -> None:
    """Insert rows with their created_at, as a restore or bulk copy would."""
    table = CACHE_SPECS[cache_type].table
    await pool.executemany(
        f"INSERT INTO {table} (key, sort_key, created_at, value) VALUES ($1, $1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        [(row.key, row.created_at, row.value) for row in rows],
    )


async def rows_below(
    pool: asyncpg.Pool, cache_type: CacheType, cutoff: datetime
) -> dict[str, bytes]:
    """What the backfill must copy: key → value for rows with created_at < cutoff."""
    table = CACHE_SPECS[cache_type].table
    records = await pool.fetch(f"SELECT key, value FROM {table} WHERE created_at < $1", cutoff)
    return {record["key"]: bytes(record["value"]) for record in records}


def cache_bucket(cache_type: CacheType, bucket_prefix: str) -> str:
    """The bucket a cache type's objects go to."""
    return bucket_name(CACHE_SPECS[cache_type].table, bucket_prefix)


async def bucket_objects(client: S3Client, bucket: str) -> dict[str, bytes]:
    """Every cache object in a bucket (not the backfill's own progress records): key → bytes."""
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        keys.extend(
            item["Key"]
            for item in page.get("Contents", [])
            if not item["Key"].startswith(S3_PROGRESS_PREFIX + "/")
        )

    async def read(key: str) -> bytes:
        response = await client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            return await stream.read()

    bodies = await asyncio.gather(*(read(key) for key in keys))
    return dict(zip(keys, bodies, strict=True))


async def object_sizes(s3_client: S3Client, bucket: str) -> dict[str, int]:
    """Every object in a bucket: object key → size, from the listing alone (no GETs)."""
    sizes: dict[str, int] = {}
    paginator = s3_client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        sizes |= {item["Key"]: item["Size"] for item in page.get("Contents", [])}
    return sizes


async def written_objects(s3_client: S3Client, bucket_prefix: str) -> dict[str, list[str]]:
    """The object keys in each of the prefix's ten buckets that holds any."""
    written = {}
    for cache_type in CacheType:
        stored = await object_sizes(s3_client, cache_bucket(cache_type, bucket_prefix))
        if stored:
            written[cache_bucket(cache_type, bucket_prefix)] = sorted(stored)
    return written


async def cache_objects(
    client: S3Client, bucket_prefix: str, cache_type: CacheType
) -> dict[str, bytes]:
    """Every cache object in a cache type's bucket: key → bytes."""
    return await bucket_objects(client, cache_bucket(cache_type, bucket_prefix))


def expected_objects(rows: Mapping[str, bytes], key_prefix: str | None = None) -> dict[str, bytes]:
    """The objects a complete backfill of ``rows`` leaves: object key → bytes."""
    return {object_key(key, key_prefix=key_prefix): value for key, value in rows.items()}


async def assert_bucket_holds_exactly_rows_below(
    pool: asyncpg.Pool,
    s3_client: S3Client,
    bucket_prefix: str,
    cache_type: CacheType,
    cutoff: datetime = CUTOFF,
) -> dict[str, bytes]:
    """The cache's bucket holds one object per row below the cutoff, byte for byte, and nothing
    else (progress records aside: ``bucket_objects`` leaves them out); returns the objects."""
    expected = expected_objects(await rows_below(pool, cache_type, cutoff))
    stored = await cache_objects(s3_client, bucket_prefix, cache_type)
    assert sorted(stored.keys() - expected.keys()) == [], f"{cache_type}: objects not in the rows"
    assert sorted(expected.keys() - stored.keys()) == [], f"{cache_type}: rows missing from S3"
    assert stored == expected, f"{cache_type}: object bytes differ from the rows"
    return stored


# A Postgres fault for chosen rows: a trigger on the cache's table refuses an INSERT or DELETE of
# a listed key with a chosen SQLSTATE, a chosen number of times. Each refusal counts its uses in
# a sequence of its own: nextval() is not rolled back with the refused statement.
_REFUSALS_DDL = """
CREATE TABLE IF NOT EXISTS test_refusals (
    key text NOT NULL,
    op text NOT NULL,
    sqlstate text NOT NULL,
    times bigint NOT NULL,
    uses regclass NOT NULL,
    PRIMARY KEY (key, op)
);
CREATE OR REPLACE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    row_key text := CASE WHEN TG_OP = 'DELETE' THEN OLD.key ELSE NEW.key END;
    refusal test_refusals;
BEGIN
    SELECT * INTO refusal FROM test_refusals WHERE key = row_key AND op = TG_OP;
    IF FOUND AND nextval(refusal.uses) <= refusal.times THEN
        RAISE EXCEPTION 'refused by the test' USING ERRCODE = refusal.sqlstate;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
"""


async def refuse_rows(
    pool: asyncpg.Pool,
    cache_type: CacheType,
    refusals: Mapping[tuple[str, str], tuple[str, int]],
) -> None:
    """Make Postgres refuse ``(key, "INSERT"|"DELETE")`` of the cache's table with SQLSTATE
    ``sqlstate`` its first ``times`` times (``refusals`` maps the first to ``(sqlstate,
    times)``). Test databases only: it adds a table, a function and a trigger."""
    table = CACHE_SPECS[cache_type].table
    async with pool.acquire() as connection, connection.transaction():
        await connection.execute(_REFUSALS_DDL)
        await connection.execute(
            f"CREATE OR REPLACE TRIGGER test_refuse BEFORE INSERT OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION test_refuse()"
        )
        for (key, op), (sqlstate, times) in refusals.items():
            uses = f"test_refusal_{uuid.uuid4().hex}"
            await connection.execute(f'CREATE SEQUENCE "{uses}"')
            await connection.execute(
                "INSERT INTO test_refusals (key, op, sqlstate, times, uses)"
                " VALUES ($1, $2, $3, $4, $5::regclass)",
                key,
                op,
                sqlstate,
                times,
                f'"{uses}"',
            )


async def until(
    condition: Callable[[], Awaitable[bool] | bool],
    what: str,
    within_s: float = 10.0,
    *,
    every_s: float = 0.02,
) -> None:
    """Until ``condition`` (plain or awaitable) holds, checked every ``every_s``; fails the test
    after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        result = condition()
        if await result if inspect.isawaitable(result) else result:
            return
        assert time.monotonic() < deadline, f"timed out after {within_s} s waiting for {what}"
        await asyncio.sleep(every_s)
