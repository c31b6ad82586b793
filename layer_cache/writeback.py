"""Fill on read: a bounded, deduplicated queue that copies values into a backend that missed them.

In ``S3Primary`` a read that misses S3 and hits Postgres offers the value here; a fixed number of
worker tasks PUT it to S3 through the store's one write path (first write wins), each under
``call_with_retries``. This fills S3 with what is actually read, ahead of (or instead of) a full
backfill, as upstream's ``0b8c57178`` does with its disk queue.

Bounds and deduplication:

* At most ``capacity`` jobs and ``max_bytes`` of values are queued; an offer beyond either is
  dropped, counted as failed and logged at warning (``fallback write-back dropped``). Reads never
  wait for the queue.
* A (cache type, key) already queued or in flight is not queued again (and not counted again).

Shutdown: ``drain(within_s)`` refuses new offers, waits for the queued and in-flight jobs up to
``within_s``, then cancels the workers; jobs left unfinished are counted as failed and logged once
(``fallback write-back abandoned``). Nothing is persisted: an abandoned value is written back
again the next time it is read.

Metrics (OpenTelemetry counters, upstream's names), attributes ``cache_name`` (the table) and
``backend`` (``"s3"``):

* ``layer_cache_fallback_writeback_attempted``: a value offered for write-back (not a duplicate).
* ``layer_cache_fallback_writeback_failed``: an attempted write-back that did not reach the
  backend: dropped (queue full), failed after retries, or abandoned at shutdown.

Logs: ``debug`` per completed write-back, ``warning`` for retries, drops, failures and abandons.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import structlog
from opentelemetry.metrics import Meter

from layer_cache.cache_types import CacheType
from layer_cache.errors import StorageError
from layer_cache.persister import Store
from layer_cache.retry import RetryPolicy, call_with_retries

log = structlog.get_logger(__name__)

ATTEMPTED_METRIC = "layer_cache_fallback_writeback_attempted"
FAILED_METRIC = "layer_cache_fallback_writeback_failed"


@dataclass(frozen=True)
class _Job:
    store: Store
    key: str
    value: bytes = field(repr=False)

    @property
    def ident(self) -> tuple[CacheType, str]:
        return self.store.cache_type, self.key

    @property
    def attributes(self) -> dict[str, str]:
        return {"cache_name": self.store.cache_name, "backend": self.store.backend.value}


class FallbackWriteBack:
    """The write-back queue and its workers; ``start`` them, ``drain`` them on shutdown."""

    def __init__(
        self,
        meter: Meter,
        *,
        capacity: int,
        max_bytes: int,
        workers: int,
        policy: RetryPolicy,
    ) -> None:
        if capacity < 1 or workers < 1 or max_bytes < 1:
            raise ValueError("capacity, max_bytes and workers must be at least 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.worker_count = workers
        self.policy = policy
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=capacity)
        self._pending: dict[tuple[CacheType, str], _Job] = {}  # queued or in flight
        self._pending_bytes = 0
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._attempted = meter.create_counter(
            ATTEMPTED_METRIC, unit="1", description="values offered for fallback write-back"
        )
        self._failed = meter.create_counter(
            FAILED_METRIC, unit="1", description="fallback write-backs that did not complete"
        )

    @property
    def pending(self) -> int:
        """Jobs queued or in flight."""
        return len(self._pending)

    def start(self) -> None:
        """Start the fixed set of workers."""
        if self._workers:
            raise RuntimeError("write-back workers already started")
        self._workers = [
            asyncio.create_task(self._work(), name=f"fallback-writeback-{index}")
            for index in range(self.worker_count)
        ]

    def offer(self, store: Store, key: str, value: bytes) -> None:
        """Queue ``value`` for ``store`` unless it is a duplicate; never waits."""
        job = _Job(store, key, value)
        if job.ident in self._pending:
            return
        self._attempted.add(1, job.attributes)
        if self._closed:
            self._drop(job, "shutting_down")
        elif self._pending_bytes + len(value) > self.max_bytes:
            self._drop(job, "queue_bytes_full")
        else:
            try:
                self._queue.put_nowait(job)
            except asyncio.QueueFull:
                self._drop(job, "queue_full")
                return
            self._pending[job.ident] = job
            self._pending_bytes += len(value)

    def _drop(self, job: _Job, reason: str) -> None:
        self._failed.add(1, job.attributes)
        log.warning(
            "fallback write-back dropped",
            reason=reason,
            cache_type=job.store.cache_type.value,
            key=job.key,
            queued=len(self._pending),
            queued_bytes=self._pending_bytes,
        )

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                await self._write(job)
            finally:
                self._pending.pop(job.ident, None)
                self._pending_bytes -= len(job.value)
                self._queue.task_done()

    async def _write(self, job: _Job) -> None:
        def on_retry(exc: StorageError, attempt: int, delay_s: float) -> None:
            log.warning(
                "fallback write-back retrying",
                cache_type=job.store.cache_type.value,
                key=job.key,
                attempt=attempt,
                delay_s=round(delay_s, 3),
                error_class=exc.kind.value,
            )

        try:
            await call_with_retries(
                partial(job.store.put, job.key, job.value), self.policy, on_retry=on_retry
            )
        except StorageError as exc:
            self._failed.add(1, job.attributes)
            log.warning(
                "fallback write-back failed",
                cache_type=job.store.cache_type.value,
                key=job.key,
                error_class=exc.kind.value,
                cause=str(exc),
            )
        except Exception:  # a bug must not kill the worker; it is logged, and counted
            self._failed.add(1, job.attributes)
            log.exception(
                "fallback write-back failed", cache_type=job.store.cache_type.value, key=job.key
            )
        else:
            log.debug(
                "fallback write-back done", cache_type=job.store.cache_type.value, key=job.key
            )

    async def drain(self, within_s: float) -> int:
        """Finish queued and in-flight jobs within ``within_s`` s, then stop; returns how many
        were abandoned."""
        self._closed = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, within_s)):
                    await self._queue.join()
        abandoned = list(self._pending.values())  # before cancelling: cancelled jobs leave it
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._pending.clear()
        self._pending_bytes = 0
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
        if abandoned:
            for job in abandoned:
                self._failed.add(1, job.attributes)
            per_cache = Counter(job.store.cache_type.value for job in abandoned)
            log.warning(
                "fallback write-back abandoned",
                count=len(abandoned),
                per_cache_type=dict(per_cache),
                reason="grace period over",
            )
        return len(abandoned)
