"""``--backfill-dry-run``: what a run would do and how long it would take, writing nothing.

It opens the same connections and runs the same preflight as a real run, including the write
probe (a PUT whose ``Content-MD5`` cannot match; one stored by a server that does not verify
digests is deleted at once and reported). Then per cache it counts rows and value bytes below the
cutoff in this shard exactly (one full scan per table: the numbers a real run reports), samples
rows at random points of the key space (cheap primary-key lookups) and HEADs them to estimate the
share already in S3, the request latency and the client CPU one request costs. A run's uploads
are bound by whichever is slower: latency / concurrency (with ``tuned`` concurrency, its ceiling,
so this part is a best case) or the client's CPU per request (a PUT costs a little more than a
HEAD, so this part is a lower bound too); the estimate is rows to upload x that bound plus one
listing request per page, and the total is the slowest cache, or all caches' CPU when they share
one saturated client, or the uploads and bytes to PUT at the process-wide rate limits, whichever
is longest. The result is a table on stdout and one ``backfill dry run`` log event per
cache; the connections close with the services context.

On a layer database that takes no writes (a read replica) it logs the line a real run logs (where
progress will go), or ends in the same refusal of ``--backfill-progress-store postgres``.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from layer_cache.errors import PreflightError, StorageError
from layer_cache.pg import PgLayer, RowRef
from layer_cache.retry import call_with_retries
from layer_cache.s3 import S3Layer
from migrations_mode.config import BackfillConfig
from migrations_mode.preflight import (
    WriteCheck,
    check_read_only,
    explain_storage_error,
    run_preflight,
)
from migrations_mode.progress_store import note_read_only_server
from migrations_mode.tables import build_table, format_duration, render_table
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
    cpu_s_per_request: float | None = None
    bound: str = "latency"  # what limits the uploads: "latency" or "client CPU"

    @property
    def share_in_s3(self) -> float:
        """Sampled share already in S3 with the right size."""
        return self.sampled_in_s3 / self.sampled if self.sampled else 0.0

    @property
    def rows_to_upload(self) -> int:
        """Estimated rows a run would PUT."""
        return round(self.rows * (1 - self.share_in_s3))

    @property
    def bytes_to_upload(self) -> int:
        """Estimated value bytes a run would PUT."""
        return round(self.bytes * (1 - self.share_in_s3))


def upload_bound(
    latency_s: float, cpu_s_per_request: float | None, config: BackfillConfig
) -> tuple[float, str]:
    """Seconds per upload, and what sets them: latency spread over the concurrency, or the
    client's CPU per request when that is slower."""
    by_latency = latency_s / config.max_concurrent_uploads
    if cpu_s_per_request is not None and cpu_s_per_request > by_latency:
        return cpu_s_per_request, "client CPU"
    return by_latency, "latency"


def estimate_seconds(
    *,
    rows: int,
    rows_to_upload: int,
    latency_s: float | None,
    config: BackfillConfig,
    cpu_s_per_request: float | None = None,
) -> float:
    """Run time: each upload at ``upload_bound``, plus one table page and one bucket listing per
    page at the measured latency."""
    if latency_s is None:
        return 0.0
    per_upload, _ = upload_bound(latency_s, cpu_s_per_request, config)
    pages = (rows / config.key_batch_size) * 2 * latency_s
    return rows_to_upload * per_upload + pages


def total_seconds(
    estimates: Sequence[CacheEstimate],
    *,
    max_uploads_per_second: float | None = None,
    max_bytes_per_second: int | None = None,
) -> tuple[float, str]:
    """Caches run side by side: the slowest one, unless their uploads' CPU on the one shared
    client adds up to more, or the process-wide rate limits stretch all the uploads further; and
    which of these sets the time."""
    candidates = [
        (max((e.estimated_s for e in estimates), default=0.0), "slowest cache"),
        (sum(e.rows_to_upload * (e.cpu_s_per_request or 0.0) for e in estimates), "client CPU"),
    ]
    if max_uploads_per_second is not None:
        uploads = sum(e.rows_to_upload for e in estimates)
        candidates.append((uploads / max_uploads_per_second, "uploads/s limit"))
    if max_bytes_per_second is not None:
        upload_bytes = sum(e.bytes_to_upload for e in estimates)
        candidates.append((upload_bytes / max_bytes_per_second, "bytes/s limit"))
    return max(candidates, key=lambda candidate: candidate[0])


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


@dataclass(frozen=True)
class HeadSample:
    """HEADs of the sampled rows: how many matched, their median latency, client CPU each."""

    in_s3: int
    latency_s: float | None
    cpu_s_per_request: float | None


async def _head_all(s3: S3Layer, rows: Sequence[RowRef], config: BackfillConfig) -> HeadSample:
    slots = asyncio.Semaphore(config.max_concurrent_uploads)
    latencies: list[float] = []

    async def head(row: RowRef) -> bool:
        async with slots:
            started = time.monotonic()
            size = await call_with_retries(lambda: s3.head(row.key), config.retry_policy)
            latencies.append(time.monotonic() - started)
            return size == row.size

    cpu_before = time.process_time()
    present = await asyncio.gather(*(head(row) for row in rows))
    cpu_s = time.process_time() - cpu_before
    return HeadSample(
        in_s3=sum(present),
        latency_s=statistics.median(latencies) if latencies else None,
        cpu_s_per_request=cpu_s / len(latencies) if latencies else None,
    )


async def estimate_cache(
    pg: PgLayer, s3: S3Layer, config: BackfillConfig, rng: random.Random, write_check: WriteCheck
) -> CacheEstimate:
    """Count, sample and time one cache (its write permission was probed by the preflight)."""
    key_range = config.shard.key_range
    rows, value_bytes = await pg.count_below(
        cutoff=config.cutoff, low=key_range.low, high=key_range.high
    )
    sample = await _sample(pg, config, rng)
    heads = await _head_all(s3, sample, config)
    in_s3, latency, cpu_s = heads.in_s3, heads.latency_s, heads.cpu_s_per_request
    to_upload = round(rows * (1 - in_s3 / len(sample))) if sample else rows
    bound = "latency" if latency is None else upload_bound(latency, cpu_s, config)[1]
    return CacheEstimate(
        cache_type=pg.spec.cache_type.value,
        rows=rows,
        bytes=value_bytes,
        sampled=len(sample),
        sampled_in_s3=in_s3,
        latency_s=latency,
        write_check=write_check.value,
        estimated_s=estimate_seconds(
            rows=rows,
            rows_to_upload=to_upload,
            latency_s=latency,
            config=config,
            cpu_s_per_request=cpu_s,
        ),
        cpu_s_per_request=cpu_s,
        bound=bound,
    )


async def run_dry_run(context: ServicesContext, config: BackfillConfig) -> list[CacheEstimate]:
    """Validate everything a run would, then estimate each cache; writes nothing."""
    pairs = [(context.pg_layer(c), context.s3_layer(c)) for c in config.cache_types]
    write_checks = await run_preflight(pairs, config.retry_policy)
    read_only = await check_read_only(context.pg_pool, config.retry_policy)
    if read_only is not None:
        note_read_only_server(config.progress_store, read_only, writes=True)
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
            client_cpu_ms_per_request=None
            if estimate.cpu_s_per_request is None
            else round(1000 * estimate.cpu_s_per_request, 3),
            bound_by=estimate.bound,
            write_permission=estimate.write_check,
            estimated_s=round(estimate.estimated_s),
        )
        estimates.append(estimate)
    return estimates


def format_estimate_table(
    estimates: Sequence[CacheEstimate], config: BackfillConfig | None = None
) -> str:
    """The dry run's table: one line per cache and a total (with ``config``'s rate limits)."""
    total_s, total_bound = total_seconds(
        estimates,
        max_uploads_per_second=None if config is None else config.max_uploads_per_second,
        max_bytes_per_second=None if config is None else config.max_bytes_per_second,
    )
    header = (
        "cache",
        "rows",
        "MiB",
        "in S3 (sample)",
        "to upload",
        "latency ms",
        "bound by",
        "est. time",
    )
    lines = [
        (
            e.cache_type,
            f"{e.rows:,}",
            f"{e.bytes / 2**20:,.1f}",
            f"{100 * e.share_in_s3:.0f}% of {e.sampled}",
            f"~{e.rows_to_upload:,}",
            "?" if e.latency_s is None else f"{1000 * e.latency_s:.1f}",
            e.bound,
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
        total_bound,
        format_duration(total_s),
    )
    return render_table(build_table(header, lines, total=total))
