"""Helpers for the resilience tests: what S3 and the progress store hold, a strict S3 server.

The CLI itself runs through ``tests.cli_harness``. The S3 checks read listings (size and ETag, the
MD5 of a single-part PUT) rather than bodies, so they are cheap enough to run after every trial;
``tests.support.bucket_objects`` does the full byte-for-byte comparison where it matters.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import boto3  # type: ignore[import-untyped, unused-ignore]
from botocore.config import Config as BotoConfig

from devenv.s3 import MotoS3, S3Endpoint, create_buckets
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import object_key
from migrations_mode.checkpoint import Position
from migrations_mode.progress_store import (
    PROGRESS_TABLE,
    S3_PROGRESS_PREFIX,
    ProgressKey,
    SavedProgress,
    progress_from_json,
    s3_progress_object_key,
)
from migrations_mode.walk import WalkOrder
from tests.support import cache_bucket, cache_objects

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


# --------------------------------------------------------------------------------------------
# What S3 holds


def md5_hex(value: bytes) -> str:
    return hashlib.md5(value, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class StoredObject:
    size: int
    etag: str


async def list_objects(client: S3Client, bucket: str) -> dict[str, StoredObject]:
    """Every cache object of a bucket (not the progress records): object key → size and ETag."""
    listed: dict[str, StoredObject] = {}
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            if not item["Key"].startswith(S3_PROGRESS_PREFIX + "/"):
                listed[item["Key"]] = StoredObject(item["Size"], item["ETag"].strip('"'))
    return listed


def object_key_of(cache_type: CacheType, key: str) -> str:
    return object_key(key, key_strategy=CACHE_SPECS[cache_type].key_strategy)


def wrong_objects(
    cache_type: CacheType, stored: Mapping[str, StoredObject], rows: Mapping[str, bytes]
) -> list[str]:
    """Object keys whose object is not exactly one of ``rows`` (row key → value)."""
    by_object = {object_key_of(cache_type, key): value for key, value in rows.items()}
    wrong = []
    for name, item in stored.items():
        value = by_object.get(name)
        if value is None or item.size != len(value) or item.etag != md5_hex(value):
            wrong.append(name)
    return sorted(wrong)


def present_keys(
    cache_type: CacheType, stored: Mapping[str, StoredObject], rows: Mapping[str, bytes]
) -> set[str]:
    """The row keys whose object is present with the row's exact bytes."""
    present = set()
    for key, value in rows.items():
        item = stored.get(object_key_of(cache_type, key))
        if item is not None and item.size == len(value) and item.etag == md5_hex(value):
            present.add(key)
    return present


async def assert_s3_holds_exactly(
    client: S3Client, bucket_prefix: str, cache_type: CacheType, rows: Mapping[str, bytes]
) -> None:
    """Byte for byte (GETs, not ETags): the bucket holds exactly ``rows`` and nothing else."""
    expected = {object_key_of(cache_type, key): value for key, value in rows.items()}
    stored = await cache_objects(client, bucket_prefix, cache_type)
    extra = sorted(stored.keys() - expected.keys())
    missing = sorted(expected.keys() - stored.keys())
    assert not extra, f"{cache_type}: {len(extra)} objects without a row below the cutoff"
    assert not missing, f"{cache_type}: {len(missing)} rows missing from S3, e.g. {missing[:3]}"
    differ = sorted(name for name in expected if stored[name] != expected[name])
    assert not differ, f"{cache_type}: {len(differ)} objects differ from their rows"


# --------------------------------------------------------------------------------------------
# Saved progress


@dataclass
class ProgressReader:
    """Reads the job's saved progress from the store it uses (``postgres`` or ``s3``)."""

    store: str
    pool: asyncpg.Pool
    client: S3Client
    bucket_prefix: str
    cutoff: datetime
    shard: str = "0-of-1"
    order: WalkOrder = WalkOrder.KEY
    reads: int = field(default=0)

    async def load(self, cache_type: CacheType) -> SavedProgress | None:
        self.reads += 1
        if self.store == "s3":
            bucket = cache_bucket(cache_type, self.bucket_prefix)
            key = ProgressKey(cache_type, self.cutoff, self.order, bucket, self.shard)
            try:
                response = await self.client.get_object(
                    Bucket=bucket, Key=s3_progress_object_key(key, None)
                )
            except self.client.exceptions.NoSuchKey:
                return None
            async with response["Body"] as stream:
                return progress_from_json(json.loads(await stream.read()))
        if not await self.pool.fetchval("SELECT to_regclass($1) IS NOT NULL", PROGRESS_TABLE):
            return None
        record = await self.pool.fetchrow(
            f"SELECT position_created_at, position_key, completed, rows_done FROM {PROGRESS_TABLE}"
            " WHERE cache_type = $1 AND cutoff = $2 AND shard = $3 AND walk_order = $4",
            cache_type.value,
            self.cutoff,
            self.shard,
            self.order.value,
        )
        if record is None:
            return None
        position = (
            Position(record["position_created_at"], record["position_key"])
            if record["position_key"] is not None
            else None
        )
        return SavedProgress(position, record["completed"], record["rows_done"])


async def progress_objects(client: S3Client, bucket: str) -> list[str]:
    """The progress records the S3 store keeps in a bucket."""
    response = await client.list_objects_v2(Bucket=bucket, Prefix=S3_PROGRESS_PREFIX + "/")
    return [item["Key"] for item in response.get("Contents", [])]


# --------------------------------------------------------------------------------------------
# An S3 server that checks credentials


class StrictMotoS3:
    """A moto server of its own with request authentication switched on.

    The session's S3 server (moto) accepts any access key and secret: it verifies no signature
    until authentication is enabled, and enabling it there would break every other test. This
    one is private. An IAM user's access key is created while authentication is still off, then
    ``/moto-api/reset-auth`` turns it on: from then on an unknown access key gets
    ``InvalidAccessKeyId`` and a wrong secret ``SignatureDoesNotMatch``, as from AWS.
    """

    def __init__(self) -> None:
        self._server = MotoS3()
        self.access_key = ""

    @property
    def endpoint(self) -> S3Endpoint:
        return self._server.endpoint

    def start(self) -> None:
        self._server.start()
        iam = boto3.client(
            "iam",
            **self.endpoint.client_options(),
        )
        try:
            iam.create_user(UserName="backfill")
            created = iam.create_access_key(UserName="backfill")
            self.access_key = created["AccessKey"]["AccessKeyId"]
        finally:
            iam.close()
        self._set_auth(enabled=True)

    def add_buckets(self, names: Sequence[str]) -> None:
        self._set_auth(enabled=False)
        try:
            create_buckets(self.endpoint, names)
        finally:
            self._set_auth(enabled=True)

    def objects(self) -> dict[str, list[str]]:
        """The object keys of every bucket that holds any (authentication is off to look)."""
        self._set_auth(enabled=False)
        client = boto3.client(
            "s3",
            **self.endpoint.client_options(),
            config=BotoConfig(s3={"addressing_style": "path"}),
        )
        try:
            found = {}
            for bucket in client.list_buckets()["Buckets"]:
                response = client.list_objects_v2(Bucket=bucket["Name"])
                keys = [item["Key"] for item in response.get("Contents", [])]
                if keys:
                    found[bucket["Name"]] = keys
            return found
        finally:
            client.close()
            self._set_auth(enabled=True)

    def _set_auth(self, *, enabled: bool) -> None:
        # The body is the number of requests left unauthenticated ("inf": authentication off).
        request = urllib.request.Request(
            self.endpoint.url + "/moto-api/reset-auth",
            data=b"0" if enabled else b"inf",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def stop(self) -> None:
        self._server.stop()
