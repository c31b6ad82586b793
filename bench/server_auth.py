"""What the server's access control costs a request: ``python -m bench.server_auth``.

Two measurements, both printed as tables and written as JSON to
``bench/results/server-auth-<UTC time>.json``:

* **The check alone**, in this process: what ``LayerCacheServer`` runs per request before its
  handler (the ``Authorization`` header parsed, the token's SHA-256 compared in constant time
  with every stored digest of every role, the decision), in µs per call, with 1, 2 (a rotation)
  and 10 tokens per role, for a read token and a bad token.
* **End to end**: the real server (``python -m services``, PostgresOnly, local PostgreSQL and an
  S3 server for its start-up checks) as a subprocess over loopback, ``--concurrency`` requests in
  flight, a PUT phase of new ``--value-bytes`` cas values then a GET phase, per variant: open
  (``SI_SDF__SERVER__AUTH=none``, no header), open with a token sent (the client's own cost of
  the header; the server ignores it), tokens (a write token on PUTs, a read token on GETs, two
  tokens per role), and tokens over HTTPS (a test CA made at run time). The variants
  take turns for ``--rounds`` rounds, each on a fresh server, so drift in the machine's load
  falls on each alike; per variant and operation the requests of every round are pooled:
  requests/s, p50, p99, and p50/p99 over the open server's.

A benchmark, not a test: nothing is asserted beyond every request having the expected answer.
``--smoke`` runs it small (the suite's ``test_bench_smoke.py``). Servers and temporary files
are stopped and removed on the way out, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import ssl
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import code_fingerprint
from bench.server_load import (
    DEFAULT_RESULTS_DIR,
    percentile,
    prepare_database,
    running_server,
    save_report,
    server_env,
    timed_report,
)
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3Endpoint, create_buckets, start_s3
from devenv.tls import make_local_pki
from layer_cache.cache_types import CACHE_SPECS
from layer_cache.keys import bucket_name
from layer_cache_server.auth import Role, TokenFiles, request_decision
from migrations_mode.tables import build_table, render_table

VARIANTS = ("open", "open, token sent", "tokens", "tokens over HTTPS")
TOKEN_COUNTS = (1, 2, 10)
CHECK_CALLS = 20_000


# --------------------------------------------------------------------------------------------
# The check alone


@dataclass(frozen=True)
class CheckCost:
    """µs per call of the per-request check with ``tokens_per_role`` tokens in each role."""

    tokens_per_role: int
    read_token_us: float
    bad_token_us: float


def _token(label: str, index: int) -> str:
    return f"{label}-{index:02d}-{uuid.uuid4().hex}"


def _write_tokens(directory: Path, count: int) -> tuple[dict[Role, Path], dict[Role, str]]:
    """Token files of ``count`` tokens per role; one token of each role to present."""
    files, presented = {}, {}
    for role in Role:
        tokens = [_token(role.value, index) for index in range(count)]
        path = directory / f"{role.value}-{count}.tokens"
        path.write_text("\n".join(tokens) + "\n")
        files[role], presented[role] = path, tokens[-1]
    return files, presented


def _check(access: TokenFiles, method: str, path: str, authorization: str) -> bool:
    """What the server runs per request before its handler (``LayerCacheServer._authorize``)."""
    return request_decision(access, method, path, authorization).allowed


def _us_per_call(call: Callable[[], bool], calls: int) -> float:
    """The median of 5 timings of ``calls`` calls, in µs per call."""
    timings = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(calls):
            call()
        timings.append((time.perf_counter_ns() - started) / calls / 1000)
    return round(statistics.median(timings), 2)


def measure_checks(directory: Path, calls: int) -> list[CheckCost]:
    costs = []
    path = "/v1/cas/" + "0" * 32
    for count in TOKEN_COUNTS:
        files, presented = _write_tokens(directory, count)
        access = TokenFiles(files)
        read = partial(_check, access, "GET", path, f"Bearer {presented[Role.READ]}")
        bad = partial(_check, access, "GET", path, "Bearer " + "x" * 40)
        if not read() or bad():
            raise SystemExit(f"the check answered wrongly with {count} tokens per role")
        costs.append(CheckCost(count, _us_per_call(read, calls), _us_per_call(bad, calls)))
    return costs


# --------------------------------------------------------------------------------------------
# End to end


@dataclass
class VariantResult:
    """One variant's requests of every round, per operation."""

    variant: str
    latencies: dict[str, list[float]]
    seconds: dict[str, float]
    errors: int = 0
    first_error: str | None = None

    def row(self, operation: str) -> dict[str, Any]:
        latencies = sorted(self.latencies[operation])
        seconds = self.seconds[operation]
        return {
            "variant": self.variant,
            "operation": operation,
            "requests": len(latencies),
            "requests_per_s": round(len(latencies) / seconds, 1) if seconds else 0.0,
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        }


@dataclass(frozen=True)
class Client:
    """How the bench reaches one variant's server."""

    headers: dict[Role, dict[str, str]]
    ssl_context: ssl.SSLContext | bool


async def _timed_phase(
    jobs: Sequence[Callable[[], Awaitable[str | None]]],
    concurrency: int,
    result: VariantResult,
    operation: str,
) -> None:
    pending = iter(jobs)
    started = time.perf_counter()

    async def worker() -> None:
        for job in pending:
            sent = time.perf_counter()
            error = await job()
            result.latencies[operation].append(time.perf_counter() - sent)
            if error is not None:
                result.errors += 1
                result.first_error = result.first_error or error

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    result.seconds[operation] += time.perf_counter() - started


async def load(
    base_url: str, client: Client, args: argparse.Namespace, result: VariantResult
) -> None:
    """A PUT phase of new values, then a GET phase of them in random order."""
    rng = random.Random(args.seed)
    values = {uuid.uuid4().hex: rng.randbytes(args.value_bytes) for _ in range(args.requests)}
    connector = aiohttp.TCPConnector(limit=args.concurrency, ssl=client.ssl_context)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def put(key: str) -> str | None:
            url, headers = f"{base_url}/v1/cas/{key}", client.headers[Role.WRITE]
            async with session.put(url, data=values[key], headers=headers) as response:
                await response.read()
                return None if response.status == 201 else f"PUT {response.status}"

        async def get(key: str) -> str | None:
            url, headers = f"{base_url}/v1/cas/{key}", client.headers[Role.READ]
            async with session.get(url, headers=headers) as response:
                body = await response.read()
                ok = response.status == 200 and body == values[key]
                return None if ok else f"GET {response.status}"

        keys = list(values)
        await _timed_phase([partial(put, key) for key in keys], args.concurrency, result, "PUT")
        reads = [rng.choice(keys) for _ in keys]
        await _timed_phase([partial(get, key) for key in reads], args.concurrency, result, "GET")


def _variant_env(
    variant: str, base: dict[str, str], scratch: Path
) -> tuple[dict[str, str], Client]:
    if variant == "open":
        return base, Client({role: {} for role in Role}, False)
    if variant == "open, token sent":  # the client's cost of the header, the server ignoring it
        header = {"Authorization": f"Bearer {_token('unchecked', 0)}"}
        return base, Client(dict.fromkeys(Role, header), False)
    files, presented = _write_tokens(scratch, 2)
    env = base | {
        "SI_SDF__SERVER__AUTH": "tokens",
        "SI_SDF__SERVER__READ_TOKENS_FILE": str(files[Role.READ]),
        "SI_SDF__SERVER__WRITE_TOKENS_FILE": str(files[Role.WRITE]),
    }
    headers = {role: {"Authorization": f"Bearer {presented[role]}"} for role in Role}
    if variant == "tokens":
        return env, Client(headers, False)
    pki = make_local_pki(scratch / "pki")
    env |= {
        "SI_SDF__SERVER__TLS_CERT_FILE": str(pki.cert_file),
        "SI_SDF__SERVER__TLS_KEY_FILE": str(pki.key_file),
    }
    return env, Client(headers, ssl.create_default_context(cafile=str(pki.ca_file)))


async def measure_end_to_end(
    args: argparse.Namespace, pg: PostgresEndpoint, s3: S3Endpoint, scratch: Path
) -> list[VariantResult]:
    results = {
        variant: VariantResult(variant, {"PUT": [], "GET": []}, {"PUT": 0.0, "GET": 0.0})
        for variant in VARIANTS
    }
    for _ in range(args.rounds):
        for variant in VARIANTS:
            prefix = f"auth{uuid.uuid4().hex[:8]}"
            create_buckets(s3, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()])
            here = scratch / prefix
            here.mkdir()
            base = server_env(pg, s3, prefix, "PostgresOnly", here / "queue")
            env, client = _variant_env(variant, base, here)
            https = variant.endswith("HTTPS")
            async with running_server(env, https=https) as base_url:
                await load(base_url, client, args, results[variant])
    return list(results.values())


# --------------------------------------------------------------------------------------------
# Report


def format_checks(costs: Sequence[CheckCost]) -> str:
    header = ("tokens per role", "read token µs/call", "bad token µs/call")
    rows = [(c.tokens_per_role, c.read_token_us, c.bad_token_us) for c in costs]
    return render_table(build_table(header, rows, left_columns=0))


def end_to_end_rows(results: Sequence[VariantResult]) -> list[dict[str, Any]]:
    """Per variant and operation; p50/p99 over the open server's."""
    rows = [result.row(operation) for operation in ("PUT", "GET") for result in results]
    open_rows = {row["operation"]: row for row in rows if row["variant"] == "open"}
    for row in rows:
        reference = open_rows[row["operation"]]
        for quantile in ("p50", "p99"):
            base = reference[f"{quantile}_ms"]
            row[f"{quantile}_ratio"] = round(row[f"{quantile}_ms"] / base, 2) if base else None
    return rows


def format_end_to_end(rows: Sequence[dict[str, Any]]) -> str:
    header = ("op", "variant", "requests", "req/s", "p50 ms", "p99 ms", "p50 ratio", "p99 ratio")
    table = [
        (
            row["operation"],
            row["variant"],
            row["requests"],
            row["requests_per_s"],
            row["p50_ms"],
            row["p99_ms"],
            row["p50_ratio"],
            row["p99_ratio"],
        )
        for row in rows
    ]
    return render_table(build_table(header, table, left_columns=2))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch_dir = tempfile.TemporaryDirectory(prefix="server-auth-")
    scratch = Path(scratch_dir.name)
    postgres = start_postgres()
    s3_server = None
    try:
        checks = measure_checks(scratch, args.check_calls)
        s3_server = start_s3(kind=args.s3)
        await prepare_database(postgres.endpoint)
        results = await measure_end_to_end(args, postgres.endpoint, s3_server.endpoint, scratch)
        return {
            "benchmark": "server_auth",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "s3_server": s3_server.endpoint.kind,
            "code_fingerprint": code_fingerprint(),
            "note": args.note,
            "settings": {
                key: getattr(args, key)
                for key in ("requests", "concurrency", "value_bytes", "rounds", "smoke")
            },
            "checks": [asdict(cost) for cost in checks],
            "end_to_end": end_to_end_rows(results),
            "errors": sum(result.errors for result in results),
            "first_error": next((r.first_error for r in results if r.first_error), None),
        }
    finally:
        if s3_server is not None:
            s3_server.stop()
        postgres.stop()
        scratch_dir.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.server_auth", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--value-bytes", type=int, default=4096, help="size of each value")
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes")
    parser.add_argument("--check-calls", type=int, default=CHECK_CALLS, help="per timing")
    parser.add_argument("--s3", choices=("moto", "minio", "s3rver", "seaweedfs"), default=None)
    parser.add_argument("--seed", type=int, default=5156)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--note", default="", help="free text kept in the JSON (e.g. the commit)")
    parser.add_argument("--smoke", action="store_true", help="CI size: 100 requests, 1 round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.rounds, args.check_calls = 100, 8, 1, 1000
    if min(args.requests, args.concurrency, args.rounds, args.check_calls) < 1:
        parser.error("--requests, --concurrency, --rounds and --check-calls must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = timed_report(run, args)
    print(f"access control, the check alone ({args.check_calls} calls, median of 5)")
    print(format_checks([CheckCost(**cost) for cost in report["checks"]]))
    print(
        f"end to end: PostgresOnly, S3 server {report['s3_server']}, {args.concurrency} in "
        f"flight, {args.value_bytes}-byte values, {args.rounds} rounds of {args.requests} "
        "requests per phase"
    )
    print(format_end_to_end(report["end_to_end"]))
    if report["first_error"] is not None:
        print(f"{report['errors']} errors; the first: {report['first_error']}")
    save_report(report, args.results_dir, "server-auth")


if __name__ == "__main__":
    main()
