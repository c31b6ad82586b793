"""``--backfill-dry-run``: what a run would do and how long it would take, writing nothing.

It opens the same connections and runs the same preflight as a real run, including the write
probe (a PUT whose ``Content-MD5`` cannot match; one stored by a server that does not verify
digests is deleted at once and reported). Then per cache it counts rows and value bytes below the
cutoff in this shard exactly (one full scan per table: the numbers a real run reports), samples
rows at random points of the key space (cheap primary-key lookups) and HEADs them to estimate the
share already in S3 and the request latency, and estimates the run time as rows to upload x
latency / concurrency plus one listing request per page. The result is a table on stdout and one
``backfill dry run`` log event per cache; the connections close with the services context.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from layer_cache.errors import StorageError
from layer_cache.pg import PgLayer, RowRef
from layer_cache.retry import call_with_retries
from layer_cache.s3 import S3Layer
from migrations_mode.config import BackfillConfig
from migrations_mode.display import format_duration
from migrations_mode.errors import PreflightError
from migrations_mode.preflight import WriteCheck, explain_storage_error, run_preflight
from migrations_mode.tables import render_table
from services.context import ServicesContext

log = structlog.get_logger(__name__)

SAMPLE_POINTS = 20
ROWS_PER_POINT = 10


@dataclass(frozen=True)
class CacheEstimate:
    """What a run would do for one cache."""

    cache_type: str
    rows: int
    bytes: int
    sampled: int
    sampled_in_s3: int
    latency_s: float | None
    write_check: str
    estimated_s: float

    @property
    def share_in_s3(self) -> float:
        """Sampled share already in S3 with the right size."""
        return self.sampled_in_s3 / self.sampled if self.sampled else 0.0

    @property
    def rows_to_upload(self) -> int:
        """Estimated rows a run would PUT."""
        return round(self.rows * (1 - self.share_in_s3))


def estimate_seconds(
    *, rows: int, rows_to_upload: int, latency_s: float | None, config: BackfillConfig
) -> float:
    """Run time at the measured request latency: uploads spread over the concurrency, plus one
    table page and one bucket listing per page."""
    if latency_s is None:
        return 0.0
    uploads = rows_to_upload * latency_s / config.max_concurrent_uploads
    pages = (rows / config.key_batch_size) * 2 * latency_s
    return uploads + pages


async def _sample(pg: PgLayer, config: BackfillConfig, rng: random.Random) -> list[RowRef]:
    key_range = config.shard.key_range
    low = int(key_range.low or "0000", 16)
    high = int(key_range.high or "10000", 16)
    rows: dict[str, RowRef] = {}
    for _ in range(SAMPLE_POINTS):
        start = format(rng.randrange(low, high), "04x")
        page = await pg.list_by_key(
            cutoff=config.cutoff, after=None, low=start, high=key_range.high, limit=ROWS_PER_POINT
        )
        rows.update((row.key, row) for row in page)
    return list(rows.values())


async def _head_all(
    s3: S3Layer, rows: Sequence[RowRef], config: BackfillConfig
) -> tuple[int, float | None]:
    slots = asyncio.Semaphore(config.max_concurrent_uploads)
    latencies: list[float] = []

    async def head(row: RowRef) -> bool:
        async with slots:
            started = time.monotonic()
            size = await call_with_retries(lambda: s3.head(row.key), config.retry_policy)
            latencies.append(time.monotonic() - started)
            return size == row.size

    present = await asyncio.gather(*(head(row) for row in rows))
    return sum(present), (statistics.median(latencies) if latencies else None)


async def estimate_cache(
    pg: PgLayer, s3: S3Layer, config: BackfillConfig, rng: random.Random, write_check: WriteCheck
) -> CacheEstimate:
    """Count, sample and time one cache (its write permission was probed by the preflight)."""
    key_range = config.shard.key_range
    rows, value_bytes = await pg.count_below(
        cutoff=config.cutoff, low=key_range.low, high=key_range.high
    )
    sample = await _sample(pg, config, rng)
    in_s3, latency = await _head_all(s3, sample, config)
    to_upload = round(rows * (1 - in_s3 / len(sample))) if sample else rows
    return CacheEstimate(
        cache_type=pg.spec.cache_type.value,
        rows=rows,
        bytes=value_bytes,
        sampled=len(sample),
        sampled_in_s3=in_s3,
        latency_s=latency,
        write_check=write_check.value,
        estimated_s=estimate_seconds(
            rows=rows, rows_to_upload=to_upload, latency_s=latency, config=config
        ),
    )


async def run_dry_run(context: ServicesContext, config: BackfillConfig) -> list[CacheEstimate]:
    """Validate everything a run would, then estimate each cache; writes nothing."""
    pairs = [(context.pg_layer(c), context.s3_layer(c)) for c in config.cache_types]
    write_checks = await run_preflight(pairs, config.retry_policy)
    rng = random.Random(0)
    estimates = []
    for pg, s3 in pairs:
        try:
            estimate = await estimate_cache(pg, s3, config, rng, write_checks[pg.spec.cache_type])
        except StorageError as exc:
            raise PreflightError(explain_storage_error(exc)) from exc
        log.info(
            "backfill dry run",
            cache_type=estimate.cache_type,
            rows=estimate.rows,
            bytes=estimate.bytes,
            sampled=estimate.sampled,
            sampled_in_s3=estimate.sampled_in_s3,
            rows_to_upload_estimate=estimate.rows_to_upload,
            request_latency_ms=None
            if estimate.latency_s is None
            else round(1000 * estimate.latency_s, 1),
            write_permission=estimate.write_check,
            estimated_s=round(estimate.estimated_s),
        )
        estimates.append(estimate)
    return estimates


def format_estimate_table(estimates: Sequence[CacheEstimate]) -> str:
    """The dry run's table: one line per cache and a total."""
    header = ("cache", "rows", "MiB", "in S3 (sample)", "to upload", "latency ms", "est. time")
    lines = [
        (
            e.cache_type,
            f"{e.rows:,}",
            f"{e.bytes / 2**20:,.1f}",
            f"{100 * e.share_in_s3:.0f}% of {e.sampled}",
            f"~{e.rows_to_upload:,}",
            "?" if e.latency_s is None else f"{1000 * e.latency_s:.1f}",
            format_duration(e.estimated_s),
        )
        for e in estimates
    ]
    total = (
        "total",
        f"{sum(e.rows for e in estimates):,}",
        f"{sum(e.bytes for e in estimates) / 2**20:,.1f}",
        "",
        f"~{sum(e.rows_to_upload for e in estimates):,}",
        "",
        format_duration(max((e.estimated_s for e in estimates), default=0.0)),
    )
    return render_table(header, lines, total=total)
