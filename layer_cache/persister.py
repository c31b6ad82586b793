"""Persister modes: where the layer cache writes and reads, composed from the two storage layers.

Each backend has one write path (``PgStore.put``: ``INSERT … ON CONFLICT DO NOTHING``;
``S3Store.put``: a conditional PUT) and one read path, so a mode is only a ``Route`` in ``ROUTES``
(keyed by ``PersisterMode``, upstream's serde names): the backends a write goes to concurrently,
and the order reads try them. A *deferred* target (S3 in ``DualWrite`` and ``S3Primary``) is
durably queued (``WriteBackSink``) instead of written on the request path. ``put`` returns True
only when the key was new to every direct target, and a failed write or enqueue raises after the
others finish, so a retry completes it. Except, as upstream does: where a deferred target holds a
durable copy once queued, a direct write failing with an error worth retrying or one an operator
fixes is queued too (``retry_later``, the Postgres retry queue) and the write is acknowledged. A
read returns the first hit and reports a miss only when every backend said "no such key"; bulk
reads apply that per key (``Store.get_many`` reports per-key failures). A value found on a later
backend is queued for each earlier backend that missed it or failed to read it (upstream counts a
failed S3 GET as a miss), which only ``S3Primary`` can do. Every storage call runs under
``call_with_retries`` with a short policy. Reads and writes are measured as upstream measures them
(``layer_cache.persister_metrics``: each backend read's hits, misses and time, each fallback to the
next backend, each write's outcome and time per target). Nothing here needs closing: the stores
use the services context's pool and S3 client. The mode table and bulk-read rules:
``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from types import MappingProxyType
from typing import Protocol, TypeVar

from layer_cache.cache_types import CACHE_SPECS, CacheSpec, CacheType
from layer_cache.errors import StorageError
from layer_cache.persister_metrics import PersisterMetrics
from layer_cache.pg import PgLayer
from layer_cache.retry import Backoff, RetryPolicy, call_with_retries
from layer_cache.s3 import S3Layer

T = TypeVar("T")

S3_BULK_READ_CONCURRENCY = 16
"""GETs in flight per bulk read on S3, which has no multi-get."""

REQUEST_RETRY_POLICY = RetryPolicy(
    max_attempts=3, max_elapsed_s=2.0, backoff=Backoff(base_delay_s=0.05, max_delay_s=0.5)
)
"""Retries on the request path: short, a client is waiting."""


class Backend(StrEnum):
    """A storage backend, as named in metric attributes (``backend="s3"``)."""

    POSTGRES = "postgres"
    S3 = "s3"


@dataclass(frozen=True)
class BulkRead:
    """What one backend answered to a bulk read: the values it has, and the keys whose read
    failed (after retries) with the error. A key in neither is a miss."""

    found: dict[str, bytes]
    failed: dict[str, StorageError]


class Store(Protocol):
    """One cache type's rows on one backend."""

    @property
    def backend(self) -> Backend: ...

    @property
    def cache_type(self) -> CacheType: ...

    @property
    def cache_name(self) -> str:
        """The table name, upstream's ``cache_name`` metric attribute."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str], policy: RetryPolicy) -> BulkRead:
        """Read ``keys`` under ``policy``; a ``StorageError`` is reported per key, not raised."""
        ...

    async def size(self, key: str) -> int | None: ...

    async def put(self, key: str, value: bytes) -> bool:
        """Store unless present; True if this call stored it."""
        ...

    async def check(self) -> None:
        """Raise ``StorageError`` unless the backend answers a cheap request."""
        ...


class PgStore:
    """A cache table in Postgres."""

    backend = Backend.POSTGRES

    def __init__(self, layer: PgLayer) -> None:
        self.layer = layer
        self.cache_type = layer.spec.cache_type
        self.cache_name = layer.spec.table

    async def get(self, key: str) -> bytes | None:
        return await self.layer.fetch_value(key)

    async def get_many(self, keys: Sequence[str], policy: RetryPolicy) -> BulkRead:
        """One query for every key, retried as a whole; if it fails, every key failed."""
        try:
            found = await call_with_retries(partial(self.layer.fetch_values, keys), policy)
        except StorageError as exc:
            return BulkRead(found={}, failed=dict.fromkeys(keys, exc))
        return BulkRead(found=found, failed={})

    async def size(self, key: str) -> int | None:
        return await self.layer.fetch_size(key)

    async def put(self, key: str, value: bytes) -> bool:
        return await self.layer.insert(key, value)

    async def check(self) -> None:
        await self.layer.ping()

    async def delete(self, key: str) -> bool:
        """Delete the row (the evict path); True if there was one."""
        return await self.layer.delete(key)


class S3Store:
    """A cache bucket in S3."""

    backend = Backend.S3

    def __init__(self, layer: S3Layer) -> None:
        self.layer = layer
        self.cache_type = layer.spec.cache_type
        self.cache_name = layer.spec.table

    async def get(self, key: str) -> bytes | None:
        return await self.layer.get(key)

    async def get_many(self, keys: Sequence[str], policy: RetryPolicy) -> BulkRead:
        """One GET per key (S3 has no multi-get), each retried on its own, a bounded number in
        flight; a key that still fails is reported, and the other keys are still read."""
        found: dict[str, bytes] = {}
        failed: dict[str, StorageError] = {}
        pending = iter(keys)

        async def reader() -> None:
            for key in pending:  # the readers share one iterator: each key is read once
                try:
                    value = await call_with_retries(partial(self.layer.get, key), policy)
                except StorageError as exc:
                    failed[key] = exc
                    continue
                if value is not None:
                    found[key] = value

        async with asyncio.TaskGroup() as group:
            for _ in range(min(len(keys), S3_BULK_READ_CONCURRENCY)):
                group.create_task(reader())
        return BulkRead(found=found, failed=failed)

    async def size(self, key: str) -> int | None:
        return await self.layer.head(key)

    async def put(self, key: str, value: bytes) -> bool:
        return await self.layer.put_if_absent(key, value)

    async def check(self) -> None:
        await self.layer.check_bucket()


@dataclass(frozen=True)
class Route:
    """Where one persister mode writes (all, concurrently) and reads (in order)."""

    writes: frozenset[Backend]
    reads: tuple[Backend, ...]
    deferred: frozenset[Backend] = frozenset()
    """Write targets reached through the durable write queue, not on the request path."""

    @property
    def backends(self) -> frozenset[Backend]:
        """Every backend the mode touches (what readiness checks)."""
        return self.writes | frozenset(self.reads)

    @property
    def required(self) -> frozenset[Backend]:
        """The backends the mode cannot serve without: its direct write targets. A deferred
        target is queued durably and reads fall back past it, so its outage is no reason to
        take the server out of service (readiness reports it, and does not fail on it)."""
        return self.writes - self.deferred


class PersisterMode(StrEnum):
    """Where the layer cache writes and reads (upstream's serde names)."""

    POSTGRES_ONLY = "PostgresOnly"
    DUAL_WRITE = "DualWrite"
    S3_PRIMARY = "S3Primary"
    S3_ONLY = "S3Only"

    @property
    def uses_s3(self) -> bool:
        """True when S3 is part of the write path (so there is a bucket to backfill)."""
        return self is not PersisterMode.POSTGRES_ONLY


_PG, _S3 = Backend.POSTGRES, Backend.S3

ROUTES: Mapping[PersisterMode, Route] = MappingProxyType(
    {
        PersisterMode.POSTGRES_ONLY: Route(writes=frozenset({_PG}), reads=(_PG,)),
        PersisterMode.DUAL_WRITE: Route(
            writes=frozenset({_PG, _S3}), reads=(_PG,), deferred=frozenset({_S3})
        ),
        PersisterMode.S3_PRIMARY: Route(
            writes=frozenset({_PG, _S3}), reads=(_S3, _PG), deferred=frozenset({_S3})
        ),
        PersisterMode.S3_ONLY: Route(writes=frozenset({_S3}), reads=(_S3,)),
    }
)


class WriteBackSink(Protocol):
    """The durable write queue (``layer_cache.write_queue.WriteBehind``)."""

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        """Queue a write to a deferred target; returns once it is durable, else raises."""
        ...

    def offer(self, store: Store, key: str, value: bytes) -> None:
        """Queue a copy into a backend that missed the value; never makes the read wait."""
        ...


class CachePersister:
    """One cache type's reads and writes, routed over its stores."""

    def __init__(
        self,
        route: Route,
        stores: Mapping[Backend, Store],
        write_back: WriteBackSink,
        *,
        policy: RetryPolicy = REQUEST_RETRY_POLICY,
        retry_later: WriteBackSink | None = None,
        metrics: PersisterMetrics | None = None,
    ) -> None:
        missing = route.backends - stores.keys()
        if missing:
            raise ValueError(f"no store for {', '.join(sorted(missing))}")
        self.route = route
        self.stores = stores
        self.write_back = write_back
        self.policy = policy
        self.retry_later = retry_later
        self.metrics = PersisterMetrics() if metrics is None else metrics
        first = next(iter(stores.values()))
        self.cache_name = first.cache_name
        self.spec: CacheSpec = CACHE_SPECS[first.cache_type]

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        return await call_with_retries(call, self.policy)

    async def put(self, key: str, value: bytes) -> bool:
        """Write to every direct target and queue the deferred ones, concurrently; True if the
        key was new to every direct target."""
        event_kind = self.spec.write_event_kind
        self.metrics.write_attempted(self.cache_name, self.route.reads[0], event_kind)
        direct = [
            self.stores[backend] for backend in sorted(self.route.writes - self.route.deferred)
        ]
        deferred = [self.stores[backend] for backend in sorted(self.route.deferred)]
        results = await asyncio.gather(
            *(self._write(store, key, value) for store in direct),
            *(self._enqueue(store, key, value) for store in deferred),
            return_exceptions=True,
        )
        for result in results[len(direct) :]:  # every target finished: a retry heals
            if isinstance(result, BaseException):
                raise result
        stored: list[bool] = []
        for store, result in zip(direct, results[: len(direct)], strict=True):
            if isinstance(result, BaseException):
                result = await self._retry_later(store, key, value, result, queued=bool(deferred))
            stored.append(bool(result))
        return all(stored)

    async def _write(self, store: Store, key: str, value: bytes) -> bool:
        """One direct target's write (with the request's retries), measured."""
        event_kind = self.spec.write_event_kind
        began = time.perf_counter()
        try:
            stored = await self._call(partial(store.put, key, value))
        except Exception as exc:
            elapsed_s = time.perf_counter() - began
            self.metrics.wrote(
                self.cache_name, store.backend, event_kind, elapsed_s=elapsed_s, failure=exc
            )
            self.metrics.write_failed(self.cache_name, store.backend, event_kind, exc)
            raise
        ended = time.perf_counter()
        self.metrics.wrote(
            self.cache_name, store.backend, event_kind, elapsed_s=ended - began, failure=None
        )
        self.metrics.write_succeeded(self.cache_name, store.backend, event_kind)
        self.metrics.persisted(self.cache_name, store.backend, "write", event_kind, ended - began)
        return stored

    async def _enqueue(self, store: Store, key: str, value: bytes) -> None:
        """A deferred target's write: durably queued (upstream counts that as its success)."""
        event_kind = self.spec.write_event_kind
        try:
            await self.write_back.enqueue(store, key, value)
        except Exception as exc:
            self.metrics.write_failed(self.cache_name, store.backend, event_kind, exc)
            raise
        self.metrics.write_succeeded(self.cache_name, store.backend, event_kind)

    async def _retry_later(
        self, store: Store, key: str, value: bytes, failure: BaseException, *, queued: bool
    ) -> bool:
        """A direct write failed. With the value durably queued for a deferred target, an error
        worth retrying or one an operator fixes sends it to the retry queue (True: acknowledged,
        as if new); anything else fails the write."""
        deferrable = isinstance(failure, StorageError) and (
            failure.kind.retryable or failure.kind.needs_operator
        )
        if self.retry_later is None or not queued or not deferrable:
            raise failure
        try:
            await self.retry_later.enqueue(store, key, value)
        except StorageError as exc:
            raise failure from exc
        return True

    async def get(self, key: str) -> bytes | None:
        """The first hit in read order; None only if every backend missed."""
        missed: list[Backend] = []
        failure: StorageError | None = None
        for backend in self.route.reads:
            if missed:
                self.metrics.fell_back(self.cache_name, missed[-1], backend, 1)
            store = self.stores[backend]
            began = time.perf_counter()
            try:
                value = await self._call(partial(store.get, key))
            except StorageError as exc:
                failure = failure or exc
                missed.append(backend)  # filled like a miss, as upstream does
                continue
            found = value is not None
            self.metrics.looked_up(
                self.cache_name,
                backend,
                hits=int(found),
                misses=int(not found),
                elapsed_s=time.perf_counter() - began,
            )
            if value is not None:
                self._fill(missed, {key: value})
                return value
            missed.append(backend)
        if failure is not None:
            raise failure
        return None

    async def size(self, key: str) -> int | None:
        """The value's size from the first backend that has it (HEAD; nothing is filled)."""
        failure: StorageError | None = None
        for backend in self.route.reads:
            store = self.stores[backend]
            try:
                size = await self._call(partial(store.size, key))
            except StorageError as exc:
                failure = failure or exc
                continue
            if size is not None:
                return size
        if failure is not None:
            raise failure
        return None

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """Every key found, each from the first backend in read order that has it; each key
        follows ``get``'s rules (see the module docstring)."""
        remaining = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        missed: dict[str, list[Backend]] = {key: [] for key in remaining}
        failures: dict[str, StorageError] = {}  # each key's first failure, in read order
        previous: Backend | None = None
        for backend in self.route.reads:
            if not remaining:
                break
            if previous is not None:
                self.metrics.fell_back(self.cache_name, previous, backend, len(remaining))
            previous = backend
            began = time.perf_counter()
            read = await self.stores[backend].get_many(remaining, self.policy)
            self.metrics.looked_up(
                self.cache_name,
                backend,
                hits=len(read.found),
                misses=len(remaining) - len(read.found) - len(read.failed),
                elapsed_s=time.perf_counter() - began,
            )
            for key, value in read.found.items():
                self._fill(missed[key], {key: value})
            found |= read.found
            for key, exc in read.failed.items():
                failures.setdefault(key, exc)
            remaining = [key for key in remaining if key not in read.found]
            for key in remaining:  # a failed read is filled like a miss, as upstream does
                missed[key].append(backend)
        for key in remaining:  # on no backend that answered, and some backend failed: unknown
            if key in failures:
                raise failures[key]
        return found

    async def evict(self, key: str) -> bool:
        """Upstream's ``evict_from_pg``: delete the key's Postgres row where the mode has
        Postgres; S3 objects are never deleted (nor are they upstream). True if a row went."""
        store = self.stores.get(Backend.POSTGRES)
        if not isinstance(store, PgStore):
            return False
        event_kind = self.spec.evict_event_kind or ""
        started = time.perf_counter()
        try:
            deleted = await self._call(partial(store.delete, key))
        except Exception:
            self.metrics.evict_failed(self.cache_name, event_kind)
            raise
        latency_s = time.perf_counter() - started
        self.metrics.persisted(self.cache_name, Backend.POSTGRES, "evict", event_kind, latency_s)
        return deleted

    def _fill(self, missed: Sequence[Backend], values: Mapping[str, bytes]) -> None:
        for backend in missed:
            if backend in self.route.writes:
                for key, value in values.items():
                    self.write_back.offer(self.stores[backend], key, value)
