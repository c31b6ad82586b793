"""The coordinator: one task per selected cache, sharing one services context, failing fast.

It builds a ``CacheBackfill`` per cache type, all sharing one ``UploadPacer`` (the process's
rate limits on uploads, logged at the start), checks every table and bucket (preflight), then runs
the caches in one ``asyncio.TaskGroup``: the first cache to fail cancels the others at once and
its ``CacheBackfillFailed`` is raised. On a stop request the caches stop dispatching and drain;
after ``grace_period`` whatever is still running is cancelled. The summary (per cache and total)
is logged in every case as ``backfill summary`` events, except under the live display of a
terminal, where the command prints it as a table instead (and the display's last frame shows the
same figures); ``BackfillReport`` says which caches completed.

``resolve_cutoff`` runs first, once connected: a ``now`` cutoff becomes the database's ``now()``,
logged so that a resume can pass the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from rich.console import Console

from layer_cache.errors import (
    CacheBackfillFailed,
    PreflightError,
    StorageError,
    first_exception,
    map_pg_errors,
)
from layer_cache.rate_limit import UploadPacer
from layer_cache.retry import call_with_retries
from migrations_mode.cache_backfill import CacheBackfill
from migrations_mode.cache_events import resume_flag
from migrations_mode.cache_parts import cache_parts
from migrations_mode.config import (
    BackfillConfig,
    VerifyMode,
    format_checkpoint,
    with_resolved_cutoff,
)
from migrations_mode.differences import open_difference_report
from migrations_mode.display import LiveProgress
from migrations_mode.preflight import check_read_only, run_preflight
from migrations_mode.progress import BackfillMetrics
from migrations_mode.progress_store import ProgressStore, open_progress_store
from migrations_mode.summary import CacheOutcome, Status, finished_status, total_fields
from services.context import ServicesContext
from services.signals import StopRequest

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class BackfillReport:
    """The outcome of a run, one entry per selected cache."""

    outcomes: list[CacheOutcome]
    failure: CacheBackfillFailed | None = None

    @property
    def complete(self) -> bool:
        """True only when every selected cache walked all its rows."""
        return all(outcome.finished for outcome in self.outcomes)


def _status(
    cache: CacheBackfill, mode: VerifyMode, stop: StopRequest, failed: CacheBackfillFailed | None
) -> Status:
    if cache.completed:
        return finished_status(mode, cache.stats)
    if failed is not None and failed.cache_type is cache.cache_type:
        return Status.FAILED
    return Status.INTERRUPTED if stop.event.is_set() else Status.CANCELLED


async def _cancel_after_grace(
    stop: StopRequest, grace_period: timedelta, tasks: list[asyncio.Task[object]]
) -> None:
    await stop.event.wait()
    log.info(
        "stop requested, draining in-flight uploads", grace_period_s=grace_period.total_seconds()
    )
    await asyncio.sleep(grace_period.total_seconds())
    for task in tasks:
        task.cancel()


async def resolve_cutoff(context: ServicesContext, config: BackfillConfig) -> BackfillConfig:
    """``config`` with a ``now`` cutoff set to the database's ``now()`` (the clock ``created_at``
    comes from), logged with the flag that resumes it; any other cutoff is unchanged, with a
    warning when it lies ahead of the database's clock."""

    async def database_now() -> datetime:
        with map_pg_errors("reading the database clock"):
            value = await context.pg_pool.fetchval("SELECT now()")
        assert isinstance(value, datetime)  # timestamptz: asyncpg returns an aware datetime
        return value

    now = await call_with_retries(database_now, config.retry_policy)
    if not config.cutoff_is_now:
        if config.cutoff > now:
            log.warning(
                "backfill cutoff is in the future",
                cutoff_timestamp=format_checkpoint(config.cutoff),
                database_now=format_checkpoint(now),
                reason="rows written from now until the cutoff are copied too; the cutoff is "
                "meant to be when DualWrite was switched on",
            )
        return config
    resolved = with_resolved_cutoff(config, now)
    log.info(
        "backfill cutoff 'now' resolved by the database clock",
        cutoff_timestamp=format_checkpoint(resolved.cutoff),
        resume_with=resume_flag(resolved.cutoff),
    )
    return resolved


async def run_backfill(
    context: ServicesContext,
    config: BackfillConfig,
    stop: StopRequest,
    *,
    live_console: Console | None = None,
) -> BackfillReport:
    """Backfill every selected cache; a failed cache is reported in ``BackfillReport.failure``."""
    metrics = BackfillMetrics(context.telemetry.meter)
    s3_layers = {cache_type: context.s3_layer(cache_type) for cache_type in config.cache_types}
    pg_layers = {cache_type: context.pg_layer(cache_type) for cache_type in config.cache_types}
    writes = config.verify.writes
    await run_preflight(
        [(pg_layers[c], s3_layers[c]) for c in config.cache_types],
        config.retry_policy,
        writes=writes,
    )
    read_only = await check_read_only(context.pg_pool, config.retry_policy)
    try:
        store = await open_progress_store(
            config.progress_store, context.pg_pool, s3_layers, read_only=read_only, writes=writes
        )
    except StorageError as exc:
        raise PreflightError(
            f"cannot keep progress in Postgres ({exc}); grant the role CREATE on the schema, "
            "or use --backfill-progress-store s3 (or auto)"
        ) from exc
    # One pacer for the process: the rate limits hold for every cache together.
    pacer = UploadPacer(config.max_uploads_per_second, config.max_bytes_per_second)
    with open_difference_report(config.verify_report) as differences:
        caches = [
            CacheBackfill(
                cache_type,
                config=config,
                stop=stop.event,
                parts=cache_parts(
                    pg=pg_layers[cache_type],
                    s3=s3_layers[cache_type],
                    config=config,
                    metrics=metrics,
                    progress_store=store,
                    report=differences,
                    pacer=pacer,
                ),
            )
            for cache_type in config.cache_types
        ]
        return await run_caches(
            caches,
            config,
            stop,
            store,
            metrics,
            metrics_destination=context.telemetry.destination,
            live_console=live_console,
        )


async def run_caches(
    caches: list[CacheBackfill],
    config: BackfillConfig,
    stop: StopRequest,
    store: ProgressStore,
    metrics: BackfillMetrics,
    *,
    metrics_destination: str,
    live_console: Console | None = None,
) -> BackfillReport:
    """Run every cache built over ``store`` in one task group (the first failure cancels the
    rest; a stop cancels what still runs after the grace period), then log the summary."""
    for cache in caches:
        metrics.watch(cache)
        cache.log_progress = live_console is None
    log.info(
        "starting backfill for all cache types",
        cache_count=len(caches),
        cache_types=[cache.cache_type.value for cache in caches],
        cutoff_timestamp=format_checkpoint(config.cutoff),
        progress_store=store.kind,
        max_uploads_per_second=config.max_uploads_per_second,
        max_bytes_per_second=config.max_bytes_per_second,
        metrics=metrics_destination,
    )
    failure: CacheBackfillFailed | None = None
    tasks: list[asyncio.Task[object]] = []
    watchdog: asyncio.Task[None] | None = None
    live = LiveProgress(caches, live_console) if live_console is not None else None
    display = asyncio.create_task(live.run()) if live is not None else None
    try:
        async with asyncio.TaskGroup() as group:
            tasks.extend(group.create_task(cache.run()) for cache in caches)
            watchdog = asyncio.create_task(_cancel_after_grace(stop, config.grace_period, tasks))
    except* CacheBackfillFailed as failures:
        first = first_exception(failures)
        assert isinstance(first, CacheBackfillFailed)
        failure = first
    finally:
        report = BackfillReport(
            [
                CacheOutcome(
                    cache.stats,
                    _status(cache, config.verify, stop, failure),
                    already_complete=cache.already_complete,
                )
                for cache in caches
            ],
            failure,
        )
        if live is not None:
            live.finish(report.outcomes)  # the last frame: the summary's figures
        for helper in (watchdog, display):
            if helper is not None:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await helper
        _log_report(report, caches, summary_events=live is None)
    return report


def _log_report(
    report: BackfillReport, caches: list[CacheBackfill], *, summary_events: bool
) -> None:
    """The summary events (the machine-readable summary; left out under a live display, whose
    command prints the table), then whether the run is complete and how to resume it."""
    if summary_events:
        for outcome in report.outcomes:
            log.info("backfill summary", **outcome.as_fields())
        log.info("backfill summary", **total_fields(report.outcomes))
    if report.complete:
        log.info("completed backfill for all cache types")
        return
    done = [cache.cache_type.value for cache in caches if cache.completed]
    unfinished = [cache for cache in caches if not cache.completed]
    resume = min(cache.saver.checkpoint_timestamp for cache in unfinished)
    log.info(
        "backfill incomplete",
        completed_caches=done,
        incomplete_caches=[cache.cache_type.value for cache in unfinished],
        resume="re-run with the same arguments: saved progress continues each cache",
        manual_resume_with=f"{resume_flag(resume)} --backfill-cache-types "
        + ",".join(cache.cache_type.value for cache in unfinished),
    )
