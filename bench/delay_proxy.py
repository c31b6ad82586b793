"""``python -m bench.delay_proxy UPSTREAM_URL LOW_S HIGH_S``: S3 behind a delay, own process.

A ``FaultProxy`` with only ``latency_s`` set (nothing fails unless ``--max-rate-per-s`` asks
for SlowDown above a rate) on 127.0.0.1, or with ``--relay`` a ``bench.delay_relay.DelayRelay``
(TCP: a network's latency, for under a third of the proxy's CPU; no SlowDown), in its own
process so relaying costs the measuring client's process no CPU. It prints ``{"url": ...}``
once it accepts requests, serves until SIGTERM/SIGINT or ``--max-secs`` (a crashed benchmark
cannot leave it behind), then stops the proxy and prints ``{"counts": ...}``. aiohttp's "Error
handling request" tracebacks are not printed: a server stopped after its grace period drops S3
requests in flight (its write queue keeps them), and the counts record every outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.delay_relay import DelayRelay
from devenv.faults import FaultPlan, FaultProxy
from devenv.s3 import S3Endpoint

REPO_ROOT = Path(__file__).resolve().parent.parent


async def serve(proxy: FaultProxy | DelayRelay, max_secs: float) -> None:
    """Run the proxy until a stop signal or ``max_secs``; report its URL, then its counts."""
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with proxy:
            print(json.dumps({"url": proxy.url}), flush=True)
            try:
                async with asyncio.timeout(max_secs):
                    await stop.wait()
            except TimeoutError:
                pass
        print(json.dumps({"counts": dict(proxy.counts)}), flush=True)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


@dataclass
class DelayedEndpoint:
    """``s3`` behind a running delay proxy; ``counts`` are the proxy's once it stopped."""

    endpoint: S3Endpoint
    counts: dict[str, int] = field(default_factory=dict)


@contextmanager
def delayed_endpoint(
    s3: S3Endpoint,
    low_s: float,
    high_s: float,
    *,
    max_rate_per_s: float | None = None,
    max_secs: float = 1800.0,
    relay: bool = False,
) -> Iterator[DelayedEndpoint]:
    """This proxy (``relay``: the TCP relay) in a child process in front of ``s3`` (for
    synchronous callers); SIGTERM on the way out, then its counts are read back."""
    command = [sys.executable, "-m", "bench.delay_proxy", s3.url, str(low_s), str(high_s)]
    command += ["--max-secs", str(max_secs), *(["--relay"] if relay else [])]
    if max_rate_per_s is not None:
        command += ["--max-rate-per-s", str(max_rate_per_s)]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        first = process.stdout.readline()
        if not first:
            raise RuntimeError("the delay proxy exited before listening")
        delayed = DelayedEndpoint(replace(s3, url=json.loads(first)["url"]))
        yield delayed
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            rest, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            rest, _ = process.communicate()
    for line in rest.splitlines():
        delayed.counts.update(json.loads(line).get("counts", {}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description=__doc__)
    parser.add_argument("upstream_url")
    parser.add_argument("low_s", type=float, help="least added latency, seconds")
    parser.add_argument("high_s", type=float, help="most added latency, seconds")
    parser.add_argument("--max-secs", type=float, default=600.0, help="stop on its own after")
    parser.add_argument(
        "--max-rate-per-s", type=float, default=None, help="answer SlowDown above this rate"
    )
    parser.add_argument(
        "--relay", action="store_true", help="delay at the TCP level (cheaper; no SlowDown)"
    )
    args = parser.parse_args(argv)
    if args.relay and args.max_rate_per_s is not None:
        parser.error("--relay cannot answer SlowDown: drop --max-rate-per-s or --relay")
    proxy: FaultProxy | DelayRelay
    try:
        if args.relay:
            proxy = DelayRelay(args.upstream_url, args.low_s, args.high_s)
        else:
            plan = FaultPlan(
                latency_s=(args.low_s, args.high_s), max_rate_per_s=args.max_rate_per_s
            )
            proxy = FaultProxy(args.upstream_url, plan)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(proxy, args.max_secs))


if __name__ == "__main__":
    main()
