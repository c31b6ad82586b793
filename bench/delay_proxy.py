"""``python -m bench.delay_proxy UPSTREAM_URL LOW_S HIGH_S``: S3 behind a delay, own process.

A ``FaultProxy`` with only ``latency_s`` set (nothing fails) on 127.0.0.1, in its own process so
relaying bodies costs the measuring client no CPU. It prints ``{"url": ...}`` once it accepts
requests, serves until SIGTERM/SIGINT or ``--max-secs`` (a crashed benchmark cannot leave it
behind), then stops the proxy and prints ``{"counts": ...}``. aiohttp's "Error handling request"
tracebacks are not printed: a server stopped after its grace period drops S3 requests in flight
(its write queue keeps them), and the counts record every outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Sequence

from devenv.faults import FaultPlan, FaultProxy


async def serve(upstream_url: str, low_s: float, high_s: float, max_secs: float) -> None:
    """Run the proxy until a stop signal or ``max_secs``; report its URL, then its counts."""
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with FaultProxy(upstream_url, FaultPlan(latency_s=(low_s, high_s))) as proxy:
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description=__doc__)
    parser.add_argument("upstream_url")
    parser.add_argument("low_s", type=float, help="least added latency, seconds")
    parser.add_argument("high_s", type=float, help="most added latency, seconds")
    parser.add_argument("--max-secs", type=float, default=600.0, help="stop on its own after")
    args = parser.parse_args(argv)
    try:
        FaultPlan(latency_s=(args.low_s, args.high_s))
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(args.upstream_url, args.low_s, args.high_s, args.max_secs))


if __name__ == "__main__":
    main()
