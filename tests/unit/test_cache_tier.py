"""The cache tier: memory held within its byte budget (the per-entry overheads are measured
here), oversized values bypassing it, evicts and the fills they race, and the disk tier's files:
whole or not served, rebuilt after a restart, bounded, giving way to the write queue."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from layer_cache.cache_tier import (
    MEMORY_ENTRY_OVERHEAD_BYTES,
    CacheTier,
    HeapTrimmer,
    TieredPersister,
    _malloc_trim,
    memory_weight,
)
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.disk_tier import (
    BLOCK_BYTES,
    HEADER,
    TEMP_SUFFIX,
    DiskTier,
    capacity_for_free_space,
    charged_bytes,
    decode,
    encode,
)
from layer_cache.errors import CacheTierUnavailable
from layer_cache.persister import ROUTES, Backend, CachePersister, PersisterMode
from layer_cache.persister_metrics import PersisterMetrics
from tests.unit.test_persister import NO_RETRY, MemoryStore, RecordingSink

CAS = CacheType.CAS
SNAPSHOT = CacheType.WORKSPACE_SNAPSHOT
MIB = 1024 * 1024


def key(number: int) -> str:
    return f"{number:064x}"


def test_the_memory_tier_holds_no_more_than_its_budget_with_its_ghosts_full() -> None:
    budget = 4 * MIB
    gc.collect()
    tracemalloc.start()
    try:
        tier = CacheTier(budget)
        for number in range(60_000):  # far more than fit: every policy queue and the ghost fill
            tier.add(CAS, key(number), os.urandom(100), since=0)
        gc.collect()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tier.memory_weight <= budget
    assert held <= budget  # the measured cost is within what each entry is charged
    assert held >= 0.7 * budget  # and not grossly over-charged
    assert memory_weight(key(1), b"x" * 100) == 100 + 64 + MEMORY_ENTRY_OVERHEAD_BYTES


def test_the_disk_index_costs_at_most_its_charge_per_entry(tmp_path: Path) -> None:
    entries = 20_000
    gc.collect()
    tracemalloc.start()
    try:
        disk = DiskTier(tmp_path, entries // 2 * BLOCK_BYTES, policy="s3fifo")
        for number in range(entries):  # half are evicted: the ghost fills too
            disk._index_put((SNAPSHOT, key(number)), 100)
        disk._ops.clear()  # the deletes that would run: not the index's memory
        gc.collect()
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(disk) == entries // 2
    assert held <= disk.index_bytes


def test_a_value_over_the_entry_share_bypasses_the_tier() -> None:
    tier = CacheTier(100_000, max_entry_percent=10)
    tier.add(CAS, "big", b"x" * 10_001, since=0)
    tier.add(CAS, "fits", b"x" * 9_000, since=0)
    assert tier.size(CAS, "big") is None
    assert tier.size(CAS, "fits") == 9_000


async def test_values_come_back_per_cache_type() -> None:
    tier = CacheTier(MIB)
    tier.add(CAS, "k", b"cas value", since=0)
    tier.add(SNAPSHOT, "k", b"snapshot value", since=0)
    assert await tier.get(CAS, "k") == b"cas value"
    assert await tier.get_many(SNAPSHOT, ["k", "absent"]) == {"k": b"snapshot value"}


async def test_evict_removes_and_a_fill_that_started_before_it_is_dropped() -> None:
    tier = CacheTier(MIB)
    tier.add(CAS, "k", b"v", since=tier.generation)
    since = tier.generation  # a read starts here and finds "k" in a backend
    await tier.evict(CAS, "k")
    tier.add(CAS, "k", b"v", since=since)  # its fill arrives after the evict
    assert await tier.get(CAS, "k") is None
    tier.add(CAS, "k", b"v", since=tier.generation)  # a read after the evict may fill
    assert await tier.get(CAS, "k") == b"v"


async def test_a_tier_of_size_zero_holds_nothing() -> None:
    tier = CacheTier(0)
    tier.add(CAS, "k", b"v", since=0)
    assert not tier.enabled
    assert await tier.get(CAS, "k") is None


# ------------------------------------------------------------------------------------------
# The disk tier


def test_the_file_format_refuses_anything_not_whole() -> None:
    stored = encode(b"value")
    assert decode(stored) == b"value"
    assert decode(stored[:-1]) is None  # torn
    assert decode(stored + b"x") is None  # longer
    assert decode(stored[:-1] + b"V") is None  # same length, other bytes
    assert decode(b"XXXX" + stored[4:]) is None  # not ours
    assert decode(b"") is None


def test_charges_are_whole_blocks_and_the_free_space_rule() -> None:
    assert charged_bytes(1, 0) == BLOCK_BYTES
    assert charged_bytes(BLOCK_BYTES + 1, 0) == 2 * BLOCK_BYTES
    assert charged_bytes(1, 3 * BLOCK_BYTES) == 3 * BLOCK_BYTES
    assert capacity_for_free_space(1000, used=300, free=500, reserve_free_bytes=100) == 700
    assert capacity_for_free_space(1000, used=300, free=50, reserve_free_bytes=100) == 250
    assert capacity_for_free_space(1000, used=0, free=0, reserve_free_bytes=100) == 0
    assert capacity_for_free_space(1000, used=900, free=10**9, reserve_free_bytes=0) == 1000


async def opened(directory: Path, capacity: int = 100 * BLOCK_BYTES, **options: object) -> DiskTier:
    disk = DiskTier(directory, capacity, policy="s3fifo", **options)  # type: ignore[arg-type]
    disk.open()
    await disk.idle()
    return disk


async def test_a_written_value_is_read_back_from_its_file(tmp_path: Path) -> None:
    disk = await opened(tmp_path)
    try:
        assert disk.admit((CAS, "abcdef"), b"value", disk.generation)
        await disk.idle()
        path = tmp_path / CACHE_SPECS[CAS].table / "ab" / "abcdef"
        assert path.read_bytes()[HEADER.size :] == b"value"
        assert await disk.read_many([(CAS, "abcdef"), (CAS, "absent")]) == {
            (CAS, "abcdef"): b"value"
        }
    finally:
        await disk.close()


@pytest.mark.parametrize("damage", ["torn", "flipped"])
async def test_a_damaged_file_is_never_served_and_is_deleted(tmp_path: Path, damage: str) -> None:
    disk = await opened(tmp_path)
    try:
        disk.admit((CAS, "abcdef"), b"the value", disk.generation)
        await disk.idle()
        path = tmp_path / "cas" / "ab" / "abcdef"
        stored = path.read_bytes()
        path.write_bytes(stored[:-3] if damage == "torn" else stored[:-1] + b"X")
        assert await disk.read_many([(CAS, "abcdef")]) == {}
        await disk.idle()
        assert not path.exists()
        assert (CAS, "abcdef") not in disk
    finally:
        await disk.close()


async def test_entries_survive_a_restart_and_leftover_temporary_files_go(tmp_path: Path) -> None:
    disk = await opened(tmp_path)
    disk.admit((SNAPSHOT, "aa11"), b"kept", disk.generation)
    await disk.idle()
    await disk.close()
    leftover = tmp_path / "workspace_snapshots" / "aa" / f"aa22.123{TEMP_SUFFIX}"
    leftover.write_bytes(b"half a write")
    again = await opened(tmp_path)
    try:
        assert await again.read_many([(SNAPSHOT, "aa11")]) == {(SNAPSHOT, "aa11"): b"kept"}
        assert not leftover.exists()
        assert len(again) == 1
    finally:
        await again.close()


async def test_the_files_stay_within_the_capacity(tmp_path: Path) -> None:
    disk = await opened(tmp_path, capacity=10 * BLOCK_BYTES)
    try:
        for number in range(40):
            disk.admit((CAS, key(number)), os.urandom(1000), disk.generation)
            await disk.idle()
        files = [path for path in (tmp_path / "cas").rglob("*") if path.is_file()]
        assert len(files) == len(disk) <= 10
        assert disk.weight <= disk.capacity
    finally:
        await disk.close()


async def test_remove_deletes_the_file_and_a_write_queued_before_is_never_indexed(
    tmp_path: Path,
) -> None:
    disk = await opened(tmp_path)
    try:
        disk.admit((CAS, "abcdef"), b"v", disk.generation)
        await disk.idle()
        disk.admit((CAS, "ab1234"), b"w", disk.generation)  # still queued when the evict comes
        await disk.remove((CAS, "abcdef"))
        assert not (tmp_path / "cas" / "ab" / "abcdef").exists()
        await disk.remove((CAS, "ab1234"))
        await disk.idle()
        assert (CAS, "ab1234") not in disk
        assert not (tmp_path / "cas" / "ab" / "ab1234").exists()
    finally:
        await disk.close()


async def test_the_tier_gives_way_when_the_volume_runs_short(tmp_path: Path) -> None:
    free = {"bytes": 10**9}
    disk = await opened(
        tmp_path, reserve_free_bytes=MIB, free_space=lambda directory: free["bytes"]
    )
    try:
        for number in range(5):
            disk.admit((CAS, key(number)), b"v", disk.generation)
        await disk.idle()
        assert len(disk) == 5
        free["bytes"] = MIB  # the write queue took the room: nothing more is written
        assert disk.admit((CAS, key(9)), b"v", disk.generation)
        await disk.idle()
        assert (CAS, key(9)) not in disk
        assert disk.capacity == disk.weight  # cut to what it holds: it takes no more
    finally:
        await disk.close()


async def test_admission_is_rate_limited_and_buffered(tmp_path: Path) -> None:
    disk = await opened(tmp_path, admission_bytes_per_s=1000)
    try:
        assert disk.admit((CAS, "a1"), b"x" * 800, disk.generation)
        assert not disk.admit((CAS, "a2"), b"x" * 800, disk.generation)
    finally:
        await disk.close()
    buffered = await opened(tmp_path / "b", buffer_bytes=1000)
    try:
        assert buffered.admit((CAS, "a1"), b"x" * 800, buffered.generation)
        assert not buffered.admit((CAS, "a2"), b"x" * 800, buffered.generation)
    finally:
        await buffered.close()


async def test_an_unwritable_directory_is_one_line_naming_the_settings(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    disk = DiskTier(blocker / "cache", BLOCK_BYTES * 10, policy="s3fifo")
    with pytest.raises(CacheTierUnavailable, match="CACHE_CONFIG__DISK_PATH"):
        disk.open()


async def test_a_memory_miss_reads_disk_and_promotes_evict_clears_both(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path, 100 * BLOCK_BYTES, policy="s3fifo")
    tier = CacheTier(MIB, disk=disk)
    tier.start()
    try:
        await disk.idle()
        tier.add(CAS, "abcdef", b"value", since=tier.generation)
        await disk.idle()
        tier._memory.pop((CAS, "abcdef"))  # as if memory had evicted it
        assert await tier.get(CAS, "abcdef") == b"value"
        assert tier.size(CAS, "abcdef") == 5  # promoted
        await tier.evict(CAS, "abcdef")
        assert await tier.get(CAS, "abcdef") is None
        assert not (tmp_path / "cas" / "ab" / "abcdef").exists()
        assert tier.memory_weight <= MIB
    finally:
        await tier.close()


async def test_the_heap_is_trimmed_once_a_share_of_the_budget_was_evicted() -> None:
    calls: list[int] = []

    def trim(pad: int) -> int:
        calls.append(pad)
        return 1

    trimmer = HeapTrimmer(1000, trim)
    trimmer.freed(600)
    assert calls == []
    trimmer.freed(600)  # 1,200 bytes freed: one trim, on a thread
    await trimmer.close()
    assert calls == [0]
    trimmer.freed(999)
    await trimmer.close()
    assert calls == [0]


def test_this_platforms_c_library_can_trim() -> None:
    assert _malloc_trim() is not None  # glibc, as in the image (python:slim is Debian)


async def test_a_second_write_of_a_key_never_puts_its_bytes_in_the_tier() -> None:
    stores = {Backend.POSTGRES: MemoryStore(Backend.POSTGRES)}
    persister = CachePersister(
        ROUTES[PersisterMode.POSTGRES_ONLY], stores, RecordingSink(), policy=NO_RETRY
    )
    tier = CacheTier(MIB)
    tiered = TieredPersister(persister, tier, CAS)
    assert await tiered.put("k", b"first")
    await tier.discard(CAS, "k")  # as if the tier had evicted it under pressure
    assert not await tiered.put("k", b"second")  # the key exists: the first value stays
    assert await tiered.get("k") == b"first"
    assert await tier.get(CAS, "k") == b"first"  # the read filled it with the stored bytes


async def test_the_tier_counts_upstreams_foyer_series_and_prometheus_keeps_their_names() -> None:
    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    meter = provider.get_meter("test")
    stores = {Backend.POSTGRES: MemoryStore(Backend.POSTGRES, SNAPSHOT)}
    stores[Backend.POSTGRES].cache_name = "workspace_snapshots"
    stores[Backend.POSTGRES].values["b"] = b"2"
    persister = CachePersister(
        ROUTES[PersisterMode.POSTGRES_ONLY],
        stores,
        RecordingSink(),
        policy=NO_RETRY,
        metrics=PersisterMetrics(meter),
    )
    tier = CacheTier(MIB, meter=meter)
    tiered = TieredPersister(persister, tier, SNAPSHOT)
    assert await tiered.put("a", b"1")
    assert await tiered.get("a") == b"1"  # a tier hit
    assert await tiered.get("b") == b"2"  # a tier miss, a Postgres hit
    assert await tiered.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    await tiered.evict("a")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if "otel_scope_name" in sample.labels
    }
    provider.shutdown()

    def value(name: str, **labels: str) -> float:
        found = {
            key: v
            for key, v in samples.items()
            if key[0] == name and labels.items() <= dict(key[1]).items()
        }
        return sum(found.values())

    table = {"cache_name": "workspace_snapshots"}
    assert value("layer_cache_requests_total", **table) == 2 + 3
    foyer = table | {"backend": "foyer"}
    assert value("layer_cache_backend_resolved_total", **foyer, result="hit", tier="memory") == 3
    # As upstream, a tier miss is no "not found": only the backends' misses are.
    assert value("layer_cache_backend_resolved_total", **foyer, result="miss") == 0
    assert value("layer_cache_read_latency_ms_count", **foyer, result="miss") == 2
    assert value("layer_cache_backend_resolved_total", **table, result="miss") == 1  # "c"
    assert value("layer_cache_request_latency_ms_count", **table, result="hit") == 2
    # No unit on a histogram named ..._ms: Prometheus would make it ..._ms_milliseconds.
    assert value("layer_cache_evict_duration_ms_count", **table, backend="foyer") == 1
    assert value("layer_cache_evict_duration_ms_count", **table, backend="postgres") == 1
    assert not [name for name, _labels in samples if "milliseconds" in name]
