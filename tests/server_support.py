"""The layer cache server in the test's own event loop, and what it stored, read directly.

``start_in_task`` runs a ``LayerCacheServer`` on a free loopback port in a task of the running
loop and returns once it listens (or raises what stopped it); ``RunningServer.shut_down`` does
what SIGTERM does. ``ServerFactory`` is the integration tests' ``start_server`` fixture: a server
over the test's database and buckets in a given persister mode, with a write queue in the test's
``tmp_path``, its S3 calls optionally through a new ``FaultProxy``, its metrics in memory; every
server it started is shut down when the test ends. Unless a config asks for tokens, a server runs
open (``AUTH=none``): the tests of access control say what they want.

What a server stored is read from the Postgres table and the S3 bucket, never through the server,
so every mode's routing is observed, not inferred.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from devenv.faults import FaultPlan, FaultProxy
from devenv.s3 import S3Server
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import object_key
from layer_cache_server.auth import server_access
from layer_cache_server.server import LayerCacheServer, build_cache_tier
from layer_cache_server.tls import server_tls
from services.cache_sizing import plan_tier
from services.context import ServicesContext, open_services_context
from services.settings import ServerAuth, ServerConfig, Settings, load_settings
from services.signals import StopRequest
from tests.conftest import LayerDb, service_env
from tests.support import PG, S3_ENDPOINT, cache_bucket, cache_objects, random_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MODES = ("PostgresOnly", "DualWrite", "S3Primary", "S3Only")
DEADLINE_S = 10.0


# --------------------------------------------------------------------------------------------
# Running servers in-process


@dataclass
class RunningServer:
    """A server serving in a task of the test's loop."""

    url: str
    server: LayerCacheServer
    stop: StopRequest
    task: asyncio.Task[None]
    metrics: InMemoryMetricReader

    def v1(self, cache_type: CacheType | str, key: str) -> str:
        return f"{self.url}/v1/{cache_type}/{key}"

    async def shut_down(self) -> None:
        """What SIGTERM does: set the stop event, wait for the graceful shutdown."""
        self.stop.event.set()
        async with asyncio.timeout(DEADLINE_S * 3):
            await self.task

    async def shut_down_if_running(self) -> None:
        if not self.task.done():
            await self.shut_down()


def settings_for(
    db: LayerDb, s3_server: S3Server, bucket_prefix: str, mode: str, **overrides: str
) -> Settings:
    """The settings an operator's environment gives for this database, buckets and mode."""
    env = service_env(db, s3_server.endpoint, bucket_prefix, persister_mode=mode) | overrides
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings()


async def start_in_task(
    server: LayerCacheServer, metrics: InMemoryMetricReader | None = None
) -> RunningServer:
    """Serve on a free loopback port in a task of this loop; returns once it listens."""
    stop = StopRequest()
    listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        server.run(
            stop,
            socket_addr="127.0.0.1:0",
            on_listening=lambda host, port: listening.set_result((host, port)),
        )
    )
    waiters: list[asyncio.Future[Any]] = [listening, task]
    async with asyncio.timeout(DEADLINE_S):
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises what stopped it
    host, port = listening.result()
    scheme = "http" if server.tls is None else "https"
    return RunningServer(
        f"{scheme}://{host}:{port}", server, stop, task, metrics or InMemoryMetricReader()
    )


def open_unless_asked(config: ServerConfig) -> ServerConfig:
    """The config, with ``AUTH=none`` unless it asks for tokens (token files, or ``auth`` set
    explicitly)."""
    asks_for_tokens = "auth" in config.model_fields_set or (
        config.read_tokens_file or config.write_tokens_file
    )
    return config if asks_for_tokens else config.model_copy(update={"auth": ServerAuth.NONE})


async def serve_in_task(
    context: ServicesContext, config: ServerConfig, metrics: InMemoryMetricReader
) -> RunningServer:
    """A server over ``context`` with ``config`` (its tokens and TLS files loaded), listening."""
    config = open_unless_asked(config)
    server = LayerCacheServer(context, config, access=server_access(config), tls=server_tls(config))
    return await start_in_task(server, metrics)


async def serve_tiered(
    context: ServicesContext,
    settings: Settings,
    metrics: InMemoryMetricReader,
    config: ServerConfig | None = None,
) -> RunningServer:
    """A server with the cache tier ``serve_layer_cache`` builds from ``settings``, open to
    every client (``config``: the settings' ``server`` section unless given), listening."""
    config = config or settings.server
    tier = build_cache_tier(plan_tier(settings), config, context)
    server = LayerCacheServer(context, config, access=None, tier=tier)
    return await start_in_task(server, metrics)


class ServerFactory:
    """Starts servers over one test's database and buckets; ``close`` shuts them all down."""

    def __init__(
        self, stack: AsyncExitStack, db: LayerDb, s3_server: S3Server, bucket_prefix: str, tmp: Path
    ) -> None:
        self.stack = stack
        self.db = db
        self.s3_server = s3_server
        self.bucket_prefix = bucket_prefix
        self.tmp = tmp
        self.running: list[RunningServer] = []

    async def __call__(
        self,
        mode: str = "DualWrite",
        config: ServerConfig | None = None,
        *,
        s3_url: str | None = None,
        pg_port: int | None = None,
        env: Mapping[str, str] | None = None,
        tier: bool = False,
    ) -> RunningServer:
        """A listening server in ``mode``: S3 at ``s3_url`` and Postgres at ``pg_port`` when
        given, ``env`` on top of the service environment; ``config`` (default: the settings'
        own ``server`` section) gets a write queue of its own unless it names one; ``tier``
        builds the cache tier the settings size, as ``serve_layer_cache`` does."""
        overrides = dict(env or {})
        if s3_url is not None:
            overrides[S3_ENDPOINT] = s3_url
        if pg_port is not None:
            overrides[PG + "PORT"] = str(pg_port)
        settings = settings_for(self.db, self.s3_server, self.bucket_prefix, mode, **overrides)
        metrics = InMemoryMetricReader()
        context = await self.stack.enter_async_context(
            open_services_context(settings, metric_readers=[metrics])
        )
        config = config or settings.server
        if "write_queue_dir" not in config.model_fields_set:
            queue_dir = self.tmp / f"write-queue-{len(self.running)}"
            config = config.model_copy(update={"write_queue_dir": queue_dir})
        if tier:
            started = await serve_tiered(context, settings, metrics, config)
        else:
            started = await serve_in_task(context, config, metrics)
        self.running.append(started)
        return started

    async def through_proxy(
        self,
        mode: str = "DualWrite",
        config: ServerConfig | None = None,
        *,
        plan: FaultPlan | None = None,
        **options: Any,
    ) -> tuple[RunningServer, FaultProxy]:
        """A server whose S3 calls go through a new fault proxy, and the proxy: faults from
        ``plan`` (none unless given) from the start, until its ``plan`` is changed."""
        proxy = await self.stack.enter_async_context(
            FaultProxy(self.s3_server.endpoint.url, plan or FaultPlan())
        )
        return await self(mode, config, s3_url=proxy.url, **options), proxy

    async def close(self) -> None:
        for server in self.running:
            await server.shut_down_if_running()


# --------------------------------------------------------------------------------------------
# Reading what is stored, directly


def hex_key(rng: random.Random) -> str:
    return random_key(rng, 64)


async def pg_rows(db: LayerDb, cache_type: CacheType) -> dict[str, bytes]:
    table = CACHE_SPECS[cache_type].table
    records = await db.pool.fetch(f"SELECT key, value FROM {table}")
    return {record["key"]: bytes(record["value"]) for record in records}


async def s3_values(
    s3_client: S3Client, bucket_prefix: str, cache_type: CacheType
) -> dict[str, bytes]:
    """Row key → object bytes for every object in the cache's bucket."""
    objects = await cache_objects(s3_client, bucket_prefix, cache_type)
    return {name.rsplit("/", 1)[-1]: body for name, body in objects.items()}


async def s3_values_once_queued_writes_land(
    s3_client: S3Client, bucket_prefix: str, cache_type: CacheType, expected: dict[str, bytes]
) -> dict[str, bytes]:
    """The bucket's values once they equal ``expected`` or ``DEADLINE_S`` has passed: a write
    is acknowledged before its S3 PUT (the write queue), so S3 catches up a moment later."""
    deadline = time.monotonic() + DEADLINE_S
    while (stored := await s3_values(s3_client, bucket_prefix, cache_type)) != expected:
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    return stored


async def put_object(
    s3_client: S3Client, bucket_prefix: str, cache_type: CacheType, key: str, value: bytes
) -> None:
    """An object where the cache's bucket keeps the row's value, put directly."""
    await s3_client.put_object(
        Bucket=cache_bucket(cache_type, bucket_prefix), Key=object_key(key), Body=value
    )


async def insert_row(db: LayerDb, cache_type: CacheType, key: str, value: bytes) -> None:
    """A row inserted directly, as upstream's write path would (``created_at`` now)."""
    table = CACHE_SPECS[cache_type].table
    await db.pool.execute(
        f"INSERT INTO {table} (key, sort_key, value) VALUES ($1, $1, $2)", key, value
    )


def metric_values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], float]:
    """Sorted attribute items → value, for one counter or gauge."""
    values: dict[tuple[Any, ...], float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint)
                        values[tuple(sorted((point.attributes or {}).items()))] = point.value
    return values


def counter_values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], int]:
    """Sorted attribute items → value, for one counter."""
    return {labels: int(value) for labels, value in metric_values(reader, name).items()}


async def error_of(response: aiohttp.ClientResponse) -> tuple[int, str]:
    """A JSON error answer's status and code (its body holds exactly a code and a message)."""
    body = await response.json()
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    return response.status, body["error"]["code"]
