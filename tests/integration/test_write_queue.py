"""The durable S3 write queue end to end: the server over the suite's real Postgres and S3, with
S3 made unavailable by the fault proxy (503 to everything), by a closed port (connection
refused), by kill -9 of the server process, and by poison objects the proxy refuses with a 400.

What S3 holds is read directly from the buckets, byte for byte; the queue's state is read from
its SQLite file with ``queue_status`` while the server runs (WAL readers do not block it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from devenv.faults import FaultPlan, FaultProxy
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from layer_cache.keys import object_key
from layer_cache.write_queue import queue_status
from services.context import open_services_context
from services.settings import ServerConfig
from tests.cli_harness import Job, run_cli
from tests.conftest import LayerDb, service_env
from tests.integration.test_server import (
    RunningServer,
    counter_values,
    hex_key,
    pg_rows,
    s3_values,
    serve_in_task,
    settings_for,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

ENDPOINT_ENV = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__ENDPOINT"
QUEUE_DIR_ENV = "SI_SDF__SERVER__WRITE_QUEUE_DIR"
OUTAGE_S = 30.0
RECOVERY_DEADLINE_S = 60.0
CACHE = CacheType.CAS


def fast_queue(directory: Path) -> ServerConfig:
    """Short backoff (0.2 s doubling to 2 s), so recovery shows within seconds."""
    return ServerConfig(
        write_queue_dir=directory,
        write_queue_base_delay_secs=0.2,
        write_queue_max_delay_secs=2.0,
        grace_period_secs=3.0,
    )


async def until(condition: Callable[[], Awaitable[bool]], what: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while True:
        if await condition():
            return
        assert time.monotonic() < deadline, f"timed out after {within_s} s waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def serve(
    stack: AsyncExitStack,
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_url: str,
    config: ServerConfig,
) -> RunningServer:
    """A DualWrite server in this loop whose S3 client talks to ``s3_url``."""
    settings = settings_for(
        layer_db, s3_server, bucket_prefix, "DualWrite", **{ENDPOINT_ENV: s3_url}
    )
    metrics = InMemoryMetricReader()
    context = await stack.enter_async_context(
        open_services_context(settings, metric_readers=[metrics])
    )
    server = await serve_in_task(context, config, metrics)
    stack.push_async_callback(_stop_if_running, server)
    return server


async def _stop_if_running(server: RunningServer) -> None:
    if not server.task.done():
        await server.shut_down()


async def write_all(
    http: aiohttp.ClientSession, url: str, values: dict[str, bytes], spread_s: float
) -> list[int]:
    """PUT every value from 8 concurrent clients, spread over ``spread_s`` seconds."""
    pending = list(values.items())
    pause = spread_s / max(1, len(pending)) * 8
    statuses: list[int] = []

    async def client() -> None:
        while pending:
            key, value = pending.pop()
            async with http.put(f"{url}/v1/{CACHE}/{key}", data=value) as response:
                statuses.append(response.status)
            await asyncio.sleep(pause)

    await asyncio.gather(*(client() for _ in range(8)))
    return statuses


def random_values(seed: int, count: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {hex_key(rng): rng.randbytes(rng.randint(1, 20_000)) for _ in range(count)}


async def s3_has(s3_client: S3Client, bucket_prefix: str, expected: dict[str, bytes]) -> bool:
    return await s3_values(s3_client, bucket_prefix, CACHE) == expected


# --------------------------------------------------------------------------------------------
# (a) S3 down for 30 s while clients write


class Relay:
    """A TCP relay on a fixed port to the S3 server; closed, the port refuses connections."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._writers:
                writer.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.upstream_port
        )
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@pytest.mark.parametrize("outage", ["503", "refused"])
async def test_every_write_during_a_30_s_s3_outage_is_acknowledged_and_reaches_s3(
    outage: str,
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(11, 60)
    async with AsyncExitStack() as stack:
        if outage == "503":
            proxy = await stack.enter_async_context(
                FaultProxy(s3_server.endpoint.url, FaultPlan(slowdown_share=1.0))
            )
            s3_url = proxy.url
        else:
            upstream_port = int(s3_server.endpoint.url.rsplit(":", 1)[1])
            relay = Relay(free_port(), upstream_port)  # not open yet: connection refused
            stack.push_async_callback(relay.close)
            s3_url = f"http://127.0.0.1:{relay.port}"
        server = await serve(
            stack, layer_db, s3_server, bucket_prefix, s3_url, fast_queue(tmp_path / "q")
        )
        started = time.monotonic()
        statuses = await write_all(http, server.url, values, spread_s=OUTAGE_S - 5)
        assert statuses == [201] * len(values)  # every write acknowledged while S3 is down
        assert await pg_rows(layer_db, CACHE) == values
        assert await s3_values(s3_client, bucket_prefix, CACHE) == {}
        assert queue_status(tmp_path / "q")[CACHE].queued == len(values)
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))

        if outage == "503":
            proxy.plan = FaultPlan()
        else:
            await relay.open()
        await until(
            lambda: s3_has(s3_client, bucket_prefix, values),
            "every object in S3",
            RECOVERY_DEADLINE_S,
        )
        assert queue_status(tmp_path / "q") == {}
        await server.shut_down()

    retried = counter_values(server.metrics, "layer_cache_write_queue_retried")
    assert sum(retried.values()) > 0
    assert sum(counter_values(server.metrics, "layer_cache_write_queue_success").values()) == len(
        values
    )
    assert counter_values(server.metrics, "layer_cache_write_queue_permanent_failure") == {}


# --------------------------------------------------------------------------------------------
# (b) kill -9 with a non-empty queue


async def listening_port(job: Job) -> int:
    event = await job.expect(lambda event: event["event"] == "layer cache server listening", 30.0)
    return int(event["port"])


async def test_a_server_killed_with_a_full_queue_drains_it_after_restart(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(12, 50)
    queue_dir = tmp_path / "q"
    env = service_env(layer_db, s3_server.endpoint, bucket_prefix, persister_mode="DualWrite")
    env |= {QUEUE_DIR_ENV: str(queue_dir), "SI_SDF__SERVER__WRITE_QUEUE_MAX_DELAY_SECS": "2"}
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json"]

    down = env | {ENDPOINT_ENV: f"http://127.0.0.1:{free_port()}"}  # connection refused
    async with Job(args, down) as job:
        port = await listening_port(job)
        statuses = await write_all(http, f"http://127.0.0.1:{port}", values, spread_s=1.0)
        assert statuses == [201] * len(values)
        job.send(signal.SIGKILL)
        assert (await job.finish(10)).status == -signal.SIGKILL
    assert queue_status(queue_dir)[CACHE].queued == len(values)  # every acknowledged write
    assert await s3_values(s3_client, bucket_prefix, CACHE) == {}

    async with Job(args, env) as job:  # S3 up
        await listening_port(job)
        await until(
            lambda: s3_has(s3_client, bucket_prefix, values),
            "every object in S3",
            RECOVERY_DEADLINE_S,
        )
        job.send(signal.SIGTERM)
        restarted = await job.finish(30)
        assert restarted.status == 143
    assert queue_status(queue_dir) == {}
    stopped = [event for event in restarted.events if event["event"] == "write queue stopped"]
    assert [event["remaining"] for event in stopped] == [0]


# --------------------------------------------------------------------------------------------
# (c) poison objects: dead letters, then replay


async def test_poison_objects_end_as_dead_letters_and_reach_s3_after_replay(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(13, 20)
    poison = dict(list(values.items())[:3])
    queue_dir = tmp_path / "q"
    plan = FaultPlan(refused_keys=frozenset(object_key(key) for key in poison))
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(FaultProxy(s3_server.endpoint.url, plan))
        server = await serve(
            stack, layer_db, s3_server, bucket_prefix, proxy.url, fast_queue(queue_dir)
        )
        statuses = await write_all(http, server.url, values, spread_s=0.5)
        assert statuses == [201] * len(values)
        healthy = {key: value for key, value in values.items() if key not in poison}

        async def settled() -> bool:
            status = queue_status(queue_dir).get(CACHE)
            return status is not None and status.queued == 0 and status.dead_letters == 3

        await until(settled, "3 dead letters and an empty queue", RECOVERY_DEADLINE_S)
        assert await s3_values(s3_client, bucket_prefix, CACHE) == healthy
        assert proxy.counts["refused"] == 3  # a 400 is not retried
        dead = counter_values(server.metrics, "layer_cache_write_queue_permanent_failure")
        assert list(dead.values()) == [3]

        proxy.plan = FaultPlan()
        status = run_cli(["--write-queue-status"], {QUEUE_DIR_ENV: str(queue_dir)})
        assert status.status == 0, status.stderr
        assert '"dead_letters": 3' in status.stdout
        replay = run_cli(["--write-queue-replay", "cas"], {QUEUE_DIR_ENV: str(queue_dir)})
        assert replay.status == 0, replay.stderr
        await until(
            lambda: s3_has(s3_client, bucket_prefix, values),
            "the replayed objects in S3",
            RECOVERY_DEADLINE_S,
        )
        assert queue_status(queue_dir) == {}  # nothing queued, no dead letters
        await server.shut_down()


# --------------------------------------------------------------------------------------------
# A queue that cannot take the write


async def test_a_write_the_queue_cannot_take_is_answered_503_and_retried_later(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue_dir = tmp_path / "q"
    async with AsyncExitStack() as stack:
        server = await serve(
            stack, layer_db, s3_server, bucket_prefix, s3_server.endpoint.url, fast_queue(queue_dir)
        )
        write_back = server.server.write_back
        assert write_back is not None
        store = write_back.store
        writable = store._db
        # What a full or read-only disk does to the commit: SQLite refuses the write.
        read_only = sqlite3.connect(
            f"file:{store.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        with store._lock:
            store._db = read_only
        key, value = "0123456789abcdef", b"value"
        async with http.put(f"{server.url}/v1/{CACHE}/{key}", data=value) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "storage_unavailable"
        assert "write queue enqueue failed" in capsys.readouterr().out
        assert await pg_rows(layer_db, CACHE) == {key: value}  # kept; the retry completes it

        with store._lock:
            store._db = writable
        read_only.close()
        async with http.put(f"{server.url}/v1/{CACHE}/{key}", data=value) as response:
            assert response.status == 200  # Postgres already had it; S3 is queued now
        await until(
            lambda: s3_has(s3_client, bucket_prefix, {key: value}), "the object in S3", 10.0
        )
        await server.shut_down()
