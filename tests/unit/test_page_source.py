"""The page source: a cache's rows in walk order, page by page, and what its bucket holds for
them (extra objects included), against an in-memory table and bucket (the SQL and the real
listing: tests/integration/test_backfill.py, test_verify_repair.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from opentelemetry.sdk.metrics import MeterProvider

from layer_cache.cache_types import CacheType
from layer_cache.s3 import StoredObject
from migrations_mode.bucket_index import UNKNOWN, Stored
from migrations_mode.checkpoint import Position
from migrations_mode.differences import Difference, DifferenceKind, DifferenceReport
from migrations_mode.page_source import ExtraObjects, Page, PageSource
from migrations_mode.progress import BackfillMetrics, CacheProgress
from migrations_mode.progress_store import S3_PROGRESS_PREFIX
from migrations_mode.walk import Shard, WalkOrder
from tests.unit.backfill_fakes import (
    CUTOFF,
    MemoryBucket,
    MemoryTable,
    RecordingStorage,
    backfill_config,
    md5_hex,
    row_key,
    value_of,
)

# More pages than any test's walk has: a cursor that does not move fails instead of looping.
MAX_PAGES = 50


def created(index: int) -> timedelta:
    """How long before the cutoff row ``index`` was written: ties on every fifth minute."""
    return timedelta(minutes=1 + (index * 7) % 5)


def table_of(*indexes: int) -> MemoryTable:
    return MemoryTable((row_key(index), CUTOFF - created(index)) for index in indexes)


class RecordingReport(DifferenceReport):
    def __init__(self) -> None:
        super().__init__()
        self.differences: list[Difference] = []

    def record(self, difference: Difference) -> None:
        self.differences.append(difference)


@dataclass
class Source:
    """A page source and what it was built over."""

    pages: PageSource
    table: MemoryTable
    bucket: MemoryBucket
    storage: RecordingStorage
    report: RecordingReport
    progress: CacheProgress


def source_over(
    table: MemoryTable,
    bucket: MemoryBucket | None = None,
    *,
    order: WalkOrder = WalkOrder.KEY,
    shard: Shard | None = None,
    batch: int = 3,
    with_md5: bool = False,
    looks_for_extra: bool = False,
) -> Source:
    bucket = bucket or MemoryBucket()
    storage = RecordingStorage()
    report = RecordingReport()
    progress = CacheProgress(CacheType.CAS, BackfillMetrics(MeterProvider().get_meter("t")))
    config = backfill_config(order=order, shard=shard or Shard(), key_batch_size=batch)
    pages = PageSource(
        pg=table,
        s3=bucket,
        config=config,
        storage=storage,
        with_md5=with_md5,
        extra=ExtraObjects(report, progress) if looks_for_extra else None,
    )
    return Source(pages, table, bucket, storage, report, progress)


async def walk(source: Source, start: Position | None = None) -> list[tuple[Page, list[Stored]]]:
    """Every page, with what the bucket holds for its rows, as the pipeline asks for them."""
    walked = []
    async for page in source.pages.pages(start):
        walked.append((page, await source.pages.stored_objects(page.rows)))
        assert len(walked) <= MAX_PAGES, "the walk does not advance"
    return walked


def keys(walked: list[tuple[Page, list[Stored]]]) -> list[str]:
    return [row.key for page, _ in walked for row in page.rows]


def shape(walked: list[tuple[Page, list[Stored]]]) -> list[tuple[int, bool]]:
    return [(len(page.rows), page.last) for page, _ in walked]


# --------------------------------------------------------------------------------------------
# Pages


async def test_key_order_pages_each_start_after_the_last_rows_key_and_end_short() -> None:
    source = source_over(table_of(*range(7)), batch=3)

    walked = await walk(source)

    assert shape(walked) == [(3, False), (3, False), (1, True)]
    assert keys(walked) == [row_key(index) for index in range(7)]
    listings = source.table.listings
    assert [listing.after for listing in listings] == [None, row_key(2), row_key(5)]
    assert {(listing.order, listing.limit) for listing in listings} == {("key", 3)}


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_an_exact_multiple_of_the_batch_ends_with_one_empty_last_page(
    order: WalkOrder,
) -> None:
    source = source_over(table_of(*range(6)), order=order, batch=3)

    walked = await walk(source)

    # The page that comes back full cannot say it was the last: one more query says so.
    assert shape(walked) == [(3, False), (3, False), (0, True)]
    assert len(source.table.listings) == 3


async def test_an_empty_table_is_one_empty_last_page() -> None:
    source = source_over(table_of())
    assert shape(await walk(source)) == [(0, True)]


async def test_newest_first_pages_go_down_created_at_then_key_without_losing_a_tied_row() -> None:
    table = table_of(*range(11))  # created_at ties across page boundaries
    source = source_over(table, order=WalkOrder.NEWEST_FIRST, batch=3)

    walked = await walk(source)

    expected = sorted(table.refs(), key=lambda row: (row.created_at, row.key), reverse=True)
    assert [row for page, _ in walked for row in page.rows] == expected
    assert shape(walked) == [(3, False), (3, False), (3, False), (2, True)]
    last_of_each = [page.rows[-1] for page, _ in walked[:-1]]
    assert [listing.after for listing in table.listings] == [
        None,
        *((row.created_at, row.key) for row in last_of_each),
    ]
    assert {listing.order for listing in table.listings} == {"newest-first"}


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_the_shards_key_range_the_cutoff_and_the_md5_go_into_every_listing(
    order: WalkOrder,
) -> None:
    source = source_over(
        table_of(*range(0, 0x10000, 0x0800)), order=order, shard=Shard(1, 4), with_md5=True
    )

    walked = await walk(source)

    assert len(source.table.listings) > 1
    for listing in source.table.listings:
        assert (listing.low, listing.high) == ("4000", "8000")
        assert listing.cutoff == CUTOFF
        assert listing.with_md5
    assert sorted(keys(walked)) == [row_key(index) for index in range(0x4000, 0x8000, 0x0800)]
    row = walked[0][0].rows[0]
    assert row.md5 == md5_hex(value_of(row.key))


async def test_without_md5_the_listing_asks_for_none() -> None:
    source = source_over(table_of(*range(4)))
    walked = await walk(source)
    assert not any(listing.with_md5 for listing in source.table.listings)
    assert all(row.md5 is None for page, _ in walked for row in page.rows)


@pytest.mark.parametrize(
    ("order", "after"),
    [
        (WalkOrder.KEY, row_key(4)),
        (WalkOrder.NEWEST_FIRST, (CUTOFF - timedelta(minutes=3), row_key(4))),
    ],
)
async def test_a_resumed_walk_lists_from_after_the_saved_position(
    order: WalkOrder, after: object
) -> None:
    source = source_over(table_of(*range(9)), order=order)
    await walk(source, Position(CUTOFF - timedelta(minutes=3), row_key(4)))
    assert source.table.listings[0].after == after


async def test_every_query_goes_through_the_caches_storage_call() -> None:
    table = table_of(0, 2, 4, 6)
    bucket = MemoryBucket(page_size=1)
    bucket.store(row_key(3), b"no row")
    source = source_over(table, bucket, batch=2, looks_for_extra=True)

    await walk(source)

    assert table.listings
    assert table.existing_asked
    assert bucket.list_requests
    assert all(listing.in_storage for listing in table.listings)
    assert all(in_storage for _, in_storage in table.existing_asked)
    assert all(in_storage for _, _, in_storage in bucket.list_requests)


# --------------------------------------------------------------------------------------------
# What the bucket holds


async def test_newest_first_the_bucket_is_not_listed_and_every_row_is_unknown() -> None:
    bucket = MemoryBucket()
    bucket.store(row_key(1), value_of(row_key(1)))
    source = source_over(table_of(*range(5)), bucket, order=WalkOrder.NEWEST_FIRST)

    walked = await walk(source)

    assert [stored for _, page_stored in walked for stored in page_stored] == [UNKNOWN] * 5
    assert bucket.list_requests == []


async def test_in_key_order_each_row_gets_its_listed_object_or_none() -> None:
    bucket = MemoryBucket(page_size=2)
    for index in (0, 3, 4):
        bucket.store(row_key(index), value_of(row_key(index)))
    bucket.store(row_key(5), b"short")
    source = source_over(table_of(*range(7)), bucket, batch=3)

    walked = await walk(source)

    def listed(index: int) -> StoredObject:
        value = value_of(row_key(index))
        return StoredObject(len(value), md5_hex(value))

    assert [stored for _, page_stored in walked for stored in page_stored] == [
        listed(0),
        None,
        None,
        listed(3),
        listed(4),
        StoredObject(5, md5_hex(b"short")),
        None,
    ]
    # One listing walked alongside the table, from the start of the bucket.
    assert bucket.list_requests[0][:2] == (None, None)
    assert all(start is None for start, token, _ in bucket.list_requests[1:])


async def test_an_object_no_row_accounts_for_is_reported_extra_and_counted() -> None:
    rows = (0, 2, 4, 6, 8)
    table = table_of(*rows)
    table.rows[row_key(3)] = (CUTOFF + timedelta(minutes=1), b"newer than the cutoff")
    bucket = MemoryBucket()
    for index in rows:
        bucket.store(row_key(index), value_of(row_key(index)))
    bucket.store(row_key(3), b"newer than the cutoff")  # not walked, yet it has a row
    bucket.store(row_key(5), b"orphan")  # no row at all
    source = source_over(table, bucket, batch=2, looks_for_extra=True)

    walked = await walk(source)

    assert source.report.differences == [
        Difference(
            CacheType.CAS,
            row_key(5),
            bucket.object_key(row_key(5)),
            DifferenceKind.EXTRA,
            object_size=6,
            object_etag=md5_hex(b"orphan"),
        )
    ]
    assert source.progress.stats.extra == 1
    # Both unmatched objects were looked up (any created_at counts); the rows' own matched.
    assert sorted(key for asked, _ in table.existing_asked for key in asked) == [
        row_key(3),
        row_key(5),
    ]
    assert all(stored is not None for _, page_stored in walked for stored in page_stored)


async def test_a_copy_does_not_look_for_extra_objects() -> None:
    table = table_of(0, 2)
    bucket = MemoryBucket()
    bucket.store(row_key(1), b"orphan")
    source = source_over(table, bucket, looks_for_extra=False)

    await walk(source)

    assert table.existing_asked == []
    assert source.report.differences == []
    assert source.progress.stats.extra == 0


@pytest.mark.parametrize("key_prefix", [None, "tenant-a"])
async def test_the_backfills_progress_records_are_never_extra(key_prefix: str | None) -> None:
    low, high = 0x5000, 0xA000  # "_" sorts between "50/…" and "a0/…": inside the page's span
    table = table_of(low, high)
    bucket = MemoryBucket(key_prefix=key_prefix)
    for index in (low, high):
        bucket.store(row_key(index), value_of(row_key(index)))
    record = f"{S3_PROGRESS_PREFIX}/{CUTOFF.isoformat()}/key/0-of-1.json"
    bucket.store_object(f"{key_prefix}/{record}" if key_prefix else record, b"{}")
    source = source_over(table, bucket, looks_for_extra=True)

    await walk(source)

    assert source.report.differences == []
    assert source.progress.stats.extra == 0
    assert table.existing_asked == [], "nothing to look up: only the record was unmatched"


@pytest.mark.parametrize("key_prefix", [None, "tenant-a"])
async def test_a_resumed_walk_lists_the_bucket_from_after_the_resumed_rows_object(
    key_prefix: str | None,
) -> None:
    table = table_of(*range(8))
    bucket = MemoryBucket(key_prefix=key_prefix)
    bucket.store(row_key(2), b"orphan before the resumed key")
    bucket.store(row_key(6), value_of(row_key(6)))
    source = source_over(table, bucket, batch=4, looks_for_extra=True)

    walked = await walk(source, Position(CUTOFF, row_key(4)))

    assert bucket.list_requests[0][:2] == (bucket.object_key(row_key(4)), None)
    assert keys(walked) == [row_key(index) for index in (5, 6, 7)]
    assert [stored for _, page_stored in walked for stored in page_stored] == [
        None,
        StoredObject(len(value_of(row_key(6))), md5_hex(value_of(row_key(6)))),
        None,
    ]
    assert source.report.differences == [], "behind the resumed key: another run's business"


@pytest.mark.parametrize(("key_prefix", "start_after"), [(None, "40/00"), ("p", "p/40/00")])
async def test_a_shard_lists_the_bucket_from_its_first_keys_prefix(
    key_prefix: str | None, start_after: str
) -> None:
    bucket = MemoryBucket(key_prefix=key_prefix)
    bucket.store(row_key(0x3FFF), b"the shard before")
    source = source_over(table_of(0x3FFF, 0x4000, 0x4001), bucket, shard=Shard(1, 4))

    walked = await walk(source)

    assert bucket.list_requests[0][:2] == (start_after, None)
    assert keys(walked) == [row_key(0x4000), row_key(0x4001)]
    assert [stored for _, page_stored in walked for stored in page_stored] == [None, None]


def test_rows_come_by_key_only_in_key_order() -> None:
    assert source_over(table_of()).pages.in_key_order
    assert not source_over(table_of(), order=WalkOrder.NEWEST_FIRST).pages.in_key_order
