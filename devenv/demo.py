"""``make demo``: the whole backfill on this machine, as an operator would run it.

Starts a throwaway PostgreSQL cluster and an S3 server (local binaries and moto, or containers
where Docker answers; ``--s3 seaweedfs`` for one that checks signatures and digests), creates the
ten buckets, creates the schema with ``--migration-mode runAndQuit``, seeds sample rows into
all eight backfillable caches, runs ``python -m services --migration-mode backfillLayerCache``
configured only through ``SI_…`` environment variables, checks S3 against Postgres byte for
byte, and stops everything it started, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime

import aioboto3
import asyncpg
from aiobotocore.config import AioConfig

from devenv.environment import BUCKET_PREFIX, service_environment
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3_KINDS, S3Endpoint, create_buckets, start_s3
from devenv.seed import seed
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS
from layer_cache.keys import bucket_name, object_key
from migrations_mode.config import format_checkpoint


def run_service(args: list[str], env: dict[str, str]) -> None:
    """Run ``python -m services`` with the operator's environment, output straight through."""
    print(f"\n$ python -m services {' '.join(args)}", flush=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SI_")}
    if not any(name.startswith("OTEL_") for name in clean):
        clean["OTEL_METRICS_EXPORTER"] = "none"  # no collector here: say so, do not try one
    subprocess.run([sys.executable, "-m", "services", *args], env=clean | env, check=True)


async def seed_all(pg: PostgresEndpoint, rows_per_cache: int, cutoff: datetime) -> None:
    """Sample rows into every backfillable cache."""
    pool = await asyncpg.create_pool(pg.dsn(), min_size=1, max_size=4)
    try:
        for cache_type in BACKFILLABLE_CACHE_TYPES:
            await seed(pool, cache_type, rows_per_cache, cutoff=cutoff)
        await pool.execute("ANALYZE")  # planner statistics give the progress display its totals
    finally:
        await pool.close()


async def verify(pg: PostgresEndpoint, s3: S3Endpoint, cutoff: datetime) -> int:
    """Compare every bucket with its table below the cutoff; returns the objects checked."""
    checked = 0
    connection = await asyncpg.connect(pg.dsn())
    session = aioboto3.Session()
    async with session.client(
        "s3",
        **s3.client_options(),
        config=AioConfig(s3={"addressing_style": "path"}),
    ) as client:
        for cache_type in BACKFILLABLE_CACHE_TYPES:
            table = CACHE_SPECS[cache_type].table
            bucket = bucket_name(table, BUCKET_PREFIX)
            rows = await connection.fetch(
                f"SELECT key, value FROM {table} WHERE created_at < $1", cutoff
            )
            listed = 0
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket):
                listed += len(page.get("Contents", []))
            if listed != len(rows):
                raise SystemExit(f"{bucket}: {listed} objects for {len(rows)} rows")
            for row in rows:
                response = await client.get_object(Bucket=bucket, Key=object_key(row["key"]))
                async with response["Body"] as stream:
                    if await stream.read() != row["value"]:
                        raise SystemExit(f"{bucket}: object for {row['key']} differs")
                checked += 1
    await connection.close()
    return checked


def main() -> None:
    """Start, seed, backfill, verify, stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows-per-cache", type=int, default=500)
    parser.add_argument("--max-concurrent-uploads", type=int, default=8)
    parser.add_argument(
        "--s3",
        choices=S3_KINDS,
        default=None,
        help="the S3 server to start (default: minio where Docker answers, else moto)",
    )
    options = parser.parse_args()
    cutoff = datetime.now(UTC).replace(microsecond=0)
    print("starting a local PostgreSQL and S3 server ...", flush=True)
    with start_postgres() as postgres, start_s3(kind=options.s3) as s3_server:
        pg, s3 = postgres.endpoint, s3_server.endpoint
        print(f"  postgres {pg.host}:{pg.port}  s3 {s3.url} ({s3.kind})", flush=True)
        create_buckets(
            s3, [bucket_name(spec.table, BUCKET_PREFIX) for spec in CACHE_SPECS.values()]
        )
        env = service_environment(pg, s3)
        run_service(["--migration-mode", "runAndQuit"], env)
        asyncio.run(seed_all(pg, options.rows_per_cache, cutoff))
        print(f"seeded {options.rows_per_cache} rows into each of the 8 caches", flush=True)
        run_service(
            ["--migration-mode", "backfillLayerCache"],
            env
            | {
                "SI_BACKFILL_CUTOFF_TIMESTAMP": format_checkpoint(cutoff),
                "SI_BACKFILL_CACHE_TYPES": ",".join(BACKFILLABLE_CACHE_TYPES),
                "SI_BACKFILL_MAX_CONCURRENT_UPLOADS": str(options.max_concurrent_uploads),
                "SI_BACKFILL_CHECKPOINT_INTERVAL_SECS": "5",
            },
        )
        checked = asyncio.run(verify(pg, s3, cutoff))
        print(f"\nverified: {checked} objects in S3 byte-identical to the rows below the cutoff")
    print("stopped the local servers")


if __name__ == "__main__":
    main()
