"""Durable backfill progress, so a re-run with the same arguments continues where it stopped.

A record holds a resume position (the checkpoint tracker's low-water mark), whether the cache
completed and how many rows were done, and belongs to one walk: cache type, cutoff, walk order,
shard and target (endpoint, bucket, key prefix). A position means nothing for another walk, so a
record saved under other parameters is never used; ``unused_records`` names the difference for
the one log line that says so. The ``postgres`` store is the ``layer_cache_backfill_progress``
table (created, or upgraded from the earlier layout, when needed); the ``s3`` store is one JSON
object per record under the reserved ``_si_backfill_progress/`` prefix (never a row's object key,
which is hex levels). On a layer database that takes no writes (a read replica; the caller
asks it once per run) ``auto`` and ``s3`` keep progress in S3 without trying to create the table,
said in one line, and ``postgres`` is refused before anything is copied. A verification records
nothing, so it never creates the table and is never refused. A failed save is logged and
retried by the caller (it costs re-work, never data); nothing here holds a resource to shut down:
the pool and S3 layers belong to the services context. Choosing a store and the privileges each
needs: README, Resuming and failures.
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
from layer_cache.errors import ErrorKind, PreflightError, StorageError, map_pg_errors
from layer_cache.s3 import S3Layer
from migrations_mode.checkpoint import Position
from migrations_mode.walk import WalkOrder

log = structlog.get_logger(__name__)

PROGRESS_TABLE = "layer_cache_backfill_progress"
S3_PROGRESS_PREFIX = "_si_backfill_progress"


class WalkPurpose(StrEnum):
    """What a walk does with the rows; a copy's progress means nothing to a repair's."""

    COPY = "copy"
    REPAIR = "repair"


class ProgressStoreKind(StrEnum):
    """Where progress is kept."""

    AUTO = "auto"
    POSTGRES = "postgres"
    S3 = "s3"


def progress_target(endpoint: str | None, bucket: str, key_prefix: str | None) -> str:
    """Where a walk's objects go, as one string: endpoint, bucket and key prefix."""
    return f"{(endpoint or 'aws').rstrip('/')}/{bucket}/{key_prefix or ''}"


@dataclass(frozen=True, slots=True)
class RecordIdentity:
    """The parameters a position was saved under, besides cache type and cutoff. Records saved
    by an earlier version, which did not keep order and target, have them empty."""

    order: str
    target: str
    shard: str
    purpose: str = WalkPurpose.COPY.value


@dataclass(frozen=True, slots=True)
class ProgressKey:
    """Which walk a record belongs to; only a run with an equal key uses it."""

    cache_type: CacheType
    cutoff: datetime
    order: WalkOrder
    target: str
    shard: str = "0-of-1"
    purpose: WalkPurpose = WalkPurpose.COPY

    @property
    def identity(self) -> RecordIdentity:
        """The parameters besides cache type and cutoff."""
        return RecordIdentity(self.order.value, self.target, self.shard, self.purpose.value)


def _shard_count(label: str) -> str:
    return label.rpartition("-of-")[2]


def identity_differences(ours: RecordIdentity, saved: RecordIdentity) -> list[str]:
    """What differs between two walks of one cache and cutoff, in words for the log."""
    differs = []
    if saved.order != ours.order:
        differs.append("walk order")
    if saved.target != ours.target:
        differs.append("target")
    if saved.shard != ours.shard:
        differs.append("shard")
    if saved.purpose != ours.purpose:
        differs.append("purpose")
    return differs


def unused_records(
    ours: RecordIdentity, saved: list[RecordIdentity]
) -> list[tuple[RecordIdentity, list[str]]]:
    """The saved records (same cache and cutoff) this walk could have been mistaken for, each
    with what differs, closest first. Sibling shards (same count, same order and target) cover
    other keys and are not reported: they are the other pods of the same job."""
    found = []
    for record in saved:
        differs = identity_differences(ours, record)
        sibling = differs == ["shard"] and _shard_count(record.shard) == _shard_count(ours.shard)
        if differs and not sibling:
            found.append((record, differs))
    return sorted(found, key=lambda item: len(item[1]))


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

    async def others(self, key: ProgressKey) -> list[RecordIdentity]:
        """Records of the same cache type and cutoff saved under other parameters."""


def progress_to_json(progress: SavedProgress, key: ProgressKey | None = None) -> dict[str, object]:
    """The JSON form stored in S3 (with the walk it belongs to, for whoever reads the bucket)."""
    position = progress.position
    identity = (
        {}
        if key is None
        else {"order": key.order.value, "shard": key.shard, "purpose": key.purpose.value}
    )
    return identity | {
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


_IDENTITY_COLUMNS = "cache_type, cutoff, walk_order, target, shard, purpose"
_IDENTITY_WIDTH = len(_IDENTITY_COLUMNS.split(","))
_CREATE_PROGRESS_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} ("
    " cache_type text NOT NULL, cutoff timestamptz NOT NULL, shard text NOT NULL,"
    " position_created_at timestamptz, position_key text,"
    " completed boolean NOT NULL DEFAULT false, rows_done bigint NOT NULL DEFAULT 0,"
    " updated_at timestamptz NOT NULL DEFAULT now(),"
    " walk_order text NOT NULL DEFAULT '', target text NOT NULL DEFAULT '',"
    " purpose text NOT NULL DEFAULT 'copy',"
    f" CONSTRAINT {PROGRESS_TABLE}_pkey PRIMARY KEY ({_IDENTITY_COLUMNS}))"
)
# Earlier layouts keyed records by (cache_type, cutoff, shard) alone, then without purpose: add
# the identity columns (older records keep '' there, so no run ever matches them, and every
# record before repairs existed was a copy's) and widen the key.
_UPGRADE_PROGRESS_TABLE = (
    f"ALTER TABLE {PROGRESS_TABLE}"
    " ADD COLUMN IF NOT EXISTS walk_order text NOT NULL DEFAULT '',"
    " ADD COLUMN IF NOT EXISTS target text NOT NULL DEFAULT '',"
    " ADD COLUMN IF NOT EXISTS purpose text NOT NULL DEFAULT 'copy'"
)
_PRIMARY_KEY_WIDTH = (
    "SELECT cardinality(i.indkey) FROM pg_index i"
    " WHERE i.indrelid = $1::regclass AND i.indisprimary"
)
_WIDEN_PRIMARY_KEY = (
    f"ALTER TABLE {PROGRESS_TABLE} DROP CONSTRAINT {PROGRESS_TABLE}_pkey,"
    f" ADD CONSTRAINT {PROGRESS_TABLE}_pkey PRIMARY KEY ({_IDENTITY_COLUMNS})"
)
_WHERE_KEY = (
    "cache_type = $1 AND cutoff = $2 AND walk_order = $3 AND target = $4 AND shard = $5"
    " AND purpose = $6"
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
                await connection.execute(_UPGRADE_PROGRESS_TABLE)
                if await connection.fetchval(_PRIMARY_KEY_WIDTH, PROGRESS_TABLE) != _IDENTITY_WIDTH:
                    await connection.execute(_WIDEN_PRIMARY_KEY)
                await connection.execute(
                    f"UPDATE {PROGRESS_TABLE} SET updated_at = updated_at WHERE false"
                )

    async def load(self, key: ProgressKey) -> SavedProgress | None:
        """The saved record, or None."""
        with map_pg_errors(f"reading {PROGRESS_TABLE}"):
            record = await self.pool.fetchrow(
                f"SELECT position_created_at, position_key, completed, rows_done"
                f" FROM {PROGRESS_TABLE} WHERE {_WHERE_KEY}",
                *_key_arguments(key),
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
                f"INSERT INTO {PROGRESS_TABLE} AS p ({_IDENTITY_COLUMNS},"
                " position_created_at, position_key, completed, rows_done)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                f" ON CONFLICT ({_IDENTITY_COLUMNS}) DO UPDATE SET"
                " position_created_at = excluded.position_created_at,"
                " position_key = excluded.position_key, completed = excluded.completed,"
                " rows_done = excluded.rows_done, updated_at = now()",
                *_key_arguments(key),
                position.created_at if position else None,
                position.key if position else None,
                progress.completed,
                progress.rows_done,
            )

    async def others(self, key: ProgressKey) -> list[RecordIdentity]:
        """Records of the same cache type and cutoff saved under other parameters."""
        with map_pg_errors(f"reading {PROGRESS_TABLE}"):
            records = await self.pool.fetch(
                f"SELECT walk_order, target, shard, purpose FROM {PROGRESS_TABLE}"
                f" WHERE cache_type = $1 AND cutoff = $2 AND NOT ({_WHERE_KEY})"
                " ORDER BY updated_at DESC LIMIT 100",
                *_key_arguments(key),
            )
        return [
            RecordIdentity(r["walk_order"], r["target"], r["shard"], r["purpose"]) for r in records
        ]


def _key_arguments(key: ProgressKey) -> tuple[object, ...]:
    """The identity columns' values, in ``_IDENTITY_COLUMNS`` order."""
    return (
        key.cache_type.value,
        key.cutoff,
        key.order.value,
        key.target,
        key.shard,
        key.purpose.value,
    )


def _s3_walk_prefix(cutoff: datetime, purpose: WalkPurpose, key_prefix: str | None) -> str:
    """The prefix of one cutoff's records of one purpose: a copy's directly below the cutoff
    (as before repairs existed), a repair's below ``repair/``."""
    name = f"{S3_PROGRESS_PREFIX}/{cutoff.isoformat()}/"
    if purpose is not WalkPurpose.COPY:
        name += f"{purpose.value}/"
    return f"{key_prefix}/{name}" if key_prefix else name


def s3_progress_object_key(key: ProgressKey, key_prefix: str | None) -> str:
    """Where the S3 store keeps a record: one object per (cutoff, purpose, order, shard) in the
    cache's bucket, under its key prefix (bucket and prefix are the target itself)."""
    prefix = _s3_walk_prefix(key.cutoff, key.purpose, key_prefix)
    return f"{prefix}{key.order.value}/{key.shard}.json"


def s3_record_identity(
    relative_name: str, target: str, purpose: WalkPurpose = WalkPurpose.COPY
) -> RecordIdentity | None:
    """The identity of a record object from its name below its purpose's prefix: ``order/shard
    .json``, or ``shard.json`` as the earliest version named it (order unknown)."""
    if not relative_name.endswith(".json"):
        return None
    order, _, shard = relative_name.removesuffix(".json").rpartition("/")
    if "/" in order:
        return None
    return RecordIdentity(order, target, shard, purpose.value)


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
        body = json.dumps(progress_to_json(progress, key)).encode()
        await layer.put_raw(s3_progress_object_key(key, layer.key_prefix), body)

    async def others(self, key: ProgressKey) -> list[RecordIdentity]:
        """Records of the same cache type and cutoff saved under another order or shard (one
        listing of the cutoff's prefix; records for other targets live in other buckets)."""
        layer = self.layers[key.cache_type]
        prefix = _s3_walk_prefix(key.cutoff, key.purpose, layer.key_prefix)
        ours = s3_progress_object_key(key, layer.key_prefix)
        found: list[RecordIdentity] = []
        token: str | None = None
        while True:
            entries, token = await layer.list_page(None, token, prefix=prefix)
            found.extend(
                identity
                for name, _stored in entries
                if name != ours
                and (
                    identity := s3_record_identity(
                        name.removeprefix(prefix), key.target, key.purpose
                    )
                )
            )
            if token is None or len(found) >= 100:
                return found


def note_read_only_server(kind: ProgressStoreKind, reason: str, *, writes: bool) -> None:
    """On a layer database that takes no writes, progress goes to S3: say so in one line, or
    refuse ``postgres`` (``PreflightError``) when the run would save progress."""
    if kind is ProgressStoreKind.POSTGRES and writes:
        raise PreflightError(
            f"the layer database is read-only ({reason}), so --backfill-progress-store postgres "
            "cannot keep progress there; use --backfill-progress-store s3 (or auto)"
        )
    log.info("layer db is read-only", reason=reason, progress_store=ProgressStoreKind.S3)


async def open_progress_store(
    kind: ProgressStoreKind,
    pool: asyncpg.Pool,
    layers: dict[CacheType, S3Layer],
    *,
    read_only: str | None = None,
    writes: bool = True,
) -> ProgressStore:
    """The configured store: S3 on a server that takes no writes (``read_only`` says why);
    otherwise ``auto`` falls back to S3 when the role may not write Postgres. A run that
    ``writes`` no progress (a verification) creates nothing."""
    if read_only is not None:
        note_read_only_server(kind, read_only, writes=writes)
        return S3ProgressStore(layers)
    if kind is ProgressStoreKind.S3:
        return S3ProgressStore(layers)
    store = PgProgressStore(pool)
    if not writes:
        return store
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
