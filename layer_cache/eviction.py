"""Byte-bounded eviction policies: which entries a cache tier keeps when it is full.

Pure and synchronous (no clock, no I/O, no locks: the memory tier calls them on the event loop
only). Each policy maps keys to values with a *weight* (the bytes an entry costs: its value plus
a fixed per-entry overhead the caller adds) and keeps the total weight at or under ``capacity``
after every call. ``put`` returns what it evicted so the caller can release it (the disk tier
deletes the file); a value heavier than the whole capacity is refused and returned at once.
Content never changes under a key, so ``put`` of a key already held changes nothing. ``get``
records an access; ``peek`` does not. ``resize`` changes the capacity and evicts down to it.

Three policies, the ones foyer offers upstream, compared on a Zipf read mix by
``bench.cache_policy`` (figures in docs/performance.md):

* ``LruCache``: least recently used first (foyer's default, upstream's memory tier).
* ``S3FifoCache``: S3-FIFO (Yang et al., SOSP 2023): new entries enter a small FIFO (10 % of the
  capacity); one read at least while there moves an entry to the main FIFO, none evicts it and
  leaves its key in a ghost FIFO, and a key that comes back while still a ghost goes straight to
  main. Main gives each entry with reads a second chance (a frequency, capped at 3, spent one per
  pass). One-hit wonders (a write never read back) leave quickly and cannot push hot entries out.
* ``WTinyLfuCache``: W-TinyLFU (Einziger et al., as Caffeine): an LRU window (1 %) in front of a
  segmented LRU (probation, protected 80 %), and a 4-bit count-min sketch of recent accesses that
  admits a window leaver into main only if it was asked for more often than the entry it would
  push out.

``POLICIES`` names them for the settings; the default is the measured best
(``DEFAULT_POLICY``).
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Evicted = list[tuple[K, V]]


class EvictionPolicy(Protocol[K, V]):
    """A byte-bounded map; see the module docstring for the contract."""

    capacity: int

    @property
    def weight(self) -> int:
        """The total weight held."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def get(self, key: K) -> V | None:
        """The value, recording an access (a miss is recorded too where the policy counts)."""
        ...

    def peek(self, key: K) -> V | None:
        """The value, recording nothing."""
        ...

    def put(self, key: K, value: V, weight: int) -> Evicted[K, V]:
        """Hold ``value`` (unless the key is held already); what had to leave, in order."""
        ...

    def pop(self, key: K) -> V | None:
        """Remove the key; its value, or None when it was not held."""
        ...

    def resize(self, capacity: int) -> Evicted[K, V]:
        """A new capacity; what had to leave to fit it."""
        ...

    def items(self) -> Iterator[tuple[K, V]]:
        """Every entry held (in no promised order)."""
        ...


class _Entry(Generic[V]):
    __slots__ = ("freq", "value", "weight")

    def __init__(self, value: V, weight: int) -> None:
        self.value = value
        self.weight = weight
        self.freq = 0


def _check(capacity: int) -> int:
    if capacity < 0:
        raise ValueError("capacity must be >= 0 bytes")
    return capacity


class _Policy(abc.ABC, Generic[K, V]):
    """The part of the contract every policy keeps alike: ``peek`` records nothing, ``put``
    holds a key once and refuses a value heavier than the capacity, ``resize`` evicts down to
    the new capacity. A policy says where its entries are (``_find``), where a new one goes
    (``_add``) and what leaves first (``_shrink``)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = _check(capacity)

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abc.abstractmethod
    def _find(self, key: K) -> _Entry[V] | None:
        """The key's entry, recording nothing."""

    @abc.abstractmethod
    def _add(self, key: K, entry: _Entry[V]) -> None:
        """Hold a new entry, not yet evicting."""

    @abc.abstractmethod
    def _shrink(self) -> Evicted[K, V]:
        """Evict until the weight fits the capacity; what left, in order."""

    def peek(self, key: K) -> V | None:
        entry = self._find(key)
        return None if entry is None else entry.value

    def put(self, key: K, value: V, weight: int) -> Evicted[K, V]:
        if key in self:
            return []
        if weight > self.capacity:
            return [(key, value)]
        self._add(key, _Entry(value, weight))
        return self._shrink()

    def resize(self, capacity: int) -> Evicted[K, V]:
        self.capacity = _check(capacity)
        return self._shrink()


class LruCache(_Policy[K, V]):
    """Least recently used first."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._weight = 0

    @property
    def weight(self) -> int:
        return self._weight

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.value

    def _find(self, key: K) -> _Entry[V] | None:
        return self._entries.get(key)

    def _add(self, key: K, entry: _Entry[V]) -> None:
        self._entries[key] = entry
        self._weight += entry.weight

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._weight -= entry.weight
        return entry.value

    def items(self) -> Iterator[tuple[K, V]]:
        return ((key, entry.value) for key, entry in list(self._entries.items()))

    def _shrink(self) -> Evicted[K, V]:
        evicted: Evicted[K, V] = []
        while self._weight > self.capacity:
            key, entry = self._entries.popitem(last=False)
            self._weight -= entry.weight
            evicted.append((key, entry.value))
        return evicted


S3FIFO_SMALL_SHARE = 0.10
"""The small FIFO's share of the capacity (the paper's 10 %)."""
S3FIFO_MAX_FREQ = 3


class S3FifoCache(_Policy[K, V]):
    """S3-FIFO: a small probationary FIFO, a main FIFO with second chances, a ghost FIFO."""

    def __init__(self, capacity: int, *, small_share: float = S3FIFO_SMALL_SHARE) -> None:
        super().__init__(capacity)
        self.small_share = small_share
        self._small: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._main: OrderedDict[K, _Entry[V]] = OrderedDict()
        # Ghosts are remembered by the key's hash (a collision only sends a key to main early),
        # so a ghost holds no key alive: its memory is bounded by the entries held.
        self._ghost: OrderedDict[int, int] = OrderedDict()  # hash(key) -> weight it had
        self._small_weight = 0
        self._main_weight = 0
        self._ghost_weight = 0

    @property
    def weight(self) -> int:
        return self._small_weight + self._main_weight

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main

    def _find(self, key: K) -> _Entry[V] | None:
        entry = self._small.get(key)
        return self._main.get(key) if entry is None else entry

    def get(self, key: K) -> V | None:
        entry = self._find(key)
        if entry is None:
            return None
        if entry.freq < S3FIFO_MAX_FREQ:
            entry.freq += 1
        return entry.value

    def _add(self, key: K, entry: _Entry[V]) -> None:
        if self._ghost_pop(key):
            self._main[key] = entry
            self._main_weight += entry.weight
        else:
            self._small[key] = entry
            self._small_weight += entry.weight

    def pop(self, key: K) -> V | None:
        entry = self._small.pop(key, None)
        if entry is not None:
            self._small_weight -= entry.weight
            return entry.value
        entry = self._main.pop(key, None)
        if entry is not None:
            self._main_weight -= entry.weight
            return entry.value
        self._ghost_pop(key)
        return None

    def resize(self, capacity: int) -> Evicted[K, V]:
        evicted = super().resize(capacity)
        self._trim_ghost()
        return evicted

    def items(self) -> Iterator[tuple[K, V]]:
        entries = [*self._small.items(), *self._main.items()]
        return ((key, entry.value) for key, entry in entries)

    def _ghost_pop(self, key: K) -> bool:
        weight = self._ghost.pop(hash(key), None)
        if weight is None:
            return False
        self._ghost_weight -= weight
        return True

    def _trim_ghost(self) -> None:
        # The ghost remembers about as many bytes as the cache holds, and never more keys than
        # it holds entries.
        while self._ghost and (
            self._ghost_weight > self.capacity or len(self._ghost) > len(self) + 1
        ):
            _key, weight = self._ghost.popitem(last=False)
            self._ghost_weight -= weight

    def _shrink(self) -> Evicted[K, V]:
        evicted: Evicted[K, V] = []
        while self.weight > self.capacity:
            if self._small and (
                self._small_weight > self.capacity * self.small_share or not self._main
            ):
                self._evict_small(evicted)
            else:
                self._evict_main(evicted)
        return evicted

    def _evict_small(self, evicted: Evicted[K, V]) -> None:
        key, entry = self._small.popitem(last=False)
        self._small_weight -= entry.weight
        if entry.freq > 0:  # read while on probation: it earns a place in main
            entry.freq = 0
            self._main[key] = entry
            self._main_weight += entry.weight
            return
        self._ghost[hash(key)] = entry.weight
        self._ghost_weight += entry.weight
        self._trim_ghost()
        evicted.append((key, entry.value))

    def _evict_main(self, evicted: Evicted[K, V]) -> None:
        while self._main:
            key, entry = self._main.popitem(last=False)
            if entry.freq > 0:  # second chance: back to the head, one read spent
                entry.freq -= 1
                self._main[key] = entry
                continue
            self._main_weight -= entry.weight
            evicted.append((key, entry.value))
            return


class FrequencySketch:
    """A count-min sketch of 4-bit counters (4 rows), halved every ``10 x width`` increments so
    it remembers recent popularity, not all-time."""

    ROWS = 4
    MAX = 15
    _HALVE = bytes(value >> 1 for value in range(256))
    _SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)

    def __init__(self, width: int) -> None:
        size = 1
        while size < max(16, width):
            size <<= 1
        self._mask = size - 1
        self._rows = [bytearray(size) for _ in range(self.ROWS)]
        self._additions = 0
        self.sample_size = 10 * size

    def _slots(self, key: Hashable) -> Iterator[int]:
        hashed = hash(key) & 0xFFFFFFFFFFFFFFFF
        for seed in self._SEEDS:
            mixed = ((hashed ^ seed) * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
            yield (mixed ^ (mixed >> 29)) & self._mask

    def frequency(self, key: Hashable) -> int:
        """The estimated recent access count (at most ``MAX``)."""
        return min(row[slot] for row, slot in zip(self._rows, self._slots(key), strict=True))

    def increment(self, key: Hashable) -> None:
        """Count one access."""
        for row, slot in zip(self._rows, self._slots(key), strict=True):
            if row[slot] < self.MAX:
                row[slot] += 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._rows = [row.translate(self._HALVE) for row in self._rows]
            self._additions //= 2


WTINYLFU_WINDOW_SHARE = 0.01
WTINYLFU_PROTECTED_SHARE = 0.80
WTINYLFU_SKETCH_BYTES_PER_ENTRY = 4096
"""The sketch is sized for capacity / this many entries (clamped to 2**10..2**22 counters)."""


class WTinyLfuCache(_Policy[K, V]):
    """W-TinyLFU: an LRU window, a segmented LRU main, and frequency-based admission."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._window: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._probation: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._protected: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._window_weight = 0
        self._probation_weight = 0
        self._protected_weight = 0
        width = min(max(capacity // WTINYLFU_SKETCH_BYTES_PER_ENTRY, 1 << 10), 1 << 22)
        self.sketch = FrequencySketch(width)

    @property
    def weight(self) -> int:
        return self._window_weight + self._probation_weight + self._protected_weight

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def _find(self, key: K) -> _Entry[V] | None:
        for segment in (self._window, self._probation, self._protected):
            entry = segment.get(key)
            if entry is not None:
                return entry
        return None

    def get(self, key: K) -> V | None:
        self.sketch.increment(key)
        if key in self._window:
            self._window.move_to_end(key)
            return self._window[key].value
        if key in self._protected:
            self._protected.move_to_end(key)
            return self._protected[key].value
        entry = self._probation.pop(key, None)
        if entry is None:
            return None
        self._probation_weight -= entry.weight
        self._protected[key] = entry
        self._protected_weight += entry.weight
        protected_cap = (self.capacity - self._window_cap) * WTINYLFU_PROTECTED_SHARE
        while self._protected_weight > protected_cap and len(self._protected) > 1:
            demoted, old = self._protected.popitem(last=False)
            self._protected_weight -= old.weight
            self._probation[demoted] = old
            self._probation_weight += old.weight
        return entry.value

    @property
    def _window_cap(self) -> float:
        return self.capacity * WTINYLFU_WINDOW_SHARE

    def _add(self, key: K, entry: _Entry[V]) -> None:
        self._window[key] = entry
        self._window_weight += entry.weight

    def pop(self, key: K) -> V | None:
        for segment, attribute in (
            (self._window, "_window_weight"),
            (self._probation, "_probation_weight"),
            (self._protected, "_protected_weight"),
        ):
            entry = segment.pop(key, None)
            if entry is not None:
                setattr(self, attribute, getattr(self, attribute) - entry.weight)
                return entry.value
        return None

    def items(self) -> Iterator[tuple[K, V]]:
        entries = [*self._window.items(), *self._probation.items(), *self._protected.items()]
        return ((key, entry.value) for key, entry in entries)

    def _main_victim(self) -> tuple[OrderedDict[K, _Entry[V]], K] | None:
        for segment in (self._probation, self._protected):
            if segment:
                return segment, next(iter(segment))
        return None

    def _drop_main(self, segment: OrderedDict[K, _Entry[V]], key: K) -> _Entry[V]:
        entry = segment.pop(key)
        if segment is self._probation:
            self._probation_weight -= entry.weight
        else:
            self._protected_weight -= entry.weight
        return entry

    def _shrink(self) -> Evicted[K, V]:
        evicted: Evicted[K, V] = []
        # Window leavers go to probation: freely while everything fits, else against victims.
        while self._window_weight > self._window_cap and self._window:
            key, candidate = self._window.popitem(last=False)
            self._window_weight -= candidate.weight
            admitted = True
            frequency = self.sketch.frequency(key)
            while self.weight + candidate.weight > self.capacity:
                found = self._main_victim()
                if found is None:
                    break
                segment, victim_key = found
                if frequency > self.sketch.frequency(victim_key):
                    victim = self._drop_main(segment, victim_key)
                    evicted.append((victim_key, victim.value))
                else:
                    admitted = False
                    break
            if admitted and self.weight + candidate.weight <= self.capacity:
                self._probation[key] = candidate
                self._probation_weight += candidate.weight
            else:
                evicted.append((key, candidate.value))
        while self.weight > self.capacity:  # a shrunk capacity: main first, then the window
            found = self._main_victim()
            if found is not None:
                segment, victim_key = found
                evicted.append((victim_key, self._drop_main(segment, victim_key).value))
            else:
                key, entry = self._window.popitem(last=False)
                self._window_weight -= entry.weight
                evicted.append((key, entry.value))
        return evicted


class PolicyName(StrEnum):
    """A policy as the settings name it."""

    S3FIFO = "s3fifo"
    LRU = "lru"
    W_TINYLFU = "w_tinylfu"


POLICIES: Mapping[
    PolicyName, type[LruCache[Any, Any] | S3FifoCache[Any, Any] | WTinyLfuCache[Any, Any]]
] = MappingProxyType(
    {
        PolicyName.S3FIFO: S3FifoCache,
        PolicyName.LRU: LruCache,
        PolicyName.W_TINYLFU: WTinyLfuCache,
    }
)
DEFAULT_POLICY = PolicyName.S3FIFO


def make_policy(name: str, capacity: int) -> EvictionPolicy[K, V]:
    """A policy by its settings name (``POLICIES``)."""
    policy: EvictionPolicy[K, V] = POLICIES[PolicyName(name)](capacity)
    return policy
