"""What ``cache_parts`` builds for each verify mode and configuration, seen from the walks it
drives over an in-memory table, bucket and progress store: the listing each mode asks for, what
it writes and saves, the identity its progress is saved under, and the upload limit of each
concurrency mode (each part on its own: test_row_action.py, test_page_source.py,
test_progress_saver.py, test_storage_caller.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from layer_cache.cache_types import CacheType
from layer_cache.concurrency import INITIAL_TUNED_LIMIT, ConcurrencyMode, TunedLimit
from layer_cache.retry import AdaptiveLimit
from migrations_mode.config import VerifyMode
from migrations_mode.progress_store import ProgressKey, SavedProgress, WalkPurpose
from migrations_mode.walk import Shard, WalkOrder
from tests.unit.backfill_fakes import (
    CUTOFF,
    MemoryBucket,
    MemoryStore,
    pipeline,
    position,
    row_key,
    table_of,
    value_of,
)

ROWS = 8
SHORT = row_key(3)  # its object is one byte short
ORPHAN = row_key(5)[:-1] + "f"  # an object no row accounts for, inside the walked range

# mode → (rows listed with their MD5, objects PUT, progress saved, objects without a row counted)
MODES = {
    VerifyMode.OFF: (False, [SHORT], True, False),
    VerifyMode.SIZE: (False, [], False, True),
    VerifyMode.CONTENT: (True, [], False, True),
    VerifyMode.REPAIR: (True, [SHORT], True, False),
}


def test_every_verify_mode_is_built() -> None:
    assert set(MODES) == set(VerifyMode)


@pytest.mark.parametrize("mode", list(VerifyMode))
async def test_each_verify_mode_lists_writes_and_saves_what_it_needs(mode: VerifyMode) -> None:
    walk = pipeline(table_of(ROWS), verify=mode)
    for index in range(ROWS):
        key = row_key(index)
        walk.bucket.store(key, value_of(key)[:-1] if key == SHORT else value_of(key))
    walk.bucket.store_object(walk.bucket.object_key(ORPHAN), b"no row")

    await walk.run()

    with_md5, put, saves, counts_extra = MODES[mode]
    assert walk.table.listings
    assert all(listing.with_md5 is with_md5 for listing in walk.table.listings)
    assert walk.bucket.puts == Counter(put)
    assert bool(walk.store.history) is saves
    assert walk.cache.stats.extra == (1 if counts_extra else 0)
    assert walk.cache.completed


@pytest.mark.parametrize("mode", [VerifyMode.OFF, VerifyMode.REPAIR])
async def test_progress_is_saved_under_the_walks_identity(mode: VerifyMode) -> None:
    bucket = MemoryBucket(key_prefix="moved", endpoint="http://s3.test/")
    walk = pipeline(
        table_of(ROWS), bucket, verify=mode, order=WalkOrder.NEWEST_FIRST, shard=Shard(0, 4)
    )

    await walk.run()

    purpose = WalkPurpose.REPAIR if mode is VerifyMode.REPAIR else WalkPurpose.COPY
    key = ProgressKey(
        CacheType.CAS,
        CUTOFF,
        WalkOrder.NEWEST_FIRST,
        target="http://s3.test/bucket-cas/moved",
        shard="0-of-4",
        purpose=purpose,
    )
    assert list(walk.store.records) == [key]


async def test_a_repair_never_resumes_from_a_copys_saved_progress() -> None:
    store = MemoryStore()
    copy = pipeline(table_of(ROWS), store=store)
    store.records[copy.parts.saver.key] = SavedProgress(position(ROWS - 1), True, ROWS)
    repair = pipeline(table_of(ROWS), store=store, verify=VerifyMode.REPAIR)

    await repair.run()

    assert not repair.cache.already_complete
    assert repair.cache.rows_done == ROWS
    assert repair.cache.stats.missing == ROWS
    assert repair.bucket.puts == Counter(row_key(index) for index in range(ROWS))


@pytest.mark.parametrize(
    ("mode", "kind", "starts_at"),
    [
        (ConcurrencyMode.FIXED, AdaptiveLimit, 12),  # at the maximum, halved by throttling
        (ConcurrencyMode.TUNED, TunedLimit, INITIAL_TUNED_LIMIT),  # upstream's, then tuned
    ],
)
async def test_the_upload_limit_follows_the_concurrency_mode(
    mode: ConcurrencyMode, kind: type, starts_at: int
) -> None:
    walk = pipeline(
        table_of(ROWS),
        concurrency=mode,
        max_concurrent_uploads=12,
    )

    assert isinstance(walk.parts.upload_limit, kind)
    assert walk.parts.upload_limit.limit == starts_at
    await walk.run()
    assert walk.parts.upload_limit.in_use == 0
    assert walk.bucket.puts == Counter(row_key(index) for index in range(ROWS))
