"""The disk tier: values kept as files on the server's volume, bounded in bytes, survive restarts.

One file per value, ``<dir>/<table>/<key[:2]>/<key>``: a 16-byte header (magic ``SLC1``, the
CRC-32 of the value, its length) and the value. A file is written under a temporary name and
renamed into place, so a crash leaves either no file or a whole one; a read checks the magic, the
length and the CRC and treats any mismatch (a torn or damaged file) as a miss and deletes the
file, so wrong bytes are never served. Nothing is fsynced: losing a file after a crash only costs
a miss. (diskcache, SQLite-based, was measured against this layout: docs/performance.md.)

The index (key -> charged bytes) lives in memory under an ``EvictionPolicy`` (the same S3-FIFO
as the memory tier, measured better than FIFO, upstream's disk picker, and LRU behind a memory
tier). An entry is charged its size rounded up to 4 KiB blocks, and at least ``min_entry_bytes``
so the index (``INDEX_ENTRY_BYTES`` of memory each) fits the share of the memory budget it is
given. On start a background scan rebuilds the index from the files (oldest first, by mtime),
deleting leftover temporary files and what no longer fits; the tier serves meanwhile (a key not
indexed yet is a miss).

All file I/O runs off the event loop: reads on a small thread pool, writes and deletes in order
on one writer thread fed by ``admit`` (asynchronous: a request never waits for the disk; values
wait in a buffer bounded by ``buffer_bytes``, past which, or past the admission rate, they are
not written: upstream's disk admission rate limit). Deletes the evict route asks for are awaited.
The volume is shared with the write queue: every ``SPACE_CHECK_S`` (and when a write finds too
little room) the tier's capacity is cut so the volume keeps ``reserve_free_bytes`` free, and grown
back, up to its configured size, when room returns. ``close`` deletes what evicts asked for,
drops unwritten values and stops the threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import CacheTierUnavailable
from layer_cache.eviction import EvictionPolicy, make_policy
from layer_cache.rate_limit import TokenBucket

log = structlog.get_logger(__name__)

MAGIC = b"SLC1"
HEADER = struct.Struct(">4sIQ")  # magic, crc32, value length
BLOCK_BYTES = 4096
INDEX_ENTRY_BYTES = 520
"""Memory one index entry costs (policy structures, the key tuple and a 64-character key, a
ghost slot), measured by tests/unit/test_cache_tier.py."""
TEMP_SUFFIX = ".tmp"
SPACE_CHECK_S = 5.0
READ_THREADS = 4
WRITE_BATCH = 64

DiskKey = tuple[CacheType, str]


def encode(value: bytes) -> bytes:
    """A value as stored: the header, then the value."""
    return HEADER.pack(MAGIC, zlib.crc32(value), len(value)) + value


def decode(data: bytes) -> bytes | None:
    """The value in a stored file, or None when the file is not whole and intact."""
    if len(data) < HEADER.size:
        return None
    magic, crc, length = HEADER.unpack_from(data)
    value = data[HEADER.size :]
    if magic != MAGIC or length != len(value) or zlib.crc32(value) != crc:
        return None
    return value


def charged_bytes(stored_bytes: int, min_entry_bytes: int) -> int:
    """What an entry costs the tier: its file in whole blocks, at least ``min_entry_bytes``."""
    blocks = -(-stored_bytes // BLOCK_BYTES)
    return max(blocks * BLOCK_BYTES, min_entry_bytes)


def capacity_for_free_space(configured: int, used: int, free: int, reserve_free_bytes: int) -> int:
    """The tier's capacity that leaves ``reserve_free_bytes`` free on the volume (never above
    ``configured``): what it holds now plus what may still be taken."""
    return max(0, min(configured, used + free - reserve_free_bytes))


@dataclass(frozen=True)
class _Write:
    key: DiskKey
    value: bytes
    generation: int


@dataclass(frozen=True)
class _Delete:
    key: DiskKey
    done: asyncio.Future[None] | None = None


class DiskTier:
    """Values on local disk, indexed in memory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        capacity: int,
        *,
        policy: str,
        min_entry_bytes: int = BLOCK_BYTES,
        reserve_free_bytes: int = 0,
        admission_bytes_per_s: float | None = None,
        buffer_bytes: int = 128 * 1024 * 1024,
        free_space: Callable[[Path], int] | None = None,
    ) -> None:
        self.directory = directory
        self.configured_capacity = capacity
        self.min_entry_bytes = min_entry_bytes
        self.reserve_free_bytes = reserve_free_bytes
        self.buffer_bytes = buffer_bytes
        self._index: EvictionPolicy[DiskKey, int] = make_policy(policy, capacity)
        self._free_space = free_space or _free_bytes
        self._bucket = (
            None
            if not admission_bytes_per_s
            else TokenBucket.full(admission_bytes_per_s, admission_bytes_per_s, time.monotonic())
        )
        self._ops: deque[_Write | _Delete] = deque()
        self._buffered = 0
        self._pending: set[DiskKey] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self.generation = 0
        """Bumped by ``remove``: a write queued before it is never indexed."""
        self._evicted_while_scanning: set[DiskKey] = set()
        self._scanning = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="cache-disk-write")
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cache-disk-read")
        self.dropped_writes = 0
        self._warned: set[str] = set()

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    def open(self) -> None:
        """Create the directories (``CacheTierUnavailable`` if that fails); start the index scan
        and the writer."""
        try:
            for spec in CACHE_SPECS.values():
                (self.directory / spec.table).mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe{TEMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CacheTierUnavailable(
                f"cannot use the disk cache directory {self.directory}: {exc.strerror or exc}; "
                "make it writable, set SI_SDF__LAYER_DB_CONFIG__CACHE_CONFIG__DISK_PATH, or turn "
                "the disk tier off with SI_SDF__LAYER_DB_CONFIG__CACHE_CONFIG__DISK_LAYER=false"
            ) from exc
        self._scanning = True
        self._tasks = [
            asyncio.create_task(self._scan(), name="cache-disk-scan"),
            asyncio.create_task(self._write_loop(), name="cache-disk-writer"),
        ]

    async def close(self) -> None:
        """Finish the deletes asked for, drop unwritten values, stop the threads."""
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        deletes: list[_Write | _Delete] = [op for op in self._ops if isinstance(op, _Delete)]
        self._ops.clear()
        if deletes:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._apply, deletes)
        for op in deletes:
            if isinstance(op, _Delete) and op.done is not None and not op.done.done():
                op.done.set_result(None)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    # ---------------------------------------------------------------------------------------
    # Reads (event loop: the index; reader threads: the files)

    @property
    def weight(self) -> int:
        """Bytes charged for the entries held."""
        return self._index.weight

    @property
    def capacity(self) -> int:
        return self._index.capacity

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def index_bytes(self) -> int:
        """Memory the index takes (an estimate from ``INDEX_ENTRY_BYTES``)."""
        return len(self._index) * INDEX_ENTRY_BYTES

    async def read_many(self, keys: Iterable[DiskKey]) -> dict[DiskKey, bytes]:
        """The values of the indexed keys among ``keys`` whose files are intact (one thread hop
        for all of them); a damaged or vanished file is a miss and leaves the index."""
        wanted = [key for key in keys if self._index.get(key) is not None]
        if not wanted:
            return {}
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._readers, self._read_files, wanted)
        found: dict[DiskKey, bytes] = {}
        for key, value in zip(wanted, results, strict=True):
            if value is None:
                if self._index.pop(key) is not None:
                    self._queue(_Delete(key))
            else:
                found[key] = value
        return found

    def _read_files(self, keys: list[DiskKey]) -> list[bytes | None]:
        return [self._read_file(key) for key in keys]

    def _read_file(self, key: DiskKey) -> bytes | None:
        """Reader thread: the value, or None when the file is gone, unreadable or damaged."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn_once("read", exc)
            return None
        return decode(data)

    # ---------------------------------------------------------------------------------------
    # Writes and deletes (event loop: queueing and the index; writer thread: the files)

    def admit(self, key: DiskKey, value: bytes, generation: int) -> bool:
        """Queue ``value`` for writing (never waits); False when it is not admitted: held
        already, too large, past the buffer or the admission rate, or closing."""
        if self._closing or key in self._index or key in self._pending:
            return False
        stored = HEADER.size + len(value)
        if charged_bytes(stored, self.min_entry_bytes) > self.configured_capacity:
            return False
        if self._buffered + len(value) > self.buffer_bytes or not self._rate_allows(len(value)):
            self.dropped_writes += 1
            return False
        self._buffered += len(value)
        self._pending.add(key)
        self._queue(_Write(key, value, generation))
        return True

    def _queue(self, op: _Write | _Delete) -> None:
        self._ops.append(op)
        self._idle.clear()
        self._wake.set()

    async def idle(self) -> None:
        """Wait until the start-up scan and every queued write and delete are done."""
        await self._idle.wait()

    def _rate_allows(self, size: int) -> bool:
        if self._bucket is None:
            return True
        now = time.monotonic()
        if self._bucket.ready_at(size, now) > now:
            return False
        self._bucket.take(size, now)
        return True

    async def remove(self, key: DiskKey) -> None:
        """Forget ``key`` and delete its file (returns once deleted): the evict path. Values of
        this key still queued, or written meanwhile, are never indexed."""
        self.generation += 1
        self._index.pop(key)
        if self._scanning:
            self._evicted_while_scanning.add(key)
        done = asyncio.get_running_loop().create_future()
        self._queue(_Delete(key, done))
        await done

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_space_check = 0.0
        while not self._closing:
            if not self._ops:
                if not self._scanning:
                    self._idle.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SPACE_CHECK_S):
                        await self._wake.wait()
                self._wake.clear()
            if self._closing:
                break
            if loop.time() >= next_space_check:
                await self._fit_free_space()
                next_space_check = loop.time() + SPACE_CHECK_S
            batch = [self._ops.popleft() for _ in range(min(WRITE_BATCH, len(self._ops)))]
            if not batch:
                continue
            outcomes = await loop.run_in_executor(self._writer, self._apply, batch)
            short_of_space = False
            for op, outcome in zip(batch, outcomes, strict=True):
                if isinstance(op, _Delete):
                    if op.done is not None and not op.done.done():
                        op.done.set_result(None)
                    continue
                self._buffered -= len(op.value)
                self._pending.discard(op.key)
                if outcome is None:
                    short_of_space = True
                    continue
                if op.generation != self.generation or self._closing:
                    self._queue(_Delete(op.key))  # evicted meanwhile: never index it
                    continue
                self._index_put(op.key, outcome)
            if short_of_space:
                await self._fit_free_space()
                next_space_check = loop.time() + SPACE_CHECK_S

    def _apply(self, batch: list[_Write | _Delete]) -> list[int | None]:
        """Writer thread: run each op in order; a write's stored size, or None if not written."""
        outcomes: list[int | None] = []
        for op in batch:
            if isinstance(op, _Delete):
                self._delete_file(op.key)
                outcomes.append(None)
            else:
                outcomes.append(self._write_file(op))
        return outcomes

    def _write_file(self, op: _Write) -> int | None:
        """Writer thread: the stored size, or None when the file was not written (the volume
        is short of the reserve, or the write failed)."""
        path = self._path(op.key)
        data = encode(op.value)
        try:
            if self._free_space(self.directory) - len(data) < self.reserve_free_bytes:
                return None
            path.parent.mkdir(exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")
            temporary.write_bytes(data)
            temporary.replace(path)
        except OSError as exc:
            self._warn_once("write", exc)
            return None
        return len(data)

    def _delete_file(self, key: DiskKey) -> None:
        """Writer thread: the file goes (a failure is warned about, once per kind)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            self._warn_once("delete", exc)

    def _index_put(self, key: DiskKey, stored: int) -> None:
        charged = charged_bytes(stored, self.min_entry_bytes)
        for evicted, _charged in self._index.put(key, charged, charged):
            self._queue(_Delete(evicted))

    async def _fit_free_space(self) -> None:
        """Resize to leave ``reserve_free_bytes`` free on the volume (the write queue's room)."""
        loop = asyncio.get_running_loop()
        try:
            free = await loop.run_in_executor(self._writer, self._free_space, self.directory)
        except OSError as exc:
            self._warn_once("statvfs", exc)
            return
        capacity = capacity_for_free_space(
            self.configured_capacity, self._index.weight, free, self.reserve_free_bytes
        )
        if capacity != self._index.capacity:
            for evicted, _charged in self._index.resize(capacity):
                self._queue(_Delete(evicted))

    # ---------------------------------------------------------------------------------------
    # Start-up scan

    async def _scan(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            found = await loop.run_in_executor(self._readers, self._list_files)
        except OSError as exc:
            self._warn_once("scan", exc)
            found = []
        finally:
            self._scanning = False
        skipped = self._evicted_while_scanning
        self._evicted_while_scanning = set()
        indexed = 0
        for _mtime, key, stored in found:  # oldest first, so the FIFO order is kept
            if key in skipped:
                self._queue(_Delete(key))
                continue
            if key not in self._index:
                self._index_put(key, stored)
                indexed += 1
        if not self._ops:
            self._idle.set()
        log.info(
            "disk cache indexed",
            directory=str(self.directory),
            entries=indexed,
            bytes=self._index.weight,
            capacity_bytes=self._index.capacity,
            duration_s=round(time.monotonic() - started, 3),
        )

    def _list_files(self) -> list[tuple[float, DiskKey, int]]:
        """Reader thread: every stored file (oldest first); temporary files are deleted."""
        tables: Mapping[str, CacheType] = {
            spec.table: cache_type for cache_type, spec in CACHE_SPECS.items()
        }
        found: list[tuple[float, DiskKey, int]] = []
        for table, cache_type in tables.items():
            base = self.directory / table
            if not base.is_dir():
                continue
            for shard in os.scandir(base):
                if self._closing:
                    return []
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for item in os.scandir(shard.path):
                    if item.name.endswith(TEMP_SUFFIX):
                        with contextlib.suppress(OSError):
                            os.unlink(item.path)
                        continue
                    with contextlib.suppress(OSError):
                        stat = item.stat(follow_symlinks=False)
                        found.append((stat.st_mtime, (cache_type, item.name), stat.st_size))
        found.sort(key=lambda entry: entry[0])
        return found

    # ---------------------------------------------------------------------------------------

    def _path(self, key: DiskKey) -> Path:
        cache_type, name = key
        return self.directory / CACHE_SPECS[cache_type].table / name[:2] / name

    def _warn_once(self, operation: str, exc: OSError) -> None:
        if operation not in self._warned:  # once per kind: a failing disk must not flood logs
            self._warned.add(operation)
            log.warning(
                "disk cache i/o failed",
                operation=operation,
                directory=str(self.directory),
                cause=exc.strerror or str(exc),
            )


def _free_bytes(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize
