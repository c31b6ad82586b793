"""Durable S3 write-behind: a queue of S3 PUTs on local disk, drained by workers.

In ``DualWrite`` and ``S3Primary`` a write (and ``S3Primary``'s read-through write-back) is
acknowledged once Postgres has the row and the PUT is committed to ``<dir>/write-queue.sqlite3``
(WAL, ``synchronous=FULL``: a 2xx survives kill -9). SQLite rather than files because an entry's
life (claim, retry, dead-letter, replay) is a few atomic row updates, deduplication on (cache
type, key) is a UNIQUE constraint and due-order scans use an index. A dispatcher claims due
entries in enqueue order for at most ``workers`` PUTs at once, reschedules retryable failures with
full-jitter backoff (``QueueBudget``) and moves the rest to ``dead_letters``; it sleeps until an
entry is due or an enqueue or finished PUT wakes it, and looks again at least every
``max_delay_s`` (entries replayed by another process wake nothing). ``drain(within_s)`` shuts it
down: everything pending is made due, workers run until the queue is empty or time is up, then are
cancelled, and what remains stays on disk for the next start. Operator view (settings, status,
replay, metrics): ``docs/server.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import structlog
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, LayerCacheError, StorageError
from layer_cache.persister import Store
from layer_cache.retry import full_jitter_delay_s

log = structlog.get_logger(__name__)

T = TypeVar("T")

DB_FILE_NAME = "write-queue.sqlite3"

DEPTH_METRIC = "layer_cache_write_queue_depth"
OLDEST_AGE_METRIC = "layer_cache_write_queue_oldest_age_seconds"
ENQUEUED_METRIC = "layer_cache_write_queue_enqueued"
SUCCESS_METRIC = "layer_cache_write_queue_success"
RETRIED_METRIC = "layer_cache_write_queue_retried"
DEAD_LETTER_METRIC = "layer_cache_write_queue_permanent_failure"
FALLBACK_ATTEMPTED_METRIC = "layer_cache_fallback_writeback_attempted"
FALLBACK_FAILED_METRIC = "layer_cache_fallback_writeback_failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cache_type TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    origin TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    UNIQUE (cache_type, key)
);
CREATE INDEX IF NOT EXISTS queue_due ON queue (next_attempt_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    cache_type TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    origin TEXT NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    dead_at REAL NOT NULL,
    PRIMARY KEY (cache_type, key)
);
"""


class WriteQueueError(StorageError):
    """The queue's directory or database cannot be used (unwritable, disk full, corrupt)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=ErrorKind.TRANSIENT)


class WriteQueueUnavailable(LayerCacheError):
    """The queue cannot be opened at all (a settings or environment problem)."""


class Origin(StrEnum):
    """Why an entry is queued: a client's write, or a read-through write-back."""

    WRITE = "write"
    FILL = "fill"


# --------------------------------------------------------------------------------------------
# The pure part: backoff and budget


@dataclass(frozen=True)
class QueueBudget:
    """How a failing entry is retried, and when it gives up."""

    max_attempts: int = 1000
    max_age_s: float = 86_400.0
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay_s(self, attempts_made: int) -> float:
        """Full jitter: uniform in [0, min(cap, base · 2^(attempts_made - 1))]."""
        return full_jitter_delay_s(
            self.rng, attempts_made, base_s=self.base_delay_s, cap_s=self.max_delay_s
        )

    def gives_up(self, *, retryable: bool, attempts_made: int, age_s: float) -> bool:
        """True when the entry goes to the dead letters instead of being retried."""
        return not retryable or attempts_made >= self.max_attempts or age_s >= self.max_age_s


# --------------------------------------------------------------------------------------------
# The store: synchronous SQLite calls, one connection behind a lock


@dataclass(frozen=True)
class Entry:
    """One queued PUT."""

    id: int
    cache_type: CacheType
    key: str
    value: bytes = field(repr=False)
    origin: Origin
    enqueued_at: float
    attempts: int


@dataclass(frozen=True)
class CacheQueueStatus:
    """One cache type's share of the queue."""

    queued: int = 0
    oldest_enqueued_at: float | None = None
    dead_letters: int = 0


class WriteQueueStore:
    """The queue's SQLite file. Every method is one transaction; safe from any thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / DB_FILE_NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise WriteQueueUnavailable(
                f"cannot open the write queue at {self.path}: {exc}; make the directory "
                "writable or set SI_SDF__SERVER__WRITE_QUEUE_DIR"
            ) from exc
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, body: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        with self._lock:
            db = self._db
            try:
                # A reader (WAL) neither waits for nor blocks the file's writer.
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                result = body(db)
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:  # nothing half-done stays open for the next call
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise WriteQueueError(f"write queue {self.path}: {exc}") from exc
                raise
            return result

    def enqueue(
        self, cache_type: CacheType, key: str, value: bytes, origin: Origin, now: float
    ) -> bool:
        """Queue a PUT (committed and fsynced on return); False if it was already queued."""
        cursor = self._run(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO queue (cache_type, key, value, origin, enqueued_at,"
                " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)",
                (cache_type.value, key, value, origin.value, now, now),
            )
        )
        return cursor.rowcount == 1

    def claim_due(self, now: float, limit: int, exclude: Iterable[int]) -> list[Entry]:
        """Up to ``limit`` entries due at ``now``, oldest first, not in ``exclude``."""
        excluded = list(exclude)
        marks = ",".join("?" * len(excluded))
        rows = self._run(
            lambda db: db.execute(
                "SELECT id, cache_type, key, value, origin, enqueued_at, attempts FROM queue"
                f" WHERE next_attempt_at <= ? AND id NOT IN ({marks}) ORDER BY id LIMIT ?",
                (now, *excluded, limit),
            ).fetchall(),
            write=False,
        )
        return [
            Entry(row[0], CacheType(row[1]), row[2], row[3], Origin(row[4]), row[5], row[6])
            for row in rows
        ]

    def next_due_at(self, exclude: Iterable[int]) -> float | None:
        """When the next entry not in ``exclude`` is due; None for an empty queue."""
        excluded = list(exclude)
        marks = ",".join("?" * len(excluded))
        row = self._run(
            lambda db: db.execute(
                f"SELECT min(next_attempt_at) FROM queue WHERE id NOT IN ({marks})", excluded
            ).fetchone(),
            write=False,
        )
        return None if row is None or row[0] is None else float(row[0])

    def complete(self, entry_id: int) -> None:
        self._run(lambda db: db.execute("DELETE FROM queue WHERE id = ?", (entry_id,)))

    def retry_later(self, entry_id: int, attempts: int, next_attempt_at: float, error: str) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE queue SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                (attempts, next_attempt_at, error, entry_id),
            )
        )

    def dead_letter(self, entry_id: int, attempts: int, error: str, now: float) -> None:
        def move(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO dead_letters (cache_type, key, value, origin,"
                " enqueued_at, attempts, last_error, dead_at) SELECT cache_type, key, value,"
                " origin, enqueued_at, ?, ?, ? FROM queue WHERE id = ?",
                (attempts, error, now, entry_id),
            )
            db.execute("DELETE FROM queue WHERE id = ?", (entry_id,))

        self._run(move)

    def make_all_due(self, now: float) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE queue SET next_attempt_at = ? WHERE next_attempt_at > ?", (now, now)
            )
        )

    def replay(self, cache_type: CacheType | None, now: float) -> int:
        """Move dead letters (all, or one cache type's) back into the queue; returns how many."""
        where, args = ("WHERE cache_type = ?", (cache_type.value,)) if cache_type else ("", ())

        def move(db: sqlite3.Connection) -> int:
            moved = db.execute(
                "INSERT OR IGNORE INTO queue (cache_type, key, value, origin, enqueued_at,"
                " attempts, next_attempt_at, last_error) SELECT cache_type, key, value, origin,"
                f" ?, 0, ?, last_error FROM dead_letters {where} ORDER BY dead_at",
                (now, now, *args),
            ).rowcount
            db.execute(f"DELETE FROM dead_letters {where}", args)
            return int(moved)

        return self._run(move)

    def status(self) -> dict[CacheType, CacheQueueStatus]:
        """Per cache type: entries queued, the oldest enqueue time, dead letters."""

        def read(db: sqlite3.Connection) -> dict[CacheType, CacheQueueStatus]:
            queued = {
                row[0]: (row[1], row[2])
                for row in db.execute(
                    "SELECT cache_type, count(*), min(enqueued_at) FROM queue GROUP BY cache_type"
                )
            }
            dead = dict(
                db.execute("SELECT cache_type, count(*) FROM dead_letters GROUP BY cache_type")
            )
            return {
                CacheType(name): CacheQueueStatus(
                    queued.get(name, (0, None))[0],
                    queued.get(name, (0, None))[1],
                    dead.get(name, 0),
                )
                for name in sorted(queued.keys() | dead.keys())
            }

        return self._run(read, write=False)

    def depth(self) -> int:
        row = self._run(lambda db: db.execute("SELECT count(*) FROM queue").fetchone(), write=False)
        return int(row[0])


def queue_status(directory: Path) -> dict[CacheType, CacheQueueStatus]:
    """The status of the queue in ``directory`` (for the CLI; opens nothing else)."""
    store = WriteQueueStore(directory)
    try:
        return store.status()
    finally:
        store.close()


def replay_dead_letters(directory: Path, cache_type: CacheType | None) -> int:
    """Move the dead letters in ``directory`` back into its queue; returns how many."""
    store = WriteQueueStore(directory)
    try:
        return store.replay(cache_type, time.time())
    finally:
        store.close()


# --------------------------------------------------------------------------------------------
# The service: enqueue from requests, drain with workers


def _attributes(cache_type: CacheType) -> dict[str, str]:
    return {
        "cache_name": CACHE_SPECS[cache_type].table,
        "cache_type": cache_type.value,
        "backend": "s3",
    }


class WriteBehind:
    """The durable queue and its workers; ``start`` them, ``drain`` them on shutdown."""

    def __init__(
        self,
        directory: Path,
        targets: Mapping[CacheType, Store],
        meter: Meter,
        *,
        workers: int,
        budget: QueueBudget,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.store = WriteQueueStore(directory)
        self.targets = targets
        self.worker_count = workers
        self.budget = budget
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-queue")
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._fills: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._enqueued = meter.create_counter(
            ENQUEUED_METRIC, description="S3 PUTs added to the durable write queue"
        )
        self._success = meter.create_counter(
            SUCCESS_METRIC, description="queued S3 PUTs that reached S3"
        )
        self._retried = meter.create_counter(
            RETRIED_METRIC, description="queued S3 PUT attempts that failed and wait"
        )
        self._dead = meter.create_counter(
            DEAD_LETTER_METRIC, description="queued S3 PUTs moved to the dead letters"
        )
        self._fill_attempted = meter.create_counter(
            FALLBACK_ATTEMPTED_METRIC, description="values offered for write-back"
        )
        self._fill_failed = meter.create_counter(
            FALLBACK_FAILED_METRIC, description="write-backs that did not complete"
        )
        meter.create_observable_gauge(
            DEPTH_METRIC,
            [self._observe_depth],
            description="S3 PUTs waiting in the durable write queue",
        )
        meter.create_observable_gauge(
            OLDEST_AGE_METRIC,
            [self._observe_oldest_age],
            description="age of the oldest entry in the durable write queue",
        )

    # Observations run on the exporter's thread: they read the file under the store's lock.

    def _status_or_empty(self) -> dict[CacheType, CacheQueueStatus]:
        if self._closed:
            return {}
        try:
            return self.store.status()
        except (WriteQueueError, sqlite3.ProgrammingError):
            return {}

    def _observe_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        status = self._status_or_empty()
        for cache_type in self.targets:
            queued = status.get(cache_type, CacheQueueStatus()).queued
            yield Observation(queued, _attributes(cache_type))

    def _observe_oldest_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        status = self._status_or_empty()
        now = time.time()
        for cache_type in self.targets:
            oldest = status.get(cache_type, CacheQueueStatus()).oldest_enqueued_at
            age = 0.0 if oldest is None else max(0.0, now - oldest)
            yield Observation(age, _attributes(cache_type))

    async def _db(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def depth(self) -> int:
        return await self._db(self.store.depth)

    def start(self) -> None:
        """Start draining (everything already on disk first)."""
        if self._dispatcher is not None:
            raise RuntimeError("write queue already started")
        self._dispatcher = asyncio.create_task(self._dispatch(), name="write-queue-dispatcher")

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        """Durably queue a client's PUT; ``WriteQueueError`` (answered 503) if it cannot be."""
        await self._enqueue(store.cache_type, key, value, Origin.WRITE)

    async def _enqueue(self, cache_type: CacheType, key: str, value: bytes, origin: Origin) -> bool:
        if self._closed:
            raise WriteQueueError("the write queue is closed: the server is shutting down")
        try:
            added = await self._db(self.store.enqueue, cache_type, key, value, origin, time.time())
        except WriteQueueError as exc:
            log.error(
                "write queue enqueue failed",
                cache_type=cache_type.value,
                key=key,
                directory=str(self.store.directory),
                cause=str(exc),
            )
            raise
        if added:
            self._enqueued.add(1, _attributes(cache_type))
            self._wake.set()
        return added

    def offer(self, store: Store, key: str, value: bytes) -> None:
        """Queue a read-through write-back without making the read wait."""
        task = asyncio.create_task(self._fill(store.cache_type, key, value))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, cache_type: CacheType, key: str, value: bytes) -> None:
        try:
            added = await self._enqueue(cache_type, key, value, Origin.FILL)
        except WriteQueueError:
            self._fill_attempted.add(1, _attributes(cache_type))
            self._fill_failed.add(1, _attributes(cache_type))
            return
        if added:
            self._fill_attempted.add(1, _attributes(cache_type))

    async def _dispatch(self) -> None:
        await self._db(self.store.make_all_due, time.time())  # a restart retries everything now
        while True:
            self._wake.clear()
            free = self.worker_count - len(self._in_flight)
            timeout: float | None = None
            if free > 0:
                try:
                    claimed = await self._db(
                        self.store.claim_due, time.time(), free, list(self._in_flight)
                    )
                    next_due = await self._db(self.store.next_due_at, list(self._in_flight))
                except WriteQueueError as exc:
                    log.error("write queue unreadable; retrying in 1 s", cause=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for entry in claimed:
                    self._in_flight[entry.id] = asyncio.create_task(self._deliver(entry))
                if claimed:
                    continue
                # Until the next entry is due, and at least every max_delay_s: a replay by
                # another process (the CLI) adds entries without waking this one.
                timeout = self.budget.max_delay_s
                if next_due is not None:
                    timeout = min(timeout, max(0.0, next_due - time.time()) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _deliver(self, entry: Entry) -> None:
        try:
            await self._attempt(entry)
        except WriteQueueError as exc:  # the entry stays queued; do not spin on a broken disk
            log.error("write queue update failed; retrying in 1 s", cause=str(exc))
            await asyncio.sleep(1.0)
        finally:
            self._in_flight.pop(entry.id, None)
            self._wake.set()

    async def _attempt(self, entry: Entry) -> None:
        attributes = _attributes(entry.cache_type)
        try:
            await self.targets[entry.cache_type].put(entry.key, entry.value)
        except StorageError as exc:
            error, retryable, before_retry = f"{exc.kind.value}: {exc}", exc.kind.retryable, exc
        except Exception as exc:  # a bug must not kill the worker: the entry is kept
            log.exception("write queue put failed", cache_type=entry.cache_type.value)
            error, retryable, before_retry = f"internal: {exc!r}", False, None
        else:
            await self._db(self.store.complete, entry.id)
            self._success.add(1, attributes)
            log.debug("write queue put done", cache_type=entry.cache_type.value, key=entry.key)
            return
        attempts = entry.attempts + 1
        now = time.time()
        if self.budget.gives_up(
            retryable=retryable, attempts_made=attempts, age_s=now - entry.enqueued_at
        ):
            await self._db(self.store.dead_letter, entry.id, attempts, error, now)
            self._dead.add(1, attributes)
            if entry.origin is Origin.FILL:
                self._fill_failed.add(1, attributes)
            log.warning(
                "write queue entry dead-lettered",
                cache_type=entry.cache_type.value,
                key=entry.key,
                attempts=attempts,
                cause=error,
            )
            return
        if before_retry is not None and before_retry.before_retry is not None:
            with contextlib.suppress(StorageError):
                await before_retry.before_retry()
        delay = self.budget.delay_s(attempts)
        await self._db(self.store.retry_later, entry.id, attempts, now + delay, error)
        self._retried.add(1, attributes)
        log.debug(
            "write queue put retrying",
            cache_type=entry.cache_type.value,
            key=entry.key,
            attempt=attempts,
            delay_s=round(delay, 3),
            cause=error,
        )

    async def drain(self, within_s: float) -> int:
        """Try to empty the queue within ``within_s`` s, then stop; returns entries left."""
        if self._fills:
            await asyncio.gather(*self._fills, return_exceptions=True)
        await self._db(self.store.make_all_due, time.time())
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, within_s)
        remaining = await self._db(self.store.depth)
        while remaining and self._dispatcher is not None and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
            remaining = await self._db(self.store.depth)
        await self._stop_tasks()
        remaining = await self._db(self.store.depth)
        self._closed = True
        await self._db(self.store.close)
        self._executor.shutdown(wait=True)
        if remaining:
            log.warning(
                "write queue stopped",
                remaining=remaining,
                directory=str(self.store.directory),
                note="kept on disk; drained on the next start",
            )
        else:
            log.info("write queue stopped", remaining=0)
        return remaining

    async def _stop_tasks(self) -> None:
        tasks: Sequence[asyncio.Task[None]] = [
            *([self._dispatcher] if self._dispatcher else []),
            *self._in_flight.values(),
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        self._in_flight.clear()
