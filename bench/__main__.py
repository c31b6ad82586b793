"""``python -m bench``: the backfill's performance benchmark against local servers.

It starts a throwaway PostgreSQL and S3 server, seeds ``cas`` with the devenv sample rows, runs
each scenario of ``bench.scenarios`` in its own subprocess against its own bucket, one at a time
(then a concurrency sweep, scaling checks, the S3-latency section, ``bench.latency``, and the
rate-limit section, ``bench.rate_limit``, unless ``--smoke``), prints one table plus the issue's
targets (measured, never asserted) and writes JSON to the results directory. The exit status is
0 whenever every scenario ran; the servers are stopped on the way out. Flags, timings and what
each column means: ``docs/bench.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import pstats
import secrets
import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
from aiobotocore.config import AioConfig

from bench.common import (
    CUTOFF,
    TABLE,
    code_fingerprint,
    comma_ints,
    obstore_available,
)
from bench.data import BENCH_SIZES, SeededDatabase, seed_and_report, uniform_sizes
from bench.latency import (
    add_latency_flags,
    check_latency_flags,
    latency_report,
    run_latency_section,
)
from bench.machine import machine_info, pg_version, s3_server_pid
from bench.rate_limit import add_rate_limit_flags, rate_limit_report, run_rate_limit_section
from bench.report import (
    check_targets,
    cpu_per_object_table,
    cpu_table,
    main_table,
    sweep_table,
    targets_table,
)
from bench.runner import Runner, logs_dir
from bench.scale import add_scale_flags, run_scale_section, scale_report
from devenv.postgres import PostgresEndpoint, PostgresServer, start_postgres
from devenv.s3 import S3Endpoint, start_s3
from layer_cache.keys import bucket_name

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"
# bare_put and backfill back to back: on a shared machine, load drifts over minutes.
MAIN_SCENARIOS = ("bare_put", "backfill", "backfill_rerun", "upstream", "upstream_rerun", "shards")
SWEEP_SCENARIOS = ("bare_put", "backfill")
# Client CPU per object of the same PUTs through obstore (Rust): a reference, when installed.
REFERENCE_SCENARIOS = ("obstore_put",)


def main_scenarios(args: argparse.Namespace) -> tuple[str, ...]:
    """The main scenarios, with the obstore reference after ``backfill`` when it is installed
    (not in a smoke run)."""
    if args.smoke or not obstore_available():
        return MAIN_SCENARIOS
    at = MAIN_SCENARIOS.index("backfill") + 1
    return (*MAIN_SCENARIOS[:at], *REFERENCE_SCENARIOS, *MAIN_SCENARIOS[at:])


WARMUP_OBJECTS = 1500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the layer-cache backfill against local Postgres and S3.",
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--key-batch-size", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--sweep", default="5,20,64")
    parser.add_argument("--sweep-baseline", action="store_true")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--sample-in-flight", action="store_true")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--s3", default="seaweedfs", choices=("s3rver", "moto", "seaweedfs", "minio")
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--value-size", type=int, default=None)
    parser.add_argument("--no-latency", action="store_true", help="skip the latency section")
    add_latency_flags(parser)
    add_rate_limit_flags(parser)
    add_scale_flags(parser)
    args = parser.parse_args(argv)
    check_latency_flags(parser, args)
    if args.smoke:
        args.rows = 250
        args.key_batch_size = 100
        args.concurrency = 8
        args.no_scaling = True
        args.no_sweep = True
        args.no_latency = True
        args.no_rate_limit = True
    return args


# --------------------------------------------------------------------------------------------
# the code measured and the servers (the machine's facts: bench.machine)


def code_state() -> dict[str, Any]:
    """The commit measured, and which tracked files differed from it (others edit too)."""

    def git(*arguments: str) -> str:
        result = subprocess.run(
            ["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line[:2] != "??"]
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": changed,
        "fingerprint_at_start": code_fingerprint(),
    }


async def _try_load_statements(pg: PostgresEndpoint) -> bool:
    """Ask for pg_stat_statements at the next start; False if the machine lacks it."""
    connection = await asyncpg.connect(pg.dsn(dbname="postgres", superuser=True))
    try:
        available = await connection.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
        )
        if not available:
            return False
        await connection.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    finally:
        await connection.close()
    return True


async def _create_statements_extension(pg: PostgresEndpoint) -> bool:
    connection = await asyncpg.connect(pg.dsn(dbname="postgres", superuser=True))
    try:
        await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await connection.execute("SELECT pg_stat_statements_reset()")
    except asyncpg.PostgresError as exc:
        print(f"  pg_stat_statements unavailable: {exc}", flush=True)
        return False
    finally:
        await connection.close()
    return True


def enable_statements(server: PostgresServer) -> bool:
    """Load pg_stat_statements (restarting the cluster once); False when it cannot be had."""
    pg = server.endpoint
    if not asyncio.run(_try_load_statements(pg)):
        return False
    server.restart()
    return asyncio.run(_create_statements_extension(pg))


async def _warm_up(s3: S3Endpoint, bucket: str, concurrency: int, objects: int) -> None:
    """A few hundred PUTs so the S3 server's JIT and file system are warm before timing."""
    session = aioboto3.Session()
    async with session.client(
        "s3",
        **s3.client_options(),
        config=AioConfig(s3={"addressing_style": "path"}, max_pool_connections=concurrency),
    ) as client:
        slots = asyncio.Semaphore(concurrency)
        body = secrets.token_bytes(8 * 1024)

        async def put(index: int) -> None:
            async with slots:
                await client.put_object(Bucket=bucket, Key=f"warm/{index:06d}", Body=body)

        await asyncio.gather(*(put(index) for index in range(objects)))


# --------------------------------------------------------------------------------------------
# running scenarios (each in a process of its own: bench.runner)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rows/s (the lower middle one of an even count)."""
    ordered = sorted(runs, key=lambda run: float(run["rows_per_s"]))
    return ordered[(len(ordered) - 1) // 2]


def _profile_backfill(
    runner: Runner, database: SeededDatabase, concurrency: int, results_dir: Path, stamp: str
) -> str:
    """Run ``backfill`` under cProfile; the top of its profile as text."""
    profile_path = results_dir / f"{stamp}-backfill.prof"
    target = runner.target(database, runner.new_prefix("profile"))
    runner.run(
        "backfill",
        target,
        concurrency=concurrency,
        rows=database.rows,
        extra_args=("--profile", str(profile_path)),
        label=f"backfill-c{concurrency}-profiled",
    )
    text = io.StringIO()
    stats = pstats.Stats(str(profile_path), stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    return text.getvalue()


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers, seed, run every scenario; the results document."""
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    sizes = BENCH_SIZES if args.value_size is None else uniform_sizes(args.value_size)
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "started_at": stamp,
        "config": {},
        "load_average": {"start": os.getloadavg()[0]},
        "code": code_state(),
    }
    print("starting PostgreSQL and S3 ...", flush=True)
    with (
        start_postgres() as pg_server,
        start_s3(kind=args.s3) as s3_server,
        logs_dir() as logs,
    ):
        pg, s3 = pg_server.endpoint, s3_server.endpoint
        statements = enable_statements(pg_server)
        machine = machine_info(s3, asyncio.run(pg_version(pg)))
        document["machine"] = machine
        document["config"] = {
            "rows": args.rows,
            "concurrency": args.concurrency,
            "key_batch_size": args.key_batch_size,
            "shards": args.shards,
            "smoke": args.smoke,
            "cutoff": CUTOFF.isoformat(),
            "sizes": {
                "small": sizes.small,
                "large": sizes.large,
                "large_share": sizes.large_share,
            },
            "pg_round_trips_measured_by": "pg_stat_database xact_commit + xact_rollback delta",
            "pg_stat_statements": statements,
        }
        print(_machine_lines(machine, statements), flush=True)
        main_db = seed_and_report(pg, f"bench_{args.rows}", args.rows, cutoff=CUTOFF, sizes=sizes)
        databases = {"main": main_db}
        runner = Runner(args, pg, s3, statements=statements, logs_dir=logs)
        runner.pg_pid = pg_server.pid
        runner.s3_pid = s3_server_pid(s3)
        warm_bucket = runner.new_prefix("warmup")
        warm_up_objects = 50 if args.smoke else WARMUP_OBJECTS
        asyncio.run(
            _warm_up(s3, bucket_name(TABLE, warm_bucket), args.concurrency, warm_up_objects)
        )

        print(
            f"scenarios at C={args.concurrency} on {main_db.rows:,} rows"
            + (f", {args.repeat} times (median by rows/s):" if args.repeat > 1 else ":"),
            flush=True,
        )
        sampling: tuple[str, ...] = ("--sample-in-flight",) if args.sample_in_flight else ()
        scenario_flags = {"backfill": sampling}
        concurrency = args.concurrency
        names = main_scenarios(args)
        repeats: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for repetition in range(1, args.repeat + 1):
            suffix = f"-r{repetition}" if args.repeat > 1 else ""
            prefixes = {
                "bare_put": runner.new_prefix(f"bare{suffix}"),
                "upstream": runner.new_prefix(f"upstream{suffix}"),
                "backfill": runner.new_prefix(f"backfill{suffix}"),
                "shards": runner.new_prefix(f"shards{suffix}"),
            }
            if "obstore_put" in names:
                prefixes["obstore_put"] = runner.new_prefix(f"obstore{suffix}")
            prefixes["upstream_rerun"] = prefixes["upstream"]
            prefixes["backfill_rerun"] = prefixes["backfill"]
            for name in names:
                if name == "shards" and repetition > 1:
                    continue
                repeats[name].append(
                    runner.run(
                        name,
                        runner.target(main_db, prefixes[name]),
                        concurrency=concurrency,
                        rows=main_db.rows,
                        label=f"{name}-c{concurrency}-{main_db.dbname}{suffix}",
                        extra_args=scenario_flags.get(name, ()),
                    )
                )
        main = {name: _median_run(runs) for name, runs in repeats.items()}
        if args.repeat > 1:
            document["repeats"] = repeats
        document["scenarios"] = main

        sweep: dict[int, dict[str, dict[str, Any]]] = {}
        if not args.no_sweep:
            levels = comma_ints(args.sweep)
            print(f"concurrency sweep {levels}:", flush=True)
            for level in levels:
                sweep[level] = {}
                names = (*SWEEP_SCENARIOS, "upstream") if args.sweep_baseline else SWEEP_SCENARIOS
                for name in names:
                    if level == concurrency:
                        sweep[level][name] = main[name]
                        continue
                    target = runner.target(main_db, runner.new_prefix(f"{name}-c{level}"))
                    sweep[level][name] = runner.run(
                        name,
                        target,
                        concurrency=level,
                        rows=main_db.rows,
                        extra_args=scenario_flags.get(name, ()),
                    )
            document["sweep"] = {str(level): results for level, results in sweep.items()}

        if not args.no_latency:
            document["latency"] = run_latency_section(runner, pg, args)

        if not args.no_rate_limit:
            document["rate_limit"] = run_rate_limit_section(runner, pg, args)

        scaling: dict[str, Any] | None = None
        if not args.no_scaling:
            scaling = document["scaling"] = run_scale_section(runner, pg, args)

        if args.profile:
            print("profiling backfill:", flush=True)
            document["profile_top"] = _profile_backfill(
                runner, main_db, concurrency, results_dir, stamp
            )
        if args.keep_logs:
            kept = results_dir / f"{stamp}-logs"
            shutil.copytree(logs, kept)
            document["logs"] = str(kept)
        document["databases"] = {name: db.as_json() for name, db in databases.items()}
        document["code"]["fingerprints"] = runner.fingerprints

    checks = check_targets(
        main,
        scaling=scaling,
        latency=document.get("latency"),
        rate_limit=document.get("rate_limit"),
    )
    document["targets"] = [check.as_json() for check in checks]
    document["wall_seconds"] = round(time.monotonic() - started, 1)
    document["load_average"]["end"] = os.getloadavg()[0]
    _print_report(document, main, sweep, scaling)
    text = json.dumps(document, indent=2, default=str)
    (results_dir / f"{stamp}.json").write_text(text)
    (results_dir / "latest.json").write_text(text)
    print(f"\nwrote {results_dir / (stamp + '.json')} and {results_dir / 'latest.json'}")
    return document


def _machine_lines(machine: dict[str, Any], statements: bool) -> str:
    libraries = ", ".join(f"{name} {version}" for name, version in machine["libraries"].items())
    return "\n".join(
        [
            f"machine: {machine['nproc']} CPUs ({machine['cpu_model']}),"
            f" {machine['memory_gib']} GiB, {machine['os']}, Python {machine['python']}",
            f"servers: {machine['postgres']}"
            f" (pg_stat_statements {'on' if statements else 'off'}), S3: {machine['s3_server']},"
            " all on 127.0.0.1 sharing these CPUs with the client",
            f"client:  {libraries}",
        ]
    )


def _print_report(
    document: dict[str, Any],
    main: dict[str, dict[str, Any]],
    sweep: dict[int, dict[str, dict[str, Any]]],
    scaling: dict[str, Any] | None,
) -> None:
    config = document["config"]
    print()
    print(_machine_lines(document["machine"], config["pg_stat_statements"]))
    main_db = document["databases"]["main"]
    print(
        f"data: {main_db['rows']:,} rows in cas, {main_db['rows_below_cutoff']:,} below the cutoff"
        f" ({main_db['bytes_below_cutoff'] / 2**20:,.0f} MiB; values 1-16 KiB, 1% 100 KiB-5 MiB;"
        f" {main_db['largest_tie']:,} rows share one created_at); key batch"
        f" {config['key_batch_size']}"
    )
    code = document["code"]
    modified = code["modified"]
    print(
        f"code: commit {code['commit']}"
        + (f" with uncommitted changes to {', '.join(modified)}" if modified else "")
        + f" (product source digest {code['fingerprint_at_start']} at start)"
    )
    by_code: dict[str, list[str]] = {}
    for label, fingerprint in code.get("fingerprints", {}).items():
        by_code.setdefault(fingerprint, []).append(label)
    if len(by_code) > 1:
        print("WARNING: the product source changed during the run; scenarios ran different code:")
        for fingerprint, labels in by_code.items():
            print(f"  {fingerprint}: {', '.join(labels)}")
    print()
    print(main_table(main))
    baseline = main.get("upstream")
    if baseline and baseline["rows_missed"]:
        print(
            f"(the baseline never listed {baseline['rows_missed']:,} of"
            f" {baseline['rows_below_cutoff']:,} rows: the tied created_at at a batch boundary"
            " with a strict '<' cursor; its rates count the rows it handled)"
        )
    print(
        "PG RT = round trips (transactions in pg_stat_database; asyncpg's pool adds one reset"
        " round trip per query); CPU = client process only, per object uploaded (per row"
        " checked on re-runs); x bare / x baseline = rows/s ratios."
    )
    print()
    print("client CPU per object uploaded (getrusage of each scenario's process, timed section):")
    print(cpu_per_object_table(main))
    print()
    print(
        "where the CPU went during each timed section (2 CPUs = 2 CPU-seconds per second;"
        " 'other procs' is load from outside the benchmark):"
    )
    print(cpu_table(main))
    if sweep:
        print()
        print("concurrency sweep (empty bucket each time):")
        print(sweep_table(sweep))
    sampled = [
        (level, results["backfill"])
        for level, results in sorted(sweep.items())
        if "in_flight_mean" in results.get("backfill", {})
    ] or [(main["backfill"]["concurrency"], main["backfill"])]
    if "in_flight_mean" in sampled[0][1]:
        print()
        print("backfill upload slots in use (its uploads_in_flight gauge, sampled every 20 ms):")
        for level, result in sampled:
            print(
                f"  C={level}: mean {result['in_flight_mean']:.1f} in flight"
                f" ({100 * result['in_flight_mean_share_of_c']:.0f}% of C); fewer than C/2 in"
                f" {100 * result['in_flight_below_half_share']:.0f}% of"
                f" {result['in_flight_samples']} samples"
            )
    shards = main.get("shards")
    single = main.get("backfill")
    if shards and single:
        print(
            f"shards: {shards['shards']} processes x C={shards['concurrency']}"
            f" ({shards['total_in_flight']} in flight) {shards['rows_per_s']:,.0f} rows/s vs 1"
            f" process at C={single['concurrency']} {single['rows_per_s']:,.0f} rows/s"
            f" (x{shards['rows_per_s'] / single['rows_per_s']:.2f})"
        )
    if "latency" in document:
        print()
        print(latency_report(document["latency"]))
    if "rate_limit" in document:
        print()
        print(rate_limit_report(document["rate_limit"]))
    if scaling:
        print()
        print(scale_report(scaling))
    print()
    print("issue targets (measured, not asserted):")
    print(
        targets_table(
            check_targets(
                main,
                scaling=scaling,
                latency=document.get("latency"),
                rate_limit=document.get("rate_limit"),
            )
        )
    )
    if "profile_top" in document:
        print()
        print(document["profile_top"])
    load = document["load_average"]
    print(
        f"\nwall time {document['wall_seconds']:.0f} s; 1-minute load average"
        f" {load['start']:.1f} at start, {load['end']:.1f} at end"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bench``."""
    run_all(parse_args(argv))


if __name__ == "__main__":
    main()
