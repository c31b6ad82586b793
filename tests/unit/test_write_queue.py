"""The durable write queue: backoff and budget (pure), the SQLite store, and its workers over
in-memory S3 stores (the server over real Postgres and S3: tests/integration/test_write_queue.py).
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from structlog.testing import capture_logs

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError, WriteQueueError, WriteQueueUnavailable
from layer_cache.persister import Backend
from layer_cache.retry import Backoff
from layer_cache.write_queue import (
    DB_FILE_NAME,
    PG_RETRY_QUEUE,
    S3_ATTEMPTS_METRIC,
    CacheQueueStatus,
    Holds,
    NewEntry,
    Origin,
    QueueBudget,
    RequestsInFlight,
    Verdict,
    WriteBehind,
    WriteQueueStore,
    drain_limit,
    queue_status,
    replay_dead_letters,
    verdict,
)
from tests.server_support import metric_values
from tests.unit.test_persister import MemoryStore, transient

CAS = CacheType.CAS

# --------------------------------------------------------------------------------------------
# Backoff and budget


@pytest.mark.parametrize(
    ("caps", "attempts", "age_s", "gives_up"),
    [
        ({}, 1, 0.0, False),
        ({}, 1_000_000, 1e9, False),  # no cap by default: every failed write is retried
        ({"max_attempts": 10, "max_age_s": 100.0}, 9, 99.0, False),
        ({"max_attempts": 10}, 10, 0.0, True),  # attempts spent
        ({"max_age_s": 100.0}, 1, 100.0, True),  # too old
    ],
)
def test_only_an_opt_in_cap_sends_an_entry_to_the_dead_letters(
    caps: dict[str, Any], attempts: int, age_s: float, gives_up: bool
) -> None:
    assert QueueBudget(**caps).gives_up(attempts_made=attempts, age_s=age_s) is gives_up


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (ErrorKind.THROTTLED, Verdict.RETRY),
        (ErrorKind.TRANSIENT, Verdict.RETRY),
        (ErrorKind.CREDENTIALS_EXPIRED, Verdict.RETRY),
        (ErrorKind.OTHER, Verdict.RETRY),  # an unmapped code may be about this object only
        (None, Verdict.RETRY),  # a bug: the entry is kept and retried
        (ErrorKind.ACCESS_DENIED, Verdict.HOLD),
        (ErrorKind.INVALID_CREDENTIALS, Verdict.HOLD),
        (ErrorKind.MISSING_BUCKET, Verdict.HOLD),
        (ErrorKind.MISSING_TABLE, Verdict.HOLD),
        (ErrorKind.UNTRUSTED_CERTIFICATE, Verdict.HOLD),
    ],
)
def test_errors_an_operator_fixes_hold_the_target_and_the_rest_are_retried(
    kind: ErrorKind | None, expected: Verdict
) -> None:
    assert verdict(kind) is expected


@pytest.mark.parametrize(
    ("busy", "lag_s", "yield_lag_s", "limit"),
    [
        (False, 0.0, 60.0, 32),  # idle: every worker
        (True, 0.0, 60.0, 1),  # serving requests: the drain yields
        (True, 30.0, 60.0, 16),  # and takes more as its backlog ages
        (True, 59.9, 60.0, 31),
        (True, 60.0, 60.0, 32),  # a full minute behind: every worker
        (True, 1e9, 60.0, 32),
        (True, 0.0, 0.0, 32),  # 0: never yield
    ],
)
def test_the_drain_yields_to_requests_less_as_its_backlog_ages(
    busy: bool, lag_s: float, yield_lag_s: float, limit: int
) -> None:
    assert drain_limit(32, busy=busy, lag_s=lag_s, yield_lag_s=yield_lag_s) == limit


def test_a_hold_probes_one_at_a_time_under_a_capped_backoff_and_ends_on_success() -> None:
    holds = Holds(
        QueueBudget(backoff=Backoff(base_delay_s=1.0, max_delay_s=8.0, rng=random.Random(3)))
    )
    assert holds.hold(CAS, ErrorKind.ACCESS_DENIED, "denied", now=100.0)  # starts: say so
    assert not holds.hold(CAS, ErrorKind.ACCESS_DENIED, "denied again", now=100.1)  # quiet
    assert holds.held == {CAS}
    first = holds.get(CAS)
    assert first is not None
    assert 100.0 <= first.next_probe_at <= 101.0
    assert holds.probes_due(100.0 + 1.01) == [CAS]
    holds.start_probe(CAS)
    assert holds.probes_due(1e9) == []  # one probe at a time
    assert holds.next_probe_at() is None
    waits = []
    for _ in range(20):
        holds.probe_failed(CAS, now=200.0)
        hold = holds.get(CAS)
        assert hold is not None
        waits.append(hold.next_probe_at - 200.0)
    assert all(0.0 <= wait <= 8.0 for wait in waits)  # capped
    assert max(waits) > 4.0  # and growing to the cap
    assert holds.hold(CAS, ErrorKind.MISSING_BUCKET, "gone", now=201.0)  # a new reason: say so
    assert holds.snapshot() == {CAS: ErrorKind.MISSING_BUCKET}
    released = holds.release(CAS)
    assert released is not None
    assert released.since == 100.0
    assert holds.held == frozenset()
    assert holds.release(CAS) is None


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


def attempts(reader: InMemoryMetricReader) -> dict[str, float]:
    """``s3_write_attempts`` by ``result`` (upstream's success, retry, dead_letter_queue)."""
    data = reader.get_metrics_data()
    totals: dict[str, float] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != S3_ATTEMPTS_METRIC:
                    continue
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    result = str((point.attributes or {})["result"])
                    totals[result] = totals.get(result, 0) + point.value
    return totals


def write_behind(
    tmp_path: Path, s3: MemoryStore, **budget: Any
) -> tuple[WriteBehind, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    fast = QueueBudget(backoff=Backoff(base_delay_s=0.01, max_delay_s=0.02), **budget)
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
    assert attempts(reader) == {"success": 2, "retry": 1}
    assert totals["s3_write_queue_depth"] == 0


class KeyedStore(MemoryStore):
    """A MemoryStore that refuses the keys in ``refused`` and counts PUTs in flight."""

    def __init__(self, cache_type: CacheType = CAS) -> None:
        super().__init__(Backend.S3, cache_type)
        self.refused: dict[str, StorageError] = {}
        self.in_flight = 0
        self.peak_in_flight = 0

    async def put(self, key: str, value: bytes) -> bool:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if key in self.refused:
                self.puts += 1
                raise self.refused[key]
            return await super().put(key, value)
        finally:
            self.in_flight -= 1


def blocked(reader: InMemoryMetricReader) -> dict[str, tuple[float, str | None]]:
    """cache_type → (gauge value, reason) of layer_cache_write_queue_blocked."""
    return {
        dict(attributes)["cache_type"]: (value, dict(attributes).get("reason"))
        for attributes, value in metric_values(reader, "layer_cache_write_queue_blocked").items()
    }


async def test_access_denied_holds_its_cache_type_and_other_buckets_keep_flowing(
    tmp_path: Path,
) -> None:
    cas, snapshots = KeyedStore(), KeyedStore(CacheType.WORKSPACE_SNAPSHOT)
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    budget = QueueBudget(backoff=Backoff(base_delay_s=0.05, max_delay_s=0.1))
    queue = WriteBehind(
        tmp_path,
        {CAS: cas, CacheType.WORKSPACE_SNAPSHOT: snapshots},
        meter,
        workers=8,
        budget=budget,
    )
    denied = StorageError("AccessDenied", kind=ErrorKind.ACCESS_DENIED)
    keys = [f"k{index}" for index in range(12)]
    cas.refused = dict.fromkeys(keys, denied)
    with capture_logs() as events:
        queue.start()
        for key in keys:
            await queue.enqueue(cas, key, b"v")
            await queue.enqueue(snapshots, key, b"v")
        await until(lambda: len(snapshots.values) == len(keys), "every snapshot written")
        await asyncio.sleep(0.5)  # cas stays held: only probes, one at a time
        status = queue_status(tmp_path)
        assert status[CAS] == CacheQueueStatus(len(keys), status[CAS].oldest_enqueued_at, 0)
        assert blocked(reader)["cas"] == (1, "access_denied")
        assert blocked(reader)["workspace_snapshot"] == (0, None)
        probes = cas.puts
        assert probes < len(keys) + 12, probes  # a probe per backoff, not a PUT per entry
        cas.refused = {}  # the operator fixed the bucket policy
        await until(lambda: len(cas.values) == len(keys), "every cas entry written")
        assert await queue.drain(1) == 0
    held = [event for event in events if event["event"] == "write queue held"]
    assert [(event["cache_type"], event["reason"]) for event in held] == [("cas", "access_denied")]
    assert [event["cache_type"] for event in events if event["event"] == "write queue resumed"] == [
        "cas"
    ]
    assert not [event for event in events if event["event"] == "write queue entry dead-lettered"]
    assert blocked(reader)["cas"] == (0, None)


async def test_an_unmapped_error_retries_that_entry_only_and_logs_it_once(tmp_path: Path) -> None:
    s3 = KeyedStore()
    s3.refused["poison"] = StorageError("InvalidRequest", kind=ErrorKind.OTHER)
    queue, reader = write_behind(tmp_path, s3)
    with capture_logs() as events:
        queue.start()
        await queue.enqueue(s3, "poison", b"0")
        for index in range(5):
            await queue.enqueue(s3, f"fine{index}", b"1")
        await until(lambda: len(s3.values) == 5 and s3.puts >= 4, "the rest, and retries")
        assert queue_status(tmp_path)[CAS] == CacheQueueStatus(
            1, queue_status(tmp_path)[CAS].oldest_enqueued_at, 0
        )
        s3.refused = {}
        await until(lambda: "poison" in s3.values, "the poison entry, once accepted")
        assert await queue.drain(1) == 0
    failing = [event for event in events if event["event"] == "write queue entry failing"]
    assert [event["key"] for event in failing] == ["poison"]  # once, not per attempt
    assert not [event for event in events if event["event"] == "write queue held"]
    assert attempts(reader).get("dead_letter_queue", 0) == 0


async def test_spent_opt_in_budgets_end_as_dead_letters(tmp_path: Path) -> None:
    s3 = MemoryStore(Backend.S3)
    s3.failing = StorageError("access denied", kind=ErrorKind.ACCESS_DENIED)
    queue, reader = write_behind(tmp_path, s3, max_attempts=2)
    queue.start()
    await queue.enqueue(s3, "denied", b"1")
    await until_depth(queue, 0)
    s3.failing = transient()
    queue.offer(s3, "flaky", b"2")  # a read-through write-back takes the same path
    await until(lambda: queue_status(tmp_path)[CAS].dead_letters == 2, "two dead letters")
    assert await queue.drain(1) == 0
    totals = counters(reader)
    assert attempts(reader) == {"retry": 2, "dead_letter_queue": 2}  # attempt 1 of each retried
    assert totals["layer_cache_fallback_writeback_attempted"] == 1
    assert totals["layer_cache_fallback_writeback_failed"] == 1


def histogram_points(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], int]:
    """Sorted attribute items → count, for one histogram."""
    data = reader.get_metrics_data()
    points: dict[tuple[Any, ...], int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        assert isinstance(point, HistogramDataPoint)
                        points[tuple(sorted((point.attributes or {}).items()))] = point.count
    return points


def one_point(points: dict[tuple[Any, ...], float]) -> tuple[dict[str, Any], float]:
    ((attributes, value),) = points.items()
    return dict(attributes), value


async def test_the_s3_queue_reports_upstreams_worker_dead_letter_and_timing_series(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3, CacheType.WORKSPACE_SNAPSHOT)
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    budget = QueueBudget(max_attempts=1, backoff=Backoff(base_delay_s=0.01, max_delay_s=0.02))
    queue = WriteBehind(
        tmp_path, {CacheType.WORKSPACE_SNAPSHOT: s3}, meter, workers=2, budget=budget
    )
    s3.release.clear()  # the first PUT waits in flight
    queue.start()
    await queue.enqueue(s3, "a", b"1")
    await queue.enqueue(s3, "b", b"2")
    queue.offer(s3, "c", b"3")
    await until(lambda: s3.puts == 2, "two PUTs in flight")
    labels = {"cache_name": "workspace_snapshots", "cache_type": "workspace_snapshot"}
    worker = labels | {"backend": "s3", "worker_id": "0"}
    assert one_point(metric_values(reader, "s3_worker_active_uploads")) == (worker, 2)
    assert one_point(metric_values(reader, "s3_worker_queue_depth")) == (worker, 1)
    assert one_point(metric_values(reader, "s3_write_queue_depth"))[1] == 3

    s3.failing = StorageError("refused", kind=ErrorKind.OTHER)
    s3.fail_once = True
    s3.release.set()
    await until(lambda: queue_status(tmp_path)[CacheType.WORKSPACE_SNAPSHOT].queued == 0, "done")
    assert one_point(metric_values(reader, "s3_dlq_depth")) == (labels | {"backend": "s3"}, 1)
    assert one_point(metric_values(reader, "s3_worker_active_uploads"))[1] == 0
    assert attempts(reader) == {"success": 2, "dead_letter_queue": 1}
    disk_writes = histogram_points(reader, "s3_disk_write_duration_ms")
    assert disk_writes == {
        tuple(sorted((labels | {"backend": "s3", "status": "success"}).items())): 3
    }
    durations = {
        (dict(a)["status"], dict(a)["event_kind"]): count
        for a, count in histogram_points(reader, "layer_cache_persister_write_duration_ms").items()
    }
    # A write's event kind is the cache's (upstream's LayeredEventKind); a write-back's is raw.
    assert sum(durations.values()) == 3
    assert set(durations) <= {
        (status, kind) for status in ("success", "error") for kind in ("snapshot_write", "raw")
    }
    written = histogram_points(reader, "layer_cache_persistence_latency_seconds")
    assert {dict(a)["operation"] for a in written} == {"write"}
    assert sum(written.values()) == 2
    assert await queue.drain(1) == 0


async def test_the_postgres_queue_counts_under_upstreams_names_with_and_without_total(
    tmp_path: Path,
) -> None:
    pg = MemoryStore(Backend.POSTGRES)
    pg.failing, pg.fail_once = transient(), True
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    budget = QueueBudget(backoff=Backoff(base_delay_s=0.01, max_delay_s=0.02))
    queue = WriteBehind(tmp_path, {CAS: pg}, meter, workers=1, budget=budget, kind=PG_RETRY_QUEUE)
    queue.start()
    await queue.enqueue(pg, "a", b"1")
    await until_depth(queue, 0)
    assert await queue.drain(1) == 0
    totals = counters(reader)
    for name, value in (("enqueued", 1), ("success", 1), ("failed", 1)):
        assert totals[f"layer_cache_retry_queue_{name}_total"] == value
        assert totals[f"layer_cache_retry_queue_{name}"] == value
    written = histogram_points(reader, "layer_cache_persistence_latency_seconds")
    assert {dict(a)["operation"] for a in written} == {"retry"}
    assert S3_ATTEMPTS_METRIC not in totals


async def test_concurrent_enqueues_share_one_fsynced_commit_and_return_after_it(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3)
    queue, _ = write_behind(tmp_path, s3)
    store = queue.store
    committed: set[str] = set()
    batches: list[int] = []
    enqueue_many = store.enqueue_many

    def counted(entries: Sequence[NewEntry], now: float) -> list[bool]:
        time.sleep(0.02)  # a slow fsync: the next callers arrive while it runs
        added = enqueue_many(entries, now)
        batches.append(len(entries))
        committed.update(entry.key for entry in entries)
        return added

    store.enqueue_many = counted  # type: ignore[method-assign]
    returned_after_commit: list[bool] = []

    async def write(key: str) -> None:
        await queue.enqueue(s3, key, b"v")
        returned_after_commit.append(key in committed)

    await asyncio.gather(*(write(f"k{index}") for index in range(50)))
    assert returned_after_commit == [True] * 50
    assert sum(batches) == 50
    assert len(batches) <= 3, batches  # not one fsync per enqueue
    assert await queue.depth() == 50
    assert await queue.drain(0) == 50


async def test_a_failed_group_commit_fails_each_of_its_enqueues_and_the_next_one_works(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3)
    queue, _ = write_behind(tmp_path, s3)
    store = queue.store
    enqueue_many = store.enqueue_many
    failures = [WriteQueueError("disk full")]

    def failing_once(entries: Sequence[NewEntry], now: float) -> list[bool]:
        if failures:
            raise failures.pop()
        return enqueue_many(entries, now)

    store.enqueue_many = failing_once  # type: ignore[method-assign]
    results = await asyncio.gather(
        *(queue.enqueue(s3, f"k{index}", b"v") for index in range(5)), return_exceptions=True
    )
    assert all(isinstance(result, WriteQueueError) for result in results), results
    await queue.enqueue(s3, "after", b"v")
    assert await queue.depth() == 1
    assert await queue.drain(0) == 1


async def test_nothing_due_means_no_polling_and_drain_leaves_the_rest_on_disk(
    tmp_path: Path,
) -> None:
    s3 = MemoryStore(Backend.S3)
    s3.failing = transient()
    queue, _ = write_behind(tmp_path, s3)
    queue.budget = QueueBudget(
        backoff=Backoff(base_delay_s=3600.0, max_delay_s=3600.0, rng=random.Random(0))
    )
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


async def test_requests_in_flight_say_busy_until_the_last_one_finishes() -> None:
    requests = RequestsInFlight()
    assert (requests.busy, requests.idle.is_set()) == (False, True)
    requests.started()
    requests.started()
    requests.finished()
    assert (requests.count, requests.busy, requests.idle.is_set()) == (1, True, False)
    requests.finished()
    assert (requests.count, requests.busy, requests.idle.is_set()) == (0, False, True)
