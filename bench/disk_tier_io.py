"""Read latency of the disk tier's layout against the alternatives, and what a read costs the
event loop.

``python -m bench.disk_tier_io`` stores ``--values`` values of ``--value-bytes`` each and reads
them back at random, ``--concurrency`` reads in flight from one asyncio loop, four ways:

* ``DiskTier`` (this project): one file per value, read and checked (length, CRC-32) on a
  thread pool, one thread hop per read;
* the same files read inline on the event loop (what not offloading would cost);
* ``aiofiles`` (when installed): open, read and close, each its own thread hop;
* ``diskcache`` (when installed; SQLite, values in files above 32 KiB) on as many threads as
  ``DiskTier`` reads on.

For each: reads/s, p50/p99 latency, and the event loop's worst lag (a 1 ms ticker's largest
overshoot) while the reads run: what every other request on the server would wait. The files
are in a temporary directory on this machine's disk (warm in the page cache after writing, as a
hot disk tier is). Pure local I/O, no servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.server_load import percentile
from layer_cache.cache_types import CacheType
from layer_cache.disk_tier import READ_THREADS, DiskTier, decode
from migrations_mode.tables import build_table, render_table

CAS = CacheType.CAS


@dataclass(frozen=True)
class ReadResult:
    """One way of reading."""

    method: str
    reads: int
    reads_per_s: float
    p50_us: float
    p99_us: float
    worst_loop_lag_ms: float


async def measure(
    method: str,
    read: Callable[[str], Awaitable[bytes | None]],
    keys: Sequence[str],
    concurrency: int,
) -> ReadResult:
    """Read every key in ``keys`` with ``concurrency`` in flight; a 1 ms ticker measures lag."""
    latencies: list[float] = []
    pending = iter(keys)
    lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lag = max(lag, time.perf_counter() - before - 0.001)

    async def worker() -> None:
        for key in pending:
            started = time.perf_counter()
            value = await read(key)
            latencies.append(time.perf_counter() - started)
            if value is None:
                raise RuntimeError(f"{method}: {key} not found")

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())
    seconds = time.perf_counter() - started
    done.set()
    await tick
    latencies.sort()
    return ReadResult(
        method=method,
        reads=len(latencies),
        reads_per_s=round(len(latencies) / seconds, 1),
        p50_us=round(percentile(latencies, 0.5) * 1e6, 1),
        p99_us=round(percentile(latencies, 0.99) * 1e6, 1),
        worst_loop_lag_ms=round(lag * 1000, 2),
    )


async def run(args: argparse.Namespace) -> list[ReadResult]:
    rng = random.Random(args.seed)
    values = {f"{number:064x}": rng.randbytes(args.value_bytes) for number in range(args.values)}
    keys = [rng.choice(list(values)) for _ in range(args.reads)]
    results: list[ReadResult] = []
    with tempfile.TemporaryDirectory(prefix="disk-tier-io-", dir=args.dir) as scratch:
        root = Path(scratch)
        disk = DiskTier(root / "tier", 4 * args.values * (args.value_bytes + 8192), policy="s3fifo")
        disk.open()
        await disk.idle()
        for key, value in values.items():
            disk.admit((CAS, key), value, disk.generation)
            await disk.idle()

        async def tier_read(key: str) -> bytes | None:
            return (await disk.read_many([(CAS, key)])).get((CAS, key))

        def path(key: str) -> Path:
            return root / "tier" / "cas" / key[:2] / key

        async def inline_read(key: str) -> bytes | None:
            return decode(path(key).read_bytes())

        results.append(await measure("DiskTier (thread pool)", tier_read, keys, args.concurrency))
        results.append(await measure("files read on the loop", inline_read, keys, args.concurrency))
        try:
            import aiofiles  # type: ignore[import-untyped, import-not-found, unused-ignore]

            async def aiofiles_read(key: str) -> bytes | None:
                async with aiofiles.open(path(key), "rb") as handle:
                    data: bytes = await handle.read()
                return decode(data)

            results.append(await measure("aiofiles", aiofiles_read, keys, args.concurrency))
        except ImportError:
            pass
        try:
            import diskcache  # type: ignore[import-untyped, import-not-found, unused-ignore]

            cache: Any = diskcache.Cache(str(root / "diskcache"), size_limit=1 << 40)
            for key, value in values.items():
                cache.set(key, value)

            pool = ThreadPoolExecutor(READ_THREADS)  # as many threads as DiskTier reads on

            async def diskcache_read(key: str) -> bytes | None:
                loop = asyncio.get_running_loop()
                value: bytes | None = await loop.run_in_executor(pool, cache.get, key)
                return value

            name = f"diskcache ({READ_THREADS} threads)"
            results.append(await measure(name, diskcache_read, keys, args.concurrency))
            pool.shutdown()
            cache.close()
        except ImportError:
            pass
        await disk.close()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.disk_tier_io", description=__doc__)
    parser.add_argument("--values", type=int, default=2000)
    parser.add_argument("--value-bytes", type=int, default=4096)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--dir", default=None, help="where the files go (default: the temp dir)")
    parser.add_argument("--seed", type=int, default=5156)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = asyncio.run(run(args))
    print(
        f"{args.reads} random reads of {args.values} values of {args.value_bytes} bytes, "
        f"{args.concurrency} in flight, {os.cpu_count()} CPUs"
    )
    table = build_table(
        ("method", "reads/s", "p50 µs", "p99 µs", "worst loop lag ms"),
        [(r.method, r.reads_per_s, r.p50_us, r.p99_us, r.worst_loop_lag_ms) for r in results],
        left_columns=1,
    )
    print(render_table(table))


if __name__ == "__main__":
    main()
