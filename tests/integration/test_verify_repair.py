"""Verify, then repair: the operator's day through the CLI only, what each mode costs in S3
requests, and a repair killed and resumed.

The day runs against SeaweedFS (it checks signatures and ``Content-MD5``, and its ETags are the
MD5s of single-part objects, as AWS's are without KMS): a dry run, the backfill, three corruptions
(a deleted object, a truncated one, one byte changed at the same size), a verification that
reports them and names the repair, the repair, and a verification that finds nothing. The
request counts go through ``devenv.faults.FaultProxy`` in front of the session's S3 server, once
as it is and once made to look like an SSE-KMS bucket (ETags that are not MD5s, in PUT answers,
HEADs, GETs and listings alike).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devenv.faults import EtagRewrite, FaultPlan, FaultProxy
from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from layer_cache.keys import object_key
from tests.cli_harness import CliRun, Job, backfill_args, cli
from tests.conftest import LayerDb, service_env
from tests.support import (
    CUTOFF,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    cache_bucket,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CACHES = (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT)


async def seed(db: LayerDb, rng: random.Random, per_cache: int) -> None:
    """``per_cache`` rows below the cutoff in each of ``CACHES`` (and a few above it)."""
    for cache_type in CACHES:
        rows = [
            SeedRow(random_key(rng), rng.randbytes(rng.randint(8, 3000)), CUTOFF - timedelta(s))
            for s in range(1, per_cache + 1)
        ]
        rows += [
            SeedRow(random_key(rng), b"after the cutoff", CUTOFF + timedelta(seconds=s))
            for s in range(3)
        ]
        await insert_rows(db.pool, cache_type, rows)


def last_event(run: CliRun) -> dict[str, object]:
    return run.events[-1]


async def read(client: S3Client, bucket: str, key: str) -> bytes:
    response = await client.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        body: bytes = await stream.read()
    return body


async def test_the_operators_day_dry_run_backfill_corruption_verify_repair_verify(
    layer_db: LayerDb,
    verifying_env: dict[str, str],
    verifying_s3_client: S3Client,
    verifying_bucket_prefix: str,
    tmp_path: Path,
) -> None:
    await seed(layer_db, random.Random(2102), per_cache=40)
    env, client, prefix = verifying_env, verifying_s3_client, verifying_bucket_prefix

    # 1. A dry run: counts and estimates, writes nothing.
    dry = await cli(backfill_args("--backfill-dry-run", cache_types=CACHES), env)
    assert dry.status == 0, dry.describe()
    assert "workspace_snapshot" in dry.stdout
    assert last_event(dry)["event"] == "backfill dry run"
    assert sorted(event["cache_type"] for event in dry.named("backfill dry run")) == sorted(CACHES)

    # 2. The backfill.
    copy = await cli(backfill_args(cache_types=CACHES), env)
    assert copy.status == 0, copy.describe()
    assert last_event(copy)["event"] == "completed backfill for all cache types"
    for cache_type in CACHES:
        await assert_bucket_holds_exactly_rows_below(layer_db.pool, client, prefix, cache_type)

    # 3. Three corruptions: deleted, truncated, one byte changed at the same size.
    rows = sorted((await rows_below(layer_db.pool, CacheType.CAS, CUTOFF)).items())
    bucket = cache_bucket(CacheType.CAS, prefix)
    deleted, truncated, changed = (object_key(key) for key, _value in rows[:3])
    await client.delete_object(Bucket=bucket, Key=deleted)
    await client.put_object(Bucket=bucket, Key=truncated, Body=rows[1][1][:-1])
    flipped = bytearray(rows[2][1])
    flipped[len(flipped) // 2] ^= 0xFF
    await client.put_object(Bucket=bucket, Key=changed, Body=bytes(flipped))

    # 4. Verification by content, with a report: exit 1, the last line names report and repair.
    report = tmp_path / "differences.jsonl"
    verify_args = backfill_args(
        "--backfill-verify-content", "--backfill-verify-report", str(report), cache_types=CACHES
    )
    found = await cli(verify_args, env)
    assert found.status == 1, found.describe()
    verdict = last_event(found)
    assert verdict["event"] == "verification found differences"
    assert (verdict["differences"], verdict["missing"], verdict["mismatched"]) == (3, 1, 2)
    assert verdict["report"] == str(report)
    assert "--backfill-repair" in str(verdict["repair_with"])
    assert found.summary("cas")["status"] == "differences"
    assert found.summary("workspace_snapshot")["status"] == "completed"
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert {(line["object_key"], line["kind"]) for line in lines} == {
        (deleted, "missing"),
        (truncated, "size"),
        (changed, "content"),
    }
    by_kind = {line["kind"]: line for line in lines}
    assert by_kind["size"]["object_size"] == by_kind["size"]["row_size"] - 1
    assert by_kind["content"]["row_md5"] != by_kind["content"]["object_md5"]
    assert all(line["cache_type"] == "cas" and not line["repaired"] for line in lines)

    # 5. The repair the last line named, as given.
    repair_args = [*shlex.split(str(verdict["repair_with"])), "--log-json"]
    repaired = await cli(repair_args, env)
    assert repaired.status == 0, repaired.describe()
    finished = last_event(repaired)
    assert (finished["event"], finished["repaired"]) == ("repair finished", 3)
    assert repaired.summary("cas")["status"] == "repaired"
    assert repaired.summary()["repaired"] == 3

    # 6. Verification again: nothing differs, exit 0.
    clean = await cli(verify_args, env)
    assert clean.status == 0, clean.describe()
    assert last_event(clean)["event"] == "verification found no differences"
    assert report.read_text() == ""
    for cache_type in CACHES:
        await assert_bucket_holds_exactly_rows_below(layer_db.pool, client, prefix, cache_type)
    assert await read(client, bucket, changed) == rows[2][1]


# --------------------------------------------------------------------------------------------
# What each mode costs in S3 requests

ROWS = 300  # one listing page holds them all


async def run_counted(
    proxy: FaultProxy, args: list[str], env: Mapping[str, str]
) -> tuple[CliRun, dict[str, int]]:
    """A CLI run through the proxy, and the S3 operations it sent."""
    proxy.operations.clear()
    run = await cli(args, env)
    return run, {name: count for name, count in proxy.operations.items() if count}


@pytest.mark.parametrize(
    "encryption", [None, EtagRewrite.SSE_KMS], ids=["plain-etags", "sse-kms-etags"]
)
async def test_each_verify_mode_costs_what_the_readme_says(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    s3_client: S3Client,
    encryption: EtagRewrite | None,
) -> None:
    rng = random.Random(2103)
    rows = {
        random_key(rng): rng.randbytes(rng.randint(16, 600)) for _ in range(ROWS)
    }  # all below the cutoff, one cache
    await insert_rows(
        layer_db.pool,
        CacheType.CAS,
        [SeedRow(key, value, CUTOFF - timedelta(seconds=1)) for key, value in rows.items()],
    )
    async with FaultProxy(s3_server.endpoint.url, FaultPlan(put_etag=encryption)) as proxy:
        env = service_env(
            layer_db, dataclasses.replace(s3_server.endpoint, url=proxy.url), bucket_prefix
        )
        copied, copy_cost = await run_counted(proxy, backfill_args(), env)
        assert copied.status == 0, copied.describe()
        assert copy_cost["PutObject"] >= ROWS

        by_size, size_cost = await run_counted(proxy, backfill_args("--backfill-verify"), env)
        by_content, content_cost = await run_counted(
            proxy, backfill_args("--backfill-verify-content"), env
        )
        repair, repair_cost = await run_counted(proxy, backfill_args("--backfill-repair"), env)

    for run in (by_size, by_content, repair):
        assert run.status == 0, run.describe()
    # Every run's preflight lists each bucket once (MaxKeys=1); a repair, which writes, also
    # probes the write permission with a PUT whose Content-MD5 cannot match (moto, which checks
    # no digest, stores it and the probe deletes it; AWS refuses it, BadDigest).
    preflight = {"ListObjectsV2": 1}
    write_probe = {"PutObject": 1, "DeleteObject": 1}
    # A size check is one listing per 1,000 rows, whatever the encryption.
    assert size_cost == {"ListObjectsV2": preflight["ListObjectsV2"] + 1}
    per_row_reads = 0 if encryption is None else ROWS
    # Plain ETags are the rows' MD5s: the listing vouches for every object and nothing is read.
    # KMS ETags prove nothing: every object is read once. Nothing differs: nothing is PUT.
    reads = {"GetObject": per_row_reads} if per_row_reads else {}
    assert content_cost == {"ListObjectsV2": 2} | reads
    assert repair_cost == {"ListObjectsV2": 2} | reads | write_probe
    assert repair.summary()["repaired"] == 0


async def test_a_same_size_change_in_an_sse_kms_bucket_is_found_by_reading_and_repaired(
    layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str, s3_client: S3Client
) -> None:
    rng = random.Random(2104)
    rows = {random_key(rng): rng.randbytes(64) for _ in range(20)}
    await insert_rows(
        layer_db.pool,
        CacheType.CAS,
        [SeedRow(key, value, CUTOFF - timedelta(seconds=1)) for key, value in rows.items()],
    )
    async with FaultProxy(s3_server.endpoint.url, FaultPlan(put_etag=EtagRewrite.SSE_KMS)) as proxy:
        env = service_env(
            layer_db, dataclasses.replace(s3_server.endpoint, url=proxy.url), bucket_prefix
        )
        assert (await cli(backfill_args(), env)).status == 0
        key = sorted(rows)[7]
        bucket = cache_bucket(CacheType.CAS, bucket_prefix)
        await s3_client.put_object(Bucket=bucket, Key=object_key(key), Body=bytes(64))

        found = await cli(backfill_args("--backfill-verify-content"), env)
        repair = await cli(backfill_args("--backfill-repair"), env)
        clean = await cli(backfill_args("--backfill-verify-content"), env)

    assert found.status == 1, found.describe()
    assert found.summary()["mismatched"] == 1
    assert (repair.status, repair.summary()["repaired"]) == (0, 1), repair.describe()
    assert clean.status == 0, clean.describe()
    assert await read(s3_client, bucket, object_key(key)) == rows[key]


# --------------------------------------------------------------------------------------------
# A repair is resumable: its own saved progress


async def test_a_repair_killed_mid_way_resumes_from_its_own_progress_and_loses_nothing(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    rng = random.Random(2105)
    rows = {random_key(rng): rng.randbytes(rng.randint(16, 2000)) for _ in range(600)}
    await insert_rows(
        layer_db.pool,
        CacheType.CAS,
        [SeedRow(key, value, CUTOFF - timedelta(seconds=1)) for key, value in rows.items()],
    )
    assert (await cli(backfill_args(), env)).status == 0
    bucket = cache_bucket(CacheType.CAS, bucket_prefix)
    for key in rows:  # every object lost: the repair has to put them all back
        await s3_client.delete_object(Bucket=bucket, Key=object_key(key))
    slow = (
        "--backfill-repair",
        "--backfill-concurrency",
        "fixed",
        "--backfill-max-concurrent-uploads",
        "1",
        "--backfill-key-batch-size",
        "25",
        "--backfill-checkpoint-interval-secs",
        "0.2",
    )

    async with Job(backfill_args(*slow), env) as job:
        await job.expect(
            lambda event: event.get("event") == "backfill checkpoint" and event["processed"] >= 100,
            60.0,
        )
        assert job.kill()
        killed = await job.finish(10.0)
    assert killed.status == -9

    resumed = await cli(backfill_args(*slow), env, within_s=120)

    assert resumed.status == 0, resumed.describe()
    [resuming] = resumed.named("resuming from saved progress")
    assert int(str(resuming["rows_done_earlier_runs"])) >= 25  # at least one batch was saved
    assert 0 < resumed.summary()["repaired"] < len(rows)
    await assert_bucket_holds_exactly_rows_below(
        layer_db.pool, s3_client, bucket_prefix, CacheType.CAS
    )
    # A completed repair's record does not stop the next one: it is a fresh pass.
    again = await cli(backfill_args("--backfill-repair"), env)
    assert again.status == 0, again.describe()
    assert again.named("previous repair pass completed; starting a new pass")
    assert again.summary()["processed"] == len(rows)
