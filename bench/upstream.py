"""The baseline: upstream's per-cache backfill loop (systeminit/si ``d6f80e259``), re-implemented.

Faithful to ``/work/shared/UPSTREAM.md`` §1 and §3, weak spots included (``created_at < cursor``
paging that skips rows tied at a batch boundary, counted as ``rows_missed``; a HEAD, a SELECT and
a PUT per key; the JoinSet concurrency bound), because it is what our job is measured against. It
runs on the same asyncpg pool and aiobotocore client as our job, so only the algorithm differs,
and it ends when the listing is empty and every task has been joined. The loop step by step:
``docs/bench.md``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
from botocore.exceptions import ClientError

from layer_cache.keys import object_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


@dataclass
class UpstreamStats:
    """Upstream's four counters, plus what the benchmark wants to know."""

    processed: int = 0
    uploaded: int = 0
    skipped: int = 0
    bytes_uploaded: int = 0
    listings: int = 0


class RowMissing(Exception):
    """``query_one`` found no row: upstream fails the cache."""


async def _exists(client: S3Client, bucket: str, key: str) -> bool:
    try:
        await client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND:
            return False
        raise
    return True


async def _upload_task(
    pool: asyncpg.Pool, client: S3Client, *, bucket: str, value_sql: str, key: str
) -> int | None:
    """HEAD, then (if absent) read the value and PUT it; the bytes uploaded, None if skipped."""
    target = object_key(key)
    if await _exists(client, bucket, target):
        return None
    value: bytes | None = await pool.fetchval(value_sql, key)
    if value is None:
        raise RowMissing(key)
    await client.put_object(Bucket=bucket, Key=target, Body=value)
    return len(value)


async def upstream_backfill(
    pool: asyncpg.Pool,
    client: S3Client,
    *,
    table: str,
    bucket: str,
    cutoff: datetime,
    key_batch_size: int,
    max_concurrent: int,
) -> UpstreamStats:
    """Copy ``table``'s rows below ``cutoff`` into ``bucket`` the way upstream does."""
    list_sql = (
        f"SELECT key, created_at FROM {table} WHERE created_at < $1"
        " ORDER BY created_at DESC LIMIT $2"
    )
    value_sql = f"SELECT value FROM {table} WHERE key = $1 LIMIT 1"
    stats = UpstreamStats()
    key_batch: list[tuple[str, datetime]] = []  # newest last, so pop() gives the newest
    current_cutoff = cutoff
    checkpoint = cutoff
    running: set[asyncio.Task[int | None]] = set()
    joinable: deque[asyncio.Task[int | None]] = deque()  # finished, not joined yet
    in_flight_timestamps: dict[str, datetime] = {}
    keys_of: dict[asyncio.Task[int | None], str] = {}
    try:
        while True:
            if not key_batch:
                records = await pool.fetch(list_sql, current_cutoff, key_batch_size)
                stats.listings += 1
                key_batch = [(r["key"], r["created_at"]) for r in reversed(records)]
                if not key_batch and not running and not joinable:
                    break
            while len(running) + len(joinable) < max_concurrent and key_batch:
                key, created_at = key_batch.pop()
                current_cutoff = created_at
                in_flight_timestamps[key] = created_at
                task = asyncio.create_task(
                    _upload_task(pool, client, bucket=bucket, value_sql=value_sql, key=key)
                )
                running.add(task)
                keys_of[task] = key
            if not joinable:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running -= done
                joinable.extend(done)
            task = joinable.popleft()
            size = task.result()  # ``result??``: the first error ends the cache
            del in_flight_timestamps[keys_of.pop(task)]
            checkpoint = max(in_flight_timestamps.values(), default=current_cutoff)
            stats.processed += 1
            if size is None:
                stats.skipped += 1
            else:
                stats.uploaded += 1
                stats.bytes_uploaded += size
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    del checkpoint  # kept current as upstream does; only its logs read it
    return stats
