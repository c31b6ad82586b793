"""The per-cache pipeline: walk the table in pages, hand each row to its ``RowAction``, bounded.

A producer task lists each page (``walk``), learns what S3 has from the bucket listing in key order
(``BucketIndex``; rows it cannot vouch for are HEADed), settles what it can and reads the values
the rest need in chunks bounded by the byte budget, a short queue ahead of the dispatch loop,
which takes an upload slot (``UPLOAD_LIMITS``: fixed, or tuned by each row's S3 time) before
creating each row's task. A PUT first waits for the process's rate limits (``UploadPacer``,
shared by every cache); that wait is not S3's time and is left out of what the tuned limit is
fed. Finished rows go to the ``CheckpointTracker``, whose low-water position the
``ProgressSaver`` records. Shutdown: a set stop event ends dispatching and lets in-flight rows
finish; a cancel (grace period over, or another cache failed) cancels them too. Either way
progress is saved (shielded from the cancellation) and the last line says where to resume
(README: "How the backfill works").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import structlog

from layer_cache.budget import ByteBudget
from layer_cache.cache_types import CacheType
from layer_cache.concurrency import ConcurrencyMode, TunedLimit, UploadLimit
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.keys import key_levels
from layer_cache.pg import PgLayer, RowRef
from layer_cache.rate_limit import UploadPacer
from layer_cache.retry import AdaptiveLimit, call_with_retries
from layer_cache.s3 import S3Layer, StoredObject
from migrations_mode.bucket_index import UNKNOWN, BucketIndex, Stored
from migrations_mode.checkpoint import CheckpointTracker, Position
from migrations_mode.config import BackfillConfig, VerifyMode, format_checkpoint
from migrations_mode.differences import Difference, DifferenceKind, DifferenceReport
from migrations_mode.display import RateMeter, progress_report
from migrations_mode.errors import CacheBackfillFailed, first_exception
from migrations_mode.estimates import WalkState
from migrations_mode.progress import BackfillMetrics, CacheProgress, CacheStats
from migrations_mode.progress_saver import ProgressSaver
from migrations_mode.progress_store import (
    S3_PROGRESS_PREFIX,
    ProgressKey,
    ProgressStore,
    SavedProgress,
    WalkPurpose,
    progress_target,
)
from migrations_mode.row_action import Decision, row_action
from migrations_mode.walk import WalkOrder, plan_chunks

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Batches of jobs the producer may prepare ahead of the uploads (bytes are capped separately).
_PREFETCHED_BATCHES = 2


@dataclass(slots=True)
class _Job:
    """One row to finish: ``value`` None means HEAD it first (the listing could not tell)."""

    row: RowRef
    sequence: int
    stored: Stored = UNKNOWN
    value: bytes | None = None


UPLOAD_LIMITS: dict[ConcurrencyMode, Callable[[int], UploadLimit]] = {
    ConcurrencyMode.FIXED: AdaptiveLimit,
    ConcurrencyMode.TUNED: TunedLimit,
}


def resume_flag(checkpoint: datetime) -> str:
    """The exact flag that resumes from a checkpoint."""
    return f"--backfill-cutoff-timestamp '{format_checkpoint(checkpoint)}'"


class CacheBackfill:
    """Copies (or verifies) one cache type's rows below the cutoff against its bucket."""

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
        report: DifferenceReport,
        pacer: UploadPacer | None = None,
    ) -> None:
        self.cache_type = cache_type
        self.pg = pg
        self.s3 = s3
        self.config = config
        self.tracker = CheckpointTracker(config.cutoff)
        self.progress = CacheProgress(cache_type, metrics)
        # Upload slots: throttling and successes are fed back in ``_storage_call``, each row's
        # S3 work's duration in ``_finish_row`` (the tuned limit's signal).
        self.upload_limit = UPLOAD_LIMITS[config.concurrency](config.max_concurrent_uploads)
        self.bytes_budget = ByteBudget(config.max_inflight_bytes)
        self.completed = False
        self.already_complete = False  # saved progress said complete: nothing to do this run
        self.log_progress = True  # off while a live display shows the same on a terminal
        self.report = report
        self.pacer = pacer or UploadPacer()  # the process's; none: no rate limit
        self._paced_s: dict[str, float] = {}  # row key -> seconds its PUT waited for the pacer
        self.action = row_action(
            config.verify,
            progress=self.progress,
            s3=s3,
            storage_call=self._storage_call,
            report=report,
            pace=self._pace,
        )
        self.saver = ProgressSaver(
            progress_store,
            ProgressKey(
                cache_type,
                config.cutoff,
                order=config.order,
                target=progress_target(s3.client.meta.endpoint_url, s3.bucket, s3.key_prefix),
                shard=config.shard.label,
                purpose=(
                    WalkPurpose.REPAIR if config.verify is VerifyMode.REPAIR else WalkPurpose.COPY
                ),
            ),
            snapshot=self._progress_snapshot,
            storage_call=self._storage_call,
            writes=self.action.writes,
            restart=config.restart,
            batch_size=config.key_batch_size,
        )
        self._stop = stop
        self._rows_done_before = 0
        self._table_estimate: int | None = None
        self._listing_done = False

    @property
    def stats(self) -> CacheStats:
        """The counts so far."""
        return self.progress.stats

    @property
    def checkpoint_timestamp(self) -> datetime:
        """The cutoff that, passed back in, resumes this cache without loss.

        Only newest-first order finishes rows in ``created_at`` order, so only there can the
        checkpoint move below the cutoff. In key order any row may still be pending whatever its
        timestamp, so the checkpoint stays the cutoff (the saved key position is what resumes).
        """
        if self._in_key_order:
            return self.config.cutoff
        return self.tracker.checkpoint_timestamp

    @property
    def rows_done(self) -> int:
        """Rows finished in walk order, this run and the runs it resumed (rows finished out of
        order count once the rows before them are done, so a resume never counts a row twice)."""
        return self._rows_done_before + self.tracker.finished_in_order

    def walk_state(self) -> WalkState:
        """The walk now, for the estimates."""
        low_water = self.tracker.low_water
        return WalkState(
            completed=self.completed,
            in_key_order=self._in_key_order,
            shard=self.config.shard,
            low_water_key=None if low_water is None else low_water.key,
            rows_done=self.rows_done,
            table_estimate=self._table_estimate,
            uploads_in_flight=self.upload_limit.in_use,
            upload_limit=self.upload_limit.limit,
            checkpoint_lag_s=(self.config.cutoff - self.checkpoint_timestamp).total_seconds(),
        )

    def gauge_values(self) -> dict[str, float]:
        """The gauges' current values (see ``migrations_mode.progress``)."""
        return self.walk_state().gauge_values()

    async def run(self) -> CacheStats:
        """Copy every row; returns the stats, raises ``CacheBackfillFailed`` on failure."""
        structlog.contextvars.bind_contextvars(cache_type=self.cache_type.value)
        resume_after = await self._resume()
        self._table_estimate = await self._storage_call(self.pg.estimated_rows)
        if self.completed:
            self.already_complete = True
            self.progress.finish()
            log.info(
                "completed backfill",
                already_complete=True,
                progress_store=self.saver.store.kind,
                **self._counts(),
            )
            return self.stats
        log.info(
            "starting backfill",
            cutoff_timestamp=format_checkpoint(self.config.cutoff),
            max_concurrent=self.config.max_concurrent_uploads,
            concurrency=self.config.concurrency.value,
            key_batch_size=self.config.key_batch_size,
            bucket=self.s3.bucket,
            resume_after_key=resume_after.key if resume_after else None,
        )
        checkpoints = asyncio.create_task(self._log_checkpoints())
        saver = asyncio.create_task(self.saver.save_when_due())
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
            for helper in (checkpoints, saver):
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
            self.progress.finish()
            await self.saver.final_save()  # runs even when this task is being cancelled
            self._log_outcome(outcome)
        return self.stats

    async def _resume(self) -> Position | None:
        """Take up the saved progress, if any; the position the walk starts after."""
        saved = await self.saver.load()
        if saved is None:
            return None
        if saved.completed and self.saver.key.purpose is WalkPurpose.REPAIR:
            # A repair is a fresh look each time: only one that was cut short resumes.
            log.info("previous repair pass completed; starting a new pass")
            return None
        self.completed = saved.completed
        self._rows_done_before = saved.rows_done
        if saved.position is not None:
            self.tracker = CheckpointTracker(self.config.cutoff, low_water=saved.position)
            log.info(
                "resuming from saved progress",
                progress_store=self.saver.store.kind,
                checkpoint_timestamp=format_checkpoint(self.checkpoint_timestamp),
                rows_done_earlier_runs=saved.rows_done,
            )
        return saved.position

    def _progress_snapshot(self) -> tuple[SavedProgress, int]:
        record = SavedProgress(self.tracker.low_water, self.completed, self.rows_done)
        return record, self.tracker.finished_in_order

    def _finish(self, sequence: int) -> None:
        self.tracker.finish(sequence)
        self.saver.finished(self.tracker.finished_in_order)

    async def _copy_all(self, resume_after: Position | None) -> None:
        """Run the pipeline: a producer lists pages and reads values ahead (bounded by the byte
        budget and a short queue) while this loop keeps every upload slot busy."""
        jobs: asyncio.Queue[list[_Job] | None] = asyncio.Queue(maxsize=_PREFETCHED_BATCHES)
        async with asyncio.TaskGroup() as tasks:
            producer = tasks.create_task(self._produce(jobs, resume_after))
            while (batch := await jobs.get()) is not None:
                for index, job in enumerate(batch):
                    if not await self._acquire_upload_slot():
                        producer.cancel()
                        self._release_unstarted(batch[index:], jobs)
                        return  # stopping: in-flight uploads drain as the task group exits
                    tasks.create_task(self._run_job(job))
        self.completed = self._listing_done and self.tracker.in_flight == 0

    async def _produce(
        self, jobs: asyncio.Queue[list[_Job] | None], start: Position | None
    ) -> None:
        """List pages and turn them into batches of jobs, in walk order; None marks the end."""
        cursor = start
        bucket_index = self._bucket_index(start) if self._in_key_order else None
        while not self._stop.is_set():
            page = await self._list_page(cursor)
            log.debug("fetched key batch", rows=len(page))
            if page:
                cursor = Position(page[-1].created_at, page[-1].key)
            await self._plan_page(page, bucket_index, jobs)
            if len(page) < self.config.key_batch_size:
                self._listing_done = True
                break
        await jobs.put(None)

    def _release_unstarted(
        self, unstarted: list[_Job], jobs: asyncio.Queue[list[_Job] | None]
    ) -> None:
        """Give back the bytes of jobs that will not run (stopping)."""
        while not jobs.empty():
            unstarted.extend(jobs.get_nowait() or [])
        for job in unstarted:
            if job.value is not None:
                self.bytes_budget.release(job.row.size)

    @property
    def _in_key_order(self) -> bool:
        return self.config.order is WalkOrder.KEY

    def _bucket_index(self, resume_after: Position | None) -> BucketIndex:
        key_range = self.config.shard.key_range
        if resume_after is not None:
            start_after: str | None = self.s3.object_key(resume_after.key)
        else:
            start_after = self._level_prefix(key_range.low)
        return BucketIndex(
            self.s3.list_page,
            start_after=start_after,
            stop_at=self._level_prefix(key_range.high),
        )

    def _level_prefix(self, key: str | None) -> str | None:
        """The object-key prefix every key starting with ``key`` sorts after (or None)."""
        if key is None:
            return None
        levels = "/".join(key_levels(key))
        return f"{self.s3.key_prefix}/{levels}" if self.s3.key_prefix else levels

    async def _list_page(self, cursor: Position | None) -> list[RowRef]:
        key_range = self.config.shard.key_range
        limit = self.config.key_batch_size
        cutoff = self.config.cutoff
        if self._in_key_order:
            after_key = cursor.key if cursor else None
            return await self._storage_call(
                lambda: self.pg.list_by_key(
                    cutoff=cutoff,
                    after=after_key,
                    low=key_range.low,
                    high=key_range.high,
                    limit=limit,
                    with_md5=self.action.needs_md5,
                )
            )
        after = (cursor.created_at, cursor.key) if cursor else None
        return await self._storage_call(
            lambda: self.pg.list_newest_first(
                cutoff=cutoff,
                after=after,
                low=key_range.low,
                high=key_range.high,
                limit=limit,
                with_md5=self.action.needs_md5,
            )
        )

    async def _stored_objects(
        self, bucket_index: BucketIndex | None, page: list[RowRef]
    ) -> list[Stored]:
        if bucket_index is None:
            return [UNKNOWN] * len(page)
        object_keys = [self.s3.object_key(row.key) for row in page]
        found, unmatched = await self._storage_call(lambda: bucket_index.objects_for(object_keys))
        if self.action.counts_extra and unmatched:
            await self._count_extra(unmatched)
        return found

    async def _plan_page(
        self,
        page: list[RowRef],
        bucket_index: BucketIndex | None,
        jobs: asyncio.Queue[list[_Job] | None],
    ) -> None:
        """Settle the rows S3's sizes settle; queue the rest, values read in chunks."""
        sequences = [self.tracker.dispatch(Position(row.created_at, row.key)) for row in page]
        stored_objects = await self._stored_objects(bucket_index, page)
        to_check: list[_Job] = []
        needs_value: list[_Job] = []
        for row, sequence, stored in zip(page, sequences, stored_objects, strict=True):
            decision = self.action.settle(row, stored)
            if decision is Decision.NEEDS_HEAD:
                to_check.append(_Job(row, sequence))
            elif decision is Decision.NEEDS_VALUE:
                needs_value.append(_Job(row, sequence, stored))
            else:
                self.action.record_settled(row, stored, decision)
                self._finish(sequence)
        if to_check:
            await jobs.put(to_check)
        by_row = {job.row.key: job for job in needs_value}
        for chunk in plan_chunks(
            [job.row for job in needs_value],
            max_bytes=self.config.value_chunk_bytes,
            max_rows=self.config.key_batch_size,
        ):
            await jobs.put(await self._read_values([by_row[row.key] for row in chunk]))

    async def _read_values(self, chunk: list[_Job]) -> list[_Job]:
        """Hold the chunk's bytes in the budget, read its values in one query, settle vanished
        rows; the returned jobs carry their values (and their share of the budget)."""
        await self.bytes_budget.acquire(sum(job.row.size for job in chunk))
        keys = [job.row.key for job in chunk]
        values = await self._storage_call(lambda: self.pg.fetch_values(keys))
        ready = []
        for job in chunk:
            value = values.get(job.row.key)
            if value is None:
                value = await self._fetch_one(job.row.key)  # gone, or a race: ask once more
            if value is None:
                self._vanished(job.row, job.sequence)
                self.bytes_budget.release(job.row.size)
            else:
                job.value = value
                ready.append(job)
        return ready

    async def _run_job(self, job: _Job) -> None:
        """One row's work, started with an upload slot held."""
        if job.value is None:
            await self._check_row(job.row, job.sequence)
        else:
            await self._value_task(job.row, job.sequence, job.value, job.stored)

    async def _acquire_upload_slot(self) -> bool:
        await self.upload_limit.acquire()
        if self._stop.is_set():
            self.upload_limit.release()
            return False
        return True

    async def _value_task(self, row: RowRef, sequence: int, value: bytes, stored: Stored) -> None:
        """Runs with an upload slot and the row's bytes held; gives both back."""
        try:
            await self._finish_row(row, value, stored)
            self._finish(sequence)
        finally:
            self.upload_limit.release()
            self.bytes_budget.release(row.size)

    async def _check_row(self, row: RowRef, sequence: int) -> None:
        """The one-row path (runs with an upload slot held): HEAD, then settle the row, or read
        its value and finish it."""
        try:
            stored = await self._storage_call(lambda: self.s3.stat(row.key), key=row.key)
            decision = self.action.settle(row, stored)
            if decision.settled:
                self.action.record_settled(row, stored, decision)
                self._finish(sequence)
                return
            value = await self._fetch_one(row.key)
            if value is None:
                self._vanished(row, sequence)
                return
            await self._finish_row(row, value, stored)
            self._finish(sequence)
        finally:
            self.upload_limit.release()

    async def _finish_row(self, row: RowRef, value: bytes, stored: Stored) -> None:
        """The row's S3 work (copying: its PUT, retries included), timed for the upload limit
        without the wait for the rate limits (S3's time only: the tuner then sees the rate
        flat at the limit and stops climbing, rather than latency it would blame on S3)."""
        started = time.monotonic()
        try:
            await self.action.finish(row, value, stored)
        finally:
            paced = self._paced_s.pop(row.key, 0.0)
        self.upload_limit.record_latency(time.monotonic() - started - paced)

    async def _pace(self, key: str, size: int) -> None:
        """Wait for the process's rate limits before the PUT of row ``key``; the wait is
        counted and kept for ``_finish_row``."""
        waited = await self.pacer.acquire(size)
        if waited > 0:
            self._paced_s[key] = waited
            self.progress.rate_limited(waited)

    async def _fetch_one(self, key: str) -> bytes | None:
        return await self._storage_call(lambda: self.pg.fetch_value(key), key=key)

    def _vanished(self, row: RowRef, sequence: int) -> None:
        log.info("row vanished before it was read", key=row.key)
        self.progress.vanished()
        self._finish(sequence)

    async def _count_extra(self, listed: list[tuple[str, StoredObject]]) -> None:
        """Objects in the walked range that no row of the table accounts for."""
        by_row_key = {
            object_key.rsplit("/", 1)[-1]: (object_key, stored)
            for object_key, stored in listed
            if S3_PROGRESS_PREFIX not in object_key
        }
        if not by_row_key:
            return
        existing = await self._storage_call(lambda: self.pg.existing_keys(list(by_row_key)))
        extra = [(key, found) for key, found in by_row_key.items() if key not in existing]
        for key, (object_key, stored) in extra:
            self.report.record(
                Difference(
                    self.cache_type,
                    key,
                    object_key,
                    DifferenceKind.EXTRA,
                    object_size=stored.size,
                    object_etag=stored.etag,
                )
            )
        self.progress.extra(len(extra))

    async def _storage_call(self, call: Callable[[], Awaitable[T]], *, key: str | None = None) -> T:
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
                upload_concurrency_limit=self.upload_limit.limit,
            )

        try:
            result = await call_with_retries(call, self.config.retry_policy, on_retry=on_retry)
        except StorageError as exc:
            self.progress.failed(exc.kind.value)
            raise CacheBackfillFailed(self.cache_type, key, exc) from exc
        self.upload_limit.record_success()
        return result

    def _counts(self) -> dict[str, int]:
        """This run's counts, as every per-cache event carries them (``log_fields``)."""
        stats = self.stats
        return {
            "processed": stats.processed,
            "uploaded": stats.uploaded,
            "skipped": stats.skipped,
            "repaired": stats.repaired,
            "vanished": stats.vanished,
            "bytes_uploaded": stats.bytes_uploaded,
            "retried": sum(stats.retries.values()),
        }

    async def _log_checkpoints(self) -> None:
        interval = self.config.checkpoint_interval.total_seconds()
        meter = RateMeter()
        meter.add(time.monotonic(), self.stats.processed)
        while True:
            await asyncio.sleep(interval)
            meter.add(time.monotonic(), self.stats.processed)
            self.progress.export()
            if self.log_progress:
                log.info("backfill progress", **progress_report(self, meter.rate).as_fields())
            log.info(
                "backfill checkpoint",
                checkpoint_timestamp=format_checkpoint(self.checkpoint_timestamp),
                active_uploads=self.upload_limit.in_use,  # upstream's name on upstream's event
                upload_concurrency_limit=self.upload_limit.limit,
                **self._counts(),
            )

    def _log_outcome(self, outcome: str) -> None:
        if outcome == "completed":
            log.info("completed backfill", already_complete=False, **self._counts())
            return
        checkpoint = format_checkpoint(self.checkpoint_timestamp)
        resume_with = resume_flag(self.checkpoint_timestamp)
        if self._stop.is_set():
            log.info(
                "backfill shutting down gracefully",
                checkpoint_timestamp=checkpoint,
                in_flight_uploads=self.upload_limit.in_use,  # upstream's name on upstream's event
                reason=outcome,
                rows_pending=self.tracker.in_flight,
                progress_store=self.saver.store.kind,
                resume_with=resume_with,
                **self._counts(),
            )
        else:
            log.info(
                "backfill stopped",
                checkpoint_timestamp=checkpoint,
                uploads_in_flight=self.upload_limit.in_use,
                reason=outcome,
                rows_pending=self.tracker.in_flight,
                progress_store=self.saver.store.kind,
                resume_with=resume_with,
                **self._counts(),
            )
