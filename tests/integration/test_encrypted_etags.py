"""PUTs into encrypted buckets (SSE-KMS, DSSE-KMS, SSE-C), whose ETags are not the body's MD5.

``devenv.faults.FaultProxy`` sits between the product and the session's real S3 server and
rewrites every stored PUT's answer as an encrypting bucket sends it: another 32-hex ETag plus the
encryption headers (``EtagRewrite``). The backfill (``python -m services``) and the layer cache
server (``put_if_absent`` under DualWrite and S3Primary) must take such an answer as success and
keep the object; an ETag that differs *without* an encryption header is still a damaged upload
(``BadDigest``) for an unconditional PUT, and for ``put_if_absent`` a reason to read the object
back (never to delete it).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

import aiohttp
import pytest

from devenv.faults import EtagRewrite, FaultPlan, FaultProxy
from devenv.s3 import S3Server
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, S3LayerError
from layer_cache.s3 import S3Layer
from tests.cli_harness import backfill_args, cli
from tests.conftest import LayerDb, open_s3_client
from tests.faults_support import assert_s3_holds_exactly
from tests.server_support import ServerFactory
from tests.support import (
    CUTOFF,
    SeedRow,
    cache_bucket,
    cache_objects,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

ENCRYPTED = [EtagRewrite.SSE_KMS, EtagRewrite.DSSE_KMS, EtagRewrite.SSE_C]
DEADLINE_S = 20.0


def rewriting(rewrite: EtagRewrite) -> FaultPlan:
    return FaultPlan(put_etag=rewrite)


@asynccontextmanager
async def layer_via_proxy(
    s3_server: S3Server, bucket_prefix: str, rewrite: EtagRewrite
) -> AsyncIterator[tuple[S3Layer, FaultProxy]]:
    """The CAS bucket's ``S3Layer`` on a client that talks to S3 through a rewriting proxy."""
    async with FaultProxy(s3_server.endpoint.url, rewriting(rewrite)) as proxy:
        endpoint = dataclasses.replace(s3_server.endpoint, url=proxy.url)
        async with open_s3_client(endpoint, max_attempts=1) as client:
            spec = CACHE_SPECS[CacheType.CAS]
            yield S3Layer(client, spec, bucket=cache_bucket(CacheType.CAS, bucket_prefix)), proxy


# --------------------------------------------------------------------------------------------
# The backfill


@pytest.mark.parametrize("rewrite", ENCRYPTED, ids=[rewrite.name for rewrite in ENCRYPTED])
async def test_backfill_into_an_encrypted_bucket_completes_without_bad_digest_retries(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
    rewrite: EtagRewrite,
) -> None:
    rng = random.Random(f"encrypted-{rewrite}")
    rows = [
        SeedRow(random_key(rng), rng.randbytes(rng.randint(1, 4096)), CUTOFF - timedelta(seconds=i))
        for i in range(1, 61)
    ]
    await insert_rows(layer_db.pool, CacheType.CAS, rows)
    below = await rows_below(layer_db.pool, CacheType.CAS, CUTOFF)
    args = backfill_args(
        # A small budget: before the fix, every PUT ended in BadDigest until it ran out.
        "--backfill-retry-max-attempts",
        "3",
        "--backfill-retry-max-secs",
        "5",
        cache_types=[CacheType.CAS],
    )
    storage = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__ENDPOINT"

    async with FaultProxy(s3_server.endpoint.url, rewriting(rewrite)) as proxy:
        run = await cli(args, {**env, storage: proxy.url}, within_s=90)
        counts = dict(proxy.counts)

    assert run.status == 0, run.describe()
    assert counts.get("PUT:etag_rewritten", 0) >= len(below), counts  # every PUT was rewritten
    assert run.named("retrying storage call") == []
    assert run.summary()["retries_by_class"] == {}, run.summary()
    assert run.summary("cas")["status"] == "completed"
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, below)


async def test_backfill_still_fails_on_an_etag_that_differs_without_encryption(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    bucket_prefix: str,
) -> None:
    rng = random.Random("plain-etag")
    rows = [SeedRow(random_key(rng), rng.randbytes(64), CUTOFF - timedelta(seconds=1))]
    await insert_rows(layer_db.pool, CacheType.CAS, rows)
    args = backfill_args(
        "--backfill-retry-max-attempts",
        "2",
        "--backfill-retry-max-secs",
        "3",
        cache_types=[CacheType.CAS],
    )
    storage = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__ENDPOINT"

    async with FaultProxy(s3_server.endpoint.url, rewriting(EtagRewrite.PLAIN)) as proxy:
        run = await cli(args, {**env, storage: proxy.url}, within_s=90)

    assert run.status == 1, run.describe()
    [failed] = run.named("backfill failed")
    assert failed["error_class"] == "transient", failed
    assert "BadDigest" in failed["error"] or "not the MD5" in failed["error"], failed
    retried = run.named("retrying storage call")
    assert retried, run.describe()
    assert all("not the MD5" in event["error"] for event in retried), retried


# --------------------------------------------------------------------------------------------
# The layer itself: both PUT paths


@pytest.mark.parametrize("rewrite", ENCRYPTED, ids=[rewrite.name for rewrite in ENCRYPTED])
async def test_encrypted_put_answers_are_success_on_both_put_paths_and_nothing_is_deleted(
    s3_server: S3Server, s3_client: S3Client, bucket_prefix: str, rewrite: EtagRewrite
) -> None:
    async with layer_via_proxy(s3_server, bucket_prefix, rewrite) as (layer, proxy):
        await layer.put("a" * 64, b"stored with put")
        assert await layer.put_if_absent("b" * 64, b"stored with put_if_absent") is True
        assert await layer.put_if_absent("b" * 64, b"second write") is False
        assert proxy.counts["PUT:etag_rewritten"] == 2, proxy.counts
        assert proxy.counts["DELETE:forwarded"] == 0, proxy.counts

    stored = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    assert stored == {
        layer.object_key("a" * 64): b"stored with put",
        layer.object_key("b" * 64): b"stored with put_if_absent",
    }


async def test_an_etag_that_differs_without_encryption_is_a_bad_digest_and_deletes_nothing(
    s3_server: S3Server, s3_client: S3Client, bucket_prefix: str
) -> None:
    async with layer_via_proxy(s3_server, bucket_prefix, EtagRewrite.PLAIN) as (layer, proxy):
        with pytest.raises(S3LayerError) as put_error:
            await layer.put("c" * 64, b"damaged on the way")
        # put_if_absent reads the object back: its bytes are the ones sent, so it is kept.
        assert await layer.put_if_absent("d" * 64, b"intact after all") is True
        assert proxy.counts["DELETE:forwarded"] == 0, proxy.counts

    assert (put_error.value.code, put_error.value.kind) == ("BadDigest", ErrorKind.TRANSIENT)
    stored = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    assert stored == {
        layer.object_key("c" * 64): b"damaged on the way",
        layer.object_key("d" * 64): b"intact after all",
    }


# --------------------------------------------------------------------------------------------
# The layer cache server: put_if_absent behind PUT /v1/…


@pytest.mark.parametrize("mode", ["DualWrite", "S3Primary"])
@pytest.mark.parametrize("rewrite", ENCRYPTED, ids=[rewrite.name for rewrite in ENCRYPTED])
async def test_server_put_into_an_encrypted_bucket_answers_created_and_keeps_the_object(
    start_server: ServerFactory,
    layer_db: LayerDb,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    mode: str,
    rewrite: EtagRewrite,
) -> None:
    key, value = random_key(random.Random(mode + rewrite)), b"\x00an encrypted value\xff"
    server, proxy = await start_server.through_proxy(mode, plan=rewriting(rewrite))
    async with http.put(server.v1("cas", key), data=value) as response:
        assert response.status == 201, await response.text()
    async with http.put(server.v1("cas", key), data=b"second") as response:
        assert response.status == 200, await response.text()
    await server.shut_down()  # the queued S3 write drained
    counts = dict(proxy.counts)

    assert counts.get("PUT:etag_rewritten") == 1, counts
    assert counts.get("DELETE:forwarded", 0) == 0, counts
    stored = await cache_objects(s3_client, bucket_prefix, CacheType.CAS)
    assert list(stored.values()) == [value]
    table = CACHE_SPECS[CacheType.CAS].table
    assert await layer_db.pool.fetchval(f"SELECT value FROM {table} WHERE key = $1", key) == value
