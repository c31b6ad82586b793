"""Load test of the layer cache server: requests/s and latency of PUT and GET, per mode.

``python -m bench.server_load`` starts PostgreSQL and an S3 server, runs the real server as a
subprocess per persister mode and drives it over loopback (a PUT phase of new ``cas`` values, then
a GET phase, each capped by ``--requests`` or ``--phase-secs``); with DualWrite it also runs the
PUT phase with S3 behind ``bench.delay_proxy``, and counts the objects in S3 after each PUT phase
and again once SIGTERM has stopped the server, to show write-behind. Then, for each of
``--write-concurrencies`` (8 and 64 in flight), a PUT phase against a fresh PostgresOnly and a
fresh DualWrite server: the write-latency rows, DualWrite's p50/p99 against PostgresOnly's (the
durable queue's group commit is what keeps them close), with the throwaway Postgres (no fsync)
and again with a durable one (fsync and synchronous commits on, as in production; not with
``--smoke``). Each server's write queue lives in a temporary directory removed at the end. A
benchmark, not a test: nothing is asserted beyond every request having an answer. Details and
output: ``docs/bench.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.common import code_fingerprint
from devenv.environment import service_environment
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3Endpoint, create_buckets, start_s3
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name
from layer_cache.schema import migrate_layer_db
from migrations_mode.tables import build_table, render_table

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
MODES = ("PostgresOnly", "DualWrite", "S3Primary", "S3Only")
SMOKE_MODES = ("PostgresOnly", "DualWrite")
WRITES_S3 = frozenset({"DualWrite", "S3Primary", "S3Only"})
LISTEN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
PROXY_START_TIMEOUT_S = 30.0
PROXY_MAX_SECS = 600.0
NO_DELAY = "none"


@dataclass(frozen=True)
class PhaseResult:
    """One operation against one mode."""

    mode: str
    operation: str
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    s3_delay: str = NO_DELAY
    """``none``, or the delay every S3 request got, e.g. ``60±5 ms``."""
    in_s3_at_end: int | None = None
    """Objects in the cas bucket when the PUT phase ended (None: mode or op writes no S3)."""
    in_s3_after_stop: int | None = None
    """Objects in the cas bucket once the server had stopped (SIGTERM drains what it can)."""
    first_error: str | None = None
    """What the first failed request got (status and the start of the body), if any failed."""


@dataclass(frozen=True)
class WriteLatency:
    """PUT latency of DualWrite against PostgresOnly at one number of requests in flight."""

    concurrency: int
    postgres_only: PhaseResult
    dual_write: PhaseResult
    postgres_fsync: bool = False
    """Postgres flushed its commits to disk (as in production), or not (a throwaway one)."""

    @property
    def p50_ratio(self) -> float:
        """DualWrite's median PUT latency over PostgresOnly's."""
        return _ratio(self.dual_write.p50_ms, self.postgres_only.p50_ms)

    @property
    def p99_ratio(self) -> float:
        return _ratio(self.dual_write.p99_ms, self.postgres_only.p99_ms)

    def as_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "postgres_fsync": self.postgres_fsync,
            "postgres_only": asdict(self.postgres_only),
            "dual_write": asdict(self.dual_write),
            "p50_ratio": self.p50_ratio,
            "p99_ratio": self.p99_ratio,
        }


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2) if denominator else math.inf


def format_write_latency(rows: Sequence[WriteLatency]) -> str:
    """The write-latency rows: per number in flight, both modes' PUT p50/p99 and the ratios."""
    header = (
        "Postgres fsync",
        "in flight",
        "PostgresOnly req/s",
        "p50 ms",
        "p99 ms",
        "DualWrite req/s",
        "p50 ms",
        "p99 ms",
        "p50 ratio",
        "p99 ratio",
    )
    table = [
        (
            "on" if row.postgres_fsync else "off",
            row.concurrency,
            row.postgres_only.requests_per_s,
            row.postgres_only.p50_ms,
            row.postgres_only.p99_ms,
            row.dual_write.requests_per_s,
            row.dual_write.p50_ms,
            row.dual_write.p99_ms,
            row.p50_ratio,
            row.p99_ratio,
        )
        for row in rows
    ]
    return render_table(build_table(header, table, left_columns=1))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def server_env(
    pg: PostgresEndpoint, s3: S3Endpoint, bucket_prefix: str, mode: str, write_queue_dir: Path
) -> dict[str, str]:
    """The environment an operator would give the server (its own S3 write queue directory)."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SI_", "OTEL_", "AWS_"))
    }
    return (
        inherited
        | service_environment(pg, s3, bucket_prefix=bucket_prefix, persister_mode=mode)
        | {
            "SI_SDF__SERVER__GRACE_PERIOD_SECS": "10",
            "SI_SDF__SERVER__WRITE_QUEUE_DIR": str(write_queue_dir),
            # Open on purpose: these rows measure storage, not access control.
            "SI_SDF__SERVER__AUTH": "none",
            "OTEL_METRICS_EXPORTER": "none",
        }
    )


async def _listening_port(stream: asyncio.StreamReader, seen: list[str]) -> int:
    """The port of the ``layer cache server listening`` log event."""
    while line := (await stream.readline()).decode():
        seen.append(line)
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "layer cache server listening":
            return int(event["port"])
    raise RuntimeError("the server exited before listening:\n" + "".join(seen))


async def _drain(stream: asyncio.StreamReader, seen: list[str]) -> None:
    """Keep reading the log so the server never blocks on a full pipe."""
    while line := (await stream.readline()).decode():
        seen.append(line)


@asynccontextmanager
async def running_server(
    env: Mapping[str, str],
    *,
    on_started: Callable[[int], None] | None = None,
    https: bool = False,
) -> AsyncIterator[str]:
    """The server as a subprocess; yields its base URL (``https`` when ``env`` gives it a
    certificate); SIGTERM and wait on the way out. ``on_started`` is told the process id (to
    sample its memory)."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services", "--migration-mode", "skip", "--log-json"),
        *("--socket-addr", "127.0.0.1:0"),
        env=dict(env),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    if on_started is not None:
        on_started(process.pid)
    seen: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(LISTEN_TIMEOUT_S):
            port = await _listening_port(process.stderr, seen)
        drain = asyncio.create_task(_drain(process.stderr, seen))
        yield f"{'https' if https else 'http'}://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        if drain is not None:
            await drain


@dataclass
class DelayedS3:
    """The S3 endpoint behind the delay proxy, and the proxy's counts once it stopped."""

    endpoint: S3Endpoint
    counts: dict[str, int]


@asynccontextmanager
async def delayed_s3(s3: S3Endpoint, low_s: float, high_s: float) -> AsyncIterator[DelayedS3]:
    """``bench.delay_proxy`` in front of ``s3``; SIGTERM on the way out, counts read back."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "bench.delay_proxy", s3.url, str(low_s), str(high_s)),
        *("--max-secs", str(PROXY_MAX_SECS)),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(PROXY_START_TIMEOUT_S):
            first = (await process.stdout.readline()).decode()
        if not first:
            raise RuntimeError("the delay proxy exited before listening")
        delayed = DelayedS3(replace(s3, url=json.loads(first)["url"]), {})
        yield delayed
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                rest = (await process.stdout.read()).decode()
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            rest = ""
    for line in rest.splitlines():
        delayed.counts.update(json.loads(line).get("counts", {}))


def count_objects(s3: S3Endpoint, bucket: str) -> int:
    """How many objects ``bucket`` holds (synchronous boto3 listing, straight to the server)."""
    import boto3  # type: ignore[import-untyped, unused-ignore]
    from botocore.config import Config

    client = boto3.client(
        "s3",
        **s3.client_options(),
        config=Config(s3={"addressing_style": "path"}),
    )
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sum(int(page.get("KeyCount", 0)) for page in pages)
    finally:
        client.close()


async def run_phase(
    mode: str,
    operation: str,
    jobs: Sequence[Callable[[], Awaitable[str | None]]],
    *,
    concurrency: int,
    phase_secs: float,
) -> PhaseResult:
    """Run ``jobs`` with ``concurrency`` workers until done or the time is up."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    pending = iter(jobs)
    started = time.perf_counter()
    deadline = started + phase_secs

    async def worker() -> None:
        nonlocal errors, first_error
        for job in pending:  # the workers share one iterator
            if time.perf_counter() >= deadline:
                return
            sent = time.perf_counter()
            error = await job()
            latencies.append(time.perf_counter() - sent)
            if error is not None:
                errors += 1
                first_error = first_error or error

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    seconds = time.perf_counter() - started
    latencies.sort()
    return PhaseResult(
        mode=mode,
        operation=operation,
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 3),
        requests_per_s=round(len(latencies) / seconds, 1) if seconds else 0.0,
        p50_ms=round(percentile(latencies, 0.50) * 1000, 2),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 2),
        first_error=first_error,
    )


def describe(status: int, body: bytes) -> str:
    """A failed request in one line: its status and the start of the body."""
    if status == 200:
        return "200 with a value other than the one written"
    return f"{status} {body[:200].decode(errors='replace')}"


async def load_mode(
    mode: str,
    base_url: str,
    args: argparse.Namespace,
    rng: random.Random,
    *,
    count_written: Callable[[], Awaitable[int]] | None = None,
    s3_delay: str = NO_DELAY,
    with_reads: bool = True,
) -> list[PhaseResult]:
    """PUT (then GET, if ``with_reads``) against one running server.

    ``count_written`` (modes that write S3) counts the objects in S3 right after the PUT phase.
    """
    values = {uuid.uuid4().hex: rng.randbytes(args.value_bytes) for _ in range(args.requests)}
    keys = list(values)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def put(key: str) -> str | None:
            async with session.put(f"{base_url}/v1/cas/{key}", data=values[key]) as response:
                body = await response.read()
                return None if response.status == 201 else describe(response.status, body)

        async def get(key: str) -> str | None:
            async with session.get(f"{base_url}/v1/cas/{key}") as response:
                body = await response.read()
                if response.status == 200 and body == values[key]:
                    return None
                return describe(response.status, body if response.status != 200 else b"")

        put_result = await run_phase(
            mode,
            "PUT",
            [partial(put, key) for key in keys],
            concurrency=args.concurrency,
            phase_secs=args.phase_secs,
        )
        in_s3 = await count_written() if count_written is not None else None
        put_result = replace(put_result, s3_delay=s3_delay, in_s3_at_end=in_s3)
        if not with_reads:
            return [put_result]
        written = keys[: put_result.requests]
        reads = [rng.choice(written) for _ in range(args.requests)] if written else []
        get_result = await run_phase(
            mode,
            "GET",
            [partial(get, key) for key in reads],
            concurrency=args.concurrency,
            phase_secs=args.phase_secs,
        )
    return [put_result, get_result]


def format_table(results: Sequence[PhaseResult]) -> str:
    """The results as a plain-text table."""
    header = (
        "mode",
        "S3 delay",
        "op",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
        "in S3 at end",
        "after stop",
    )
    rows = [
        (
            r.mode,
            r.s3_delay,
            r.operation,
            r.requests,
            r.errors,
            r.requests_per_s,
            r.p50_ms,
            r.p99_ms,
            "-" if r.in_s3_at_end is None else r.in_s3_at_end,
            "-" if r.in_s3_after_stop is None else r.in_s3_after_stop,
        )
        for r in results
    ]
    return render_table(build_table(header, rows, left_columns=3))


def delay_bounds(args: argparse.Namespace) -> tuple[float, float]:
    """The delay proxy's latency bounds in seconds, from ``--s3-delay-ms`` and its jitter."""
    low = max(0.0, args.s3_delay_ms - args.s3_jitter_ms)
    return low / 1000, (args.s3_delay_ms + args.s3_jitter_ms) / 1000


def delay_label(args: argparse.Namespace) -> str:
    """How the table and JSON name the delayed scenario's S3 latency."""
    if args.s3_jitter_ms:
        return f"{args.s3_delay_ms:g}±{args.s3_jitter_ms:g} ms"
    return f"{args.s3_delay_ms:g} ms"


async def measure_write_latency(
    args: argparse.Namespace,
    rng: random.Random,
    pg: PostgresEndpoint,
    s3: S3Endpoint,
    fresh_prefix: Callable[[], tuple[str, Callable[[], Awaitable[int]]]],
    queues: Path,
) -> list[WriteLatency]:
    """The write-latency rows: PostgresOnly and DualWrite PUT phases per number in flight, with
    the run's throwaway Postgres and (unless ``--smoke``) a durable one started for them."""
    rows: list[WriteLatency] = []
    if not args.write_concurrencies:
        return rows
    durable = None if args.smoke else start_postgres(durable=True)
    try:
        if durable is not None:
            await prepare_database(durable.endpoint)
        targets = [(False, pg)] + ([(True, durable.endpoint)] if durable is not None else [])
        for fsync, postgres in targets:
            for concurrency in args.write_concurrencies:
                measured: dict[str, PhaseResult] = {}
                for mode in ("PostgresOnly", "DualWrite"):
                    prefix, _ = fresh_prefix()
                    env = server_env(postgres, s3, prefix, mode, queues / prefix)
                    async with running_server(env) as base_url:
                        [measured[mode]] = await load_mode(
                            mode,
                            base_url,
                            replace_concurrency(args, concurrency),
                            rng,
                            with_reads=False,
                        )
                rows.append(
                    WriteLatency(
                        concurrency, measured["PostgresOnly"], measured["DualWrite"], fsync
                    )
                )
    finally:
        if durable is not None:
            durable.stop()
    return rows


def replace_concurrency(args: argparse.Namespace, concurrency: int) -> argparse.Namespace:
    """The flags with another number of requests in flight."""
    return argparse.Namespace(**(vars(args) | {"concurrency": concurrency}))


async def prepare_database(pg: PostgresEndpoint) -> None:
    pool = await asyncpg.create_pool(pg.dsn(), min_size=1, max_size=2)
    try:
        await migrate_layer_db(pool)
    finally:
        await pool.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, load every selected mode, stop everything."""
    rng = random.Random(args.seed)
    postgres = start_postgres()
    s3_server = None
    scratch = tempfile.TemporaryDirectory(prefix="server-load-")
    queues = Path(scratch.name)
    try:
        s3_server = start_s3(kind=args.s3)
        pg, s3 = postgres.endpoint, s3_server.endpoint
        await prepare_database(pg)
        results: list[PhaseResult] = []
        proxy_counts: dict[str, int] | None = None

        def fresh_prefix() -> tuple[str, Callable[[], Awaitable[int]]]:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            create_buckets(s3, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()])
            cas_bucket = bucket_name(CACHE_SPECS[CacheType.CAS].table, prefix)
            return prefix, partial(asyncio.to_thread, count_objects, s3, cas_bucket)

        async def after_stop(
            phases: list[PhaseResult], counter: Callable[[], Awaitable[int]]
        ) -> list[PhaseResult]:
            if all(phase.in_s3_at_end is None for phase in phases):
                return phases
            in_s3 = await counter()
            return [
                phase if phase.in_s3_at_end is None else replace(phase, in_s3_after_stop=in_s3)
                for phase in phases
            ]

        for mode in args.modes:
            prefix, counter = fresh_prefix()
            queue_dir = queues / prefix
            async with running_server(server_env(pg, s3, prefix, mode, queue_dir)) as base_url:
                phases = await load_mode(
                    mode,
                    base_url,
                    args,
                    rng,
                    count_written=counter if mode in WRITES_S3 else None,
                )
            results.extend(await after_stop(phases, counter))
            if mode == "DualWrite" and args.s3_delay_ms > 0:
                prefix, counter = fresh_prefix()
                queue_dir = queues / prefix
                async with delayed_s3(s3, *delay_bounds(args)) as delayed:
                    env = server_env(pg, delayed.endpoint, prefix, mode, queue_dir)
                    async with running_server(env) as base_url:
                        phases = await load_mode(
                            mode,
                            base_url,
                            args,
                            rng,
                            count_written=counter,
                            s3_delay=delay_label(args),
                            with_reads=False,
                        )
                results.extend(await after_stop(phases, counter))
                proxy_counts = delayed.counts
        write_latency = await measure_write_latency(args, rng, pg, s3, fresh_prefix, queues)
        return {
            "benchmark": "server_load",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "s3_server": s3.kind,
            "code_fingerprint": code_fingerprint(),
            "note": args.note,
            "settings": {
                "requests_per_phase": args.requests,
                "concurrency": args.concurrency,
                "value_bytes": args.value_bytes,
                "phase_secs": args.phase_secs,
                "s3_delay_ms": args.s3_delay_ms,
                "s3_jitter_ms": args.s3_jitter_ms,
                "smoke": args.smoke,
            },
            "results": [asdict(result) for result in results],
            "delay_proxy_counts": proxy_counts,
            "write_latency": [row.as_json() for row in write_latency],
        }
    finally:
        if s3_server is not None:
            s3_server.stop()
        postgres.stop()
        scratch.cleanup()


def timed_report(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run one of the server's benchmarks; its report, with the wall time it took."""
    started = time.monotonic()
    report = asyncio.run(run(args))
    report["wall_secs"] = round(time.monotonic() - started, 1)
    return report


def save_report(report: dict[str, Any], results_dir: Path, name: str) -> None:
    """Write the report as ``<results_dir>/<name>-<UTC time>.json`` and say where."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results_dir.mkdir(parents=True, exist_ok=True)
    output = results_dir / f"{name}-{stamp}.json"
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {output} ({report['wall_secs']} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.server_load", description=__doc__)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--value-bytes", type=int, default=4096, help="size of each value")
    parser.add_argument("--phase-secs", type=float, default=5.0, help="time cap per phase")
    parser.add_argument(
        "--s3-delay-ms",
        type=float,
        default=60.0,
        help="S3 latency of the extra DualWrite PUT phase (0: no such phase)",
    )
    parser.add_argument("--s3-jitter-ms", type=float, default=5.0, help="+- around the delay")
    parser.add_argument(
        "--write-concurrencies",
        type=int,
        nargs="*",
        default=[8, 64],
        help="requests in flight of the write-latency rows (DualWrite against PostgresOnly "
        "PUTs); none: no such rows",
    )
    parser.add_argument("--s3", choices=("moto", "minio", "s3rver", "seaweedfs"), default=None)
    parser.add_argument("--seed", type=int, default=5156)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. the commit)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI size: PostgresOnly and DualWrite, 100 requests, 8 in flight, 3 s phases",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with ``--smoke`` applied; a bad combination ends in argparse's exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.smoke:
        args.modes = list(SMOKE_MODES)
        args.requests = 100
        args.concurrency = 8
        args.phase_secs = 3.0
        args.write_concurrencies = [8]
    if (
        args.requests < 1
        or args.concurrency < 1
        or any(concurrency < 1 for concurrency in args.write_concurrencies)
        or args.value_bytes < 0
        or args.phase_secs <= 0
    ):
        parser.error(
            "--requests, --concurrency and --write-concurrencies must be >= 1, --value-bytes"
            " >= 0, --phase-secs > 0"
        )
    if args.s3_delay_ms < 0 or args.s3_jitter_ms < 0:
        parser.error("--s3-delay-ms and --s3-jitter-ms must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = timed_report(run, args)
    results = [PhaseResult(**result) for result in report["results"]]
    print(
        f"layer cache server load: {report['machine']['cpus']} CPUs, S3 server "
        f"{report['s3_server']}, {args.concurrency} in flight, {args.value_bytes}-byte values"
    )
    print(format_table(results))
    rows = [
        WriteLatency(
            row["concurrency"],
            PhaseResult(**row["postgres_only"]),
            PhaseResult(**row["dual_write"]),
            row["postgres_fsync"],
        )
        for row in report["write_latency"]
    ]
    if rows:
        print("write latency, PUT, S3 healthy: DualWrite against PostgresOnly")
        print(format_write_latency(rows))
    for result in [*results, *(r for row in rows for r in (row.postgres_only, row.dual_write))]:
        if result.first_error is not None:
            print(f"{result.mode} {result.operation} first error: {result.first_error}")
    save_report(report, args.results_dir, "server-load")


if __name__ == "__main__":
    main()
