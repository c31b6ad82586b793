"""The backfill against a real Postgres and a real S3 server, run in-process."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CacheType
from layer_cache.concurrency import INITIAL_TUNED_LIMIT, ConcurrencyMode
from layer_cache.errors import ErrorKind, PreflightError
from migrations_mode.config import BackfillConfig, VerifyMode, parse_cutoff
from migrations_mode.coordinator import BackfillReport, run_backfill
from migrations_mode.dry_run import format_estimate_table, run_dry_run
from migrations_mode.walk import Shard, WalkOrder
from services.context import open_services_context
from services.settings import Settings
from services.signals import StopRequest
from tests.conftest import LayerDb
from tests.support import (
    CUTOFF,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    bucket_objects,
    cache_bucket,
    cache_objects,
    expected_objects,
    insert_rows,
    random_key,
    rows_around_cutoff,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


def backfill_config(
    cache_types: tuple[CacheType, ...] = BACKFILLABLE_CACHE_TYPES,
    *,
    key_batch_size: int = 1000,
    max_concurrent_uploads: int = 5,
    order: WalkOrder = WalkOrder.KEY,
    verify: VerifyMode = VerifyMode.OFF,
) -> BackfillConfig:
    return BackfillConfig(
        cutoff=CUTOFF,
        cache_types=cache_types,
        key_batch_size=key_batch_size,
        checkpoint_interval=timedelta(seconds=30),
        max_concurrent_uploads=max_concurrent_uploads,
        grace_period=timedelta(seconds=5),
        order=order,
        shard=Shard(),
        verify=verify,
    )


async def backfill(settings: Settings, config: BackfillConfig) -> BackfillReport:
    async with open_services_context(settings, with_s3=True) as context:
        return await run_backfill(context, config, StopRequest())


async def test_all_eight_caches_are_copied_byte_for_byte_and_nothing_else(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(3)
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await insert_rows(layer_db.pool, cache_type, rows_around_cutoff(rng, 60))
    edge_rows = [
        SeedRow("a", b"one-char key", CUTOFF - timedelta(seconds=5)),
        SeedRow("ab", b"two", CUTOFF - timedelta(seconds=5)),
        SeedRow("abc", b"three", CUTOFF - timedelta(seconds=5)),
        SeedRow("abcd", b"four", CUTOFF - timedelta(seconds=5)),
        SeedRow("abcde", b"five", CUTOFF - timedelta(seconds=5)),
        SeedRow(random_key(rng), b"", CUTOFF - timedelta(seconds=4)),  # empty value
        SeedRow(
            random_key(rng), rng.randbytes(5 * 1024 * 1024 + 17), CUTOFF - timedelta(seconds=3)
        ),
        SeedRow(random_key(rng), b"exactly at the cutoff", CUTOFF),
        SeedRow(random_key(rng), b"one tick before", CUTOFF - timedelta(microseconds=1)),
    ]
    await insert_rows(layer_db.pool, CacheType.CAS, edge_rows)

    report = await backfill(settings, backfill_config())

    assert report.complete
    assert report.failure is None
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, s3_client, bucket_prefix, cache_type
        )
    cas = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    assert cas["a"] == b"one-char key"
    assert cas["ab/cd/abcde"] == b"five"
    assert b"exactly at the cutoff" not in cas.values()
    assert b"one tick before" in cas.values()
    for excluded in (CacheType.FUNC_RUN, CacheType.FUNC_RUN_LOG):
        assert await cache_objects(s3_client, bucket_prefix, excluded) == {}
    expected_total = 0
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        expected_total += len(await rows_below(layer_db.pool, cache_type, CUTOFF))
    assert sum(outcome.stats.uploaded for outcome in report.outcomes) == expected_total


async def test_tuned_concurrency_copies_every_row_within_its_ceiling(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(17), 600))
    config = replace(
        backfill_config((CacheType.CAS,), key_batch_size=100, max_concurrent_uploads=32),
        concurrency=ConcurrencyMode.TUNED,
        checkpoint_interval=timedelta(milliseconds=20),
    )

    with capture_logs() as events:
        report = await backfill(settings, config)

    assert report.complete
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )
    started = next(event for event in events if event["event"] == "starting backfill")
    assert (started["concurrency"], started["max_concurrent"]) == ("tuned", 32)
    limits = [
        event["upload_concurrency_limit"]
        for event in events
        if event["event"] == "backfill checkpoint"
    ]
    assert limits, "no checkpoint was logged"
    assert all(1 <= limit <= 32 for limit in limits)
    assert limits[0] <= 2 * INITIAL_TUNED_LIMIT  # it starts low, not at the ceiling


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_rows_sharing_created_at_across_batch_boundaries_are_all_copied(
    layer_db: LayerDb,
    settings: Settings,
    s3_client: S3Client,
    bucket_prefix: str,
    order: WalkOrder,
) -> None:
    rng = random.Random(7)
    # 23 rows per timestamp with batches of 7: every page boundary falls inside a tie.
    await insert_rows(
        layer_db.pool, CacheType.WORKSPACE_SNAPSHOT, rows_around_cutoff(rng, 230, tie_every=23)
    )

    report = await backfill(
        settings,
        backfill_config(
            (CacheType.WORKSPACE_SNAPSHOT,),
            key_batch_size=7,
            max_concurrent_uploads=3,
            order=order,
        ),
    )

    assert report.complete
    stored = await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.WORKSPACE_SNAPSHOT
    )
    assert len(stored) == 115


async def test_rerun_over_a_copied_bucket_uploads_nothing(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(11)
    await insert_rows(layer_db.pool, CacheType.CHANGE_BATCH, rows_around_cutoff(rng, 80))
    config = backfill_config((CacheType.CHANGE_BATCH,), key_batch_size=9)
    first = await backfill(settings, config)

    again = await backfill(settings, config)  # saved progress says complete: nothing to walk
    restarted = await backfill(settings, replace(config, restart=True))  # walks, skips all

    assert first.outcomes[0].stats.uploaded == 40
    assert again.complete
    assert again.outcomes[0].stats.processed == 0
    stats = restarted.outcomes[0].stats
    assert restarted.complete
    assert (stats.uploaded, stats.skipped, stats.processed) == (0, 40, 40)
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CHANGE_BATCH
    )


async def test_object_of_the_wrong_size_is_reuploaded_and_counted_as_repaired(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(13)
    rows = rows_around_cutoff(rng, 20)
    await insert_rows(layer_db.pool, CacheType.REBASE_BATCH, rows)
    victim = next(row for row in rows if row.created_at < CUTOFF and len(row.value) > 1)
    bucket = cache_bucket(CacheType.REBASE_BATCH, bucket_prefix)
    truncated_key = next(iter(expected_objects({victim.key: b""})))
    await s3_client.put_object(Bucket=bucket, Key=truncated_key, Body=victim.value[:-1])

    report = await backfill(settings, backfill_config((CacheType.REBASE_BATCH,)))

    assert report.outcomes[0].stats.repaired == 1
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.REBASE_BATCH
    )


async def test_a_failing_cache_cancels_the_others_promptly(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(17)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(rng, 4000))
    doomed = SeedRow(random_key(rng), b"its bucket is deleted mid-run", CUTOFF - timedelta(hours=1))
    await insert_rows(layer_db.pool, CacheType.CHANGE_BATCH, [doomed])
    config = backfill_config((CacheType.CAS, CacheType.CHANGE_BATCH), max_concurrent_uploads=1)
    # Hold change_batches' listing behind a table lock until its bucket has been deleted.
    blocker = await layer_db.pool.acquire()
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE change_batches IN ACCESS EXCLUSIVE MODE")
    try:
        run = asyncio.create_task(backfill(settings, config))
        await asyncio.sleep(1.0)  # cas is copying by now
        await s3_client.delete_bucket(Bucket=cache_bucket(CacheType.CHANGE_BATCH, bucket_prefix))
    finally:
        await transaction.rollback()
        await layer_db.pool.release(blocker)
    report = await asyncio.wait_for(run, timeout=60)

    assert report.failure is not None
    assert report.failure.cache_type is CacheType.CHANGE_BATCH
    assert report.failure.key in (None, doomed.key)  # the bucket listing or the PUT fails
    assert report.failure.cause.kind is ErrorKind.MISSING_BUCKET
    statuses = {outcome.stats.cache_type: outcome.status for outcome in report.outcomes}
    assert statuses == {CacheType.CAS: "cancelled", CacheType.CHANGE_BATCH: "failed"}
    cas = next(o for o in report.outcomes if o.stats.cache_type is CacheType.CAS)
    assert cas.stats.processed < 2000, "the other cache ran on after the failure"


async def test_missing_bucket_is_a_preflight_error_that_writes_nothing(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(19), 10))
    await s3_client.delete_bucket(Bucket=cache_bucket(CacheType.ENCRYPTED_SECRET, bucket_prefix))

    with pytest.raises(PreflightError, match="does not exist"):
        await backfill(settings, backfill_config((CacheType.CAS, CacheType.ENCRYPTED_SECRET)))

    assert await cache_objects(s3_client, bucket_prefix, CacheType.CAS) == {}


async def test_verify_reports_missing_mismatched_and_extra_objects_and_writes_nothing(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(29)
    rows = [row for row in rows_around_cutoff(rng, 60) if row.created_at < CUTOFF]
    await insert_rows(layer_db.pool, CacheType.CAS, rows)
    await backfill(settings, backfill_config((CacheType.CAS,)))
    bucket = cache_bucket(CacheType.CAS, bucket_prefix)
    objects = expected_objects({row.key: row.value for row in rows})
    missing, shortened, corrupted = list(objects)[:3]
    await s3_client.delete_object(Bucket=bucket, Key=missing)
    await s3_client.put_object(Bucket=bucket, Key=shortened, Body=objects[shortened][:-1])
    flipped = bytes([objects[corrupted][0] ^ 1]) + objects[corrupted][1:]
    await s3_client.put_object(Bucket=bucket, Key=corrupted, Body=flipped)
    orphan = expected_objects({"ab" * 32: b"no row"})
    await s3_client.put_object(Bucket=bucket, Key=next(iter(orphan)), Body=b"no row")
    before = await bucket_objects(s3_client, bucket)

    by_size = await backfill(settings, backfill_config((CacheType.CAS,), verify=VerifyMode.SIZE))
    by_content = await backfill(
        settings, backfill_config((CacheType.CAS,), verify=VerifyMode.CONTENT)
    )

    size_stats, content_stats = by_size.outcomes[0].stats, by_content.outcomes[0].stats
    assert (size_stats.missing, size_stats.mismatched, size_stats.extra) == (1, 1, 1)
    assert (content_stats.missing, content_stats.mismatched, content_stats.extra) == (1, 2, 1)
    assert content_stats.verified == len(rows) - 3
    assert await bucket_objects(s3_client, bucket) == before


async def test_dry_run_counts_match_the_real_run_and_it_writes_nothing(
    layer_db: LayerDb, settings: Settings, s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(31)
    for cache_type in (CacheType.CAS, CacheType.REBASE_BATCH):
        await insert_rows(layer_db.pool, cache_type, rows_around_cutoff(rng, 150))
    config = backfill_config((CacheType.CAS, CacheType.REBASE_BATCH), key_batch_size=40)

    async with open_services_context(settings, with_s3=True) as context:
        estimates = await run_dry_run(context, config)
    for cache_type in config.cache_types:
        assert await cache_objects(s3_client, bucket_prefix, cache_type) == {}
    progress_rows = await layer_db.pool.fetchval(
        "SELECT count(*) FROM pg_tables WHERE tablename = 'layer_cache_backfill_progress'"
    )
    assert progress_rows == 0
    report = await backfill(settings, config)

    table = format_estimate_table(estimates)
    for estimate, outcome in zip(estimates, report.outcomes, strict=True):
        assert estimate.cache_type == outcome.stats.cache_type.value
        assert estimate.rows == outcome.stats.processed
        assert estimate.bytes == outcome.stats.bytes_uploaded
        assert estimate.sampled_in_s3 == 0
        assert f"{estimate.rows:,}" in table


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_manual_resume_from_the_logged_checkpoint_loses_nothing(
    layer_db: LayerDb,
    settings: Settings,
    s3_client: S3Client,
    bucket_prefix: str,
    order: WalkOrder,
) -> None:
    rng = random.Random(37)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(rng, 900, tie_every=9))
    config = backfill_config(
        (CacheType.CAS,), key_batch_size=20, max_concurrent_uploads=2, order=order
    )
    stop = StopRequest()
    with capture_logs() as events:
        async with open_services_context(settings, with_s3=True) as context:
            run = asyncio.create_task(run_backfill(context, config, stop))
            await asyncio.sleep(1.0)
            stop.event.set()
            interrupted = await run
    [shutdown] = [e for e in events if e["event"] == "backfill shutting down gracefully"]
    assert not interrupted.complete
    assert shutdown["resume_with"].startswith("--backfill-cutoff-timestamp")

    # The operator pastes the logged checkpoint back; --backfill-restart so that only the
    # checkpoint, not the saved progress, decides where the walk starts.
    resumed = replace(config, cutoff=parse_cutoff(shutdown["checkpoint_timestamp"]), restart=True)
    report = await backfill(settings, resumed)

    assert report.complete
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )
