"""The layer-db schema against real PostgreSQL: runAndQuit makes exactly what upstream's refinery
makes, changes nothing on a database upstream made, and run/skip never run DDL.

"What refinery makes" is built here independently of ``layer_cache.schema``: refinery's history
table DDL written out, then each upstream file executed in its own transaction with its history
row, as ``refinery_core``'s async runner does (checksums: the constants the Rust program in
``tests/unit/test_schema.py`` printed). Databases are compared through the catalog: tables,
columns (type, NOT NULL, default), indexes (name and definition) and constraints.

"No DDL ran" is proven by an event trigger on ``ddl_command_start`` (it fires even for a
``CREATE ... IF NOT EXISTS`` that does nothing): it logs every command tag into a table outside
the compared schema, and once a test forbids DDL it refuses every statement, so a DDL attempt
fails the run even where a rollback would hide it from the log. Each test then shows the trigger
refusing the app role's DDL.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from devenv.postgres import PostgresServer
from devenv.s3 import S3Server
from layer_cache.schema import MIGRATION_LOCK_NUMBER, migrate_layer_db
from tests.cli_harness import CliRun, Job, cli
from tests.conftest import LayerDb, fresh_database, service_env
from tests.support import REPO_ROOT
from tests.unit.test_schema import REFINERY_CHECKSUMS

MIGRATIONS_DIR = REPO_ROOT / "layer_cache" / "migrations"
DEADLINE_S = 30.0
REFINERY_HISTORY_DDL = (
    "CREATE TABLE IF NOT EXISTS refinery_schema_history(\n"
    "             version INT4 PRIMARY KEY,\n"
    "             name VARCHAR(255),\n"
    "             applied_on VARCHAR(255),\n"
    "             checksum VARCHAR(255));"
)
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z")
KEY = "0123456789abcdef0123456789abcdef"

# Read from upstream's U0001..U0010 (U0010 reuses split_snapshot_supergraphs_sort_key for the
# subgraphs table, so IF NOT EXISTS skips it; U0007 drops by_attribute_value_id).
UPSTREAM_INDEXES = {
    "cas": {"cas_pkey", "cas_sort_key"},
    "workspace_snapshots": {"workspace_snapshots_pkey", "workspace_snapshots_sort_key"},
    "encrypted_secrets": {"encrypted_secrets_pkey", "encrypted_secrets_sort_key"},
    "func_executions": {
        "func_executions_pkey",
        "func_executions_action_id",
        "func_executions_component_id",
        "func_executions_prototype_id",
    },
    "func_execution_messages": {
        "func_execution_messages_pkey",
        "func_execution_messages_sort_key",
    },
    "func_runs": {
        "func_runs_pkey",
        "func_runs_sort_key",
        "func_runs_by_attribute_value_id",
        "func_runs_function_kind_and_workspace_id",
        "func_runs_action_id_and_workspace_id",
    },
    "func_run_logs": {
        "func_run_logs_pkey",
        "func_run_logs_func_run_id_key",
        "func_run_logs_sort_key",
        "func_run_log_by_func_run_id",
    },
    "rebase_batches": {"rebase_batches_pkey", "rebase_batches_sort_key"},
    "change_batches": {"change_batches_pkey", "change_batches_sort_key"},
    "split_snapshot_supergraphs": {
        "split_snapshot_supergraphs_pkey",
        "split_snapshot_supergraphs_sort_key",
    },
    "split_snapshot_subgraphs": {"split_snapshot_subgraphs_pkey"},
    "split_snapshot_rebase_batches": {
        "split_snapshot_rebase_batches_pkey",
        "split_snpapshot_rebase_batches_sort_key",
    },
    "refinery_schema_history": {"refinery_schema_history_pkey"},
}

Catalog = dict[str, list[tuple[Any, ...]]]


# --------------------------------------------------------------------------------------------
# Databases, the DDL log and the catalog


@dataclass(frozen=True)
class Database:
    """A fresh database owned by the app role, with its DDL event trigger installed."""

    db: LayerDb
    admin_dsn: str

    async def ddl_log(self) -> list[str]:
        """Command tags of every DDL statement started since the trigger was installed."""
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            records = await connection.fetch("SELECT tag FROM ddl_audit.log ORDER BY id")
        finally:
            await connection.close()
        return [record["tag"] for record in records]

    async def forbid_ddl(self) -> list[str]:
        """From now on every DDL statement fails (even one rolled back later, which the log
        would not show); returns the log so far."""
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute("UPDATE ddl_audit.guard SET forbid = true")
        finally:
            await connection.close()
        return await self.ddl_log()

    async def assert_app_ddl_refused(self) -> None:
        """The trigger is live: a DDL statement by the app role is refused."""
        with pytest.raises(asyncpg.RaiseError, match="ddl_audit: CREATE TABLE refused"):
            await self.db.pool.execute("CREATE TEMPORARY TABLE trigger_probe (x int)")


@pytest.fixture
async def database(pg_server: PostgresServer) -> AsyncIterator[Database]:
    async with fresh_database(pg_server.endpoint, prefix="s", pool_size=4) as db:
        admin_dsn = db.endpoint.dsn(dbname=db.dbname, superuser=True)
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(
                """
                CREATE SCHEMA ddl_audit;
                CREATE TABLE ddl_audit.log (id serial PRIMARY KEY, tag text NOT NULL);
                CREATE TABLE ddl_audit.guard (forbid boolean NOT NULL);
                INSERT INTO ddl_audit.guard VALUES (false);
                CREATE FUNCTION ddl_audit.record() RETURNS event_trigger
                    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
                    BEGIN
                        IF (SELECT forbid FROM ddl_audit.guard) THEN
                            RAISE EXCEPTION 'ddl_audit: % refused', tg_tag;
                        END IF;
                        INSERT INTO ddl_audit.log (tag) VALUES (tg_tag);
                    END $$;
                CREATE EVENT TRIGGER record_ddl ON ddl_command_start
                    EXECUTE FUNCTION ddl_audit.record();
                """
            )
        finally:
            await admin.close()
        yield Database(db, admin_dsn)


@pytest.fixture
async def reference(pg_server: PostgresServer) -> AsyncIterator[Database]:
    """A second database, built the way upstream sdf's refinery builds it."""
    async with fresh_database(pg_server.endpoint, prefix="r", pool_size=2) as db:
        await migrate_like_refinery(db.pool)
        yield Database(db, db.endpoint.dsn(dbname=db.dbname, superuser=True))


def upstream_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("U*__*.sql"))


async def migrate_like_refinery(pool: asyncpg.Pool, *, up_to: int = 10) -> None:
    """refinery_core's async runner (Target::Latest, not grouped): the history table, then per
    migration one transaction running the file and inserting its history row."""
    async with pool.acquire() as connection:
        await connection.execute(REFINERY_HISTORY_DDL)
        for path in upstream_files():
            stem = path.name.removesuffix(".sql")
            version, name = int(stem[1:].split("__")[0]), stem.split("__", 1)[1]
            if version > up_to:
                break
            checksum = REFINERY_CHECKSUMS[version, name]
            async with connection.transaction():
                await connection.execute(path.read_bytes().decode())
                await connection.execute(
                    "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)"
                    f" VALUES ({version}, '{name}', '2026-01-27T19:00:00.123456789Z', '{checksum}')"
                )


async def catalog(pool: asyncpg.Pool) -> Catalog:
    """Everything that defines the public schema, as sorted rows."""
    queries = {
        "tables": "SELECT relname, relkind::text FROM pg_class WHERE relnamespace = "
        "'public'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')",
        "columns": """
            SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                   a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
              AND a.attnum > 0 AND NOT a.attisdropped""",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public'",
        "constraints": """
            SELECT c.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
            FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
            WHERE c.relnamespace = 'public'::regnamespace""",
    }
    result: Catalog = {}
    for part, sql in queries.items():
        result[part] = sorted(tuple(record.values()) for record in await pool.fetch(sql))
    return result


async def history(pool: asyncpg.Pool) -> list[tuple[int, str, str, str]]:
    records = await pool.fetch(
        "SELECT version, name, applied_on, checksum FROM refinery_schema_history ORDER BY version"
    )
    return [(r["version"], r["name"], r["applied_on"], r["checksum"]) for r in records]


def without_applied_on(rows: list[tuple[int, str, str, str]]) -> list[tuple[int, str, str]]:
    return [(version, name, checksum) for version, name, _, checksum in rows]


# --------------------------------------------------------------------------------------------
# Running the CLI


async def run_mode(mode: str, database: Database, s3_server: S3Server) -> CliRun:
    env = service_env(database.db, s3_server.endpoint, "unused", persister_mode="PostgresOnly")
    run = await cli(["--migration-mode", mode, "--log-json"], env, within_s=60)
    assert "Traceback" not in run.stderr, run.stderr
    return run


# --------------------------------------------------------------------------------------------
# (a) runAndQuit on an empty database


async def test_run_and_quit_on_an_empty_database_creates_exactly_what_refinery_creates(
    database: Database, reference: Database, s3_server: S3Server
) -> None:
    run = await run_mode("runAndQuit", database, s3_server)

    assert run.status == 0, run.events
    [done] = run.named("layer-db schema up to date")
    assert done["applied"] == [path.name for path in upstream_files()]
    assert done["already_applied"] == 0
    ours, upstream = await catalog(database.db.pool), await catalog(reference.db.pool)
    assert ours == upstream
    indexes: dict[str, set[str]] = {}
    for table, index, _ in ours["indexes"]:
        indexes.setdefault(table, set()).add(index)
    assert indexes == UPSTREAM_INDEXES
    assert not [row for row in ours["indexes"] if "created_at" in row[2]]
    rows = await history(database.db.pool)
    assert without_applied_on(rows) == without_applied_on(await history(reference.db.pool))
    assert [(version, name) for version, name, _ in without_applied_on(rows)] == sorted(
        REFINERY_CHECKSUMS
    )
    assert all(RFC3339_UTC.fullmatch(applied_on) for _, _, applied_on, _ in rows), rows


async def test_run_and_quit_makes_tables_the_backfill_and_server_queries_work_on(
    database: Database,
) -> None:
    await migrate_layer_db(database.db.pool)

    for table in ("cas", "split_snapshot_subgraphs", "split_snapshot_rebase_batches"):
        await database.db.pool.execute(
            f"INSERT INTO {table} (key, sort_key, value) VALUES ($1, $1, $2)", KEY, b"v"
        )
        record = await database.db.pool.fetchrow(
            f"SELECT key, sort_key, created_at, value, serialization_lib FROM {table}"
        )
        assert record is not None
        assert (record["key"], record["value"], record["serialization_lib"]) == (
            KEY,
            b"v",
            "postcard",
        )


async def test_concurrent_run_and_quits_apply_each_migration_once(database: Database) -> None:
    outcomes = await asyncio.gather(*(migrate_layer_db(database.db.pool) for _ in range(3)))

    assert sorted(len(outcome.applied) for outcome in outcomes) == [0, 0, 10]
    assert len(await history(database.db.pool)) == 10


async def test_run_and_quit_waits_for_sdf_holding_the_migration_lock(database: Database) -> None:
    sdf = await asyncpg.connect(database.admin_dsn)
    try:
        await sdf.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_NUMBER)
        migrating = asyncio.create_task(migrate_layer_db(database.db.pool))
        await asyncio.sleep(0.5)
        assert not migrating.done()
        await sdf.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_NUMBER)
        async with asyncio.timeout(DEADLINE_S):
            outcome = await migrating
    finally:
        await sdf.close()
    assert len(outcome.applied) == 10


# --------------------------------------------------------------------------------------------
# (b) runAndQuit on databases upstream made


async def test_run_and_quit_on_a_database_upstream_migrated_runs_no_ddl(
    database: Database, s3_server: S3Server
) -> None:
    await migrate_like_refinery(database.db.pool)
    before, rows_before = await catalog(database.db.pool), await history(database.db.pool)
    ddl_before = await database.forbid_ddl()

    run = await run_mode("runAndQuit", database, s3_server)

    assert run.status == 0, run.events
    [done] = run.named("layer-db schema up to date")
    assert (done["applied"], done["already_applied"]) == ([], 10)
    assert await database.ddl_log() == ddl_before
    assert await catalog(database.db.pool) == before
    assert await history(database.db.pool) == rows_before
    await database.assert_app_ddl_refused()


async def test_run_and_quit_completes_a_partially_migrated_database_like_refinery(
    database: Database, reference: Database, s3_server: S3Server
) -> None:
    await migrate_like_refinery(database.db.pool, up_to=6)
    first_six = await history(database.db.pool)

    run = await run_mode("runAndQuit", database, s3_server)

    assert run.status == 0, run.events
    [done] = run.named("layer-db schema up to date")
    assert done["applied"] == [path.name for path in upstream_files()][6:]
    assert done["already_applied"] == 6
    assert await catalog(database.db.pool) == await catalog(reference.db.pool)
    rows = await history(database.db.pool)
    assert rows[:6] == first_six
    assert without_applied_on(rows) == without_applied_on(await history(reference.db.pool))


async def corrupt_cas_checksum(pool: asyncpg.Pool) -> None:
    await migrate_like_refinery(pool)
    await pool.execute("UPDATE refinery_schema_history SET checksum = '12345' WHERE version = 1")


async def record_a_newer_migration(pool: asyncpg.Pool) -> None:
    await migrate_like_refinery(pool, up_to=4)
    await pool.execute(
        "INSERT INTO refinery_schema_history VALUES (11, 'audit', '2026-02-01T00:00:00Z', '7')"
    )


async def create_cas_by_hand(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "CREATE TABLE cas (key text PRIMARY KEY, sort_key text NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT clock_timestamp(), value bytea NOT NULL,"
        " serialization_lib text NOT NULL DEFAULT 'postcard')"
    )


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (corrupt_cas_checksum, "records migration 1 (cas) with checksum 12345, which diverges"),
        (record_a_newer_migration, "records migration 11 (audit), which this si-layer-cache"),
        (create_cas_by_hand, "table cas already exists but refinery_schema_history does not"),
    ],
    ids=["divergent-checksum", "unknown-migration", "tables-without-history"],
)
async def test_run_and_quit_refuses_a_history_refinery_would_refuse_and_touches_nothing(
    database: Database, s3_server: S3Server, prepare: Any, expected: str
) -> None:
    await prepare(database.db.pool)
    before = await catalog(database.db.pool)
    ddl_before = await database.forbid_ddl()

    run = await run_mode("runAndQuit", database, s3_server)

    assert run.status == 3
    message = run.the_error()["event"]
    assert expected in message
    assert message.endswith("nothing was changed")
    assert await database.ddl_log() == ddl_before
    assert await catalog(database.db.pool) == before
    await database.assert_app_ddl_refused()


# --------------------------------------------------------------------------------------------
# (c) run and skip never run DDL


async def test_run_on_an_empty_database_exits_3_with_one_line_and_creates_nothing(
    database: Database, s3_server: S3Server
) -> None:
    await database.forbid_ddl()

    run = await run_mode("run", database, s3_server)

    assert run.status == 3
    message = run.the_error()["event"]
    assert "the layer-db schema is not in place (table cas does not exist;" in message
    assert "run --migration-mode runAndQuit (or upstream sdf's migrations) first" in message
    assert await database.ddl_log() == []
    assert (await catalog(database.db.pool))["tables"] == []
    await database.assert_app_ddl_refused()


async def test_run_names_a_missing_column(database: Database, s3_server: S3Server) -> None:
    await migrate_layer_db(database.db.pool)
    await database.db.pool.execute("ALTER TABLE change_batches RENAME COLUMN sort_key TO sk")
    ddl_before = await database.forbid_ddl()

    run = await run_mode("run", database, s3_server)

    assert run.status == 3
    assert "(table change_batches has no column sort_key)" in run.the_error()["event"]
    assert await database.ddl_log() == ddl_before


async def serve_then_stop(
    mode: str, database: Database, s3_server: S3Server
) -> tuple[int, dict[str, Any]]:
    """Start the CLI in a serving mode, PUT one value once it listens, stop it with SIGTERM.
    Returns (exit status, the PUT's status and body as an event-like dict)."""
    env = service_env(database.db, s3_server.endpoint, "unused", persister_mode="PostgresOnly")
    args = ["--migration-mode", mode, "--socket-addr", "127.0.0.1:0", "--log-json"]
    async with Job(args, env) as job:
        listening = await job.expect(
            lambda event: event["event"] == "layer cache server listening", DEADLINE_S
        )
        url = f"http://127.0.0.1:{listening['port']}/v1/cas/{KEY}"
        async with aiohttp.ClientSession() as session, session.put(url, data=b"v") as answer:
            put = {"status": answer.status, "body": await answer.read()}
        job.send(signal.SIGTERM)
        status = (await job.finish(DEADLINE_S)).status
    return status, put


async def test_skip_on_an_empty_database_serves_without_creating_anything(
    database: Database, s3_server: S3Server
) -> None:
    await database.forbid_ddl()

    status, put = await serve_then_stop("skip", database, s3_server)

    assert status == 143
    assert put["status"] == 500  # no table: a storage error per request, the schema untouched
    assert b"storage_error" in put["body"]
    assert b"ddl_audit" not in put["body"]
    assert await database.ddl_log() == []
    assert (await catalog(database.db.pool))["tables"] == []
    await database.assert_app_ddl_refused()


@pytest.mark.parametrize("mode", ["run", "skip"])
async def test_run_and_skip_on_a_migrated_database_serve_without_ddl(
    database: Database, s3_server: S3Server, mode: str
) -> None:
    await migrate_like_refinery(database.db.pool)
    before = await catalog(database.db.pool)
    ddl_before = await database.forbid_ddl()

    status, put = await serve_then_stop(mode, database, s3_server)

    assert status == 143
    assert put["status"] == 201
    assert await database.db.pool.fetchval("SELECT value FROM cas WHERE key = $1", KEY) == b"v"
    assert await database.ddl_log() == ddl_before
    assert await catalog(database.db.pool) == before
    await database.assert_app_ddl_refused()


# --------------------------------------------------------------------------------------------
# (d) the tests' layer_db fixture uses the same migrations


async def test_the_layer_db_fixture_is_migrated_exactly_like_upstream(
    layer_db: LayerDb, reference: Database
) -> None:
    assert await catalog(layer_db.pool) == await catalog(reference.db.pool)
    assert without_applied_on(await history(layer_db.pool)) == without_applied_on(
        await history(reference.db.pool)
    )
