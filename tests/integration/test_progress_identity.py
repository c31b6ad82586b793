"""Saved progress is only ever used by a run with the same identity.

A record is saved for one walk of one target: the cache, the cutoff, the walk order, the shard
(index and count) and where the objects go (endpoint, bucket, key prefix). Each test stops a
key-order run part-way, so a position has been saved, then changes one of those parameters and
runs again with the same cutoff: the second run must not resume from the first run's position
(it says so in one log line) and must leave every row below the cutoff in its target, byte for
byte. Both progress stores are exercised where the record could be seen by the second run.
"""

from __future__ import annotations

import random
import signal
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import pytest

from devenv.s3 import S3Server, create_buckets
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name
from migrations_mode.checkpoint import Position
from migrations_mode.progress_store import (
    PROGRESS_TABLE,
    PgProgressStore,
    ProgressKey,
    RecordIdentity,
    SavedProgress,
)
from migrations_mode.walk import WalkOrder
from tests.cli_harness import backfill_args, cli, interrupt_backfill
from tests.conftest import LayerDb, service_env
from tests.support import (
    CUTOFF,
    STORAGE,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    cache_bucket,
    expected_objects,
    insert_rows,
    object_sizes,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

ROWS_TOTAL = 1600
ROWS_BELOW = 800
FIRST_RUN_FLAGS = (
    *("--backfill-max-concurrent-uploads", "2"),
    *("--backfill-checkpoint-interval-secs", "0.2"),
    *("--backfill-key-batch-size", "50"),
)
NOT_USED_EVENT = "saved progress not used: it was saved for other parameters"


async def seed(db: LayerDb) -> dict[str, bytes]:
    """Rows around the cutoff, some sharing a created_at; returns the expected objects."""
    rng = random.Random(20261201)
    rows = [
        SeedRow(
            random_key(rng, rng.choice((32, 64))),
            rng.randbytes(rng.randint(1, 512)),
            CUTOFF + timedelta(milliseconds=index // 8 - ROWS_BELOW // 8),
        )
        for index in range(ROWS_TOTAL)
    ]
    await insert_rows(db.pool, CacheType.CAS, rows)
    below = await rows_below(db.pool, CacheType.CAS, CUTOFF)
    assert len(below) == ROWS_BELOW
    return expected_objects(below)


async def stop_part_way(env: dict[str, str], *extra: str) -> None:
    """A key-order run stopped by SIGTERM once two pages are done (so a position is saved)."""
    run = await interrupt_backfill(
        backfill_args(*FIRST_RUN_FLAGS, *extra), env, signal.SIGTERM, after_rows=100
    )
    assert run.status == 143, run.stderr
    assert run.named("completed backfill") == []


def new_bucket_prefix(s3: S3Server) -> str:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    create_buckets(s3.endpoint, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()])
    return prefix


@pytest.mark.parametrize("store", ["postgres", "s3"])
async def test_a_key_order_record_is_not_used_by_a_newest_first_run(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    store: str,
) -> None:
    expected = await seed(layer_db)
    store_flags = ("--backfill-progress-store", store)
    await stop_part_way(env, *store_flags)
    stored = await object_sizes(s3_client, cache_bucket(CacheType.CAS, bucket_prefix))
    assert len([key for key in stored if key in expected]) < len(expected), "nothing to resume"

    newest_first = backfill_args(*store_flags, "--backfill-order", "newest-first")
    second = await cli(newest_first, env)

    assert second.status == 0, second.stderr
    [not_used] = second.named(NOT_USED_EVENT)
    assert not_used["cache_type"] == "cas"
    assert "walk order" in not_used["differs"]
    assert second.named("resuming from saved progress") == []
    assert second.summary()["processed"] == len(expected)
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )

    # The newest-first record is complete; a third run under the same parameters knows it, and
    # a key-order run still has its own (unfinished) record to resume from.
    third = await cli(newest_first, env)
    assert third.status == 0, third.stderr
    assert [event.get("already_complete") for event in third.named("completed backfill")] == [True]
    key_order = await cli(backfill_args(*store_flags), env)
    assert key_order.status == 0, key_order.stderr
    assert key_order.named("resuming from saved progress"), key_order.stderr
    assert key_order.summary()["uploaded"] == 0


async def test_a_record_for_other_buckets_is_not_used_when_progress_lives_in_postgres(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(layer_db)
    await stop_part_way(env, "--backfill-progress-store", "postgres")

    other_prefix = new_bucket_prefix(s3_server)
    other_env = service_env(layer_db, s3_server.endpoint, other_prefix)
    second = await cli(backfill_args("--backfill-progress-store", "postgres"), other_env)

    assert second.status == 0, second.stderr
    [not_used] = second.named(NOT_USED_EVENT)
    assert "target" in not_used["differs"]
    assert bucket_prefix in not_used["saved_target"]
    assert other_prefix in not_used["target"]
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, other_prefix, CacheType.CAS
    )


async def test_a_record_for_another_key_prefix_is_not_used_when_progress_lives_in_postgres(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(layer_db)
    await stop_part_way(env, "--backfill-progress-store", "postgres")

    prefixed_env = env | {STORAGE + "KEY_PREFIX": "moved"}
    second = await cli(backfill_args("--backfill-progress-store", "postgres"), prefixed_env)

    assert second.status == 0, second.stderr
    [not_used] = second.named(NOT_USED_EVENT)
    assert not_used["differs"] == ["target"]
    expected = expected_objects(await rows_below(layer_db.pool, CacheType.CAS, CUTOFF), "moved")
    bucket = cache_bucket(CacheType.CAS, bucket_prefix)
    stored = await object_sizes(s3_client, bucket)
    under_prefix = {key: size for key, size in stored.items() if key in expected}
    assert under_prefix == {key: len(value) for key, value in expected.items()}
    for key in list(expected)[:50]:
        response = await s3_client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as body:
            assert await body.read() == expected[key]


async def test_a_record_for_another_shard_count_is_not_used(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(layer_db)
    shard_flags = ("--backfill-shard-index", "0", "--backfill-shard-count", "1")
    await stop_part_way(env, "--backfill-progress-store", "postgres", *shard_flags)

    # Two shards together cover the key space; shard 0 of 2 must not take the 0-of-1 record.
    runs = [
        await cli(
            backfill_args(
                "--backfill-progress-store",
                "postgres",
                *("--backfill-shard-index", str(index), "--backfill-shard-count", "2"),
            ),
            env,
        )
        for index in (0, 1)
    ]

    for run in runs:
        assert run.status == 0, run.stderr
        assert run.named("resuming from saved progress") == []
    [not_used] = runs[0].named(NOT_USED_EVENT)
    assert "shard" in not_used["differs"]
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )


async def test_a_progress_table_of_the_earlier_layout_is_upgraded_and_its_records_not_used(
    layer_db: LayerDb,
) -> None:
    # The table as the earlier version created it: records keyed by cache, cutoff and shard.
    await layer_db.pool.execute(
        f"CREATE TABLE {PROGRESS_TABLE} ("
        " cache_type text NOT NULL, cutoff timestamptz NOT NULL, shard text NOT NULL,"
        " position_created_at timestamptz, position_key text,"
        " completed boolean NOT NULL DEFAULT false, rows_done bigint NOT NULL DEFAULT 0,"
        " updated_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (cache_type, cutoff, shard))"
    )
    await layer_db.pool.execute(
        f"INSERT INTO {PROGRESS_TABLE} (cache_type, cutoff, shard, position_created_at,"
        " position_key, completed, rows_done) VALUES ('cas', $1, '0-of-1', $1, 'ff', true, 9)",
        CUTOFF,
    )
    store = PgProgressStore(layer_db.pool)
    await store.prepare()
    await store.prepare()  # idempotent once upgraded
    key = ProgressKey(CacheType.CAS, CUTOFF, WalkOrder.KEY, "http://s3/bucket/")

    assert await store.load(key) is None
    assert await store.others(key) == [RecordIdentity("", "", "0-of-1")]
    saved = SavedProgress(Position(CUTOFF, "ab"), completed=False, rows_done=3)
    await store.save(key, saved)
    assert await store.load(key) == saved
    newest_first = ProgressKey(CacheType.CAS, CUTOFF, WalkOrder.NEWEST_FIRST, key.target)
    assert await store.load(newest_first) is None
    assert sorted(await store.others(newest_first), key=lambda r: r.order) == [
        RecordIdentity("", "", "0-of-1"),
        RecordIdentity("key", key.target, "0-of-1"),
    ]
