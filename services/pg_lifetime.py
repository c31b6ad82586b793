"""Connections retired at an age (upstream's ``pool_total_connection_lifetime_secs``, 20 h).

RDS Proxy closes a client connection after 24 hours; a run of a day or more must not lose one
under a query. asyncpg has no age limit, so the pool gets one through two documented hooks of
``asyncpg.create_pool``: every connection is an ``AgingConnection`` (``connection_class``),
which notes when it was opened, and the ``reset`` hook, run as a connection comes back to the
pool, closes one that has reached the lifetime (``lifetime_reached``) instead of resetting it.
A connection is therefore never closed under a query; the pool opens a fresh one when it next
needs one, through the same ``connect`` (and the same error mapping) as every other. A younger
connection gets what asyncpg's own reset does (its reset query). An idle connection is retired
the next time it comes back; asyncpg closes idle connections beyond the pool's floor after
``max_inactive_connection_lifetime`` anyway, and one the server or a proxy closed while idle is
replaced when it is next acquired.

Logs: ``postgres connection retired`` (debug) with ``age_s`` and the backend ``pid``.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger("services.pg_lifetime")

RETIRE_CLOSE_TIMEOUT_S = 5.0
"""How long a retired connection's goodbye (Terminate) may take before it is cut."""


def lifetime_reached(opened_at: float, now: float, lifetime_s: float) -> bool:
    """A connection opened at ``opened_at`` has lived ``lifetime_s`` by ``now`` (monotonic)."""
    return now - opened_at >= lifetime_s


class AgingConnection(asyncpg.Connection):
    """An asyncpg connection that knows when it was opened (``time.monotonic``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened_at = time.monotonic()


def lifetime_pool_arguments(lifetime_s: float) -> dict[str, Any]:
    """``create_pool`` arguments that retire each connection when it comes back at or after
    ``lifetime_s`` seconds of age."""

    async def reset(connection: asyncpg.Connection) -> None:
        opened_at = getattr(connection, "opened_at", None)
        now = time.monotonic()
        if opened_at is None or not lifetime_reached(opened_at, now, lifetime_s):
            query = connection.get_reset_query()
            if query:
                await connection.execute(query)
            return
        pid = connection.get_server_pid()
        try:
            await connection.close(timeout=RETIRE_CLOSE_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # close() has aborted the connection by now; it was being retired anyway.
            log.debug("postgres connection close failed", pid=pid, error=type(exc).__name__)
        log.debug("postgres connection retired", age_s=round(now - opened_at, 3), pid=pid)

    return {"connection_class": AgingConnection, "reset": reset}
