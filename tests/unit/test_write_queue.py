"""The durable write queue: backoff and budget (pure), the SQLite store, and its workers over
in-memory S3 stores (the server over real Postgres and S3: tests/integration/test_write_queue.py).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.persister import Backend
from layer_cache.write_queue import (
    DB_FILE_NAME,
    CacheQueueStatus,
    Origin,
    QueueBudget,
    WriteBehind,
    WriteQueueError,
    WriteQueueStore,
    WriteQueueUnavailable,
    queue_status,
    replay_dead_letters,
)
from tests.unit.test_persister import MemoryStore, transient

CAS = CacheType.CAS

# --------------------------------------------------------------------------------------------
# Backoff and budget


def test_backoff_is_full_jitter_under_a_doubling_ceiling_and_the_cap() -> None:
    budget = QueueBudget(base_delay_s=0.5, max_delay_s=60.0, rng=random.Random(1))
    for attempts, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (8, 60.0), (10_000, 60.0)]:
        draws = [budget.delay_s(attempts) for _ in range(500)]
        assert all(0.0 <= draw <= ceiling for draw in draws)
        assert max(draws) > ceiling * 0.9  # the whole range is used, not a fixed delay
        assert min(draws) < ceiling * 0.1


@pytest.mark.parametrize(
    ("retryable", "attempts", "age_s", "gives_up"),
    [
        (True, 1, 0.0, False),
        (True, 9, 99.0, False),
        (True, 10, 0.0, True),  # attempts spent
        (True, 1, 100.0, True),  # too old
        (False, 1, 0.0, True),  # not worth another attempt
    ],
)
def test_budget_decides_between_retry_and_dead_letter(
    retryable: bool, attempts: int, age_s: float, gives_up: bool
) -> None:
    budget = QueueBudget(max_attempts=10, max_age_s=100.0)
    assert budget.gives_up(retryable=retryable, attempts_made=attempts, age_s=age_s) is gives_up


# --------------------------------------------------------------------------------------------
# The SQLite store


def test_enqueue_deduplicates_on_cache_type_and_key_and_survives_reopening(
    tmp_path: Path,
) -> None:
    store = WriteQueueStore(tmp_path / "q")
    assert store.enqueue(CAS, "k", b"v", Origin.WRITE, 1.0)
    assert not store.enqueue(CAS, "k", b"v", Origin.FILL, 2.0)
    assert store.enqueue(CacheType.WORKSPACE_SNAPSHOT, "k", b"v", Origin.WRITE, 3.0)
    store.close()
    reopened = WriteQueueStore(tmp_path / "q")
    assert reopened.depth() == 2
    mode = sqlite3.connect(tmp_path / "q" / DB_FILE_NAME).execute("PRAGMA journal_mode")
    assert mode.fetchone() == ("wal",)
    reopened.close()


def test_claim_returns_due_entries_in_enqueue_order_skipping_claimed_ones(tmp_path: Path) -> None:
    store = WriteQueueStore(tmp_path)
    for index, key in enumerate(["c", "a", "b"]):
        store.enqueue(CAS, key, key.encode(), Origin.WRITE, float(index))
    first = store.claim_due(10.0, 2, [])
    assert [entry.key for entry in first] == ["c", "a"]
    assert [entry.key for entry in store.claim_due(10.0, 5, [e.id for e in first])] == ["b"]
    store.retry_later(first[0].id, 1, 50.0, "transient: down")
    assert [entry.key for entry in store.claim_due(10.0, 5, [])] == ["a", "b"]
    assert store.next_due_at([first[1].id, first[1].id + 1]) == 50.0
    store.complete(first[1].id)
    assert store.depth() == 2
    assert [(e.key, e.attempts) for e in store.claim_due(60.0, 5, [])] == [("c", 1), ("b", 0)]


def test_dead_letter_and_replay_move_entries_with_their_last_error(tmp_path: Path) -> None:
    store = WriteQueueStore(tmp_path)
    store.enqueue(CAS, "a", b"1", Origin.WRITE, 1.0)
    store.enqueue(CacheType.WORKSPACE_SNAPSHOT, "b", b"2", Origin.FILL, 2.0)
    for entry in store.claim_due(5.0, 5, []):
        store.dead_letter(entry.id, 3, "other: refused", 5.0)
    assert store.depth() == 0
    assert store.status() == {
        CAS: CacheQueueStatus(0, None, 1),
        CacheType.WORKSPACE_SNAPSHOT: CacheQueueStatus(0, None, 1),
    }
    store.close()
    assert replay_dead_letters(tmp_path, CAS) == 1
    assert queue_status(tmp_path)[CAS].queued == 1
    assert queue_status(tmp_path)[CacheType.WORKSPACE_SNAPSHOT].dead_letters == 1
    assert replay_dead_letters(tmp_path, None) == 1
    reopened = WriteQueueStore(tmp_path)
    entries = reopened.claim_due(float("inf"), 5, [])
    assert {(e.key, e.value, e.attempts, e.origin) for e in entries} == {
        ("a", b"1", 0, Origin.WRITE),
        ("b", b"2", 0, Origin.FILL),
    }
    assert all(status.dead_letters == 0 for status in reopened.status().values())


def test_an_unusable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(WriteQueueUnavailable, match="WRITE_QUEUE_DIR"):
        WriteQueueStore(blocker / "q")


def test_a_failing_commit_is_a_retryable_storage_error(tmp_path: Path) -> None:
    store = WriteQueueStore(tmp_path)
    store.close()
    store._db = sqlite3.connect(":memory:")  # no queue table: every statement fails
    with pytest.raises(WriteQueueError) as raised:
        store.enqueue(CAS, "k", b"v", Origin.WRITE, 1.0)
    assert raised.value.kind.retryable


# --------------------------------------------------------------------------------------------
# The workers


def counters(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    totals: dict[str, float] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, NumberDataPoint):
                        totals[metric.name] = totals.get(metric.name, 0) + point.value
    return totals


def write_behind(
    tmp_path: Path, s3: MemoryStore, **budget: Any
) -> tuple[WriteBehind, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    fast = QueueBudget(base_delay_s=0.01, max_delay_s=0.02, **budget)
    return WriteBehind(tmp_path, {CAS: s3}, meter, workers=2, budget=fast), reader


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        result = condition()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def until_depth(queue: WriteBehind, depth: int) -> None:
    async def reached() -> bool:
        return await queue.depth() == depth

    await until(reached, f"queue depth {depth}")


async def test_workers_put_retry_transient_faults_and_delete_on_success(tmp_path: Path) -> None:
    s3 = MemoryStore(Backend.S3)
    s3.failing, s3.fail_once = transient(), True
    queue, reader = write_behind(tmp_path, s3)
    queue.start()
    await queue.enqueue(s3, "a", b"1")
    await queue.enqueue(s3, "a", b"1")  # deduplicated
    await queue.enqueue(s3, "b", b"2")
    await until_depth(queue, 0)
    assert s3.values == {"a": b"1", "b": b"2"}
    assert await queue.drain(1) == 0
    totals = counters(reader)
    assert totals["layer_cache_write_queue_enqueued"] == 2
    assert totals["layer_cache_write_queue_success"] == 2
    assert totals["layer_cache_write_queue_retried"] == 1
    assert totals["layer_cache_write_queue_depth"] == 0


async def test_non_retryable_faults_and_spent_budgets_end_as_dead_letters(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3)
    s3.failing = StorageError("access denied", kind=ErrorKind.ACCESS_DENIED)
    queue, reader = write_behind(tmp_path, s3)
    queue.start()
    await queue.enqueue(s3, "denied", b"1")
    await until_depth(queue, 0)
    s3.failing = transient()
    queue.budget = QueueBudget(max_attempts=3, base_delay_s=0.001, max_delay_s=0.002)
    queue.offer(s3, "flaky", b"2")  # a read-through write-back takes the same path
    await until(lambda: queue_status(tmp_path)[CAS].dead_letters == 2, "two dead letters")
    assert await queue.drain(1) == 0
    totals = counters(reader)
    assert totals["layer_cache_write_queue_permanent_failure"] == 2
    assert totals["layer_cache_write_queue_retried"] == 2  # flaky: attempts 1 and 2 retried
    assert totals["layer_cache_fallback_writeback_attempted"] == 1
    assert totals["layer_cache_fallback_writeback_failed"] == 1


async def test_nothing_due_means_no_polling_and_drain_leaves_the_rest_on_disk(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3)
    s3.failing = transient()
    queue, _ = write_behind(tmp_path, s3)
    queue.budget = QueueBudget(base_delay_s=3600.0, max_delay_s=3600.0, rng=random.Random(0))
    queue.start()
    await queue.enqueue(s3, "a", b"1")
    await until(lambda: s3.puts > 0, "the first PUT")
    await asyncio.sleep(0.3)
    assert s3.puts == 1  # the retry is an hour away (draw > 0 with this seed): no busy loop
    assert await queue.drain(0.2) == 1  # drain tried it again at once, and it still failed
    assert s3.puts == 2
    s3.failing = None
    restarted, _ = write_behind(tmp_path, s3)
    restarted.start()
    await until_depth(restarted, 0)  # everything pending is drained on start
    assert await restarted.drain(1) == 0
    assert s3.values == {"a": b"1"}
