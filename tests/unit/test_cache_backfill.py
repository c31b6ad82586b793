"""One cache's pipeline, built by ``cache_parts`` over an in-memory table, bucket and progress
store: every row handed to its action once, the resume position advancing only in walk order,
a stop draining what is in flight, a cancel or a failing row ending the walk with its progress
saved, and a resumed walk starting after its saved position (the real servers, faults and
signals: tests/integration/test_backfill.py, test_resilience.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.typing import EventDict

from layer_cache.cache_types import CacheType
from layer_cache.errors import CacheBackfillFailed, ErrorKind, StorageError
from migrations_mode.config import VerifyMode
from migrations_mode.progress_store import SavedProgress
from migrations_mode.walk import WalkOrder
from tests.unit.backfill_fakes import (
    DEADLINE_S,
    MemoryBucket,
    MemoryStore,
    Walk,
    hold,
    pipeline,
    position,
    refuse,
    row_key,
    table_of,
    value_of,
)


def walk_order(count: int, order: WalkOrder) -> list[int]:
    if order is WalkOrder.KEY:
        return list(range(count))
    return sorted(range(count), key=lambda index: position(index), reverse=True)


# --------------------------------------------------------------------------------------------
# A whole walk


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_every_row_is_put_once_and_the_completed_walk_is_saved(order: WalkOrder) -> None:
    count = 14
    walk = pipeline(table_of(count), order=order)

    await walk.run()

    keys = [row_key(index) for index in range(count)]
    assert walk.bucket.puts == Counter(keys)
    assert all(walk.bucket.bodies[walk.bucket.object_key(key)] == value_of(key) for key in keys)
    assert walk.table.value_reads == Counter(keys)
    # In key order the listing vouches for every row; newest first each is HEADed, once.
    assert walk.bucket.stats == (Counter() if order is WalkOrder.KEY else Counter(keys))
    stats = walk.cache.stats
    assert (stats.processed, stats.uploaded, stats.skipped) == (count, count, 0)
    assert walk.cache.completed
    last = walk_order(count, order)[-1]
    assert walk.saved == SavedProgress(position(last), completed=True, rows_done=count)


async def test_rows_already_stored_are_skipped_and_other_sized_objects_replaced() -> None:
    walk = pipeline(table_of(9))
    for index in range(4):
        walk.bucket.store(row_key(index), value_of(row_key(index)))
    walk.bucket.store(row_key(4), b"truncated")

    await walk.run()

    assert walk.bucket.puts == Counter(row_key(index) for index in range(4, 9))
    stats = walk.cache.stats
    assert (stats.processed, stats.skipped, stats.uploaded, stats.repaired) == (9, 4, 5, 1)
    assert walk.saved == SavedProgress(position(8), completed=True, rows_done=9)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(0, 18),
    batch=st.integers(1, 6),
    uploads=st.integers(1, 4),
    order=st.sampled_from(WalkOrder),
    stored=st.sets(st.integers(0, 17)),
)
def test_no_row_is_skipped_or_repeated_whatever_the_batch_concurrency_and_bucket(
    count: int, batch: int, uploads: int, order: WalkOrder, stored: set[int]
) -> None:
    async def walk_all() -> Walk:
        walk = pipeline(
            table_of(count), order=order, key_batch_size=batch, max_concurrent_uploads=uploads
        )
        for index in stored:
            walk.bucket.store(row_key(index), value_of(row_key(index)))
        await walk.run()
        return walk

    walk = asyncio.run(walk_all())

    missing = [row_key(index) for index in range(count) if index not in stored]
    assert walk.bucket.puts == Counter(missing)
    stats = walk.cache.stats
    assert (stats.processed, stats.skipped) == (count, count - len(missing))
    assert walk.cache.completed
    assert walk.cache.rows_done == count
    assert walk.parts.upload_limit.in_use == 0
    assert walk.cache.bytes_budget.used == 0


async def test_a_row_gone_before_its_value_is_read_is_counted_vanished_and_not_put() -> None:
    walk = pipeline(table_of(6))
    walk.table.deleted_after_listing.add(row_key(3))

    with structlog.testing.capture_logs() as logs:
        await walk.run()

    assert row_key(3) not in walk.bucket.puts
    assert walk.table.value_reads[row_key(3)] == 2, "read with its chunk, then asked once more"
    assert (walk.cache.stats.vanished, walk.cache.stats.processed) == (1, 6)
    assert walk.cache.completed
    vanished = [log for log in logs if log["event"] == "row vanished before it was read"]
    assert [log["key"] for log in vanished] == [row_key(3)]


async def test_values_in_memory_stay_within_the_byte_budget() -> None:
    walk = pipeline(table_of(12), max_inflight_bytes=64, max_concurrent_uploads=4)
    held: list[int] = []

    async def note_bytes_held() -> None:
        held.append(walk.cache.bytes_budget.used)

    for index in range(12):
        walk.bucket.before_put[row_key(index)] = note_bytes_held

    await walk.run()

    assert len(held) == 12
    assert max(held) <= 64
    assert walk.cache.bytes_budget.used == 0


async def test_a_retried_put_is_put_once_and_its_retry_counted() -> None:
    walk = pipeline(table_of(5))
    attempts = 0

    async def throttled_once() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise StorageError("SlowDown", kind=ErrorKind.THROTTLED)

    walk.bucket.before_put[row_key(2)] = throttled_once

    await walk.run()

    assert attempts == 2
    assert walk.bucket.puts[row_key(2)] == 1
    assert walk.cache.stats.retries == {"throttled": 1}
    assert walk.cache.completed


async def test_a_verification_puts_nothing_saves_nothing_and_counts_what_differs() -> None:
    walk = pipeline(table_of(6), verify=VerifyMode.SIZE)
    for index in range(4):
        walk.bucket.store(row_key(index), value_of(row_key(index)))
    walk.bucket.store(row_key(4), b"truncated")
    walk.bucket.store_object(walk.bucket.object_key(row_key(4)[:-1] + "f"), b"no row")

    await walk.run()

    assert walk.bucket.puts == Counter()
    assert walk.store.history == []
    stats = walk.cache.stats
    assert (stats.verified, stats.mismatched, stats.missing, stats.extra) == (4, 1, 1, 1)
    assert walk.cache.completed


# --------------------------------------------------------------------------------------------
# Progress and resuming


async def test_the_saved_position_advances_only_in_walk_order() -> None:
    walk = pipeline(table_of(8), key_batch_size=2, max_concurrent_uploads=3)
    release = hold(walk.bucket, 2)  # row 2 uploads last; every row after it finishes first
    run = asyncio.create_task(walk.run())

    others = {row_key(index) for index in range(8)} - {row_key(2)}
    await walk.bucket.wait_until(lambda: set(walk.bucket.puts) == others)
    async with asyncio.timeout(DEADLINE_S):
        await walk.store.saved.wait()
    assert walk.cache.walk.tracker.low_water == position(1)
    assert walk.cache.rows_done == 2
    assert walk.store.history == [
        (walk.parts.saver.key, SavedProgress(position(1), completed=False, rows_done=2))
    ]

    release.set()
    await run

    saved = [record for _, record in walk.store.history]
    assert saved[-1] == SavedProgress(position(7), completed=True, rows_done=8)
    positions = [record.position for record in saved if record.position is not None]
    assert positions == sorted(positions)


async def test_a_stop_request_drains_the_uploads_in_flight_and_saves_where_to_resume() -> None:
    walk = pipeline(table_of(12), max_concurrent_uploads=2)
    release = hold(walk.bucket, 0, 1)
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(walk.run())
        await walk.bucket.started(row_key(1))
        walk.stop.set()
        release.set()
        await run  # a stop is no failure

    assert walk.bucket.put_started == [row_key(0), row_key(1)], "nothing starts after a stop"
    assert walk.bucket.puts == Counter([row_key(0), row_key(1)]), "in flight: drained, not cut"
    assert walk.bucket.put_cancelled == []
    assert not walk.cache.completed
    assert walk.saved == SavedProgress(position(1), completed=False, rows_done=2)
    assert walk.parts.upload_limit.in_use == 0
    assert walk.cache.bytes_budget.used == 0
    [last] = [log for log in logs if log["event"] == "backfill shutting down gracefully"]
    assert (last["reason"], last["in_flight_uploads"], last["uploaded"]) == ("stopped", 0, 2)
    assert last["checkpoint_timestamp"] == "2026-01-13 17:30:00.000000 UTC"  # key order: cutoff


async def test_a_stopped_walk_resumed_puts_each_remaining_row_once() -> None:
    bucket, store = MemoryBucket(), MemoryStore()
    first = pipeline(table_of(12), bucket, store, max_concurrent_uploads=2)
    release = hold(bucket, 4, 5)
    run = asyncio.create_task(first.run())
    await bucket.started(row_key(5))
    first.stop.set()
    release.set()
    await run
    assert first.saved == SavedProgress(position(5), completed=False, rows_done=6)

    second = pipeline(table_of(12), bucket, store, max_concurrent_uploads=2)
    await second.run()

    assert bucket.puts == Counter(row_key(index) for index in range(12))
    assert second.cache.stats.processed == 6
    assert second.saved == SavedProgress(position(11), completed=True, rows_done=12)


@pytest.mark.parametrize("order", list(WalkOrder))
async def test_a_resumed_walk_starts_after_its_saved_position(order: WalkOrder) -> None:
    walk = pipeline(table_of(12), order=order)
    done = walk_order(12, order)[:5]
    walk.store.records[walk.parts.saver.key] = SavedProgress(position(done[-1]), False, 5)

    with structlog.testing.capture_logs() as logs:
        await walk.run()

    assert walk.bucket.puts == Counter(row_key(i) for i in range(12) if i not in done)
    resumed = position(done[-1])
    first_listing = walk.table.listings[0]
    if order is WalkOrder.KEY:
        assert first_listing.after == resumed.key
        assert walk.bucket.list_requests[0][0] == walk.bucket.object_key(resumed.key)
    else:
        assert first_listing.after == (resumed.created_at, resumed.key)
    assert walk.cache.stats.processed == 7
    assert walk.saved == SavedProgress(position(walk_order(12, order)[-1]), True, 12)
    [started] = [log for log in logs if log["event"] == "starting backfill"]
    assert started["resume_after_key"] == resumed.key


async def test_a_walk_saved_as_complete_lists_nothing() -> None:
    walk = pipeline(table_of(5))
    walk.store.records[walk.parts.saver.key] = SavedProgress(position(4), True, 5)

    with structlog.testing.capture_logs() as logs:
        await walk.run()

    assert walk.cache.already_complete
    assert walk.cache.completed
    assert walk.table.listings == []
    assert walk.bucket.puts == Counter()
    assert [log["event"] for log in logs] == [
        "resuming from saved progress",
        "completed backfill",
    ]
    assert logs[-1]["already_complete"]


class Awaited:
    """A log processor that notes when every one of some events has been logged."""

    def __init__(self, *events: str) -> None:
        self.pending = set(events)
        self.seen = asyncio.Event()

    def __call__(self, logger: object, method: str, event: EventDict) -> EventDict:
        self.pending.discard(event["event"])
        if not self.pending:
            self.seen.set()
        return event


async def test_checkpoint_and_progress_events_come_every_interval_while_the_walk_runs() -> None:
    walk = pipeline(table_of(4), checkpoint_interval=timedelta(milliseconds=5))
    release = hold(walk.bucket, 0)
    awaited = Awaited("backfill checkpoint", "backfill progress")
    with structlog.testing.capture_logs(processors=[awaited]) as logs:
        run = asyncio.create_task(walk.run())
        async with asyncio.timeout(DEADLINE_S):
            await awaited.seen.wait()
        release.set()
        await run

    checkpoint = next(log for log in logs if log["event"] == "backfill checkpoint")
    assert checkpoint["checkpoint_timestamp"] == "2026-01-13 17:30:00.000000 UTC"
    assert checkpoint["active_uploads"] >= 1


# --------------------------------------------------------------------------------------------
# Failing and cancelling


async def test_a_row_that_cannot_be_put_fails_the_cache_naming_the_row() -> None:
    walk = pipeline(table_of(10))
    walk.bucket.before_put[row_key(4)] = refuse(ErrorKind.ACCESS_DENIED)

    with structlog.testing.capture_logs() as logs, pytest.raises(CacheBackfillFailed) as raised:
        await walk.run()

    failure = raised.value
    assert (failure.cache_type, failure.key) == (CacheType.CAS, row_key(4))
    assert failure.cause.kind is ErrorKind.ACCESS_DENIED
    assert not walk.cache.completed
    saved = walk.saved
    assert saved is not None
    assert not saved.completed
    assert saved.position is not None
    assert saved.position < position(4)
    # Every upload slot is given back, those of uploads cancelled before they started too.
    assert walk.parts.upload_limit.in_use == 0
    [last] = [log for log in logs if log["event"] == "backfill stopped"]
    assert (last["reason"], last["uploads_in_flight"]) == ("failed", 0)


async def test_a_cancelled_walk_cuts_its_uploads_and_saves_where_to_resume() -> None:
    walk = pipeline(table_of(8), max_concurrent_uploads=2)
    hold(walk.bucket, 1)  # never released: only the cancel ends it
    with structlog.testing.capture_logs() as logs:
        run = asyncio.create_task(walk.run())
        await walk.bucket.wait_until(lambda: row_key(0) in walk.bucket.puts)
        await walk.bucket.started(row_key(1))
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    assert walk.bucket.put_cancelled == [row_key(1)]
    assert walk.saved == SavedProgress(position(0), completed=False, rows_done=1)
    assert walk.parts.upload_limit.in_use == 0
    [last] = [log for log in logs if log["event"] == "backfill stopped"]
    assert (last["reason"], last["rows_pending"]) == ("stopped", walk.cache.walk.tracker.in_flight)
