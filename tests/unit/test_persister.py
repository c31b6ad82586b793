"""Persister routing over in-memory stores, and bulk reads key by key through the real
``S3Store``/``PgStore`` over in-memory layers with scripted faults (the write queue itself:
test_write_queue.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, SettingsError, StorageError
from layer_cache.persister import (
    ROUTES,
    S3_BULK_READ_CONCURRENCY,
    Backend,
    BulkRead,
    CachePersister,
    PersisterMode,
    PgStore,
    S3Store,
    Store,
)
from layer_cache.persister_metrics import PersisterMetrics
from layer_cache.pg import PgLayer
from layer_cache.retry import Backoff, RetryPolicy, call_with_retries
from layer_cache.s3 import S3Layer
from layer_cache_server.server import KEY_PATTERN, parse_socket_addr

NO_RETRY = RetryPolicy(max_attempts=1)
FAST_RETRY = RetryPolicy(max_attempts=3, backoff=Backoff(base_delay_s=0.001, max_delay_s=0.002))


class MemoryStore:
    """A Store in a dict; ``failing`` makes every call raise a transient error."""

    def __init__(self, backend: Backend, cache_type: CacheType = CacheType.CAS) -> None:
        self.backend = backend
        self.cache_type = cache_type
        self.cache_name = "cas"
        self.values: dict[str, bytes] = {}
        self.failing: StorageError | None = None
        self.fail_once = False
        self.puts = 0
        self.release = asyncio.Event()
        self.release.set()

    def _maybe_fail(self) -> None:
        failing = self.failing
        if failing is not None:
            if self.fail_once:
                self.failing = None
            raise failing

    async def get(self, key: str) -> bytes | None:
        self._maybe_fail()
        return self.values.get(key)

    async def get_many(self, keys: Sequence[str], policy: RetryPolicy) -> BulkRead:
        try:
            found = await call_with_retries(partial(self._get_many, keys), policy)
        except StorageError as exc:
            return BulkRead(found={}, failed=dict.fromkeys(keys, exc))
        return BulkRead(found=found, failed={})

    async def _get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        self._maybe_fail()
        return {key: self.values[key] for key in keys if key in self.values}

    async def size(self, key: str) -> int | None:
        self._maybe_fail()
        return len(self.values[key]) if key in self.values else None

    async def put(self, key: str, value: bytes) -> bool:
        self.puts += 1
        await self.release.wait()
        self._maybe_fail()
        if key in self.values:
            return False
        self.values[key] = value
        return True

    async def check(self) -> None:
        self._maybe_fail()


class RecordingSink:
    """The write queue's interface: ``enqueue`` delivers at once (or raises ``failing``); with
    ``deliver=False`` it only records, as a queue whose target is down."""

    def __init__(self, *, deliver: bool = True) -> None:
        self.offers: list[tuple[Backend, str, bytes]] = []
        self.enqueued: list[tuple[Backend, str]] = []
        self.failing: StorageError | None = None
        self.deliver = deliver

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        if self.failing is not None:
            raise self.failing
        self.enqueued.append((store.backend, key))
        if self.deliver:
            await store.put(key, value)

    def offer(self, store: Store, key: str, value: bytes) -> None:
        self.offers.append((store.backend, key, value))


def persister(mode: str) -> tuple[CachePersister, dict[Backend, MemoryStore], RecordingSink]:
    stores = {backend: MemoryStore(backend) for backend in Backend}
    sink = RecordingSink()
    return CachePersister(ROUTES[PersisterMode(mode)], stores, sink, policy=NO_RETRY), stores, sink


def transient() -> StorageError:
    return StorageError("connection reset", kind=ErrorKind.TRANSIENT)


def test_the_routing_table_has_exactly_the_settings_modes() -> None:
    assert set(ROUTES) == set(PersisterMode)
    assert all(ROUTES[mode].backends for mode in PersisterMode)


@pytest.mark.parametrize(
    ("mode", "written"),
    [
        ("PostgresOnly", {Backend.POSTGRES}),
        ("DualWrite", {Backend.POSTGRES, Backend.S3}),
        ("S3Primary", {Backend.POSTGRES, Backend.S3}),
        ("S3Only", {Backend.S3}),
    ],
)
async def test_put_writes_the_modes_targets_and_the_first_write_wins(
    mode: str, written: set[Backend]
) -> None:
    cache, stores, _ = persister(mode)
    assert await cache.put("ab", b"first")
    assert not await cache.put("ab", b"second")
    assert {backend for backend, store in stores.items() if store.values} == written
    assert all(store.values == {"ab": b"first"} for store in stores.values() if store.values)


async def test_put_is_created_only_when_new_to_every_target() -> None:
    cache, stores, _ = persister("DualWrite")
    stores[Backend.POSTGRES].values["ab"] = b"old"
    assert not await cache.put("ab", b"old")
    assert stores[Backend.S3].values == {"ab": b"old"}  # the missing target is filled


@pytest.mark.parametrize("mode", ["DualWrite", "S3Primary"])
async def test_s3_is_written_through_the_queue_and_only_postgres_on_the_request_path(
    mode: str,
) -> None:
    cache, stores, sink = persister(mode)
    assert await cache.put("ab", b"v")
    assert sink.enqueued == [(Backend.S3, "ab")]
    stores[Backend.S3].values.clear()
    assert not await cache.put("ab", b"v")  # "created" is Postgres's answer; S3 is queued again
    assert sink.enqueued == [(Backend.S3, "ab"), (Backend.S3, "ab")]
    assert stores[Backend.S3].values == {"ab": b"v"}


async def test_a_failed_enqueue_fails_the_put_after_postgres_finished() -> None:
    cache, stores, sink = persister("DualWrite")
    sink.failing = transient()
    with pytest.raises(StorageError):
        await cache.put("ab", b"v")
    assert stores[Backend.POSTGRES].values == {"ab": b"v"}


def persister_with_retry_queue(
    mode: str,
) -> tuple[CachePersister, dict[Backend, MemoryStore], RecordingSink, RecordingSink]:
    stores = {backend: MemoryStore(backend) for backend in Backend}
    sink, retries = RecordingSink(), RecordingSink(deliver=False)
    route = ROUTES[PersisterMode(mode)]
    cache = CachePersister(route, stores, sink, policy=NO_RETRY, retry_later=retries)
    return cache, stores, sink, retries


@pytest.mark.parametrize("mode", ["DualWrite", "S3Primary"])
@pytest.mark.parametrize(
    "kind", [ErrorKind.TRANSIENT, ErrorKind.THROTTLED, ErrorKind.ACCESS_DENIED]
)
async def test_a_postgres_failure_goes_to_the_retry_queue_once_s3_is_queued(
    mode: str, kind: ErrorKind
) -> None:
    cache, stores, sink, retries = persister_with_retry_queue(mode)
    stores[Backend.POSTGRES].failing = StorageError("connection refused", kind=kind)
    assert await cache.put("ab", b"v")  # acknowledged: S3's copy is durable, Postgres queued
    assert sink.enqueued == [(Backend.S3, "ab")]
    assert retries.enqueued == [(Backend.POSTGRES, "ab")]


async def test_a_postgres_failure_is_not_deferred_without_a_durable_copy_or_a_retryable_kind() -> (
    None
):
    cache, stores, _, retries = persister_with_retry_queue("PostgresOnly")
    stores[Backend.POSTGRES].failing = transient()
    with pytest.raises(StorageError):
        await cache.put("ab", b"v")  # nothing else holds the value
    cache, stores, _, retries = persister_with_retry_queue("DualWrite")
    stores[Backend.POSTGRES].failing = StorageError("value too long", kind=ErrorKind.OTHER)
    with pytest.raises(StorageError):
        await cache.put("ab", b"v")  # not a fault a retry or an operator fixes
    cache, stores, sink, retries = persister_with_retry_queue("DualWrite")
    stores[Backend.POSTGRES].failing = transient()
    sink.failing = transient()
    with pytest.raises(StorageError):
        await cache.put("ab", b"v")  # S3 was not queued either
    assert retries.enqueued == []


async def test_a_failed_retry_enqueue_fails_the_put_with_the_postgres_error() -> None:
    cache, stores, _, retries = persister_with_retry_queue("DualWrite")
    failure = transient()
    stores[Backend.POSTGRES].failing = failure
    retries.failing = StorageError("disk full", kind=ErrorKind.TRANSIENT)
    with pytest.raises(StorageError) as raised:
        await cache.put("ab", b"v")
    assert raised.value is failure


async def test_s3_only_writes_s3_on_the_request_path() -> None:
    cache, stores, sink = persister("S3Only")
    stores[Backend.S3].failing = transient()
    with pytest.raises(StorageError):
        await cache.put("ab", b"v")
    assert sink.enqueued == []


async def test_s3_primary_reads_s3_first_and_offers_a_postgres_hit_for_s3() -> None:
    cache, stores, sink = persister("S3Primary")
    stores[Backend.S3].values["s3"] = b"from s3"
    stores[Backend.POSTGRES].values |= {"s3": b"stale", "pg": b"from pg"}
    assert await cache.get("s3") == b"from s3"
    assert await cache.get("pg") == b"from pg"
    assert await cache.get("none") is None
    assert sink.offers == [(Backend.S3, "pg", b"from pg")]


async def test_bulk_reads_fill_only_the_keys_found_on_the_later_backend() -> None:
    cache, stores, sink = persister("S3Primary")
    stores[Backend.S3].values["a"] = b"1"
    stores[Backend.POSTGRES].values |= {"a": b"x", "b": b"2"}
    assert await cache.get_many(["a", "b", "c", "b"]) == {"a": b"1", "b": b"2"}
    assert sink.offers == [(Backend.S3, "b", b"2")]


async def test_a_failing_first_backend_falls_back_and_is_written_back_as_upstream_does() -> None:
    cache, stores, sink = persister("S3Primary")
    stores[Backend.S3].failing = transient()
    stores[Backend.POSTGRES].values["pg"] = b"v"
    assert await cache.get("pg") == b"v"
    assert await cache.get_many(["pg"]) == {"pg": b"v"}
    # A failed S3 read counts as a miss: the value is queued for S3 (a conditional PUT, so an
    # object S3 had but could not serve is left as it is).
    assert sink.offers == [(Backend.S3, "pg", b"v")] * 2


async def test_a_transient_fault_on_the_request_path_is_retried() -> None:
    stores = {backend: MemoryStore(backend) for backend in Backend}
    route = ROUTES[PersisterMode.S3_PRIMARY]
    cache = CachePersister(route, stores, RecordingSink(), policy=FAST_RETRY)
    stores[Backend.POSTGRES].failing, stores[Backend.POSTGRES].fail_once = transient(), True
    assert await cache.put("k", b"v")  # S3 is queued, not written on the request path
    assert stores[Backend.POSTGRES].puts == 2
    stores[Backend.S3].failing, stores[Backend.S3].fail_once = transient(), True
    assert await cache.get("k") == b"v"


async def test_a_miss_is_reported_only_when_every_backend_answered() -> None:
    cache, stores, _ = persister("S3Primary")
    stores[Backend.S3].failing = transient()
    with pytest.raises(StorageError):
        await cache.get("nowhere")
    with pytest.raises(StorageError):
        await cache.size("nowhere")
    with pytest.raises(StorageError):
        await cache.get_many(["nowhere"])


@pytest.mark.parametrize("mode", ["PostgresOnly", "DualWrite", "S3Only"])
async def test_single_backend_reads_never_write_back(mode: str) -> None:
    cache, stores, sink = persister(mode)
    for store in stores.values():
        store.values["k"] = b"v"
    assert await cache.get("k") == b"v"
    assert sink.offers == []


# ---------------------------------------------------------------------------------------------
# Server input rules


@pytest.mark.parametrize(
    "key",
    [
        "0123456789abcdef0123456789abcdef",  # xxh3-128 ContentHash, EncryptedSecretKey
        "0123456789abcdef" * 4,  # blake3 address
        "01HQ3Z6V8W9X0Y1Z2A3B4C5D6E",  # ULID
        "a",
        "A" * 128,
    ],
)
def test_the_key_rule_accepts_every_upstream_key_form(key: str) -> None:
    assert KEY_PATTERN.fullmatch(key)


@pytest.mark.parametrize("key", ["", "a" * 129, "a/b", "..", "ab-cd", "k\u00e9y", "a b", "a%2F"])
def test_the_key_rule_refuses_anything_that_could_bend_an_object_path(key: str) -> None:
    assert KEY_PATTERN.fullmatch(key) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:5156", ("0.0.0.0", 5156)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:5156", ("::", 5156)),
        ("localhost:8080", ("localhost", 8080)),
    ],
)
def test_socket_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_socket_addr(text) == expected


@pytest.mark.parametrize("text", ["5156", ":5156", "host:", "host:port", "host:70000", ""])
def test_bad_socket_addresses_name_the_setting(text: str) -> None:
    with pytest.raises(SettingsError, match="SI_SDF__SOCKET_ADDR"):
        parse_socket_addr(text)


# ---------------------------------------------------------------------------------------------
# Bulk reads key by key: the real S3Store/PgStore over in-memory layers with scripted faults


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


class ReadOnlySink:
    """A write queue that reads must never enqueue to; read-through offers are recorded."""

    def __init__(self) -> None:
        self.offers: list[tuple[Backend, str, bytes]] = []

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        raise AssertionError("reads never enqueue writes")

    def offer(self, store: Store, key: str, value: bytes) -> None:
        self.offers.append((store.backend, key, value))


def layered_persister(
    mode: str,
) -> tuple[CachePersister, MemoryLayer, MemoryLayer, ReadOnlySink]:
    s3, pg = MemoryLayer(), MemoryLayer()
    stores: dict[Backend, Store] = {
        Backend.S3: S3Store(cast(S3Layer, s3)),
        Backend.POSTGRES: PgStore(cast(PgLayer, pg)),
    }
    sink = ReadOnlySink()
    route = ROUTES[PersisterMode(mode)]
    return CachePersister(route, stores, sink, policy=FAST_RETRY), s3, pg, sink


async def test_s3_primary_retries_each_key_then_falls_back_to_postgres_per_key() -> None:
    cache, s3, pg, sink = layered_persister("S3Primary")
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
    # Written back: a key S3 said it lacks, and one S3 failed to read (a miss, as upstream).
    assert sink.offers == [
        (Backend.S3, "broken", b"pg copy"),
        (Backend.S3, "pg_only", b"pg value"),
    ]


async def test_a_bulk_read_matches_single_reads_key_by_key() -> None:
    cache, s3, pg, sink = layered_persister("S3Primary")
    s3.values["s3"] = b"1"
    s3.always["broken"] = throttled("broken")
    pg.values |= {"broken": b"2", "pg": b"3"}
    singles = {key: await cache.get(key) for key in ["s3", "broken", "pg", "nowhere"]}
    single_offers, sink.offers = sink.offers, []
    pg.queries.clear()

    bulk = await cache.get_many(singles)

    assert bulk == {key: value for key, value in singles.items() if value is not None}
    assert sink.offers == single_offers == [(Backend.S3, "broken", b"2"), (Backend.S3, "pg", b"3")]
    assert pg.queries == [["broken", "pg", "nowhere"]]


async def test_a_key_no_answering_backend_has_fails_the_read_with_its_first_error() -> None:
    cache, s3, pg, _ = layered_persister("S3Primary")
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
    cache, s3, _, sink = layered_persister("S3Only")
    s3.values |= {f"k{index}": b"v" for index in range(40)}
    s3.down = throttled("any")
    with pytest.raises(StorageError) as raised:
        await cache.get_many(list(s3.values))
    assert raised.value.kind is ErrorKind.THROTTLED
    assert set(s3.gets.values()) == {FAST_RETRY.max_attempts}  # every key had its retries
    assert sink.offers == []


async def test_a_postgres_failure_is_every_keys_failure_and_is_retried_as_one_query() -> None:
    cache, s3, pg, _ = layered_persister("S3Primary")
    s3.values["in_s3"] = b"1"
    pg.down = StorageError("connection refused", kind=ErrorKind.TRANSIENT)

    assert await cache.get_many(["in_s3"]) == {"in_s3": b"1"}  # Postgres is not asked
    assert pg.queries == []
    with pytest.raises(StorageError) as raised:
        await cache.get_many(["in_s3", "a", "b"])
    assert raised.value is pg.down
    assert pg.queries == [["a", "b"]] * FAST_RETRY.max_attempts


async def test_a_non_retryable_error_is_not_retried_but_still_falls_back() -> None:
    cache, s3, pg, sink = layered_persister("S3Primary")
    s3.always["denied"] = StorageError("AccessDenied", kind=ErrorKind.ACCESS_DENIED)
    pg.values["denied"] = b"v"
    assert await cache.get_many(["denied"]) == {"denied": b"v"}
    assert s3.gets["denied"] == 1
    assert sink.offers == [(Backend.S3, "denied", b"v")]  # the write queue holds it until fixed


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


# --------------------------------------------------------------------------------------------
# Upstream's read and write series (layer_cache.persister_metrics)


def measured(mode: str) -> tuple[CachePersister, dict[Backend, MemoryStore], InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    metrics = PersisterMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    stores = {backend: MemoryStore(backend) for backend in Backend}
    cache = CachePersister(
        ROUTES[PersisterMode(mode)], stores, RecordingSink(), policy=NO_RETRY, metrics=metrics
    )
    return cache, stores, reader


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    """Sorted attribute items → value (a histogram's count), for one instrument."""
    data = reader.get_metrics_data()
    found: dict[tuple[tuple[str, Any], ...], float] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        value: float = point.count
                    else:
                        assert isinstance(point, NumberDataPoint)
                        value = point.value
                    found[tuple(sorted((point.attributes or {}).items()))] = value
    return found


def labelled(**attributes: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(attributes.items()))


async def test_s3_primary_reads_count_each_backend_and_the_fallback_as_upstream() -> None:
    cache, stores, reader = measured("S3Primary")
    stores[Backend.POSTGRES].values.update({"a": b"1", "b": b"2"})
    stores[Backend.S3].values["c"] = b"3"
    assert await cache.get("a") == b"1"  # S3 miss, Postgres hit
    assert await cache.get_many(["b", "c", "d"]) == {"b": b"2", "c": b"3"}

    resolved = points(reader, "layer_cache_backend_resolved")
    assert resolved == {
        labelled(cache_name="cas", backend="s3", result="miss"): 1 + 2,
        labelled(cache_name="cas", backend="s3", result="hit"): 1,
        labelled(cache_name="cas", backend="postgres", result="hit"): 1 + 1,
        labelled(cache_name="cas", backend="postgres", result="miss"): 1,
    }
    # Each read's time, once per result it had (a bulk read is one read).
    assert points(reader, "layer_cache_read_latency_ms") == {
        labelled(cache_name="cas", backend="s3", result="miss"): 1 + 1,
        labelled(cache_name="cas", backend="s3", result="hit"): 1,
        labelled(cache_name="cas", backend="postgres", result="hit"): 1 + 1,
        labelled(cache_name="cas", backend="postgres", result="miss"): 1,
    }
    assert points(reader, "layer_cache_read_fallback") == {
        labelled(cache_name="cas", from_backend="s3", to_backend="postgres"): 1 + 2
    }


async def test_a_failed_read_is_no_hit_or_miss_but_still_a_fallback() -> None:
    cache, stores, reader = measured("S3Primary")
    stores[Backend.S3].failing = transient()
    stores[Backend.POSTGRES].values["a"] = b"1"
    assert await cache.get("a") == b"1"
    assert points(reader, "layer_cache_backend_resolved") == {
        labelled(cache_name="cas", backend="postgres", result="hit"): 1
    }
    assert sum(points(reader, "layer_cache_read_fallback").values()) == 1


async def test_writes_count_attempts_successes_and_failures_by_upstreams_kind() -> None:
    cache, stores, reader = measured("S3Only")
    assert await cache.put("a", b"1")
    stores[Backend.S3].failing = transient()
    with pytest.raises(StorageError):
        await cache.put("b", b"2")
    stores[Backend.S3].failing = StorageError("refused", kind=ErrorKind.OTHER)
    with pytest.raises(StorageError):
        await cache.put("c", b"3")

    kind = {"cache_name": "cas", "backend": "s3", "event_kind": "cas_insertion"}
    assert points(reader, "layer_cache_persister_write_attempted") == {labelled(**kind): 3}
    success = {labelled(cache_name="cas", backend="s3"): 1}
    assert points(reader, "layer_cache_persister_write_success_total") == success
    assert points(reader, "layer_cache_persister_write_success") == success  # the bare name too
    for name, error in (("retryable", "transient"), ("permanent", "other")):
        failed = {labelled(**kind, error_kind=error): 1}
        assert points(reader, f"layer_cache_persister_write_failed_{name}_total") == failed
        assert points(reader, f"layer_cache_persister_write_failed_{name}") == failed
    durations = points(reader, "layer_cache_persister_write_duration_ms")
    assert durations == {
        labelled(**kind, status="success"): 1,
        labelled(**kind, status="error"): 2,
    }
    assert points(reader, "layer_cache_persistence_latency_seconds") == {
        labelled(**kind, operation="write"): 1
    }
    assert points(reader, "layer_cache_persister_pg_error") == {}  # Postgres only


async def test_a_dual_write_counts_postgres_directly_and_s3_once_queued() -> None:
    cache, stores, reader = measured("DualWrite")
    assert await cache.put("a", b"1")
    stores[Backend.POSTGRES].failing = StorageError("refused", kind=ErrorKind.OTHER)
    with pytest.raises(StorageError):
        await cache.put("b", b"2")

    assert points(reader, "layer_cache_persister_write_attempted") == {
        labelled(cache_name="cas", backend="postgres", event_kind="cas_insertion"): 2
    }
    assert points(reader, "layer_cache_persister_write_success_total") == {
        labelled(cache_name="cas", backend="postgres"): 1,
        labelled(cache_name="cas", backend="s3"): 2,
    }
    written = {"cache_name": "cas", "event_kind": "cas_insertion", "backend": "postgres"}
    assert points(reader, "layer_cache_persister_event_by_kind") == {labelled(**written): 2}
    assert points(reader, "layer_cache_persister_pg_error") == {
        labelled(**written, operation="write"): 1
    }


class DeletingLayer:
    """What ``PgStore.delete`` calls on a workspace_snapshots layer; ``failing`` raises."""

    def __init__(self) -> None:
        self.spec = CACHE_SPECS[CacheType.WORKSPACE_SNAPSHOT]
        self.failing: StorageError | None = None

    async def delete(self, key: str) -> bool:
        if self.failing is not None:
            raise self.failing
        return False


async def test_an_evict_is_timed_and_a_failed_one_is_a_postgres_error() -> None:
    layer = DeletingLayer()
    reader = InMemoryMetricReader()
    metrics = PersisterMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    cache = CachePersister(
        ROUTES[PersisterMode.POSTGRES_ONLY],
        {Backend.POSTGRES: PgStore(cast(PgLayer, layer))},
        RecordingSink(),
        policy=NO_RETRY,
        metrics=metrics,
    )
    assert await cache.evict("a") is False
    layer.failing = transient()
    with pytest.raises(StorageError):
        await cache.evict("b")
    evicted = {"cache_name": "workspace_snapshots", "backend": "postgres"}
    evicted |= {"event_kind": "snapshot_evict", "operation": "evict"}
    assert points(reader, "layer_cache_persistence_latency_seconds") == {labelled(**evicted): 1}
    assert points(reader, "layer_cache_persister_pg_error") == {labelled(**evicted): 1}
