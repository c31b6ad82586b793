"""The real entrypoint, ``python -m services``, run as a subprocess against the real servers.

Every test starts the CLI the way an operator or a Kubernetes job would: settings in ``SI_SDF__…``
and ``SI_BACKFILL_…`` env vars or flags, JSON log lines on stderr (``--log-json``), the summary
table on stdout (console mode only), and the exit status as the verdict (0 done, 2 invalid input,
3 environment not ready, 130/143 interrupted). What the run left in S3 is read back and compared
byte for byte with the rows in Postgres.

The invalid-input cases are the exception: input is validated before anything is opened, so they
call ``main(argv)`` in this process, with servers that are not there; one of them also runs as a
subprocess against the real servers.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import pytest

from devenv.postgres import PostgresServer
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from tests.cli_harness import (
    WRITE_QUEUE_DIR_ENV,
    CliRun,
    OutputFormat,
    backfill_args,
    cli,
    interrupt_backfill,
    run_cli_in_process,
    run_cli_on_a_terminal,
    the_error_line,
)
from tests.conftest import LayerDb, fresh_database, service_env
from tests.support import (
    CUTOFF,
    CUTOFF_RFC3339,
    PG,
    S3_ACCESS_KEY,
    S3_SECRET_KEY,
    STORAGE,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    cache_bucket,
    cache_objects,
    expected_objects,
    insert_rows,
    object_sizes,
    random_key,
    rows_around_cutoff,
    rows_below,
    seed_every_cache,
    written_objects,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

LOGGED_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f UTC"  # how checkpoints are logged


ALL_TABLES = {spec.table for spec in CACHE_SPECS.values()}
BACKFILLABLE_TABLES = {CACHE_SPECS[cache_type].table for cache_type in BACKFILLABLE_CACHE_TYPES}
BASE_COLUMNS = ["key", "sort_key", "created_at", "value", "serialization_lib"]
UPSTREAM_ONLY_TABLES = {"func_executions", "func_execution_messages", "refinery_schema_history"}

ANSI_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# A console log line's ``processed=N`` (its colours removed).
CONSOLE_PROCESSED = re.compile(r"processed=(\d+)")

OUTPUT_FORMATS = pytest.mark.parametrize("output", ["json", "console"])


# --------------------------------------------------------------------------------------------
# Reading what the CLI wrote


def with_output(args: Sequence[str], output: OutputFormat) -> list[str]:
    """``args`` with ``--log-json`` only for the JSON format."""
    if output == "json":
        return [*args] if "--log-json" in args else [*args, "--log-json"]
    return [arg for arg in args if arg != "--log-json"]


def parse_logged_timestamp(text: str) -> datetime:
    """A checkpoint as the log prints it, e.g. ``2026-01-13 17:30:26.445817 UTC``."""
    return datetime.strptime(text, LOGGED_TIMESTAMP_FORMAT).replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Seeding and reading back


# --------------------------------------------------------------------------------------------
# 1. runAndQuit creates the schema


@pytest.fixture
async def empty_db(pg_server: PostgresServer) -> AsyncIterator[LayerDb]:
    """A brand-new database owned by the app role, without any layer-db table."""
    async with fresh_database(pg_server.endpoint, prefix="e", pool_size=2) as db:
        yield db


async def table_columns(pool: asyncpg.Pool) -> dict[str, list[str]]:
    records = await pool.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
    )
    columns: dict[str, list[str]] = {}
    for record in records:
        columns.setdefault(record["table_name"], []).append(record["column_name"])
    return columns


async def index_columns(pool: asyncpg.Pool) -> dict[str, list[list[str]]]:
    """Table → the column list of each of its indexes (primary key included)."""
    records = await pool.fetch(
        """
        SELECT t.relname AS table_name,
               array_agg(a.attname::text ORDER BY k.position) AS columns
        FROM pg_index x
        JOIN pg_class t ON t.oid = x.indrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace AND n.nspname = 'public'
        CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
        GROUP BY t.relname, x.indexrelid
        """
    )
    indexes: dict[str, list[list[str]]] = {}
    for record in records:
        indexes.setdefault(record["table_name"], []).append(list(record["columns"]))
    return indexes


@pytest.mark.parametrize("selected_by", ["flag", "env"])
async def test_run_and_quit_creates_upstreams_tables_on_an_empty_database_and_is_idempotent(
    empty_db: LayerDb, s3_server: S3Server, selected_by: str
) -> None:
    env = service_env(empty_db, s3_server.endpoint, "unused")
    args = ["--log-json"]
    if selected_by == "flag":
        args += ["--migration-mode", "runAndQuit"]
    else:
        env["SI_SDF__MIGRATION_MODE"] = "runAndQuit"
    assert await table_columns(empty_db.pool) == {}

    first = await cli(args, env)
    second = await cli(args, env)

    for run, applied in ((first, 10), (second, 0)):
        assert run.status == 0, run.stderr
        [done] = run.named("layer-db schema up to date")
        assert (done["dbname"], len(done["applied"])) == (empty_db.dbname, applied)
        assert run.stdout == ""
    columns = await table_columns(empty_db.pool)
    # Upstream's migrations also make U0004's unused func_execution tables, and refinery its
    # history table (the full catalog comparison is in test_schema.py).
    assert set(columns) == ALL_TABLES | UPSTREAM_ONLY_TABLES
    for table in BACKFILLABLE_TABLES:
        assert columns[table] == BASE_COLUMNS, table
    for table in ALL_TABLES - BACKFILLABLE_TABLES:
        assert set(BASE_COLUMNS) <= set(columns[table]), table
    indexes = await index_columns(empty_db.pool)
    for table in ALL_TABLES:
        assert not [cols for cols in indexes[table] if "created_at" in cols], (
            f"{table} has an index on created_at: {indexes[table]}"
        )


# --------------------------------------------------------------------------------------------
# 2./3. A complete backfill: env-only configuration, events, summary table


async def test_backfill_configured_only_by_env_copies_rows_below_cutoff_and_a_rerun_skips_all(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(101)
    await seed_every_cache(layer_db, rng, 36)
    edge_rows = [
        SeedRow(random_key(rng), b"exactly at the cutoff", CUTOFF),
        SeedRow(random_key(rng), b"one tick before", CUTOFF - timedelta(microseconds=1)),
        SeedRow(random_key(rng), b"", CUTOFF - timedelta(seconds=1)),  # empty value
    ]
    await insert_rows(layer_db.pool, CacheType.SPLIT_SNAPSHOT_SUPERGRAPH, edge_rows)
    expected_total = 0
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        expected_total += len(await rows_below(layer_db.pool, cache_type, CUTOFF))
    job_env = env | {
        "SI_SDF__MIGRATION_MODE": "backfillLayerCache",
        "SI_LOG_JSON": "true",
        "SI_BACKFILL_CUTOFF_TIMESTAMP": CUTOFF_RFC3339,
        "SI_BACKFILL_CACHE_TYPES": ",".join(BACKFILLABLE_CACHE_TYPES),
        "SI_BACKFILL_KEY_BATCH_SIZE": "7",
        "SI_BACKFILL_MAX_CONCURRENT_UPLOADS": "3",
        "SI_BACKFILL_CHECKPOINT_INTERVAL_SECS": "0.5",
        "SI_BACKFILL_GRACE_PERIOD_SECS": "5",
    }

    first = await cli([], job_env)

    assert first.status == 0, first.stderr
    assert first.stdout == "", "with JSON logs the summary table must not go to stdout"
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, s3_client, bucket_prefix, cache_type
        )
    for excluded in (CacheType.FUNC_RUN, CacheType.FUNC_RUN_LOG):
        assert await cache_objects(s3_client, bucket_prefix, excluded) == {}
    supergraphs = await cache_objects(s3_client, bucket_prefix, CacheType.SPLIT_SNAPSHOT_SUPERGRAPH)
    assert b"exactly at the cutoff" not in supergraphs.values()
    assert b"one tick before" in supergraphs.values()
    started = first.named("starting backfill")
    assert sorted(event["cache_type"] for event in started) == sorted(BACKFILLABLE_CACHE_TYPES)
    assert {(event["key_batch_size"], event["max_concurrent"]) for event in started} == {(7, 3)}
    completed = first.named("completed backfill")
    assert sorted(event["cache_type"] for event in completed) == sorted(BACKFILLABLE_CACHE_TYPES)
    total = first.summary()
    assert total["status"] == "completed"
    assert (total["uploaded"], total["processed"]) == (expected_total, expected_total)
    assert first.named("backfill failed") == []

    # A re-run with the same env finds every cache recorded as complete and copies nothing.
    second = await cli([], job_env)

    assert second.status == 0, second.stderr
    assert second.summary()["uploaded"] == 0
    assert second.summary()["rows_per_s"] is None, "nothing ran: no rate"
    for run in (first, second):
        run.assert_log_vocabulary()
    rerun = second.named("completed backfill")
    assert sorted(event["cache_type"] for event in rerun) == sorted(BACKFILLABLE_CACHE_TYPES)

    # Ignoring the saved progress, the re-run walks every row again and skips it by size.
    third = await cli([], job_env | {"SI_BACKFILL_RESTART": "true"})

    assert third.status == 0, third.stderr
    again = third.summary()
    assert (again["uploaded"], again["skipped"], again["processed"]) == (
        0,
        expected_total,
        expected_total,
    )
    walked = third.named("completed backfill")
    assert sorted(event["cache_type"] for event in walked) == sorted(BACKFILLABLE_CACHE_TYPES)
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, s3_client, bucket_prefix, cache_type
        )


async def test_console_run_prints_a_summary_table_with_each_cache_and_a_total_on_stdout(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    rng = random.Random(103)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(rng, 30))
    await insert_rows(layer_db.pool, CacheType.CHANGE_BATCH, rows_around_cutoff(rng, 14))

    run = await cli(backfill_args(cache_types="change_batch,cas", json_logs=False), env)

    assert run.status == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["cache", "status", "processed", "uploaded"], run.stdout
    rows = table_rows(run.stdout)
    assert [(row[0], row[1], row[2], row[3]) for row in rows] == [
        ("cas", "completed", "15", "15"),
        ("change_batch", "completed", "7", "7"),
        ("total", "completed", "22", "22"),
    ], run.stdout
    assert lines[-2].startswith("total")
    assert lines[-1].startswith("elapsed "), "the run's time under the table"
    assert max(len(line) for line in lines) <= 100
    assert "starting backfill" not in run.stdout, "log lines belong on stderr"
    assert "starting backfill" in run.stderr


async def test_on_a_terminal_the_summary_is_the_table_not_also_log_lines(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    rng = random.Random(139)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(rng, 30))
    await insert_rows(layer_db.pool, CacheType.CHANGE_BATCH, rows_around_cutoff(rng, 14))

    run = await asyncio.to_thread(
        run_cli_on_a_terminal, backfill_args(cache_types="cas,change_batch", json_logs=False), env
    )

    assert run.status == 0, run.stderr
    terminal = run.stderr
    assert "Layer cache backfill" in terminal, "no live display on the terminal"
    assert "starting backfill" in terminal, "console logs go to the terminal"
    assert "backfill summary" not in terminal, "the summary's figures were also logged"
    assert "completed backfill for all cache types" in terminal
    summary = table_rows(run.stdout)
    assert [row[:3] for row in summary] == [
        ["cas", "completed", "15"],
        ["change_batch", "completed", "7"],
        ["total", "completed", "22"],
    ], run.stdout
    # The display's last frame, left on screen: the summary's counts, status and rate.
    frame = last_live_frame(terminal)
    for cache, status, processed, *_, rate in summary[:2]:
        shown = frame[cache]
        assert (shown[1], shown[4], shown[5]) == (processed, rate, status), terminal[-3000:]


def last_live_frame(terminal: str) -> dict[str, list[str]]:
    """The cells of each cache's row in the live display's last frame, left on screen."""
    frame = ANSI_CODES.sub("", terminal).split("Layer cache backfill")[-1]
    caches = {cache_type.value for cache_type in CacheType}
    return {
        cells[0]: cells
        for cells in (line.split() for line in frame.splitlines())
        if cells and cells[0] in caches
    }


async def test_after_ctrl_c_on_a_terminal_the_last_frame_shows_the_summarys_figures(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    rng = random.Random(149)
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(rng, 1200))
    args = backfill_args(*SIGNAL_RUN_FLAGS, cache_types="cas", json_logs=False)

    def some_rows_done(terminal: str) -> bool:
        text = ANSI_CODES.sub("", terminal)
        return any(int(done) >= 100 for done in CONSOLE_PROCESSED.findall(text))

    run = await asyncio.to_thread(run_cli_on_a_terminal, args, env, interrupt_when=some_rows_done)

    assert run.status == 130, run.stderr[-3000:]
    [cas] = table_rows(run.stdout)[:1]
    assert cas[:2] == ["cas", "interrupted"], run.stdout
    assert int(cas[2]) < 600, "it finished before the interrupt"
    shown = last_live_frame(run.stderr)["cas"]
    # cache, processed, left ~, %, rows/s, status (in the ETA column), in flight, retries
    assert (shown[1], shown[4], shown[5]) == (cas[2], cas[-1], "interrupted"), run.stdout
    assert "backfill summary" not in run.stderr


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of a printed table's rows, up to the total (not its header, rules or the
    lines under it)."""
    lines = stdout.strip().splitlines()
    cells = [line.split() for line in lines if line.strip() and not set(line) <= {"-", "─", " "}]
    rows = cells[1:]
    end = next((index for index, row in enumerate(rows) if row[0] == "total"), len(rows) - 1)
    return rows[: end + 1]


@pytest.mark.parametrize("flag", ["--backfill-verify", "--backfill-verify-content"])
async def test_console_verification_prints_its_table_and_exits_1_on_differences(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str, flag: str
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(109), 20))
    assert (await cli(backfill_args(), env)).status == 0
    bucket = cache_bucket(CacheType.CAS, bucket_prefix)
    first = sorted(await object_sizes(s3_client, bucket))[0]
    await s3_client.delete_object(Bucket=bucket, Key=first)

    run = await cli(backfill_args(flag, json_logs=False), env)

    assert run.status == 1, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].split() == [
        *("cache", "status", "checked", "ok", "missing", "mismatched", "extra", "rows/s")
    ], run.stdout
    assert [row[:-1] for row in table_rows(run.stdout)] == [
        ["cas", "differences", "10", "9", "1", "0", "0"],
        ["total", "differences", "10", "9", "1", "0", "0"],
    ], run.stdout
    assert lines[-1].startswith("elapsed "), run.stdout
    assert "Traceback" not in run.stderr
    last = run.stderr_lines[-1]
    assert "verification found differences" in last
    assert "--backfill-repair" in last


async def test_duplicate_cache_types_are_collapsed_into_one_run_of_that_cache(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(107), 20))

    run = await cli(backfill_args(cache_types="cas,cas, cas"), env)

    assert run.status == 0, run.stderr
    [starting] = run.named("starting backfill for all cache types")
    assert starting["cache_types"] == ["cas"]
    assert [event["cache_type"] for event in run.named("starting backfill")] == ["cas"]
    assert [event["cache_type"] for event in run.named("completed backfill")] == ["cas"]
    summaries = [event["cache_type"] for event in run.named("backfill summary")]
    assert summaries == ["cas", "total"]
    assert run.summary()["uploaded"] == 10
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )


# --------------------------------------------------------------------------------------------
# The cutoff "now": the database's clock when the run starts; the run logs it, copies the rows
# below it and saves its progress under it, so the logged instant passed back resumes that record
# while another "now" starts a new one.

RESOLVED = "backfill cutoff 'now' resolved by the database clock"


async def database_now(db: LayerDb) -> datetime:
    value = await db.pool.fetchval("SELECT clock_timestamp()")
    assert isinstance(value, datetime)
    return value


async def test_now_is_the_database_clock_logged_copied_below_and_resumable(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(303)
    started = await database_now(layer_db)
    past = [SeedRow(random_key(rng), rng.randbytes(64), started - timedelta(minutes=5))]
    past += [
        SeedRow(random_key(rng), rng.randbytes(64), started - timedelta(seconds=i))
        for i in range(9)
    ]
    future = SeedRow(random_key(rng), b"written after the cut-over", started + timedelta(hours=1))
    await insert_rows(layer_db.pool, CacheType.CAS, [*past, future])

    first = await cli(backfill_args(cutoff="now"), env)

    assert first.status == 0, first.stderr
    [resolved] = first.named(RESOLVED)
    cutoff = parse_logged_timestamp(resolved["cutoff_timestamp"])
    assert started < cutoff < await database_now(layer_db)
    assert (
        resolved["resume_with"] == f"--backfill-cutoff-timestamp '{resolved['cutoff_timestamp']}'"
    )
    assert {event["cutoff_timestamp"] for event in first.named("starting backfill")} == {
        resolved["cutoff_timestamp"]
    }
    stored = await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS, cutoff
    )
    assert len(stored) == len(past)
    assert first.summary()["uploaded"] == len(past)

    # The logged instant resumes the same saved record: complete, nothing walked again.
    resumed = await cli(backfill_args(cutoff=resolved["cutoff_timestamp"]), env)

    assert resumed.status == 0, resumed.stderr
    assert resumed.named(RESOLVED) == []
    assert (resumed.summary()["uploaded"], resumed.summary()["processed"]) == (0, 0)

    # Another "now" (here sdf's env name) is a new cutoff: a new record, a walk over every row
    # present (skipped by size), and the row written since is copied.
    late = SeedRow(random_key(rng), b"written since", await database_now(layer_db))
    await insert_rows(layer_db.pool, CacheType.CAS, [late])
    no_cutoff_flag = ["--migration-mode", "backfillLayerCache", "--log-json"]
    again = await cli(
        [*no_cutoff_flag, "--backfill-cache-types", "cas"],
        env | {"SI_SDF__BACKFILL_CUTOFF_TIMESTAMP": "now"},
    )

    assert again.status == 0, again.stderr
    [later] = again.named(RESOLVED)
    later_cutoff = parse_logged_timestamp(later["cutoff_timestamp"])
    assert later_cutoff > late.created_at
    total = again.summary()
    assert (total["uploaded"], total["skipped"]) == (1, len(past))
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS, later_cutoff
    )


# --------------------------------------------------------------------------------------------
# 4. Invalid input: exit 2, one line naming the problem, nothing written

CUTOFF_FLAG = ("--backfill-cutoff-timestamp", CUTOFF_RFC3339)
CAS_FLAG = ("--backfill-cache-types", "cas")
MODE_FLAG = ("--migration-mode", "backfillLayerCache")


@dataclass(frozen=True)
class BadInput:
    """Flags and env that must be refused, and what the refusal must name."""

    args: tuple[str, ...]
    names: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def in_formats(cases: Mapping[str, object], console: Collection[str]) -> list[Any]:
    """Each case with JSON logs, and those named in ``console`` also with console logs.

    The rendering is one code path for every error; the console variants cover each kind of
    refusal (argparse, settings, backfill options, storage, preflight) once.
    """
    return [
        pytest.param(case, output, id=f"{case_id}-{output}")
        for case_id, case in cases.items()
        for output in (("json", "console") if case_id in console else ("json",))
    ]


BAD_INPUTS: dict[str, BadInput] = {
    "missing-cutoff": BadInput(
        (*MODE_FLAG, *CAS_FLAG), ("--backfill-cutoff-timestamp", "required")
    ),
    "unparsable-cutoff": BadInput(
        (*MODE_FLAG, "--backfill-cutoff-timestamp", "yesterday", *CAS_FLAG),
        ("--backfill-cutoff-timestamp", "'yesterday'"),
    ),
    "empty-cache-list": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, "--backfill-cache-types", " , "), ("--backfill-cache-types",)
    ),
    "unknown-cache-type": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, "--backfill-cache-types", "cas,snapshots"),
        ("--backfill-cache-types", "'snapshots'"),
    ),
    "non-backfillable-func-run": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, "--backfill-cache-types", "func_run"),
        ("--backfill-cache-types", "'func_run'", "not backfillable"),
    ),
    "all-is-not-a-cache-type": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, "--backfill-cache-types", "all"),
        ("--backfill-cache-types", "'all'"),
    ),
    "key-batch-size-zero": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-key-batch-size", "0"),
        ("--backfill-key-batch-size",),
    ),
    "max-concurrent-uploads-zero": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-max-concurrent-uploads", "0"),
        ("--backfill-max-concurrent-uploads",),
    ),
    "max-uploads-per-second-zero": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-max-uploads-per-second", "0"),
        ("--backfill-max-uploads-per-second", "SI_BACKFILL_MAX_UPLOADS_PER_SECOND"),
    ),
    "max-bytes-per-second-not-a-size": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG),
        ("--backfill-max-bytes-per-second", "'fast'", "not a byte size"),
        (("SI_BACKFILL_MAX_BYTES_PER_SECOND", "fast"),),
    ),
    "persister-mode-postgres-only": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG),
        ("SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE", "PostgresOnly"),
        (("SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE", "PostgresOnly"),),
    ),
    "invalid-persister-mode": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG),
        ("SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE",),
        (("SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE", "DualWrites"),),
    ),
    "unknown-nested-setting": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG),
        ("unknown setting", PG + "HOSTNAM"),
        ((PG + "HOSTNAM", "x"),),
    ),
    "unknown-top-level-setting": BadInput(
        (*CUTOFF_FLAG, *CAS_FLAG),
        ("unknown setting", "SI_SDF__MIGRATON_MODE"),
        (("SI_SDF__MIGRATION_MODE", "backfillLayerCache"), ("SI_SDF__MIGRATON_MODE", "x")),
    ),
    "unknown-flag": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-no-such-option"),
        ("--backfill-no-such-option",),
    ),
    # issue 21: what an operator met first
    "sdf-key-generation-flag": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--generate-symmetric-key-path", "/tmp/sdf.key"),
        ("--generate-symmetric-key-path", "generates no keys", "run sdf"),
    ),
    "sdf-flag-bad-port": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--pg-port", "fivefourthreetwo"),
        ("--pg-port", "port number"),
    ),
    "endpoint-without-scheme": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG),
        (STORAGE + "ENDPOINT", "https://s3.us-east-1.amazonaws.com"),
        ((STORAGE + "ENDPOINT", "s3.us-east-1.amazonaws.com"),),
    ),
    "server-endpoint-without-scheme": BadInput(
        ("--migration-mode", "skip"),
        (STORAGE + "ENDPOINT", "https://s3.us-east-1.amazonaws.com"),
        ((STORAGE + "ENDPOINT", "s3.us-east-1.amazonaws.com"),),
    ),
    "backfill-flag-without-mode": BadInput(
        ("--backfill-dry-run",),
        ("--backfill-dry-run", "did you mean --migration-mode backfillLayerCache"),
    ),
    "backfill-flag-with-run-mode": BadInput(
        ("--migration-mode", "run", "--backfill-verify"),
        ("--backfill-verify", "run", "did you mean --migration-mode backfillLayerCache"),
    ),
    "verify-with-dry-run": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-verify", "--backfill-dry-run"),
        ("--backfill-dry-run", "--backfill-verify"),
    ),
    "colours-forced-and-refused": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--no-color", "--force-color"),
        ("--force-color", "--no-color"),
    ),
    "repair-with-verify": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-repair", "--backfill-verify"),
        ("--backfill-repair", "--backfill-verify"),
    ),
    "report-without-a-comparison": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-verify-report", "differences.jsonl"),
        ("--backfill-verify-report", "--backfill-repair"),
    ),
    "report-in-a-missing-directory": BadInput(
        (
            *(*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-verify"),
            *("--backfill-verify-report", "/nonexistent/si/differences.jsonl"),
        ),
        ("--backfill-verify-report", "/nonexistent/si"),
    ),
    "byte-size-without-a-number": BadInput(
        (*MODE_FLAG, *CUTOFF_FLAG, *CAS_FLAG, "--backfill-max-inflight-bytes", "lots"),
        ("--backfill-max-inflight-bytes", "64MiB"),
    ),
}
BAD_INPUTS_WITH_CONSOLE = {
    "missing-cutoff",
    "persister-mode-postgres-only",
    "unknown-nested-setting",
    "unknown-flag",
    "sdf-key-generation-flag",
    "backfill-flag-without-mode",
}


def absent_servers_env(write_queue_dir: Path) -> dict[str, str]:
    """A complete configuration whose Postgres and S3 are not there: a run that connected before
    validating its input would exit 3 (cannot reach), not 2."""
    return {
        "SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE": "DualWrite",
        PG + "HOSTNAME": "127.0.0.1",
        PG + "PORT": str(free_port()),
        PG + "USER": "si",
        PG + "PASSWORD": "unused",
        PG + "DBNAME": "absent",
        PG + "SSLMODE": "disable",
        STORAGE + "ENDPOINT": f"http://127.0.0.1:{free_port()}",
        STORAGE + "REGION": "us-east-1",
        STORAGE + "BUCKET_PREFIX": "absent",
        S3_ACCESS_KEY: "unused",
        S3_SECRET_KEY: "unused",
        WRITE_QUEUE_DIR_ENV: str(write_queue_dir),
    }


@pytest.mark.parametrize(("bad", "output"), in_formats(BAD_INPUTS, BAD_INPUTS_WITH_CONSOLE))
def test_invalid_input_exits_2_with_one_line_naming_it_and_writes_nothing(
    bad: BadInput,
    output: OutputFormat,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # In this process through main(argv): input is validated before anything is opened, which
    # the absent servers prove (an attempt to connect would exit 3).
    run = run_cli_in_process(
        with_output(bad.args, output),
        absent_servers_env(tmp_path) | dict(bad.env),
        monkeypatch,
        capsys,
    )

    assert run.status == 2, run.stderr
    message = the_error_line(run, output)
    for name in bad.names:
        assert name in message, f"{name!r} not in {message!r}"
    assert run.stdout == ""
    assert list(tmp_path.iterdir()) == [], "the refused run wrote to the write queue directory"


async def test_invalid_input_refused_by_the_real_entrypoint_exits_2_and_writes_nothing(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    """The in-process cases above, end to end once: ``python -m services`` against real servers
    holding rows."""
    await seed_every_cache(layer_db, random.Random(109), 6)

    run = await cli((*BAD_INPUTS["missing-cutoff"].args, "--log-json"), env)

    assert run.status == 2, run.stderr
    message = the_error_line(run, "json")
    assert "--backfill-cutoff-timestamp" in message
    assert "required" in message
    assert run.stdout == ""
    assert await written_objects(s3_client, bucket_prefix) == {}


# --------------------------------------------------------------------------------------------
# 5. Environment not ready: exit 3, one actionable line, nothing written

Breakage = Callable[[LayerDb], Awaitable[dict[str, str]]]


async def absent_buckets(_db: LayerDb) -> dict[str, str]:
    return {STORAGE + "BUCKET_PREFIX": f"absent{uuid.uuid4().hex[:10]}"}


async def wrong_pg_password(_db: LayerDb) -> dict[str, str]:
    return {PG + "PASSWORD": "not-the-password"}


async def absent_database(_db: LayerDb) -> dict[str, str]:
    return {PG + "DBNAME": f"absent_{uuid.uuid4().hex[:10]}"}


async def unreachable_pg_port(_db: LayerDb) -> dict[str, str]:
    return {PG + "PORT": str(free_port())}


async def dropped_cas_table(db: LayerDb) -> dict[str, str]:
    await db.pool.execute("DROP TABLE cas")
    return {}


NOT_READY: dict[str, tuple[Breakage, tuple[str, ...]]] = {
    "buckets-missing": (absent_buckets, ("does not exist", "BUCKET_PREFIX")),
    "wrong-pg-password": (wrong_pg_password, ("rejected the login", "PASSWORD")),
    "database-missing": (absent_database, ("does not exist", "DBNAME")),
    "pg-unreachable": (unreachable_pg_port, ("cannot reach Postgres", "PORT")),
    "table-missing": (dropped_cas_table, ("table cas does not exist", "runAndQuit")),
}


@pytest.mark.parametrize(
    ("not_ready", "output"), in_formats(NOT_READY, {"buckets-missing", "wrong-pg-password"})
)
async def test_environment_not_ready_exits_3_with_one_actionable_line_and_writes_nothing(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    not_ready: tuple[Breakage, tuple[str, ...]],
    output: OutputFormat,
) -> None:
    breakage, names = not_ready
    await seed_every_cache(layer_db, random.Random(113), 6)
    broken_env = env | await breakage(layer_db)
    buckets_before = await s3_client.list_buckets()

    run = await cli(
        with_output(backfill_args(cache_types="workspace_snapshot,cas,change_batch"), output),
        broken_env,
    )

    assert run.status == 3, run.stderr
    message = the_error_line(run, output)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert run.stdout == ""
    assert await written_objects(s3_client, bucket_prefix) == {}
    buckets_after = await s3_client.list_buckets()
    assert buckets_after["Buckets"] == buckets_before["Buckets"], "the run created a bucket"


async def test_a_verbose_traceback_written_to_a_file_or_pipe_carries_no_colour_codes(
    tmp_path: Path,
) -> None:
    # stderr is a pipe here, as it is for ``-v 2> run.log``: console logs, uncoloured.
    run = await cli(
        ["--migration-mode", "runAndQuit", "-v"], absent_servers_env(tmp_path / "queue")
    )

    assert run.status == 3, run.stderr
    assert "cannot reach Postgres" in run.stderr
    assert "Traceback" in run.stderr, "-v must add the traceback"
    assert "\x1b[" not in run.stderr, run.stderr[:2000]


@pytest.mark.parametrize(
    ("credential", "code"),
    [(S3_SECRET_KEY, "SignatureDoesNotMatch"), (S3_ACCESS_KEY, "InvalidAccessKeyId")],
    ids=["wrong-secret-key", "unknown-access-key"],
)
async def test_rejected_s3_credentials_exit_3_naming_the_credential_and_write_nothing(
    layer_db: LayerDb,
    verifying_env: dict[str, str],
    verifying_s3_client: S3Client,
    verifying_bucket_prefix: str,
    credential: str,
    code: str,
) -> None:
    # SeaweedFS, because it checks signatures (moto accepts any key and secret).
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(127), 10))

    run = await cli(backfill_args(), verifying_env | {credential: "wrong-" + uuid.uuid4().hex})

    assert run.status == 3, run.stderr
    message = the_error_line(run, "json")
    assert f"rejected the credentials ({code})" in message
    assert "ACCESS_KEY" in message
    assert "SECRET_KEY" in message
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == {}


# --------------------------------------------------------------------------------------------
# 6. SIGTERM / SIGINT mid-run, then resume

SIGNAL_ROWS_TOTAL = 3000
SIGNAL_ROWS_BELOW = 600
SIGNAL_RUN_FLAGS = (
    *("--backfill-max-concurrent-uploads", "2"),
    *("--backfill-checkpoint-interval-secs", "0.2"),
    *("--backfill-key-batch-size", "50"),
)


@dataclass(frozen=True)
class Interruption:
    """How a run is stopped and then resumed."""

    signum: signal.Signals
    order: str  # --backfill-order
    resume: Literal["logged-checkpoint", "same-arguments"]

    @property
    def expected_status(self) -> int:
        return 128 + int(self.signum)


INTERRUPTIONS = [
    pytest.param(Interruption(signal.SIGTERM, "key", "logged-checkpoint"), id="SIGTERM"),
    pytest.param(Interruption(signal.SIGINT, "key", "logged-checkpoint"), id="SIGINT"),
    pytest.param(
        Interruption(signal.SIGTERM, "newest-first", "logged-checkpoint"),
        id="SIGTERM-newest-first",
    ),
    pytest.param(
        Interruption(signal.SIGINT, "key", "same-arguments"), id="SIGINT-rerun-same-arguments"
    ),
]


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
async def test_signal_mid_run_drains_logs_a_checkpoint_and_resuming_loses_nothing(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    interruption: Interruption,
) -> None:
    rng = random.Random(131)
    # 3,000 rows in groups of 30 sharing one created_at (so 50-row pages end inside a group),
    # 600 of them below the cutoff: copying is bounded by moto's ~200 PUTs/s.
    rows = [
        SeedRow(
            random_key(rng, rng.choice((32, 64))),
            rng.randbytes(rng.randint(1, 512)),
            CUTOFF + timedelta(milliseconds=index // 30 - SIGNAL_ROWS_BELOW // 30),
        )
        for index in range(SIGNAL_ROWS_TOTAL)
    ]
    await insert_rows(layer_db.pool, CacheType.CAS, rows)
    below_cutoff = await rows_below(layer_db.pool, CacheType.CAS, CUTOFF)
    assert len(below_cutoff) == SIGNAL_ROWS_BELOW
    expected = expected_objects(below_cutoff)
    args = backfill_args(*SIGNAL_RUN_FLAGS, "--backfill-order", interruption.order)

    # Two pages done, so a position has certainly been saved and logged.
    interrupted = await interrupt_backfill(args, env, interruption.signum, after_rows=100)

    assert interrupted.status == interruption.expected_status, interrupted.stderr
    [graceful] = interrupted.named("backfill shutting down gracefully")
    assert graceful["cache_type"] == "cas"
    checkpoint_text = graceful["checkpoint_timestamp"]
    checkpoint = parse_logged_timestamp(checkpoint_text)
    assert checkpoint <= CUTOFF
    if interruption.order == "newest-first":
        assert checkpoint < CUTOFF, "newest first, the checkpoint must move below the cutoff"
    assert "--backfill-cutoff-timestamp" in graceful["resume_with"]
    assert checkpoint_text in graceful["resume_with"]
    assert interrupted.named("completed backfill") == []
    assert interrupted.summary()["status"] == "interrupted"
    stored = await object_sizes(s3_client, cache_bucket(CacheType.CAS, bucket_prefix))
    assert len(stored) < len(expected), "the run finished before the signal: nothing to resume"
    assert sorted(stored.keys() - expected.keys()) == [], "objects that are not rows below cutoff"
    assert {key: len(expected[key]) for key in stored} == stored, "objects of the wrong size"
    # The checkpoint's promise: every row at or after it (and below the cutoff) is in S3.
    done_by_checkpoint = (
        expected.keys()
        - expected_objects(await rows_below(layer_db.pool, CacheType.CAS, checkpoint)).keys()
    )
    missing = done_by_checkpoint - stored.keys()
    assert not missing, (
        f"{len(missing)} rows with created_at in [checkpoint {checkpoint_text}, cutoff) are not in "
        f"S3 ({len(stored)} objects stored): resuming from this checkpoint would never copy them"
    )

    if interruption.resume == "logged-checkpoint":
        resume_args = backfill_args(
            *("--backfill-max-concurrent-uploads", "16", "--backfill-key-batch-size", "500"),
            *("--backfill-order", interruption.order),
            cutoff=checkpoint_text,
        )
    else:
        resume_args = args
    resumed = await cli(resume_args, env)

    assert resumed.status == 0, resumed.stderr
    interrupted.assert_log_vocabulary()
    resumed.assert_log_vocabulary()
    assert [event["cache_type"] for event in resumed.named("completed backfill")] == ["cas"]
    assert resumed.summary()["uploaded"] == len(expected) - len(stored)
    if interruption.resume == "same-arguments":
        assert resumed.named("resuming from saved progress"), "the re-run started over"
        assert resumed.summary()["processed"] < len(expected), "the re-run started over"
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )


# --------------------------------------------------------------------------------------------
# 7. Secrets never reach the output

PG_CANARY = "pg-canary-" + uuid.uuid4().hex
S3_CANARY = "s3-canary-" + uuid.uuid4().hex


async def pg_login_rejected(_db: LayerDb) -> dict[str, str]:
    return {PG + "PASSWORD": PG_CANARY, S3_SECRET_KEY: S3_CANARY}


async def s3_bucket_missing(_db: LayerDb) -> dict[str, str]:
    return {S3_SECRET_KEY: S3_CANARY, STORAGE + "BUCKET_PREFIX": f"absent{uuid.uuid4().hex[:8]}"}


async def s3_secret_only(_db: LayerDb) -> dict[str, str]:
    return {S3_SECRET_KEY: S3_CANARY}


def assert_no_canary(run: CliRun) -> None:
    for stream, text in (("stdout", run.stdout), ("stderr", run.stderr)):
        for canary in (PG_CANARY, S3_CANARY):
            where = text.find(canary)
            assert where < 0, (
                f"a secret was written to {stream}: …{text[max(0, where - 300) : where + 80]}…"
            )


@OUTPUT_FORMATS
@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param(pg_login_rejected, id="pg-login-rejected"),
        pytest.param(s3_bucket_missing, id="s3-bucket-missing"),
        pytest.param(s3_secret_only, id="run-with-s3-canary"),
    ],
)
async def test_passwords_and_secret_keys_never_appear_in_debug_output(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    secrets: Breakage,
    output: OutputFormat,
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(137), 6))
    canary_env = env | await secrets(layer_db)
    # Only moto accepts the canary as a secret key; a real server rejects it (exit 3).
    succeeds = secrets is s3_secret_only and s3_server.endpoint.kind == "moto"

    run = await cli(with_output(backfill_args("-v"), output), canary_env)

    assert run.status == (0 if succeeds else 3), run.stderr
    assert_no_canary(run)


async def test_help_does_not_show_secret_settings_from_the_environment(
    env: dict[str, str],
) -> None:
    canary_env = env | {PG + "PASSWORD": PG_CANARY, S3_SECRET_KEY: S3_CANARY}

    run = await cli(["--help"], canary_env)

    assert run.status == 0, run.stderr
    assert "--backfill-cutoff-timestamp" in run.stdout
    assert_no_canary(run)


def test_cli_helpers_reject_non_json_lines() -> None:
    """The JSON assertions above would be vacuous if a console line parsed as an event."""
    run = CliRun(0, "", "2026-01-13T17:30:26Z [info     ] hello\n")
    with pytest.raises(pytest.fail.Exception):
        _ = run.events


# --------------------------------------------------------------------------------------------
# Sharding: K processes side by side, one Postgres, one S3


async def test_shard_processes_side_by_side_copy_every_row_exactly_once(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await insert_rows(layer_db.pool, CacheType.CAS, rows_around_cutoff(random.Random(131), 600))
    # A key far shorter than a content hash must land in exactly one shard too.
    await insert_rows(layer_db.pool, CacheType.CAS, [SeedRow("a", b"short", CUTOFF - timedelta(1))])
    shard_env = env | {"SI_BACKFILL_SHARD_COUNT": "3"}
    # Each way a pod can learn its shard: the flag, the SI_ variable, Kubernetes' index.
    shards = [
        (backfill_args("--backfill-shard-index", "0", "--backfill-key-batch-size", "40"), {}),
        (backfill_args("--backfill-key-batch-size", "40"), {"SI_BACKFILL_SHARD_INDEX": "1"}),
        (backfill_args("--backfill-key-batch-size", "40"), {"JOB_COMPLETION_INDEX": "2"}),
    ]

    runs = await asyncio.gather(*(cli(args, shard_env | extra) for args, extra in shards))

    assert [run.status for run in runs] == [0, 0, 0], [run.stderr[-500:] for run in runs]
    uploaded = [run.summary()["uploaded"] for run in runs]
    stored = await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )
    assert sum(uploaded) == len(stored), f"an object was written twice: {uploaded}"
    assert all(count > 0 for count in uploaded), uploaded
    records = await layer_db.pool.fetch(
        "SELECT shard, completed FROM layer_cache_backfill_progress ORDER BY shard"
    )
    assert [(r["shard"], r["completed"]) for r in records] == [
        ("0-of-3", True),
        ("1-of-3", True),
        ("2-of-3", True),
    ]
