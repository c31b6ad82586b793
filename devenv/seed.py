"""Sample layer-cache rows for the demo and benchmarks: realistic keys, sizes and ties.

Keys are lowercase hex (32 characters for ``cas`` and ``encrypted_secret``, 64 for the rest, as
upstream's xxh3/blake3 hashes). Values are random bytes (incompressible, like the deflated
payloads in production) with a skewed size mix. Rows are spread over time both sides of the
cutoff, and a share of them share a ``created_at``, as bulk copies and restores leave them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from layer_cache.cache_types import CACHE_SPECS, CacheType

_KEY_LENGTHS = {CacheType.CAS: 32, CacheType.ENCRYPTED_SECRET: 32}
_INSERT_CHUNK = 500


@dataclass(frozen=True)
class SizeMix:
    """Value sizes: mostly small, a few large."""

    small: tuple[int, int] = (1024, 16 * 1024)
    large: tuple[int, int] = (100 * 1024, 1024 * 1024)
    large_share: float = 0.01

    def draw(self, rng: random.Random) -> int:
        """One value size in bytes."""
        low, high = self.large if rng.random() < self.large_share else self.small
        return rng.randint(low, high)


def sample_rows(
    cache_type: CacheType,
    count: int,
    *,
    cutoff: datetime,
    rng: random.Random,
    sizes: SizeMix,
    share_after_cutoff: float = 0.1,
    tie_share: float = 0.2,
) -> Iterator[tuple[str, datetime, bytes]]:
    """(key, created_at, value) rows; ``share_after_cutoff`` of them at or after the cutoff."""
    length = _KEY_LENGTHS.get(cache_type, 64)
    span = timedelta(days=30)
    tied_at = cutoff - span / 2
    for _ in range(count):
        key = rng.randbytes(length // 2).hex()
        if rng.random() < share_after_cutoff:
            created_at = cutoff + span * rng.random() / 30
        elif rng.random() < tie_share:
            created_at = tied_at
        else:
            created_at = cutoff - span * rng.random() - timedelta(microseconds=1)
        yield key, created_at, rng.randbytes(sizes.draw(rng))


@dataclass(frozen=True)
class Seeded:
    """What ``seed`` inserted into one table, on either side of the cutoff."""

    rows: int
    at_or_after_cutoff: int  # newer than the cutoff: a backfill below it does not copy them

    @property
    def below_cutoff(self) -> int:
        """The rows a backfill with this cutoff copies."""
        return self.rows - self.at_or_after_cutoff


async def seed(
    pool: asyncpg.Pool,
    cache_type: CacheType,
    count: int,
    *,
    cutoff: datetime,
    seed_value: int = 0,
    sizes: SizeMix | None = None,
) -> Seeded:
    """Insert ``count`` sample rows into one cache table; says how many lie at or after the
    cutoff (keys are random 128- or 256-bit hex: none collide)."""
    rng = random.Random(f"{seed_value}-{cache_type}")
    table = CACHE_SPECS[cache_type].table
    statement = (
        f"INSERT INTO {table} (key, sort_key, created_at, value) VALUES ($1, $1, $2, $3)"
        " ON CONFLICT DO NOTHING"
    )
    chunk: list[tuple[str, datetime, bytes]] = []
    after = 0
    for row in sample_rows(cache_type, count, cutoff=cutoff, rng=rng, sizes=sizes or SizeMix()):
        chunk.append(row)
        after += row[1] >= cutoff
        if len(chunk) == _INSERT_CHUNK:
            await pool.executemany(statement, chunk)
            chunk.clear()
    if chunk:
        await pool.executemany(statement, chunk)
    return Seeded(count, after)
