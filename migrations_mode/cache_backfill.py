"""The per-cache pipeline: walk the pages, hand each row to its ``RowAction``, bounded.

A producer task takes the ``PageSource``'s pages in walk order, registers each row with the
walk's tracker, settles what S3's answer settles and reads the values the rest need in chunks
bounded by the byte budget, a short queue ahead of the dispatch loop, which takes an upload slot
before creating each row's task (a row the listing could not vouch for is HEADed there). Every
part comes built (``cache_parts``) and reaches storage through one ``StorageCaller``. Shutdown:
a set stop event ends dispatching and lets in-flight rows finish; a cancel (grace period over,
or another cache failed) cancels them too. Either way progress is saved (shielded from the
cancellation) and the last event says where to resume (``cache_events``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass

import structlog

from layer_cache.budget import ByteBudget
from layer_cache.cache_types import CacheType
from layer_cache.errors import CacheBackfillFailed, first_exception
from layer_cache.pg import RowRef
from migrations_mode.bucket_index import UNKNOWN, Stored
from migrations_mode.cache_events import CacheEvents
from migrations_mode.cache_parts import CacheParts
from migrations_mode.checkpoint import Position
from migrations_mode.config import BackfillConfig
from migrations_mode.display import RateMeter, progress_report
from migrations_mode.estimates import WalkState
from migrations_mode.progress import CacheStats
from migrations_mode.row_action import Decision
from migrations_mode.walk import plan_chunks

log = structlog.get_logger(__name__)

# Batches of jobs the producer may prepare ahead of the uploads (bytes are capped separately).
_PREFETCHED_BATCHES = 2


@dataclass(slots=True)
class _Job:
    """One row to finish: ``value`` None means HEAD it first (the listing could not tell)."""

    row: RowRef
    sequence: int
    stored: Stored = UNKNOWN
    value: bytes | None = None


class CacheBackfill:
    """Copies (or verifies, or repairs) one cache type's rows below the cutoff."""

    def __init__(
        self,
        cache_type: CacheType,
        *,
        config: BackfillConfig,
        stop: asyncio.Event,
        parts: CacheParts,
    ) -> None:
        self.cache_type = cache_type
        self.config = config
        self.pg, self.s3, self.action = parts.pg, parts.s3, parts.action
        self.walk, self.progress, self.storage = parts.walk, parts.progress, parts.storage
        self.source, self.saver, self.upload_limit = parts.source, parts.saver, parts.upload_limit
        self.events = CacheEvents(
            config, bucket=parts.s3.bucket, progress_store=self.saver.store.kind
        )
        self.bytes_budget = ByteBudget(config.max_inflight_bytes)
        self.already_complete = False  # saved progress said complete: nothing to do this run
        self.log_progress = True  # off while a live display shows the same on a terminal
        self._stop = stop
        self._table_estimate: int | None = None
        self._listing_done = False

    @property
    def completed(self) -> bool:
        """Every row of the walk is done (this run, or the runs it resumed)."""
        return self.walk.completed

    @property
    def stats(self) -> CacheStats:
        """The counts so far."""
        return self.progress.stats

    @property
    def rows_done(self) -> int:
        """Rows finished in walk order, this run and the runs it resumed."""
        return self.walk.rows_done

    def walk_state(self) -> WalkState:
        """The walk now, for the estimates."""
        low_water = self.walk.tracker.low_water
        return WalkState(
            completed=self.completed,
            in_key_order=self.source.in_key_order,
            shard=self.config.shard,
            low_water_key=None if low_water is None else low_water.key,
            rows_done=self.rows_done,
            table_estimate=self._table_estimate,
            uploads_in_flight=self.upload_limit.in_use,
            upload_limit=self.upload_limit.limit,
            checkpoint_lag_s=(self.config.cutoff - self.saver.checkpoint_timestamp).total_seconds(),
        )

    def gauge_values(self) -> dict[str, float]:
        """The gauges' current values (see ``migrations_mode.progress``)."""
        return self.walk_state().gauge_values()

    async def run(self) -> CacheStats:
        """Walk every row; returns the stats, raises ``CacheBackfillFailed`` on failure."""
        structlog.contextvars.bind_contextvars(cache_type=self.cache_type.value)
        resume_after = await self.saver.resume()
        self._table_estimate = await self.storage(self.pg.estimated_rows)
        if self.completed:
            self.already_complete = True
            self.progress.finish()
            self.events.already_complete(self.stats)
            return self.stats
        self.events.starting(resume_after)
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
            self.events.outcome(
                outcome,
                signalled=self._stop.is_set(),
                checkpoint=self.saver.checkpoint_timestamp,
                limit=self.upload_limit,
                rows_pending=self.walk.tracker.in_flight,
                stats=self.stats,
            )
        return self.stats

    def _finish(self, sequence: int) -> None:
        self.walk.tracker.finish(sequence)
        self.saver.finished(self.walk.tracker.finished_in_order)

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
                    upload = tasks.create_task(self._run_job(job))
                    # Given back when the task ends: a task cancelled before it started (another
                    # row failed, the grace period ended) never runs a ``finally`` of its own.
                    upload.add_done_callback(functools.partial(self._release_job, job))
        self.walk.completed = self._listing_done and self.walk.tracker.in_flight == 0

    async def _produce(
        self, jobs: asyncio.Queue[list[_Job] | None], start: Position | None
    ) -> None:
        """Turn the source's pages into batches of jobs, in walk order; None marks the end."""
        async with contextlib.aclosing(self.source.pages(start)) as pages:
            while not self._stop.is_set():
                page = await anext(pages)
                log.debug("fetched key batch", rows=len(page.rows))
                await self._plan_page(page.rows, jobs)
                if page.last:
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

    async def _plan_page(self, page: list[RowRef], jobs: asyncio.Queue[list[_Job] | None]) -> None:
        """Settle the rows S3's answer settles; queue the rest, values read in chunks."""
        sequences = [self.walk.tracker.dispatch(Position(row.created_at, row.key)) for row in page]
        stored_objects = await self.source.stored_objects(page)
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
        values = await self.storage(lambda: self.pg.fetch_values(keys))
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

    async def _acquire_upload_slot(self) -> bool:
        await self.upload_limit.acquire()
        if self._stop.is_set():
            self.upload_limit.release()
            return False
        return True

    async def _run_job(self, job: _Job) -> None:
        """One row's work, with an upload slot held (and, with a value, its bytes) until its
        task ends. A row the listing could not vouch for is HEADed first, then settled or
        finished."""
        stored, value = job.stored, job.value
        if value is None:
            stored = await self.storage(lambda: self.s3.stat(job.row.key), key=job.row.key)
            decision = self.action.settle(job.row, stored)
            if decision.settled:
                self.action.record_settled(job.row, stored, decision)
                self._finish(job.sequence)
                return
            value = await self._fetch_one(job.row.key)
            if value is None:
                self._vanished(job.row, job.sequence)
                return
        started = time.monotonic()
        paced = await self.action.finish(job.row, value, stored)
        # S3's time only, not the rate limits' wait: under a binding limit the tuner then
        # sees the rate flat and stops climbing, rather than latency it would blame on S3.
        self.upload_limit.record_latency(time.monotonic() - started - paced)
        self._finish(job.sequence)

    def _release_job(self, job: _Job, _upload: asyncio.Task[None]) -> None:
        """Give back a row's upload slot (and its bytes) once its task has ended, however."""
        self.upload_limit.release()
        if job.value is not None:
            self.bytes_budget.release(job.row.size)

    async def _fetch_one(self, key: str) -> bytes | None:
        return await self.storage(lambda: self.pg.fetch_value(key), key=key)

    def _vanished(self, row: RowRef, sequence: int) -> None:
        log.info("row vanished before it was read", key=row.key)
        self.progress.vanished()
        self._finish(sequence)

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
            self.events.checkpoint(self.saver.checkpoint_timestamp, self.upload_limit, self.stats)
