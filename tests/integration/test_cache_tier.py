"""The cache tier in front of every persister mode, and the evict route, on the suite's real
Postgres and S3.

A tier hit is proved by taking the value away from every backend (the row deleted, the object
deleted, both directly) and still reading it, and by the S3 proxy forwarding no GET for it. The
servers run in-process with the tier ``serve_layer_cache`` builds (``plan_tier`` with byte
settings, so the test machine's memory does not matter).
"""

from __future__ import annotations

import base64
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from devenv.faults import FaultProxy
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import object_key
from tests.conftest import LayerDb
from tests.server_support import (
    MODES,
    RunningServer,
    ServerFactory,
    counter_values,
    error_of,
    hex_key,
    insert_row,
    pg_rows,
    put_object,
    s3_values,
    s3_values_once_queued_writes_land,
)
from tests.support import CACHE, SERVER, cache_bucket

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

READS_PG = {"PostgresOnly", "DualWrite", "S3Primary"}
READS_S3 = {"S3Primary", "S3Only"}
WRITES_PG = {"PostgresOnly", "DualWrite", "S3Primary"}
WRITES_S3 = {"DualWrite", "S3Primary", "S3Only"}
SNAPSHOT = CacheType.WORKSPACE_SNAPSHOT


class Tiered:
    """A running server with a cache tier, and the proxy its S3 calls go through."""

    def __init__(self, server: RunningServer, proxy: FaultProxy) -> None:
        self.server = server
        self.proxy = proxy

    @property
    def s3_gets(self) -> int:
        return self.proxy.operations["GetObject"]


StartTiered = Callable[..., Awaitable[Tiered]]


@pytest.fixture
def start_tiered(start_server: ServerFactory, tmp_path: Path) -> StartTiered:
    """Factory: ``await start_tiered(mode, disk_dir=None)`` → a server with an 8 MiB memory
    tier (and a 64 MiB disk tier in ``disk_dir`` when given), S3 through a fault proxy."""

    async def start(mode: str, *, disk_dir: Path | None = None) -> Tiered:
        env = {
            SERVER + "CACHE_MEMORY_BYTES": "8MiB",
            SERVER + "CACHE_DISK_BYTES": "64MiB",
            CACHE + "DISK_LAYER": "true" if disk_dir else "false",
            CACHE + "DISK_PATH": str(disk_dir or tmp_path / "unused"),
        }
        return Tiered(*await start_server.through_proxy(mode, env=env, tier=True))

    return start


async def take_away(
    db: LayerDb, s3_client: S3Client, bucket_prefix: str, cache_type: CacheType, keys: list[str]
) -> None:
    """Delete the keys' rows and objects directly: from now on only the tier has them."""
    table = CACHE_SPECS[cache_type].table
    await db.pool.execute(f"DELETE FROM {table} WHERE key = ANY($1::text[])", keys)
    for key in keys:
        await s3_client.delete_object(
            Bucket=cache_bucket(cache_type, bucket_prefix), Key=object_key(key)
        )
    assert not set(keys) & set(await pg_rows(db, cache_type))
    assert not set(keys) & set(await s3_values(s3_client, bucket_prefix, cache_type))


async def seed(
    mode: str, db: LayerDb, s3_client: S3Client, bucket_prefix: str, values: dict[str, bytes]
) -> None:
    """Put the values where the mode reads them."""
    for key, value in values.items():
        if mode in READS_PG:
            await insert_row(db, SNAPSHOT, key, value)
        if mode in READS_S3:
            await put_object(s3_client, bucket_prefix, SNAPSHOT, key, value)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as response:
        return response.status, await response.read()


async def bulk(http: aiohttp.ClientSession, server: RunningServer, keys: list[str]) -> Any:
    async with http.post(server.v1(SNAPSHOT, "get-bulk"), json={"keys": keys}) as response:
        assert response.status == 200
        body = await response.json()
    return {key: base64.b64decode(value) for key, value in body["values"].items()}, body["missing"]


@pytest.mark.parametrize("mode", MODES)
async def test_reads_single_and_bulk_are_served_from_the_tier_without_the_backends(
    mode: str,
    start_tiered: StartTiered,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    rng = random.Random(23)
    single, first, second = (hex_key(rng) for _ in range(3))
    values = {key: f"value of {key[:8]}".encode() * 40 for key in (single, first, second)}
    await seed(mode, layer_db, s3_client, bucket_prefix, values)
    tiered = await start_tiered(mode)
    server = tiered.server
    assert await get(http, server.v1(SNAPSHOT, single)) == (200, values[single])  # fills
    found, missing = await bulk(http, server, [first, second])  # fills
    assert found == {first: values[first], second: values[second]}
    assert missing == []

    await take_away(layer_db, s3_client, bucket_prefix, SNAPSHOT, list(values))
    gets_before = tiered.s3_gets
    assert await get(http, server.v1(SNAPSHOT, single)) == (200, values[single])
    async with http.head(server.v1(SNAPSHOT, first)) as response:
        assert (response.status, response.content_length) == (200, len(values[first]))
    found, missing = await bulk(http, server, [first, single, second])
    assert found == values
    assert missing == []
    assert tiered.s3_gets == gets_before  # not one GET reached S3
    hits = counter_values(server.metrics, "layer_cache_backend_resolved")
    table = CACHE_SPECS[SNAPSHOT].table
    memory_hits = (
        ("backend", "foyer"),
        ("cache_name", table),
        ("result", "hit"),
        ("tier", "memory"),
    )
    assert hits[memory_hits] == 4


@pytest.mark.parametrize("mode", MODES)
async def test_a_write_populates_the_tier(
    mode: str,
    start_tiered: StartTiered,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    tiered = await start_tiered(mode)
    key = hex_key(random.Random(5))
    value = b"\x00written through the server\xff"
    async with http.put(tiered.server.v1(SNAPSHOT, key), data=value) as response:
        assert response.status == 201
    if mode in WRITES_S3:  # let a queued S3 write land before taking it away
        landed = await s3_values_once_queued_writes_land(
            s3_client, bucket_prefix, SNAPSHOT, {key: value}
        )
        assert landed == {key: value}
    await take_away(layer_db, s3_client, bucket_prefix, SNAPSHOT, [key])
    assert await get(http, tiered.server.v1(SNAPSHOT, key)) == (200, value)


async def test_the_disk_tier_serves_what_it_held_after_a_restart(
    start_tiered: StartTiered,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
    tmp_path: Path,
) -> None:
    disk_dir = tmp_path / "disk-cache"
    first = await start_tiered("PostgresOnly", disk_dir=disk_dir)
    rng = random.Random(7)
    values = {hex_key(rng): rng.randbytes(3000) for _ in range(5)}
    for key, value in values.items():
        async with http.put(first.server.v1(SNAPSHOT, key), data=value) as response:
            assert response.status == 201
    disk = first.server.server.tier.disk
    assert disk is not None
    await disk.idle()
    await first.server.shut_down()

    await take_away(layer_db, s3_client, bucket_prefix, SNAPSHOT, list(values))
    second = await start_tiered("PostgresOnly", disk_dir=disk_dir)
    restarted = second.server.server.tier.disk
    assert restarted is not None
    await restarted.idle()  # the start-up scan has indexed the files
    found, missing = await bulk(http, second.server, list(values))
    assert found == values
    assert missing == []


@pytest.mark.parametrize("mode", MODES)
async def test_evict_deletes_the_row_and_clears_the_tier_but_never_the_object(
    mode: str,
    start_tiered: StartTiered,
    http: aiohttp.ClientSession,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
    tmp_path: Path,
) -> None:
    tiered = await start_tiered(mode, disk_dir=tmp_path / "disk-cache")
    server = tiered.server
    key = hex_key(random.Random(11))
    value = b"a snapshot to evict" * 10
    async with http.put(server.v1(SNAPSHOT, key), data=value) as response:
        assert response.status == 201
    if mode in WRITES_S3:
        landed = await s3_values_once_queued_writes_land(
            s3_client, bucket_prefix, SNAPSHOT, {key: value}
        )
        assert landed == {key: value}
    assert await get(http, server.v1(SNAPSHOT, key)) == (200, value)
    disk = server.server.tier.disk
    assert disk is not None
    await disk.idle()
    disk_file = tmp_path / "disk-cache" / CACHE_SPECS[SNAPSHOT].table / key[:2] / key
    assert disk_file.exists()

    async with http.delete(server.v1(SNAPSHOT, key)) as response:
        assert response.status == 204
    assert key not in await pg_rows(layer_db, SNAPSHOT)  # upstream's evict_from_pg
    in_s3 = await s3_values(s3_client, bucket_prefix, SNAPSHOT)
    assert in_s3 == ({key: value} if mode in WRITES_S3 else {})  # S3 is never deleted from
    assert not disk_file.exists()
    await take_away(layer_db, s3_client, bucket_prefix, SNAPSHOT, [key])
    status, _ = await get(http, server.v1(SNAPSHOT, key))
    assert status == 404  # the tier no longer has it either
    evictions = counter_values(server.metrics, "layer_cache_evictions")
    backends = {dict(attributes)["backend"] for attributes in evictions}
    assert backends == ({"foyer", "postgres"} if mode in WRITES_PG else {"foyer"})


async def test_evict_is_idempotent_and_refused_where_upstream_has_none(
    start_tiered: StartTiered, http: aiohttp.ClientSession
) -> None:
    server = (await start_tiered("PostgresOnly")).server
    key = hex_key(random.Random(13))
    async with http.delete(server.v1(SNAPSHOT, key)) as response:
        assert response.status == 204  # nothing there: nothing to do
    for cache_type in (CacheType.CAS, CacheType.ENCRYPTED_SECRET):
        async with http.delete(server.v1(cache_type, key)) as response:
            assert await error_of(response) == (405, "method_not_allowed")
    async with http.delete(server.v1(SNAPSHOT, "not-a-key")) as response:
        assert await error_of(response) == (400, "malformed_key")
    async with http.delete(server.v1("func_run", key)) as response:
        assert await error_of(response) == (404, "unknown_cache_type")
