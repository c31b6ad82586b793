"""Durable backfill progress, so a re-run with the same arguments continues where it stopped.

A record per (cache type, cutoff, shard) holds the resume position (the checkpoint tracker's
low-water mark: every row up to and including it is in S3) and whether the cache completed.
A different cutoff is a different record, so it starts fresh; ``--backfill-restart`` ignores the
record (and overwrites it as the new run advances).

Two stores, chosen by ``--backfill-progress-store``:
  ``postgres``  a small table of the job's own, ``layer_cache_backfill_progress``, in the layer db
                (created if missing); needs CREATE and INSERT/UPDATE on it.
  ``s3``        one JSON object per record in the cache's own bucket, under the reserved prefix
                ``_si_backfill_progress/`` (never a row's object key: those are hex levels).
  ``auto``      (default) ``postgres`` when the role may create and write the table, else ``s3``,
                so a SELECT-only role still resumes.

Saves happen once per listed batch and when a cache stops, so after a kill -9 the re-work is at
most one batch plus the uploads that were in flight. A save that fails is logged and retried at
the next batch: losing a save costs re-work, never data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import asyncpg
import structlog

from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError, map_pg_errors
from layer_cache.s3 import S3Layer
from migrations_mode.checkpoint import Position

log = structlog.get_logger(__name__)

PROGRESS_TABLE = "layer_cache_backfill_progress"
S3_PROGRESS_PREFIX = "_si_backfill_progress"


class ProgressStoreKind(StrEnum):
    """Where progress is kept."""

    AUTO = "auto"
    POSTGRES = "postgres"
    S3 = "s3"


@dataclass(frozen=True, slots=True)
class ProgressKey:
    """Which run a record belongs to."""

    cache_type: CacheType
    cutoff: datetime
    shard: str = "0-of-1"


@dataclass(frozen=True, slots=True)
class SavedProgress:
    """A resume position (None = nothing finished yet) and whether the cache completed."""

    position: Position | None
    completed: bool
    rows_done: int


class ProgressStore(Protocol):
    """Loads and saves progress records."""

    kind: ProgressStoreKind

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        """The saved record, or None."""

    async def save(self, key: ProgressKey, progress: SavedProgress) -> None:
        """Replace the record."""


def progress_to_json(progress: SavedProgress) -> dict[str, object]:
    """The JSON form stored in S3."""
    position = progress.position
    return {
        "position_created_at": position.created_at.isoformat() if position else None,
        "position_key": position.key if position else None,
        "completed": progress.completed,
        "rows_done": progress.rows_done,
    }


def progress_from_json(data: dict[str, object]) -> SavedProgress:
    """Read back ``progress_to_json``."""
    created_at, key = data.get("position_created_at"), data.get("position_key")
    position = (
        Position(datetime.fromisoformat(str(created_at)), str(key))
        if created_at is not None and key is not None
        else None
    )
    return SavedProgress(position, bool(data["completed"]), int(str(data["rows_done"])))


_CREATE_PROGRESS_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} ("
    " cache_type text NOT NULL, cutoff timestamptz NOT NULL, shard text NOT NULL,"
    " position_created_at timestamptz, position_key text,"
    " completed boolean NOT NULL DEFAULT false, rows_done bigint NOT NULL DEFAULT 0,"
    " updated_at timestamptz NOT NULL DEFAULT now(),"
    " PRIMARY KEY (cache_type, cutoff, shard))"
)


class PgProgressStore:
    """Progress rows in the layer database."""

    kind = ProgressStoreKind.POSTGRES

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def prepare(self) -> None:
        """Create the table if needed and prove the role may write it (raises if not)."""
        with map_pg_errors(f"preparing {PROGRESS_TABLE}"):
            async with self.pool.acquire() as connection, connection.transaction():
                # Shards start together; CREATE TABLE IF NOT EXISTS alone races on the catalog.
                await connection.execute("SELECT pg_advisory_xact_lock(5157)")
                await connection.execute(_CREATE_PROGRESS_TABLE)
                await connection.execute(
                    f"UPDATE {PROGRESS_TABLE} SET updated_at = updated_at WHERE false"
                )

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        """The saved record, or None."""
        with map_pg_errors(f"reading {PROGRESS_TABLE}"):
            record = await self.pool.fetchrow(
                f"SELECT position_created_at, position_key, completed, rows_done"
                f" FROM {PROGRESS_TABLE} WHERE cache_type = $1 AND cutoff = $2 AND shard = $3",
                key.cache_type.value,
                key.cutoff,
                key.shard,
            )
        if record is None:
            return None
        position = (
            Position(record["position_created_at"], record["position_key"])
            if record["position_key"] is not None
            else None
        )
        return SavedProgress(position, record["completed"], record["rows_done"])

    async def save(self, key: ProgressKey, progress: SavedProgress) -> None:
        """Upsert the record."""
        position = progress.position
        with map_pg_errors(f"writing {PROGRESS_TABLE}"):
            await self.pool.execute(
                f"INSERT INTO {PROGRESS_TABLE} AS p (cache_type, cutoff, shard,"
                " position_created_at, position_key, completed, rows_done)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (cache_type, cutoff, shard) DO UPDATE SET"
                " position_created_at = excluded.position_created_at,"
                " position_key = excluded.position_key, completed = excluded.completed,"
                " rows_done = excluded.rows_done, updated_at = now()",
                key.cache_type.value,
                key.cutoff,
                key.shard,
                position.created_at if position else None,
                position.key if position else None,
                progress.completed,
                progress.rows_done,
            )


def s3_progress_object_key(key: ProgressKey, key_prefix: str | None) -> str:
    """Where the S3 store keeps a record: one object per (cutoff, shard) in the cache's bucket."""
    name = f"{S3_PROGRESS_PREFIX}/{key.cutoff.isoformat()}/{key.shard}.json"
    return f"{key_prefix}/{name}" if key_prefix else name


class S3ProgressStore:
    """Progress objects in each cache's own bucket."""

    kind = ProgressStoreKind.S3

    def __init__(self, layers: dict[CacheType, S3Layer]) -> None:
        self.layers = layers

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        """The saved record, or None."""
        layer = self.layers[key.cache_type]
        body = await layer.get_raw(s3_progress_object_key(key, layer.key_prefix))
        return None if body is None else progress_from_json(json.loads(body))

    async def save(self, key: ProgressKey, progress: SavedProgress) -> None:
        """Overwrite the record object."""
        layer = self.layers[key.cache_type]
        body = json.dumps(progress_to_json(progress)).encode()
        await layer.put_raw(s3_progress_object_key(key, layer.key_prefix), body)


async def open_progress_store(
    kind: ProgressStoreKind, pool: asyncpg.Pool, layers: dict[CacheType, S3Layer]
) -> ProgressStore:
    """The configured store; ``auto`` falls back to S3 when the role may not write Postgres."""
    if kind is ProgressStoreKind.S3:
        return S3ProgressStore(layers)
    store = PgProgressStore(pool)
    try:
        await store.prepare()
    except StorageError as exc:
        if kind is ProgressStoreKind.AUTO and exc.kind is ErrorKind.ACCESS_DENIED:
            log.info(
                "progress goes to S3: the Postgres role may not write its own progress table",
                reason=str(exc),
            )
            return S3ProgressStore(layers)
        raise
    return store
