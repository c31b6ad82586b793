"""Bulk reads key by key: the real ``S3Store``/``PgStore`` over in-memory layers with scripted
faults, routed by ``CachePersister``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import cast

import pytest

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.persister import (
    ROUTES,
    S3_BULK_READ_CONCURRENCY,
    Backend,
    CachePersister,
    PersisterMode,
    PgStore,
    S3Store,
    Store,
)
from layer_cache.pg import PgLayer
from layer_cache.retry import RetryPolicy
from layer_cache.s3 import S3Layer

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.002)


def throttled(key: str) -> StorageError:
    return StorageError(f"GetObject {key} failed: SlowDown (throttled)", kind=ErrorKind.THROTTLED)


class MemoryLayer:
    """What ``S3Store`` and ``PgStore`` call on their layer, over a dict.

    ``faults[key]`` lists the errors the key's next GETs raise, one per GET (``always`` makes a
    key fail every time); ``down`` makes every call raise it.
    """

    def __init__(self) -> None:
        self.spec = CACHE_SPECS[CacheType.CAS]
        self.values: dict[str, bytes] = {}
        self.faults: dict[str, list[StorageError]] = {}
        self.always: dict[str, StorageError] = {}
        self.down: StorageError | None = None
        self.gets: Counter[str] = Counter()
        self.queries: list[list[str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    async def get(self, key: str) -> bytes | None:
        self.gets[key] += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)  # let the other readers start theirs
            if self.down is not None:
                raise self.down
            if key in self.always:
                raise self.always[key]
            if self.faults.get(key):
                raise self.faults[key].pop(0)
            return self.values.get(key)
        finally:
            self.in_flight -= 1

    async def fetch_value(self, key: str) -> bytes | None:
        return (await self.fetch_values([key])).get(key)

    async def fetch_values(self, keys: Sequence[str]) -> dict[str, bytes]:
        self.queries.append(list(keys))
        if self.down is not None:
            raise self.down
        return {key: self.values[key] for key in keys if key in self.values}


class RecordingSink:
    def __init__(self) -> None:
        self.offers: list[tuple[Backend, str, bytes]] = []

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        raise AssertionError("reads never enqueue writes")

    def offer(self, store: Store, key: str, value: bytes) -> None:
        self.offers.append((store.backend, key, value))


def persister(mode: str) -> tuple[CachePersister, MemoryLayer, MemoryLayer, RecordingSink]:
    s3, pg = MemoryLayer(), MemoryLayer()
    stores: dict[Backend, Store] = {
        Backend.S3: S3Store(cast(S3Layer, s3)),
        Backend.POSTGRES: PgStore(cast(PgLayer, pg)),
    }
    sink = RecordingSink()
    route = ROUTES[PersisterMode(mode)]
    return CachePersister(route, stores, sink, policy=FAST_RETRY), s3, pg, sink


async def test_s3_primary_retries_each_key_then_falls_back_to_postgres_per_key() -> None:
    cache, s3, pg, sink = persister("S3Primary")
    s3.values |= {"retried": b"s3 after retry", "broken": b"s3 unreadable"}
    s3.faults["retried"] = [throttled("retried")]
    s3.always["broken"] = throttled("broken")
    pg.values |= {"broken": b"pg copy", "pg_only": b"pg value"}

    found = await cache.get_many(["retried", "broken", "pg_only", "nowhere"])

    assert found == {"retried": b"s3 after retry", "broken": b"pg copy", "pg_only": b"pg value"}
    assert s3.gets == Counter(
        {"retried": 2, "broken": FAST_RETRY.max_attempts, "pg_only": 1, "nowhere": 1}
    )
    assert pg.queries == [["broken", "pg_only", "nowhere"]]  # one query, only what S3 lacked
    # Written back: a key S3 said it lacks, not one S3 failed to read.
    assert sink.offers == [(Backend.S3, "pg_only", b"pg value")]


async def test_a_bulk_read_matches_single_reads_key_by_key() -> None:
    cache, s3, pg, sink = persister("S3Primary")
    s3.values["s3"] = b"1"
    s3.always["broken"] = throttled("broken")
    pg.values |= {"broken": b"2", "pg": b"3"}
    singles = {key: await cache.get(key) for key in ["s3", "broken", "pg", "nowhere"]}
    single_offers, sink.offers = sink.offers, []
    pg.queries.clear()

    bulk = await cache.get_many(singles)

    assert bulk == {key: value for key, value in singles.items() if value is not None}
    assert sink.offers == single_offers == [(Backend.S3, "pg", b"3")]
    assert pg.queries == [["broken", "pg", "nowhere"]]


async def test_a_key_no_answering_backend_has_fails_the_read_with_its_first_error() -> None:
    cache, s3, pg, _ = persister("S3Primary")
    s3.values["fine"] = b"1"
    failure = throttled("lost")
    s3.always["lost"] = failure
    with pytest.raises(StorageError) as raised:
        await cache.get_many(["fine", "lost"])  # Postgres answered: it has no "lost"
    assert raised.value is failure

    pg.down = StorageError("connection refused", kind=ErrorKind.TRANSIENT)
    with pytest.raises(StorageError) as raised:
        await cache.get_many(["lost"])
    assert raised.value is failure  # the first in read order, as for single reads


async def test_s3_only_with_s3_down_raises_one_storage_error_not_a_group() -> None:
    cache, s3, _, sink = persister("S3Only")
    s3.values |= {f"k{index}": b"v" for index in range(40)}
    s3.down = throttled("any")
    with pytest.raises(StorageError) as raised:
        await cache.get_many(list(s3.values))
    assert raised.value.kind is ErrorKind.THROTTLED
    assert set(s3.gets.values()) == {FAST_RETRY.max_attempts}  # every key had its retries
    assert sink.offers == []


async def test_a_postgres_failure_is_every_keys_failure_and_is_retried_as_one_query() -> None:
    cache, s3, pg, _ = persister("S3Primary")
    s3.values["in_s3"] = b"1"
    pg.down = StorageError("connection refused", kind=ErrorKind.TRANSIENT)

    assert await cache.get_many(["in_s3"]) == {"in_s3": b"1"}  # Postgres is not asked
    assert pg.queries == []
    with pytest.raises(StorageError) as raised:
        await cache.get_many(["in_s3", "a", "b"])
    assert raised.value is pg.down
    assert pg.queries == [["a", "b"]] * FAST_RETRY.max_attempts


async def test_a_non_retryable_error_is_not_retried_but_still_falls_back() -> None:
    cache, s3, pg, sink = persister("S3Primary")
    s3.always["denied"] = StorageError("AccessDenied", kind=ErrorKind.ACCESS_DENIED)
    pg.values["denied"] = b"v"
    assert await cache.get_many(["denied"]) == {"denied": b"v"}
    assert s3.gets["denied"] == 1
    assert sink.offers == []


async def test_s3_bulk_reads_are_concurrent_and_bounded() -> None:
    layer = MemoryLayer()
    keys = [f"k{index}" for index in range(5 * S3_BULK_READ_CONCURRENCY)]
    layer.values = {key: key.encode() for key in keys[::2]}
    layer.faults = {key: [throttled(key)] for key in keys[::3]}

    read = await S3Store(cast(S3Layer, layer)).get_many(keys, FAST_RETRY)

    assert read.found == layer.values
    assert read.failed == {}
    assert layer.peak_in_flight == S3_BULK_READ_CONCURRENCY
    assert sum(layer.gets.values()) == len(keys) + len(keys[::3])
