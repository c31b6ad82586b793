"""A cache's log events as they are emitted: names, levels and fields, each field in the
backfill's vocabulary and upstream's fields on upstream's events (``test_log_fields`` reads the
calls in the source; this reads what they log), and the counts and resume flag they carry."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import structlog

from layer_cache.cache_types import CacheType
from layer_cache.retry import AdaptiveLimit
from migrations_mode.cache_events import CacheEvents, counts, resume_flag
from migrations_mode.checkpoint import Position
from migrations_mode.config import parse_cutoff
from migrations_mode.log_fields import FIELDS, UPSTREAM_EVENTS, UPSTREAM_SYNONYMS
from migrations_mode.progress import CacheStats
from tests.unit.backfill_fakes import CUTOFF, backfill_config

CHECKPOINT = datetime(2026, 1, 13, 16, 5, 4, 123456, tzinfo=UTC)
CHECKPOINT_TEXT = "2026-01-13 16:05:04.123456 UTC"
# What structlog adds to every event (cache_type comes from the cache task's bound context).
STRUCTLOG_KEYS = {"event", "log_level"}


def stats() -> CacheStats:
    return CacheStats(
        CacheType.CAS,
        processed=10,
        uploaded=6,
        skipped=3,
        repaired=2,
        vanished=1,
        bytes_uploaded=600,
        verified=4,
        retries=Counter({"throttled": 2, "transient": 3}),
    )


def limit_with_uploads_in_flight(limit: int, in_use: int) -> AdaptiveLimit:
    upload_limit = AdaptiveLimit(8)
    upload_limit.limit, upload_limit.in_use = limit, in_use
    return upload_limit


def events() -> CacheEvents:
    config = backfill_config(max_concurrent_uploads=8, key_batch_size=500)
    return CacheEvents(config, bucket="si-layer-cache-cas", progress_store="postgres")


def test_counts_are_this_runs_counters_with_retries_summed_over_classes() -> None:
    assert counts(stats()) == {
        "processed": 10,
        "uploaded": 6,
        "skipped": 3,
        "repaired": 2,
        "vanished": 1,
        "bytes_uploaded": 600,
        "retried": 5,
    }
    assert counts(CacheStats(CacheType.CAS))["retried"] == 0


@pytest.mark.parametrize(
    "checkpoint", [CHECKPOINT, CHECKPOINT.astimezone(timezone(timedelta(hours=-5)))]
)
def test_the_resume_flag_names_the_checkpoint_in_utc_as_the_cutoff_flag_reads_it(
    checkpoint: datetime,
) -> None:
    flag = resume_flag(checkpoint)
    assert flag == f"--backfill-cutoff-timestamp '{CHECKPOINT_TEXT}'"
    quoted = flag.removeprefix("--backfill-cutoff-timestamp ")
    assert parse_cutoff(quoted.strip("'")) == checkpoint


def emitted(emit: Callable[[], None]) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        emit()
    return logs


def test_starting_says_the_walks_settings_and_where_it_resumes() -> None:
    [started] = emitted(lambda: events().starting(Position(CUTOFF, "ab01")))
    assert started == {
        "event": "starting backfill",
        "log_level": "info",
        "cutoff_timestamp": "2026-01-13 17:30:00.000000 UTC",
        "max_concurrent": 8,
        "concurrency": "fixed",
        "key_batch_size": 500,
        "bucket": "si-layer-cache-cas",
        "resume_after_key": "ab01",
    }
    [fresh] = emitted(lambda: events().starting(None))
    assert fresh["resume_after_key"] is None


def test_a_checkpoint_carries_upstreams_active_uploads_the_limit_and_the_counts() -> None:
    limit = limit_with_uploads_in_flight(limit=4, in_use=3)
    [checkpoint] = emitted(lambda: events().checkpoint(CHECKPOINT, limit, stats()))
    assert checkpoint == {
        "event": "backfill checkpoint",
        "log_level": "info",
        "checkpoint_timestamp": CHECKPOINT_TEXT,
        "active_uploads": 3,
        "upload_concurrency_limit": 4,
        **counts(stats()),
    }


def test_a_walk_saved_as_complete_logs_completed_with_already_complete() -> None:
    [done] = emitted(lambda: events().already_complete(stats()))
    assert done == {
        "event": "completed backfill",
        "log_level": "info",
        "already_complete": True,
        "progress_store": "postgres",
        **counts(stats()),
    }


def outcome(name: str, *, signalled: bool) -> MutableMapping[str, Any]:
    limit = limit_with_uploads_in_flight(limit=4, in_use=2)
    [event] = emitted(
        lambda: events().outcome(
            name,
            signalled=signalled,
            checkpoint=CHECKPOINT,
            limit=limit,
            rows_pending=7,
            stats=stats(),
        )
    )
    return event


@pytest.mark.parametrize("signalled", [False, True])
def test_a_completed_walk_logs_completed_whether_or_not_a_stop_came(signalled: bool) -> None:
    assert outcome("completed", signalled=signalled) == {
        "event": "completed backfill",
        "log_level": "info",
        "already_complete": False,
        **counts(stats()),
    }


def test_a_walk_stopped_by_a_signal_logs_upstreams_graceful_shutdown_and_how_to_resume() -> None:
    assert outcome("stopped", signalled=True) == {
        "event": "backfill shutting down gracefully",
        "log_level": "info",
        "checkpoint_timestamp": CHECKPOINT_TEXT,
        "in_flight_uploads": 2,
        "reason": "stopped",
        "rows_pending": 7,
        "progress_store": "postgres",
        "resume_with": resume_flag(CHECKPOINT),
        **counts(stats()),
    }


@pytest.mark.parametrize("reason", ["stopped", "failed"])
def test_a_walk_cancelled_or_failed_logs_stopped_with_the_reason_and_how_to_resume(
    reason: str,
) -> None:
    assert outcome(reason, signalled=False) == {
        "event": "backfill stopped",
        "log_level": "info",
        "checkpoint_timestamp": CHECKPOINT_TEXT,
        "uploads_in_flight": 2,
        "reason": reason,
        "rows_pending": 7,
        "progress_store": "postgres",
        "resume_with": resume_flag(CHECKPOINT),
        **counts(stats()),
    }


def every_event() -> list[MutableMapping[str, Any]]:
    cache = events()
    limit = limit_with_uploads_in_flight(limit=4, in_use=1)

    def emit_all() -> None:
        cache.already_complete(stats())
        cache.starting(Position(CUTOFF, "ab01"))
        cache.checkpoint(CHECKPOINT, limit, stats())
        for name, signalled in (("completed", False), ("stopped", True), ("failed", False)):
            cache.outcome(
                name,
                signalled=signalled,
                checkpoint=CHECKPOINT,
                limit=limit,
                rows_pending=0,
                stats=stats(),
            )

    return emitted(emit_all)


def test_every_event_is_info_and_uses_only_the_vocabularys_names() -> None:
    logged = every_event()
    assert {event["event"] for event in logged} == {
        "completed backfill",
        "starting backfill",
        "backfill checkpoint",
        "backfill shutting down gracefully",
        "backfill stopped",
    }
    for event in logged:
        assert event["log_level"] == "info"
        unknown = set(event) - STRUCTLOG_KEYS - set(FIELDS)
        assert not unknown, f"{event['event']!r}: not in log_fields.FIELDS: {unknown}"
        for name, home in UPSTREAM_SYNONYMS.items():
            assert name not in event or event["event"] == home


def test_upstreams_events_carry_upstreams_fields() -> None:
    for event in every_event():
        upstream = UPSTREAM_EVENTS.get(event["event"])
        if upstream is not None:
            assert set(upstream) - {"cache_type"} <= set(event), event["event"]
