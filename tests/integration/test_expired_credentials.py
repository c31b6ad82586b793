"""Session credentials that S3 calls expired are refreshed through the credential chain.

The backfill runs with ``auth = iam_role`` (the standard AWS chain), its credentials coming from
a real container credential endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI``, as on ECS and EKS
Pod Identity) served by the test: the first answer hands out a session key that the fault proxy
in front of the real S3 server answers ``400 ExpiredToken`` to (the token was revoked or expired
early, before its advertised expiry), the following answers a fresh key. The run must refresh,
retry and finish with every row in S3; with static credentials there is nothing to refresh and
the run fails with one line saying so.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from aiohttp import web

from devenv.faults import FaultPlan, FaultProxy
from devenv.process import free_port
from devenv.s3 import S3Server
from layer_cache.cache_types import CacheType
from tests.cli_harness import backfill_args, cli
from tests.conftest import LayerDb
from tests.faults_support import assert_s3_holds_exactly
from tests.support import (
    CUTOFF,
    STORAGE,
    SeedRow,
    insert_rows,
    random_key,
    rows_below,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

EXPIRED_KEY = "ASIAEXPIREDSESSION01"
FRESH_KEY = "ASIAFRESHSESSION0001"


class CredentialEndpoint:
    """A container credential endpoint: the first answer is the key S3 will call expired."""

    def __init__(self) -> None:
        self.answers = 0

    async def credentials(self, request: web.Request) -> web.Response:
        self.answers += 1
        key = EXPIRED_KEY if self.answers == 1 else FRESH_KEY
        # An expiry an hour away: the client has no reason of its own to refresh.
        expiration = datetime.now(UTC) + timedelta(hours=1)
        body = {
            "AccessKeyId": key,
            "SecretAccessKey": f"secret-of-{key}",
            "Token": f"token-of-{key}",
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return web.Response(text=json.dumps(body), content_type="application/json")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/credentials", self.credentials)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield f"http://127.0.0.1:{port}/credentials"
        finally:
            await runner.cleanup()


async def seed(db: LayerDb) -> dict[str, bytes]:
    rng = random.Random(20261202)
    rows = [
        SeedRow(random_key(rng), rng.randbytes(rng.randint(1, 2048)), CUTOFF - timedelta(seconds=i))
        for i in range(1, 41)
    ]
    await insert_rows(db.pool, CacheType.CAS, rows)
    return await rows_below(db.pool, CacheType.CAS, CUTOFF)


def iam_role_env(env: dict[str, str], s3_url: str, credentials_url: str) -> dict[str, str]:
    """The job's environment with the standard AWS chain instead of static keys."""
    chain = {
        name: value
        for name, value in env.items()
        if not name.startswith(STORAGE + "AUTH__") and not name.startswith("AWS_")
    }
    return chain | {
        STORAGE + "AUTH": "iam_role",
        "AWS_ENDPOINT_URL_S3": s3_url,
        "AWS_REGION": "us-east-1",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": credentials_url,
        # Nothing else in the chain may answer first.
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


async def test_an_expired_session_token_is_refreshed_and_the_run_completes(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    below = await seed(layer_db)
    endpoint = CredentialEndpoint()
    plan = FaultPlan(expired_access_keys=frozenset({EXPIRED_KEY}))

    async with (
        endpoint.serving() as credentials_url,
        FaultProxy(s3_server.endpoint.url, plan) as proxy,
    ):
        run = await cli(
            backfill_args(cache_types=[CacheType.CAS]),
            iam_role_env(env, proxy.url, credentials_url),
            within_s=90,
        )
        counts = dict(proxy.counts)

    assert run.status == 0, run.describe()
    assert counts.get("expired_token", 0) >= 1, counts
    assert endpoint.answers == 2, "the chain must be asked again once, not per request"
    assert run.summary("cas")["status"] == "completed"
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, below)


async def test_static_credentials_s3_calls_expired_fail_with_one_line(
    layer_db: LayerDb,
    env: dict[str, str],
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
) -> None:
    await seed(layer_db)
    access_key = env[STORAGE + "AUTH__STATIC_CREDENTIALS__ACCESS_KEY"]
    plan = FaultPlan(expired_access_keys=frozenset({access_key}))

    async with FaultProxy(s3_server.endpoint.url, plan) as proxy:
        run = await cli(
            backfill_args(
                *("--backfill-retry-max-attempts", "2", "--backfill-retry-max-secs", "2"),
                cache_types=[CacheType.CAS],
            ),
            env | {STORAGE + "ENDPOINT": proxy.url},
            within_s=60,
        )

    assert run.status == 3, run.describe()
    assert run.non_json == [], run.non_json
    errors = [event for event in run.events if event.get("level") == "error"]
    assert len(errors) == 1, errors
    assert "expired" in errors[0]["event"].lower(), errors
    assert "static credentials cannot be" in errors[0]["event"], errors[0]
    await assert_s3_holds_exactly(s3_client, bucket_prefix, CacheType.CAS, {})
