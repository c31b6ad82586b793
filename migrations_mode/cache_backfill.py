"""The per-cache loop: list rows newest first, copy each with bounded concurrency.

How it works: rows with ``created_at < cutoff`` are listed in pages of ``key_batch_size`` by the
unique cursor ``(created_at, key)`` descending, so rows sharing a timestamp are never skipped at
a page boundary. For each row an upload slot is acquired *before* its task is created (at most
``max_concurrent_uploads`` in flight); the task HEADs the object, skips it when the stored size
equals the row's ``octet_length(value)``, otherwise reads the value and PUTs it (a row deleted
in between is counted as vanished). Every finished row is reported to the ``CheckpointTracker``.

Shutdown: when the stop event is set the loop stops dispatching and lets in-flight uploads
finish; if the coordinator cancels it (grace period over, or another cache failed) the in-flight
uploads are cancelled with it. Either way the last line says where to resume:
``backfill shutting down gracefully`` (stop requested) or ``backfill stopped`` (cancelled or
failed), with the ``checkpoint_timestamp`` and the exact flag. Only a cache whose rows were all
listed and finished logs ``completed backfill``.

Failure: the first upload that raises a ``StorageError`` cancels the others (task group) and the
cache fails with ``CacheBackfillFailed`` naming the key.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import StorageError
from layer_cache.pg import PgLayer, RowRef
from layer_cache.s3 import S3Layer
from migrations_mode.checkpoint import CheckpointTracker, Position
from migrations_mode.config import BackfillConfig, format_checkpoint
from migrations_mode.errors import CacheBackfillFailed, first_exception
from migrations_mode.progress import BackfillMetrics, CacheProgress, CacheStats

log = structlog.get_logger(__name__)


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
    ) -> None:
        self.cache_type = cache_type
        self.pg = pg
        self.s3 = s3
        self.config = config
        self.tracker = CheckpointTracker(config.cutoff)
        self.progress = CacheProgress(cache_type, metrics)
        self.completed = False
        self._stop = stop
        self._upload_slots = asyncio.Semaphore(config.max_concurrent_uploads)

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
        log.info(
            "starting backfill",
            cutoff_timestamp=format_checkpoint(self.config.cutoff),
            max_concurrent=self.config.max_concurrent_uploads,
            key_batch_size=self.config.key_batch_size,
            bucket=self.s3.bucket,
        )
        checkpoints = asyncio.create_task(self._log_checkpoints())
        outcome = "stopped"
        try:
            await self._copy_all()
            outcome = "completed" if self.completed else "stopped"
        except ExceptionGroup as group:
            outcome = "failed"
            raise first_exception(group) from None
        finally:
            checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoints
            self.progress.finish()
            self._log_outcome(outcome)
        return self.stats

    async def _copy_all(self) -> None:
        listing_done = False
        async with asyncio.TaskGroup() as uploads:
            after: tuple[datetime, str] | None = None
            while not listing_done and not self._stop.is_set():
                batch = await self._list_batch(after)
                log.debug("fetched key batch", rows=len(batch))
                for row in batch:
                    await self._upload_slots.acquire()
                    if self._stop.is_set():
                        self._upload_slots.release()
                        return  # in-flight uploads drain as the task group exits
                    sequence = self.tracker.dispatch(Position(row.created_at, row.key))
                    uploads.create_task(self._copy_row(row, sequence))
                listing_done = len(batch) < self.config.key_batch_size
                if batch:
                    after = (batch[-1].created_at, batch[-1].key)
        self.completed = listing_done and self.tracker.in_flight == 0

    async def _list_batch(self, after: tuple[datetime, str] | None) -> list[RowRef]:
        try:
            return await self.pg.list_newest_first(
                cutoff=self.config.cutoff, after=after, limit=self.config.key_batch_size
            )
        except StorageError as exc:
            self.progress.failed(exc.kind.value)
            raise CacheBackfillFailed(self.cache_type, None, exc) from exc

    async def _copy_row(self, row: RowRef, sequence: int) -> None:
        try:
            stored_size = await self.s3.head(row.key)
            if stored_size == row.size:
                log.debug("skipping key already in S3", key=row.key, size=row.size)
                self.progress.skipped()
            else:
                value = await self.pg.fetch_value(row.key)
                if value is None:
                    log.info("row vanished before it was read", key=row.key)
                    self.progress.vanished()
                else:
                    await self.s3.put(row.key, value)
                    log.debug("uploaded to S3", key=row.key, size=len(value))
                    self.progress.uploaded(len(value), repaired=stored_size is not None)
            self.tracker.finish(sequence)
        except StorageError as exc:
            self.progress.failed(exc.kind.value)
            raise CacheBackfillFailed(self.cache_type, row.key, exc) from exc
        finally:
            self._upload_slots.release()

    async def _log_checkpoints(self) -> None:
        interval = self.config.checkpoint_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            log.info(
                "backfill checkpoint",
                checkpoint_timestamp=format_checkpoint(self.checkpoint_timestamp),
                active_uploads=self.tracker.in_flight,
                processed=self.stats.processed,
                uploaded=self.stats.uploaded,
                skipped=self.stats.skipped,
            )

    def _log_outcome(self, outcome: str) -> None:
        fields = {
            "processed": self.stats.processed,
            "uploaded": self.stats.uploaded,
            "skipped": self.stats.skipped,
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
            resume_with=resume_flag(checkpoint),
            **fields,
        )
