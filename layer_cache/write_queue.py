"""Durable write-behind: writes queued on local disk, drained by workers, never given up by default.

Two queues share this machinery (``QueueKind``), each one SQLite file in the queue directory:
``S3_WRITE_QUEUE`` (``write-queue.sqlite3``) holds every S3 PUT of ``DualWrite`` and
``S3Primary`` (and ``S3Primary``'s read-through write-backs); ``PG_RETRY_QUEUE``
(``retry-queue-postgres.sqlite3``) holds the Postgres rows whose INSERT failed in those modes after
the S3 PUT was queued, upstream's retry queue. A write is acknowledged once its entry is committed
(WAL, ``synchronous=FULL``: a 2xx survives kill -9 and power loss). SQLite rather than files
because an entry's life (claim, retry, dead-letter, replay) is a few atomic row updates,
deduplication on (cache type, key) is a UNIQUE constraint and due-order scans use an index.

**Group commit.** Enqueues wait in memory for the one commit in progress; the next commit takes
every entry that arrived meanwhile, so one fsync covers them all and each caller returns only after
the fsync that covers its entry. The bookkeeping commits (a finished, retried or dead-lettered
entry) use ``synchronous=NORMAL``: they reach the WAL at once (kill -9 loses none) and the next
enqueue's fsync covers them; losing one to a power cut only repeats an idempotent write.

**Failures.** A dispatcher claims due entries in enqueue order for at most ``workers`` writes at
once. Every failure is retried, as upstream retries every failed PUT; how depends on the error
(``verdict``): a transient one, an unmapped code or a bug waits a full-jitter backoff
(``QueueBudget``) per entry; one an operator fixes (access denied, bad or expired credentials, a
missing bucket or table, an untrusted certificate) **holds** that cache type's target
(``Holds``): its other entries wait, one probe at a time is tried after a capped backoff, the
``…_blocked`` gauge is 1 and one warning says why; the first success releases it (one info line)
and makes its entries due at once. Other cache types' entries (other buckets) keep flowing. The
attempt and age caps are opt-in (``QueueBudget``, default off); an entry past one becomes a dead
letter, replayable from the CLI.

The dispatcher sleeps until an entry or a probe is due or an enqueue or finished write wakes it,
and looks again at least every ``max_delay_s`` of the budget's ``Backoff`` (entries replayed by
another process wake nothing).
``drain(within_s)`` shuts it down: pending commits finish, everything pending is made due, workers
run until the queue is empty or time is up, then are cancelled, and what remains stays on disk for
the next start. Logs: ``warning`` for a hold, a dead letter, an entry's first unexplained failure
and a failed enqueue; ``info`` for a release and the stop; ``debug`` per attempt. Operator view
(settings, status, replay, metrics): ``docs/server.md``.

**Metrics** (attributes ``cache_name``, ``cache_type``, ``backend``), upstream's series where it
has one: the S3 queue counts every attempt in ``s3_write_attempts{result="success"|"retry"|
"dead_letter_queue"}`` (``s3_worker.rs``), gauges ``s3_write_queue_depth``, ``s3_dlq_depth`` and,
per cache type, one dispatcher's ``s3_worker_queue_depth`` / ``s3_worker_active_uploads``
(``worker_id="0"``), and times each durable enqueue in ``s3_disk_write_duration_ms{status}``; the
Postgres queue has upstream's retry-queue series (``layer_cache_retry_queue_enqueued``,
``…_success``, ``…_failed``, ``…_permanent_failure`` counters, also under the bare names its
dashboard queries, and the ``…_depth`` gauge). Both time every attempt in
``layer_cache_persister_write_duration_ms`` and each written entry's wait since its request in
``layer_cache_persistence_latency_seconds`` (``operation`` ``write`` for S3, ``retry`` for
Postgres). Ours where upstream has none: ``layer_cache_write_queue_enqueued``, the oldest entry's
age and the ``…_blocked`` gauge of each queue, the Postgres queue's ``…_dlq_depth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import (
    ErrorKind,
    StorageError,
    WriteQueueError,
    WriteQueueUnavailable,
)
from layer_cache.instruments import UpstreamCounter, ms_histogram
from layer_cache.persister import Backend, Store
from layer_cache.persister_metrics import FILL_EVENT_KIND, PersisterMetrics
from layer_cache.retry import Backoff

log = structlog.get_logger(__name__)

T = TypeVar("T")

FALLBACK_ATTEMPTED_METRIC = "layer_cache_fallback_writeback_attempted"
FALLBACK_FAILED_METRIC = "layer_cache_fallback_writeback_failed"


class Outcome(StrEnum):
    """How one attempt at a queued write ended."""

    SUCCESS = "success"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class Counted:
    """A counter and the attributes it adds for one outcome (``result``, for S3)."""

    name: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueMetrics:
    """The metric names of one queue."""

    depth: str
    oldest_age: str
    enqueued: str
    blocked: str
    dead_letters: str
    outcomes: Mapping[Outcome, Counted]
    operation: str
    """``layer_cache_persistence_latency_seconds``' ``operation`` of a written entry."""
    bare_too: bool = False
    """The counters also under their names without ``_total`` (upstream's dashboard)."""
    worker_depth: str | None = None
    worker_active: str | None = None
    disk_write: str | None = None
    """The histogram of each durable enqueue's time, in ms."""


@dataclass(frozen=True)
class QueueKind:
    """One durable queue: where its file lives, what it writes to, what it is called."""

    backend: Backend
    file_name: str
    name: str
    """The queue's name in log events (``write queue held``, ``postgres retry queue stopped``)."""
    metrics: QueueMetrics


# Upstream's S3 workers (s3_worker.rs, s3_queue_processor.rs, s3_disk_store.rs) count every PUT
# attempt in s3_write_attempts by result; the dashboard reads the DLQ depth as s3_dlq_depth.
S3_ATTEMPTS_METRIC = "s3_write_attempts"
S3_WRITE_QUEUE = QueueKind(
    Backend.S3,
    "write-queue.sqlite3",
    "write queue",
    QueueMetrics(
        depth="s3_write_queue_depth",
        oldest_age="layer_cache_write_queue_oldest_age_seconds",
        enqueued="layer_cache_write_queue_enqueued",
        blocked="layer_cache_write_queue_blocked",
        dead_letters="s3_dlq_depth",
        outcomes={
            Outcome.SUCCESS: Counted(S3_ATTEMPTS_METRIC, {"result": "success"}),
            Outcome.RETRY: Counted(S3_ATTEMPTS_METRIC, {"result": "retry"}),
            Outcome.DEAD_LETTER: Counted(S3_ATTEMPTS_METRIC, {"result": "dead_letter_queue"}),
        },
        operation="write",
        worker_depth="s3_worker_queue_depth",
        worker_active="s3_worker_active_uploads",
        disk_write="s3_disk_write_duration_ms",
    ),
)

# Upstream's retry queue (retry_queue.rs) names its series layer_cache_retry_queue_{enqueued,
# success,failed,permanent_failure,depth} with backend="postgres"; the rest follow ours.
PG_RETRY_QUEUE = QueueKind(
    Backend.POSTGRES,
    "retry-queue-postgres.sqlite3",
    "postgres retry queue",
    QueueMetrics(
        depth="layer_cache_retry_queue_depth",
        oldest_age="layer_cache_retry_queue_oldest_age_seconds",
        enqueued="layer_cache_retry_queue_enqueued",
        blocked="layer_cache_retry_queue_blocked",
        dead_letters="layer_cache_retry_queue_dlq_depth",
        outcomes={
            Outcome.SUCCESS: Counted("layer_cache_retry_queue_success"),
            Outcome.RETRY: Counted("layer_cache_retry_queue_failed"),
            Outcome.DEAD_LETTER: Counted("layer_cache_retry_queue_permanent_failure"),
        },
        operation="retry",
        bare_too=True,
    ),
)

QUEUE_KINDS: tuple[QueueKind, ...] = (S3_WRITE_QUEUE, PG_RETRY_QUEUE)

DB_FILE_NAME = S3_WRITE_QUEUE.file_name

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


class Origin(StrEnum):
    """Why an entry is queued: a client's write, or a read-through write-back."""

    WRITE = "write"
    FILL = "fill"


# --------------------------------------------------------------------------------------------
# The pure part: what a failure means, backoff and caps, holds


class Verdict(StrEnum):
    """What a failed write means for the queue."""

    RETRY = "retry"
    """This entry waits its own backoff; the rest of the queue is not affected."""
    HOLD = "hold"
    """The target refuses every write until an operator acts: hold the cache type's entries."""


def verdict(kind: ErrorKind | None) -> Verdict:
    """``HOLD`` for an error an operator fixes (``ErrorKind.needs_operator``); ``RETRY`` for the
    rest: transient faults, codes we do not know (``OTHER``: they may concern this object only,
    so they must not stop the others) and bugs (``None``)."""
    return Verdict.HOLD if kind is not None and kind.needs_operator else Verdict.RETRY


@dataclass(frozen=True)
class QueueBudget:
    """How long a failing entry waits before its next attempt (after ``attempts_made``
    failures), and (opt-in) when it gives up."""

    max_attempts: int | None = None
    max_age_s: float | None = None
    backoff: Backoff = field(default_factory=lambda: Backoff(base_delay_s=0.5, max_delay_s=60.0))

    def gives_up(self, *, attempts_made: int, age_s: float) -> bool:
        """True when the entry goes to the dead letters: only past a cap that is set."""
        return (self.max_attempts is not None and attempts_made >= self.max_attempts) or (
            self.max_age_s is not None and age_s >= self.max_age_s
        )


class RequestsInFlight:
    """The requests a server is answering: it counts them (``started``, ``finished``), its
    shutdown waits for ``idle``, and a queue's drain yields while ``busy``."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def busy(self) -> bool:
        return self.count > 0

    def started(self) -> None:
        self.count += 1
        self.idle.clear()

    def finished(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.idle.set()


def drain_limit(workers: int, *, busy: bool, lag_s: float, yield_lag_s: float) -> int:
    """How many writes the queue runs at once. All its ``workers`` while the server is idle;
    while it serves requests, one, growing linearly with the lag of the oldest due entry to all
    of them at ``yield_lag_s`` (0: never yield). The drain's CPU then goes to requests during a
    burst, and a backlog still cannot grow without bound."""
    if not busy or yield_lag_s <= 0 or lag_s >= yield_lag_s:
        return workers
    return min(workers, 1 + int((workers - 1) * max(0.0, lag_s) / yield_lag_s))


@dataclass
class Hold:
    """A cache type whose target refuses writes until an operator acts."""

    reason: ErrorKind
    cause: str
    since: float
    failed_probes: int = 0
    next_probe_at: float = 0.0
    probing: bool = False


class Holds:
    """Which cache types are held, and when each may be probed next (one probe at a time,
    capped full-jitter backoff between them). Pure: the time is passed in."""

    def __init__(self, budget: QueueBudget) -> None:
        self.budget = budget
        self._holds: dict[CacheType, Hold] = {}

    @property
    def held(self) -> frozenset[CacheType]:
        return frozenset(self._holds)

    def get(self, cache_type: CacheType) -> Hold | None:
        return self._holds.get(cache_type)

    def snapshot(self) -> dict[CacheType, ErrorKind]:
        """Held cache types and why (for the gauge, read from another thread)."""
        return {cache_type: hold.reason for cache_type, hold in list(self._holds.items())}

    def hold(self, cache_type: CacheType, reason: ErrorKind, cause: str, now: float) -> bool:
        """A write of ``cache_type`` failed with an error an operator fixes. True when this
        starts a hold or changes its reason (say so once), False when it was held already."""
        current = self._holds.get(cache_type)
        if current is None:
            self._holds[cache_type] = Hold(
                reason, cause, since=now, failed_probes=1, next_probe_at=now + self._delay(1)
            )
            return True
        changed = current.reason is not reason
        current.reason, current.cause = reason, cause
        return changed

    def start_probe(self, cache_type: CacheType) -> None:
        self._holds[cache_type].probing = True

    def probe_failed(self, cache_type: CacheType, now: float) -> None:
        """The probe (or any attempt while held) did not get through: wait longer."""
        current = self._holds.get(cache_type)
        if current is None:
            return
        current.failed_probes += 1
        current.probing = False
        current.next_probe_at = now + self._delay(current.failed_probes)

    def release(self, cache_type: CacheType) -> Hold | None:
        """A write got through: the hold (if there was one) ends; returns it."""
        return self._holds.pop(cache_type, None)

    def probes_due(self, now: float) -> list[CacheType]:
        return [
            cache_type
            for cache_type, hold in self._holds.items()
            if not hold.probing and hold.next_probe_at <= now
        ]

    def next_probe_at(self) -> float | None:
        waiting = [hold.next_probe_at for hold in self._holds.values() if not hold.probing]
        return min(waiting, default=None)

    def _delay(self, failed_probes: int) -> float:
        return self.budget.backoff.delay_s(failed_probes)


# --------------------------------------------------------------------------------------------
# The store: synchronous SQLite calls, one connection behind a lock


@dataclass(frozen=True)
class Entry:
    """One queued write."""

    id: int
    cache_type: CacheType
    key: str
    value: bytes = field(repr=False)
    origin: Origin
    enqueued_at: float
    attempts: int


@dataclass(frozen=True)
class NewEntry:
    """A write to queue."""

    cache_type: CacheType
    key: str
    value: bytes = field(repr=False)
    origin: Origin


@dataclass(frozen=True)
class CacheQueueStatus:
    """One cache type's share of the queue."""

    queued: int = 0
    oldest_enqueued_at: float | None = None
    dead_letters: int = 0


def _queued(status: CacheQueueStatus) -> int:
    return status.queued


def _dead_letters(status: CacheQueueStatus) -> int:
    return status.dead_letters


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


class WriteQueueStore:
    """The queue's SQLite file. Every method is one transaction; safe from any thread."""

    def __init__(self, directory: Path, file_name: str = DB_FILE_NAME) -> None:
        self.directory = directory
        self.path = directory / file_name
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
        self._synchronous = "FULL"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(
        self,
        body: Callable[[sqlite3.Connection], T],
        *,
        write: bool = True,
        durable: bool = True,
    ) -> T:
        """``body`` in one transaction. ``durable=False`` commits without an fsync (the WAL
        still has it, so kill -9 loses nothing; the next durable commit's fsync covers it)."""
        with self._lock:
            db = self._db
            try:
                synchronous = "FULL" if durable else "NORMAL"
                if write and synchronous != self._synchronous:
                    db.execute(f"PRAGMA synchronous={synchronous}")
                    self._synchronous = synchronous
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
        """Queue a write (committed and fsynced on return); False if it was already queued."""
        return self.enqueue_many([NewEntry(cache_type, key, value, origin)], now)[0]

    def enqueue_many(self, entries: Sequence[NewEntry], now: float) -> list[bool]:
        """Queue writes in one transaction, one fsync; per entry, False if already queued."""

        def insert(db: sqlite3.Connection) -> list[bool]:
            return [
                db.execute(
                    "INSERT OR IGNORE INTO queue (cache_type, key, value, origin, enqueued_at,"
                    " next_attempt_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.cache_type.value, entry.key, entry.value, entry.origin.value, now, now),
                ).rowcount
                == 1
                for entry in entries
            ]

        return self._run(insert)

    def claim_due(
        self,
        now: float,
        limit: int,
        exclude: Iterable[int],
        held: Iterable[CacheType] = (),
    ) -> list[Entry]:
        """Up to ``limit`` entries due at ``now``, oldest first, not in ``exclude`` and not of a
        ``held`` cache type."""
        excluded, types = list(exclude), [cache_type.value for cache_type in held]
        rows = self._run(
            lambda db: db.execute(
                "SELECT id, cache_type, key, value, origin, enqueued_at, attempts FROM queue"
                f" WHERE next_attempt_at <= ? AND id NOT IN ({_marks(excluded)})"
                f" AND cache_type NOT IN ({_marks(types)}) ORDER BY id LIMIT ?",
                (now, *excluded, *types, limit),
            ).fetchall(),
            write=False,
        )
        return [_entry(row) for row in rows]

    def claim_probe(self, cache_type: CacheType, exclude: Iterable[int]) -> Entry | None:
        """The entry of ``cache_type`` to probe a held target with: the one waiting longest for
        its next attempt (so a refused object does not keep the others from being tried)."""
        excluded = list(exclude)
        row = self._run(
            lambda db: db.execute(
                "SELECT id, cache_type, key, value, origin, enqueued_at, attempts FROM queue"
                f" WHERE cache_type = ? AND id NOT IN ({_marks(excluded)})"
                " ORDER BY next_attempt_at, id LIMIT 1",
                (cache_type.value, *excluded),
            ).fetchone(),
            write=False,
        )
        return None if row is None else _entry(row)

    def oldest_due(
        self, now: float, exclude: Iterable[int], held: Iterable[CacheType] = ()
    ) -> float | None:
        """When the first due entry (in enqueue order) not in ``exclude`` and not held was
        enqueued; None if none is due. A scan in id order that stops at the first due entry,
        as ``claim_due``'s (the due-time index would sort every due entry first)."""
        excluded, types = list(exclude), [cache_type.value for cache_type in held]
        row = self._run(
            lambda db: db.execute(
                "SELECT enqueued_at FROM queue NOT INDEXED WHERE next_attempt_at <= ?"
                f" AND id NOT IN ({_marks(excluded)}) AND cache_type NOT IN ({_marks(types)})"
                " ORDER BY id LIMIT 1",
                (now, *excluded, *types),
            ).fetchone(),
            write=False,
        )
        return None if row is None else float(row[0])

    def next_due_at(self, exclude: Iterable[int], held: Iterable[CacheType] = ()) -> float | None:
        """When the next entry not in ``exclude`` and not held is due; None if there is none."""
        excluded, types = list(exclude), [cache_type.value for cache_type in held]
        row = self._run(
            lambda db: db.execute(
                f"SELECT min(next_attempt_at) FROM queue WHERE id NOT IN ({_marks(excluded)})"
                f" AND cache_type NOT IN ({_marks(types)})",
                (*excluded, *types),
            ).fetchone(),
            write=False,
        )
        return None if row is None or row[0] is None else float(row[0])

    def complete(self, entry_id: int) -> None:
        self._run(
            lambda db: db.execute("DELETE FROM queue WHERE id = ?", (entry_id,)), durable=False
        )

    def retry_later(self, entry_id: int, attempts: int, next_attempt_at: float, error: str) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE queue SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                (attempts, next_attempt_at, error, entry_id),
            ),
            durable=False,
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

        self._run(move, durable=False)

    def make_all_due(self, now: float, cache_type: CacheType | None = None) -> None:
        """Every entry (or every entry of ``cache_type``) due at ``now``."""
        where, args = ("AND cache_type = ?", (cache_type.value,)) if cache_type else ("", ())
        self._run(
            lambda db: db.execute(
                f"UPDATE queue SET next_attempt_at = ? WHERE next_attempt_at > ? {where}",
                (now, now, *args),
            ),
            durable=False,
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


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(row[0], CacheType(row[1]), row[2], row[3], Origin(row[4]), row[5], row[6])


def queue_status(
    directory: Path, kind: QueueKind = S3_WRITE_QUEUE
) -> dict[CacheType, CacheQueueStatus]:
    """The status of one queue in ``directory`` (for the CLI; opens nothing else)."""
    store = WriteQueueStore(directory, kind.file_name)
    try:
        return store.status()
    finally:
        store.close()


def replay_dead_letters(
    directory: Path, cache_type: CacheType | None, kind: QueueKind = S3_WRITE_QUEUE
) -> int:
    """Move one queue's dead letters in ``directory`` back into it; returns how many."""
    store = WriteQueueStore(directory, kind.file_name)
    try:
        return store.replay(cache_type, time.time())
    finally:
        store.close()


def existing_queues(directory: Path) -> list[QueueKind]:
    """The queues that have a file in ``directory`` (the S3 queue's first)."""
    return [kind for kind in QUEUE_KINDS if (directory / kind.file_name).exists()]


# --------------------------------------------------------------------------------------------
# The service: enqueue from requests (group commit), drain with workers


@dataclass
class _Waiting:
    entry: NewEntry
    added: asyncio.Future[bool]


_YIELD_RECHECK_S = 0.05
"""While the drain yields to requests and is at its limit: how soon it looks again."""


def _read_outcome(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


class WriteBehind:
    """One durable queue and its workers; ``start`` them, ``drain`` them on shutdown."""

    def __init__(
        self,
        directory: Path,
        targets: Mapping[CacheType, Store],
        meter: Meter,
        *,
        workers: int,
        budget: QueueBudget,
        kind: QueueKind = S3_WRITE_QUEUE,
        requests: RequestsInFlight | None = None,
        yield_lag_s: float = 0.0,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.kind = kind
        self.requests = requests
        self.yield_lag_s = yield_lag_s
        self.store = WriteQueueStore(directory, kind.file_name)
        self.targets = targets
        self.worker_count = workers
        self.budget = budget
        self.holds = Holds(budget)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-queue")
        self._wake = asyncio.Event()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._probes: dict[int, CacheType] = {}  # entry id → the held cache type it probes
        self._failed_before: set[int] = set()  # entries whose failure was already logged
        self._fills: set[asyncio.Task[None]] = set()
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False
        self._active: dict[CacheType, int] = {}  # entries in flight per cache type
        self._write_metrics = PersisterMetrics(meter)
        self._create_instruments(meter)

    def _create_instruments(self, meter: Meter) -> None:
        names = self.kind.metrics
        what = "S3 PUTs" if self.kind.backend is Backend.S3 else "Postgres rows"
        self._enqueued = UpstreamCounter(
            meter,
            names.enqueued,
            description=f"{what} added to the durable queue",
            bare_too=names.bare_too,
        )
        descriptions = {
            Outcome.SUCCESS: f"queued {what} that were written",
            Outcome.RETRY: f"queued {what}: attempts that failed and wait",
            Outcome.DEAD_LETTER: f"queued {what} moved to the dead letters",
        }
        counters: dict[str, UpstreamCounter] = {}
        for outcome, counted in names.outcomes.items():
            if counted.name not in counters:  # one counter, told apart by its attributes
                description = (
                    f"attempts at queued {what}, by result"
                    if counted.attributes
                    else descriptions[outcome]
                )
                counters[counted.name] = UpstreamCounter(
                    meter, counted.name, description=description, bare_too=names.bare_too
                )
        self._outcomes = {
            outcome: (counters[counted.name], counted.attributes)
            for outcome, counted in names.outcomes.items()
        }
        self._fill_attempted = meter.create_counter(
            FALLBACK_ATTEMPTED_METRIC, description="values offered for write-back"
        )
        self._fill_failed = meter.create_counter(
            FALLBACK_FAILED_METRIC, description="write-backs that did not complete"
        )
        self._disk_write = (
            None
            if names.disk_write is None
            else ms_histogram(meter, names.disk_write, "time to commit an entry durably")
        )
        meter.create_observable_gauge(
            names.depth,
            [partial(self._observe_count, _queued)],
            description=f"{what} waiting in the queue",
        )
        meter.create_observable_gauge(
            names.oldest_age,
            [self._observe_oldest_age],
            description="age of the oldest entry in the queue",
            unit="s",
        )
        meter.create_observable_gauge(
            names.blocked,
            [self._observe_blocked],
            description="1 while the target refuses writes until an operator acts (reason)",
        )
        meter.create_observable_gauge(
            names.dead_letters,
            [partial(self._observe_count, _dead_letters)],
            description=f"queued {what} in the dead letters",
        )
        if names.worker_depth is not None and names.worker_active is not None:
            meter.create_observable_gauge(
                names.worker_depth,
                [self._observe_worker_depth],
                description=f"{what} waiting, not in flight (one dispatcher: worker_id 0)",
            )
            meter.create_observable_gauge(
                names.worker_active,
                [self._observe_worker_active],
                description=f"{what} in flight (one dispatcher: worker_id 0)",
            )

    def _count(self, outcome: Outcome, cache_type: CacheType) -> None:
        counter, attributes = self._outcomes[outcome]
        counter.add(1, self._attributes(cache_type) | dict(attributes))

    def _attributes(self, cache_type: CacheType) -> dict[str, str]:
        return {
            "cache_name": CACHE_SPECS[cache_type].table,
            "cache_type": cache_type.value,
            "backend": self.kind.backend.value,
        }

    # Observations run on the exporter's thread: they read the file under the store's lock.

    def _status_or_empty(self) -> dict[CacheType, CacheQueueStatus]:
        if self._closed:
            return {}
        try:
            return self.store.status()
        except (WriteQueueError, sqlite3.ProgrammingError):
            return {}

    def _observe_count(
        self, count: Callable[[CacheQueueStatus], int], _options: CallbackOptions
    ) -> Iterable[Observation]:
        """One of each cache type's ``CacheQueueStatus`` counts (queued, dead letters)."""
        status = self._status_or_empty()
        for cache_type in self.targets:
            counted = count(status.get(cache_type, CacheQueueStatus()))
            yield Observation(counted, self._attributes(cache_type))

    def _observe_oldest_age(self, _options: CallbackOptions) -> Iterable[Observation]:
        status = self._status_or_empty()
        now = time.time()
        for cache_type in self.targets:
            oldest = status.get(cache_type, CacheQueueStatus()).oldest_enqueued_at
            age = 0.0 if oldest is None else max(0.0, now - oldest)
            yield Observation(age, self._attributes(cache_type))

    def _observe_worker_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        status = self._status_or_empty()
        active = dict(self._active)
        for cache_type in self.targets:
            queued = status.get(cache_type, CacheQueueStatus()).queued
            waiting = max(0, queued - active.get(cache_type, 0))
            yield Observation(waiting, self._worker_attributes(cache_type))

    def _observe_worker_active(self, _options: CallbackOptions) -> Iterable[Observation]:
        active = dict(self._active)
        for cache_type in self.targets:
            yield Observation(active.get(cache_type, 0), self._worker_attributes(cache_type))

    def _worker_attributes(self, cache_type: CacheType) -> dict[str, str]:
        # One dispatcher drains every cache type's entries (upstream: workers per cache).
        return self._attributes(cache_type) | {"worker_id": "0"}

    def _observe_blocked(self, _options: CallbackOptions) -> Iterable[Observation]:
        held = self.holds.snapshot()
        for cache_type in self.targets:
            reason = held.get(cache_type)
            if reason is None:
                yield Observation(0, self._attributes(cache_type))
            else:
                yield Observation(1, self._attributes(cache_type) | {"reason": reason.value})

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
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"{self.kind.name} dispatch")

    async def enqueue(self, store: Store, key: str, value: bytes) -> None:
        """Durably queue a client's write; ``WriteQueueError`` (answered 503) if it cannot be."""
        await self._enqueue(store.cache_type, key, value, Origin.WRITE)

    async def _enqueue(self, cache_type: CacheType, key: str, value: bytes, origin: Origin) -> bool:
        if self._closed:
            raise WriteQueueError(f"the {self.kind.name} is closed: the server is shutting down")
        waiting = _Waiting(
            NewEntry(cache_type, key, value, origin), asyncio.get_running_loop().create_future()
        )
        # A caller that gave up leaves its outcome unread: read it here, so none goes unseen.
        waiting.added.add_done_callback(_read_outcome)
        self._waiting.append(waiting)
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_waiting())
        started = time.perf_counter()
        try:
            # Shielded: a caller that gives up does not take the entry out of the commit.
            added = await asyncio.shield(waiting.added)
        except WriteQueueError as exc:
            self._committed(cache_type, started, "write_error")
            log.error(
                f"{self.kind.name} enqueue failed",
                cache_type=cache_type.value,
                key=key,
                directory=str(self.store.directory),
                cause=str(exc),
            )
            raise
        self._committed(cache_type, started, "success")
        if added:
            self._enqueued.add(1, self._attributes(cache_type))
            self._wake.set()
        return added

    def _committed(self, cache_type: CacheType, started: float, status: str) -> None:
        """An enqueue's commit ended (``success`` or ``write_error``, upstream's statuses)."""
        if self._disk_write is not None:
            self._disk_write.record(
                (time.perf_counter() - started) * 1000,
                self._attributes(cache_type) | {"status": status},
            )

    async def _commit_waiting(self) -> None:
        """Commit what waits, one transaction (one fsync) per round, until nothing waits."""
        batch: list[_Waiting] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    added = await self._db(
                        self.store.enqueue_many, [w.entry for w in batch], time.time()
                    )
                except Exception as exc:  # every caller of the round hears of it
                    failure = (
                        exc
                        if isinstance(exc, WriteQueueError)
                        else WriteQueueError(f"{self.kind.name} {self.store.path}: {exc!r}")
                    )
                    for waiting in batch:
                        if not waiting.added.done():
                            waiting.added.set_exception(failure)
                    continue
                for waiting, was_added in zip(batch, added, strict=True):
                    if not waiting.added.done():
                        waiting.added.set_result(was_added)
        finally:
            self._committer = None
            for waiting in batch:  # cancelled mid-round: its callers must not wait forever
                if not waiting.added.done():
                    waiting.added.cancel()

    def offer(self, store: Store, key: str, value: bytes) -> None:
        """Queue a read-through write-back without making the read wait."""
        task = asyncio.create_task(self._fill(store.cache_type, key, value))
        self._fills.add(task)
        task.add_done_callback(self._fills.discard)

    async def _fill(self, cache_type: CacheType, key: str, value: bytes) -> None:
        try:
            added = await self._enqueue(cache_type, key, value, Origin.FILL)
        except WriteQueueError:
            self._fill_attempted.add(1, self._attributes(cache_type))
            self._fill_failed.add(1, self._attributes(cache_type))
            return
        if added:
            self._fill_attempted.add(1, self._attributes(cache_type))

    async def _dispatch(self) -> None:
        await self._db(self.store.make_all_due, time.time())  # a restart retries everything now
        while True:
            self._wake.clear()
            free = self.worker_count - len(self._in_flight)
            timeout: float | None = None
            if (
                free > 0
                and self.requests is not None
                and self.yield_lag_s > 0
                and self.requests.busy
            ):
                with contextlib.suppress(WriteQueueError):  # the claim below reports it
                    free = await self._yielding_limit() - len(self._in_flight)
                if free <= 0:  # look again soon: the requests may be over by then
                    timeout = _YIELD_RECHECK_S
            if free > 0:
                try:
                    claimed = await self._claim(free)
                    held = self.holds.held
                    next_due = await self._db(self.store.next_due_at, list(self._in_flight), held)
                except WriteQueueError as exc:
                    log.error(f"{self.kind.name} unreadable; retrying in 1 s", cause=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                for entry in claimed:
                    self._active[entry.cache_type] = self._active.get(entry.cache_type, 0) + 1
                    self._in_flight[entry.id] = asyncio.create_task(self._deliver(entry))
                if claimed:
                    continue
                # Until the next entry or probe is due, and at least every max_delay_s: a replay
                # by another process (the CLI) adds entries without waking this one.
                now = time.time()
                timeout = self.budget.backoff.max_delay_s
                for due in (next_due, self.holds.next_probe_at()):
                    if due is not None:
                        timeout = min(timeout, max(0.0, due - now) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _yielding_limit(self) -> int:
        """``drain_limit`` while the server is busy, from the lag of the oldest due entry."""
        now = time.time()
        head = await self._db(self.store.oldest_due, now, list(self._in_flight), self.holds.held)
        lag = 0.0 if head is None else now - head
        return drain_limit(self.worker_count, busy=True, lag_s=lag, yield_lag_s=self.yield_lag_s)

    async def _claim(self, free: int) -> list[Entry]:
        """Due entries of targets not held, then one probe per held target whose turn it is."""
        now = time.time()
        claimed = await self._db(
            self.store.claim_due, now, free, list(self._in_flight), self.holds.held
        )
        for cache_type in self.holds.probes_due(now)[: free - len(claimed)]:
            probe = await self._db(self.store.claim_probe, cache_type, list(self._in_flight))
            if probe is None:  # nothing of it left queued (all in flight)
                self.holds.probe_failed(cache_type, now)
                continue
            self.holds.start_probe(cache_type)
            self._probes[probe.id] = cache_type
            claimed.append(probe)
        return claimed

    async def _deliver(self, entry: Entry) -> None:
        try:
            await self._attempt(entry)
        except WriteQueueError as exc:  # the entry stays queued; do not spin on a broken disk
            log.error(f"{self.kind.name} update failed; retrying in 1 s", cause=str(exc))
            await asyncio.sleep(1.0)
        finally:
            self._in_flight.pop(entry.id, None)
            self._active[entry.cache_type] -= 1
            probed = self._probes.pop(entry.id, None)
            if probed is not None:
                hold = self.holds.get(probed)
                if hold is not None and hold.probing:  # it ended without an answer
                    self.holds.probe_failed(probed, time.time())
            self._wake.set()

    async def _attempt(self, entry: Entry) -> None:
        cache_type = entry.cache_type
        kind: ErrorKind | None
        began = time.perf_counter()
        try:
            await self.targets[cache_type].put(entry.key, entry.value)
        except StorageError as exc:
            self._measure(entry, began, exc)
            error, kind, before_retry = f"{exc.kind.value}: {exc}", exc.kind, exc.before_retry
        except Exception as exc:  # a bug must not kill the worker: the entry is kept
            self._measure(entry, began, exc)
            if entry.id not in self._failed_before:
                log.exception(
                    f"{self.kind.name} entry failed unexpectedly", cache_type=cache_type.value
                )
            error, kind, before_retry = f"internal: {exc!r}", None, None
        else:
            self._measure(entry, began, None)
            await self._db(self.store.complete, entry.id)
            self._count(Outcome.SUCCESS, cache_type)
            self._failed_before.discard(entry.id)
            log.debug(f"{self.kind.name} entry written", cache_type=cache_type.value, key=entry.key)
            await self._release(cache_type)
            return
        await self._failed(entry, error, kind, before_retry)

    def _measure(self, entry: Entry, began: float, failure: BaseException | None) -> None:
        """Upstream's write series for one attempt: its time, and a written entry's latency."""
        spec = CACHE_SPECS[entry.cache_type]
        event_kind = FILL_EVENT_KIND if entry.origin is Origin.FILL else spec.write_event_kind
        backend = self.kind.backend.value
        self._write_metrics.wrote(
            spec.table,
            backend,
            event_kind,
            elapsed_s=time.perf_counter() - began,
            failure=failure,
        )
        if failure is None:
            latency_s = time.time() - entry.enqueued_at
            operation = self.kind.metrics.operation
            self._write_metrics.persisted(spec.table, backend, operation, event_kind, latency_s)

    async def _release(self, cache_type: CacheType) -> None:
        hold = self.holds.release(cache_type)
        if hold is None:
            return
        await self._db(self.store.make_all_due, time.time(), cache_type)
        log.info(
            f"{self.kind.name} resumed",
            cache_type=cache_type.value,
            backend=self.kind.backend.value,
            held_s=round(time.time() - hold.since, 3),
            reason=hold.reason.value,
        )

    async def _failed(
        self,
        entry: Entry,
        error: str,
        kind: ErrorKind | None,
        before_retry: Callable[[], Awaitable[None]] | None,
    ) -> None:
        cache_type = entry.cache_type
        attributes = self._attributes(cache_type)
        attempts = entry.attempts + 1
        now = time.time()
        if entry.id in self._probes:  # the held target still refuses (or failed otherwise)
            self.holds.probe_failed(cache_type, now)
        if kind is not None and verdict(kind) is Verdict.HOLD:
            if self.holds.hold(cache_type, kind, error, now):
                log.warning(
                    f"{self.kind.name} held",
                    cache_type=cache_type.value,
                    backend=self.kind.backend.value,
                    reason=kind.value,
                    cause=error,
                    queued=await self._db(self.store.depth),
                    note="an operator must fix this; one write is retried at a time, at most "
                    f"every {self.budget.backoff.max_delay_s:g} s, until one gets through",
                )
        elif (kind is None or not kind.retryable) and entry.id not in self._failed_before:
            self._failed_before.add(entry.id)  # one line per entry, not per attempt
            log.warning(
                f"{self.kind.name} entry failing",
                cache_type=cache_type.value,
                key=entry.key,
                cause=error,
                note="retried with backoff; the rest of the queue is not held",
            )
        if self.budget.gives_up(attempts_made=attempts, age_s=now - entry.enqueued_at):
            await self._db(self.store.dead_letter, entry.id, attempts, error, now)
            self._failed_before.discard(entry.id)
            self._count(Outcome.DEAD_LETTER, cache_type)
            if entry.origin is Origin.FILL:
                self._fill_failed.add(1, attributes)
            log.warning(
                f"{self.kind.name} entry dead-lettered",
                cache_type=cache_type.value,
                key=entry.key,
                attempts=attempts,
                cause=error,
            )
            return
        if before_retry is not None:
            with contextlib.suppress(StorageError):
                await before_retry()
        delay = self.budget.backoff.delay_s(attempts)
        await self._db(self.store.retry_later, entry.id, attempts, now + delay, error)
        self._count(Outcome.RETRY, cache_type)
        log.debug(
            f"{self.kind.name} entry retrying",
            cache_type=cache_type.value,
            key=entry.key,
            attempt=attempts,
            delay_s=round(delay, 3),
            cause=error,
        )

    async def drain(self, within_s: float) -> int:
        """Try to empty the queue within ``within_s`` s, then stop; returns entries left."""
        if self._fills:
            await asyncio.gather(*self._fills, return_exceptions=True)
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        await self._db(self.store.make_all_due, time.time())
        for cache_type in self.holds.held:  # one more try each, now
            hold = self.holds.get(cache_type)
            if hold is not None and not hold.probing:
                hold.next_probe_at = 0.0
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
                f"{self.kind.name} stopped",
                remaining=remaining,
                directory=str(self.store.directory),
                note="kept on disk; drained on the next start",
            )
        else:
            log.info(f"{self.kind.name} stopped", remaining=0)
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
        self._active.clear()
        self._probes.clear()
