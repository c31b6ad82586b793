"""The backfill job under real faults: kill -9, S3 and Postgres failures, concurrent writers,
a least-privilege role, broken environments and SIGTERM.

Every test runs the real entrypoint (``python -m services`` as a subprocess, configured by the
``SI_SDF__…`` env and flags, ``--log-json``) against the session's real Postgres and S3 servers,
with faults injected from outside the process: signals, ``devenv.faults.FaultProxy`` between the
job and S3, ``pg_terminate_backend`` and server restarts. What the job leaves in S3 is compared
with the rows in Postgres after every fault: no object may ever differ from its row, and a run
that reports completion must have copied every row below the cutoff and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import pytest

from devenv.faults import FaultPlan, FaultProxy
from devenv.postgres import PostgresServer
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.pg import PgLayer
from migrations_mode.progress_store import PROGRESS_TABLE, SavedProgress
from tests.cli_harness import CliRun, Event, Job, backfill_args, cli
from tests.conftest import LayerDb
from tests.faults_support import (
    ProgressReader,
    StrictMotoS3,
    assert_s3_holds_exactly,
    list_objects,
    object_key_of,
    present_keys,
    progress_objects,
    wrong_objects,
)
from tests.support import (
    CUTOFF,
    PG,
    S3_ACCESS_KEY,
    S3_ENDPOINT,
    S3_SECRET_KEY,
    SeedRow,
    cache_bucket,
    cache_objects,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

JOB_TIMEOUT_S = 90.0
STARTUP_TIMEOUT_S = 30.0


def rows_around_cutoff(
    rng: random.Random, below: int, *, after: int = 0, tie_every: int = 7, max_size: int = 2048
) -> list[SeedRow]:
    """``below`` rows before the cutoff (``tie_every`` of them share each created_at, so page
    boundaries fall inside ties) and ``after`` rows at or after it."""
    rows = [
        SeedRow(
            random_key(rng, rng.choice((32, 64))),
            rng.randbytes(rng.randint(1, max_size)),
            CUTOFF - timedelta(milliseconds=1 + index // tie_every),
        )
        for index in range(below)
    ]
    rows += [
        SeedRow(random_key(rng), rng.randbytes(rng.randint(1, 64)), CUTOFF + timedelta(seconds=i))
        for i in range(after)
    ]
    return rows


async def seed(
    db: LayerDb, rng: random.Random, counts: Mapping[CacheType, int]
) -> dict[CacheType, dict[str, bytes]]:
    """Insert rows into each cache (plus a few after the cutoff); returns the rows below it."""
    below: dict[CacheType, dict[str, bytes]] = {}
    for cache_type, count in counts.items():
        await insert_rows(db.pool, cache_type, rows_around_cutoff(rng, count, after=count // 20))
        below[cache_type] = await rows_below(db.pool, cache_type, CUTOFF)
        assert len(below[cache_type]) == count
    return below


def assert_json_lines_only(run: CliRun) -> None:
    """With ``--log-json`` every stderr line must be a JSON event (log pipelines parse them)."""
    assert run.non_json == [], (
        f"{len(run.non_json)} stderr lines are not JSON although --log-json was given, "
        f"starting with:\n{''.join(run.non_json[:12])}"
    )


# --------------------------------------------------------------------------------------------
# 1. kill -9 at random moments


def check_resume_events(
    run: CliRun, cache_type: CacheType, saved: SavedProgress | None, store_kind: str
) -> None:
    """What a run logged about where it started must match the progress saved before it."""
    if saved is not None and saved.completed:
        assert run.named("starting backfill", cache_type) == [], "a completed cache was walked"
        for event in run.named("completed backfill", cache_type):
            assert event.get("already_complete") is True, event
        return
    resumed = run.named("resuming from saved progress", cache_type)
    started = run.named("starting backfill", cache_type)
    position = saved.position if saved is not None else None
    if position is None:
        assert resumed == [], f"{cache_type}: resumed although nothing was saved: {resumed}"
        for event in started:
            assert event["resume_after_key"] is None, event
        return
    assert saved is not None
    if started:
        # The run got past loading its progress: it must have resumed right after the saved
        # position, from the store the previous runs wrote to.
        [event] = resumed
        assert event["progress_store"] == store_kind, event
        assert event["rows_done_earlier_runs"] == saved.rows_done, event
        assert started[0]["resume_after_key"] == position.key, (started[0], position)


# (store, trials, rows per cache, kills that must land mid-copy, concurrency mode and uploads in
# flight: with ``tuned`` the ceiling). The floor is what keeps the series from passing vacuously;
# a trial may legitimately end before its kill or be killed between a checkpoint and the next
# upload, so it is well below the number of trials. The tuned series runs at a ceiling of 64, so
# the re-work bound (key batch + uploads in flight) is checked at the higher concurrency too.
KILL_SERIES = [
    pytest.param(
        "auto",
        10,
        {CacheType.CAS: 900, CacheType.CHANGE_BATCH: 600},
        2,
        ("fixed", 4),
        id="progress-in-postgres",
    ),
    pytest.param(
        "s3", 3, {CacheType.WORKSPACE_SNAPSHOT: 600}, 1, ("fixed", 4), id="progress-in-s3"
    ),
    pytest.param(
        "auto", 4, {CacheType.CAS: 3000}, 1, ("tuned", 64), id="progress-in-postgres-tuned-64"
    ),
]


@pytest.mark.parametrize(("store", "trials", "counts", "mid_copy_floor", "uploads"), KILL_SERIES)
async def test_kill_9_at_random_moments_never_loses_or_corrupts_rows_and_rework_stays_bounded(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    store: str,
    trials: int,
    counts: dict[CacheType, int],
    mid_copy_floor: int,
    uploads: tuple[str, int],
) -> None:
    rng = random.Random(f"kill-9-{store}-{uploads[0]}")
    rows = await seed(layer_db, rng, counts)
    caches = list(counts)
    batch, (mode, concurrency) = 50, uploads
    args = backfill_args(
        cache_types=caches,
        key_batch_size=batch,
        max_concurrent_uploads=concurrency,
        concurrency=mode,
        progress_store=store,
    )
    store_kind = "postgres" if store == "auto" else "s3"  # the owner role may create the table
    progress = ProgressReader(store_kind, layer_db.pool, s3_client, bucket_prefix, CUTOFF)
    saved: dict[CacheType, SavedProgress | None] = dict.fromkeys(caches)
    killed_mid_run = 0
    reworks: list[int] = []
    beyond: dict[CacheType, tuple[int, int]] = {}  # rows after the position: (all, in S3)

    for trial in range(trials):
        async with Job(args, env) as job:
            if trial % 4 == 3:
                # Now and then during start-up: connecting, preflight, opening the store.
                await asyncio.sleep(rng.uniform(0.3, 1.5))
            else:
                started = await job.wait_for_event(
                    "starting backfill for all cache types", STARTUP_TIMEOUT_S
                )
                assert started["progress_store"] == store_kind, started
                await asyncio.sleep(rng.uniform(0.0, 0.8))
            killed_mid_run += job.kill()
            run = await job.finish(JOB_TIMEOUT_S)
        assert run.status in (-9, 0), f"trial {trial}: {run.describe()}"
        # Work a dead client sent before the kill may still land (an upsert the backend already
        # received, a PUT whose body reached the server): let it settle before measuring.
        await asyncio.sleep(0.3)
        for cache_type in caches:
            check_resume_events(run, cache_type, saved[cache_type], store_kind)
            now_saved = await progress.load(cache_type)
            stored = await list_objects(s3_client, cache_bucket(cache_type, bucket_prefix))
            below = rows[cache_type]
            wrong = wrong_objects(cache_type, stored, below)
            assert wrong == [], f"trial {trial}, {cache_type}: objects unlike their rows: {wrong}"
            present = present_keys(cache_type, stored, below)
            if now_saved is not None and now_saved.completed:
                assert present == below.keys(), f"trial {trial}, {cache_type}: complete but not"
                saved[cache_type] = now_saved
                continue
            position = now_saved.position if now_saved is not None else None
            # The saved position's promise: every row up to it is in S3, so resuming after it
            # loses nothing.
            finished = {key for key in below if position is not None and key <= position.key}
            lost = sorted(finished - present)
            assert not lost, (
                f"trial {trial}, {cache_type}: {len(lost)} rows at or before the saved position "
                f"{position} are not in S3, e.g. {lost[:3]}"
            )
            # Re-work: the next run (same arguments) walks exactly the rows after the saved
            # position (check_resume_events verifies it starts there) and takes every one that
            # is already in S3 a second time. Those rows are the ones present beyond the
            # position now: nothing writes between this listing and the next run. So this count
            # is what the next run redoes if it gets past them, and an upper bound if killed
            # first; the final run's ``skipped`` count confirms it exactly.
            after = {key for key in below if position is None or key > position.key}
            rework = len(after & present)
            reworks.append(rework)
            beyond[cache_type] = (len(after), rework)
            # The bound: the batch that finished since the last save was taken, the rows that
            # finished while the next one was being written (about one upload's time, so up to
            # the uploads in flight; a fresh-clone run saw 56 with batch 50 and 4 in flight) and
            # the uploads in flight.
            assert rework <= batch + 2 * concurrency, (
                f"trial {trial}, {cache_type}: {rework} rows beyond the saved position {position} "
                f"are already in S3; a re-run redoes them all (bound: key batch {batch} + "
                f"2 x concurrency {concurrency})"
            )
            saved[cache_type] = now_saved

    assert killed_mid_run >= (trials + 1) // 2, "most runs ended before the kill: too few rows"
    mid_copy = sum(1 for rework in reworks if rework > 0)
    assert mid_copy >= mid_copy_floor, f"only {mid_copy} kills landed mid-copy: {reworks}"

    async with Job(args, env) as job:
        final = await job.finish(JOB_TIMEOUT_S)

    assert final.status == 0, final.describe()
    for cache_type in caches:
        check_resume_events(final, cache_type, saved[cache_type], store_kind)
        before = saved[cache_type]
        summary = final.summary(cache_type)
        assert summary["status"] == "completed", summary
        if before is not None and before.completed:
            assert summary["processed"] == 0, summary
        else:
            walked, rework = beyond[cache_type]
            assert (summary["processed"], summary["skipped"]) == (walked, rework), summary
        await assert_s3_holds_exactly(s3_client, bucket_prefix, cache_type, rows[cache_type])
    assert_json_lines_only(final)


async def test_a_completed_progress_record_counts_each_row_once_even_after_kills(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rows = (await seed(layer_db, random.Random("rows-done"), {CacheType.CAS: 400}))[CacheType.CAS]
    args = backfill_args(key_batch_size=20, max_concurrent_uploads=8, checkpoint_interval_secs=0.1)
    progress = ProgressReader("postgres", layer_db.pool, s3_client, bucket_prefix, CUTOFF)
    # Kill mid-run until a saved record counts rows beyond its own position as done (rows that
    # finished out of order): those are exactly the rows a resumed run walks again. A store
    # that only counts rows up to its position never gets there, and the loop just ends.
    overcounted = False
    for _kill in range(6):
        async with Job(args, env) as job:
            await job.wait_for(
                lambda event: (
                    event.get("event") == "backfill checkpoint" and event["processed"] >= 60
                ),
                JOB_TIMEOUT_S,
            )
            job.kill()
            await job.finish(JOB_TIMEOUT_S)
        await asyncio.sleep(0.3)
        saved = await progress.load(CacheType.CAS)
        if saved is not None and saved.position is not None:
            position = saved.position
            up_to_position = sum(1 for key in rows if key <= position.key)
            if saved.rows_done > up_to_position:
                overcounted = True
                break

    final = await cli(args, env, within_s=JOB_TIMEOUT_S)

    assert final.status == 0, final.describe()
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, rows)
    record = await progress.load(CacheType.CAS)
    assert record is not None
    assert record.completed
    row_count = len(rows)
    assert record.rows_done == row_count, (
        f"the completed record says rows_done={record.rows_done} for a cache of {row_count} rows "
        f"(a killed run saved rows beyond its position as done: {overcounted}; the resumed run "
        "walked them again and counted them a second time)"
    )


# --------------------------------------------------------------------------------------------
# 2. S3 faults through the fault proxy


def proxied(env: Mapping[str, str], proxy: FaultProxy) -> dict[str, str]:
    """The job's env with S3 reached through ``proxy``."""
    return {**env, S3_ENDPOINT: proxy.url}


S3_FAULT_PLANS = [
    pytest.param(
        FaultPlan(
            slowdown_share=0.2,
            internal_error_share=0.05,
            reset_share=0.05,
            latency_s=(0.0, 0.02),
            seed=2026,
        ),
        ("throttled", "transient"),
        ("slowdown", "internal_error", "reset"),
        id="20pct-slowdown-5pct-internal-error-5pct-reset",
    ),
    pytest.param(
        FaultPlan(slowdown_share=0.4, methods=frozenset({"PUT"}), seed=2027),
        ("throttled",),
        ("slowdown",),
        id="40pct-slowdown-on-every-put",
    ),
]


@pytest.mark.parametrize(("plan", "retried_classes", "injected"), S3_FAULT_PLANS)
async def test_s3_faults_are_retried_by_class_throttling_lowers_the_upload_limit_and_s3_is_exact(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
    plan: FaultPlan,
    retried_classes: tuple[str, ...],
    injected: tuple[str, ...],
) -> None:
    rows = await seed(
        layer_db, random.Random("s3-faults"), {CacheType.CAS: 100, CacheType.CHANGE_BATCH: 50}
    )
    concurrency = 6
    args = backfill_args(
        cache_types=list(rows),
        key_batch_size=40,
        concurrency="fixed",  # the AIMD limit under test: at the maximum, halved by SlowDown
        max_concurrent_uploads=concurrency,
        checkpoint_interval_secs=0.2,
        # A generous budget: this test is about classification and the copy, not about giving
        # up (with 30 % faults per attempt, 25 failures in a row are out of reach).
        retry_max_attempts=25,
    )

    async with FaultProxy(s3_server.endpoint.url, FaultPlan(), stop_timeout_s=1.0) as proxy:
        async with Job(args, proxied(env, proxy)) as job:
            # Faults from the first copy request on; preflight under faults has its own test.
            await job.wait_for_event("starting backfill for all cache types", STARTUP_TIMEOUT_S)
            proxy.plan = plan
            run = await job.finish(JOB_TIMEOUT_S)
        counts = dict(proxy.counts)

    assert run.status == 0, run.describe()
    for outcome in injected:
        assert counts.get(outcome, 0) > 0, f"the proxy injected no {outcome}: {counts}"
    total = run.summary()
    assert total["status"] == "completed", total
    retries = total["retries_by_class"]
    for error_class in retried_classes:
        assert retries.get(error_class, 0) > 0, f"no {error_class} retries counted: {retries}"
    assert set(retries) <= {"throttled", "transient"}, retries
    throttled_limits = [
        event["upload_concurrency_limit"]
        for event in run.named("retrying storage call")
        if event["error_class"] == "throttled"
    ]
    assert throttled_limits, "no throttled retry was logged"
    assert min(throttled_limits) < concurrency, (
        f"SlowDown never lowered the upload limit below {concurrency}: {sorted(throttled_limits)}"
    )
    assert max(throttled_limits) <= concurrency
    for cache_type, below in rows.items():
        await assert_s3_holds_exactly(s3_client, bucket_prefix, cache_type, below)
    assert_json_lines_only(run)


async def test_slowdown_past_the_retry_budget_fails_with_one_line_naming_cache_and_class(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(layer_db, random.Random("budget"), {CacheType.CAS: 40})
    args = backfill_args(retry_max_attempts=3, retry_max_secs=5)
    # Every write is answered SlowDown; reads pass, so the run gets past its preflight (which a
    # throttled listing fails: see the next test) and into the copy.
    every_put_throttled = FaultPlan(slowdown_share=1.0, methods=frozenset({"PUT"}))

    async with FaultProxy(s3_server.endpoint.url, every_put_throttled) as proxy:
        run = await cli(args, proxied(env, proxy), within_s=JOB_TIMEOUT_S)
        counts = dict(proxy.counts)

    assert run.status == 1, run.describe()
    assert "Traceback" not in run.stderr
    [failed] = run.named("backfill failed")
    assert failed["level"] == "error", failed
    assert failed["failed_cache_type"] == "cas", failed
    assert failed["error_class"] == "throttled", failed
    assert "SlowDown" in failed["error"], failed
    errors = [event for event in run.events if event.get("level") == "error"]
    assert errors == [failed], f"more than one error line: {errors}"
    assert run.summary("cas")["status"] == "failed"
    retries = run.summary()["retries_by_class"]
    assert set(retries) == {"throttled"}, retries
    assert counts.get("PUT:slowdown", 0) >= 3, counts
    assert counts.get("PUT:forwarded", 0) == 0, counts
    assert await list_objects(s3_client, cache_bucket(CacheType.CAS, bucket_prefix)) == {}


async def test_a_throttled_preflight_bucket_listing_is_retried_like_any_other_s3_call(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rows = await seed(layer_db, random.Random("preflight"), {CacheType.CAS: 20})
    every_get_throttled = FaultPlan(slowdown_share=1.0, methods=frozenset({"GET"}))

    async with FaultProxy(s3_server.endpoint.url, every_get_throttled) as proxy:

        async def lift_after_the_first_slowdown() -> None:
            for _poll in range(60_000):  # a minute at most
                if proxy.counts["slowdown"]:
                    proxy.plan = FaultPlan()
                    return
                await asyncio.sleep(0.001)

        lifter = asyncio.create_task(lift_after_the_first_slowdown())
        try:
            run = await cli(
                backfill_args(),
                proxied(env, proxy),
            )
        finally:
            lifter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lifter
        counts = dict(proxy.counts)

    # One SlowDown answer to the first request (the preflight's one-key bucket listing) is the
    # same retryable fault the copy loop rides out; it does not mean the environment is broken.
    assert counts.get("GET:slowdown", 0) >= 1, counts
    assert run.status == 0, run.describe()
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, rows[CacheType.CAS])


# --------------------------------------------------------------------------------------------
# 3. Postgres faults

JOB_APPLICATION_NAME = "si-layer-db"  # the pool's application_name (PgPoolConfig default)


async def superuser_connection(pg_server: PostgresServer, dbname: str) -> asyncpg.Connection:
    return await asyncpg.connect(pg_server.endpoint.dsn(dbname=dbname, superuser=True))


async def terminate_the_jobs_connections_repeatedly(
    pg_server: PostgresServer, db: LayerDb, job: Job
) -> str:
    """``pg_terminate_backend`` on every connection of the job, every 0.1 s until it ends."""
    admin = await superuser_connection(pg_server, "postgres")
    terminated = rounds = 0
    try:
        while job.running:
            terminated += await admin.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = $2",
                JOB_APPLICATION_NAME,
                db.dbname,
            )
            rounds += 1
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    assert terminated >= 3, f"only {terminated} connections terminated in {rounds} rounds"
    return f"{terminated} backends terminated in {rounds} rounds"


async def restart_the_server(pg_server: PostgresServer, db: LayerDb, job: Job) -> str:
    """``pg_ctl restart -m fast`` (or ``docker restart``) of the session's server, once."""
    pid_before = pg_server.pid
    started = time.monotonic()
    await asyncio.to_thread(pg_server.restart)
    took = time.monotonic() - started
    assert job.running, "the job finished before the restart was over: too little data"
    if pid_before is not None:
        assert pg_server.pid != pid_before, "the server was not restarted"
    return f"restarted in {took:.2f} s"


PgFault = Callable[[PostgresServer, LayerDb, Job], Awaitable[str]]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(terminate_the_jobs_connections_repeatedly, id="pg_terminate_backend"),
        pytest.param(restart_the_server, id="server-restart"),
    ],
)
async def test_postgres_connections_lost_mid_run_are_retried_and_the_run_completes(
    pg_server: PostgresServer,
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
    fault: PgFault,
) -> None:
    rows = await seed(layer_db, random.Random("pg-faults"), {CacheType.CAS: 300})
    args = backfill_args(key_batch_size=25, max_concurrent_uploads=4, checkpoint_interval_secs=0.1)
    slow_puts = FaultPlan(latency_s=(0.01, 0.03), methods=frozenset({"PUT"}))  # a run of seconds

    try:
        async with (
            FaultProxy(s3_server.endpoint.url, slow_puts) as proxy,
            Job(args, proxied(env, proxy)) as job,
        ):
            await job.wait_for(
                lambda event: (
                    event.get("event") == "backfill checkpoint" and event["processed"] > 0
                ),
                JOB_TIMEOUT_S,
            )
            what_happened = await fault(pg_server, layer_db, job)
            run = await job.finish(JOB_TIMEOUT_S)
    finally:
        await wait_until_postgres_answers(pg_server)
        await layer_db.pool.expire_connections()

    assert run.status == 0, f"{what_happened}\n{run.describe()}"
    assert run.summary()["status"] == "completed"
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, rows[CacheType.CAS])
    assert_json_lines_only(run)


async def wait_until_postgres_answers(pg_server: PostgresServer) -> None:
    """The session server must be back for the tests that follow; fail loudly if it is not."""
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = await superuser_connection(pg_server, "postgres")
        except (OSError, asyncpg.PostgresError) as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the session's Postgres does not answer: {exc}") from exc
            await asyncio.sleep(0.2)
            continue
        try:
            assert await connection.fetchval("SELECT 1") == 1
        finally:
            await connection.close()
        return


# --------------------------------------------------------------------------------------------
# 4. Live writes and garbage collection during the run


async def test_rows_inserted_after_the_cutoff_or_deleted_during_the_run_never_leave_wrong_objects(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random("writers")
    # Values of 6-10 KB with a 1 MiB in-flight budget: values are read in chunks of 256 KiB
    # (about 32 rows), and a page's next chunk is read only once the previous one has upload
    # slots, so the end of a 150-row page is read over a second after the page was listed.
    await insert_rows(
        layer_db.pool,
        CacheType.CAS,
        [
            SeedRow(
                random_key(rng),
                rng.randbytes(rng.randint(6000, 10000)),
                CUTOFF - timedelta(milliseconds=1 + index // 7),
            )
            for index in range(300)
        ],
    )
    original = await rows_below(layer_db.pool, CacheType.CAS, CUTOFF)
    keys = sorted(original)
    batch = 150
    listed_then_deleted = keys[batch - 10 : batch]  # end of page 1: deleted right after listing
    never_listed = keys[-20:]  # end of page 2: deleted while page 1 is copied
    deleted_any_time = rng.sample(keys[batch:-20], 20)  # page 2: deleted at random moments
    args = backfill_args(
        "-v",  # for the per-page "fetched key batch" event
        key_batch_size=batch,
        max_concurrent_uploads=4,
        max_inflight_bytes=1024 * 1024,
    )
    slow_puts = FaultPlan(latency_s=(0.04, 0.06), methods=frozenset({"PUT"}))
    live_path = PgLayer(layer_db.pool, CACHE_SPECS[CacheType.CAS])
    live: set[str] = set()

    async def delete(victims: list[str]) -> None:
        await layer_db.pool.execute("DELETE FROM cas WHERE key = ANY($1::text[])", victims)

    async with (
        FaultProxy(s3_server.endpoint.url, slow_puts) as proxy,
        Job(args, proxied(env, proxy)) as job,
    ):

        async def write_live_rows() -> None:
            while job.running:
                key = random_key(rng)
                assert await live_path.insert(key, rng.randbytes(rng.randint(1, 512)))
                live.add(key)
                await asyncio.sleep(0.02)

        async def collect_garbage() -> None:
            for key in deleted_any_time:
                await asyncio.sleep(rng.uniform(0.05, 0.25))
                await delete([key])

        page = await job.wait_for_event("fetched key batch", STARTUP_TIMEOUT_S)
        assert page["rows"] == batch, page
        await delete(listed_then_deleted + never_listed)
        writer = asyncio.create_task(write_live_rows())
        collector = asyncio.create_task(collect_garbage())
        run = await job.finish(JOB_TIMEOUT_S)
        await writer
        await collector

    assert run.status == 0, run.describe()
    summary = run.summary("cas")
    assert summary["status"] == "completed", summary
    vanished_keys = {event["key"] for event in run.named("row vanished before it was read")}
    uploaded_keys = {event["key"] for event in run.named("uploaded to S3")}
    assert summary["vanished"] == len(vanished_keys), summary
    assert vanished_keys.isdisjoint(uploaded_keys)
    # Deleted right after their page was listed, about a second before their values are read,
    # these rows vanish (had the job raced ahead of the deletion, it would have copied them
    # first, which is allowed; that some vanished proves the timing held).
    assert set(listed_then_deleted) <= vanished_keys | uploaded_keys
    assert vanished_keys & set(listed_then_deleted), "no listed row vanished"
    assert len(live) >= 10, "the live writer hardly ran"
    live_created = await layer_db.pool.fetch(
        "SELECT created_at FROM cas WHERE key = ANY($1::text[])", list(live)
    )
    assert all(record["created_at"] > CUTOFF for record in live_created)

    stored = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    by_key = {name.rsplit("/", 1)[-1]: body for name, body in stored.items()}
    assert not by_key.keys() & live, "a row created after the cutoff was copied"
    # The job lists and reads ahead of its uploads, so the end of page 2 may have been listed and
    # read before its deletion: such a row may be copied, with its original bytes (checked below).
    assert not by_key.keys() & vanished_keys, "a vanished row has an object"
    survivors = await rows_below(layer_db.pool, CacheType.CAS, CUTOFF)
    copied_before_deletion = {
        key: original[key]
        for key in [*deleted_any_time, *listed_then_deleted, *never_listed]
        if key in uploaded_keys
    }
    expected = {
        object_key_of(CacheType.CAS, key): value
        for key, value in (survivors | copied_before_deletion).items()
    }
    assert sorted(stored.keys() - expected.keys()) == [], "objects without a row"
    assert sorted(expected.keys() - stored.keys()) == [], "surviving rows missing from S3"
    assert stored == expected, "objects differ from their rows"
    assert_json_lines_only(run)


# --------------------------------------------------------------------------------------------
# 5. A least-privilege role


@dataclass(frozen=True)
class Role:
    name: str
    password: str


@asynccontextmanager
async def login_role(
    pg_server: PostgresServer, db: LayerDb, password: str, tables: Sequence[str]
) -> AsyncIterator[Role]:
    """A LOGIN role with CONNECT on the test database and SELECT on ``tables``, nothing more:
    no CREATE on the schema (revoked from PUBLIC explicitly, whatever the server version's
    default). Dropped afterwards, privileges first."""
    role = Role(f"bf_{uuid.uuid4().hex[:10]}", password)
    admin = await superuser_connection(pg_server, db.dbname)
    try:
        await admin.execute(f"CREATE ROLE {role.name} LOGIN PASSWORD '{password}'")
        await admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        await admin.execute(f"GRANT CONNECT ON DATABASE {db.dbname} TO {role.name}")
        for table in tables:
            await admin.execute(f"GRANT SELECT ON {table} TO {role.name}")
        yield role
    finally:
        await admin.execute(f"DROP OWNED BY {role.name}")
        await admin.execute(f"DROP ROLE IF EXISTS {role.name}")
        await admin.close()


def as_role(env: Mapping[str, str], role: Role) -> dict[str, str]:
    return {**env, PG + "USER": role.name, PG + "PASSWORD": role.password}


async def progress_table_exists(db: LayerDb) -> bool:
    return bool(await db.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", PROGRESS_TABLE))


async def test_a_select_only_role_keeps_progress_in_s3_and_resumes_from_it_after_a_kill(
    pg_server: PostgresServer,
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rows = (await seed(layer_db, random.Random("least"), {CacheType.CAS: 300}))[CacheType.CAS]
    bucket = cache_bucket(CacheType.CAS, bucket_prefix)
    s3_progress = ProgressReader("s3", layer_db.pool, s3_client, bucket_prefix, CUTOFF)

    async with login_role(pg_server, layer_db, uuid.uuid4().hex, ["cas"]) as role:
        job_env = as_role(env, role)

        # Forced into Postgres, the role cannot keep progress: refused before copying anything.
        refused = await cli(
            backfill_args(key_batch_size=50, max_concurrent_uploads=2, progress_store="postgres"),
            job_env,
        )
        assert refused.status == 3, refused.describe()
        message = refused.the_error()["event"]
        assert "--backfill-progress-store s3" in message, message
        assert await list_objects(s3_client, bucket) == {}
        assert await progress_objects(s3_client, bucket) == []
        assert not await progress_table_exists(layer_db)

        # auto: falls back to S3; killed once a position has been saved there.
        args = backfill_args(key_batch_size=50, max_concurrent_uploads=2)
        async with Job(args, job_env) as job:
            saved = None
            while job.running and (saved is None or saved.position is None):
                await asyncio.sleep(0.05)
                saved = await s3_progress.load(CacheType.CAS)
            assert job.kill(), "the run ended before it could be killed: too little data"
            killed = await job.finish(JOB_TIMEOUT_S)
        assert killed.named(
            "progress goes to S3: the Postgres role may not write its own progress table"
        )
        [starting] = killed.named("starting backfill for all cache types")
        assert starting["progress_store"] == "s3", starting
        await asyncio.sleep(0.3)
        saved = await s3_progress.load(CacheType.CAS)
        assert saved is not None
        assert saved.position is not None
        assert not saved.completed
        stored = await list_objects(s3_client, bucket)
        assert wrong_objects(CacheType.CAS, stored, rows) == []
        before = present_keys(CacheType.CAS, stored, rows)
        assert {key for key in rows if key <= saved.position.key} <= before

        resumed = await cli(args, job_env, within_s=JOB_TIMEOUT_S)

    assert resumed.status == 0, resumed.describe()
    [resuming] = resumed.named("resuming from saved progress", CacheType.CAS)
    assert resuming["progress_store"] == "s3", resuming
    assert resuming["rows_done_earlier_runs"] == saved.rows_done, resuming
    [start] = resumed.named("starting backfill", CacheType.CAS)
    assert start["resume_after_key"] == saved.position.key, start
    after = [key for key in rows if key > saved.position.key]
    assert resumed.summary("cas")["processed"] == len(after), "the re-run did not resume"
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, rows)
    assert await progress_objects(s3_client, bucket), "no progress record in S3"
    final = await s3_progress.load(CacheType.CAS)
    assert final is not None
    assert final.completed
    assert not await progress_table_exists(layer_db)
    assert_json_lines_only(resumed)


# --------------------------------------------------------------------------------------------
# 6. Broken environments: the right exit status, one clear line, no secret, nothing written

PG_CANARY = "pg-canary-" + uuid.uuid4().hex
S3_CANARY = "s3-canary-" + uuid.uuid4().hex
BROKEN_ENV_CACHES = [CacheType.CAS, CacheType.CHANGE_BATCH]


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[StrictMotoS3]:
    server = StrictMotoS3()
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class Breakage:
    """What is broken, as the env overrides it needs (after any change it makes itself)."""

    db: LayerDb
    s3_client: S3Client
    bucket_prefix: str
    strict_s3: StrictMotoS3


async def wrong_s3_secret_key(broken: Breakage) -> dict[str, str]:
    endpoint = broken.strict_s3.endpoint
    return {S3_ENDPOINT: endpoint.url, S3_ACCESS_KEY: broken.strict_s3.access_key}


async def unknown_s3_access_key(broken: Breakage) -> dict[str, str]:
    return {
        S3_ENDPOINT: broken.strict_s3.endpoint.url,
        S3_ACCESS_KEY: "AKIA" + "UNKNOWN" * 2 + "XX",
    }


async def missing_bucket(broken: Breakage) -> dict[str, str]:
    await broken.s3_client.delete_bucket(
        Bucket=cache_bucket(CacheType.CHANGE_BATCH, broken.bucket_prefix)
    )
    return {}


async def missing_table(broken: Breakage) -> dict[str, str]:
    await broken.db.pool.execute("DROP TABLE change_batches")
    return {}


async def unreachable_s3(_broken: Breakage) -> dict[str, str]:
    return {S3_ENDPOINT: f"http://127.0.0.1:{free_port()}"}


async def unreachable_postgres(_broken: Breakage) -> dict[str, str]:
    return {PG + "PORT": str(free_port())}


async def wrong_postgres_password(broken: Breakage) -> dict[str, str]:
    return {PG + "USER": broken.db.endpoint.user}  # the canary is not its password


async def unknown_setting(_broken: Breakage) -> dict[str, str]:
    return {PG + "HOSTNAM": "127.0.0.1"}


BROKEN_ENVIRONMENTS = [
    pytest.param(
        wrong_s3_secret_key, 3, ("rejected the credentials", "SECRET_KEY"), id="s3-secret"
    ),
    pytest.param(unknown_s3_access_key, 3, ("rejected the credentials", "ACCESS_KEY"), id="s3-key"),
    pytest.param(missing_bucket, 3, ("does not exist", "BUCKET_PREFIX"), id="missing-bucket"),
    pytest.param(missing_table, 3, ("table change_batches does not exist",), id="missing-table"),
    pytest.param(unreachable_s3, 3, ("cannot reach the S3 endpoint", "ENDPOINT"), id="s3-down"),
    pytest.param(unreachable_postgres, 3, ("cannot reach Postgres", "PORT"), id="postgres-down"),
    pytest.param(wrong_postgres_password, 3, ("rejected the login", "PASSWORD"), id="pg-password"),
    pytest.param(unknown_setting, 2, ("unknown setting", PG + "HOSTNAM"), id="unknown-setting"),
]


def assert_no_canary(run: CliRun) -> None:
    for stream, text in (("stdout", run.stdout), ("stderr", run.stderr)):
        for canary in (PG_CANARY, S3_CANARY):
            where = text.find(canary)
            assert where < 0, (
                f"a secret reached {stream}: …{text[max(0, where - 200) : where + 60]}"
            )


async def everything_in_bucket(client: S3Client, bucket: str) -> list[str]:
    """Every object key (progress records included); [] for a missing bucket."""
    try:
        response = await client.list_objects_v2(Bucket=bucket)
    except client.exceptions.NoSuchBucket:
        return []
    return [item["Key"] for item in response.get("Contents", [])]


@pytest.mark.parametrize(("breakage", "status", "says"), BROKEN_ENVIRONMENTS)
async def test_a_broken_environment_exits_with_its_status_and_one_line_without_secrets_or_writes(
    pg_server: PostgresServer,
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    strict_s3: StrictMotoS3,
    breakage: Callable[[Breakage], Awaitable[dict[str, str]]],
    status: int,
    says: tuple[str, ...],
) -> None:
    await seed(layer_db, random.Random("broken"), dict.fromkeys(BROKEN_ENV_CACHES, 10))
    strict_s3.add_buckets([cache_bucket(cache_type, bucket_prefix) for cache_type in CacheType])
    tables = [CACHE_SPECS[cache_type].table for cache_type in BROKEN_ENV_CACHES]
    async with login_role(pg_server, layer_db, PG_CANARY, tables) as role:
        # The canaries are the real password of the job's role and the S3 secret key (which the
        # session's moto accepts), so every run below gets as far as its breakage lets it.
        broken_env = as_role(env, role) | {S3_SECRET_KEY: S3_CANARY}
        broken_env |= await breakage(Breakage(layer_db, s3_client, bucket_prefix, strict_s3))

        run = await cli(backfill_args(cache_types=BROKEN_ENV_CACHES), broken_env)

    assert run.status == status, run.describe()
    message = run.the_error()["event"]
    for fragment in says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_no_canary(run)
    for cache_type in CacheType:
        bucket = cache_bucket(cache_type, bucket_prefix)
        assert await everything_in_bucket(s3_client, bucket) == [], f"{bucket} was written"
    assert strict_s3.objects() == {}, "the strict S3 server was written"
    assert not await progress_table_exists(layer_db)


# --------------------------------------------------------------------------------------------
# 7. SIGTERM: drain, report, resume; a second SIGTERM exits at once


def backfill_checkpoint_of(cache_type: CacheType, **at_least: int) -> Callable[[Event], bool]:
    def matches(event: Event) -> bool:
        return (
            event.get("event") == "backfill checkpoint"
            and event.get("cache_type") == cache_type
            and all(event[name] >= value for name, value in at_least.items())
        )

    return matches


async def assert_nothing_wrong_in_s3(
    client: S3Client, bucket_prefix: str, rows: Mapping[CacheType, Mapping[str, bytes]]
) -> None:
    for cache_type, below in rows.items():
        stored = await list_objects(client, cache_bucket(cache_type, bucket_prefix))
        assert wrong_objects(cache_type, stored, below) == [], f"{cache_type}: wrong objects"


async def test_sigterm_drains_within_the_grace_period_says_how_to_resume_and_twice_exits_at_once(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rows = await seed(
        layer_db, random.Random("sigterm"), {CacheType.CAS: 160, CacheType.CHANGE_BATCH: 6}
    )
    grace_s = 5.0
    args = backfill_args(
        cache_types=list(rows),
        key_batch_size=20,
        max_concurrent_uploads=4,
        checkpoint_interval_secs=0.2,
        grace_period_secs=grace_s,
    )
    slow_s3 = FaultPlan(latency_s=(0.2, 0.3))

    async with FaultProxy(s3_server.endpoint.url, slow_s3, stop_timeout_s=1.0) as proxy:
        job_env = proxied(env, proxy)

        async with Job(args, job_env) as job:
            await job.wait_for_event("completed backfill", JOB_TIMEOUT_S, cache_type="change_batch")
            await job.wait_for(backfill_checkpoint_of(CacheType.CAS, processed=1), JOB_TIMEOUT_S)
            signalled = time.monotonic()
            job.send(signal.SIGTERM)
            drained = await job.finish(JOB_TIMEOUT_S)
            drained_in_s = time.monotonic() - signalled

        assert drained.status == 143, drained.describe()
        assert drained_in_s < grace_s, f"took {drained_in_s:.1f} s to stop (grace {grace_s} s)"
        [graceful] = drained.named("backfill shutting down gracefully", CacheType.CAS)
        assert "--backfill-cutoff-timestamp" in graceful["resume_with"], graceful
        statuses = {cache_type: drained.summary(cache_type)["status"] for cache_type in rows}
        assert statuses == {CacheType.CAS: "interrupted", CacheType.CHANGE_BATCH: "completed"}
        last = drained.events[-1]
        assert last["event"] == "backfill incomplete", drained.events[-3:]
        assert last["completed_caches"] == ["change_batch"], last
        assert last["incomplete_caches"] == ["cas"], last
        assert "same arguments" in last["resume"], last
        assert last["manual_resume_with"].endswith("--backfill-cache-types cas"), last
        await assert_nothing_wrong_in_s3(s3_client, bucket_prefix, rows)

        # Uploads that take seconds are in flight when two SIGTERMs arrive 0.2 s apart: the
        # second one ends the process without waiting for them.
        proxy.plan = FaultPlan(latency_s=(2.0, 3.0), methods=frozenset({"PUT"}))
        async with Job(args, job_env) as job:
            await job.wait_for(
                backfill_checkpoint_of(CacheType.CAS, active_uploads=1), JOB_TIMEOUT_S
            )
            job.send(signal.SIGTERM)
            await asyncio.sleep(0.2)
            second_signal = time.monotonic()
            job.send(signal.SIGTERM)
            hurried = await job.finish(JOB_TIMEOUT_S)
            exited_in_s = time.monotonic() - second_signal

        assert hurried.status == 143, hurried.describe()
        assert exited_in_s < 1.0, f"the second SIGTERM took {exited_in_s:.2f} s to end it"
        assert hurried.events[-1]["event"] == "second signal, exiting now", hurried.events[-3:]
        assert hurried.named("backfill summary") == [], "it waited for the drain"
        await assert_nothing_wrong_in_s3(s3_client, bucket_prefix, rows)

        proxy.plan = FaultPlan()
        rerun = await cli(args, job_env, within_s=JOB_TIMEOUT_S)

    assert rerun.status == 0, rerun.describe()
    [already] = rerun.named("completed backfill", CacheType.CHANGE_BATCH)
    assert already.get("already_complete") is True, already
    assert rerun.named("resuming from saved progress", CacheType.CAS), "cas started over"
    for cache_type, below in rows.items():
        await assert_s3_holds_exactly(s3_client, bucket_prefix, cache_type, below)
    assert_json_lines_only(drained)
    assert_json_lines_only(rerun)
