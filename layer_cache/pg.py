"""PgLayer: the queries the layer cache runs against one cache table, and the layer-db schema.

SQL is built once per table when the layer is made; table names come only from the registry,
never from input. Every call goes through ``map_pg_errors`` so callers see ``PgLayerError``.
Connections come from the shared asyncpg pool, one per call; a connection lost mid-call is
replaced by the pool on the next acquire, so a retried call runs on a fresh one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from layer_cache.cache_types import CACHE_SPECS, CacheSpec
from layer_cache.errors import map_pg_errors


@dataclass(frozen=True, slots=True)
class RowRef:
    """A listed row: its key, creation time and value size, without the value."""

    key: str
    created_at: datetime
    size: int


_BASE_COLUMNS = """
    key text NOT NULL PRIMARY KEY,
    sort_key text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    value bytea NOT NULL,
    serialization_lib text NOT NULL DEFAULT 'postcard'"""

_EXTRA_COLUMNS = {
    "func_runs": """,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    state text NOT NULL DEFAULT '',
    function_kind text NOT NULL DEFAULT '',
    workspace_id text NOT NULL DEFAULT '',
    change_set_id text NOT NULL DEFAULT '',
    actor_id text NOT NULL DEFAULT '',
    component_id text,
    attribute_value_id text,
    action_id text,
    action_originating_change_set_id text,
    json_value jsonb""",
    "func_run_logs": """,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    workspace_id text NOT NULL DEFAULT '',
    change_set_id text NOT NULL DEFAULT '',
    func_run_id text NOT NULL UNIQUE""",
}


def schema_statements() -> list[str]:
    """The idempotent DDL for every layer-cache table: the upstream schema, no extra indexes."""
    statements = []
    for spec in CACHE_SPECS.values():
        columns = _BASE_COLUMNS + _EXTRA_COLUMNS.get(spec.table, "")
        statements.append(f"CREATE TABLE IF NOT EXISTS {spec.table} ({columns}\n)")
        statements.append(
            f"CREATE INDEX IF NOT EXISTS {spec.table}_sort_key ON {spec.table} (sort_key)"
        )
    return statements


async def apply_schema(pool: asyncpg.Pool) -> None:
    """Create the layer-db tables if they are missing (what ``runAndQuit`` does)."""
    with map_pg_errors("applying the layer-db schema"):
        async with pool.acquire() as connection, connection.transaction():
            # Serialize concurrent schema applications; CREATE ... IF NOT EXISTS can race.
            await connection.execute("SELECT pg_advisory_xact_lock(5156)")
            for statement in schema_statements():
                await connection.execute(statement)


class PgLayer:
    """Reads rows of one layer-cache table."""

    def __init__(self, pool: asyncpg.Pool, spec: CacheSpec) -> None:
        self.pool = pool
        self.spec = spec
        table = spec.table
        self._sql_first_page_newest = (
            f"SELECT key, created_at, octet_length(value) AS size FROM {table}"
            " WHERE created_at < $1 ORDER BY created_at DESC, key DESC LIMIT $2"
        )
        self._sql_next_page_newest = (
            f"SELECT key, created_at, octet_length(value) AS size FROM {table}"
            " WHERE created_at < $1 AND (created_at, key) < ($2, $3)"
            " ORDER BY created_at DESC, key DESC LIMIT $4"
        )
        self._sql_value = f"SELECT value FROM {table} WHERE key = $1"
        self._sql_table_exists = "SELECT to_regclass($1) IS NOT NULL"
        self._sql_can_select = "SELECT has_table_privilege($1, 'SELECT')"

    async def list_newest_first(
        self,
        *,
        cutoff: datetime,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[RowRef]:
        """Rows with ``created_at < cutoff``, newest first, strictly after a (created_at, key)."""
        with map_pg_errors(f"listing rows of {self.spec.table}"):
            if after is None:
                records = await self.pool.fetch(self._sql_first_page_newest, cutoff, limit)
            else:
                created_at, key = after
                records = await self.pool.fetch(
                    self._sql_next_page_newest, cutoff, created_at, key, limit
                )
        return [RowRef(r["key"], r["created_at"], r["size"]) for r in records]

    async def fetch_value(self, key: str) -> bytes | None:
        """The value of one row, or None when the row no longer exists."""
        with map_pg_errors(f"reading {self.spec.table} key {key}"):
            value: bytes | None = await self.pool.fetchval(self._sql_value, key)
        return value

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
