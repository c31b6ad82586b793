"""The saver's rules against an in-memory store of our own ``ProgressStore`` protocol (the real
Postgres and S3 stores are exercised by tests/integration/test_resilience.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import CacheBackfillFailed, StorageError
from migrations_mode.checkpoint import CheckpointTracker, Position
from migrations_mode.progress_saver import ProgressSaver, WalkProgress
from migrations_mode.progress_store import (
    ProgressKey,
    RecordIdentity,
    SavedProgress,
    WalkPurpose,
)
from migrations_mode.walk import WalkOrder
from tests.unit.backfill_fakes import MemoryStore

T = TypeVar("T")
CUTOFF = datetime(2026, 1, 13, 17, 30, tzinfo=UTC)
KEY = ProgressKey(CacheType.CAS, CUTOFF, WalkOrder.KEY, "http://s3/bucket")


async def direct_call(call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
    try:
        return await call()
    except StorageError as exc:
        raise CacheBackfillFailed(CacheType.CAS, key, exc) from exc


def walk_at_start() -> WalkProgress:
    return WalkProgress(CheckpointTracker(CUTOFF))


def advance(walk: WalkProgress, rows: int, key: str) -> None:
    """``rows`` more rows finish in order, the last one at ``key``."""
    for row in range(rows):
        position = Position(CUTOFF, key if row == rows - 1 else f"{key}-{row}")
        walk.tracker.finish(walk.tracker.dispatch(position))


def record_of(walk: WalkProgress) -> SavedProgress:
    return walk.snapshot()[0]


def saver_for(
    store: MemoryStore, walk: WalkProgress, *, writes: bool = True, restart: bool = False
) -> ProgressSaver:
    return ProgressSaver(
        store,
        KEY,
        walk=walk,
        storage=direct_call,
        writes=writes,
        restart=restart,
        batch_size=10,
    )


async def test_load_returns_the_saved_record_unless_restarting_or_verifying() -> None:
    store = MemoryStore()
    store.records[KEY] = SavedProgress(Position(CUTOFF, "ab"), completed=False, rows_done=7)
    assert await saver_for(store, walk_at_start()).load() == store.records[KEY]
    with structlog.testing.capture_logs() as logs:
        assert await saver_for(store, walk_at_start(), restart=True).load() is None
    assert [log["event"] for log in logs] == ["ignoring saved progress (--backfill-restart)"]
    assert await saver_for(store, walk_at_start(), writes=False).load() is None


async def test_records_under_other_parameters_are_reported_once_and_not_used() -> None:
    other = RecordIdentity(WalkOrder.NEWEST_FIRST.value, KEY.target, KEY.shard)
    with structlog.testing.capture_logs() as logs:
        assert await saver_for(MemoryStore(other_records=[other]), walk_at_start()).load() is None
    assert len(logs) == 1
    assert logs[0]["event"] == "saved progress not used: it was saved for other parameters"
    assert logs[0]["differs"] == ["walk order"]
    assert logs[0]["records_not_used"] == 1


async def test_save_writes_only_what_changed_and_a_completed_record_always() -> None:
    store, walk = MemoryStore(), walk_at_start()
    saver = saver_for(store, walk)
    await saver.save()  # nothing finished, same as loaded: nothing to write
    assert store.saves == 0
    advance(walk, 3, "ab")
    await saver.save()
    await saver.save()
    assert (store.saves, store.records[KEY]) == (1, record_of(walk))
    walk.completed = True
    await saver.save()
    assert store.records[KEY].completed


async def test_a_verification_saves_nothing() -> None:
    store, walk = MemoryStore(), walk_at_start()
    advance(walk, 50, "ff")
    await saver_for(store, walk, writes=False).save()
    assert store.saves == 0


async def test_a_failed_save_is_a_warning_and_the_next_save_tries_again() -> None:
    store, walk = MemoryStore(), walk_at_start()
    saver = saver_for(store, walk)
    advance(walk, 3, "ab")
    store.failing = True
    with structlog.testing.capture_logs() as logs:
        await saver.save()
    assert [(log["event"], log["error"]) for log in logs] == [
        ("could not save backfill progress", "connection refused")
    ]
    store.failing = False
    await saver.save()
    assert store.records[KEY] == record_of(walk)


async def test_the_loop_saves_once_a_batch_has_finished_in_order_since_the_last_save() -> None:
    store, walk = MemoryStore(), walk_at_start()
    saver = saver_for(store, walk)
    advance(walk, 5, "a0")
    await saver.save()  # saved at 5 rows finished
    loop = asyncio.create_task(saver.save_when_due())
    try:
        advance(walk, 9, "b0")
        saver.finished(walk.tracker.finished_in_order)
        for _ in range(5):
            await asyncio.sleep(0)  # the loop would run and save within these turns
        assert store.saves == 1, "9 rows since the last save are less than a batch of 10"
        advance(walk, 1, "b1")
        saver.finished(walk.tracker.finished_in_order)
        await asyncio.wait_for(store.saved.wait(), timeout=5)
        assert (store.saves, store.records[KEY]) == (2, record_of(walk))
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_the_final_save_completes_even_when_the_caller_is_cancelled() -> None:
    store, walk = MemoryStore(), walk_at_start()
    store.delay = asyncio.Event()
    saver = saver_for(store, walk)
    advance(walk, 3, "ab")
    caller = asyncio.create_task(saver.final_save())
    await asyncio.sleep(0)
    caller.cancel()
    store.delay.set()
    await asyncio.wait_for(store.saved.wait(), timeout=5)
    assert store.records[KEY] == record_of(walk)


async def test_resume_takes_up_the_saved_position_and_rows_into_the_walk() -> None:
    store, walk = MemoryStore(), walk_at_start()
    saved_at = Position(CUTOFF - timedelta(hours=1), "ab")
    store.records[KEY] = SavedProgress(saved_at, completed=False, rows_done=7)
    with structlog.testing.capture_logs() as logs:
        assert await saver_for(store, walk).resume() == saved_at
    assert (walk.tracker.low_water, walk.rows_done_earlier, walk.rows_done) == (saved_at, 7, 7)
    assert not walk.completed
    # In key order the cutoff resumes (any key may still be pending whatever its timestamp).
    assert [(log["event"], log["checkpoint_timestamp"]) for log in logs] == [
        ("resuming from saved progress", "2026-01-13 17:30:00.000000 UTC")
    ]


async def test_resume_newest_first_starts_from_the_tracker_checkpoint() -> None:
    key = replace(KEY, order=WalkOrder.NEWEST_FIRST)
    store, walk = MemoryStore(), walk_at_start()
    store.records[key] = SavedProgress(Position(CUTOFF - timedelta(hours=1), "ab"), False, 7)
    saver = ProgressSaver(
        store, key, walk=walk, storage=direct_call, writes=True, restart=False, batch_size=10
    )
    with structlog.testing.capture_logs() as logs:
        await saver.resume()
    assert logs[0]["checkpoint_timestamp"] == "2026-01-13 16:30:00.000001 UTC"


def test_the_checkpoint_that_resumes_is_the_cutoff_in_key_order_and_the_trackers_newest_first() -> (
    None
):
    walk = walk_at_start()
    walk.tracker.finish(walk.tracker.dispatch(Position(CUTOFF - timedelta(hours=1), "ab")))
    newest_first = ProgressSaver(
        MemoryStore(),
        replace(KEY, order=WalkOrder.NEWEST_FIRST),
        walk=walk,
        storage=direct_call,
        writes=True,
        restart=False,
        batch_size=10,
    )
    assert saver_for(MemoryStore(), walk).checkpoint_timestamp == CUTOFF
    assert newest_first.checkpoint_timestamp == walk.tracker.checkpoint_timestamp < CUTOFF


async def test_a_completed_copy_stays_completed_and_a_completed_repair_starts_again() -> None:
    store, walk = MemoryStore(), walk_at_start()
    store.records[KEY] = SavedProgress(Position(CUTOFF, "ff"), completed=True, rows_done=9)
    await saver_for(store, walk).resume()
    assert (walk.completed, walk.rows_done) == (True, 9)

    repair = replace(KEY, purpose=WalkPurpose.REPAIR)
    store.records[repair] = SavedProgress(Position(CUTOFF, "ff"), completed=True, rows_done=9)
    fresh = walk_at_start()
    saver = ProgressSaver(
        store, repair, walk=fresh, storage=direct_call, writes=True, restart=False, batch_size=10
    )
    with structlog.testing.capture_logs() as logs:
        assert await saver.resume() is None
    assert (fresh.completed, fresh.rows_done, fresh.tracker.low_water) == (False, 0, None)
    assert [log["event"] for log in logs] == ["previous repair pass completed; starting a new pass"]
