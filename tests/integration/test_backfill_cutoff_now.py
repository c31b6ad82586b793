"""``--backfill-cutoff-timestamp now`` through the real CLI, against the suite's servers.

``now`` is the database's clock when the run starts; the run logs it, copies the rows below it,
and saves its progress under it, so passing the logged instant back resumes that record while
another ``now`` starts a new one.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from layer_cache.cache_types import CacheType
from tests.cli_harness import backfill_args, cli
from tests.conftest import LayerDb
from tests.integration.test_cli import (
    assert_bucket_holds_exactly_rows_below,
    parse_logged_timestamp,
)
from tests.support import SeedRow, insert_rows, random_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

RESOLVED = "backfill cutoff 'now' resolved by the database clock"


async def database_now(db: LayerDb) -> datetime:
    value = await db.pool.fetchval("SELECT clock_timestamp()")
    assert isinstance(value, datetime)
    return value


async def test_now_is_the_database_clock_logged_copied_below_and_resumable(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(303)
    started = await database_now(layer_db)
    past = [SeedRow(random_key(rng), rng.randbytes(64), started - timedelta(minutes=5))]
    past += [
        SeedRow(random_key(rng), rng.randbytes(64), started - timedelta(seconds=i))
        for i in range(9)
    ]
    future = SeedRow(random_key(rng), b"written after the cut-over", started + timedelta(hours=1))
    await insert_rows(layer_db.pool, CacheType.CAS, [*past, future])

    first = await cli(backfill_args(cutoff="now"), env)

    assert first.status == 0, first.stderr
    [resolved] = first.named(RESOLVED)
    cutoff = parse_logged_timestamp(resolved["cutoff_timestamp"])
    assert started < cutoff < await database_now(layer_db)
    assert (
        resolved["resume_with"] == f"--backfill-cutoff-timestamp '{resolved['cutoff_timestamp']}'"
    )
    assert {event["cutoff_timestamp"] for event in first.named("starting backfill")} == {
        resolved["cutoff_timestamp"]
    }
    stored = await assert_bucket_holds_exactly_rows_below(
        layer_db, s3_client, bucket_prefix, CacheType.CAS, cutoff
    )
    assert len(stored) == len(past)
    assert first.summary()["uploaded"] == len(past)

    # The logged instant resumes the same saved record: complete, nothing walked again.
    resumed = await cli(backfill_args(cutoff=resolved["cutoff_timestamp"]), env)

    assert resumed.status == 0, resumed.stderr
    assert resumed.named(RESOLVED) == []
    assert (resumed.summary()["uploaded"], resumed.summary()["processed"]) == (0, 0)

    # Another "now" (here sdf's env name) is a new cutoff: a new record, a walk over every row
    # present (skipped by size), and the row written since is copied.
    late = SeedRow(random_key(rng), b"written since", await database_now(layer_db))
    await insert_rows(layer_db.pool, CacheType.CAS, [late])
    no_cutoff_flag = ["--migration-mode", "backfillLayerCache", "--log-json"]
    again = await cli(
        [*no_cutoff_flag, "--backfill-cache-types", "cas"],
        env | {"SI_SDF__BACKFILL_CUTOFF_TIMESTAMP": "now"},
    )

    assert again.status == 0, again.stderr
    [later] = again.named(RESOLVED)
    later_cutoff = parse_logged_timestamp(later["cutoff_timestamp"])
    assert later_cutoff > late.created_at
    total = again.summary()
    assert (total["uploaded"], total["skipped"]) == (1, len(past))
    await assert_bucket_holds_exactly_rows_below(
        layer_db, s3_client, bucket_prefix, CacheType.CAS, later_cutoff
    )
