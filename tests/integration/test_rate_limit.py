"""The upload rate limits against the real servers: held across the caches that share them.

The CLI tests run ``python -m services`` with two caches and one limit, and read the run's own
JSON log timestamps: every upload falls between ``starting backfill for all cache types`` and the
last ``completed backfill``, so by the token bucket's bound (granted <= rate x window + burst,
the burst being one second's worth) that window lasts at least (uploads - burst) / rate. Without
a limit the same runs take well under that on this machine. What the run left in S3 is compared
byte for byte with the rows. The in-process test checks what the tuned concurrency limit is fed:
S3's time for each PUT, not the time it waited for the limit.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from layer_cache.cache_types import CacheType
from layer_cache.concurrency import ConcurrencyMode, TunedLimit
from migrations_mode.config import BackfillConfig
from migrations_mode.coordinator import run_backfill
from migrations_mode.walk import Shard
from services.context import open_services_context
from services.settings import Settings
from services.signals import StopRequest
from tests.cli_harness import CliRun, backfill_args, cli
from tests.conftest import LayerDb
from tests.support import (
    CUTOFF,
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
MIB = 1024 * 1024


def rows_below_cutoff(rng: random.Random, sizes: list[int]) -> list[SeedRow]:
    return [
        SeedRow(random_key(rng), rng.randbytes(size), CUTOFF - timedelta(seconds=index + 1))
        for index, size in enumerate(sizes)
    ]


def upload_window_s(run: CliRun) -> float:
    """Seconds from the start of the caches to the last one's completion, by the log's own
    timestamps."""
    [started] = run.named("starting backfill for all cache types")
    completed = run.named("completed backfill")
    assert sorted(event["cache_type"] for event in completed) == sorted(CACHES)
    last = max(datetime.fromisoformat(event["timestamp"]) for event in completed)
    return (last - datetime.fromisoformat(started["timestamp"])).total_seconds()


async def assert_every_row_copied(
    db: LayerDb, s3_client: S3Client, bucket_prefix: str, run: CliRun
) -> tuple[int, int]:
    """Every cache's bucket holds exactly its rows, byte for byte; (uploads, bytes) in all."""
    assert run.status == 0, run.describe()
    uploads = size = 0
    for cache_type in CACHES:
        expected = expected_objects(await rows_below(db.pool, cache_type, CUTOFF))
        stored = await cache_objects(s3_client, bucket_prefix, cache_type)
        assert stored == expected, f"{cache_type}: objects differ from the rows"
        uploads += len(expected)
        size += sum(len(value) for value in expected.values())
    assert (run.summary()["uploaded"], run.summary()["bytes_uploaded"]) == (uploads, size)
    return uploads, size


async def test_uploads_per_second_hold_across_two_caches_sharing_the_limit(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(211)
    for cache_type in CACHES:
        await insert_rows(layer_db.pool, cache_type, rows_below_cutoff(rng, [512] * 150))

    run = await cli(
        backfill_args("--backfill-max-uploads-per-second", "100", cache_types=CACHES), env
    )

    uploads, _ = await assert_every_row_copied(layer_db, s3_client, bucket_prefix, run)
    assert uploads == 300
    [started] = run.named("starting backfill for all cache types")
    assert (started["max_uploads_per_second"], started["max_bytes_per_second"]) == (100.0, None)
    # 300 uploads at 100 a second, 100 of them at once (the burst): 2 s at least, for both
    # caches together (each alone would be allowed all of it).
    window = upload_window_s(run)
    assert window >= (uploads - 100) / 100, window
    assert window < 10, window


async def test_bytes_per_second_hold_across_two_caches_and_an_object_above_the_burst_passes(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(223)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_below_cutoff(rng, [256 * 1024] * 5))
    await insert_rows(
        layer_db.pool,
        CacheType.WORKSPACE_SNAPSHOT,
        rows_below_cutoff(rng, [256 * 1024] * 5 + [3 * MIB // 2]),  # 1.5x the burst
    )
    job_env = env | {"SI_BACKFILL_MAX_BYTES_PER_SECOND": "1MiB"}

    run = await cli(backfill_args(cache_types=CACHES), job_env)

    _, size = await assert_every_row_copied(layer_db, s3_client, bucket_prefix, run)
    assert size == 4 * MIB
    [started] = run.named("starting backfill for all cache types")
    assert (started["max_uploads_per_second"], started["max_bytes_per_second"]) == (None, MIB)
    # 4 MiB at 1 MiB a second, of which at most the largest object (1.5 MiB, above the 1 MiB
    # burst) goes at once: 2.5 s at least.
    window = upload_window_s(run)
    assert window >= (size - 3 * MIB // 2) / MIB, window
    assert window < 10, window


async def test_the_tuned_limit_is_fed_s3s_time_without_the_wait_for_the_rate_limit(
    layer_db: LayerDb,
    settings: Settings,
    s3_client: S3Client,
    bucket_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(227)
    for cache_type in CACHES:
        await insert_rows(layer_db.pool, cache_type, rows_below_cutoff(rng, [1024] * 40))
    fed: list[float] = []
    record_latency = TunedLimit.record_latency

    def recording(self: TunedLimit, seconds: float, ended_at: float | None = None) -> None:
        fed.append(seconds)
        record_latency(self, seconds, ended_at)

    monkeypatch.setattr(TunedLimit, "record_latency", recording)
    config = BackfillConfig(
        cutoff=CUTOFF,
        cache_types=CACHES,
        key_batch_size=1000,
        checkpoint_interval=timedelta(seconds=30),
        max_concurrent_uploads=16,
        grace_period=timedelta(seconds=5),
        concurrency=ConcurrencyMode.TUNED,
        shard=Shard(),
    )

    async with open_services_context(settings, with_s3=True) as context:
        report = await run_backfill(
            context, replace(config, max_uploads_per_second=20), StopRequest()
        )

    assert report.complete
    for cache_type in CACHES:
        stored = await cache_objects(s3_client, bucket_prefix, cache_type)
        assert stored == expected_objects(await rows_below(layer_db.pool, cache_type, CUTOFF))
    assert len(fed) == 80
    # 10 uploads in flight (5 a cache, the tuned start) at 20 a second: past the burst each
    # waits about half a second for its turn, which a PUT of 1 KiB to the local S3 never takes.
    assert statistics.median(fed) < 0.2, sorted(fed)
