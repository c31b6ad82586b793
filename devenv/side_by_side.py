"""``python -m devenv.side_by_side REF``: the backfill of commit ``REF`` and of this checkout, run
side by side over the same data, to show a restructuring changed no behaviour.

One local PostgreSQL and S3 server (``start_postgres``, ``start_s3``), the schema, seeded rows
in every backfillable cache. Each scenario puts the servers in one state, runs ``REF``'s CLI
(its tree from ``git archive``, on this virtualenv), puts them in the same state again, runs
this checkout's, and compares the two runs' outcomes (``RunOutcome``): exit status, the events
logged (name, level and field names, counted; the periodic ``backfill progress`` only by its
fields), and every field of the deterministic events (summaries, completions, differences,
resumes) except those that measure time. Scenarios: a copy in key order and newest first, a
copy of a complete walk, verification by size and by content and a repair of a damaged bucket
set, a dry run, and a run killed with SIGKILL then resumed (the killed run's S3 objects and
saved progress are restored for the other side, so both resume from one state). Prints one
line per scenario and exits 1 on the first difference, naming it (``--keep-going``: after all
of them). Stops the servers and
removes the old tree on the way out, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from devenv.environment import BUCKET_PREFIX, service_environment
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3Endpoint, create_buckets, start_s3
from devenv.seed import seed
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name, object_key
from migrations_mode.config import format_checkpoint
from migrations_mode.progress_store import PROGRESS_TABLE, S3_PROGRESS_PREFIX

REPO_ROOT = Path(__file__).resolve().parent.parent
CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)
# Fields that measure time or the moment's throughput: they differ between any two runs.
VOLATILE_FIELDS = frozenset(
    {
        "timestamp",
        "elapsed_s",
        "duration_s",
        "rate",
        "rows_per_s",
        "bytes_per_s",
        "eta",
        "eta_s",
        "in_flight",
        "upload_limit",
        "upload_concurrency_limit",
        "active_uploads",
        "waited_s",
        "rate_limit_wait_s",
        "pid",
        # the dry run's measurements and what is derived from them
        "request_latency_ms",
        "client_cpu_ms_per_request",
        "estimated_s",
        "bound_by",
    }
)
# Events logged on a timer: compared by their fields only, not by how often they appear.
PERIODIC_EVENTS = frozenset({"backfill progress", "backfill checkpoint"})
# Events whose every other field must be equal.
COMPARED_EVENTS = frozenset(
    {
        "backfill summary",
        "completed backfill",
        "completed backfill for all cache types",
        "resuming from saved progress",
        "backfill difference",
        "verification found differences",
        "dry run",
        "backfill dry run",
    }
)

Objects = dict[str, dict[str, bytes]]  # bucket -> key -> bytes
Snapshot = tuple[Objects, list[dict[str, Any]]]


@dataclass(frozen=True)
class RunOutcome:
    """What two runs of a scenario must have in common."""

    status: int
    events: Counter[tuple[str, str, tuple[str, ...]]]
    periodic: frozenset[tuple[str, tuple[str, ...]]]
    compared: tuple[str, ...]  # JSON of each compared event, volatile fields dropped, sorted


def outcome_of(status: int, lines: Sequence[str]) -> RunOutcome:
    """A run's outcome from its exit status and its output's JSON log lines."""
    events: Counter[tuple[str, str, tuple[str, ...]]] = Counter()
    periodic: set[tuple[str, tuple[str, ...]]] = set()
    compared: list[str] = []
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict) or "event" not in event:
            continue
        name = str(event["event"])
        fields = tuple(sorted(key for key in event if key not in ("event", "timestamp")))
        if name in PERIODIC_EVENTS:
            periodic.add((name, fields))
            continue
        events[(name, str(event.get("level", "")), fields)] += 1
        if name in COMPARED_EVENTS:
            kept = {key: value for key, value in event.items() if key not in VOLATILE_FIELDS}
            compared.append(json.dumps(kept, sort_keys=True))
    return RunOutcome(status, events, frozenset(periodic), tuple(sorted(compared)))


def differences(old: RunOutcome, new: RunOutcome) -> list[str]:
    """What differs between two outcomes, one line each (none: the same behaviour)."""
    found = []
    if old.status != new.status:
        found.append(f"exit status {old.status} != {new.status}")
    for key in sorted(set(old.events) | set(new.events)):
        if old.events[key] != new.events[key]:
            found.append(f"event {key}: {old.events[key]} x old, {new.events[key]} x new")
    for periodic in sorted(old.periodic ^ new.periodic):
        side = "old" if periodic in old.periodic else "new"
        found.append(f"periodic event {periodic} only in {side}")
    for line in sorted(set(old.compared) ^ set(new.compared)):
        found.append(f"{'old' if line in old.compared else 'new'} only: {line}")
    return found


class Servers:
    """The local servers and how to put them in a scenario's state."""

    def __init__(self, pg: PostgresEndpoint, s3: S3Endpoint) -> None:
        self.pg, self.s3 = pg, s3
        self.env = service_environment(pg, s3)
        import boto3  # type: ignore[import-untyped, unused-ignore]
        from botocore.config import Config

        self.client = boto3.client(
            "s3", **s3.client_options(), config=Config(s3={"addressing_style": "path"})
        )
        self.buckets = [bucket_name(CACHE_SPECS[c].table, BUCKET_PREFIX) for c in CACHE_SPECS]

    def objects(self) -> Objects:
        """Every object of every bucket, with its bytes."""
        found: Objects = {}
        for bucket in self.buckets:
            found[bucket] = {}
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    body = self.client.get_object(Bucket=bucket, Key=item["Key"])["Body"]
                    found[bucket][item["Key"]] = body.read()
        return found

    def empty(self, *, keep_progress_table: bool = False) -> None:
        """No objects, no saved progress (the progress table dropped, or only emptied)."""
        for bucket, keys in self.objects().items():
            for key in keys:
                self.client.delete_object(Bucket=bucket, Key=key)
        if not keep_progress_table:
            asyncio.run(self._sql(f"DROP TABLE IF EXISTS {PROGRESS_TABLE}"))
        elif asyncio.run(self._progress_rows()):
            asyncio.run(self._sql(f"DELETE FROM {PROGRESS_TABLE}"))

    def snapshot(self) -> Snapshot:
        """The objects and the saved progress, to restore later."""
        return self.objects(), asyncio.run(self._progress_rows())

    def restore(self, snapshot: Snapshot) -> None:
        """Exactly ``snapshot``'s objects and saved progress."""
        objects, rows = snapshot
        self.empty(keep_progress_table=True)
        for bucket, keys in objects.items():
            for key, body in keys.items():
                self.client.put_object(Bucket=bucket, Key=key, Body=body)
        asyncio.run(self._restore_progress(rows))

    def damage(self) -> None:
        """Per cache: three objects gone, three with other bytes of the same size, three of
        another size, and one extra object no row has."""
        for bucket, keys in self.objects().items():
            chosen = sorted(keys)[:9]
            for index, key in enumerate(chosen):
                body = keys[key]
                if index < 3:
                    self.client.delete_object(Bucket=bucket, Key=key)
                elif index < 6:
                    flipped = bytes([body[0] ^ 0xFF]) + body[1:] if body else b"x"
                    self.client.put_object(Bucket=bucket, Key=key, Body=flipped)
                else:
                    self.client.put_object(Bucket=bucket, Key=key, Body=body + b"!")
            if keys:
                self.client.put_object(Bucket=bucket, Key=object_key("f" * 64), Body=b"extra")

    async def _sql(self, statement: str) -> None:
        connection = await asyncpg.connect(self.pg.dsn())
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    async def _progress_rows(self) -> list[dict[str, Any]]:
        connection = await asyncpg.connect(self.pg.dsn())
        try:
            exists = await connection.fetchval("SELECT to_regclass($1)", PROGRESS_TABLE)
            if exists is None:
                return []
            return [dict(row) for row in await connection.fetch(f"TABLE {PROGRESS_TABLE}")]
        finally:
            await connection.close()

    async def _restore_progress(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        connection = await asyncpg.connect(self.pg.dsn())
        try:
            # The CLI creates the table as it needs it; its layout is the one saved.
            definition = await connection.fetchval(
                "SELECT 1 FROM pg_class WHERE relname = $1", PROGRESS_TABLE
            )
            if definition is None:
                raise SystemExit("restore: the progress table should exist after a run")
            columns = list(rows[0])
            placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
            await connection.executemany(
                f"INSERT INTO {PROGRESS_TABLE} ({', '.join(columns)}) VALUES ({placeholders})",
                [tuple(row[column] for column in columns) for row in rows],
            )
        finally:
            await connection.close()


class Side:
    """One side's CLI: a source tree run on this virtualenv."""

    def __init__(self, name: str, tree: Path, servers: Servers) -> None:
        self.name, self.tree, self.servers = name, tree, servers

    def command(self, args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SI_", "OTEL_"))}
        env |= self.servers.env | {"PYTHONPATH": str(self.tree), "OTEL_METRICS_EXPORTER": "none"}
        return [sys.executable, "-m", "services", *args], env

    def run(self, args: Sequence[str]) -> RunOutcome:
        command, env = self.command(args)
        done = subprocess.run(
            command, env=env, cwd=self.tree, capture_output=True, text=True, timeout=600
        )
        return outcome_of(done.returncode, (done.stderr + done.stdout).splitlines())

    def run_and_kill(self, args: Sequence[str], after_processed: int) -> list[bytes]:
        """Run until a progress event reports ``after_processed`` rows, then SIGKILL; the last
        lines it logged."""
        command, env = self.command(args)
        process = subprocess.Popen(
            command, env=env, cwd=self.tree, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
        )
        assert process.stderr is not None
        deadline = time.monotonic() + 300
        tail: list[bytes] = []
        for raw in process.stderr:
            tail = [*tail[-19:], raw]
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "backfill progress" and (
                int(event.get("processed", 0)) >= after_processed
            ):
                break
            if time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)
        process.wait()
        return tail


def backfill(*extra: str) -> list[str]:
    """A backfill of every backfillable cache below ``CUTOFF`` with JSON logs."""
    return [
        "--migration-mode",
        "backfillLayerCache",
        "--log-json",
        "--backfill-cutoff-timestamp",
        format_checkpoint(CUTOFF),
        "--backfill-cache-types",
        ",".join(BACKFILLABLE_CACHE_TYPES),
        "--backfill-checkpoint-interval-secs",
        "1",
        *extra,
    ]


@dataclass(frozen=True)
class Scenario:
    name: str
    prepare: Callable[[Servers, Side], None]  # puts the servers in the scenario's state
    args: list[str]
    status: int = 0
    """The exit status both runs must have: two runs refused alike compare nothing."""


def _empty(servers: Servers, _side: Side) -> None:
    servers.empty()


def _copied(servers: Servers, new: Side) -> None:
    servers.empty()
    outcome = new.run(backfill())
    if outcome.status != 0:
        raise SystemExit("setting up a copied bucket set failed")


def _damaged(servers: Servers, new: Side) -> None:
    _copied(servers, new)
    servers.damage()


SCENARIOS = [
    Scenario("copy, key order", _empty, backfill()),
    Scenario("copy, newest first", _empty, backfill("--backfill-order", "newest-first")),
    Scenario("copy of a complete walk", _copied, backfill()),
    Scenario("copy over damage", _damaged, backfill("--backfill-restart")),
    Scenario("verify by size", _damaged, backfill("--backfill-verify"), status=1),
    Scenario("verify by content", _damaged, backfill("--backfill-verify-content"), status=1),
    Scenario("repair", _damaged, backfill("--backfill-repair")),
    Scenario("dry run", _damaged, backfill("--backfill-dry-run")),
]


def compare(name: str, old: RunOutcome, new: RunOutcome, status: int = 0) -> bool:
    """Print the pair's verdict; True when they behaved the same."""
    found = differences(old, new)
    if new.status != status:
        found.insert(0, f"exit status {new.status}, not the scenario's {status}")
    events = sum(new.events.values())
    if found:
        print(f"DIFFERENT  {name}:", *found[:20], sep="\n  ", flush=True)
        return False
    print(f"same       {name}: exit {new.status}, {events} events compared", flush=True)
    return True


def kill_and_resume(servers: Servers, old: Side, new: Side, after: int) -> bool:
    """Kill REF's run part-way, then resume both sides from the state it left."""
    # Pages of 50 rows: progress is saved a page at a time, so the kill finds some saved.
    limited = backfill(
        "--backfill-max-uploads-per-second", "200", "--backfill-key-batch-size", "50"
    )
    servers.empty()
    tail = old.run_and_kill(limited, after)
    killed = servers.snapshot()
    objects, rows = killed
    saved_in_s3 = any(
        key.startswith(S3_PROGRESS_PREFIX) for keys in objects.values() for key in keys
    )
    if not rows and not saved_in_s3:
        logged = b"".join(tail).decode(errors="replace")
        raise SystemExit(f"the killed run saved no progress; its last lines:\n{logged}")
    resumed = backfill("--backfill-key-batch-size", "50")  # the same walk: its saved progress
    old_resumed = old.run(resumed)
    servers.restore(killed)
    new_resumed = new.run(resumed)
    return compare(f"resume after SIGKILL at {after} rows", old_resumed, new_resumed)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare this checkout with")
    parser.add_argument("--rows-per-cache", type=int, default=300)
    parser.add_argument("--kill-after", type=int, default=200, help="rows of one cache")
    parser.add_argument(
        "--only", default="", help="run the scenarios whose name holds this text (default: all)"
    )
    parser.add_argument(
        "--keep-going", action="store_true", help="run every scenario, then exit 1 if any differed"
    )
    options = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="si-side-by-side-") as work,
        start_postgres() as postgres,
        start_s3(kind="moto") as s3_server,
    ):
        old_tree = Path(work) / "old"
        old_tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", options.ref], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
        servers = Servers(postgres.endpoint, s3_server.endpoint)
        create_buckets(servers.s3, servers.buckets)
        old, new = Side("old", old_tree, servers), Side("new", REPO_ROOT, servers)
        schema = new.run(["--migration-mode", "runAndQuit"])
        if schema.status != 0:
            raise SystemExit("creating the schema failed")
        asyncio.run(_seed(postgres.endpoint, options.rows_per_cache))
        print(f"old: {options.ref}  new: this checkout  ({options.rows_per_cache} rows a cache)")
        failed = False
        for scenario in SCENARIOS:
            if options.only not in scenario.name:
                continue
            scenario.prepare(servers, new)
            old_outcome = old.run(scenario.args)
            scenario.prepare(servers, new)
            same = compare(scenario.name, old_outcome, new.run(scenario.args), scenario.status)
            if not same and not options.keep_going:
                raise SystemExit(1)
            failed = failed or not same
        if options.only in "resume after SIGKILL":
            failed = not kill_and_resume(servers, old, new, options.kill_after) or failed
        if failed:
            raise SystemExit(1)


async def _seed(pg: PostgresEndpoint, rows_per_cache: int) -> None:
    pool = await asyncpg.create_pool(pg.dsn(), min_size=1, max_size=4)
    try:
        for cache_type in BACKFILLABLE_CACHE_TYPES:
            await seed(pool, CacheType(cache_type), rows_per_cache, cutoff=CUTOFF)
        await pool.execute("ANALYZE")
    finally:
        await pool.close()


if __name__ == "__main__":
    main()
