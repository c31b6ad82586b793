"""S3 over HTTPS with a private CA, as against MinIO or Ceph on premises, and as in production.

SeaweedFS (``verifying_s3_server``: it checks SigV4 signatures and ``Content-MD5``) is reached
through a TLS relay (``devenv.tls.TlsRelay``) whose certificate a CA made for this module
signed. Without ``…__OBJECT_STORAGE_CONFIG__CA_BUNDLE`` the certificate is not trusted: one
attempt, exit 3 at once with one line saying so and how to trust it, nothing written. With it,
the backfill copies every row of all eight caches over HTTPS byte for byte, where botocore signs
and checksums differently than over plain HTTP (the payload goes unsigned, ``Content-MD5``
carries the integrity); ``AWS_CA_BUNDLE`` works too; the server writes through it. A bundle
that cannot be read is exit 2, before anything connects.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from devenv.process import free_port
from devenv.s3 import S3Endpoint, SeaweedS3
from devenv.tls import LocalPki, TlsRelay, make_local_pki
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.errors import ErrorKind, PreflightError
from layer_cache.retry import RetryPolicy
from layer_cache.s3 import S3Layer
from migrations_mode.preflight import check_bucket
from services.context import CA_BUNDLE_ENV, open_services_context
from services.settings import load_settings
from tests.cli_harness import Job, backfill_args, cli, the_error_line
from tests.conftest import LayerDb, service_env
from tests.support import (
    CUTOFF,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    bucket_objects,
    cache_bucket,
    cache_objects,
    insert_rows,
    random_key,
    seed_every_cache,
    written_objects,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

ALL_BACKFILLABLE = ",".join(BACKFILLABLE_CACHE_TYPES)


@pytest.fixture(scope="module")
def s3_pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return make_local_pki(tmp_path_factory.mktemp("s3-pki"), name="si-devenv-s3")


@pytest.fixture(scope="module")
def https_relay(verifying_s3_server: SeaweedS3, s3_pki: LocalPki) -> Iterator[TlsRelay]:
    """SeaweedFS at ``https://127.0.0.1:<port>``, its certificate signed by ``s3_pki``'s CA."""
    relay = TlsRelay(verifying_s3_server.endpoint.url, s3_pki)
    relay.start()
    yield relay
    relay.stop()


@pytest.fixture
def https_env(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    https_relay: TlsRelay,
) -> dict[str, str]:
    """The service environment for SeaweedFS over HTTPS (no CA bundle yet)."""
    endpoint: S3Endpoint = replace(verifying_s3_server.endpoint, url=https_relay.url)
    return service_env(layer_db, endpoint, verifying_bucket_prefix)


async def test_an_untrusted_certificate_is_one_attempt_and_exit_3_naming_the_ca_bundle(
    layer_db: LayerDb,
    https_env: dict[str, str],
    https_relay: TlsRelay,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, the preflight retried it as a transient fault for about 8.5 s and ended in
    "cannot reach the S3 endpoint …; check …ENDPOINT", with nothing about the certificate."""
    await seed_every_cache(layer_db, random.Random(307), 5)

    run = await cli(backfill_args(cache_types="cas,change_batch"), https_env)

    assert run.status == 3, run.describe()
    message = the_error_line(run, "json")
    assert message.startswith(
        "the S3 endpoint's TLS certificate is not trusted (unable to get local issuer "
        "certificate); set SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__CA_BUNDLE"
    ), message
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == {}

    # The same check in-process: one connection, one attempt, and no time spent retrying.
    for name, value in https_env.items():
        monkeypatch.setenv(name, value)
    async with open_services_context(load_settings(), with_s3=True) as context:
        connections_before = https_relay.connections
        refused_before = https_relay.refused_handshakes
        started = time.monotonic()
        with pytest.raises(PreflightError) as refused:
            await check_bucket(context.s3_layer(CacheType.CAS), RetryPolicy())
        elapsed = time.monotonic() - started
    cause = refused.value.__cause__
    assert getattr(cause, "kind", None) is ErrorKind.UNTRUSTED_CERTIFICATE, cause
    assert https_relay.connections - connections_before == 1
    assert https_relay.refused_handshakes - refused_before == 1
    assert elapsed < 2.0, elapsed


async def test_backfill_over_https_with_the_ca_bundle_copies_every_row_byte_for_byte(
    layer_db: LayerDb,
    https_env: dict[str, str],
    https_relay: TlsRelay,
    s3_pki: LocalPki,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    rng = random.Random(311)
    await seed_every_cache(layer_db, rng, 40)
    below = CUTOFF - timedelta(seconds=1)
    edge_rows = [  # an empty value, and one SeaweedFS stores in several chunks
        SeedRow(random_key(rng), b"", below),
        SeedRow(random_key(rng), rng.randbytes(5 * 1024 * 1024 + 7), below),
    ]
    await insert_rows(layer_db.pool, CacheType.CAS, edge_rows)
    connections_before = https_relay.connections
    refused_before = https_relay.refused_handshakes
    env = https_env | {CA_BUNDLE_ENV: str(s3_pki.ca_file)}

    run = await cli(backfill_args(cache_types=ALL_BACKFILLABLE), env)

    assert run.status == 0, run.describe()
    assert https_relay.connections > connections_before  # it went over TLS
    assert https_relay.refused_handshakes == refused_before
    copied = 0
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        stored = await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, verifying_s3_client, verifying_bucket_prefix, cache_type
        )
        copied += len(stored)
    assert run.summary()["uploaded"] == copied > 8 * 10


async def test_aws_ca_bundle_is_honoured_as_botocore_documents(
    layer_db: LayerDb,
    https_env: dict[str, str],
    s3_pki: LocalPki,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    await seed_every_cache(layer_db, random.Random(313), 10)

    run = await cli(
        backfill_args(cache_types="cas"), https_env | {"AWS_CA_BUNDLE": str(s3_pki.ca_file)}
    )

    assert run.status == 0, run.describe()
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, verifying_s3_client, verifying_bucket_prefix, CacheType.CAS
    )


async def test_over_https_puts_carry_content_md5_no_flexible_checksum_and_arrive_intact(
    https_env: dict[str, str],
    s3_pki: LocalPki,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over TLS botocore leaves the payload unsigned (``UNSIGNED-PAYLOAD``) where over HTTP it
    signs its SHA-256: ``Content-MD5`` is then all that protects the body, and botocore's
    aws-chunked upload with a checksum trailer must stay off. SeaweedFS checks both."""
    for name, value in (https_env | {CA_BUNDLE_ENV: str(s3_pki.ca_file)}).items():
        monkeypatch.setenv(name, value)
    bucket = cache_bucket(CacheType.CAS, verifying_bucket_prefix)
    small, large = random.randbytes(10_000), random.randbytes(3 * 1024 * 1024)
    headers_sent: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        headers_sent.append(
            {
                name.lower(): value.decode() if isinstance(value, bytes) else value
                for name, value in request.headers.items()
            }
        )

    async with open_services_context(load_settings(), with_s3=True) as context:
        assert context.s3_client is not None
        context.s3_client.meta.events.register("before-send.s3.PutObject", record)
        layer = S3Layer(context.s3_client, CACHE_SPECS[CacheType.CAS], bucket=bucket)
        await layer.put("small", small)
        await layer.put("large", large)
        nothing_stored = await layer.probe_write_permission("ab/probe")

    stored = await bucket_objects(verifying_s3_client, bucket)
    assert sorted(stored.values(), key=len) == [small, large]
    assert nothing_stored  # SeaweedFS refused the probe's wrong Content-MD5 over TLS too
    for headers in headers_sent[:2]:
        assert "content-md5" in headers
        assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
        assert [name for name in headers if "checksum" in name or "trailer" in name] == []
        assert "aws-chunked" not in headers.get("content-encoding", "")


@pytest.mark.parametrize("case", ["missing", "not-a-certificate"])
async def test_an_unusable_ca_bundle_is_exit_2_before_connecting(
    https_env: dict[str, str], tmp_path: Path, case: str
) -> None:
    bundle = tmp_path / "bundle.pem"
    if case == "not-a-certificate":
        bundle.write_text("not a certificate\n")
    env = https_env | {
        CA_BUNDLE_ENV: str(bundle),
        # nothing listens there: had it connected first, this would be exit 3
        "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__PORT": str(free_port()),
    }

    run = await cli(backfill_args(cache_types="cas"), env)

    assert run.status == 2, run.describe()
    message = the_error_line(run, "json")
    assert message.startswith(f"{CA_BUNDLE_ENV}: cannot read the CA bundle {bundle} ("), message


async def test_the_server_writes_to_s3_over_https_with_the_ca_bundle(
    https_env: dict[str, str],
    s3_pki: LocalPki,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    env = https_env | {
        CA_BUNDLE_ENV: str(s3_pki.ca_file),
        "SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE": "S3Only",  # a PUT answers once S3 has it
    }
    key, value = random_key(random.Random(317)), random.randbytes(70_000)
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json"]
    async with Job(args, env) as job:
        listening = await job.expect(
            lambda event: event["event"] == "layer cache server listening", 30.0
        )
        url = f"http://127.0.0.1:{listening['port']}/v1/cas/{key}"
        async with aiohttp.ClientSession() as session:
            async with session.put(url, data=value) as response:
                assert response.status == 201, await response.text()
            async with session.get(url) as response:
                assert await response.read() == value
        job.kill()

    stored = await cache_objects(verifying_s3_client, verifying_bucket_prefix, CacheType.CAS)
    assert list(stored.values()) == [value], sorted(stored)
