"""The per-cache loop: list rows newest first, copy each with bounded, adaptive concurrency.

How it works: rows with ``created_at < cutoff`` are listed in pages of ``key_batch_size`` by the
unique cursor ``(created_at, key)`` descending, so rows sharing a timestamp are never skipped at
a page boundary. For each row an upload slot is acquired *before* its task is created; the task
HEADs the object, skips it when the stored size equals the row's ``octet_length(value)``,
otherwise reads the value and PUTs it with ``Content-MD5`` (re-uploading a wrong-sized object
counts as *repaired*; a row deleted in between counts as *vanished*). Every finished row is
reported to the ``CheckpointTracker``.

Faults: each storage call runs under the retry policy (backoff with full jitter, bounded by
attempts and seconds); retries are counted per error class. Throttling halves this cache's
upload limit and a run of successes raises it again (``AdaptiveLimit``). A lost Postgres
connection is replaced by the pool and the call re-run. A non-retryable error, or a retryable
one past its budget, fails the cache.

Progress: the low-water position is saved to the progress store before each new page is listed
and when the cache stops; a re-run with the same arguments starts after the saved position
(``--backfill-restart`` ignores it). A completed cache is recorded as such and not walked again.

Shutdown: when the stop event is set the loop stops dispatching and lets in-flight uploads
finish; if the coordinator cancels it (grace period over, or another cache failed) the in-flight
uploads are cancelled with it. Either way progress is saved (shielded from the cancellation) and
the last line says where to resume: ``backfill shutting down gracefully`` (stop requested) or
``backfill stopped`` (cancelled or failed). Only a cache whose rows were all listed and finished
logs ``completed backfill``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.pg import PgLayer, RowRef
from layer_cache.retry import AdaptiveLimit, call_with_retries
from layer_cache.s3 import S3Layer
from migrations_mode.checkpoint import CheckpointTracker, Position
from migrations_mode.config import BackfillConfig, format_checkpoint
from migrations_mode.errors import CacheBackfillFailed, first_exception
from migrations_mode.progress import BackfillMetrics, CacheProgress, CacheStats
from migrations_mode.progress_store import ProgressKey, ProgressStore, SavedProgress

log = structlog.get_logger(__name__)

T = TypeVar("T")


def resume_flag(checkpoint: datetime) -> str:
    """The exact flag that resumes from a checkpoint."""
    return f"--backfill-cutoff-timestamp '{format_checkpoint(checkpoint)}'"


class CacheBackfill:
    """Copies one cache type's rows below the cutoff into its bucket."""

    def __init__(
        self,
        cache_type: CacheType,
        *,
        pg: PgLayer,
        s3: S3Layer,
        config: BackfillConfig,
        stop: asyncio.Event,
        metrics: BackfillMetrics,
        progress_store: ProgressStore,
    ) -> None:
        self.cache_type = cache_type
        self.pg = pg
        self.s3 = s3
        self.config = config
        self.tracker = CheckpointTracker(config.cutoff)
        self.progress = CacheProgress(cache_type, metrics)
        self.upload_limit = AdaptiveLimit(config.max_concurrent_uploads)
        self.completed = False
        self._stop = stop
        self._store = progress_store
        self._progress_key = ProgressKey(cache_type, config.cutoff)
        self._rows_done_before = 0
        self._saved_position: Position | None = None

    @property
    def stats(self) -> CacheStats:
        """The counts so far."""
        return self.progress.stats

    @property
    def checkpoint_timestamp(self) -> datetime:
        """The cutoff that resumes this cache without loss."""
        return self.tracker.checkpoint_timestamp

    async def run(self) -> CacheStats:
        """Copy every row; returns the stats, raises ``CacheBackfillFailed`` on failure."""
        structlog.contextvars.bind_contextvars(cache_type=self.cache_type.value)
        resume_after = await self._load_progress()
        if self.completed:
            self.progress.finish()
            log.info("completed backfill", already_complete=True, progress_store=self._store.kind)
            return self.stats
        log.info(
            "starting backfill",
            cutoff_timestamp=format_checkpoint(self.config.cutoff),
            max_concurrent=self.config.max_concurrent_uploads,
            key_batch_size=self.config.key_batch_size,
            bucket=self.s3.bucket,
            resume_after_key=resume_after.key if resume_after else None,
        )
        checkpoints = asyncio.create_task(self._log_checkpoints())
        outcome = "stopped"
        try:
            await self._copy_all(resume_after)
            outcome = "completed" if self.completed else "stopped"
        except ExceptionGroup as group:
            outcome = "failed"
            raise first_exception(group) from None
        except CacheBackfillFailed:
            outcome = "failed"
            raise
        finally:
            checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoints
            self.progress.finish()
            # Runs even when this task is being cancelled: the save is its own shielded task.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._save_progress())
            self._log_outcome(outcome)
        return self.stats

    async def _load_progress(self) -> Position | None:
        if self.config.restart:
            log.info("ignoring saved progress (--backfill-restart)")
            return None
        saved = await self._storage_call(lambda: self._store.load(self._progress_key), None)
        if saved is None:
            return None
        self.completed = saved.completed
        self._rows_done_before = saved.rows_done
        self._saved_position = saved.position
        if saved.position is not None:
            self.tracker = CheckpointTracker(self.config.cutoff, low_water=saved.position)
            log.info(
                "resuming from saved progress",
                progress_store=self._store.kind,
                checkpoint_timestamp=format_checkpoint(self.tracker.checkpoint_timestamp),
                rows_done_before=saved.rows_done,
            )
        return saved.position

    async def _save_progress(self) -> None:
        position = self.tracker.low_water
        if position == self._saved_position and not self.completed:
            return
        record = SavedProgress(
            position, self.completed, self._rows_done_before + self.stats.processed
        )
        try:
            await self._storage_call(lambda: self._store.save(self._progress_key, record), None)
        except CacheBackfillFailed as exc:
            # Losing a save costs re-work on the next run, never data: carry on.
            log.warning("could not save backfill progress", error=str(exc.cause))
            return
        self._saved_position = position

    async def _copy_all(self, resume_after: Position | None) -> None:
        listing_done = False
        after = (resume_after.created_at, resume_after.key) if resume_after else None
        async with asyncio.TaskGroup() as uploads:
            while not listing_done and not self._stop.is_set():
                batch = await self._list_page(after)
                log.debug("fetched key batch", rows=len(batch))
                for row in batch:
                    await self.upload_limit.acquire()
                    if self._stop.is_set():
                        self.upload_limit.release()
                        return  # in-flight uploads drain as the task group exits
                    sequence = self.tracker.dispatch(Position(row.created_at, row.key))
                    uploads.create_task(self._copy_row(row, sequence))
                listing_done = len(batch) < self.config.key_batch_size
                if batch:
                    after = (batch[-1].created_at, batch[-1].key)
                await self._save_progress()
        self.completed = listing_done and self.tracker.in_flight == 0

    async def _list_page(self, after: tuple[datetime, str] | None) -> list[RowRef]:
        return await self._storage_call(
            lambda: self.pg.list_newest_first(
                cutoff=self.config.cutoff, after=after, limit=self.config.key_batch_size
            ),
            None,
        )

    async def _copy_row(self, row: RowRef, sequence: int) -> None:
        try:
            stored_size = await self._storage_call(lambda: self.s3.head(row.key), row.key)
            if stored_size == row.size:
                log.debug("skipping key already in S3", key=row.key, size=row.size)
                self.progress.skipped()
            else:
                value = await self._storage_call(lambda: self.pg.fetch_value(row.key), row.key)
                if value is None:
                    log.info("row vanished before it was read", key=row.key)
                    self.progress.vanished()
                else:
                    await self._storage_call(lambda: self.s3.put(row.key, value), row.key)
                    log.debug("uploaded to S3", key=row.key, size=len(value))
                    self.progress.uploaded(len(value), repaired=stored_size is not None)
            self.tracker.finish(sequence)
        finally:
            self.upload_limit.release()

    async def _storage_call(self, call: Callable[[], Awaitable[T]], key: str | None) -> T:
        """One storage call under the retry policy, with retries counted and throttling fed back."""

        def on_retry(exc: StorageError, attempt: int, delay_s: float) -> None:
            self.progress.retried(exc.kind.value)
            if exc.kind is ErrorKind.THROTTLED:
                self.upload_limit.record_throttle()
            log.warning(
                "retrying storage call",
                error_class=exc.kind.value,
                attempt=attempt,
                delay_s=round(delay_s, 3),
                key=key,
                error=str(exc),
                upload_limit=self.upload_limit.limit,
            )

        try:
            result = await call_with_retries(call, self.config.retry_policy, on_retry=on_retry)
        except StorageError as exc:
            self.progress.failed(exc.kind.value)
            raise CacheBackfillFailed(self.cache_type, key, exc) from exc
        self.upload_limit.record_success()
        return result

    async def _log_checkpoints(self) -> None:
        interval = self.config.checkpoint_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            log.info(
                "backfill checkpoint",
                checkpoint_timestamp=format_checkpoint(self.checkpoint_timestamp),
                active_uploads=self.tracker.in_flight,
                upload_limit=self.upload_limit.limit,
                processed=self.stats.processed,
                uploaded=self.stats.uploaded,
                skipped=self.stats.skipped,
                retried=sum(self.stats.retries.values()),
            )

    def _log_outcome(self, outcome: str) -> None:
        fields = {
            "processed": self.stats.processed,
            "uploaded": self.stats.uploaded,
            "skipped": self.stats.skipped,
            "repaired": self.stats.repaired,
            "vanished": self.stats.vanished,
            "bytes_uploaded": self.stats.bytes_uploaded,
        }
        if outcome == "completed":
            log.info("completed backfill", **fields)
            return
        checkpoint = self.checkpoint_timestamp
        event = "backfill shutting down gracefully" if self._stop.is_set() else "backfill stopped"
        log.info(
            event,
            reason=outcome,
            checkpoint_timestamp=format_checkpoint(checkpoint),
            in_flight_uploads=self.tracker.in_flight,
            progress_store=self._store.kind,
            resume_with=resume_flag(checkpoint),
            **fields,
        )
