"""The durable S3 write queue and the Postgres retry queue end to end: the server over the suite's
real Postgres and S3, with S3 made unavailable by the fault proxy (503 to everything), by a closed
port (connection refused), by kill -9 of the server process, by poison objects the proxy refuses
with a 400, by a bucket the proxy refuses with a 403 or that does not exist, and by a server
without conditional writes (501); and Postgres made unavailable by closing a TCP relay in front
of it.

What S3 holds is read directly from the buckets, byte for byte; the queues' state is read from
their SQLite files with ``queue_status`` while the server runs (WAL readers do not block it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest
from structlog.testing import capture_logs

from devenv.faults import ConditionalPuts, FaultPlan, FaultProxy
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name, object_key
from layer_cache.write_queue import PG_RETRY_QUEUE, S3_ATTEMPTS_METRIC, queue_status
from services.settings import ServerConfig
from tests.cli_harness import WRITE_QUEUE_DIR_ENV, Job, run_cli
from tests.conftest import LayerDb
from tests.server_support import (
    RunningServer,
    ServerFactory,
    counter_values,
    hex_key,
    metric_values,
    pg_rows,
    s3_values,
)
from tests.support import PG, S3_ENDPOINT, until

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

OUTAGE_S = 30.0
RECOVERY_DEADLINE_S = 60.0
CACHE = CacheType.CAS
# The real server (``python -m services`` in skip mode), as the kill -9 tests run it.
SERVE_ARGS = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json"]

# Each check of S3 lists and reads a bucket: five times a second is enough.
settle = functools.partial(until, every_s=0.2)


def fast_queue(directory: Path, max_attempts: int | None = None) -> ServerConfig:
    """Short backoff (0.2 s doubling to 2 s), so recovery shows within seconds."""
    return ServerConfig(
        write_queue_dir=directory,
        write_queue_base_delay_secs=0.2,
        write_queue_max_delay_secs=2.0,
        write_queue_max_attempts=max_attempts,
        grace_period_secs=3.0,
    )


def queue_env(env: dict[str, str], queue_dir: Path) -> dict[str, str]:
    """The job's environment with its write queue in ``queue_dir`` and backoff capped at 2 s."""
    return env | {
        WRITE_QUEUE_DIR_ENV: str(queue_dir),
        "SI_SDF__SERVER__WRITE_QUEUE_MAX_DELAY_SECS": "2",
    }


async def write_all(
    http: aiohttp.ClientSession,
    url: str,
    values: dict[str, bytes],
    spread_s: float,
    cache_type: CacheType = CACHE,
) -> list[int]:
    """PUT every value from 8 concurrent clients, spread over ``spread_s`` seconds."""
    pending = list(values.items())
    pause = spread_s / max(1, len(pending)) * 8
    statuses: list[int] = []

    async def client() -> None:
        while pending:
            key, value = pending.pop()
            async with http.put(f"{url}/v1/{cache_type}/{key}", data=value) as response:
                statuses.append(response.status)
            await asyncio.sleep(pause)

    await asyncio.gather(*(client() for _ in range(8)))
    return statuses


def random_values(seed: int, count: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {hex_key(rng): rng.randbytes(rng.randint(1, 20_000)) for _ in range(count)}


async def s3_has(
    s3_client: S3Client,
    bucket_prefix: str,
    expected: dict[str, bytes],
    cache_type: CacheType = CACHE,
) -> bool:
    return await s3_values(s3_client, bucket_prefix, cache_type) == expected


def s3_attempts(server: RunningServer) -> dict[str, int]:
    """The write queue's ``s3_write_attempts`` by ``result`` (upstream's series)."""
    results: dict[str, int] = {}
    for attributes, value in counter_values(server.metrics, S3_ATTEMPTS_METRIC).items():
        result = dict(attributes)["result"]
        results[result] = results.get(result, 0) + value
    return results


def blocked(server: RunningServer, cache_type: CacheType) -> tuple[float, str | None]:
    """The write queue's blocked gauge for one cache type: (value, reason)."""
    for attributes, value in metric_values(
        server.metrics, "layer_cache_write_queue_blocked"
    ).items():
        labels = dict(attributes)
        if labels["cache_type"] == cache_type.value:
            return value, labels.get("reason")
    raise AssertionError(f"no blocked gauge for {cache_type}")


# --------------------------------------------------------------------------------------------
# (a) S3 down for 30 s while clients write


class Relay:
    """A TCP relay on a fixed port to the S3 server; closed, the port refuses connections."""

    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


@pytest.fixture
async def relay_to() -> AsyncIterator[Callable[[int], Relay]]:
    """Factory: ``relay_to(port)`` → a relay, not yet open, from a free port to that loopback
    port; every relay is closed when the test ends."""
    relays: list[Relay] = []

    def relay(upstream_port: int) -> Relay:
        relays.append(Relay(free_port(), upstream_port))
        return relays[-1]

    try:
        yield relay
    finally:
        for opened in relays:
            await opened.close()


@pytest.mark.parametrize("outage", ["503", "refused"])
async def test_every_write_during_a_30_s_s3_outage_is_acknowledged_and_reaches_s3(
    outage: str,
    start_server: ServerFactory,
    relay_to: Callable[[int], Relay],
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(11, 60)
    queue_dir = tmp_path / "q"
    if outage == "503":
        server, proxy = await start_server.through_proxy(
            config=fast_queue(queue_dir), plan=FaultPlan(slowdown_share=1.0)
        )
    else:
        relay = relay_to(int(s3_server.endpoint.url.rsplit(":", 1)[1]))  # not open: refused
        server = await start_server(config=fast_queue(queue_dir), s3_url=relay.url)
    started = time.monotonic()
    statuses = await write_all(http, server.url, values, spread_s=OUTAGE_S - 5)
    assert statuses == [201] * len(values)  # every write acknowledged while S3 is down
    assert await pg_rows(layer_db, CACHE) == values
    assert await s3_values(s3_client, bucket_prefix, CACHE) == {}
    assert queue_status(queue_dir)[CACHE].queued == len(values)
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - started)))

    if outage == "503":
        proxy.plan = FaultPlan()
    else:
        await relay.open()
    await settle(
        lambda: s3_has(s3_client, bucket_prefix, values), "every object in S3", RECOVERY_DEADLINE_S
    )
    assert queue_status(queue_dir) == {}
    await server.shut_down()

    results = s3_attempts(server)
    assert results["retry"] > 0
    assert results["success"] == len(values)
    assert "dead_letter_queue" not in results


# --------------------------------------------------------------------------------------------
# (b) kill -9 with a non-empty queue


async def listening_port(job: Job) -> int:
    event = await job.expect(lambda event: event["event"] == "layer cache server listening", 30.0)
    return int(event["port"])


async def test_a_server_killed_with_a_full_queue_drains_it_after_restart(
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(12, 50)
    queue_dir = tmp_path / "q"
    env = queue_env(env, queue_dir)

    down = env | {S3_ENDPOINT: f"http://127.0.0.1:{free_port()}"}  # connection refused
    async with Job(SERVE_ARGS, down) as job:
        port = await listening_port(job)
        statuses = await write_all(http, f"http://127.0.0.1:{port}", values, spread_s=1.0)
        assert statuses == [201] * len(values)
        job.send(signal.SIGKILL)
        assert (await job.finish(10)).status == -signal.SIGKILL
    assert queue_status(queue_dir)[CACHE].queued == len(values)  # every acknowledged write
    assert await s3_values(s3_client, bucket_prefix, CACHE) == {}

    async with Job(SERVE_ARGS, env) as job:  # S3 up
        await listening_port(job)
        await settle(
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


@dataclass
class Poisoned:
    """A server whose S3 refuses the first ``poison`` of ``values`` (a 400 on every PUT)."""

    server: RunningServer
    proxy: FaultProxy
    values: dict[str, bytes]
    poison: dict[str, bytes]
    queue_dir: Path

    @property
    def healthy(self) -> dict[str, bytes]:
        return {key: value for key, value in self.values.items() if key not in self.poison}


async def poisoned(
    start_server: ServerFactory,
    tmp_path: Path,
    *,
    seed: int,
    poison: int,
    max_attempts: int | None = None,
) -> Poisoned:
    """20 values to write, the first ``poison`` of them refused by S3; a fast queue in
    ``tmp_path / "q"`` (dead letters after ``max_attempts``, when given)."""
    values = random_values(seed, 20)
    refused = dict(list(values.items())[:poison])
    queue_dir = tmp_path / "q"
    plan = FaultPlan(refused_keys=frozenset(object_key(key) for key in refused))
    server, proxy = await start_server.through_proxy(
        config=fast_queue(queue_dir, max_attempts), plan=plan
    )
    return Poisoned(server, proxy, values, refused, queue_dir)


async def test_poison_objects_end_as_dead_letters_with_the_opt_in_cap_and_reach_s3_after_replay(
    start_server: ServerFactory,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    run = await poisoned(start_server, tmp_path, seed=13, poison=3, max_attempts=3)
    server, proxy, values, queue_dir = run.server, run.proxy, run.values, run.queue_dir
    statuses = await write_all(http, server.url, values, spread_s=0.5)
    assert statuses == [201] * len(values)
    healthy = run.healthy

    async def settled() -> bool:
        status = queue_status(queue_dir).get(CACHE)
        return status is not None and status.queued == 0 and status.dead_letters == 3

    await settle(settled, "3 dead letters and an empty queue", RECOVERY_DEADLINE_S)
    assert await s3_values(s3_client, bucket_prefix, CACHE) == healthy
    assert proxy.counts["refused"] == 3 * 3  # retried up to the cap, then given up
    assert s3_attempts(server)["dead_letter_queue"] == 3

    proxy.plan = FaultPlan()
    status = run_cli(["--write-queue-status"], {WRITE_QUEUE_DIR_ENV: str(queue_dir)})
    assert status.status == 0, status.stderr
    assert json.loads(status.stdout)["s3"]["cas"]["dead_letters"] == 3
    replay = run_cli(["--write-queue-replay", "cas"], {WRITE_QUEUE_DIR_ENV: str(queue_dir)})
    assert replay.status == 0, replay.stderr
    await settle(
        lambda: s3_has(s3_client, bucket_prefix, values),
        "the replayed objects in S3",
        RECOVERY_DEADLINE_S,
    )
    assert queue_status(queue_dir) == {}  # nothing queued, no dead letters
    await server.shut_down()


async def test_poison_objects_are_retried_by_default_and_never_hold_the_others(
    start_server: ServerFactory,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    run = await poisoned(start_server, tmp_path, seed=14, poison=2)
    server, proxy, values, queue_dir = run.server, run.proxy, run.values, run.queue_dir
    poison = run.poison
    with capture_logs() as events:
        assert await write_all(http, server.url, values, spread_s=0.5) == [201] * len(values)
        healthy = run.healthy
        await settle(lambda: s3_has(s3_client, bucket_prefix, healthy), "the healthy objects", 30.0)

        async def retried() -> bool:
            return proxy.counts["refused"] >= 3 * len(poison)

        await settle(retried, "the poison objects retried", 30.0)
        status = queue_status(queue_dir)[CACHE]
        assert (status.queued, status.dead_letters) == (len(poison), 0)  # kept, not given up
        assert blocked(server, CACHE) == (0, None)  # an unexplained 400 holds nothing

        proxy.plan = FaultPlan()  # the server takes them now
        await settle(
            lambda: s3_has(s3_client, bucket_prefix, values), "every object", RECOVERY_DEADLINE_S
        )
        await server.shut_down()
    failing = [event for event in events if event["event"] == "write queue entry failing"]
    assert sorted(event["key"] for event in failing) == sorted(poison)  # once per entry
    assert "dead_letter_queue" not in s3_attempts(server)


HELD = CacheType.WORKSPACE_SNAPSHOT


@pytest.mark.parametrize("refusal", ["access_denied", "missing_bucket"])
async def test_an_error_an_operator_fixes_holds_that_cache_type_until_fixed_and_others_flow(
    refusal: str,
    start_server: ServerFactory,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    flowing, held = random_values(15, 12), random_values(16, 12)
    queue_dir = tmp_path / "q"
    held_bucket = bucket_name(CACHE_SPECS[HELD].table, bucket_prefix)
    plan = FaultPlan()
    if refusal == "access_denied":  # a bucket policy that denies this server
        plan = FaultPlan(access_denied_buckets=frozenset({held_bucket}))
    else:  # the bucket was never created: S3's own NoSuchBucket
        await s3_client.delete_bucket(Bucket=held_bucket)
    server, proxy = await start_server.through_proxy(config=fast_queue(queue_dir), plan=plan)
    with capture_logs() as events:
        statuses = await write_all(http, server.url, held, spread_s=0.5, cache_type=HELD)
        statuses += await write_all(http, server.url, flowing, spread_s=0.5)
        assert statuses == [201] * (len(held) + len(flowing))
        await settle(
            lambda: s3_has(s3_client, bucket_prefix, flowing), "the other bucket's objects", 30
        )
        await asyncio.sleep(4.0)  # held: one probe at a time, at most every 2 s
        status = queue_status(queue_dir)[HELD]
        assert (status.queued, status.dead_letters) == (len(held), 0)
        assert blocked(server, HELD) == (1, refusal)
        assert blocked(server, CACHE) == (0, None)
        attempts = proxy.operations["PutObject"] + proxy.counts["PUT:access_denied"]
        assert attempts < len(flowing) + len(held) + 8, proxy.counts  # probes, not a storm

        if refusal == "access_denied":  # the operator fixes it
            proxy.plan = FaultPlan()
        else:
            await s3_client.create_bucket(Bucket=held_bucket)
        await settle(
            lambda: s3_has(s3_client, bucket_prefix, held, HELD),
            "the held objects once fixed",
            RECOVERY_DEADLINE_S,
        )
        assert queue_status(queue_dir) == {}
        assert blocked(server, HELD) == (0, None)
        await server.shut_down()
    said = [
        (event["event"], event["cache_type"])
        for event in events
        if event["event"] in ("write queue held", "write queue resumed")
    ]
    assert said == [("write queue held", HELD.value), ("write queue resumed", HELD.value)]
    assert "dead_letter_queue" not in s3_attempts(server)


async def test_a_server_without_conditional_writes_gets_unconditional_puts_after_one_501(
    start_server: ServerFactory,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(17, 20)
    plan = FaultPlan(conditional_puts=ConditionalPuts.NOT_IMPLEMENTED)
    server, proxy = await start_server.through_proxy(config=fast_queue(tmp_path / "q"), plan=plan)
    with capture_logs() as events:
        assert await write_all(http, server.url, values, spread_s=0.5) == [201] * len(values)
        await settle(lambda: s3_has(s3_client, bucket_prefix, values), "every object", 30.0)
        await server.shut_down()
    switched = [e for e in events if e["event"].startswith("s3 conditional writes not supported")]
    assert len(switched) == 1, switched
    # Every 501 came from PUTs sent before the switch (at most one per queue worker in flight).
    assert 1 <= proxy.counts["not_implemented"] <= ServerConfig().write_queue_workers
    assert proxy.operations["PutObject"] == len(values)
    assert "dead_letter_queue" not in s3_attempts(server)


# --------------------------------------------------------------------------------------------
# Postgres down: the retry queue


@pytest.mark.parametrize("mode", ["DualWrite", "S3Primary"])
async def test_postgres_down_during_puts_acknowledges_them_and_the_rows_arrive_after_recovery(
    mode: str,
    start_server: ServerFactory,
    relay_to: Callable[[int], Relay],
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(18, 15)
    queue_dir = tmp_path / "q"
    relay = relay_to(layer_db.endpoint.port)
    await relay.open()
    server = await start_server(mode, fast_queue(queue_dir), pg_port=relay.port)
    await relay.close()  # Postgres is gone: connections cut, new ones refused
    statuses = await write_all(http, server.url, values, spread_s=0.5)
    assert statuses == [201] * len(values)  # acknowledged: S3 has them queued
    assert await pg_rows(layer_db, CACHE) == {}
    assert queue_status(queue_dir, PG_RETRY_QUEUE)[CACHE].queued == len(values)
    await settle(lambda: s3_has(s3_client, bucket_prefix, values), "every object in S3", 30)
    status = run_cli(["--write-queue-status"], {WRITE_QUEUE_DIR_ENV: str(queue_dir)})
    assert status.status == 0, status.stderr
    assert json.loads(status.stdout)["postgres"]["cas"]["queued"] == len(values)

    await relay.open()
    await settle(lambda: pg_has(layer_db, values), "every row in Postgres", RECOVERY_DEADLINE_S)
    assert queue_status(queue_dir, PG_RETRY_QUEUE) == {}
    await server.shut_down()

    enqueued = counter_values(server.metrics, "layer_cache_retry_queue_enqueued")
    assert sum(enqueued.values()) == len(values)
    assert all(dict(attributes)["backend"] == "postgres" for attributes in enqueued)
    success = counter_values(server.metrics, "layer_cache_retry_queue_success")
    assert sum(success.values()) == len(values)


async def pg_has(layer_db: LayerDb, expected: dict[str, bytes]) -> bool:
    return await pg_rows(layer_db, CACHE) == expected


async def test_acknowledged_postgres_retries_survive_kill_9_and_arrive_after_restart(
    relay_to: Callable[[int], Relay],
    layer_db: LayerDb,
    env: dict[str, str],
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    values = random_values(19, 30)
    queue_dir = tmp_path / "q"
    env = queue_env(env, queue_dir)

    relay = relay_to(layer_db.endpoint.port)
    await relay.open()
    async with Job(SERVE_ARGS, env | {PG + "PORT": str(relay.port)}) as job:
        port = await listening_port(job)
        await relay.close()
        statuses = await write_all(http, f"http://127.0.0.1:{port}", values, spread_s=1.0)
        assert statuses == [201] * len(values)
        job.send(signal.SIGKILL)
        assert (await job.finish(10)).status == -signal.SIGKILL
    assert queue_status(queue_dir, PG_RETRY_QUEUE)[CACHE].queued == len(values)
    assert await pg_rows(layer_db, CACHE) == {}

    async with Job(SERVE_ARGS, env) as job:  # Postgres reachable again
        await listening_port(job)
        await settle(lambda: pg_has(layer_db, values), "every row in Postgres", RECOVERY_DEADLINE_S)
        await settle(lambda: s3_has(s3_client, bucket_prefix, values), "every object in S3", 30)
        job.send(signal.SIGTERM)
        restarted = await job.finish(30)
        assert restarted.status == 143
    assert queue_status(queue_dir, PG_RETRY_QUEUE) == {}
    stopped = [e for e in restarted.events if e["event"] == "postgres retry queue stopped"]
    assert [event["remaining"] for event in stopped] == [0]


# --------------------------------------------------------------------------------------------
# A queue that cannot take the write


async def test_a_write_the_queue_cannot_take_is_answered_503_and_retried_later(
    start_server: ServerFactory,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = await start_server(config=fast_queue(tmp_path / "q"))
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
    await settle(lambda: s3_has(s3_client, bucket_prefix, {key: value}), "the object in S3", 10.0)
    await server.shut_down()
