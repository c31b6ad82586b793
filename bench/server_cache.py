"""The layer cache server's cache tier under load: hot reads, Zipf hit ratios, memory held.

``python -m bench.server_cache`` starts PostgreSQL and an S3 server and runs the real server
(``python -m services``) as a subprocess per scenario, driving it over loopback:

* **hot set**: ``--hot-keys`` values written, then read at random with ``--concurrency`` in
  flight for ``--phase-secs``: PostgresOnly and S3Only with the tier off (every read reaches the
  backend), with the memory tier, and with values only on the disk tier (memory too small).
* **Zipf hit ratio**: ``--zipf-keys`` values of log-normal sizes written to Postgres, then read
  with Zipf(``--alpha``) popularity through a memory tier of 1 %, 5 % and 20 % of their bytes;
  the hit ratio is the server's own count (``layer_cache_backend_resolved`` hits over
  ``layer_cache_requests_total``, scraped from its Prometheus endpoint) over the second half of
  the reads.
* **memory soak**: a PostgresOnly server with a ``--soak-memory`` memory tier and a disk tier
  under a mixed load (80 % Zipf reads over four times the tier's bytes, 20 % new writes) for
  ``--soak-secs``; its RSS (``/proc/<pid>/status``) is sampled every second against the budget:
  the RSS before the load plus the memory tier.

A benchmark, not a test: nothing is asserted beyond every request having an answer (a read of a
written key must return its bytes). Output: a table per scenario and a JSON file in
``bench/results/``. Details: ``docs/bench.md``; figures: ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import re
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench.cache_policy import zipf_cumulative
from bench.common import code_fingerprint
from bench.server_load import (
    DEFAULT_RESULTS_DIR,
    describe,
    prepare_database,
    run_phase,
    running_server,
    save_report,
    server_env,
    timed_report,
)
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.process import free_port
from devenv.s3 import S3Endpoint, create_buckets, start_s3
from layer_cache.cache_types import CACHE_SPECS
from layer_cache.disk_tier import INDEX_ENTRY_BYTES
from layer_cache.keys import bucket_name
from migrations_mode.tables import build_table, render_table

MIB = 1024 * 1024
SERVER = "SI_SDF__SERVER__"
CACHE = "SI_SDF__LAYER_DB_CONFIG__CACHE_CONFIG__"
SIZE_SHARES = (0.01, 0.05, 0.20)
RESOLVED = "layer_cache_backend_resolved_total"
REQUESTS = "layer_cache_requests_total"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class HotRow:
    """Hot-set reads against one mode and tier, and where the server found them."""

    mode: str
    tier: str
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    memory_hits: int
    disk_hits: int
    tier_misses: int
    first_error: str | None = None


@dataclass(frozen=True)
class HitRatioRow:
    """The Zipf mix through one memory tier size."""

    size_share: float
    tier_bytes: int
    hit_ratio: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass
class SoakResult:
    """RSS of the server under the mixed load."""

    seconds: float
    memory_tier_bytes: int
    disk_tier_bytes: int
    rss_before_load_bytes: int
    rss_without_tier_bytes: int
    budget_bytes: int
    rss_peak_bytes: int
    rss_end_bytes: int
    within_budget: bool
    requests: int
    errors: int
    tier_bytes_end: int | None
    samples: list[tuple[float, int]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Helpers


def tier_env(memory: int, disk: int = 0, disk_dir: Path | None = None) -> dict[str, str]:
    """The cache tier settings of one scenario (0 turns a tier off)."""
    env = {
        SERVER + "CACHE_MEMORY_BYTES": str(memory),
        SERVER + "CACHE_DISK_BYTES": str(disk),
        CACHE + "DISK_LAYER": "true" if disk else "false",
    }
    if disk_dir is not None:
        env[CACHE + "DISK_PATH"] = str(disk_dir)
    return env


def rss_bytes(pid: int) -> int:
    """The process's resident set (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition: (name, labels, value) per sample."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((match["name"], labels, float(match["value"])))
    return samples


async def scrape(
    session: aiohttp.ClientSession, port: int
) -> list[tuple[str, dict[str, str], float]]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        return parse_metrics(await response.text())


def tier_counts(samples: Sequence[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """Lookups the tier counted: ``memory`` and ``disk`` hits, and ``miss`` (the keys asked for
    that it did not have: upstream counts no tier miss in ``…_backend_resolved``)."""
    counts = {"memory": 0.0, "disk": 0.0}
    requests = 0.0
    for name, labels, value in samples:
        if name == RESOLVED and labels.get("backend") == "foyer":
            tier = labels.get("tier", "")
            counts[tier] = counts.get(tier, 0.0) + value
        elif name == REQUESTS:
            requests += value
    return counts | {"miss": requests - counts["memory"] - counts["disk"]}


def gauge(samples: Sequence[tuple[str, dict[str, str], float]], name: str, tier: str) -> int | None:
    for sample_name, labels, value in samples:
        if sample_name == name and labels.get("tier") == tier:
            return int(value)
    return None


def lognormal_sizes(rng: random.Random, count: int, median: int) -> list[int]:
    return [
        max(64, min(4 * MIB, int(rng.lognormvariate(math.log(median), 1.0)))) for _ in range(count)
    ]


class Client:
    """PUTs and GETs of ``workspace_snapshot`` values against one server."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url

    async def put(self, key: str, value: bytes) -> str | None:
        async with self.session.put(
            f"{self.base_url}/v1/workspace_snapshot/{key}", data=value
        ) as r:
            body = await r.read()
            return None if r.status in (200, 201) else describe(r.status, body)

    async def get(self, key: str, value: bytes) -> str | None:
        async with self.session.get(f"{self.base_url}/v1/workspace_snapshot/{key}") as r:
            body = await r.read()
            if r.status == 200 and body == value:
                return None
            return describe(r.status, body if r.status != 200 else b"")


async def write_all(client: Client, values: dict[str, bytes], concurrency: int) -> None:
    """Write every value (no time cap); raise on the first failure."""
    result = await run_phase(
        "setup",
        "PUT",
        [partial(client.put, key, value) for key, value in values.items()],
        concurrency=concurrency,
        phase_secs=3600,
    )
    if result.errors:
        raise RuntimeError(f"seeding failed: {result.first_error}")


# --------------------------------------------------------------------------------------------
# Scenarios


async def hot_set(
    args: argparse.Namespace, pg: PostgresEndpoint, s3: S3Endpoint, scratch: Path
) -> list[HotRow]:
    """Hot-set GETs per mode and tier."""
    rng = random.Random(args.seed)
    values = {uuid.uuid4().hex: rng.randbytes(args.value_bytes) for _ in range(args.hot_keys)}
    # The disk row's memory tier: its index fits (half the budget), its values mostly do not.
    small_memory = 2 * args.hot_keys * INDEX_ENTRY_BYTES + 64 * 1024
    scenarios = [
        ("PostgresOnly", "off", 0, 0),
        ("S3Only", "off", 0, 0),
        ("PostgresOnly", "memory", 64 * MIB, 0),
        ("S3Only", "memory", 64 * MIB, 0),
        ("PostgresOnly", "disk", small_memory, 256 * MIB),
        ("S3Only", "disk", small_memory, 256 * MIB),
    ]
    if args.smoke:  # one of each tier, both modes
        scenarios = [scenarios[0], scenarios[3], scenarios[4]]
    rows: list[HotRow] = []
    for mode, tier, memory, disk in scenarios:
        prefix = fresh_prefix(s3)
        queue_dir = scratch / prefix
        metrics_port = free_port()
        env = (
            server_env(pg, s3, prefix, mode, queue_dir)
            | tier_env(memory, disk, queue_dir / "cache")
            | {"SI_SDF__METRICS_PORT": str(metrics_port), "OTEL_METRICS_EXPORTER": "none"}
        )
        async with (
            running_server(env) as url,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency),
                timeout=aiohttp.ClientTimeout(total=60),
            ) as session,
        ):
            client = Client(session, url)
            await write_all(client, values, args.concurrency)
            keys = list(values)
            warm = [partial(client.get, key, values[key]) for key in keys]
            await run_phase(mode, "GET", warm, concurrency=args.concurrency, phase_secs=60)
            if disk:
                await asyncio.sleep(1.0)  # the disk tier writes in the background
            before = tier_counts(await scrape(session, metrics_port))
            reads = [rng.choice(keys) for _ in range(args.requests)]
            result = await run_phase(
                mode,
                "GET",
                [partial(client.get, key, values[key]) for key in reads],
                concurrency=args.concurrency,
                phase_secs=args.phase_secs,
            )
            after = tier_counts(await scrape(session, metrics_port))
        rows.append(
            HotRow(
                mode=mode,
                tier=tier,
                requests=result.requests,
                errors=result.errors,
                requests_per_s=result.requests_per_s,
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
                memory_hits=int(after["memory"] - before["memory"]),
                disk_hits=int(after["disk"] - before["disk"]),
                tier_misses=int(after["miss"] - before["miss"]),
                first_error=result.first_error,
            )
        )
    return rows


def fresh_prefix(s3: S3Endpoint) -> str:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    create_buckets(s3, [bucket_name(spec.table, prefix) for spec in CACHE_SPECS.values()])
    return prefix


async def zipf_hit_ratios(
    args: argparse.Namespace, pg: PostgresEndpoint, s3: S3Endpoint, scratch: Path
) -> list[HitRatioRow]:
    """The Zipf mix through memory tiers of three sizes (the server counts the hits)."""
    rng = random.Random(args.seed + 1)
    sizes = lognormal_sizes(rng, args.zipf_keys, args.value_bytes)
    values = {uuid.uuid4().hex: rng.randbytes(size) for size in sizes}
    total = sum(sizes)
    keys = list(values)
    rng.shuffle(keys)
    cumulative = zipf_cumulative(len(keys), args.alpha)
    prefix = fresh_prefix(s3)
    rows: list[HitRatioRow] = []
    for share in SIZE_SHARES:
        tier_bytes = int(total * share)
        metrics_port = free_port()
        env = server_env(pg, s3, prefix, "PostgresOnly", scratch / f"{prefix}-{share}") | {
            "SI_SDF__METRICS_PORT": str(metrics_port),
            "OTEL_METRICS_EXPORTER": "none",
        }
        async with (
            running_server(env | tier_env(tier_bytes)) as url,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency),
                timeout=aiohttp.ClientTimeout(total=60),
            ) as session,
        ):
            client = Client(session, url)
            if share == SIZE_SHARES[0]:  # written once, through a tier too small to matter
                await write_all(client, values, args.concurrency)
            reads = rng.choices(keys, cum_weights=cumulative, k=args.zipf_requests)
            half = len(reads) // 2
            first = [partial(client.get, key, values[key]) for key in reads[:half]]
            await run_phase(
                "PostgresOnly", "GET", first, concurrency=args.concurrency, phase_secs=600
            )
            before = tier_counts(await scrape(session, metrics_port))
            second = [partial(client.get, key, values[key]) for key in reads[half:]]
            result = await run_phase(
                "PostgresOnly", "GET", second, concurrency=args.concurrency, phase_secs=600
            )
            after = tier_counts(await scrape(session, metrics_port))
        hits = sum(after[tier] - before[tier] for tier in ("memory", "disk"))
        lookups = hits + after["miss"] - before["miss"]
        rows.append(
            HitRatioRow(
                size_share=share,
                tier_bytes=tier_bytes,
                hit_ratio=round(hits / lookups, 4) if lookups else 0.0,
                requests_per_s=result.requests_per_s,
                p50_ms=result.p50_ms,
                p99_ms=result.p99_ms,
            )
        )
    return rows


@dataclass
class _Load:
    rss_before: int
    samples: list[tuple[float, int]]
    requests: int
    errors: int
    tier_bytes_end: int | None


async def _mixed_load(
    args: argparse.Namespace,
    env: dict[str, str],
    values: dict[str, bytes],
    seconds: float,
    metrics_port: int,
) -> _Load:
    """Write ``values`` through a server, then read them (Zipf, 80 %) and write new ones (20 %,
    never read back) for ``seconds``, sampling the server's RSS every second."""
    keys = list(values)
    cumulative = zipf_cumulative(len(keys), args.alpha)
    pids: list[int] = []
    async with (
        running_server(env, on_started=pids.append) as url,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as session,
    ):
        pid = pids[0]
        rss_before = rss_bytes(pid)
        client = Client(session, url)
        await write_all(client, values, args.concurrency)
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        deadline = started + seconds
        counts = {"requests": 0, "errors": 0}

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append((round(time.monotonic() - started, 1), rss_bytes(pid)))
                await asyncio.sleep(1.0)

        async def worker(seed: int) -> None:
            local = random.Random(seed)
            while time.monotonic() < deadline:
                if local.random() < 0.2:  # a new value, never read back
                    value = local.randbytes(lognormal_sizes(local, 1, args.value_bytes)[0])
                    error = await client.put(uuid.uuid4().hex, value)
                else:
                    key = local.choices(keys, cum_weights=cumulative)[0]
                    error = await client.get(key, values[key])
                counts["requests"] += 1
                counts["errors"] += error is not None

        async with asyncio.TaskGroup() as group:
            group.create_task(sampler())
            for number in range(args.concurrency):
                group.create_task(worker(args.seed + number))
        final = await scrape(session, metrics_port)
    return _Load(
        rss_before,
        samples,
        counts["requests"],
        counts["errors"],
        gauge(final, "layer_cache_tier_bytes", "memory"),
    )


async def memory_soak(
    args: argparse.Namespace, pg: PostgresEndpoint, s3: S3Endpoint, scratch: Path
) -> SoakResult:
    """RSS under the mixed load with the tier, against the budget: the RSS the same load needs
    with the tier off, plus the memory tier."""
    rng = random.Random(args.seed + 2)
    memory = args.soak_memory_mib * MIB
    disk = 4 * memory
    values: dict[str, bytes] = {}
    while sum(map(len, values.values())) < 3 * memory:  # three times what the tier holds
        for size in lognormal_sizes(rng, 1000, args.value_bytes):
            values[uuid.uuid4().hex] = rng.randbytes(size)
    loads: list[_Load] = []
    for tier_memory, seconds in ((0, args.soak_baseline_secs), (memory, args.soak_secs)):
        prefix = fresh_prefix(s3)
        queue_dir = scratch / f"{prefix}-soak"
        metrics_port = free_port()
        env = (
            server_env(pg, s3, prefix, "PostgresOnly", queue_dir)
            | tier_env(tier_memory, disk if tier_memory else 0, queue_dir / "cache")
            | {"SI_SDF__METRICS_PORT": str(metrics_port), "OTEL_METRICS_EXPORTER": "none"}
        )
        loads.append(await _mixed_load(args, env, values, seconds, metrics_port))
    without, with_tier = loads
    working = max((rss for _, rss in without.samples), default=without.rss_before)
    peak = max((rss for _, rss in with_tier.samples), default=with_tier.rss_before)
    budget = working + memory
    return SoakResult(
        seconds=args.soak_secs,
        memory_tier_bytes=memory,
        disk_tier_bytes=disk,
        rss_before_load_bytes=with_tier.rss_before,
        rss_without_tier_bytes=working,
        budget_bytes=budget,
        rss_peak_bytes=peak,
        rss_end_bytes=with_tier.samples[-1][1] if with_tier.samples else with_tier.rss_before,
        within_budget=peak <= budget,
        requests=with_tier.requests,
        errors=with_tier.errors + without.errors,
        tier_bytes_end=with_tier.tier_bytes_end,
        samples=with_tier.samples,
    )


# --------------------------------------------------------------------------------------------
# Running and reporting


SCENARIOS = ("hot", "zipf", "soak")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    postgres = start_postgres()
    s3_server = None
    scratch = tempfile.TemporaryDirectory(prefix="server-cache-")
    try:
        s3_server = start_s3(kind=args.s3)
        pg, s3 = postgres.endpoint, s3_server.endpoint
        await prepare_database(pg)
        root = Path(scratch.name)
        report: dict[str, Any] = {
            "benchmark": "server_cache",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "s3_server": s3.kind,
            "code_fingerprint": code_fingerprint(),
            "note": args.note,
            "settings": {
                key: value for key, value in vars(args).items() if key not in ("results_dir",)
            },
        }
        if "hot" in args.scenarios:
            report["hot_set"] = [asdict(r) for r in await hot_set(args, pg, s3, root)]
        if "zipf" in args.scenarios:
            report["zipf"] = [asdict(r) for r in await zipf_hit_ratios(args, pg, s3, root)]
        if "soak" in args.scenarios:
            report["soak"] = asdict(await memory_soak(args, pg, s3, root))
        return report
    finally:
        if s3_server is not None:
            s3_server.stop()
        postgres.stop()
        scratch.cleanup()


def format_report(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if "hot_set" in report:
        rows = [HotRow(**row) for row in report["hot_set"]]
        lines.append("hot-set reads")
        lines.append(
            render_table(
                build_table(
                    (
                        "mode",
                        "tier",
                        "requests",
                        "errors",
                        "req/s",
                        "p50 ms",
                        "p99 ms",
                        "memory hits",
                        "disk hits",
                        "tier misses",
                    ),
                    [
                        (
                            r.mode,
                            r.tier,
                            r.requests,
                            r.errors,
                            r.requests_per_s,
                            r.p50_ms,
                            r.p99_ms,
                            r.memory_hits,
                            r.disk_hits,
                            r.tier_misses,
                        )
                        for r in rows
                    ],
                    left_columns=2,
                )
            )
        )
    if "zipf" in report:
        lines.append("Zipf reads through the memory tier (PostgresOnly)")
        lines.append(
            render_table(
                build_table(
                    ("tier size", "hit ratio", "req/s", "p50 ms", "p99 ms"),
                    [
                        (
                            f"{row['size_share']:.0%} ({row['tier_bytes'] / MIB:.1f} MiB)",
                            f"{row['hit_ratio']:.3f}",
                            row["requests_per_s"],
                            row["p50_ms"],
                            row["p99_ms"],
                        )
                        for row in report["zipf"]
                    ],
                    left_columns=1,
                )
            )
        )
    if "soak" in report:
        soak = report["soak"]
        lines.append(
            f"memory soak: {soak['seconds']:g} s, {soak['requests']} requests "
            f"({soak['errors']} errors), memory tier {soak['memory_tier_bytes'] / MIB:.0f} MiB: "
            f"RSS {soak['rss_before_load_bytes'] / MIB:.0f} MiB before the load, "
            f"{soak['rss_without_tier_bytes'] / MIB:.0f} MiB at most under it without the tier; "
            f"with it peak "
            f"{soak['rss_peak_bytes'] / MIB:.0f} MiB, end {soak['rss_end_bytes'] / MIB:.0f} MiB, "
            f"budget {soak['budget_bytes'] / MIB:.0f} MiB: "
            + ("within" if soak["within_budget"] else "OVER")
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.server_cache", description=__doc__)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--hot-keys", type=int, default=1000, help="values in the hot set")
    parser.add_argument("--requests", type=int, default=20_000, help="hot-set reads per phase")
    parser.add_argument("--value-bytes", type=int, default=4096, help="(median) value size")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--phase-secs", type=float, default=10.0, help="time cap per phase")
    parser.add_argument("--zipf-keys", type=int, default=5000, help="values read by the mix")
    parser.add_argument("--zipf-requests", type=int, default=20_000, help="reads per tier size")
    parser.add_argument("--alpha", type=float, default=1.0, help="Zipf skew")
    parser.add_argument("--soak-secs", type=float, default=60.0, help="mixed load (600: 10 min)")
    parser.add_argument("--soak-memory-mib", type=int, default=64, help="memory tier of the soak")
    parser.add_argument(
        "--soak-baseline-secs", type=float, default=30.0, help="the same load, tier off"
    )
    parser.add_argument("--s3", choices=("moto", "minio", "s3rver", "seaweedfs"), default=None)
    parser.add_argument("--seed", type=int, default=5156)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--note", default="", help="free text kept in the JSON")
    parser.add_argument(
        "--smoke", action="store_true", help="CI size: every scenario, a few seconds each"
    )
    return parser


SMOKE = {
    "hot_keys": 100,
    "requests": 500,
    "phase_secs": 2.0,
    "zipf_keys": 400,
    "zipf_requests": 1000,
    "soak_secs": 4.0,
    "soak_baseline_secs": 3.0,
    "soak_memory_mib": 2,
    "concurrency": 8,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, with ``--smoke`` applied."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    report = timed_report(run, args)
    print(
        f"layer cache server, cache tier: {report['machine']['cpus']} CPUs, S3 server "
        f"{report['s3_server']}, {args.concurrency} in flight, {args.value_bytes}-byte values"
    )
    print(format_report(report))
    save_report(report, args.results_dir, "server-cache")


if __name__ == "__main__":
    main()
