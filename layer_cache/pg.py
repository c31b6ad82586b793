"""PgLayer: the queries the layer cache runs against one cache table (schema: ``schema.py``).

SQL is built once per table when the layer is made; table names come only from the registry,
never from input. Every call goes through ``map_pg_errors`` so callers see ``PgLayerError``.
Connections come from the shared asyncpg pool, one per call; a connection lost mid-call is
replaced by the pool on the next acquire, so a retried call runs on a fresh one.
``server_read_only_reason`` asks the server itself whether it takes writes (a read replica does
not), with ``read_only_reason`` as its pure core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from layer_cache.cache_types import CacheSpec
from layer_cache.errors import map_pg_errors


@dataclass(frozen=True, slots=True)
class RowRef:
    """A listed row: its key, creation time and value size (and, when asked for, the value's
    MD5 in hex, computed by Postgres), without the value."""

    key: str
    created_at: datetime
    size: int
    md5: str | None = None


_COLUMNS = "key, created_at, octet_length(value) AS size"
# The value's MD5 computed where the value is: comparing it with an object's ETag needs no
# value on the wire (a verification or repair reads values only where the ETag cannot tell).
_COLUMNS_WITH_MD5 = _COLUMNS + ", md5(value) AS md5"

# A standby answers true to pg_is_in_recovery(); a role or database can also be read-only by
# default (ALTER ROLE ... SET default_transaction_read_only = on), which refuses writes as well.
_SQL_READ_ONLY = "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"


def read_only_reason(in_recovery: bool, default_transaction_read_only: str) -> str | None:
    """Why a server refuses writes, in words for a log line, or None when it takes them."""
    if in_recovery:
        return "a standby in recovery"
    if default_transaction_read_only == "on":
        return "default_transaction_read_only=on"
    return None


async def server_read_only_reason(pool: asyncpg.Pool) -> str | None:
    """Ask the server once whether it takes writes: ``read_only_reason`` of its answer."""
    with map_pg_errors("asking the layer database whether it takes writes"):
        record = await pool.fetchrow(_SQL_READ_ONLY)
    assert record is not None  # the query always returns one row
    return read_only_reason(bool(record[0]), str(record[1]))


class _Where:
    """A WHERE clause built from conditions with numbered placeholders (``{}`` in a template)."""

    def __init__(self, cutoff: datetime) -> None:
        self.conditions: list[str] = []
        self.arguments: list[object] = []
        self.add("created_at < {}", cutoff)

    def placeholder(self) -> str:
        """The next free ``$n``."""
        return f"${len(self.arguments) + 1}"

    def add(self, template: str, *values: object) -> None:
        """Append ``template`` with one placeholder per value."""
        first = len(self.arguments) + 1
        self.conditions.append(template.format(*(f"${first + i}" for i in range(len(values)))))
        self.arguments.extend(values)

    def key_range(self, low: str | None, high: str | None) -> None:
        """``low <= key < high``, each side only when given."""
        if low is not None:
            self.add("key >= {}", low)
        if high is not None:
            self.add("key < {}", high)

    @property
    def sql(self) -> str:
        """The conditions joined with AND."""
        return " AND ".join(self.conditions)


class PgLayer:
    """Reads rows of one layer-cache table."""

    def __init__(self, pool: asyncpg.Pool, spec: CacheSpec) -> None:
        self.pool = pool
        self.spec = spec
        table = spec.table
        self._sql_value = f"SELECT value FROM {table} WHERE key = $1"
        # One primary-key lookup per key, whatever the table's size or statistics: a plain
        # ``key = ANY($1)`` (or a join the planner may flatten into a hash join) can be planned
        # as a sequential scan. ``OFFSET 0`` keeps the lateral subquery from being flattened.
        self._sql_values = (
            "SELECT wanted.key, row.value FROM unnest($1::text[]) AS wanted(key)"
            f" CROSS JOIN LATERAL (SELECT value FROM {table} WHERE key = wanted.key OFFSET 0)"
            " AS row"
        )
        self._sql_existing_keys = f"SELECT key FROM {table} WHERE key = ANY($1::text[])"
        # The live write path: first write wins, and RETURNING says whether this one did. The
        # sort_key is the cache's constant, as upstream's db/*.rs writes it.
        self._sql_insert = (
            f"INSERT INTO {table} (key, sort_key, value) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true"
        )
        self._sql_size = f"SELECT octet_length(value) FROM {table} WHERE key = $1"
        self._sql_table_exists = "SELECT to_regclass($1) IS NOT NULL"
        self._sql_can_select = "SELECT has_table_privilege($1, 'SELECT')"
        # Upstream's evict_from_pg: the row goes; RETURNING says whether there was one.
        self._sql_delete = f"DELETE FROM {table} WHERE key = $1 RETURNING true"

    async def list_by_key(
        self,
        *,
        cutoff: datetime,
        after: str | None,
        low: str | None,
        high: str | None,
        limit: int,
        with_md5: bool = False,
    ) -> list[RowRef]:
        """Rows with ``created_at < cutoff`` in key order: after ``after`` (exclusive) or from
        ``low`` (inclusive), below ``high``; one primary-key range scan per page."""
        where = _Where(cutoff)
        if after is not None:
            where.add("key > {}", after)
        where.key_range(None if after is not None else low, high)
        return await self._list(where, "key", limit, with_md5=with_md5)

    async def list_newest_first(
        self,
        *,
        cutoff: datetime,
        after: tuple[datetime, str] | None,
        low: str | None = None,
        high: str | None = None,
        limit: int,
        with_md5: bool = False,
    ) -> list[RowRef]:
        """Rows with ``created_at < cutoff``, newest first, strictly after a (created_at, key)."""
        where = _Where(cutoff)
        if after is not None:
            where.add("(created_at, key) < ({}, {})", *after)
        where.key_range(low, high)
        return await self._list(where, "created_at DESC, key DESC", limit, with_md5=with_md5)

    async def _list(
        self, where: _Where, order_by: str, limit: int, *, with_md5: bool
    ) -> list[RowRef]:
        columns = _COLUMNS_WITH_MD5 if with_md5 else _COLUMNS
        sql = (
            f"SELECT {columns} FROM {self.spec.table} WHERE {where.sql}"
            f" ORDER BY {order_by} LIMIT {where.placeholder()}"
        )
        with map_pg_errors(f"listing rows of {self.spec.table}"):
            records = await self.pool.fetch(sql, *where.arguments, limit)
        if with_md5:
            return [RowRef(r["key"], r["created_at"], r["size"], r["md5"]) for r in records]
        return [RowRef(r["key"], r["created_at"], r["size"]) for r in records]

    async def fetch_values(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Values of many rows in one round trip; rows that no longer exist are absent."""
        if not keys:
            return {}
        with map_pg_errors(f"reading {len(keys)} values of {self.spec.table}"):
            records = await self.pool.fetch(self._sql_values, list(keys))
        return {record["key"]: record["value"] for record in records}

    async def existing_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` have a row (any created_at)."""
        with map_pg_errors(f"looking up keys of {self.spec.table}"):
            records = await self.pool.fetch(self._sql_existing_keys, list(keys))
        return {record["key"] for record in records}

    async def fetch_value(self, key: str) -> bytes | None:
        """The value of one row, or None when the row no longer exists."""
        with map_pg_errors(f"reading {self.spec.table} key {key}"):
            value: bytes | None = await self.pool.fetchval(self._sql_value, key)
        return value

    async def fetch_size(self, key: str) -> int | None:
        """The size in bytes of one row's value, or None when there is no row."""
        with map_pg_errors(f"sizing {self.spec.table} key {key}"):
            size: int | None = await self.pool.fetchval(self._sql_size, key)
        return size

    async def insert(self, key: str, value: bytes) -> bool:
        """Insert one row (``sort_key`` as upstream writes it for this cache); True if stored,
        False if the key already existed."""
        with map_pg_errors(f"inserting into {self.spec.table} key {key}"):
            inserted: bool | None = await self.pool.fetchval(
                self._sql_insert, key, self.spec.sort_key, value
            )
        return bool(inserted)

    async def delete(self, key: str) -> bool:
        """Delete one row (upstream's evict); True if there was one."""
        with map_pg_errors(f"deleting from {self.spec.table} key {key}"):
            deleted: bool | None = await self.pool.fetchval(self._sql_delete, key)
        return bool(deleted)

    async def ping(self) -> None:
        """Raise ``PgLayerError`` unless the database answers ``SELECT 1``."""
        with map_pg_errors("checking the layer-db connection"):
            await self.pool.fetchval("SELECT 1")

    async def count_below(
        self, *, cutoff: datetime, low: str | None, high: str | None
    ) -> tuple[int, int]:
        """Exact (rows, value bytes) with ``created_at < cutoff`` in a key range: a full scan."""
        where = _Where(cutoff)
        where.key_range(low, high)
        sql = (
            "SELECT count(*) AS rows, coalesce(sum(octet_length(value)), 0) AS bytes"
            f" FROM {self.spec.table} WHERE {where.sql}"
        )
        with map_pg_errors(f"counting rows of {self.spec.table}"):
            record = await self.pool.fetchrow(sql, *where.arguments)
        assert record is not None
        return int(record["rows"]), int(record["bytes"])

    async def estimated_rows(self) -> int | None:
        """The planner's row estimate for the table (None when never analyzed)."""
        with map_pg_errors(f"estimating rows of {self.spec.table}"):
            estimate = await self.pool.fetchval(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1)",
                self.spec.table,
            )
        return None if estimate is None or estimate < 0 else int(estimate)

    async def check_readable(self) -> tuple[bool, bool]:
        """(table exists, current role may SELECT from it)."""
        with map_pg_errors(f"checking table {self.spec.table}"):
            exists = bool(await self.pool.fetchval(self._sql_table_exists, self.spec.table))
            if not exists:
                return False, False
            readable = bool(await self.pool.fetchval(self._sql_can_select, self.spec.table))
        return exists, readable

    async def insert_rows(self, rows: Sequence[tuple[str, str, bytes]]) -> None:
        """Insert (key, sort_key, value) rows as the live path does: first write wins."""
        with map_pg_errors(f"inserting into {self.spec.table}"):
            await self.pool.executemany(
                f"INSERT INTO {self.spec.table} (key, sort_key, value) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                rows,
            )
