"""Load test of the layer cache server: requests/s and p99 latency of PUT and GET, per mode.

``python -m bench.server_load`` starts a local PostgreSQL and S3 server (``devenv.servers``:
containers when Docker answers, else the local PostgreSQL binaries and moto), applies the
layer-db schema, and then, for each persister mode, runs the real server as a subprocess
(``python -m services --migration-mode skip --socket-addr 127.0.0.1:0``) and drives it over
loopback from this process with ``--concurrency`` requests in flight:

* PUT: ``--requests`` new cas keys, each a ``--value-bytes`` random value (201 expected);
* GET: ``--requests`` reads of those keys in random order (200 expected).

Each phase stops at ``--requests`` or after ``--phase-secs``, whichever comes first, so a
default run stays under a minute. It reports, per mode and operation, completed requests,
errors, requests/s (completed over the phase's wall time) and p50/p99 latency, as a table on
stdout and as JSON in ``bench/results/server_load.json``. The client, the server, Postgres and
S3 share this machine's cores, so the numbers describe this machine, not the server alone.

This is a benchmark, not a test: nothing is asserted beyond every request having an answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from devenv.servers import (
    PostgresEndpoint,
    S3Endpoint,
    create_buckets,
    start_postgres,
    start_s3,
)
from layer_cache.cache_types import CACHE_SPECS
from layer_cache.keys import bucket_name
from layer_cache.schema import migrate_layer_db
from migrations_mode.tables import render_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "server_load.json"
MODES = ("PostgresOnly", "DualWrite", "S3Primary", "S3Only")
LISTEN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


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


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def server_env(
    pg: PostgresEndpoint, s3: S3Endpoint, bucket_prefix: str, mode: str
) -> dict[str, str]:
    """The environment an operator would give the server."""
    pg_prefix = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__"
    storage = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SI_", "OTEL_", "AWS_"))
    }
    return inherited | {
        "SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE": mode,
        pg_prefix + "HOSTNAME": pg.host,
        pg_prefix + "PORT": str(pg.port),
        pg_prefix + "USER": pg.user,
        pg_prefix + "PASSWORD": pg.password,
        pg_prefix + "DBNAME": pg.dbname,
        pg_prefix + "SSLMODE": "disable",
        storage + "ENDPOINT": s3.url,
        storage + "REGION": s3.region,
        storage + "BUCKET_PREFIX": bucket_prefix,
        storage + "AUTH__STATIC_CREDENTIALS__ACCESS_KEY": s3.access_key,
        storage + "AUTH__STATIC_CREDENTIALS__SECRET_KEY": s3.secret_key,
        "SI_SDF__SERVER__GRACE_PERIOD_SECS": "10",
    }


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
async def running_server(env: Mapping[str, str]) -> AsyncIterator[str]:
    """The server as a subprocess; yields its base URL; SIGTERM and wait on the way out."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services", "--migration-mode", "skip", "--log-json"),
        *("--socket-addr", "127.0.0.1:0"),
        env=dict(env),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[str] = []
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(LISTEN_TIMEOUT_S):
            port = await _listening_port(process.stderr, seen)
        drain = asyncio.create_task(_drain(process.stderr, seen))
        yield f"http://127.0.0.1:{port}"
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


async def run_phase(
    mode: str,
    operation: str,
    jobs: Sequence[Callable[[], Awaitable[bool]]],
    *,
    concurrency: int,
    phase_secs: float,
) -> PhaseResult:
    """Run ``jobs`` with ``concurrency`` workers until done or the time is up."""
    latencies: list[float] = []
    errors = 0
    pending = iter(jobs)
    started = time.perf_counter()
    deadline = started + phase_secs

    async def worker() -> None:
        nonlocal errors
        for job in pending:  # the workers share one iterator
            if time.perf_counter() >= deadline:
                return
            sent = time.perf_counter()
            ok = await job()
            latencies.append(time.perf_counter() - sent)
            errors += not ok

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
    )


async def load_mode(
    mode: str, base_url: str, args: argparse.Namespace, rng: random.Random
) -> list[PhaseResult]:
    """PUT then GET against one running server."""
    values = {uuid.uuid4().hex: rng.randbytes(args.value_bytes) for _ in range(args.requests)}
    keys = list(values)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def put(key: str) -> bool:
            async with session.put(f"{base_url}/v1/cas/{key}", data=values[key]) as response:
                await response.read()
                return response.status == 201

        async def get(key: str) -> bool:
            async with session.get(f"{base_url}/v1/cas/{key}") as response:
                return response.status == 200 and await response.read() == values[key]

        put_result = await run_phase(
            mode,
            "PUT",
            [partial(put, key) for key in keys],
            concurrency=args.concurrency,
            phase_secs=args.phase_secs,
        )
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
    header = ("mode", "op", "requests", "errors", "req/s", "p50 ms", "p99 ms")
    rows = [
        (r.mode, r.operation, r.requests, r.errors, r.requests_per_s, r.p50_ms, r.p99_ms)
        for r in results
    ]
    return render_table(header, rows, left_columns=2)


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
    try:
        s3_server = start_s3(kind=args.s3)
        pg, s3 = postgres.endpoint, s3_server.endpoint
        await prepare_database(pg)
        results: list[PhaseResult] = []
        for mode in args.modes:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            create_buckets(s3, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()])
            async with running_server(server_env(pg, s3, prefix, mode)) as base_url:
                results.extend(await load_mode(mode, base_url, args, rng))
        return {
            "benchmark": "server_load",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "s3_server": s3.kind,
            "settings": {
                "requests_per_phase": args.requests,
                "concurrency": args.concurrency,
                "value_bytes": args.value_bytes,
                "phase_secs": args.phase_secs,
            },
            "results": [asdict(result) for result in results],
        }
    finally:
        if s3_server is not None:
            s3_server.stop()
        postgres.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.server_load", description=__doc__)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--value-bytes", type=int, default=4096, help="size of each value")
    parser.add_argument("--phase-secs", type=float, default=5.0, help="time cap per phase")
    parser.add_argument("--s3", choices=("moto", "minio", "s3rver", "seaweedfs"), default=None)
    parser.add_argument("--seed", type=int, default=5156)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    report = asyncio.run(run(args))
    report["wall_secs"] = round(time.monotonic() - started, 1)
    results = [PhaseResult(**result) for result in report["results"]]
    print(
        f"layer cache server load: {report['machine']['cpus']} CPUs, S3 server "
        f"{report['s3_server']}, {args.concurrency} in flight, {args.value_bytes}-byte values"
    )
    print(format_table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output} ({report['wall_secs']} s)")


if __name__ == "__main__":
    main()
