"""The backfill pointed at a read replica: a real streaming standby of a real primary.

The module starts its own primary (``LocalPostgres``) and a hot standby of it
(``LocalPostgres.start_standby``: ``pg_basebackup -R``), once for all its tests; every test
seeds a fresh database on the primary, waits until the standby has replayed it
(``LocalStandby.catch_up``), and runs the real CLI with the ``SI_SDF__…`` env pointing at the
standby. The standby cancels a conflicting query at once (``max_standby_streaming_delay=0``,
``hot_standby_feedback`` off: the settings the README warns against), so the one recovery
conflict a test provokes on purpose is met, and any other is retried like it. A session whose
Postgres is a container (Docker) skips the module: the standby needs the local binaries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from devenv.postgres import LocalPostgres, LocalStandby, PostgresServer
from devenv.s3 import S3Server
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.schema import migrate_layer_db
from migrations_mode.progress_store import PROGRESS_TABLE
from tests.cli_harness import CliRun, Job, backfill_args, cli
from tests.conftest import LayerDb, fresh_database, service_env
from tests.faults_support import (
    ProgressReader,
    assert_s3_holds_exactly,
    list_objects,
    progress_objects,
)
from tests.support import (
    CUTOFF,
    SeedRow,
    cache_bucket,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

JOB_TIMEOUT_S = 90.0
READ_ONLY_EVENT = "layer db is read-only"
STANDBY_REASON = "a standby in recovery"
# Cancel conflicting queries at once (the default waits 30 s), without feedback to the primary.
CONFLICT_PRONE = {"max_standby_streaming_delay": "0", "hot_standby_feedback": "off"}


@dataclass(frozen=True)
class Replica:
    primary: LocalPostgres
    standby: LocalStandby


@pytest.fixture(scope="module")
def replica(pg_server: PostgresServer) -> Iterator[Replica]:
    if not isinstance(pg_server, LocalPostgres):
        pytest.skip(
            "a streaming standby is made from the local PostgreSQL binaries (pg_basebackup); "
            "this session's Postgres is a container"
        )
    with LocalPostgres() as primary:
        standby = primary.start_standby(settings=CONFLICT_PRONE)
        try:
            yield Replica(primary, standby)
        finally:
            standby.stop()


@dataclass(frozen=True)
class ReplicaDb:
    """A fresh layer database on the primary, and the same database on the standby."""

    primary: LayerDb
    standby: LayerDb
    replica: Replica

    async def catch_up(self) -> None:
        """Wait until the standby has replayed everything written on the primary so far."""
        await asyncio.to_thread(self.replica.standby.catch_up)


@pytest.fixture
async def replica_db(replica: Replica) -> AsyncIterator[ReplicaDb]:
    standby = replica.standby.endpoint
    async with fresh_database(replica.primary.endpoint, pool_size=4) as primary:
        await migrate_layer_db(primary.pool)
        await asyncio.to_thread(replica.standby.catch_up)
        dbname = primary.dbname
        standby_pool = await asyncpg.create_pool(standby.dsn(dbname=dbname), min_size=1, max_size=4)
        try:
            yield ReplicaDb(primary, LayerDb(standby, dbname, standby_pool), replica)
        finally:
            await standby_pool.close()


@pytest.fixture
def standby_env(replica_db: ReplicaDb, s3_server: S3Server, bucket_prefix: str) -> dict[str, str]:
    """The operator's environment with the layer database's host and port those of the standby."""
    return service_env(replica_db.standby, s3_server.endpoint, bucket_prefix)


# Value sizes besides the typical few KiB: empty, tiny, and large (rows are copied as they are).
SIZES = (0, 1, 2, 100, 4096, 65_536, 1_048_576)


def value_size(rng: random.Random, index: int) -> int:
    """Each of ``SIZES`` once, then a 64 KiB value every 40 rows, else up to 3 KB."""
    if index < len(SIZES):
        return SIZES[index]
    return 65_536 if index % 40 == 0 else rng.randint(1, 3000)


def rows_around_cutoff(rng: random.Random, below: int, after: int) -> list[SeedRow]:
    """``below`` rows before the cutoff (every 5 share a created_at) of varied sizes, and
    ``after`` rows at or after it, which no run may copy."""
    rows = [
        SeedRow(
            random_key(rng, rng.choice((32, 64))),
            rng.randbytes(value_size(rng, index)),
            CUTOFF - timedelta(milliseconds=1 + index // 5),
        )
        for index in range(below)
    ]
    rows += [
        SeedRow(random_key(rng), rng.randbytes(rng.randint(0, 500)), CUTOFF + timedelta(seconds=i))
        for i in range(after)
    ]
    return rows


async def seed(db: ReplicaDb, counts: Mapping[CacheType, int]) -> dict[CacheType, dict[str, bytes]]:
    """Insert rows on the primary, wait for the standby; returns each cache's rows below the
    cutoff as the standby sees them."""
    rng = random.Random(f"replica-{sorted(counts.items())}")
    for cache_type, count in counts.items():
        await insert_rows(db.primary.pool, cache_type, rows_around_cutoff(rng, count, count // 10))
    await db.catch_up()
    below = {c: await rows_below(db.standby.pool, c, CUTOFF) for c in counts}
    assert {c: len(rows) for c, rows in below.items()} == dict(counts)
    return below


async def progress_table_exists(db: LayerDb) -> bool:
    return bool(await db.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", PROGRESS_TABLE))


def assert_said_once_it_is_a_standby(run: CliRun) -> None:
    [line] = run.named(READ_ONLY_EVENT)
    assert (line["reason"], line["progress_store"], line["level"]) == (
        STANDBY_REASON,
        "s3",
        "info",
    ), line


async def assert_nothing_in_s3(s3_client: S3Client, bucket_prefix: str) -> None:
    for cache_type in CACHE_SPECS:
        bucket = cache_bucket(cache_type, bucket_prefix)
        assert await list_objects(s3_client, bucket) == {}, cache_type
        assert await progress_objects(s3_client, bucket) == [], cache_type


# --------------------------------------------------------------------------------------------
# The whole backfill from a standby, killed and resumed

CACHES = {CacheType.CAS: 400, CacheType.WORKSPACE_SNAPSHOT: 150, CacheType.CHANGE_BATCH: 100}


async def test_a_backfill_from_a_standby_killed_and_resumed_copies_every_row_and_writes_no_db(
    replica_db: ReplicaDb,
    standby_env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rows = await seed(replica_db, CACHES)
    args = backfill_args(
        "--backfill-key-batch-size",
        "25",
        "--backfill-concurrency",
        "fixed",
        "--backfill-max-concurrent-uploads",
        "2",
        "--backfill-checkpoint-interval-secs",
        "0.2",
        cache_types=list(CACHES),
    )
    progress = ProgressReader("s3", replica_db.standby.pool, s3_client, bucket_prefix, CUTOFF)

    async with Job(args, standby_env) as job:
        await job.expect(
            lambda event: (
                event.get("event") == "backfill checkpoint"
                and event.get("cache_type") == CacheType.CAS.value
                and event["processed"] >= 100
            ),
            within_s=JOB_TIMEOUT_S,
        )
        # Two pages have finished: the first save is on its way to S3 (or there already).
        while (saved := await progress.load(CacheType.CAS)) is None or saved.position is None:
            assert job.running, job.output()[-4000:]
            await asyncio.sleep(0.02)
        assert job.kill(), "the run ended before it could be killed: too few rows"
        killed = await job.finish(JOB_TIMEOUT_S)
    assert killed.status == -9, killed.describe()
    assert_said_once_it_is_a_standby(killed)
    [starting] = killed.named("starting backfill for all cache types")
    assert starting["progress_store"] == "s3", starting

    await asyncio.sleep(0.3)  # a PUT the killed process sent may still land
    saved = await progress.load(CacheType.CAS)
    assert saved is not None
    assert saved.position is not None
    assert not saved.completed

    resumed = await cli(args, standby_env, within_s=JOB_TIMEOUT_S)

    assert resumed.status == 0, resumed.describe()
    assert_said_once_it_is_a_standby(resumed)
    [resuming] = resumed.named("resuming from saved progress", CacheType.CAS)
    assert (resuming["progress_store"], resuming["rows_done_earlier_runs"]) == (
        "s3",
        saved.rows_done,
    )
    [start] = resumed.named("starting backfill", CacheType.CAS)
    assert start["resume_after_key"] == saved.position.key, start
    after = [key for key in rows[CacheType.CAS] if key > saved.position.key]
    assert resumed.summary(CacheType.CAS)["processed"] == len(after), "it did not resume"
    for cache_type, below in rows.items():
        # Every row below the cutoff, byte for byte, and nothing else (no row above it).
        await assert_s3_holds_exactly(s3_client, bucket_prefix, cache_type, below)
        assert await progress_objects(s3_client, cache_bucket(cache_type, bucket_prefix))
        record = await progress.load(cache_type)
        assert record is not None
        assert record.completed, cache_type
    assert not await progress_table_exists(replica_db.primary)
    assert await replica_db.standby.pool.fetchval("SELECT pg_is_in_recovery()")


# --------------------------------------------------------------------------------------------
# What writes nothing, and what is refused


@pytest.mark.parametrize("mode", [[], ["--backfill-dry-run"]], ids=["copy", "dry-run"])
async def test_a_postgres_progress_store_on_a_standby_exits_3_with_one_line_and_writes_nothing(
    mode: list[str],
    replica_db: ReplicaDb,
    standby_env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(replica_db, {CacheType.CAS: 40})
    args = backfill_args(*mode, "--backfill-progress-store", "postgres", cache_types="cas")

    refused = await cli(args, standby_env)

    assert refused.status == 3, refused.describe()
    message = refused.the_error()["event"]
    assert message == (
        f"the layer database is read-only ({STANDBY_REASON}), so --backfill-progress-store "
        "postgres cannot keep progress there; use --backfill-progress-store s3 (or auto)"
    )
    assert refused.stdout == ""
    await assert_nothing_in_s3(s3_client, bucket_prefix)
    assert not await progress_table_exists(replica_db.primary)


async def test_a_dry_run_and_a_verification_against_a_standby_work_and_write_nothing(
    replica_db: ReplicaDb,
    standby_env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rows = (await seed(replica_db, {CacheType.CAS: 60}))[CacheType.CAS]

    dry_run = await cli(backfill_args("--backfill-dry-run", cache_types="cas"), standby_env)
    # Forced into Postgres, a verification is not refused either: it records no progress.
    verify = await cli(
        backfill_args(
            "--backfill-verify",
            "--backfill-progress-store",
            "postgres",
            cache_types="cas",
        ),
        standby_env,
    )

    assert dry_run.status == 0, dry_run.describe()
    assert_said_once_it_is_a_standby(dry_run)
    [estimate] = dry_run.named("backfill dry run")
    assert estimate["rows"] == len(rows), estimate
    assert verify.status == 1, verify.describe()  # every object is missing: nothing was copied
    assert_said_once_it_is_a_standby(verify)
    assert verify.summary(CacheType.CAS)["missing"] == len(rows), verify.summary(CacheType.CAS)
    await assert_nothing_in_s3(s3_client, bucket_prefix)
    assert not await progress_table_exists(replica_db.primary)


# --------------------------------------------------------------------------------------------
# A recovery conflict, provoked


async def test_a_recovery_conflict_on_the_standby_is_retried_and_the_run_completes(
    replica_db: ReplicaDb,
    standby_env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    """The run's first listing waits on the standby for a lock the primary holds (replayed),
    its snapshot taken while an older transaction still runs; then the primary vacuums away
    rows another table deleted, and replaying that cancels every query whose snapshot might
    still see them: ``canceling statement due to conflict with recovery``, SQLSTATE 40001."""
    rows = (await seed(replica_db, {CacheType.CAS: 80}))[CacheType.CAS]
    primary, db = replica_db.replica.primary.endpoint, replica_db.primary
    await db.pool.execute("CREATE TABLE conflict_bait AS SELECT n FROM generate_series(1, 100) n")
    # A transaction in another database keeps the standby's snapshots old (it does not hold
    # back vacuum in this one); the rows it must not see are deleted after it began.
    older = await asyncpg.connect(primary.dsn(dbname="postgres", superuser=True))
    lock = await db.pool.acquire()
    try:
        await older.execute("BEGIN")
        await older.fetchval("SELECT txid_current()")
        await db.pool.execute("DELETE FROM conflict_bait")
        await lock.execute("BEGIN")
        # The only lock a standby replays: its listing of cas waits (not the checks before it).
        cas = CACHE_SPECS[CacheType.CAS].table
        await lock.execute(f"LOCK TABLE {cas} IN ACCESS EXCLUSIVE MODE")
        await replica_db.catch_up()
        async with Job(backfill_args(cache_types="cas"), standby_env) as job:
            await a_query_waits_for_a_lock(replica_db)
            await db.pool.execute("VACUUM conflict_bait")
            retry = await job.expect(
                lambda event: event.get("event") == "retrying storage call", within_s=30
            )
            await lock.execute("COMMIT")
            await older.execute("COMMIT")
            done = await job.finish(JOB_TIMEOUT_S)
    finally:
        await db.pool.release(lock)
        await older.close()

    assert (retry["error_class"], retry["cache_type"]) == ("transient", "cas"), retry
    assert "conflict with recovery (SQLSTATE 40001, transient)" in retry["error"], retry
    assert done.status == 0, done.describe()
    assert done.summary(CacheType.CAS)["retried"] >= 1, done.summary(CacheType.CAS)
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, rows)


async def a_query_waits_for_a_lock(replica_db: ReplicaDb, within_s: float = 30) -> None:
    """Return once a session of the test database on the standby waits for a lock, holding a
    snapshot."""
    standby = replica_db.replica.standby.endpoint
    admin = await asyncpg.connect(standby.dsn(dbname="postgres", superuser=True))
    try:
        async with asyncio.timeout(within_s):
            while True:
                waiting = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                    " AND wait_event_type = 'Lock' AND backend_xmin IS NOT NULL",
                    replica_db.standby.dbname,
                )
                if waiting:
                    return
                await asyncio.sleep(0.02)
    finally:
        await admin.close()
