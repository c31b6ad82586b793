"""The layer cache server against the suite's real Postgres and S3 servers.

Servers run in-process on ``127.0.0.1:0`` inside the test's event loop (``start_server``, from
``tests.server_support``; one test runs the real ``python -m services`` instead); requests go
over real HTTP through ``aiohttp.ClientSession``. Where a value went is read directly from the
Postgres table and the S3 bucket, never through the server, so every mode's routing is observed,
not inferred.
"""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import asyncpg
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from devenv.faults import FaultPlan
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CacheType
from layer_cache.keys import object_key
from layer_cache.write_queue import queue_status
from layer_cache_server.server import serve_layer_cache
from migrations_mode.config import BackfillConfig
from migrations_mode.coordinator import run_backfill
from services.context import ServicesContext, open_services_context
from services.settings import ServerAuth, ServerConfig, Settings
from services.signals import StopRequest
from services.telemetry import start_telemetry
from tests.cli_harness import Job, cli
from tests.conftest import LayerDb
from tests.server_support import (
    DEADLINE_S,
    MODES,
    ServerFactory,
    counter_values,
    error_of,
    hex_key,
    insert_row,
    pg_rows,
    put_object,
    s3_values,
    s3_values_once_queued_writes_land,
    serve_in_task,
    settings_for,
)
from tests.support import (
    SeedRow,
    cache_objects,
    expected_objects,
    insert_rows,
    rows_below,
    until,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Routing per persister mode

WRITE_TARGETS = {  # mode → (Postgres written, S3 written)
    "PostgresOnly": (True, False),
    "DualWrite": (True, True),
    "S3Primary": (True, True),
    "S3Only": (False, True),
}


@pytest.mark.parametrize("mode", MODES)
async def test_put_stores_in_exactly_the_modes_write_targets_and_the_first_write_wins(
    mode: str,
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    server = await start_server(mode)
    key, first, second = hex_key(random.Random(1)), b"\x00first value\xff", b"second value"

    async with http.put(server.v1("cas", key), data=first) as response:
        assert response.status == 201
    async with http.put(server.v1("cas", key), data=second) as response:
        assert response.status == 200

    in_pg, in_s3 = WRITE_TARGETS[mode]
    assert await pg_rows(layer_db, CacheType.CAS) == ({key: first} if in_pg else {})
    expected_in_s3 = {key: first} if in_s3 else {}
    stored = await s3_values_once_queued_writes_land(
        s3_client, bucket_prefix, CacheType.CAS, expected_in_s3
    )
    assert stored == expected_in_s3
    objects = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    assert list(objects) == ([object_key(key)] if in_s3 else [])  # ab/cd/ef/<key>
    async with http.get(server.v1("cas", key)) as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        assert await response.read() == first


READ_SOURCES = {  # mode → what a read of (pg-only, s3-only, both) returns
    "PostgresOnly": ("pg", None, "pg"),
    "DualWrite": ("pg", None, "pg"),
    "S3Primary": ("pg", "s3", "s3"),
    "S3Only": (None, "s3", "s3"),
}


@pytest.mark.parametrize("mode", MODES)
async def test_get_head_and_bulk_read_the_backends_in_the_modes_order(
    mode: str,
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(2)
    pg_only, s3_only, both, nowhere = (hex_key(rng) for _ in range(4))
    stored: dict[str, dict[str, bytes]] = {"pg": {}, "s3": {}}  # source → key → value
    for key in (pg_only, both):
        stored["pg"][key] = f"from postgres {key[:6]}".encode()
        await insert_row(layer_db, CacheType.WORKSPACE_SNAPSHOT, key, stored["pg"][key])
    for key in (s3_only, both):
        stored["s3"][key] = f"from the s3 object {key[:6]}".encode()
        await put_object(
            s3_client, bucket_prefix, CacheType.WORKSPACE_SNAPSHOT, key, stored["s3"][key]
        )
    server = await start_server(mode)

    expected: dict[str, bytes | None] = {nowhere: None}
    for key, source in zip((pg_only, s3_only, both), READ_SOURCES[mode], strict=True):
        expected[key] = None if source is None else stored[source][key]
    for key, value in expected.items():
        async with http.get(server.v1("workspace_snapshot", key)) as response:
            if value is None:
                assert await error_of(response) == (404, "not_found")
            else:
                assert response.status == 200, key
                assert await response.read() == value
        async with http.head(server.v1("workspace_snapshot", key)) as response:
            assert response.status == (404 if value is None else 200)
            if value is not None:
                assert response.content_length == len(value)
    async with http.post(
        server.v1("workspace_snapshot", "get-bulk"), json={"keys": list(expected)}
    ) as response:
        assert response.status == 200
        bulk = await response.json()
    assert {k: base64.b64decode(v) for k, v in bulk["values"].items()} == {
        key: value for key, value in expected.items() if value is not None
    }
    assert bulk["missing"] == [key for key, value in expected.items() if value is None]


async def test_s3_primary_writes_a_postgres_hit_back_to_s3(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(3)
    by_get, by_bulk = hex_key(rng), hex_key(rng)
    rows = {by_get: rng.randbytes(3000), by_bulk: rng.randbytes(10)}
    for key, value in rows.items():
        await insert_row(layer_db, CacheType.CAS, key, value)
    server = await start_server("S3Primary")

    for _ in range(3):  # repeated reads of a queued or in-flight key are not queued again
        async with http.get(server.v1("cas", by_get)) as response:
            assert await response.read() == rows[by_get]
    async with http.post(server.v1("cas", "get-bulk"), json={"keys": [by_bulk]}) as response:
        assert (await response.json())["missing"] == []

    deadline = time.monotonic() + DEADLINE_S
    while (stored := await s3_values(s3_client, bucket_prefix, CacheType.CAS)) != rows:
        assert time.monotonic() < deadline, f"S3 not filled in time: {sorted(stored)}"
        await asyncio.sleep(0.05)
    attributes = (("backend", "s3"), ("cache_name", "cas"), ("cache_type", "cas"))
    attempted = counter_values(server.metrics, "layer_cache_fallback_writeback_attempted")
    assert attempted[attributes] in (2, 3, 4)  # 2 keys; a re-read after a finished job counts
    assert counter_values(server.metrics, "layer_cache_fallback_writeback_failed") == {}


async def test_bulk_answers_base64_values_and_missing_keys_in_request_order(
    start_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await start_server("DualWrite")
    values = {"0a1b": b"\x00\x01binary\xfe", "01HQ3Z6V8W9X0Y1Z2A3B4C5D6E": b"", "ff": b"x" * 70}
    for key, value in values.items():
        async with http.put(server.v1("rebase_batch", key), data=value) as response:
            assert response.status == 201
    asked = ["ff", "00", "0a1b", "ff", "01HQ3Z6V8W9X0Y1Z2A3B4C5D6E", "beef"]

    async with http.post(server.v1("rebase_batch", "get-bulk"), json={"keys": asked}) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()

    assert {key: base64.b64decode(value) for key, value in body["values"].items()} == values
    assert body["missing"] == ["00", "beef"]
    async with http.post(server.v1("rebase_batch", "get-bulk"), json={"keys": []}) as response:
        assert await response.json() == {"values": {}, "missing": []}


# --------------------------------------------------------------------------------------------
# Bulk reads while S3 answers errors, through the fault proxy: the proxy serves the startup checks
# cleanly and the faults are switched on once the server listens; each key of a bulk read follows
# the single-read rules (retried, then read from the next backend in read order).


async def test_s3_primary_bulk_read_with_s3_errors_returns_every_value(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(11)
    in_s3 = {hex_key(rng): rng.randbytes(200) for _ in range(40)}
    in_pg = {hex_key(rng): rng.randbytes(200) for _ in range(40)}  # S3 misses these
    nowhere = [hex_key(rng) for _ in range(5)]
    for key, value in in_s3.items():
        await put_object(s3_client, bucket_prefix, CacheType.CAS, key, value)
        await insert_row(layer_db, CacheType.CAS, key, value)
    for key, value in in_pg.items():
        await insert_row(layer_db, CacheType.CAS, key, value)
    server, proxy = await start_server.through_proxy("S3Primary")
    # A third of S3 GETs fail, some twice in a row: retries serve most, Postgres the rest.
    proxy.plan = FaultPlan(slowdown_share=0.35, methods=frozenset({"GET"}), seed=5)

    keys = [*in_s3, *in_pg, *nowhere]
    async with http.post(server.v1("cas", "get-bulk"), json={"keys": keys}) as response:
        assert response.status == 200, await response.text()
        bulk = await response.json()

    assert {key: base64.b64decode(value) for key, value in bulk["values"].items()} == (
        in_s3 | in_pg
    )
    assert bulk["missing"] == nowhere
    assert proxy.counts["GET:slowdown"] > 10, proxy.counts  # the faults did happen


async def test_s3_only_bulk_read_with_s3_down_answers_503_storage_unavailable(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(12)
    stored = {hex_key(rng): rng.randbytes(50) for _ in range(20)}
    for key, value in stored.items():
        await put_object(s3_client, bucket_prefix, CacheType.CAS, key, value)
    server, proxy = await start_server.through_proxy("S3Only")
    proxy.plan = FaultPlan(slowdown_share=1.0)  # S3 is down

    async with http.post(server.v1("cas", "get-bulk"), json={"keys": list(stored)}) as response:
        assert await error_of(response) == (503, "storage_unavailable")
        assert response.headers["Retry-After"] == "1"

    proxy.plan = FaultPlan()  # S3 is back: the same read succeeds
    async with http.post(server.v1("cas", "get-bulk"), json={"keys": list(stored)}) as response:
        assert response.status == 200
        bulk = await response.json()
    assert {key: base64.b64decode(value) for key, value in bulk["values"].items()} == stored


# --------------------------------------------------------------------------------------------
# Bad requests

SMALL_LIMITS = ServerConfig(max_body_bytes=1024, max_bulk_keys=3)
KEY = "0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class BadRequest:
    method: str
    path: str
    status: int
    code: str
    body: bytes | None = None


BAD_REQUESTS = [
    BadRequest("GET", f"/v1/no_such_cache/{KEY}", 404, "unknown_cache_type"),
    BadRequest("PUT", f"/v1/widgets/{KEY}", 404, "unknown_cache_type", b"x"),
    BadRequest("POST", "/v1/no_such_cache/get-bulk", 404, "unknown_cache_type", b'{"keys":[]}'),
    BadRequest("GET", f"/v1/func_run/{KEY}", 404, "unknown_cache_type"),
    BadRequest("GET", "/v1/cas/not-hex-or-ulid", 400, "malformed_key"),
    BadRequest("GET", "/v1/cas/" + "a" * 129, 400, "malformed_key"),
    BadRequest("PUT", "/v1/cas/..%2Fescape", 400, "malformed_key", b"x"),
    BadRequest("PUT", "/v1/cas/k%C3%A9y", 400, "malformed_key", b"x"),
    BadRequest("GET", f"/v1/cas/{KEY}", 404, "not_found"),
    BadRequest("GET", "/v1/cas", 404, "not_found"),
    BadRequest("DELETE", f"/v1/cas/{KEY}", 405, "method_not_allowed"),
    BadRequest("PUT", f"/v1/cas/{KEY}", 413, "body_too_large", b"x" * 1025),
    BadRequest("POST", "/v1/cas/get-bulk", 413, "body_too_large", b" " * 2000 + b'{"keys":[]}'),
    BadRequest("POST", "/v1/cas/get-bulk", 400, "malformed_body", b"{not json"),
    BadRequest("POST", "/v1/cas/get-bulk", 400, "malformed_body", b'{"keys": "ab"}'),
    BadRequest("POST", "/v1/cas/get-bulk", 400, "malformed_body", b'{"keys": [1, 2]}'),
    BadRequest("POST", "/v1/cas/get-bulk", 400, "malformed_key", b'{"keys": ["ab", "a/b"]}'),
    BadRequest("POST", "/v1/cas/get-bulk", 400, "too_many_keys", b'{"keys": ["a","b","c","d"]}'),
]


async def test_bad_requests_get_json_errors_with_stable_codes_and_store_nothing(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    server = await start_server("DualWrite", SMALL_LIMITS)
    for bad in BAD_REQUESTS:
        async with http.request(
            bad.method, server.url + bad.path, data=bad.body, skip_auto_headers=["Content-Type"]
        ) as response:
            assert await error_of(response) == (bad.status, bad.code), bad
            assert response.content_type == "application/json"
    async with http.put(server.v1("cas", KEY), data=b"x" * 1024) as response:
        assert response.status == 201  # exactly the limit is allowed
    assert list(await pg_rows(layer_db, CacheType.CAS)) == [KEY]
    stored = await s3_values_once_queued_writes_land(
        s3_client, bucket_prefix, CacheType.CAS, {KEY: b"x" * 1024}
    )
    assert list(stored) == [KEY]


async def test_an_oversized_streamed_body_without_length_is_refused_with_413(
    start_server: ServerFactory, http: aiohttp.ClientSession, layer_db: LayerDb
) -> None:
    server = await start_server("PostgresOnly", SMALL_LIMITS)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    async with http.put(server.v1("cas", KEY), data=chunks()) as response:
        assert await error_of(response) == (413, "body_too_large")
    assert await pg_rows(layer_db, CacheType.CAS) == {}


# --------------------------------------------------------------------------------------------
# Health and readiness


async def test_readyz_checks_postgres_and_s3_and_healthz_is_alive(
    start_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await start_server("S3Primary")
    async with http.get(server.url + "/readyz") as response:
        assert response.status == 200
        assert await response.json() == {
            "status": "ready",
            "checks": {"postgres": "ok", "s3": "ok"},
        }
    async with http.get(server.url + "/healthz") as response:
        assert await response.json() == {"status": "alive"}


async def test_readyz_is_503_while_postgres_is_unreachable(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    tmp_path: Path,
) -> None:
    healthy = await start_server("PostgresOnly")
    settings = settings_for(layer_db, s3_server, bucket_prefix, "PostgresOnly")
    closed_port = free_port()
    # min_size=0: the pool connects on first use, as a pool whose database went away does.
    pool = await asyncpg.create_pool(
        host="127.0.0.1", port=closed_port, user="si", password="x", min_size=0, timeout=2
    )
    telemetry = start_telemetry()
    try:
        context = ServicesContext(settings, pool, None, telemetry)
        config = ServerConfig(write_queue_dir=tmp_path / "write-queue-broken")
        broken = await serve_in_task(context, config, InMemoryMetricReader())
        try:
            async with http.get(broken.url + "/readyz") as response:
                body = await response.json()
                assert response.status == 503
                assert body["error"]["code"] == "not_ready"
                assert body["checks"]["postgres"].startswith("transient:"), body
            async with http.get(broken.url + "/healthz") as response:
                assert response.status == 200
            async with http.get(broken.v1("cas", KEY)) as response:
                assert await error_of(response) == (503, "storage_unavailable")
                assert response.headers["Retry-After"] == "1"
            async with http.get(healthy.url + "/readyz") as response:
                assert response.status == 200
        finally:
            await broken.shut_down()
    finally:
        await pool.close()
        telemetry.shutdown()


# --------------------------------------------------------------------------------------------
# Graceful shutdown


class SlowBody:
    """A request body sent in two halves, the second only after ``resume`` is set."""

    def __init__(self, half: bytes) -> None:
        self.half = half
        self.resume = asyncio.Event()

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.half
        await self.resume.wait()
        yield self.half


async def refuses_connections(url: str) -> bool:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url + "/healthz") as response:
                await response.read()
        except aiohttp.ClientConnectorError:
            return True
    return False


async def put_status(session: aiohttp.ClientSession, url: str, body: SlowBody) -> int:
    async with session.put(url, data=body.chunks()) as response:
        return response.status


async def test_shutdown_stops_accepting_and_completes_requests_in_flight(
    start_server: ServerFactory, http: aiohttp.ClientSession, layer_db: LayerDb
) -> None:
    server = await start_server("PostgresOnly", ServerConfig(grace_period_secs=10))
    rng = random.Random(5)
    bodies = {hex_key(rng): SlowBody(rng.randbytes(2048)) for _ in range(3)}
    puts = [
        asyncio.create_task(put_status(http, server.v1("cas", key), body))
        for key, body in bodies.items()
    ]
    await until(lambda: server.server.requests.count == len(bodies), "requests in flight")

    server.stop.event.set()  # what SIGTERM does
    await until(lambda: refuses_connections(server.url), "the listener to close")
    assert not server.task.done()
    for body in bodies.values():
        body.resume.set()

    assert await asyncio.gather(*puts) == [201] * len(bodies)
    async with asyncio.timeout(DEADLINE_S):
        await server.task
    assert await pg_rows(layer_db, CacheType.CAS) == {
        key: body.half * 2 for key, body in bodies.items()
    }


async def test_a_request_still_running_when_the_grace_period_ends_is_cancelled(
    start_server: ServerFactory, http: aiohttp.ClientSession, layer_db: LayerDb
) -> None:
    grace = 1.0
    server = await start_server("PostgresOnly", ServerConfig(grace_period_secs=grace))
    body = SlowBody(b"z" * 2048)
    put = asyncio.create_task(put_status(http, server.v1("cas", KEY), body))
    await until(lambda: server.server.requests.count == 1, "the request in flight")

    started = time.monotonic()
    server.stop.event.set()
    async with asyncio.timeout(DEADLINE_S):
        await server.task
    assert time.monotonic() - started < grace + 1.5

    body.resume.set()
    with pytest.raises(aiohttp.ClientError):
        async with asyncio.timeout(DEADLINE_S):
            await put
    assert await pg_rows(layer_db, CacheType.CAS) == {}


async def test_shutdown_drains_the_write_queue_of_read_through_write_backs(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(6)
    rows = {hex_key(rng): rng.randbytes(rng.randint(1, 5000)) for _ in range(40)}
    for key, value in rows.items():
        await insert_row(layer_db, CacheType.CAS, key, value)
    server = await start_server("S3Primary", ServerConfig(write_queue_workers=1))

    async with http.post(server.v1("cas", "get-bulk"), json={"keys": list(rows)}) as response:
        assert len((await response.json())["values"]) == len(rows)
    await server.shut_down()  # at once: the queue is drained, not dropped

    assert server.server.write_back is not None
    assert queue_status(server.server.config.write_queue_dir) == {}
    assert await s3_values(s3_client, bucket_prefix, CacheType.CAS) == rows
    assert counter_values(server.metrics, "layer_cache_fallback_writeback_failed") == {}


# --------------------------------------------------------------------------------------------
# The run mode, and the real entrypoint


async def test_run_mode_checks_the_schema_then_serves(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    settings = settings_for(layer_db, s3_server, bucket_prefix, "PostgresOnly")
    stop = StopRequest()
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_layer_cache(
            settings.model_copy(update={"socket_addr": "127.0.0.1:0"}),
            ServerConfig(auth=ServerAuth.NONE),
            stop,
            check_schema_first=True,
            on_listening=lambda host, port: listening.set_result((host, port)),
        )
    )
    try:
        async with asyncio.timeout(DEADLINE_S):
            host, port = await listening
        async with http.put(f"http://{host}:{port}/v1/cas/{KEY}", data=b"v") as response:
            assert response.status == 201
        assert await pg_rows(layer_db, CacheType.CAS) == {KEY: b"v"}
    finally:
        stop.event.set()
        async with asyncio.timeout(DEADLINE_S):
            await task


async def test_cli_skip_mode_serves_and_exits_143_within_the_grace_period_on_sigterm(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    grace = 5.0
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json"]
    async with Job(args, env | {"SI_SDF__SERVER__GRACE_PERIOD_SECS": str(grace)}) as job:
        listening = await job.expect(
            lambda event: event["event"] == "layer cache server listening", 30.0
        )
        assert listening["host"] == "127.0.0.1"
        assert listening["level"] == "info"
        url = f"http://127.0.0.1:{listening['port']}/v1/change_batch/{KEY}"
        async with aiohttp.ClientSession() as session:
            async with session.put(url, data=b"change batch bytes") as response:
                assert response.status == 201
            async with session.get(url) as response:
                assert await response.read() == b"change batch bytes"

        sent = time.monotonic()
        job.send(signal.SIGTERM)
        run = await job.finish(grace + 10)
        elapsed = time.monotonic() - sent
    assert run.status == 143, run.stderr
    assert elapsed < grace
    names = [event["event"] for event in run.events]
    assert names.index("layer cache server shutting down") < names.index(
        "layer cache server stopped"
    )
    assert await pg_rows(layer_db, CacheType.CHANGE_BATCH) == {KEY: b"change batch bytes"}
    assert await s3_values(s3_client, bucket_prefix, CacheType.CHANGE_BATCH) == {
        KEY: b"change batch bytes"
    }


async def test_cli_with_metrics_port_0_logs_the_port_it_got_and_serves_metrics_there(
    env: dict[str, str],
) -> None:
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--metrics-port", "0"]
    async with Job([*args, "--log-json"], env) as job:
        endpoint = await job.expect(
            lambda event: event["event"] == "metrics endpoint listening", 30.0
        )
        await job.expect(lambda event: event["event"] == "layer cache server listening", 30.0)
        port = endpoint["metrics_port"]
        assert isinstance(port, int), endpoint
        assert port > 0, endpoint
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert response.status == 200
            assert "layer_cache" in await response.text()
        job.send(signal.SIGTERM)
        run = await job.finish(30.0)
    assert run.status == 143, run.stderr
    assert len(run.named("metrics endpoint listening")) == 1, "logged once"


async def test_cli_refuses_a_bad_address_with_2_and_a_taken_port_with_3(
    env: dict[str, str],
) -> None:
    args = ["--migration-mode", "skip", "--log-json", "--socket-addr"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bad, busy = await asyncio.gather(
            cli([*args, "localhost"], env, within_s=60),
            cli([*args, f"127.0.0.1:{port}"], env, within_s=60),
        )
    for result, status, words in ((bad, 2, "SI_SDF__SOCKET_ADDR"), (busy, 3, "cannot listen")):
        events = result.events
        errors = [event for event in events if event["level"] == "error"]
        assert result.status == status, result.stderr
        assert len(errors) == 1, result.stderr
        assert words in errors[0]["event"]
        assert "layer cache server listening" not in {event["event"] for event in events}


# --------------------------------------------------------------------------------------------
# A backfill while the server takes writes


async def test_backfill_while_serving_dual_writes_loses_and_duplicates_nothing(
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    settings: Settings,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(8)
    server = await start_server("DualWrite")
    cutoff: datetime = await layer_db.pool.fetchval("SELECT clock_timestamp()")  # DualWrite on
    caches = (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT)
    old: dict[CacheType, dict[str, bytes]] = {}
    for index, cache_type in enumerate(caches):
        rows = [
            SeedRow(hex_key(rng), rng.randbytes(rng.randint(0, 3000)), cutoff - timedelta(ms))
            for ms in range(1, 301 - 150 * index)
        ]
        await insert_rows(layer_db.pool, cache_type, rows)
        old[cache_type] = {row.key: row.value for row in rows}
    new = {hex_key(rng): rng.randbytes(rng.randint(1, 3000)) for _ in range(150)}
    rewritten = dict(list(old[CacheType.CAS].items())[:60])  # old keys PUT again while copying

    async def write(key: str, value: bytes, expected_status: int) -> None:
        async with http.put(server.v1("cas", key), data=value) as response:
            assert response.status == expected_status, key

    spans: dict[str, tuple[float, float]] = {}

    async def timed(name: str, work: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            return await work
        finally:
            spans[name] = (started, time.monotonic())

    async def writer() -> None:
        jobs = [(key, value, 201) for key, value in new.items()]
        jobs += [(key, value, 200) for key, value in rewritten.items()]
        rng.shuffle(jobs)
        for start in range(0, len(jobs), 8):
            await asyncio.gather(*(write(*job) for job in jobs[start : start + 8]))

    config = BackfillConfig(
        cutoff=cutoff,
        cache_types=caches,
        key_batch_size=25,
        checkpoint_interval=timedelta(seconds=30),
        max_concurrent_uploads=4,
        grace_period=timedelta(seconds=5),
    )
    async with open_services_context(settings, with_s3=True) as context:
        report, _ = await asyncio.gather(
            timed("backfill", run_backfill(context, config, StopRequest())),
            timed("writer", writer()),
        )

    assert report.complete
    (backfill_start, backfill_end), (writer_start, writer_end) = spans["backfill"], spans["writer"]
    assert writer_start < backfill_end, "the writes did not overlap the backfill"
    assert backfill_start < writer_end, "the writes did not overlap the backfill"
    assert await pg_rows(layer_db, CacheType.CAS) == old[CacheType.CAS] | new
    assert await rows_below(layer_db.pool, CacheType.CAS, cutoff) == old[CacheType.CAS]
    for cache_type in caches:
        expected = old[cache_type] | (new if cache_type is CacheType.CAS else {})
        stored = await cache_objects(s3_client, bucket_prefix, cache_type)
        assert stored == expected_objects(expected), f"{cache_type}: objects differ"
    untouched = set(BACKFILLABLE_CACHE_TYPES) - set(caches)
    for cache_type in untouched:
        assert await cache_objects(s3_client, bucket_prefix, cache_type) == {}


def test_every_mode_in_the_routing_table_is_tested() -> None:
    from layer_cache.persister import ROUTES

    assert set(MODES) == set(ROUTES) == set(WRITE_TARGETS) == set(READ_SOURCES)
