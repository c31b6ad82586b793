"""The dry run's estimate: uploads bound by latency over the concurrency or by the client's CPU,
and caches that share one client."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from layer_cache.cache_types import CacheType
from migrations_mode.config import BackfillConfig
from migrations_mode.dry_run import (
    CacheEstimate,
    estimate_seconds,
    format_estimate_table,
    total_seconds,
    upload_bound,
)

CONFIG = BackfillConfig(
    cutoff=datetime(2026, 1, 1, tzinfo=UTC),
    cache_types=(CacheType.CAS,),
    key_batch_size=1000,
    checkpoint_interval=timedelta(seconds=30),
    max_concurrent_uploads=64,
    grace_period=timedelta(seconds=20),
)


def test_high_latency_over_few_slots_is_the_bound() -> None:
    seconds, bound = upload_bound(0.064, 0.0005, CONFIG)
    assert seconds == pytest.approx(0.001)
    assert bound == "latency"


def test_a_client_slower_than_latency_over_the_slots_is_the_bound() -> None:
    assert upload_bound(0.020, 0.0007, CONFIG) == (0.0007, "client CPU")
    seconds, bound = upload_bound(0.020, None, CONFIG)
    assert seconds == pytest.approx(0.0003125)
    assert bound == "latency"


def test_estimate_is_uploads_at_the_bound_plus_two_listings_per_page() -> None:
    seconds = estimate_seconds(
        rows=100_000,
        rows_to_upload=50_000,
        latency_s=0.020,
        config=CONFIG,
        cpu_s_per_request=0.0007,
    )
    assert seconds == pytest.approx(50_000 * 0.0007 + 100 * 2 * 0.020)
    assert estimate_seconds(rows=10, rows_to_upload=10, latency_s=None, config=CONFIG) == 0.0


def estimate(
    cache: str, to_upload: int, seconds: float, cpu_s: float | None, value_bytes: int = 0
) -> CacheEstimate:
    return CacheEstimate(
        cache_type=cache,
        rows=to_upload,
        bytes=value_bytes,
        sampled=10,
        sampled_in_s3=0,
        latency_s=0.02,
        write_check="checked",
        estimated_s=seconds,
        cpu_s_per_request=cpu_s,
        bound="latency" if cpu_s is None else "client CPU",
    )


def test_caches_side_by_side_take_the_slowest_unless_their_cpu_adds_up_to_more() -> None:
    apart = [estimate("cas", 1_000, 60.0, None), estimate("rebase_batch", 1_000, 90.0, None)]
    assert total_seconds(apart) == (90.0, "slowest cache")
    sharing = [
        estimate("cas", 100_000, 70.0, 0.0007),
        estimate("rebase_batch", 100_000, 70.0, 0.0007),
    ]
    seconds, bound = total_seconds(sharing)
    assert seconds == pytest.approx(140.0)
    assert bound == "client CPU"
    table = format_estimate_table(sharing)
    assert "client CPU" in table
    assert table.splitlines()[-1].split()[-1] == "2m20s"  # the total line


def test_the_process_wide_rate_limits_stretch_the_estimate_when_they_bind() -> None:
    caches = [
        estimate("cas", 6_000, 30.0, None, value_bytes=600 * 2**20),
        estimate("rebase_batch", 4_000, 20.0, None, value_bytes=400 * 2**20),
    ]
    assert total_seconds(caches, max_uploads_per_second=1_000.0) == (30.0, "slowest cache")
    assert total_seconds(caches, max_uploads_per_second=100.0) == (100.0, "uploads/s limit")
    assert total_seconds(caches, max_uploads_per_second=100.0, max_bytes_per_second=5 * 2**20) == (
        200.0,
        "bytes/s limit",
    )
