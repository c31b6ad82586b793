"""The layer-db schema: upstream's refinery migrations, applied (runAndQuit) and checked (run).

``layer_cache/migrations/*.sql`` are upstream si's ``lib/si-layer-cache/src/migrations`` files
byte for byte: refinery's checksum covers every byte, so they are data, never edited.

``migrate_layer_db`` does what sdf's layer-db migration does (refinery 0.8, ``Runner`` defaults)
in one transaction: take upstream's migration lock (``pg_advisory_xact_lock(42)``, the number
si-data-pg uses, so it waits for a concurrently migrating sdf), read ``refinery_schema_history``,
check every recorded migration against the shipped ones (same version, name and checksum, or
``SchemaError`` before anything is changed), then apply the missing ones in version order and
record each one as refinery does. Nothing to apply means no DDL at all. ``check_layer_db_schema``
(run mode) only reads the catalog. Each call holds one pooled connection and returns it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from layer_cache.errors import SchemaError, map_pg_errors
from layer_cache.siphash import siphash13

HISTORY_TABLE = "refinery_schema_history"
MIGRATION_LOCK_NUMBER = 42
"""si-data-pg's ``MIGRATION_LOCK_NUMBER``: sdf holds this advisory lock while migrating."""

# refinery_core::traits::ASSERT_MIGRATIONS_TABLE_QUERY with the default table name.
CREATE_HISTORY_TABLE = """CREATE TABLE IF NOT EXISTS refinery_schema_history(
             version INT4 PRIMARY KEY,
             name VARCHAR(255),
             applied_on VARCHAR(255),
             checksum VARCHAR(255));"""

_INSERT_HISTORY = (
    f"INSERT INTO {HISTORY_TABLE} (version, name, applied_on, checksum) VALUES ($1, $2, $3, $4)"
)
_FILE_NAME = re.compile(r"U(\d+)__(\w+)\.sql")
_CREATED_TABLE = re.compile(r"\bCREATE\s+TABLE\s+(?!IF\s)(\w+)", re.IGNORECASE)
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
_U64_MAX = (1 << 64) - 1

USED_COLUMNS = ("key", "sort_key", "created_at", "value")
"""The columns the server and the backfill read or write in every cache table."""

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection: TypeAlias = PoolConnectionProxy[asyncpg.Record]

RUN_AND_QUIT_HINT = "run --migration-mode runAndQuit (or upstream sdf's migrations) first"


@dataclass(frozen=True, slots=True)
class Migration:
    """One shipped migration file: ``U{version}__{name}.sql``."""

    version: int
    name: str
    sql: str

    @property
    def file_name(self) -> str:
        return f"U{self.version:04d}__{self.name}.sql"

    @property
    def checksum(self) -> int:
        return refinery_checksum(self.name, self.version, self.sql)

    def created_tables(self) -> list[str]:
        """The tables this migration's ``CREATE TABLE`` statements make."""
        return _CREATED_TABLE.findall(self.sql)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """A row of ``refinery_schema_history`` as stored (refinery keeps text columns)."""

    version: int
    name: str | None
    applied_on: str | None
    checksum: str | None


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """What ``migrate_layer_db`` did: the files it applied, and how many were already there."""

    applied: tuple[str, ...]
    already_applied: int


def refinery_checksum(name: str, version: int, sql: str) -> int:
    """refinery's ``Migration::unapplied`` checksum: SipHash-1-3 (zero keys) of the Rust ``Hash``
    encodings of the name (UTF-8 bytes, then 0xFF), the version (i32, little-endian) and the SQL
    (UTF-8 bytes, then 0xFF)."""
    message = (
        name.encode()
        + b"\xff"
        + version.to_bytes(4, "little", signed=True)
        + sql.encode()
        + b"\xff"
    )
    return siphash13(message)


def refinery_timestamp(moment: datetime) -> str:
    """``applied_on`` as refinery writes it (the ``time`` crate's RFC 3339): UTC with ``Z``, the
    fraction without trailing zeros and left out when zero."""
    utc = moment.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S")
    if utc.microsecond:
        text += "." + f"{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


@cache
def shipped_migrations() -> tuple[Migration, ...]:
    """The migration files in ``layer_cache/migrations``, by version (read as exact bytes)."""
    migrations = []
    for entry in files("layer_cache").joinpath("migrations").iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            continue
        sql = entry.read_bytes().decode("utf-8")  # no newline translation: the checksum sees all
        migrations.append(Migration(int(match[1]), match[2], sql))
    return tuple(sorted(migrations, key=lambda migration: migration.version))


def _history_problem(row: HistoryRow, shipped: Mapping[int, Migration]) -> str | None:
    """Why refinery would refuse (or fail to read) this history row, or None."""
    migration = shipped.get(row.version)
    recorded = f"{HISTORY_TABLE} records migration {row.version} ({row.name})"
    if migration is None:
        return (
            f"{recorded}, which this si-layer-cache does not ship (the layer db was migrated by "
            "another sdf version)"
        )
    if row.checksum is None or not row.checksum.isdigit() or int(row.checksum) > _U64_MAX:
        return f"{recorded} with checksum {row.checksum!r}, which is not an unsigned 64-bit number"
    if row.applied_on is None or _RFC3339.fullmatch(row.applied_on) is None:
        return f"{recorded} with applied_on {row.applied_on!r}, which is not an RFC 3339 time"
    if row.name != migration.name or int(row.checksum) != migration.checksum:
        return (
            f"{recorded} with checksum {row.checksum}, which diverges from the shipped "
            f"{migration.file_name} (checksum {migration.checksum})"
        )
    return None


def pending_migrations(
    shipped: Sequence[Migration], history: Iterable[HistoryRow]
) -> list[Migration]:
    """The shipped migrations the history lacks, by version, as refinery would choose them
    (``U`` migrations: a gap is filled even below the newest applied version).

    Raises ``SchemaError`` for a recorded migration refinery would refuse: an unknown version, a
    different name or checksum, or a row refinery cannot read.
    """
    by_version = {migration.version: migration for migration in shipped}
    applied = set()
    for row in history:
        problem = _history_problem(row, by_version)
        if problem is not None:
            raise SchemaError(f"{problem}; nothing was changed")
        applied.add(row.version)
    return sorted(
        (migration for migration in shipped if migration.version not in applied),
        key=lambda migration: migration.version,
    )


async def _read_history(connection: _Connection) -> list[HistoryRow]:
    if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", HISTORY_TABLE):
        return []
    records = await connection.fetch(
        f"SELECT version, name, applied_on, checksum FROM {HISTORY_TABLE} ORDER BY version"
    )
    return [HistoryRow(r["version"], r["name"], r["applied_on"], r["checksum"]) for r in records]


async def _tables_in_the_way(
    connection: _Connection, pending: Sequence[Migration]
) -> list[tuple[str, Migration]]:
    """(table, migration) for each table a pending migration creates that already exists."""
    wanted = [(table, migration) for migration in pending for table in migration.created_tables()]
    existing = set(
        await connection.fetchval(
            "SELECT coalesce(array_agg(name), '{}') FROM unnest($1::text[]) AS t(name)"
            " WHERE to_regclass(name) IS NOT NULL",
            [table for table, _ in wanted],
        )
    )
    return [(table, migration) for table, migration in wanted if table in existing]


async def migrate_layer_db(pool: asyncpg.Pool) -> MigrationOutcome:
    """Bring the layer db to upstream's schema (runAndQuit); see the module docstring."""
    shipped = shipped_migrations()
    with map_pg_errors("migrating the layer db"):
        async with pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_NUMBER)
            history = await _read_history(connection)
            pending = pending_migrations(shipped, history)
            if not pending:
                return MigrationOutcome((), len(history))
            in_the_way = await _tables_in_the_way(connection, pending)
            if in_the_way:
                table, migration = in_the_way[0]
                raise SchemaError(
                    f"table {table} already exists but {HISTORY_TABLE} does not record "
                    f"{migration.file_name}, which creates it: the layer db was not made by "
                    "these migrations (by hand, or by an older si-layer-cache); nothing was "
                    "changed"
                )
            if not history:
                await connection.execute(CREATE_HISTORY_TABLE)
            for migration in pending:
                await connection.execute(migration.sql)  # simple protocol: several statements
                await connection.execute(
                    _INSERT_HISTORY,
                    migration.version,
                    migration.name,
                    refinery_timestamp(datetime.now(UTC)),
                    str(migration.checksum),
                )
    return MigrationOutcome(tuple(m.file_name for m in pending), len(history))


def schema_gaps(found: Mapping[str, frozenset[str] | None]) -> list[str]:
    """What is missing for the queries to work: table → its columns (None: no such table)."""
    gaps = []
    for table, columns in found.items():
        if columns is None:
            gaps.append(f"table {table} does not exist")
            continue
        missing = [column for column in USED_COLUMNS if column not in columns]
        if missing:
            gaps.append(f"table {table} has no column {', '.join(missing)}")
    return gaps


async def check_layer_db_schema(pool: asyncpg.Pool, tables: Sequence[str]) -> None:
    """Raise ``SchemaError`` unless every table exists with the columns used (reads only)."""
    with map_pg_errors("checking the layer-db schema"):
        records = await pool.fetch(
            "SELECT wanted.name, to_regclass(wanted.name) IS NOT NULL AS present,"
            " ARRAY(SELECT attname::text FROM pg_attribute"
            " WHERE attrelid = to_regclass(wanted.name) AND attnum > 0 AND NOT attisdropped)"
            " AS columns"
            " FROM unnest($1::text[]) AS wanted(name)",
            list(tables),
        )
    found = {r["name"]: frozenset(r["columns"]) if r["present"] else None for r in records}
    gaps = schema_gaps(found)
    if gaps:
        raise SchemaError(
            f"the layer-db schema is not in place ({'; '.join(gaps)}): {RUN_AND_QUIT_HINT}; "
            "run mode never changes the schema"
        )
