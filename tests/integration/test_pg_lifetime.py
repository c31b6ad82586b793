"""Connections retired at ``pool_total_connection_lifetime_secs``, against the real Postgres.

The pool the backfill and the server open (``open_pg_pool``) runs queries one at a time for
about 2.5 s with a lifetime of 1 s: the backend serving them changes about once a second
(``pg_backend_pid()``; with the default lifetime one backend serves them all), no query fails, a
query that runs across its connection's end of life completes on that connection, and the
retired backends are gone from the server rather than left open beside their successors.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid

import asyncpg

from services.context import open_pg_pool
from services.settings import PgPoolConfig
from tests.conftest import LayerDb

RUN_S = 2.5
LIFETIME_S = 1.0


def pool_config(db: LayerDb, application_name: str, **fields: object) -> PgPoolConfig:
    endpoint = db.endpoint
    return PgPoolConfig.model_validate(
        {
            "hostname": endpoint.host,
            "port": endpoint.port,
            "user": endpoint.user,
            "password": endpoint.password,
            "dbname": db.dbname,
            "sslmode": "disable",
            "application_name": application_name,
            "pool_max_size": 3,
            **fields,
        }
    )


async def backends_named(db: LayerDb, application_name: str) -> set[int]:
    """The server's backends of one application, seen from a connection of another."""
    admin = await asyncpg.connect(db.endpoint.dsn(dbname=db.dbname, superuser=True))
    try:
        records = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", application_name
        )
    finally:
        await admin.close()
    return {record["pid"] for record in records}


async def test_connections_are_replaced_after_their_lifetime_without_failing_a_query(
    layer_db: LayerDb,
) -> None:
    name = f"lifetime-{uuid.uuid4().hex[:8]}"
    pool = await open_pg_pool(
        pool_config(layer_db, name, pool_total_connection_lifetime_secs=LIFETIME_S)
    )
    pids: list[int] = []
    try:
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:  # one at a time: one connection serves them all
            pids.append(await pool.fetchval("SELECT pg_backend_pid()"))
            await asyncio.sleep(0.05)
        # A query still running when its connection reaches the lifetime finishes on it; the
        # connection is retired when it comes back.
        spanning = await pool.fetchrow(
            "SELECT pg_backend_pid() AS before, pg_sleep($1), pg_backend_pid() AS after",
            LIFETIME_S + 0.2,
        )
        next_pid = await pool.fetchval("SELECT pg_backend_pid()")
        await asyncio.sleep(0.2)  # the server notices the goodbyes
        open_now = await backends_named(layer_db, name)
    finally:
        await pool.close()

    assert spanning is not None
    assert spanning["before"] == spanning["after"]
    assert next_pid != spanning["before"]
    changes = sum(1 for earlier, later in itertools.pairwise(pids) if earlier != later)
    assert 1 <= changes <= RUN_S / LIFETIME_S + 1, pids  # a new connection per lifetime
    retired = (set(pids) | {spanning["before"]}) - {next_pid}
    assert next_pid in open_now
    assert retired & open_now == set(), (retired, open_now)  # closed, not left beside the new


async def test_the_default_lifetime_keeps_one_connection_for_the_whole_run(
    layer_db: LayerDb,
) -> None:
    name = f"lifetime-{uuid.uuid4().hex[:8]}"
    pool = await open_pg_pool(pool_config(layer_db, name))
    try:
        pids = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(20)}
    finally:
        await pool.close()
    assert len(pids) == 1
