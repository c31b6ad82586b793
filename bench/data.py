"""The benchmark's data: one database per table size, seeded with ``devenv.seed``'s sample rows.

Rows are exactly those ``devenv.seed.seed`` would insert into ``cas`` (same generator, same
seed, so a smaller table is a prefix of a larger one): 32-hex-digit keys, random (incompressible)
values, 10% of rows after the cutoff, 20% of the rest sharing one ``created_at``. Sizes follow
the issue: 1-16 KiB, and 1% of rows 100 KiB-5 MiB. They are loaded with COPY (much faster than
the live path's INSERTs, and the benchmark does not time it), then the table is ANALYZEd.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from devenv.postgres import PostgresEndpoint
from devenv.seed import SizeMix, sample_rows
from layer_cache.cache_types import CacheType
from layer_cache.schema import migrate_layer_db

MIB = 1024 * 1024
BENCH_SIZES = SizeMix(small=(1024, 16 * 1024), large=(100 * 1024, 5 * MIB), large_share=0.01)
_COPY_CHUNK_BYTES = 64 * MIB
_COPY_CHUNK_ROWS = 5000
_COLUMNS = ["key", "sort_key", "created_at", "value"]


@dataclass(frozen=True)
class SeededDatabase:
    """A database holding a seeded ``cas`` table."""

    dbname: str
    rows: int
    rows_below_cutoff: int
    bytes_below_cutoff: int
    largest_value: int
    largest_tie: int  # rows below the cutoff sharing the most common created_at

    def as_json(self) -> dict[str, int | str]:
        """For the results file."""
        return {
            "dbname": self.dbname,
            "rows": self.rows,
            "rows_below_cutoff": self.rows_below_cutoff,
            "bytes_below_cutoff": self.bytes_below_cutoff,
            "largest_value": self.largest_value,
            "largest_tie": self.largest_tie,
        }


async def create_database(pg: PostgresEndpoint, dbname: str) -> None:
    """A fresh, empty database owned by the app role."""
    admin = await asyncpg.connect(pg.dsn(dbname="postgres", superuser=True))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        await admin.execute(f'CREATE DATABASE "{dbname}" OWNER "{pg.user}"')
    finally:
        await admin.close()


async def seed_database(
    pg: PostgresEndpoint,
    dbname: str,
    rows: int,
    *,
    cutoff: datetime,
    sizes: SizeMix = BENCH_SIZES,
) -> SeededDatabase:
    """Create ``dbname`` with the layer-db schema and ``rows`` sample rows in ``cas``."""
    await create_database(pg, dbname)
    pool = await asyncpg.create_pool(pg.dsn(dbname=dbname), min_size=1, max_size=2)
    try:
        await migrate_layer_db(pool)
        rng = random.Random(f"0-{CacheType.CAS}")  # as devenv.seed.seed(seed_value=0)
        async with pool.acquire() as connection:
            chunk: list[tuple[str, str, datetime, bytes]] = []
            chunk_bytes = 0
            for key, created_at, value in sample_rows(
                CacheType.CAS, rows, cutoff=cutoff, rng=rng, sizes=sizes
            ):
                chunk.append((key, key, created_at, value))
                chunk_bytes += len(value)
                if chunk_bytes >= _COPY_CHUNK_BYTES or len(chunk) >= _COPY_CHUNK_ROWS:
                    await connection.copy_records_to_table("cas", records=chunk, columns=_COLUMNS)
                    chunk, chunk_bytes = [], 0
            if chunk:
                await connection.copy_records_to_table("cas", records=chunk, columns=_COLUMNS)
            await connection.execute("ANALYZE cas")
            totals = await connection.fetchrow(
                "SELECT count(*) AS rows, coalesce(sum(octet_length(value)), 0) AS bytes,"
                " coalesce(max(octet_length(value)), 0) AS largest"
                " FROM cas WHERE created_at < $1",
                cutoff,
            )
            largest_tie = await connection.fetchval(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM cas"
                " WHERE created_at < $1 GROUP BY created_at) AS ties",
                cutoff,
            )
    finally:
        await pool.close()
    assert totals is not None
    return SeededDatabase(
        dbname=dbname,
        rows=rows,
        rows_below_cutoff=int(totals["rows"]),
        bytes_below_cutoff=int(totals["bytes"]),
        largest_value=int(totals["largest"]),
        largest_tie=int(largest_tie),
    )


def uniform_sizes(size: int) -> SizeMix:
    """Every value exactly ``size`` bytes."""
    return SizeMix(small=(size, size), large_share=0.0)


def seed_and_report(
    pg: PostgresEndpoint, dbname: str, rows: int, *, cutoff: datetime, sizes: SizeMix
) -> SeededDatabase:
    """``seed_database``, saying on stdout what it seeded and how long it took."""
    started = time.monotonic()
    print(f"  seeding {rows:,} rows into {dbname}.cas ...", end="", flush=True)
    database = asyncio.run(seed_database(pg, dbname, rows, cutoff=cutoff, sizes=sizes))
    print(
        f" {database.rows_below_cutoff:,} below the cutoff,"
        f" {database.bytes_below_cutoff / 2**20:,.0f} MiB,"
        f" largest tie {database.largest_tie:,} rows ({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    return database
