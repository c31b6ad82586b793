"""What every scenario shares: where the servers are, the product settings, and the meters.

The meters take before/after readings around a scenario's timed section: S3 requests sent (a
``before-send.s3`` handler, one per HTTP attempt), Postgres tuples, blocks and transactions (the
round-trip count, read once the scenario's connections are gone so their counters are flushed)
and ``getrusage`` CPU and peak RSS of the scenario's own process. Why each reading counts what it
claims: ``docs/bench.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import resource
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import asyncpg

from bench.cpu import CpuSpent
from devenv.postgres import PostgresEndpoint
from devenv.s3 import S3Endpoint
from services.settings import Settings, load_settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

    from bench.data import SeededDatabase

REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = (
    "layer_cache",
    "migrations_mode",
    "services",
    "layer_cache_server",
    "si_layer_cache",
    "devenv",
)
CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)
TABLE = "cas"
PROGRESS_TABLE = "layer_cache_backfill_progress"
# The statements asyncpg's pool runs on every release (``Connection.get_reset_query``).
POOL_RESET_STATEMENTS = (
    "SELECT pg_advisory_unlock_all()",
    "CLOSE ALL",
    "UNLISTEN *",
    "RESET ALL",
)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """The servers, database and bucket set one scenario runs against."""

    pg: PostgresEndpoint
    s3: S3Endpoint
    dbname: str
    bucket_prefix: str
    cutoff: datetime = CUTOFF
    statements: bool = False  # pg_stat_statements is loaded in the cluster
    s3_pid: int | None = None  # the S3 server's process, for its CPU time
    pg_pid: int | None = None  # the postmaster, for the cluster's CPU time

    def to_json(self) -> str:
        """The ``--target`` argument of ``python -m bench.scenarios``."""
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Target:
        """Read back ``to_json``."""
        data = json.loads(text)
        return cls(
            pg=PostgresEndpoint(**data["pg"]),
            s3=S3Endpoint(**data["s3"]),
            dbname=data["dbname"],
            bucket_prefix=data["bucket_prefix"],
            cutoff=datetime.fromisoformat(data["cutoff"]),
            statements=bool(data["statements"]),
            s3_pid=data.get("s3_pid"),
            pg_pid=data.get("pg_pid"),
        )

    def dsn(self, *, superuser: bool = False, dbname: str | None = None) -> str:
        """A DSN for the scenario's database (or ``dbname``)."""
        return self.pg.dsn(dbname=dbname or self.dbname, superuser=superuser)


def product_settings(target: Target, *, application_name: str) -> Settings:
    """The service settings an operator would give the job for these servers."""
    return load_settings(
        {
            "layer_db_config": {
                "persister_mode": "DualWrite",
                "pg_pool_config": {
                    "hostname": target.pg.host,
                    "port": target.pg.port,
                    "user": target.pg.user,
                    "password": target.pg.password,
                    "dbname": target.dbname,
                    "sslmode": "disable",
                    "application_name": application_name,
                },
                "object_storage_config": {
                    "endpoint": target.s3.url,
                    "region": target.s3.region,
                    "bucket_prefix": target.bucket_prefix,
                    "auth": {
                        "static_credentials": {
                            "access_key": target.s3.access_key,
                            "secret_key": target.s3.secret_key,
                        }
                    },
                },
            }
        }
    )


class S3RequestCounter:
    """Counts HTTP attempts per S3 operation on one client."""

    def __init__(self) -> None:
        self.by_operation: Counter[str] = Counter()

    def attach(self, client: S3Client) -> None:
        """Count every attempt this client sends from now on."""
        client.meta.events.register("before-send.s3", self._on_send)

    def _on_send(self, event_name: str = "", **_kwargs: Any) -> None:
        # Must return None: a non-None return value would be used as the HTTP response.
        self.by_operation[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def total(self) -> int:
        """Attempts of every operation."""
        return sum(self.by_operation.values())


@dataclass(frozen=True)
class PgCounters:
    """Cumulative Postgres counters for one database."""

    seq_tup_read: int = 0
    idx_tup_fetch: int = 0
    seq_scan: int = 0
    idx_scan: int = 0
    heap_blks: int = 0
    toast_blks: int = 0
    xacts: int = 0

    def minus(self, before: PgCounters) -> PgCounters:
        """The change since ``before``."""
        mine, theirs = asdict(self), asdict(before)
        return PgCounters(**{name: mine[name] - theirs[name] for name in mine})

    @property
    def tuples(self) -> int:
        """Rows read from tables: by sequential scans plus fetched through indexes."""
        return self.seq_tup_read + self.idx_tup_fetch


_TABLE_COUNTERS = """
    SELECT coalesce(sum(t.seq_tup_read), 0)::bigint, coalesce(sum(t.idx_tup_fetch), 0)::bigint,
           coalesce(sum(t.seq_scan), 0)::bigint, coalesce(sum(t.idx_scan), 0)::bigint,
           coalesce(sum(coalesce(io.heap_blks_read, 0) + coalesce(io.heap_blks_hit, 0)), 0),
           coalesce(sum(coalesce(io.toast_blks_read, 0) + coalesce(io.toast_blks_hit, 0)), 0)
    FROM pg_stat_user_tables t JOIN pg_statio_user_tables io USING (relid)
"""
_XACTS = "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1"


async def read_pg_counters(target: Target) -> PgCounters:
    """The database's counters now (table counters read inside it, transactions from outside,
    so reading them adds only one transaction to the database's own count)."""
    inside = await asyncpg.connect(target.dsn(superuser=True))
    try:
        row = await inside.fetchrow(_TABLE_COUNTERS)
    finally:
        await inside.close()
    outside = await asyncpg.connect(target.dsn(superuser=True, dbname="postgres"))
    try:
        xacts = await outside.fetchval(_XACTS, target.dbname)
    finally:
        await outside.close()
    assert row is not None
    seq_tup_read, idx_tup_fetch, seq_scan, idx_scan, heap_blks, toast_blks = map(int, row)
    return PgCounters(
        seq_tup_read=seq_tup_read,
        idx_tup_fetch=idx_tup_fetch,
        seq_scan=seq_scan,
        idx_scan=idx_scan,
        heap_blks=heap_blks,
        toast_blks=toast_blks,
        xacts=int(xacts or 0),
    )


async def wait_for_backends_gone(
    target: Target, application_name: str, *, timeout_s: float = 15.0
) -> None:
    """Wait until no backend of ``application_name`` remains (its stats are flushed by then)."""
    connection = await asyncpg.connect(target.dsn(superuser=True, dbname="postgres"))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            remaining = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
            if not remaining:
                return
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def reset_statements(target: Target) -> None:
    """Forget pg_stat_statements' counts (cluster-wide; scenarios run one at a time)."""
    if not target.statements:
        return
    connection = await asyncpg.connect(target.dsn(superuser=True, dbname="postgres"))
    try:
        await connection.execute("SELECT pg_stat_statements_reset()")
    finally:
        await connection.close()


@dataclass
class StatementStats:
    """What pg_stat_statements saw from the app role in the scenario's database."""

    calls: int = 0
    pool_reset_calls: int = 0
    top: list[dict[str, Any]] = field(default_factory=list)


async def read_statements(target: Target) -> StatementStats | None:
    """Statement calls by the app role since ``reset_statements`` (None when unavailable)."""
    if not target.statements:
        return None
    connection = await asyncpg.connect(target.dsn(superuser=True, dbname="postgres"))
    try:
        records = await connection.fetch(
            "SELECT s.query, s.calls, s.rows, s.total_exec_time"
            " FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
            " JOIN pg_roles r ON r.oid = s.userid"
            " WHERE d.datname = $1 AND r.rolname = $2 ORDER BY s.calls DESC",
            target.dbname,
            target.pg.user,
        )
    finally:
        await connection.close()
    stats = StatementStats()
    for record in records:
        query = " ".join(str(record["query"]).split())
        if query.rstrip(";") in POOL_RESET_STATEMENTS:
            stats.pool_reset_calls += int(record["calls"])
            continue
        stats.calls += int(record["calls"])
        if len(stats.top) < 8:
            stats.top.append(
                {
                    "query": query[:160],
                    "calls": int(record["calls"]),
                    "rows": int(record["rows"]),
                    "exec_ms": round(float(record["total_exec_time"]), 1),
                }
            )
    return stats


def code_fingerprint() -> str:
    """A digest of the product's source as it is on disk now: others edit it while a run goes,
    and each scenario process imports whatever is there when it starts."""
    digest = hashlib.sha1(usedforsecurity=False)
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def obstore_available() -> bool:
    """Whether the optional ``obstore`` package (a dev extra: the CPU reference) is installed."""
    return importlib.util.find_spec("obstore") is not None


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """This process's peak resident set size (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Result:
    """One scenario's measurements; ``summary()`` is the JSON line it prints."""

    scenario: str
    concurrency: int
    rows: int  # rows the scenario finished (copied, skipped or checked)
    rows_below_cutoff: int
    objects_uploaded: int
    bytes_uploaded: int
    seconds: float
    cpu_s: float
    peak_rss_mib: float
    s3_requests: dict[str, int] = field(default_factory=dict)
    pg: PgCounters | None = None
    statements: StatementStats | None = None
    started_at: float = 0.0  # time.monotonic() (system-wide clock), for combining shards
    finished_at: float = 0.0
    cpu_spent: CpuSpent | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The scenario's JSON line: headline numbers first, details after."""
        rows = max(self.rows, 1)
        seconds = self.seconds or float("inf")
        s3_total = sum(self.s3_requests.values())
        per_object = self.objects_uploaded if self.objects_uploaded else rows
        data: dict[str, Any] = {
            "scenario": self.scenario,
            "concurrency": self.concurrency,
            "rows": self.rows,
            "seconds": round(self.seconds, 3),
            "rows_per_s": round(self.rows / seconds, 1),
            "mib_per_s": round(self.bytes_uploaded / MIB / seconds, 2),
            "s3_requests_per_row": round(s3_total / rows, 4),
            "pg_tuples_per_row": round(self.pg.tuples / rows, 3) if self.pg else None,
            "pg_round_trips_per_row": round(self.pg.xacts / rows, 4) if self.pg else None,
            "cpu_ms_per_object": round(1000 * self.cpu_s / per_object, 3),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "rows_below_cutoff": self.rows_below_cutoff,
            "rows_missed": self.rows_below_cutoff - self.rows,
            "objects_uploaded": self.objects_uploaded,
            "bytes_uploaded": self.bytes_uploaded,
            "cpu_s": round(self.cpu_s, 3),
            "cpu_per": "object uploaded" if self.objects_uploaded else "row checked",
            "s3_requests": dict(sorted(self.s3_requests.items())),
            "pg": asdict(self.pg) if self.pg else None,
            "pg_queries_per_row": (
                round(self.statements.calls / rows, 4) if self.statements else None
            ),
            "pg_statements": asdict(self.statements) if self.statements else None,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        spent = self.cpu_spent
        if spent is not None:
            capacity = max(spent.wall * spent.cpus, 1e-9)
            data |= {
                "s3_server_cpu_ms_per_request": round(1000 * spent.s3 / max(s3_total, 1), 3),
                "pg_server_cpu_ms_per_row": round(1000 * spent.pg / rows, 3),
                "machine_busy_pct": round(100 * spent.machine / capacity, 1),
                "other_load_pct": round(100 * spent.other_share, 1),
                "cpu_seconds": {
                    "client": round(spent.client, 3),
                    "s3_server": round(spent.s3, 3),
                    "postgres": round(spent.pg, 3),
                    "other": round(spent.other, 3),
                    "machine": round(spent.machine, 3),
                },
            }
        data.update(self.extra)
        return data


def comma_ints(text: str) -> list[int]:
    """``"64,8,8, 16"`` -> ``[8, 16, 64]``: the distinct whole numbers of a flag, ascending."""
    return sorted({int(part) for part in text.split(",") if part.strip()})


class ScenarioRunner(Protocol):
    """What the latency, scale and rate-limit sections need of ``bench.runner.Runner``."""

    s3: S3Endpoint

    def new_prefix(self, label: str) -> str: ...
    def target(self, database: SeededDatabase, prefix: str) -> Target: ...
    def run(
        self,
        name: str,
        target: Target,
        *,
        concurrency: int,
        rows: int,
        extra_args: tuple[str, ...] = (),
        label: str | None = None,
    ) -> dict[str, Any]: ...
