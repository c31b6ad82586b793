"""The coordinator's ``run_caches`` over caches built by ``cache_parts`` on in-memory tables,
buckets and one progress store: each cache in a task of its own, the first failure cancelling
the others, a stop draining what is in flight and the grace period cutting what still runs, and
the report and summary events in every case (the whole ``run_backfill`` with its preflight,
against real servers: tests/integration/test_backfill.py, test_resilience.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping, Sequence
from datetime import timedelta
from typing import Any

import structlog
from opentelemetry.sdk.metrics import MeterProvider

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind
from migrations_mode.coordinator import BackfillReport, run_caches
from migrations_mode.progress import BackfillMetrics
from migrations_mode.summary import Status
from services.signals import StopRequest
from tests.unit.backfill_fakes import (
    DEADLINE_S,
    MemoryStore,
    Walk,
    hold,
    pipeline,
    refuse,
    row_key,
    table_of,
)

CACHES = (CacheType.CAS, CacheType.CHANGE_BATCH)


def walks(
    stop: StopRequest, counts: Sequence[int] = (9, 6), **config_changes: Any
) -> tuple[Walk, Walk]:
    """A cas and a change_batch pipeline sharing one stop request and one progress store, as
    the coordinator builds them."""
    store = MemoryStore()
    cas, changes = (
        pipeline(
            table_of(count, cache_type),
            store=store,
            stop=stop.event,
            cache_types=CACHES,
            **config_changes,
        )
        for cache_type, count in zip(CACHES, counts, strict=True)
    )
    return cas, changes


async def run(stop: StopRequest, *caches: Walk) -> BackfillReport:
    first = caches[0]
    async with asyncio.timeout(DEADLINE_S):
        return await run_caches(
            [walk.cache for walk in caches],
            first.cache.config,
            stop,
            first.store,
            BackfillMetrics(MeterProvider().get_meter("test")),
            metrics_destination="none",
        )


def statuses(report: BackfillReport) -> dict[CacheType, Status]:
    return {outcome.stats.cache_type: outcome.status for outcome in report.outcomes}


def named(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [log for log in logs if log["event"] == event]


async def test_every_cache_runs_in_a_task_of_its_own_and_the_report_says_each_completed() -> None:
    stop = StopRequest()
    cas, changes = walks(stop)
    release = hold(cas.bucket, 0)  # cas waits on its first row ...

    async def release_once_change_batch_is_done() -> None:
        await changes.bucket.wait_until(lambda: len(changes.bucket.puts) == 6)
        release.set()  # ... while change_batch walks all of its rows

    with structlog.testing.capture_logs() as logs:
        report, _ = await asyncio.gather(
            run(stop, cas, changes), release_once_change_batch_is_done()
        )

    assert report.complete
    assert report.failure is None
    assert statuses(report) == dict.fromkeys(CACHES, Status.COMPLETED)
    assert len(cas.bucket.puts) == 9
    assert len(changes.bucket.puts) == 6
    [starting] = named(logs, "starting backfill for all cache types")
    assert starting["cache_types"] == ["cas", "change_batch"]
    assert (starting["cache_count"], starting["progress_store"]) == (2, "postgres")
    summaries = named(logs, "backfill summary")
    assert [(line["cache_type"], line["processed"]) for line in summaries] == [
        ("cas", 9),
        ("change_batch", 6),
        ("total", 15),
    ]
    assert logs[-1]["event"] == "completed backfill for all cache types"
    assert named(logs, "backfill incomplete") == []


async def test_the_first_cache_to_fail_cancels_the_others_at_once() -> None:
    stop = StopRequest()
    cas, changes = walks(stop)
    hold(changes.bucket, 1)  # never released: only the failure of cas ends it

    async def refuse_once_change_batch_waits() -> None:
        await changes.bucket.started(row_key(1))
        await refuse(ErrorKind.ACCESS_DENIED)()

    cas.bucket.before_put[row_key(2)] = refuse_once_change_batch_waits

    with structlog.testing.capture_logs() as logs:
        report = await run(stop, cas, changes)

    assert report.failure is not None
    assert (report.failure.cache_type, report.failure.key) == (CacheType.CAS, row_key(2))
    assert not report.complete
    assert statuses(report) == {
        CacheType.CAS: Status.FAILED,
        CacheType.CHANGE_BATCH: Status.CANCELLED,
    }
    assert changes.bucket.put_cancelled == [row_key(1)]
    assert not stop.event.is_set()  # a failure is not a stop request
    for walk in (cas, changes):
        assert walk.saved is not None
        assert not walk.saved.completed
    [incomplete] = named(logs, "backfill incomplete")
    assert incomplete["completed_caches"] == []
    assert incomplete["incomplete_caches"] == ["cas", "change_batch"]
    assert incomplete["manual_resume_with"].endswith("--backfill-cache-types cas,change_batch")


async def test_a_stop_drains_the_uploads_in_flight_and_dispatches_no_more() -> None:
    stop = StopRequest()
    cas, changes = walks(stop, counts=(9, 2), max_concurrent_uploads=2)
    release = hold(cas.bucket, 1)

    async def stop_then_release() -> None:
        await cas.bucket.started(row_key(1))
        await changes.bucket.wait_until(lambda: len(changes.bucket.puts) == 2)
        stop.event.set()
        await asyncio.sleep(0.05)  # within the grace period: the held upload is still drained
        release.set()

    with structlog.testing.capture_logs() as logs:
        report, _ = await asyncio.gather(run(stop, cas, changes), stop_then_release())

    assert statuses(report) == {
        CacheType.CAS: Status.INTERRUPTED,
        CacheType.CHANGE_BATCH: Status.COMPLETED,
    }
    assert cas.bucket.put_cancelled == []
    assert cas.bucket.puts[row_key(1)] == 1  # the upload in flight finished
    assert len(cas.bucket.puts) < 9  # and nothing was started after the stop
    assert cas.saved is not None
    assert not cas.saved.completed
    [incomplete] = named(logs, "backfill incomplete")
    assert (incomplete["completed_caches"], incomplete["incomplete_caches"]) == (
        ["change_batch"],
        ["cas"],
    )
    assert incomplete["manual_resume_with"].endswith("--backfill-cache-types cas")


async def test_uploads_still_running_when_the_grace_period_ends_are_cancelled() -> None:
    stop = StopRequest()
    grace = timedelta(milliseconds=250)
    cas, changes = walks(stop, counts=(9, 2), grace_period=grace)
    hold(cas.bucket, 1)  # never released: only the end of the grace period ends it

    async def stop_once_in_flight() -> float:
        await cas.bucket.started(row_key(1))
        stop.event.set()
        return time.monotonic()

    with structlog.testing.capture_logs() as logs:
        report, stopped_at = await asyncio.gather(run(stop, cas, changes), stop_once_in_flight())
    took = time.monotonic() - stopped_at

    assert grace.total_seconds() <= took < grace.total_seconds() + 1.0
    assert cas.bucket.put_cancelled == [row_key(1)]
    assert statuses(report)[CacheType.CAS] is Status.INTERRUPTED
    assert report.failure is None
    [draining] = named(logs, "stop requested, draining in-flight uploads")
    assert draining["grace_period_s"] == 0.25  # fractions of a second are kept
    assert cas.saved is not None
    assert cas.saved.position is not None
    assert row_key(1) not in cas.bucket.puts
