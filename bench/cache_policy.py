"""Hit ratios of the cache tier's eviction policies on a skewed (Zipf) read mix, by simulation.

``python -m bench.cache_policy`` replays one request trace against each policy of
``layer_cache.eviction`` (and, when installed, the libraries tried: ``cachetools`` LRU and
``moka-py``'s LRU and TinyLFU) at three tier sizes, given as shares of the bytes of the keys that
are read. The trace: ``--keys`` keys with log-normal value sizes (median ``--median-bytes``),
read with Zipf(``--alpha``) popularity (rank shuffled against size), and ``--write-share`` of the
requests writing a new key that is never read (a write populates the tier, as the server does:
the one-hit wonders that a policy must not let push hot values out). A read miss fills the tier,
as a read-through does. Pure CPU, no servers; seeded, so every run replays the same trace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Protocol

from layer_cache.eviction import POLICIES, PolicyName
from migrations_mode.tables import build_table, render_table

SIZE_SHARES = (0.01, 0.05, 0.20)
MIN_VALUE_BYTES = 64
MAX_VALUE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Trace:
    """Requests as (key, size, is_read), and the bytes of every key that is read."""

    requests: list[tuple[int, int, bool]]
    read_bytes: int


@dataclass(frozen=True)
class HitRatio:
    """One policy at one size."""

    policy: str
    size_share: float
    capacity_bytes: int
    reads: int
    hit_ratio: float
    byte_hit_ratio: float
    ns_per_request: float


class Tier(Protocol):
    """What the simulation needs of a cache: a lookup and an insert."""

    def lookup(self, key: int) -> bool: ...

    def insert(self, key: int, size: int) -> None: ...


class _OurPolicy:
    def __init__(self, name: PolicyName, capacity: int) -> None:
        self.cache: Any = POLICIES[name](capacity)

    def lookup(self, key: int) -> bool:
        return self.cache.get(key) is not None

    def insert(self, key: int, size: int) -> None:
        self.cache.put(key, size, size)


class _CachetoolsLru:
    def __init__(self, capacity: int) -> None:
        import cachetools  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.cache: Any = cachetools.LRUCache(maxsize=capacity, getsizeof=lambda size: size)

    def lookup(self, key: int) -> bool:
        return self.cache.get(key) is not None

    def insert(self, key: int, size: int) -> None:
        if size <= self.cache.maxsize:
            self.cache[key] = size


class _Moka:
    def __init__(self, capacity: int, policy: str) -> None:
        import moka_py  # type: ignore[import-untyped, import-not-found, unused-ignore]

        self.cache: Any = moka_py.Moka(capacity, policy=policy, weigher=lambda _key, size: size)

    def lookup(self, key: int) -> bool:
        return self.cache.get(key) is not None

    def insert(self, key: int, size: int) -> None:
        self.cache.set(key, size)


class _Fifo(_OurPolicy):
    """First in, first out (foyer's ``FifoPicker``, upstream's disk tier): a read changes
    nothing."""

    def __init__(self, capacity: int) -> None:
        super().__init__(PolicyName.LRU, capacity)

    def lookup(self, key: int) -> bool:
        return self.cache.peek(key) is not None


def available_tiers() -> dict[str, Callable[[int], Tier]]:
    """Our policies, then each library that is installed."""
    tiers: dict[str, Callable[[int], Tier]] = {
        name.value: partial(_OurPolicy, name) for name in POLICIES
    }
    try:
        import cachetools  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401

        tiers["cachetools LRUCache"] = _CachetoolsLru
    except ImportError:
        pass
    try:
        import moka_py  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401

        tiers["moka-py lru"] = partial(_Moka, policy="lru")
        tiers["moka-py tiny_lfu"] = partial(_Moka, policy="tiny_lfu")
    except ImportError:
        pass
    return tiers


def zipf_cumulative(count: int, alpha: float) -> list[float]:
    """Cumulative Zipf(alpha) weights of ranks 1..count (for ``random.choices``)."""
    return list(itertools.accumulate(1.0 / rank**alpha for rank in range(1, count + 1)))


def make_trace(
    *,
    keys: int,
    requests: int,
    alpha: float,
    write_share: float,
    median_bytes: int,
    sigma: float,
    seed: int,
) -> Trace:
    """The request trace (see the module docstring)."""
    rng = random.Random(seed)
    sizes = [
        min(
            MAX_VALUE_BYTES,
            max(MIN_VALUE_BYTES, int(rng.lognormvariate(math.log(median_bytes), sigma))),
        )
        for _ in range(keys)
    ]
    ranked = list(range(keys))
    rng.shuffle(ranked)  # popularity rank independent of size
    reads = rng.choices(ranked, cum_weights=zipf_cumulative(keys, alpha), k=requests)
    trace: list[tuple[int, int, bool]] = []
    new_key = keys
    for key in reads:
        if rng.random() < write_share:
            size = min(
                MAX_VALUE_BYTES,
                max(MIN_VALUE_BYTES, int(rng.lognormvariate(math.log(median_bytes), sigma))),
            )
            trace.append((new_key, size, False))
            new_key += 1
        trace.append((key, sizes[key], True))
    return Trace(trace, sum(sizes))


def replay(
    name: str,
    make: Callable[[int], Tier],
    trace: Trace,
    share: float,
    behind_memory: float | None = None,
) -> HitRatio:
    """Run the trace through one tier; the hit ratios over the second half (warmed up). With
    ``behind_memory``, the tier is a disk tier behind an S3-FIFO memory tier of that share, as
    the server has it: every insert goes to both, the disk tier sees the memory tier's misses,
    and the ratios are the disk tier's hits over all reads."""
    capacity = max(1, int(trace.read_bytes * share))
    tier = make(capacity)
    memory: Tier | None = None
    if behind_memory is not None:
        memory = _OurPolicy(PolicyName.S3FIFO, max(1, int(trace.read_bytes * behind_memory)))
    warm = len(trace.requests) // 2
    reads = hits = read_bytes = hit_bytes = 0
    started = time.perf_counter_ns()
    for index, (key, size, is_read) in enumerate(trace.requests):
        if not is_read:
            tier.insert(key, size)
            if memory is not None:
                memory.insert(key, size)
            continue
        if memory is not None and memory.lookup(key):
            continue  # the memory tier answered: the disk tier never saw the read
        hit = tier.lookup(key)
        if memory is not None:
            memory.insert(key, size)
        if not hit:
            tier.insert(key, size)
        if index >= warm:
            reads += 1
            read_bytes += size
            if hit:
                hits += 1
                hit_bytes += size
    elapsed = time.perf_counter_ns() - started
    return HitRatio(
        policy=name,
        size_share=share,
        capacity_bytes=capacity,
        reads=reads,
        hit_ratio=round(hits / reads, 4) if reads else 0.0,
        byte_hit_ratio=round(hit_bytes / read_bytes, 4) if read_bytes else 0.0,
        ns_per_request=round(elapsed / len(trace.requests), 1),
    )


def run(args: argparse.Namespace) -> list[HitRatio]:
    """Every available tier at every size share, on one trace."""
    trace = make_trace(
        keys=args.keys,
        requests=args.requests,
        alpha=args.alpha,
        write_share=args.write_share,
        median_bytes=args.median_bytes,
        sigma=args.sigma,
        seed=args.seed,
    )
    tiers = available_tiers()
    if args.behind_memory is not None:
        tiers = {name: tiers[name] for name in POLICIES} | {"fifo": _Fifo}
    chosen = args.policies or list(tiers)
    return [
        replay(name, tiers[name], trace, share, args.behind_memory)
        for share in args.sizes
        for name in chosen
    ]


def format_table(results: Sequence[HitRatio]) -> str:
    """Hit ratios as a table, one row per policy and size."""
    header = ("tier size", "policy", "hit ratio", "byte hit ratio", "ns/request")
    rows = [
        (
            f"{result.size_share:.0%} ({result.capacity_bytes / 2**20:.1f} MiB)",
            result.policy,
            f"{result.hit_ratio:.3f}",
            f"{result.byte_hit_ratio:.3f}",
            result.ns_per_request,
        )
        for result in results
    ]
    return render_table(build_table(header, rows, left_columns=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_policy", description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="keys that are read")
    parser.add_argument("--requests", type=int, default=1_000_000, help="reads in the trace")
    parser.add_argument("--alpha", type=float, default=1.0, help="Zipf skew of the reads")
    parser.add_argument("--write-share", type=float, default=0.10, help="new never-read writes")
    parser.add_argument("--median-bytes", type=int, default=4096, help="median value size")
    parser.add_argument("--sigma", type=float, default=1.2, help="log-normal size spread")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(SIZE_SHARES))
    parser.add_argument("--policies", nargs="+", default=None, help="default: all available")
    parser.add_argument(
        "--behind-memory",
        type=float,
        default=None,
        help="measure a disk tier behind an S3-FIFO memory tier of this share (e.g. 0.01)",
    )
    parser.add_argument("--seed", type=int, default=5156)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps([asdict(result) for result in results], indent=2))
        return
    print(
        f"Zipf alpha {args.alpha}, {args.keys} keys read, {args.requests} reads, "
        f"{args.write_share:.0%} never-read writes, median value {args.median_bytes} B"
        + (
            ""
            if args.behind_memory is None
            else f"; disk tiers behind a {args.behind_memory:.0%} S3-FIFO memory tier"
        )
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
