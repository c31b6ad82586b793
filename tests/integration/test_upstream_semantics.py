"""Where the server's failure semantics follow upstream's, on the suite's real Postgres and S3
(SeaweedFS where request signatures matter): rows carry upstream's ``sort_key``; an S3Primary bulk
read writes back the keys whose S3 GET failed; a conditional PUT never deletes an object, even
from a server that ignores ``If-None-Match`` and answers an ETag that contradicts the body; an
upload damaged on the way is read back and written again; a server without conditional writes
(501) gets unconditional PUTs after one log line.

Faults come from ``devenv.faults.FaultProxy``; what S3 and Postgres hold is read directly.
"""

from __future__ import annotations

import base64
import dataclasses
import random
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import aiohttp
import pytest
from structlog.testing import capture_logs

from devenv.faults import ConditionalPuts, EtagRewrite, FaultPlan, FaultProxy
from devenv.s3 import S3Server, SeaweedS3
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, S3LayerError
from layer_cache.keys import object_key
from layer_cache.s3 import ConditionalPuts as ClientConditionalPuts
from layer_cache.s3 import S3Layer
from services.settings import ServerConfig
from tests.conftest import LayerDb, open_s3_client
from tests.server_support import ServerFactory, hex_key, insert_row, pg_rows, put_object, s3_values
from tests.support import bucket_objects, cache_bucket, until

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CAS = CacheType.CAS
DEADLINE_S = 30.0

# Read from upstream's lib/si-layer-cache/src/db/*.rs: the constant each cache writes.
UPSTREAM_SORT_KEYS = {
    CacheType.CAS: "cas",
    CacheType.WORKSPACE_SNAPSHOT: "workspace_snapshot",
    CacheType.ENCRYPTED_SECRET: "encrypted_secret",
    CacheType.REBASE_BATCH: "rebase_batches",
    CacheType.CHANGE_BATCH: "change_batches",
    CacheType.SPLIT_SNAPSHOT_SUBGRAPH: "split_snapshot_subgraph",
    CacheType.SPLIT_SNAPSHOT_SUPERGRAPH: "split_snapshot_supergraph",
    CacheType.SPLIT_SNAPSHOT_REBASE_BATCH: "split_snapshot_rebase_batches",
}


# --------------------------------------------------------------------------------------------
# Rows as upstream writes them


async def test_every_cache_writes_upstreams_sort_key(
    start_server: ServerFactory, layer_db: LayerDb, http: aiohttp.ClientSession
) -> None:
    assert set(UPSTREAM_SORT_KEYS) == set(BACKFILLABLE_CACHE_TYPES)
    rng = random.Random(23)
    server = await start_server("PostgresOnly")
    keys = {cache_type: hex_key(rng) for cache_type in UPSTREAM_SORT_KEYS}
    for cache_type, key in keys.items():
        async with http.put(f"{server.url}/v1/{cache_type}/{key}", data=b"v") as response:
            assert response.status == 201, await response.text()
    await server.shut_down()

    for cache_type, key in keys.items():
        table = CACHE_SPECS[cache_type].table
        sort_key = await layer_db.pool.fetchval(f"SELECT sort_key FROM {table} WHERE key = $1", key)
        assert sort_key == UPSTREAM_SORT_KEYS[cache_type], (cache_type, sort_key)


# --------------------------------------------------------------------------------------------
# S3Primary: a failed S3 read is a miss for the write-back


async def test_s3_primary_bulk_read_writes_back_the_keys_whose_s3_get_failed(
    start_server: ServerFactory,
    layer_db: LayerDb,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
) -> None:
    rng = random.Random(24)
    in_pg = {hex_key(rng): rng.randbytes(300) for _ in range(12)}  # not in S3 (not backfilled)
    in_both = {hex_key(rng): rng.randbytes(300) for _ in range(4)}
    for key, value in (in_pg | in_both).items():
        await insert_row(layer_db, CAS, key, value)
    for key, value in in_both.items():
        await put_object(s3_client, bucket_prefix, CAS, key, value)
    # Every S3 GET fails (after the request's retries): S3 never says "no such key".
    every_get_fails = FaultPlan(internal_error_share=1.0, methods=frozenset({"GET"}))
    server, proxy = await start_server.through_proxy("S3Primary", plan=every_get_fails)
    keys = [*in_pg, *in_both]
    async with http.post(f"{server.url}/v1/cas/get-bulk", json={"keys": keys}) as response:
        assert response.status == 200, await response.text()
        bulk = await response.json()
    assert {key: base64.b64decode(v) for key, v in bulk["values"].items()} == in_pg | in_both
    assert proxy.counts["GET:internal_error"] >= len(keys)

    async def written_back() -> bool:
        return await s3_values(s3_client, bucket_prefix, CAS) == in_pg | in_both

    await until(written_back, "the keys S3 failed to serve, written back", DEADLINE_S, every_s=0.2)
    await server.shut_down()
    # Those S3 already had were offered too: a conditional PUT leaves them as they were.
    assert proxy.counts["PUT:forwarded"] == len(keys)


# --------------------------------------------------------------------------------------------
# Readiness through an S3 outage


@pytest.mark.parametrize(
    ("mode", "ready"), [("DualWrite", True), ("S3Primary", True), ("S3Only", False)]
)
async def test_an_s3_outage_fails_readiness_only_where_s3_is_written_directly(
    mode: str,
    ready: bool,
    layer_db: LayerDb,
    start_server: ServerFactory,
    http: aiohttp.ClientSession,
) -> None:
    """DualWrite and S3Primary queue their S3 writes durably and read Postgres past a failing
    S3, so an outage must not take every replica out of the Service: ``/readyz`` stays 200 and
    names the failing check, and a PUT is acknowledged. S3Only cannot serve without S3: 503."""
    config = ServerConfig(readiness_timeout_secs=5, grace_period_secs=1)
    server, proxy = await start_server.through_proxy(
        mode, config, plan=FaultPlan(internal_error_share=1.0)
    )
    async with http.get(f"{server.url}/readyz") as response:
        body = await response.json()
    assert body["checks"]["s3"] != "ok", body
    if ready:
        assert response.status == 200, body
        assert body["status"] == "ready"
        assert body["checks"]["postgres"] == "ok"
        key = hex_key(random.Random(mode))
        async with http.put(f"{server.url}/v1/cas/{key}", data=b"v" * 64) as response:
            assert response.status == 201, await response.text()
        assert await pg_rows(layer_db, CAS) == {key: b"v" * 64}
    else:
        assert response.status == 503, body
        assert body["error"]["code"] == "not_ready"
    assert proxy.counts["GET:internal_error"] >= 1


# --------------------------------------------------------------------------------------------
# A conditional PUT never deletes


async def test_s3_only_put_to_a_server_ignoring_the_condition_never_deletes_the_object(
    start_server: ServerFactory,
    layer_db: LayerDb,
    bucket_prefix: str,
    s3_client: S3Client,
    http: aiohttp.ClientSession,
) -> None:
    """S3Only: the object is the only copy. A server that ignores ``If-None-Match`` overwrites
    it, and its answer's ETag says the stored bytes are not the ones sent (as a damaged upload
    would): before, the PUT deleted the object."""
    rng = random.Random(25)
    existing = {hex_key(rng): rng.randbytes(500) for _ in range(3)}
    for key, value in existing.items():
        await put_object(s3_client, bucket_prefix, CAS, key, value)
    plan = FaultPlan(conditional_puts=ConditionalPuts.IGNORED, put_etag=EtagRewrite.PLAIN)
    server, proxy = await start_server.through_proxy("S3Only", plan=plan)
    for key, value in existing.items():
        async with http.put(f"{server.url}/v1/cas/{key}", data=value) as response:
            assert response.status == 201, await response.text()  # the condition was ignored
        async with http.get(f"{server.url}/v1/cas/{key}") as response:
            assert await response.read() == value
    await server.shut_down()

    assert proxy.counts["PUT:etag_rewritten"] == len(existing), proxy.counts
    assert proxy.operations["DeleteObject"] == 0, proxy.operations
    assert proxy.operations["GetObject"] >= len(existing)  # each answer checked by reading
    assert await s3_values(s3_client, bucket_prefix, CAS) == existing
    assert await pg_rows(layer_db, CAS) == {}


async def layer_through(
    stack: AsyncExitStack, endpoint_url: str, s3_server: S3Server, bucket: str, plan: FaultPlan
) -> tuple[S3Layer, FaultProxy]:
    proxy = await stack.enter_async_context(FaultProxy(endpoint_url, plan))
    endpoint = dataclasses.replace(s3_server.endpoint, url=proxy.url)
    client = await stack.enter_async_context(open_s3_client(endpoint, max_attempts=1))
    return S3Layer(client, CACHE_SPECS[CAS], bucket=bucket), proxy


async def test_an_answer_that_contradicts_the_body_is_checked_by_reading_not_by_deleting(
    s3_server: S3Server, s3_client: S3Client, bucket_prefix: str
) -> None:
    bucket = cache_bucket(CAS, bucket_prefix)
    async with AsyncExitStack() as stack:
        plan = FaultPlan(put_etag=EtagRewrite.PLAIN)
        layer, proxy = await layer_through(stack, s3_server.endpoint.url, s3_server, bucket, plan)
        # The ETag lies, the bytes are right: stored, nothing deleted, nothing sent twice.
        assert await layer.put_if_absent("a" * 64, b"the bytes sent") is True
        assert proxy.operations == {"PutObject": 1, "GetObject": 1}, proxy.operations

    assert await bucket_objects(s3_client, bucket) == {object_key("a" * 64): b"the bytes sent"}


@pytest.mark.parametrize("damaged", [1, 2])
async def test_a_damaged_upload_is_written_again_and_never_deleted(
    damaged: int, s3_server: S3Server, s3_client: S3Client, bucket_prefix: str
) -> None:
    """moto checks no ``Content-MD5``: it stores a damaged body and answers its ETag. One damaged
    PUT is repaired at once (GET, unconditional PUT); when the repair's PUT is damaged too, the
    call fails (transient) and the key's next write repairs it instead of taking a 412."""
    bucket = cache_bucket(CAS, bucket_prefix)
    key, body = "e" * 64, b"the bytes sent"
    async with AsyncExitStack() as stack:
        plan = FaultPlan(damaged_puts=damaged)
        layer, proxy = await layer_through(stack, s3_server.endpoint.url, s3_server, bucket, plan)
        with capture_logs() as events:
            if damaged == 1:
                assert await layer.put_if_absent(key, body) is True
            else:
                with pytest.raises(S3LayerError) as raised:
                    await layer.put_if_absent(key, body)
                assert (raised.value.code, raised.value.kind) == (
                    "BadDigest",
                    ErrorKind.TRANSIENT,
                )
                assert await layer.put_if_absent(key, body) is True  # the retry repairs
            assert await layer.put_if_absent(key, body) is False  # sound now: first write won
        assert proxy.counts["PUT:damaged"] == damaged
        assert proxy.operations["DeleteObject"] == 0
    warned = [event["event"] for event in events if event["log_level"] == "warning"]
    assert warned == ["s3 object damaged; writing it again"] * damaged
    assert await bucket_objects(s3_client, bucket) == {object_key(key): body}


# --------------------------------------------------------------------------------------------
# 501: a server without conditional writes


async def test_a_501_to_the_condition_switches_the_client_to_unconditional_puts_once(
    verifying_s3_server: SeaweedS3, verifying_s3_client: S3Client, verifying_bucket_prefix: str
) -> None:
    """SeaweedFS checks every request's signature, so the PUT sent after the switch is a new,
    correctly signed request (not the refused one with a header dropped)."""
    plan = FaultPlan(conditional_puts=ConditionalPuts.NOT_IMPLEMENTED)
    shared = ClientConditionalPuts()
    cas_bucket = cache_bucket(CAS, verifying_bucket_prefix)
    snapshots = CACHE_SPECS[CacheType.WORKSPACE_SNAPSHOT]
    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(FaultProxy(verifying_s3_server.endpoint.url, plan))
        endpoint = dataclasses.replace(verifying_s3_server.endpoint, url=proxy.url)
        client = await stack.enter_async_context(open_s3_client(endpoint, max_attempts=1))
        cas = S3Layer(client, CACHE_SPECS[CAS], bucket=cas_bucket, conditional_puts=shared)
        other = S3Layer(
            client,
            snapshots,
            bucket=cache_bucket(CacheType.WORKSPACE_SNAPSHOT, verifying_bucket_prefix),
            conditional_puts=shared,
        )
        with capture_logs() as events:
            assert await cas.put_if_absent("c" * 64, b"first") is True
            assert await cas.put_if_absent("c" * 64, b"first") is True  # unconditional now
            assert await other.put_if_absent("d" * 64, b"second") is True
        assert proxy.counts["not_implemented"] == 1, proxy.counts
        assert proxy.counts["PUT:forwarded"] == 3, proxy.counts
    switched = [e for e in events if e["event"].startswith("s3 conditional writes not supported")]
    assert len(switched) == 1, events
    assert not shared.supported
    assert await bucket_objects(verifying_s3_client, cas_bucket) == {object_key("c" * 64): b"first"}
