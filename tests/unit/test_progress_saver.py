"""The saver's rules against an in-memory store of our own ``ProgressStore`` protocol (the real
Postgres and S3 stores are exercised by tests/integration/test_resilience.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError
from migrations_mode.checkpoint import Position
from migrations_mode.errors import CacheBackfillFailed
from migrations_mode.progress_saver import ProgressSaver
from migrations_mode.progress_store import (
    ProgressKey,
    ProgressStoreKind,
    RecordIdentity,
    SavedProgress,
)
from migrations_mode.walk import WalkOrder

T = TypeVar("T")
CUTOFF = datetime(2026, 1, 13, 17, 30, tzinfo=UTC)
KEY = ProgressKey(CacheType.CAS, CUTOFF, WalkOrder.KEY, "http://s3/bucket")


class MemoryStore:
    """Records in a dict; ``failing`` makes every save raise as retries exhausted would."""

    kind = ProgressStoreKind.POSTGRES

    def __init__(self, others: list[RecordIdentity] | None = None) -> None:
        self.records: dict[ProgressKey, SavedProgress] = {}
        self.saves = 0
        self.failing = False
        self.saved = asyncio.Event()
        self.delay: asyncio.Event | None = None  # when set, a save waits for it
        self._others = others or []

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        return self.records.get(key)

    async def save(self, key: ProgressKey, progress: SavedProgress) -> None:
        if self.failing:
            raise StorageError("connection refused", kind=ErrorKind.TRANSIENT)
        if self.delay is not None:
            await self.delay.wait()
        self.saves += 1
        self.records[key] = progress
        self.saved.set()

    async def others(self, key: ProgressKey) -> list[RecordIdentity]:
        return self._others


async def direct_call(call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
    try:
        return await call()
    except StorageError as exc:
        raise CacheBackfillFailed(CacheType.CAS, key, exc) from exc


class Walk:
    """What the saver snapshots: the record to save and rows finished in order."""

    def __init__(self) -> None:
        self.record = SavedProgress(None, completed=False, rows_done=0)
        self.finished_in_order = 0

    def snapshot(self) -> tuple[SavedProgress, int]:
        return self.record, self.finished_in_order

    def advance(self, rows: int, key: str) -> None:
        self.finished_in_order += rows
        self.record = SavedProgress(Position(CUTOFF, key), False, self.finished_in_order)


def saver_for(
    store: MemoryStore, walk: Walk, *, writes: bool = True, restart: bool = False
) -> ProgressSaver:
    return ProgressSaver(
        store,
        KEY,
        snapshot=walk.snapshot,
        storage_call=direct_call,
        writes=writes,
        restart=restart,
        batch_size=10,
    )


async def test_load_returns_the_saved_record_unless_restarting_or_verifying() -> None:
    store = MemoryStore()
    store.records[KEY] = SavedProgress(Position(CUTOFF, "ab"), completed=False, rows_done=7)
    assert await saver_for(store, Walk()).load() == store.records[KEY]
    with structlog.testing.capture_logs() as logs:
        assert await saver_for(store, Walk(), restart=True).load() is None
    assert [log["event"] for log in logs] == ["ignoring saved progress (--backfill-restart)"]
    assert await saver_for(store, Walk(), writes=False).load() is None


async def test_records_under_other_parameters_are_reported_once_and_not_used() -> None:
    other = RecordIdentity(WalkOrder.NEWEST_FIRST.value, KEY.target, KEY.shard)
    with structlog.testing.capture_logs() as logs:
        assert await saver_for(MemoryStore([other]), Walk()).load() is None
    assert len(logs) == 1
    assert logs[0]["event"] == "saved progress not used: it was saved for other parameters"
    assert logs[0]["differs"] == ["walk order"]
    assert logs[0]["records_not_used"] == 1


async def test_save_writes_only_what_changed_and_a_completed_record_always() -> None:
    store, walk = MemoryStore(), Walk()
    saver = saver_for(store, walk)
    await saver.save()  # nothing finished, same as loaded: nothing to write
    assert store.saves == 0
    walk.advance(3, "ab")
    await saver.save()
    await saver.save()
    assert (store.saves, store.records[KEY]) == (1, walk.record)
    walk.record = SavedProgress(walk.record.position, completed=True, rows_done=3)
    await saver.save()
    assert store.records[KEY].completed


async def test_a_verification_saves_nothing() -> None:
    store, walk = MemoryStore(), Walk()
    walk.advance(50, "ff")
    await saver_for(store, walk, writes=False).save()
    assert store.saves == 0


async def test_a_failed_save_is_a_warning_and_the_next_save_tries_again() -> None:
    store, walk = MemoryStore(), Walk()
    saver = saver_for(store, walk)
    walk.advance(3, "ab")
    store.failing = True
    with structlog.testing.capture_logs() as logs:
        await saver.save()
    assert [(log["event"], log["error"]) for log in logs] == [
        ("could not save backfill progress", "connection refused")
    ]
    store.failing = False
    await saver.save()
    assert store.records[KEY] == walk.record


async def test_the_loop_saves_once_a_batch_has_finished_in_order_since_the_last_save() -> None:
    store, walk = MemoryStore(), Walk()
    saver = saver_for(store, walk)
    walk.advance(5, "a0")
    await saver.save()  # saved at 5 rows finished
    loop = asyncio.create_task(saver.save_when_due())
    try:
        walk.advance(9, "b0")
        saver.finished(walk.finished_in_order)
        for _ in range(5):
            await asyncio.sleep(0)  # the loop would run and save within these turns
        assert store.saves == 1, "9 rows since the last save are less than a batch of 10"
        walk.advance(1, "b1")
        saver.finished(walk.finished_in_order)
        await asyncio.wait_for(store.saved.wait(), timeout=5)
        assert (store.saves, store.records[KEY]) == (2, walk.record)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop


async def test_the_final_save_completes_even_when_the_caller_is_cancelled() -> None:
    store, walk = MemoryStore(), Walk()
    store.delay = asyncio.Event()
    saver = saver_for(store, walk)
    walk.advance(3, "ab")
    caller = asyncio.create_task(saver.final_save())
    await asyncio.sleep(0)
    caller.cancel()
    store.delay.set()
    await asyncio.wait_for(store.saved.wait(), timeout=5)
    assert store.records[KEY] == walk.record
