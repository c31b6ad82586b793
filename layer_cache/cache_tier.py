"""The cache tier in front of every persister mode: memory, then local disk, then the backends.

Content is addressed by hash and never changes under a key, so the tier needs no invalidation:
an entry leaves when its policy evicts it (``layer_cache.eviction``, S3-FIFO by default, chosen
by measurement: docs/performance.md) or when the evict route removes it. One tier serves every
cache type (keys are ``(cache type, key)``), so memory follows the traffic instead of a fixed
split per cache (upstream gives each cache its own share, 1 % to 50 %).

* **Memory** (``memory_bytes``): each entry costs its value plus ``MEMORY_ENTRY_OVERHEAD_BYTES``
  and its key (measured); the disk tier's index is charged here too, so the process holds at
  most ``memory_bytes`` for the tier whatever the mix.
* **Disk** (optional, ``layer_cache.disk_tier``): every value the memory tier takes is also
  written to disk in the background; a memory miss looks there and a disk hit is promoted back.

Writes (after every target took them) and read-through fills populate both; a value larger than
``max_entry_percent`` of a tier bypasses that tier. Reads never fail because of the tier: a
damaged disk file is a miss. ``evict`` removes a key from both tiers; a fill whose backend read
started before an evict is dropped (``generation``), so an evicted value never comes back from a
read that raced the evict. ``TieredPersister`` wraps a ``CachePersister`` with the tier: what the
server serves. The tier owns no task but the disk tier's (``start``/``close``).

Metrics (upstream's names, ``layer_cache.persister_metrics``; ``backend="foyer"`` is upstream's
name for its memory/disk cache, the one its dashboard filters on; ``tier`` says which of ours
answered): per lookup, ``layer_cache_read_latency_ms{cache_name, backend="foyer", result, tier}``
and for a hit ``layer_cache_backend_resolved{cache_name, backend="foyer", result="hit", tier}``;
``TieredPersister`` counts ``layer_cache_requests_total`` per key and, per GET,
``layer_cache_request_latency_ms{cache_name, result}``. Per evict ``layer_cache_evictions``,
``layer_cache_eviction_failures`` and the histogram ``layer_cache_evict_duration_ms``
``{cache_name, backend="foyer"|"postgres"}`` (no unit: Prometheus would append
``_milliseconds``); gauges ``layer_cache_tier_bytes``, ``layer_cache_tier_entries`` and
``layer_cache_tier_capacity_bytes`` ``{tier="memory"|"disk"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.disk_tier import DiskKey, DiskTier
from layer_cache.errors import StorageError
from layer_cache.eviction import DEFAULT_POLICY, EvictionPolicy, make_policy
from layer_cache.instruments import ms_histogram
from layer_cache.persister import Backend, CachePersister
from layer_cache.persister_metrics import TIER_BACKEND, PersisterMetrics

MEMORY_ENTRY_OVERHEAD_BYTES = 700
"""Memory one entry costs beyond its value bytes and key characters: the policy's structures,
the key tuple and string, the bytes object's header and a ghost slot (measured by
tests/unit/test_cache_tier.py)."""
DEFAULT_MAX_ENTRY_PERCENT = 10.0

EVICTIONS_METRIC = "layer_cache_evictions"
EVICTION_FAILURES_METRIC = "layer_cache_eviction_failures"
EVICT_DURATION_METRIC = "layer_cache_evict_duration_ms"


TRIM_EVERY_SHARE = 0.05
"""Heap pages are given back once this share of the memory budget has been evicted."""


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    return trim


class HeapTrimmer:
    """Gives the heap's free pages back to the system once enough values were evicted.

    Evicted values of mixed sizes leave holes in the C heap that the process's RSS keeps
    counting: measured under the server's mixed load, RSS grew 1.4 bytes per byte the tier held
    without trimming and 1.0 with it (docs/performance.md). ``malloc_trim(0)`` releases every
    free page, not only the heap's top; it runs on a thread (ctypes releases the GIL), one at a
    time, so the event loop never waits for it.
    """

    def __init__(self, every_bytes: int, trim: Callable[[int], int] | None = None) -> None:
        self.every_bytes = every_bytes
        self._trim = trim
        self._freed = 0
        self._running: asyncio.Future[int] | None = None
        self.trims = 0

    def freed(self, amount: int) -> None:
        """Count evicted bytes; start a trim when enough were freed and none runs."""
        if self._trim is None:
            return
        self._freed += amount
        if self._freed < self.every_bytes or self._running is not None:
            return
        self._freed = 0
        self.trims += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous caller): trim here
            self._trim(0)
            return
        self._running = loop.run_in_executor(None, self._trim, 0)
        self._running.add_done_callback(self._done)

    def _done(self, _future: asyncio.Future[int]) -> None:
        self._running = None

    async def close(self) -> None:
        """Wait for a trim that runs."""
        if self._running is not None:
            with contextlib.suppress(OSError):
                await self._running


def memory_weight(key: str, value: bytes) -> int:
    """What one value costs the memory tier."""
    return len(value) + len(key) + MEMORY_ENTRY_OVERHEAD_BYTES


class CacheTier:
    """Memory then disk, bounded in bytes; see the module docstring."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        policy: str = DEFAULT_POLICY,
        max_entry_percent: float = DEFAULT_MAX_ENTRY_PERCENT,
        disk: DiskTier | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.memory_bytes = memory_bytes
        self.max_entry_percent = max_entry_percent
        self._memory: EvictionPolicy[DiskKey, bytes] = make_policy(policy, memory_bytes)
        self.disk = disk
        self.trimmer = HeapTrimmer(max(1, int(memory_bytes * TRIM_EVERY_SHARE)), _malloc_trim())
        self.generation = 0
        """Bumped by every evict: a fill that saw another value started before it is dropped."""
        self.metrics = PersisterMetrics(meter)
        self._evictions = None if meter is None else meter.create_counter(EVICTIONS_METRIC)
        self._eviction_failures = (
            None if meter is None else meter.create_counter(EVICTION_FAILURES_METRIC)
        )
        self._evict_duration = (
            None
            if meter is None
            else ms_histogram(meter, EVICT_DURATION_METRIC, "time of one evict, per backend")
        )
        if meter is not None:
            for name, read in (
                ("layer_cache_tier_bytes", self._observe_bytes),
                ("layer_cache_tier_entries", self._observe_entries),
                ("layer_cache_tier_capacity_bytes", self._observe_capacity),
            ):
                meter.create_observable_gauge(name, callbacks=[read])

    @property
    def enabled(self) -> bool:
        """False when the tier holds nothing (memory size 0)."""
        return self.memory_bytes > 0

    @property
    def memory_weight(self) -> int:
        """Bytes charged to the memory tier (values, overheads, the disk index)."""
        return self._memory.weight + (self.disk.index_bytes if self.disk else 0)

    def __len__(self) -> int:
        return len(self._memory)

    def start(self) -> None:
        """Open the disk tier (``CacheTierUnavailable`` if its directory is unusable)."""
        if self.disk is not None:
            self.disk.open()

    async def close(self) -> None:
        """Stop the disk tier's threads (what evicts asked for is deleted first)."""
        if self.disk is not None:
            await self.disk.close()
        await self.trimmer.close()

    # ---------------------------------------------------------------------------------------
    # Reads

    def size(self, cache_type: CacheType, key: str) -> int | None:
        """The value's size if memory holds it (no access recorded, no disk read)."""
        value = self._memory.peek((cache_type, key))
        return None if value is None else len(value)

    async def get(self, cache_type: CacheType, key: str) -> bytes | None:
        """The value from memory, else from disk (then promoted to memory), else None."""
        found = await self.get_many(cache_type, (key,))
        return found.get(key)

    async def get_many(self, cache_type: CacheType, keys: Sequence[str]) -> dict[str, bytes]:
        """Every key the tier holds, memory first; the disk's are read in one thread hop."""
        if not self.enabled:
            return {}
        started = time.perf_counter()
        found: dict[str, bytes] = {}
        missed: list[DiskKey] = []
        for key in keys:
            value = self._memory.get((cache_type, key))
            if value is None:
                missed.append((cache_type, key))
            else:
                found[key] = value
        self._count(cache_type, "memory", started, hits=len(found))
        if missed and self.disk is not None:
            from_disk = await self.disk.read_many(missed)
            for (_, key), value in from_disk.items():
                found[key] = value
                self._hold((cache_type, key), value)
            self._count(cache_type, "disk", started, hits=len(from_disk))
        last = "memory" if self.disk is None else "disk"
        self._count(cache_type, last, started, misses=len(keys) - len(found))
        return found

    # ---------------------------------------------------------------------------------------
    # Writes, fills, evicts

    def add(self, cache_type: CacheType, key: str, value: bytes, *, since: int) -> None:
        """Hold a value a backend stored or returned, unless an evict ran since ``since`` (the
        ``generation`` read before the backend call) or it is larger than a tier's share."""
        if not self.enabled or since != self.generation:
            return
        disk_key = (cache_type, key)
        self._hold(disk_key, value)
        if self.disk is not None and len(value) <= self._max_entry(self.disk.configured_capacity):
            self.disk.admit(disk_key, value, self.disk.generation)

    def _hold(self, key: DiskKey, value: bytes) -> None:
        if len(value) > self._max_entry(self.memory_bytes):
            return
        if self.disk is not None:  # the disk index is charged to the memory budget
            capacity = max(0, self.memory_bytes - self.disk.index_bytes)
            if capacity != self._memory.capacity:
                self.trimmer.freed(sum(len(old) for _, old in self._memory.resize(capacity)))
        evicted = self._memory.put(key, value, memory_weight(key[1], value))
        if evicted:
            self.trimmer.freed(sum(len(old) for _, old in evicted))

    def _max_entry(self, tier_bytes: int) -> float:
        return tier_bytes * self.max_entry_percent / 100

    async def evict(self, cache_type: CacheType, key: str) -> None:
        """Remove a key from memory and disk (returns once its file is deleted), counted."""
        started = time.perf_counter()
        await self.discard(cache_type, key)
        self.record_evict(cache_type, TIER_BACKEND, started, failed=False)

    async def discard(self, cache_type: CacheType, key: str) -> None:
        """Remove a key from memory and disk, and drop fills that started before now."""
        self.generation += 1
        self._memory.pop((cache_type, key))
        if self.disk is not None:
            await self.disk.remove((cache_type, key))

    def record_evict(
        self, cache_type: CacheType, backend: str, started: float, *, failed: bool
    ) -> None:
        """Count one evict on ``backend`` (upstream's eviction series)."""
        attributes = {"cache_name": CACHE_SPECS[cache_type].table, "backend": backend}
        if self._evict_duration is not None:
            self._evict_duration.record((time.perf_counter() - started) * 1000, attributes)
        counter = self._eviction_failures if failed else self._evictions
        if counter is not None:
            counter.add(1, attributes)

    # ---------------------------------------------------------------------------------------
    # Metrics

    def _count(
        self, cache_type: CacheType, tier: str, started: float, *, hits: int = 0, misses: int = 0
    ) -> None:
        self.metrics.looked_up(
            CACHE_SPECS[cache_type].table,
            TIER_BACKEND,
            hits=hits,
            misses=misses,
            elapsed_s=time.perf_counter() - started,
            extra={"tier": tier},
        )

    def _tiers(self) -> Iterator[tuple[str, int, int, int]]:
        yield "memory", self.memory_weight, len(self._memory), self.memory_bytes
        if self.disk is not None:
            yield "disk", self.disk.weight, len(self.disk), self.disk.capacity

    def _observe_bytes(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(used, {"tier": tier}) for tier, used, _n, _c in self._tiers()]

    def _observe_entries(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {"tier": tier}) for tier, _u, count, _c in self._tiers()]

    def _observe_capacity(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(cap, {"tier": tier}) for tier, _u, _n, cap in self._tiers()]


class TieredPersister:
    """One cache type's persister with the cache tier in front (what the server serves)."""

    def __init__(self, persister: CachePersister, tier: CacheTier, cache_type: CacheType) -> None:
        self.persister = persister
        self.tier = tier
        self.cache_type = cache_type

    async def get(self, key: str) -> bytes | None:
        """From the tier, else from the backends (and then held by the tier)."""
        started = time.perf_counter()
        metrics = self.persister.metrics
        metrics.requested(self.persister.cache_name, 1)
        since = self.tier.generation
        value = await self.tier.get(self.cache_type, key)
        if value is None:
            value = await self.persister.get(key)
            if value is not None:
                self.tier.add(self.cache_type, key, value, since=since)
        elapsed_s = time.perf_counter() - started
        metrics.answered(self.persister.cache_name, found=value is not None, elapsed_s=elapsed_s)
        return value

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The tier's values, and the rest from the backends (then held by the tier)."""
        wanted = list(dict.fromkeys(keys))
        self.persister.metrics.requested(self.persister.cache_name, len(wanted))
        since = self.tier.generation
        found = await self.tier.get_many(self.cache_type, wanted)
        rest = [key for key in wanted if key not in found]
        if rest:
            fetched = await self.persister.get_many(rest)
            for key, value in fetched.items():
                self.tier.add(self.cache_type, key, value, since=since)
            found |= fetched
        return found

    async def size(self, key: str) -> int | None:
        """The size from memory, else from the backends."""
        size = self.tier.size(self.cache_type, key)
        return size if size is not None else await self.persister.size(key)

    async def put(self, key: str, value: bytes) -> bool:
        """Write through the persister; once every target took it, the tier holds it too. Only
        when this write stored it: an existing key keeps its first value (first write wins),
        which may not be these bytes."""
        since = self.tier.generation
        created = await self.persister.put(key, value)
        if created:
            self.tier.add(self.cache_type, key, value, since=since)
        return created

    async def evict(self, key: str) -> None:
        """Upstream's evict: out of the tier, and the Postgres row deleted where the mode has
        Postgres (never the S3 object). The tier is cleared again once the row is gone, so a
        read that raced the delete cannot leave the value behind."""
        await self.tier.evict(self.cache_type, key)
        started = time.perf_counter()
        try:
            await self.persister.evict(key)
        except StorageError:
            self.tier.record_evict(self.cache_type, Backend.POSTGRES, started, failed=True)
            raise
        if Backend.POSTGRES in self.persister.stores:
            self.tier.record_evict(self.cache_type, Backend.POSTGRES, started, failed=False)
        await self.tier.discard(self.cache_type, key)
