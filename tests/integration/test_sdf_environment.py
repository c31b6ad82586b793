"""The Job run with upstream sdf's whole environment (tests/data/sdf_env.json), end to end.

The recorded environment names every section upstream sdf's config defines (its main database,
NATS, crypto keys, JWT, posthog, spicedb, audit, the layer db's pool timeouts, certificate,
read-retry and write-queue settings, and the ``SI_SDF__BACKFILL_…`` names); the layer-db
connection and the S3 target point at the test servers. The CLI must run the backfill from it
to exit 0 with every row in S3, name the ignored settings in one debug line, and never print a
value that looks like a secret. A misspelt name that we read still exits 2 with a suggestion.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from tests.cli_harness import cli
from tests.conftest import LayerDb
from tests.support import (
    CUTOFF,
    SeedRow,
    cache_objects,
    expected_objects,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

DATA = Path(__file__).resolve().parent.parent / "data"
RECORDED = json.loads((DATA / "sdf_env.json").read_text())
CACHES = (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT, CacheType.ENCRYPTED_SECRET)  # recorded
HOSTNAME = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__HOSTNAME"


def recorded_environment(
    layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str
) -> dict[str, str]:
    """The recorded environment with the test servers filled in."""
    pg, s3 = layer_db.endpoint, s3_server.endpoint
    servers = {
        "pg_host": pg.host,
        "pg_port": str(pg.port),
        "pg_user": pg.user,
        "pg_password": pg.password,
        "pg_dbname": layer_db.dbname,
        "pg_ca_cert": str(DATA / "sdf-env-pg-ca.pem"),
        "s3_endpoint": s3.url,
        "s3_region": s3.region,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "bucket_prefix": bucket_prefix,
    }
    environment: Mapping[str, str] = RECORDED["environment"]
    return {name: value.format_map(servers) for name, value in environment.items()}


def secret_values() -> list[str]:
    environment: Mapping[str, str] = RECORDED["environment"]
    return [environment[name] for name in RECORDED["secret_looking"]]


async def seed(layer_db: LayerDb) -> dict[CacheType, dict[str, bytes]]:
    rng = random.Random(4)
    for cache_type in (*CACHES, CacheType.REBASE_BATCH):  # rebase_batch is not selected
        rows = [
            SeedRow(
                random_key(rng),
                rng.randbytes(rng.randint(1, 3000)),
                CUTOFF - timedelta(seconds=rng.randint(-3600, 86_400)),
            )
            for _ in range(60)
        ]
        await insert_rows(layer_db.pool, cache_type, rows)
    return {c: await rows_below(layer_db.pool, c, CUTOFF) for c in CACHES}


async def test_recorded_sdf_environment_runs_the_backfill_to_completion(
    layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str, s3_client: S3Client
) -> None:
    expected = await seed(layer_db)
    env = recorded_environment(layer_db, s3_server, bucket_prefix)

    result = await cli(["-v"], env, within_s=120)

    assert result.status == 0, result.stderr[-3000:]
    for cache_type, rows in expected.items():
        assert rows, cache_type
        objects = await cache_objects(s3_client, bucket_prefix, cache_type)
        assert objects == expected_objects(rows), cache_type
    assert await cache_objects(s3_client, bucket_prefix, CacheType.REBASE_BATCH) == {}
    events = result.events
    [ignored] = [e for e in events if e["event"] == "ignored upstream sdf settings"]
    assert ignored["level"] == "debug"
    assert "SI_SDF__NATS__CREDS" in ignored["names"]
    assert (
        "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__READ_RETRY__MAX_ATTEMPTS"
        in (ignored["names"])
    )
    assert HOSTNAME not in ignored["names"]
    [summary] = [
        e for e in events if e["event"] == "backfill summary" and e["cache_type"] == "total"
    ]
    assert summary["uploaded"] == sum(len(rows) for rows in expected.values())
    output = result.stdout + result.stderr
    for secret in secret_values():
        assert secret not in output


@pytest.mark.parametrize(
    ("rename", "suggestion"),
    [
        (HOSTNAME, HOSTNAME[:-1]),
        ("SI_SDF__BACKFILL_CACHE_TYPES", "SI_SDF__BACKFILL_CACHE_TYPE"),
    ],
)
async def test_misspelt_setting_in_the_recorded_environment_exits_2_with_a_suggestion(
    layer_db: LayerDb,
    s3_server: S3Server,
    bucket_prefix: str,
    rename: str,
    suggestion: str,
) -> None:
    env = recorded_environment(layer_db, s3_server, bucket_prefix)
    env[suggestion] = env.pop(rename)

    result = await cli([], env, within_s=60)

    assert result.status == 2, result.stderr[-3000:]
    [line] = result.events
    assert line["event"] == f"unknown setting {suggestion}; did you mean {rename}?"
    assert result.stdout == ""
