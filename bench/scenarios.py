"""One benchmark scenario per process, so CPU time and peak RSS belong to that scenario alone.

``python -m bench.scenarios NAME --target JSON`` (the target is ``Target.to_json()``, built by
``python -m bench``) runs one of ``bare_put``, ``obstore_put``, ``upstream``, ``upstream_rerun``,
``backfill``, ``backfill_rerun`` or ``shards`` against the servers already up, times only the
scenario's own section and prints one JSON line of its meters; product logs go to stderr. The
process exits when the scenario ends. What each scenario does: ``docs/bench.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import aioboto3
import asyncpg
from aiobotocore.config import AioConfig
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from bench.common import (
    PROGRESS_TABLE,
    TABLE,
    PgCounters,
    Result,
    S3RequestCounter,
    StatementStats,
    Target,
    code_fingerprint,
    cpu_seconds,
    peak_rss_mib,
    product_settings,
    read_pg_counters,
    read_statements,
    reset_statements,
    wait_for_backends_gone,
)
from bench.cpu import CpuSnapshot, CpuSpent
from bench.upstream import upstream_backfill
from layer_cache.cache_types import CacheType
from layer_cache.concurrency import ConcurrencyMode
from layer_cache.keys import bucket_name, object_key
from migrations_mode.config import BackfillConfig
from migrations_mode.coordinator import run_backfill
from migrations_mode.walk import Shard
from services.context import open_services_context, s3_client_arguments
from services.logging import configure_logging
from services.settings import Settings
from services.signals import StopRequest

SCENARIOS = (
    "bare_put",
    "obstore_put",
    "upstream",
    "upstream_rerun",
    "backfill",
    "backfill_rerun",
    "shards",
)
S3_MAX_CONNECTIONS = 64  # open_services_context's default, used by every scenario
Put = Callable[[str, bytes], Awaitable[None]]


@dataclass
class Options:
    """The command line of one scenario."""

    scenario: str
    target: Target
    concurrency: int = 20  # with --concurrency-mode tuned: the ceiling
    concurrency_mode: ConcurrencyMode = ConcurrencyMode.FIXED  # backfill scenarios only
    key_batch_size: int = 1000
    shards: int = 2
    shard_index: int | None = None  # a child of ``shards`` (with --shard-count)
    shard_count: int = 1
    wait_for_go: bool = False
    measure_pg: bool = True
    profile: str | None = None
    sample_in_flight: bool = False
    max_uploads_per_second: float | None = None  # backfill: the process's rate limits
    max_bytes_per_second: int | None = None
    checkpoint_interval_s: float = 30.0  # backfill: between 'backfill checkpoint' events
    stop_after_s: float | None = None  # backfill: stop (drain, as on SIGTERM) after this long
    app_name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.app_name:
            suffix = "" if self.shard_index is None else f"-{self.shard_index}"
            self.app_name = f"bench-{self.scenario}{suffix}"

    @property
    def shard(self) -> Shard:
        return Shard(self.shard_index or 0, self.shard_count)


@dataclass
class Work:
    """What the timed section did."""

    rows: int
    uploaded: int
    bytes_uploaded: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timed:
    """The timed section's outcome and cost."""

    work: Work
    started_at: float
    finished_at: float
    cpu_s: float
    cpu_spent: CpuSpent | None = None

    @property
    def seconds(self) -> float:
        return self.finished_at - self.started_at


async def _timed(options: Options, body: Callable[[], Awaitable[Work]]) -> Timed:
    """Run ``body`` as the timed section (after the go signal, under cProfile if asked)."""
    if options.wait_for_go:
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()
    profiler = cProfile.Profile() if options.profile else None
    target = options.target
    machine_before = CpuSnapshot.take(target.s3_pid, target.pg_pid)
    cpu_before = cpu_seconds()
    started = time.monotonic()
    if profiler is not None:
        profiler.enable()
    try:
        work = await body()
    finally:
        if profiler is not None:
            profiler.disable()
    finished = time.monotonic()
    cpu = cpu_seconds() - cpu_before
    machine_after = CpuSnapshot.take(target.s3_pid, target.pg_pid)
    if profiler is not None and options.profile:
        profiler.dump_stats(options.profile)
    spent = CpuSpent.between(machine_before, machine_after, client=cpu, wall=finished - started)
    return Timed(work, started, finished, cpu, spent)


async def _wait_until_quiet(target: Target, *, except_app: str | None = None) -> None:
    """Wait until no other backend is connected to the scenario's database, so every earlier
    backend has flushed its statistics."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
    arguments: list[str] = [target.dbname]
    if except_app is not None:
        query += " AND application_name <> $2"
        arguments.append(except_app)
    connection = await asyncpg.connect(target.dsn(superuser=True, dbname="postgres"))
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            others = await connection.fetchval(query, *arguments)
            if not others:
                return
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


class PgMeter:
    """Before/after readings of the database's counters around a scenario."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self._before: PgCounters | None = None

    async def start(self, *, own_app_connected: bool) -> None:
        if not self.options.measure_pg:
            return
        target = self.options.target
        await _wait_until_quiet(
            target, except_app=self.options.app_name if own_app_connected else None
        )
        await reset_statements(target)
        self._before = await read_pg_counters(target)

    async def finish(self) -> tuple[PgCounters | None, StatementStats | None]:
        """Read the deltas once the scenario's connections have closed."""
        if self._before is None:
            return None, None
        target = self.options.target
        await wait_for_backends_gone(target, self.options.app_name)
        await _wait_until_quiet(target)
        after = await read_pg_counters(target)
        return after.minus(self._before), await read_statements(target)


async def _rows_below(target: Target, shard: Shard) -> int:
    """Rows the job must copy (below the cutoff, in the shard's key range)."""
    key_range = shard.key_range
    conditions: list[str] = ["created_at < $1"]
    arguments: list[object] = [target.cutoff]
    if key_range.low is not None:
        arguments.append(key_range.low)
        conditions.append(f"key >= ${len(arguments)}")
    if key_range.high is not None:
        arguments.append(key_range.high)
        conditions.append(f"key < ${len(arguments)}")
    connection = await asyncpg.connect(target.dsn())
    try:
        count = await connection.fetchval(
            f"SELECT count(*) FROM {TABLE} WHERE {' AND '.join(conditions)}", *arguments
        )
    finally:
        await connection.close()
    return int(count)


def _result(
    options: Options,
    timed: Timed,
    rows_below: int,
    requests: Counter[str],
    pg: tuple[PgCounters | None, StatementStats | None],
) -> Result:
    return Result(
        scenario=options.scenario,
        concurrency=options.concurrency,
        rows=timed.work.rows,
        rows_below_cutoff=rows_below,
        objects_uploaded=timed.work.uploaded,
        bytes_uploaded=timed.work.bytes_uploaded,
        seconds=timed.seconds,
        cpu_s=timed.cpu_s,
        peak_rss_mib=peak_rss_mib(),
        s3_requests=dict(requests),
        pg=pg[0],
        statements=pg[1],
        started_at=timed.started_at,
        finished_at=timed.finished_at,
        cpu_spent=timed.cpu_spent,
        extra=timed.work.extra,
    )


# --------------------------------------------------------------------------------------------
# bare_put


def default_client_arguments(settings: Settings) -> dict[str, Any]:
    """``session.client("s3", …)`` arguments as a user of aioboto3 would write them: endpoint,
    region and keys, path-style addressing and a pool as large as the scenario's concurrency;
    every other setting is aioboto3's default (flexible checksums, parameter validation, the
    full User-Agent, legacy retries). The reference the product's client CPU is judged by."""
    arguments = s3_client_arguments(settings, max_connections=S3_MAX_CONNECTIONS)
    arguments["config"] = AioConfig(
        s3={"addressing_style": "path"}, max_pool_connections=S3_MAX_CONNECTIONS
    )
    return arguments


async def _objects_below_cutoff(target: Target) -> list[tuple[str, bytes]]:
    """(object key, value) of every row below the cutoff, in key order, read before timing."""
    connection = await asyncpg.connect(target.dsn())
    try:
        records = await connection.fetch(
            f"SELECT key, value FROM {TABLE} WHERE created_at < $1 ORDER BY key", target.cutoff
        )
    finally:
        await connection.close()
    return [(object_key(record["key"]), bytes(record["value"])) for record in records]


async def _bounded(concurrency: int, objects: list[tuple[str, bytes]], put: Put) -> Work:
    """``put`` every object, ``concurrency`` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def put_one(key: str, body: bytes) -> None:
        try:
            await put(key, body)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tasks:
        for key, body in objects:
            await slots.acquire()
            tasks.create_task(put_one(key, body))
    return Work(len(objects), len(objects), sum(len(body) for _, body in objects))


async def bare_put(options: Options) -> Result:
    """PutObject of every row below the cutoff, values loaded before timing, on a client with
    aioboto3's default settings (``default_client_arguments``)."""
    target = options.target
    settings = product_settings(target, application_name=options.app_name)
    objects = await _objects_below_cutoff(target)
    bucket = bucket_name(TABLE, target.bucket_prefix)
    counter = S3RequestCounter()
    meter = PgMeter(options)
    async with aioboto3.Session().client("s3", **default_client_arguments(settings)) as client:
        counter.attach(client)
        await meter.start(own_app_connected=False)

        async def put(key: str, body: bytes) -> None:
            await client.put_object(Bucket=bucket, Key=key, Body=body)

        timed = await _timed(options, lambda: _bounded(options.concurrency, objects, put))
    pg = await meter.finish()
    # What a Content-MD5 header (which our job sends and this loop does not) costs in CPU.
    md5_started = cpu_seconds()
    for _, body in objects:
        hashlib.md5(body, usedforsecurity=False).digest()
    md5_ms = 1000 * (cpu_seconds() - md5_started) / max(len(objects), 1)
    timed.work.extra["md5_cpu_ms_per_object"] = round(md5_ms, 4)
    return _result(options, timed, len(objects), counter.by_operation, pg)


# --------------------------------------------------------------------------------------------
# obstore_put


async def obstore_put(options: Options) -> Result:
    """The same PUTs as ``bare_put`` through obstore (Rust object_store; a reference for the
    PUT path's client CPU, never the product's transport): signed payload, no Content-MD5."""
    from obstore import put_async
    from obstore.store import S3Store

    target = options.target
    objects = await _objects_below_cutoff(target)
    store = S3Store(
        bucket_name(TABLE, target.bucket_prefix),
        endpoint=target.s3.url,
        region=target.s3.region,
        access_key_id=target.s3.access_key,
        secret_access_key=target.s3.secret_key,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )
    puts: Counter[str] = Counter()

    async def put(key: str, body: bytes) -> None:
        await put_async(store, key, body, use_multipart=False)
        puts["PutObject"] += 1

    timed = await _timed(options, lambda: _bounded(options.concurrency, objects, put))
    return _result(options, timed, len(objects), puts, (None, None))


# --------------------------------------------------------------------------------------------
# upstream, upstream_rerun


async def upstream(options: Options) -> Result:
    """The baseline loop on the scenario's bucket (empty, or filled by an earlier run)."""
    target = options.target
    rows_below = await _rows_below(target, Shard())
    settings = product_settings(target, application_name=options.app_name)
    counter = S3RequestCounter()
    meter = PgMeter(options)
    async with open_services_context(
        settings, with_s3=True, s3_max_connections=S3_MAX_CONNECTIONS
    ) as context:
        assert context.s3_client is not None
        s3_client = context.s3_client
        counter.attach(s3_client)
        await meter.start(own_app_connected=True)

        async def run() -> Work:
            stats = await upstream_backfill(
                context.pg_pool,
                s3_client,
                table=TABLE,
                bucket=bucket_name(TABLE, target.bucket_prefix),
                cutoff=target.cutoff,
                key_batch_size=options.key_batch_size,
                max_concurrent=options.concurrency,
            )
            return Work(
                stats.processed,
                stats.uploaded,
                stats.bytes_uploaded,
                {"skipped": stats.skipped, "listings": stats.listings},
            )

        timed = await _timed(options, run)
    pg = await meter.finish()
    return _result(options, timed, rows_below, counter.by_operation, pg)


# --------------------------------------------------------------------------------------------
# backfill, backfill_rerun

IN_FLIGHT_GAUGE = "layer_cache.backfill.uploads_in_flight"


class InFlightSampler:
    """Samples the job's own ``uploads_in_flight`` gauge (through an in-memory OTel reader) to
    see whether the upload slots stay busy. Off by default: each sample collects every
    instrument, which costs the client a little CPU."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.reader = InMemoryMetricReader()
        self.interval_s = interval_s
        self.samples: list[float] = []

    def _sample(self) -> None:
        data = self.reader.get_metrics_data()
        if data is None:
            return
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    if metric.name == IN_FLIGHT_GAUGE:
                        for point in metric.data.data_points:
                            self.samples.append(float(point.value))  # type: ignore[union-attr]

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    def summary(self, concurrency: int) -> dict[str, Any]:
        """Mean slots in use, and how often fewer than half were."""
        if not self.samples:
            return {}
        mean = sum(self.samples) / len(self.samples)
        below_half = sum(1 for value in self.samples if value < concurrency / 2)
        return {
            "in_flight_samples": len(self.samples),
            "in_flight_mean": round(mean, 2),
            "in_flight_mean_share_of_c": round(mean / concurrency, 3),
            "in_flight_below_half_share": round(below_half / len(self.samples), 3),
        }


async def _forget_progress(target: Target, shard: Shard) -> None:
    """Delete saved progress for this cutoff and shard, so the run copies from the start."""
    connection = await asyncpg.connect(target.dsn())
    try:
        if await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", PROGRESS_TABLE):
            await connection.execute(
                f"DELETE FROM {PROGRESS_TABLE} WHERE cutoff = $1 AND shard = $2",
                target.cutoff,
                shard.label,
            )
    finally:
        await connection.close()


async def backfill(options: Options, *, restart: bool) -> Result:
    """Our job, in-process, through ``run_backfill``."""
    target = options.target
    shard = options.shard
    rows_below = 0  # a child of ``shards``: the parent has set up and counts the rows
    if not options.wait_for_go:
        if not restart:
            await _forget_progress(target, shard)
        rows_below = await _rows_below(target, shard)
    settings = product_settings(target, application_name=options.app_name)
    config = BackfillConfig(
        cutoff=target.cutoff,
        cache_types=(CacheType.CAS,),
        key_batch_size=options.key_batch_size,
        max_concurrent_uploads=options.concurrency,
        concurrency=options.concurrency_mode,
        grace_period=timedelta(seconds=20),
        restart=restart,
        shard=shard,
        checkpoint_interval=timedelta(seconds=options.checkpoint_interval_s),
        max_uploads_per_second=options.max_uploads_per_second,
        max_bytes_per_second=options.max_bytes_per_second,
    )
    counter = S3RequestCounter()
    meter = PgMeter(options)
    sampler = InFlightSampler() if options.sample_in_flight else None
    async with open_services_context(
        settings,
        with_s3=True,
        s3_max_connections=max(S3_MAX_CONNECTIONS, options.concurrency + 8),
        metric_readers=[sampler.reader] if sampler else (),
    ) as context:
        assert context.s3_client is not None
        counter.attach(context.s3_client)
        await meter.start(own_app_connected=True)

        async def run() -> Work:
            sampling = asyncio.create_task(sampler.run()) if sampler else None
            stop = StopRequest()
            if options.stop_after_s is not None:
                asyncio.get_running_loop().call_later(options.stop_after_s, stop.event.set)
            try:
                report = await run_backfill(context, config, stop)
            finally:
                if sampling is not None:
                    sampling.cancel()
            if report.failure is not None or not (report.complete or stop.event.is_set()):
                raise RuntimeError(f"the backfill did not complete: {report.failure}")
            stats = report.outcomes[0].stats
            return Work(
                stats.processed,
                stats.uploaded,
                stats.bytes_uploaded,
                {
                    "skipped": stats.skipped,
                    "repaired": stats.repaired,
                    "retries": dict(stats.retries),
                }
                | (sampler.summary(options.concurrency) if sampler else {}),
            )

        timed = await _timed(options, run)
    pg = await meter.finish()
    return _result(options, timed, rows_below, counter.by_operation, pg)


# --------------------------------------------------------------------------------------------
# shards


def _child_command(options: Options, index: int) -> list[str]:
    return [
        sys.executable, "-m", "bench.scenarios", "backfill",
        "--target", options.target.to_json(),
        "--json",
        "--concurrency", str(options.concurrency),
        "--key-batch-size", str(options.key_batch_size),
        "--shard-index", str(index),
        "--shard-count", str(options.shards),
        "--wait-for-go",
        "--no-pg-stats",
        "--app-name", f"{options.app_name}-{index}",
    ]  # fmt: skip


async def _read_json_line(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    async for raw in process.stdout:
        line = raw.decode()
        if line.startswith("{"):
            data: dict[str, Any] = json.loads(line)
            return data
    raise RuntimeError(f"shard child {process.pid} ended without a result")


async def shards(options: Options) -> Result:
    """K backfill processes, one shard each, set up first and then released together."""
    target = options.target
    for index in range(options.shards):
        await _forget_progress(target, Shard(index, options.shards))
    rows_below = await _rows_below(target, Shard())
    meter = PgMeter(options)
    await meter.start(own_app_connected=False)
    children = [
        await asyncio.create_subprocess_exec(
            *_child_command(options, index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for index in range(options.shards)
    ]
    try:
        for child in children:
            await _read_json_line(child)  # ready: context open, nothing timed yet
        machine_before = CpuSnapshot.take(target.s3_pid, target.pg_pid)
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        results = [await _read_json_line(child) for child in children]
        machine_after = CpuSnapshot.take(target.s3_pid, target.pg_pid)
        for child in children:
            if await asyncio.wait_for(child.wait(), timeout=60) != 0:
                raise RuntimeError(f"shard child exited with {child.returncode}")
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    pg = await meter.finish()
    requests: Counter[str] = Counter()
    for summary in results:
        requests.update(summary["s3_requests"])
    work = Work(
        sum(summary["rows"] for summary in results),
        sum(summary["objects_uploaded"] for summary in results),
        sum(summary["bytes_uploaded"] for summary in results),
        {
            "shards": options.shards,
            "total_in_flight": options.shards * options.concurrency,
            "per_shard": [
                {
                    name: summary[name]
                    for name in ("rows", "seconds", "rows_per_s", "cpu_ms_per_object")
                }
                | {"peak_rss_mib": summary["peak_rss_mib"]}
                for summary in results
            ],
        },
    )
    started = min(summary["started_at"] for summary in results)
    finished = max(summary["finished_at"] for summary in results)
    client_cpu = sum(summary["cpu_s"] for summary in results)
    timed = Timed(
        work,
        started_at=started,
        finished_at=finished,
        cpu_s=client_cpu,
        cpu_spent=CpuSpent.between(
            machine_before, machine_after, client=client_cpu, wall=finished - started
        ),
    )
    result = _result(options, timed, rows_below, requests, pg)
    result.peak_rss_mib = max(float(summary["peak_rss_mib"]) for summary in results)
    return result


# --------------------------------------------------------------------------------------------
# command line


async def run_scenario(options: Options) -> Result:
    """Run the named scenario."""
    name = options.scenario
    if name == "bare_put":
        return await bare_put(options)
    if name == "obstore_put":
        return await obstore_put(options)
    if name in ("upstream", "upstream_rerun"):
        return await upstream(options)
    if name in ("backfill", "backfill_rerun"):
        return await backfill(options, restart=name == "backfill_rerun")
    if name == "shards":
        return await shards(options)
    raise ValueError(f"unknown scenario {name!r}; expected one of {', '.join(SCENARIOS)}")


def parse_options(argv: list[str] | None = None) -> tuple[Options, bool]:
    """The scenario's options and whether to print compact JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.scenarios", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--target", required=True, help="Target JSON (see bench.common)")
    parser.add_argument("--json", action="store_true", help="print one compact JSON line")
    parser.add_argument("--concurrency", type=int, default=20, help="uploads in flight")
    parser.add_argument(
        "--concurrency-mode",
        type=ConcurrencyMode,
        default=ConcurrencyMode.FIXED,
        help="backfill: fixed (C in flight) or tuned (C is the ceiling)",
    )
    parser.add_argument("--key-batch-size", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2, help="processes for 'shards'")
    parser.add_argument("--shard-index", type=int, default=None)
    parser.add_argument("--shard-count", type=int, default=1)
    parser.add_argument("--wait-for-go", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-pg-stats", action="store_true", help="skip Postgres counters")
    parser.add_argument("--profile", default=None, help="write cProfile stats of the timed part")
    parser.add_argument(
        "--sample-in-flight",
        action="store_true",
        help="backfill: sample the uploads_in_flight gauge every 20 ms (costs some CPU)",
    )
    parser.add_argument(
        "--max-uploads-per-second", type=float, default=None, help="backfill: rate limit"
    )
    parser.add_argument(
        "--max-bytes-per-second", type=int, default=None, help="backfill: rate limit (bytes)"
    )
    parser.add_argument(
        "--checkpoint-interval-s",
        type=float,
        default=30.0,
        help="backfill: seconds between 'backfill checkpoint' events (uploads so far)",
    )
    parser.add_argument(
        "--stop-after-s",
        type=float,
        default=None,
        help="backfill: stop after this long (draining, as on SIGTERM) instead of at the end",
    )
    parser.add_argument("--app-name", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = Options(
        scenario=args.scenario,
        target=Target.from_json(args.target),
        concurrency=args.concurrency,
        concurrency_mode=args.concurrency_mode,
        key_batch_size=args.key_batch_size,
        shards=args.shards,
        shard_index=args.shard_index,
        shard_count=args.shard_count,
        wait_for_go=args.wait_for_go,
        measure_pg=not args.no_pg_stats,
        profile=args.profile,
        sample_in_flight=args.sample_in_flight,
        max_uploads_per_second=args.max_uploads_per_second,
        max_bytes_per_second=args.max_bytes_per_second,
        checkpoint_interval_s=args.checkpoint_interval_s,
        stop_after_s=args.stop_after_s,
        app_name=args.app_name,
    )
    return options, bool(args.json)


def main(argv: list[str] | None = None) -> None:
    """Run one scenario and print its JSON line."""
    options, compact = parse_options(argv)
    fingerprint = code_fingerprint()
    configure_logging(json=True, stream=sys.stderr)
    result = asyncio.run(run_scenario(options))
    summary = result.summary() | {"code_fingerprint": fingerprint}
    print(json.dumps(summary) if compact else json.dumps(summary, indent=2), flush=True)


if __name__ == "__main__":
    main()
