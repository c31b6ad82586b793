"""``make demo``: the whole backfill on this machine, as an operator would run it.

Starts a throwaway PostgreSQL cluster and an S3 server (local binaries and moto, or containers
where Docker answers; ``--s3 seaweedfs`` for one that checks signatures and digests), creates the
ten buckets, creates the schema with ``--migration-mode runAndQuit``, seeds sample rows into
all eight backfillable caches (and says how many lie at or after the cutoff, which a backfill
does not copy), runs ``python -m services --migration-mode backfillLayerCache`` configured only
through ``SI_…`` environment variables, checks S3 against Postgres byte for byte, and stops
everything it started, also on Ctrl-C, SIGTERM or failure.

``--up`` (``make demo-up``) stops after seeding: it prints the ``export`` lines that reach the
servers and waits in the foreground until Ctrl-C (or SIGTERM), so every command of the README can
be tried in another shell; then it stops what it started and leaves nothing behind. ``--keep``
(``make demo KEEP=1``) does the same after the whole demo.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

import aioboto3
import asyncpg
from aiobotocore.config import AioConfig

from devenv.environment import BUCKET_PREFIX, service_environment
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3_KINDS, S3Endpoint, create_buckets, start_s3
from devenv.seed import Seeded, seed
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name, object_key
from migrations_mode.config import format_checkpoint
from migrations_mode.tables import build_table, format_count, render_table

WRITE_QUEUE_DIR = "SI_SDF__SERVER__WRITE_QUEUE_DIR"
# No collector runs here: say so, rather than have every command try the default endpoint.
NO_COLLECTOR = {"OTEL_METRICS_EXPORTER": "none"}


def run_service(args: list[str], env: dict[str, str]) -> None:
    """Run ``python -m services`` with the operator's environment, output straight through."""
    print(f"\n$ python -m services {' '.join(args)}", flush=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SI_")}
    if not any(name.startswith("OTEL_") for name in clean):
        clean |= NO_COLLECTOR
    subprocess.run([sys.executable, "-m", "services", *args], env=clean | env, check=True)


async def seed_all(
    pg: PostgresEndpoint, rows_per_cache: int, cutoff: datetime
) -> dict[CacheType, Seeded]:
    """Sample rows into every backfillable cache; what each got, around the cutoff."""
    pool = await asyncpg.create_pool(pg.dsn(), min_size=1, max_size=4)
    try:
        seeded = {
            cache_type: await seed(pool, cache_type, rows_per_cache, cutoff=cutoff)
            for cache_type in BACKFILLABLE_CACHE_TYPES
        }
        await pool.execute("ANALYZE")  # planner statistics give the progress display its totals
    finally:
        await pool.close()
    return seeded


def seed_report(seeded: Mapping[CacheType, Seeded], cutoff: datetime) -> str:
    """What was seeded per cache: the rows below the cutoff (copied) and at or after it (not:
    they stand for rows written once DualWrite was on, which the live path already put in S3)."""

    def cells(name: str, counts: Seeded) -> tuple[str, str, str, str]:
        return (
            name,
            format_count(counts.rows),
            format_count(counts.at_or_after_cutoff),
            format_count(counts.below_cutoff),
        )

    total = Seeded(
        sum(counts.rows for counts in seeded.values()),
        sum(counts.at_or_after_cutoff for counts in seeded.values()),
    )
    table = build_table(
        ("cache", "seeded", "at/after cutoff", "to copy"),
        [cells(cache_type.value, counts) for cache_type, counts in seeded.items()],
        total=cells("total", total),
    )
    return "\n".join(
        [
            f"seeded sample rows around the cutoff {format_checkpoint(cutoff)}:",
            render_table(table),
            "the backfill copies the rows created before the cutoff; those at or after it stand"
            " for writes made",
            "once DualWrite was on (the live path puts them in S3), so it leaves them alone",
        ]
    )


def server_environment(work_dir: Path) -> dict[str, str]:
    """The layer cache server's write queue and a fresh read and write token (files in
    ``work_dir``), so the server can be tried as production runs it: with tokens."""
    tokens = {}
    for role in ("read", "write"):
        token_file = work_dir / f"{role}-tokens"
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        tokens[f"SI_SDF__SERVER__{role.upper()}_TOKENS_FILE"] = str(token_file)
    return {WRITE_QUEUE_DIR: str(work_dir / "write-queue")} | tokens


def export_block(env: Mapping[str, str], cutoff: datetime) -> str:
    """The shell lines that reach the servers, and example commands to paste after them."""
    lines = [
        "# In another shell, from the repository: . .venv/bin/activate, then paste:",
        *(f"export {name}={shlex.quote(value)}" for name, value in env.items()),
        f"# Rows were seeded around the cutoff {format_checkpoint(cutoff)}, e.g.:",
        "#   python -m services --migration-mode backfillLayerCache --backfill-cache-types cas \\",
        f"#     --backfill-cutoff-timestamp {shlex.quote(format_checkpoint(cutoff))}",
        "# The server (--migration-mode run) asks for the tokens in those files, e.g.:",
        '#   curl -H "Authorization: Bearer $(cat $SI_SDF__SERVER__READ_TOKENS_FILE)" \\',
        "#     http://localhost:5156/v1/cas/<key>",
    ]
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM ends the demo as Ctrl-C does: every ``with`` unwinds and stops its server."""
    raise SystemExit(128 + signum)


def wait_until_interrupted(env: Mapping[str, str], cutoff: datetime) -> None:
    """Print how to reach the servers, then wait in the foreground until Ctrl-C or SIGTERM."""
    print("\nthe servers stay up until Ctrl-C\n\n" + export_block(env, cutoff), flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopping the local servers", flush=True)


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
    """Start, seed, backfill, verify, stop (``--up``: start, seed, wait; ``--keep``: wait after
    the demo)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows-per-cache", type=int, default=500)
    parser.add_argument("--max-concurrent-uploads", type=int, default=8)
    parser.add_argument(
        "--s3",
        choices=S3_KINDS,
        default=None,
        help="the S3 server to start (default: minio where Docker answers, else moto)",
    )
    stay = parser.add_mutually_exclusive_group()
    stay.add_argument(
        "--up",
        action="store_true",
        help="start, create the schema and seed, print the environment, wait until Ctrl-C",
    )
    stay.add_argument(
        "--keep", action="store_true", help="after the demo, keep the servers up until Ctrl-C"
    )
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cutoff = datetime.now(UTC).replace(microsecond=0)
    print("starting a local PostgreSQL and S3 server ...", flush=True)
    with (
        start_postgres() as postgres,
        start_s3(kind=options.s3) as s3_server,
        tempfile.TemporaryDirectory(prefix="si-demo-") as work_dir,
    ):
        pg, s3 = postgres.endpoint, s3_server.endpoint
        print(f"  postgres {pg.host}:{pg.port}  s3 {s3.url} ({s3.kind})", flush=True)
        create_buckets(
            s3, [bucket_name(spec.table, BUCKET_PREFIX) for spec in CACHE_SPECS.values()]
        )
        # The server's write queue and token files too, so `--migration-mode run` works as well.
        env = service_environment(pg, s3) | server_environment(Path(work_dir))
        run_service(["--migration-mode", "runAndQuit"], env)
        seeded = asyncio.run(seed_all(pg, options.rows_per_cache, cutoff))
        print(seed_report(seeded, cutoff), flush=True)
        if not options.up:
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
            print(
                f"\nverified: {checked} objects in S3 byte-identical to the rows below the cutoff"
            )
        if options.up or options.keep:
            wait_until_interrupted(env | NO_COLLECTOR, cutoff)
    print("stopped the local servers")


if __name__ == "__main__":
    main()
