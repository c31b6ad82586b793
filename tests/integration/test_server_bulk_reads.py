"""Bulk reads (``POST /v1/{cache_type}/get-bulk``) while S3 answers errors, through the fault proxy.

The server runs in-process (as in ``test_server``) over the suite's real Postgres, with its S3
endpoint pointed at a ``FaultProxy`` in front of the real S3 server. The proxy serves the startup
checks cleanly; the faults are switched on once the server listens. Each key of a bulk read
follows the single-read rules: retried, then read from the next backend in read order.
"""

from __future__ import annotations

import base64
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from devenv.faults import FaultPlan, FaultProxy
from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from services.context import open_services_context
from services.settings import ServerConfig
from tests.conftest import LayerDb
from tests.integration.test_server import (
    RunningServer,
    error_of,
    hex_key,
    insert_row,
    put_object,
    serve_in_task,
    settings_for,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

STORAGE = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"

StartProxiedServer = Callable[[str], Awaitable[tuple[RunningServer, FaultProxy]]]


@pytest.fixture
async def start_proxied_server(
    layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str, tmp_path: Path
) -> AsyncIterator[StartProxiedServer]:
    """Factory: ``await start(mode)`` → a server whose S3 calls go through a new fault proxy."""
    running: list[RunningServer] = []
    async with AsyncExitStack() as stack:

        async def start(mode: str) -> tuple[RunningServer, FaultProxy]:
            proxy = await stack.enter_async_context(FaultProxy(s3_server.endpoint.url, FaultPlan()))
            settings = settings_for(
                layer_db, s3_server, bucket_prefix, mode, **{STORAGE + "ENDPOINT": proxy.url}
            )
            metrics = InMemoryMetricReader()
            context = await stack.enter_async_context(
                open_services_context(settings, metric_readers=[metrics])
            )
            config = ServerConfig(write_queue_dir=tmp_path / f"write-queue-{len(running)}")
            server = await serve_in_task(context, config, metrics)
            running.append(server)
            return server, proxy

        try:
            yield start
        finally:
            for server in running:
                if not server.task.done():
                    await server.shut_down()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def test_s3_primary_bulk_read_with_s3_errors_returns_every_value(
    start_proxied_server: StartProxiedServer,
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
    server, proxy = await start_proxied_server("S3Primary")
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
    start_proxied_server: StartProxiedServer,
    http: aiohttp.ClientSession,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(12)
    stored = {hex_key(rng): rng.randbytes(50) for _ in range(20)}
    for key, value in stored.items():
        await put_object(s3_client, bucket_prefix, CacheType.CAS, key, value)
    server, proxy = await start_proxied_server("S3Only")
    proxy.plan = FaultPlan(slowdown_share=1.0)  # S3 is down

    async with http.post(server.v1("cas", "get-bulk"), json={"keys": list(stored)}) as response:
        assert await error_of(response) == (503, "storage_unavailable")
        assert response.headers["Retry-After"] == "1"

    proxy.plan = FaultPlan()  # S3 is back: the same read succeeds
    async with http.post(server.v1("cas", "get-bulk"), json={"keys": list(stored)}) as response:
        assert response.status == 200
        bulk = await response.json()
    assert {key: base64.b64decode(value) for key, value in bulk["values"].items()} == stored
