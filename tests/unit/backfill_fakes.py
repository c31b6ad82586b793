"""In-memory stand-ins for one cache's storage, and its pipeline over them, for the
backfill's unit tests.

``MemoryTable`` is a ``PgLayer`` and ``MemoryBucket`` an ``S3Layer`` whose calls are answered
from dicts with the real queries' semantics (cutoff, key range, ``after``, order, limit; a
listing in key order, paged, ``StartAfter`` and continuation tokens), and recorded. A bucket's
PUTs can be held back or refused per key (``before_put``), so a test decides which uploads are in
flight when it stops, cancels or fails a walk. ``MemoryStore`` is our ``ProgressStore`` protocol
in a dict. ``pipeline`` builds a cache's ``CacheBackfill`` over them with ``cache_parts``, as
the coordinator does. Nothing here opens a connection: the integration tests run the real
layers against real servers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import asyncpg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.concurrency import ConcurrencyMode
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.pg import PgLayer, RowRef
from layer_cache.retry import Backoff, RetryPolicy
from layer_cache.s3 import S3Layer, StoredObject
from migrations_mode.cache_backfill import CacheBackfill
from migrations_mode.cache_parts import CacheParts, cache_parts
from migrations_mode.checkpoint import Position
from migrations_mode.config import BackfillConfig
from migrations_mode.differences import DifferenceReport
from migrations_mode.progress import BackfillMetrics
from migrations_mode.progress_store import (
    ProgressKey,
    ProgressStoreKind,
    RecordIdentity,
    SavedProgress,
)

T = TypeVar("T")

CUTOFF = datetime(2026, 1, 13, 17, 30, tzinfo=UTC)
# Retries that take no time worth waiting for (the retry rule itself: tests/unit/test_retry.py).
FAST_RETRIES = RetryPolicy(
    max_attempts=3, max_elapsed_s=5.0, backoff=Backoff(base_delay_s=0.001, max_delay_s=0.001)
)
# Bounds every wait of a test on the walk, so a broken pipeline fails instead of hanging.
DEADLINE_S = 5.0

# Set while a call runs inside a ``RecordingStorage``: the fakes note whether it was.
IN_STORAGE: ContextVar[bool] = ContextVar("IN_STORAGE", default=False)


def row_key(index: int) -> str:
    """A hex row key that sorts (and whose object key sorts) by ``index``."""
    return f"{index:04x}c0ffee"


def value_of(key: str) -> bytes:
    """A row's value: distinct per key, its size varying with it."""
    return (key * (1 + int(key[:4], 16) % 3)).encode()


def md5_hex(value: bytes) -> str:
    return hashlib.md5(value, usedforsecurity=False).hexdigest()


def backfill_config(**changes: Any) -> BackfillConfig:
    """A small, fast walk: pages of 4 rows, 3 uploads at a time (fixed), no checkpoint event
    within a test's time."""
    options: dict[str, Any] = {
        "cutoff": CUTOFF,
        "cache_types": (CacheType.CAS,),
        "key_batch_size": 4,
        "checkpoint_interval": timedelta(hours=1),
        "max_concurrent_uploads": 3,
        "grace_period": timedelta(seconds=30),
        "concurrency": ConcurrencyMode.FIXED,
        "retry_policy": FAST_RETRIES,
    }
    return BackfillConfig(**(options | changes))


def metrics_reader() -> tuple[BackfillMetrics, InMemoryMetricReader]:
    """The backfill's instruments on a provider whose points a test can read."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    return BackfillMetrics(meter), reader


def counter_values(reader: InMemoryMetricReader, name: str) -> dict[str, float]:
    """A counter's values by ``error_class`` (the counters a storage call moves)."""
    data = reader.get_metrics_data()
    values: dict[str, float] = {}
    if data is None:
        return values
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    assert isinstance(point, NumberDataPoint)
                    attributes = point.attributes or {}
                    values[str(attributes.get("error_class"))] = point.value
    return values


class RecordingStorage:
    """A ``StorageCall`` that runs each call once and records it (and, in ``IN_STORAGE``, that
    the call ran inside it)."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    async def __call__(self, call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
        self.keys.append(key)
        token = IN_STORAGE.set(True)
        try:
            return await call()
        finally:
            IN_STORAGE.reset(token)


@dataclass
class Listing:
    """One listing query as the table received it."""

    order: str  # "key" or "newest-first"
    cutoff: datetime
    after: str | tuple[datetime, str] | None
    low: str | None
    high: str | None
    limit: int
    with_md5: bool
    in_storage: bool


class MemoryTable(PgLayer):
    """One cache table in a dict, answering the queries the backfill makes."""

    def __init__(
        self,
        rows: Iterable[tuple[str, datetime]] = (),
        cache_type: CacheType = CacheType.CAS,
    ) -> None:
        # No pool: every query the backfill makes is answered below.
        super().__init__(cast(asyncpg.Pool, None), CACHE_SPECS[cache_type])
        self.rows: dict[str, tuple[datetime, bytes]] = {
            key: (created_at, value_of(key)) for key, created_at in rows
        }
        self.listings: list[Listing] = []
        self.existing_asked: list[tuple[list[str], bool]] = []  # (keys, inside the storage call)
        self.value_reads: Counter[str] = Counter()
        self.deleted_after_listing: set[str] = set()  # listed, gone before their values are read

    def refs(self) -> list[RowRef]:
        """Every row below the cutoff, in key order."""
        return [
            RowRef(key, created_at, len(value))
            for key, (created_at, value) in sorted(self.rows.items())
            if created_at < CUTOFF
        ]

    def _ref(self, key: str, with_md5: bool) -> RowRef:
        created_at, value = self.rows[key]
        return RowRef(key, created_at, len(value), md5_hex(value) if with_md5 else None)

    def _in_range(self, key: str, low: str | None, high: str | None) -> bool:
        return (low is None or key >= low) and (high is None or key < high)

    async def list_by_key(
        self,
        *,
        cutoff: datetime,
        after: str | None,
        low: str | None,
        high: str | None,
        limit: int,
        with_md5: bool = False,
    ) -> list[RowRef]:
        self.listings.append(
            Listing("key", cutoff, after, low, high, limit, with_md5, IN_STORAGE.get())
        )
        keys = sorted(
            key
            for key, (created_at, _) in self.rows.items()
            if created_at < cutoff
            and (after is None or key > after)
            and self._in_range(key, None if after is not None else low, high)
        )
        return [self._ref(key, with_md5) for key in keys[:limit]]

    async def list_newest_first(
        self,
        *,
        cutoff: datetime,
        after: tuple[datetime, str] | None,
        low: str | None = None,
        high: str | None = None,
        limit: int,
        with_md5: bool = False,
    ) -> list[RowRef]:
        self.listings.append(
            Listing("newest-first", cutoff, after, low, high, limit, with_md5, IN_STORAGE.get())
        )
        positions = sorted(
            (
                (created_at, key)
                for key, (created_at, _) in self.rows.items()
                if created_at < cutoff
                and (after is None or (created_at, key) < after)
                and self._in_range(key, low, high)
            ),
            reverse=True,
        )
        return [self._ref(key, with_md5) for _, key in positions[:limit]]

    def _value(self, key: str) -> bytes | None:
        self.value_reads[key] += 1
        if key in self.deleted_after_listing or key not in self.rows:
            return None
        return self.rows[key][1]

    async def fetch_values(self, keys: Sequence[str]) -> dict[str, bytes]:
        found = {key: self._value(key) for key in keys}
        return {key: value for key, value in found.items() if value is not None}

    async def fetch_value(self, key: str) -> bytes | None:
        return self._value(key)

    async def existing_keys(self, keys: Sequence[str]) -> set[str]:
        self.existing_asked.append((list(keys), IN_STORAGE.get()))
        return {key for key in keys if key in self.rows}

    async def estimated_rows(self) -> int | None:
        return len(self.rows)


class MemoryBucket(S3Layer):
    """One cache's bucket in a dict, listed in key order ``page_size`` objects a request."""

    def __init__(
        self,
        cache_type: CacheType = CacheType.CAS,
        *,
        key_prefix: str | None = None,
        page_size: int = 1000,
        endpoint: str = "http://s3.test",
    ) -> None:
        # Only the client's endpoint is read (the walk's identity); every call is answered here.
        client = SimpleNamespace(meta=SimpleNamespace(endpoint_url=endpoint))
        spec = CACHE_SPECS[cache_type]
        super().__init__(
            client,  # type: ignore[arg-type]
            spec,
            bucket=f"bucket-{spec.table}",
            key_prefix=key_prefix,
        )
        self.page_size = page_size
        self.bodies: dict[str, bytes] = {}  # by object key
        # (start_after, token, inside the storage call)
        self.list_requests: list[tuple[str | None, str | None, bool]] = []
        self.stats: Counter[str] = Counter()  # HEADs by row key
        self.puts: Counter[str] = Counter()  # by row key
        self.put_started: list[str] = []
        self.put_cancelled: list[str] = []
        # Awaited before a row's PUT stores anything: hold it back, or raise to refuse it.
        self.before_put: dict[str, Callable[[], Awaitable[object]]] = {}
        self._changed = asyncio.Event()

    def store(self, key: str, body: bytes) -> None:
        """An object for a row key, there before the walk."""
        self.bodies[self.object_key(key)] = body

    def store_object(self, object_key: str, body: bytes) -> None:
        """An object by its full object key (no row key behind it, or not a row's at all)."""
        self.bodies[object_key] = body

    def _stored(self, object_key: str) -> StoredObject | None:
        body = self.bodies.get(object_key)
        return None if body is None else _listed(body)

    async def list_page(
        self,
        start_after: str | None,
        continuation_token: str | None,
        *,
        prefix: str | None = None,
    ) -> tuple[list[tuple[str, StoredObject]], str | None]:
        self.list_requests.append((start_after, continuation_token, IN_STORAGE.get()))
        if prefix is None and self.key_prefix:
            prefix = f"{self.key_prefix}/"
        after = continuation_token or start_after
        keys = sorted(
            key
            for key in self.bodies
            if (prefix is None or key.startswith(prefix)) and (after is None or key > after)
        )
        page = keys[: self.page_size]
        entries = [
            (key, StoredObject(len(self.bodies[key]), md5_hex(self.bodies[key]))) for key in page
        ]
        token = page[-1] if len(keys) > self.page_size else None  # our token: the last key
        return entries, token

    async def stat(self, key: str) -> StoredObject | None:
        self.stats[key] += 1
        return self._stored(self.object_key(key))

    async def get(self, key: str) -> bytes | None:
        return self.bodies.get(self.object_key(key))

    async def put(self, key: str, body: bytes) -> None:
        self.put_started.append(key)
        self._notify()
        hold = self.before_put.get(key)
        try:
            if hold is not None:
                await hold()
        except asyncio.CancelledError:
            self.put_cancelled.append(key)
            self._notify()
            raise
        self.bodies[self.object_key(key)] = body
        self.puts[key] += 1
        self._notify()

    def _notify(self) -> None:
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Until ``condition`` holds, re-checked after each PUT starts, ends or is cancelled."""
        async with asyncio.timeout(DEADLINE_S):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def started(self, key: str) -> None:
        """Until the row's PUT has started."""
        await self.wait_until(lambda: key in self.put_started)


def _listed(body: bytes) -> StoredObject:
    """What a listing or HEAD reports of a plain (single-part, unencrypted) object."""
    return StoredObject(len(body), md5_hex(body))


def refuse(kind: ErrorKind = ErrorKind.ACCESS_DENIED) -> Callable[[], Awaitable[None]]:
    """A ``before_put`` hold that refuses the PUT as S3 would, every time."""

    async def refused() -> None:
        raise StorageError(f"PutObject refused ({kind.value})", kind=kind)

    return refused


@dataclass
class MemoryStore:
    """Our ``ProgressStore`` in a dict; ``failing`` makes every save raise as retries exhausted
    would, ``delay`` (when set) holds each save until it is set; ``history`` is every save."""

    kind: ProgressStoreKind = ProgressStoreKind.POSTGRES
    records: dict[ProgressKey, SavedProgress] = field(default_factory=dict)
    history: list[tuple[ProgressKey, SavedProgress]] = field(default_factory=list)
    failing: bool = False
    delay: asyncio.Event | None = None
    saved: asyncio.Event = field(default_factory=asyncio.Event)
    other_records: list[RecordIdentity] = field(default_factory=list)

    @property
    def saves(self) -> int:
        return len(self.history)

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        return self.records.get(key)

    async def save(self, key: ProgressKey, progress: SavedProgress) -> None:
        if self.failing:
            raise StorageError("connection refused", kind=ErrorKind.TRANSIENT)
        if self.delay is not None:
            await self.delay.wait()
        self.history.append((key, progress))
        self.records[key] = progress
        self.saved.set()

    async def others(self, key: ProgressKey) -> list[RecordIdentity]:
        return self.other_records


def hold(bucket: MemoryBucket, *indexes: int) -> asyncio.Event:
    """Hold the PUTs of these rows until the returned event is set."""
    release = asyncio.Event()
    for index in indexes:
        bucket.before_put[row_key(index)] = release.wait
    return release


# --------------------------------------------------------------------------------------------
# A cache's pipeline over the fakes


def created_at(index: int) -> datetime:
    """Row ``index``'s creation time: key order and newest-first order differ."""
    return CUTOFF - timedelta(minutes=1 + (index * 7) % 11, seconds=index)


def table_of(count: int, cache_type: CacheType = CacheType.CAS) -> MemoryTable:
    """Rows ``0 … count - 1`` below the cutoff."""
    return MemoryTable(((row_key(index), created_at(index)) for index in range(count)), cache_type)


def position(index: int) -> Position:
    """Row ``index``'s place in a walk."""
    return Position(created_at(index), row_key(index))


@dataclass
class Walk:
    """A cache's pipeline and the fakes it runs over."""

    cache: CacheBackfill
    parts: CacheParts
    table: MemoryTable
    bucket: MemoryBucket
    store: MemoryStore
    stop: asyncio.Event
    report: DifferenceReport

    @property
    def saved(self) -> SavedProgress | None:
        """The progress saved for this walk."""
        return self.store.records.get(self.parts.saver.key)

    async def run(self) -> None:
        async with asyncio.timeout(DEADLINE_S):
            await self.cache.run()


def pipeline(
    table: MemoryTable,
    bucket: MemoryBucket | None = None,
    store: MemoryStore | None = None,
    *,
    stop: asyncio.Event | None = None,
    **config_changes: Any,
) -> Walk:
    """The table's cache's pipeline, built as the coordinator builds it (pages of 4 rows, 3
    uploads at a time unless changed)."""
    cache_type = table.spec.cache_type
    bucket = MemoryBucket(cache_type) if bucket is None else bucket
    store = MemoryStore() if store is None else store
    stop = asyncio.Event() if stop is None else stop
    config = backfill_config(**config_changes)
    report = DifferenceReport()
    parts = cache_parts(
        pg=table,
        s3=bucket,
        config=config,
        metrics=BackfillMetrics(MeterProvider().get_meter("test")),
        progress_store=store,
        report=report,
    )
    cache = CacheBackfill(cache_type, config=config, stop=stop, parts=parts)
    return Walk(cache, parts, table, bucket, store, stop, report)
