"""The backfill started the way sdf's Job starts sdf: its flags, its names, its habits.

``python -m services`` runs as a subprocess against the real servers with what an operator's
sdf Job passes: sdf's own command-line flags (those that mean something here set the layer-db
connection exactly as upstream's ``build_config_map`` does and win over the environment; the
others are named in one debug line), upstream names this program has never heard of in upstream's
sections (one warning, and the run goes on), a log file directory, a cutoff in the future (a
warning), and no OTLP endpoint (the default one, said at start, and no wait at exit when nothing
listens there). The refusals of issue 21 that need no server are in ``test_cli``'s
``BAD_INPUTS``; the ones that need a file system are here.
"""

from __future__ import annotations

import json
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from devenv.otlp_receiver import otlp_grpc_receiver
from devenv.process import free_port
from layer_cache.cache_types import CacheType
from services.logging import LOG_FILE_NAME
from tests.cli_harness import WRITE_QUEUE_DIR_ENV, backfill_args, cli
from tests.conftest import LayerDb
from tests.support import (
    CUTOFF,
    PG,
    STORAGE,
    SeedRow,
    assert_bucket_holds_exactly_rows_below,
    insert_rows,
    random_key,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

CACHES = (CacheType.CAS, CacheType.WORKSPACE_SNAPSHOT)
SECRET_FLAG_VALUE = "c2VjcmV0LWtleS1tYXRlcmlhbA=="  # never to be printed


async def seed(db: LayerDb, rows_per_cache: int = 12) -> None:
    rng = random.Random(2101)
    for cache_type in CACHES:
        await insert_rows(
            db.pool,
            cache_type,
            [
                SeedRow(
                    random_key(rng),
                    rng.randbytes(rng.randint(1, 900)),
                    CUTOFF + timedelta(seconds=index - rows_per_cache // 2),
                )
                for index in range(rows_per_cache)
            ],
        )


async def assert_copied(db: LayerDb, s3_client: S3Client, bucket_prefix: str) -> None:
    for cache_type in CACHES:
        await assert_bucket_holds_exactly_rows_below(db.pool, s3_client, bucket_prefix, cache_type)


async def test_sdfs_own_flags_set_the_layer_db_connection_and_the_rest_are_named_once(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await seed(layer_db)
    # The environment points elsewhere; sdf's flags, as its Job passes them, must win.
    wrong_env = env | {
        PG + "HOSTNAME": "db.invalid",
        PG + "PORT": "1",
        PG + "USER": "nobody",
        PG + "DBNAME": "absent",
        "SI_MODULE_INDEX_URL": "https://module-index.example",
    }
    sdf_flags = [
        "--pg-hostname", env[PG + "HOSTNAME"],
        "--pg-port", env[PG + "PORT"],
        "--pg-user", env[PG + "USER"],
        "--layer-db-pg-dbname", env[PG + "DBNAME"],
        "--pg-dbname", "si",  # sdf's main database: nothing here
        "--pg-pool-max-size", "8",
        "--pg-recycling-method", "Fast",
        "--nats-url", "nats://nats:4222",
        "--layer-db-disk-path", "/run/sdf/layer-cache",
        "--veritech-encryption-key-base64", SECRET_FLAG_VALUE,
        "--jwt-public-signing-key-algo", "RS256",
        "--features", "a,b",
        "--instance-id", "01GWEAANW5BVFK5KDRVS6DEY0F",
        "--tokio-console",
        "--no-color",
    ]  # fmt: skip

    run = await cli([*backfill_args(cache_types=CACHES), "-v", *sdf_flags], wrong_env)

    assert run.status == 0, run.describe()
    await assert_copied(layer_db, s3_client, bucket_prefix)
    [ignored] = run.named("ignored upstream sdf settings")
    assert set(ignored["names"]) >= {
        "--pg-dbname",
        "--pg-recycling-method",
        "--nats-url",
        "--layer-db-disk-path",
        "--veritech-encryption-key-base64",
        "--jwt-public-signing-key-algo",
        "--features",
        "--instance-id",
        "--tokio-console",
        "SI_MODULE_INDEX_URL",
    }
    assert not {"--pg-hostname", "--pg-port", "--layer-db-pg-dbname"} & set(ignored["names"])
    assert SECRET_FLAG_VALUE not in run.stderr
    assert "module-index.example" not in run.stderr


async def test_sdfs_cert_path_flag_is_ignored_as_by_sdf_with_one_warning(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await seed(layer_db, rows_per_cache=4)

    run = await cli(
        [*backfill_args(cache_types=CACHES), "--pg-cert-path", "/etc/ssl/nowhere.pem"], env
    )

    assert run.status == 0, run.describe()
    [warning] = run.named("sdf flag ignored")
    assert "--pg-cert-path" in warning["reason"]
    assert "CERTIFICATE__TYPE" in warning["reason"]
    await assert_copied(layer_db, s3_client, bucket_prefix)


async def test_an_unknown_name_in_upstreams_section_is_one_warning_and_the_run_goes_on(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await seed(layer_db, rows_per_cache=4)
    name = STORAGE + "RATE_LIMIT__REQUESTS_PER_SECOND"

    run = await cli(backfill_args(cache_types=CACHES), env | {name: "100"})

    assert run.status == 0, run.describe()
    [warning] = run.named("unknown setting ignored")
    assert warning["name"] == name
    assert warning["level"] == "warning"
    await assert_copied(layer_db, s3_client, bucket_prefix)


async def test_a_misspelt_name_of_ours_in_upstreams_section_still_exits_2(
    layer_db: LayerDb, env: dict[str, str], s3_client: S3Client, bucket_prefix: str
) -> None:
    await seed(layer_db, rows_per_cache=4)

    run = await cli(backfill_args(cache_types=CACHES), env | {STORAGE + "BUCKET_PREFX": "x"})

    assert run.status == 2, run.describe()
    [line] = run.events
    assert f"did you mean {STORAGE}BUCKET_PREFIX?" in line["event"]


@pytest.mark.parametrize("flag", ["--write-queue-status", "--write-queue-replay=all"])
async def test_write_queue_commands_on_a_directory_that_is_not_there_exit_2_and_create_nothing(
    tmp_path: Path, flag: str
) -> None:
    absent = tmp_path / "queue"

    run = await cli([flag, "--log-json"], {WRITE_QUEUE_DIR_ENV: str(absent)})

    assert run.status == 2, run.describe()
    [line] = run.events
    assert "SI_SDF__SERVER__WRITE_QUEUE_DIR" in line["event"]
    assert str(absent) in line["event"]
    assert run.stdout == ""
    assert not absent.exists()


async def test_a_cutoff_in_the_future_is_one_warning_and_copies_below_it(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    await seed(layer_db, rows_per_cache=4)
    future = "2999-01-01T00:00:00Z"

    run = await cli(backfill_args(cutoff=future, cache_types=CACHES), env)

    assert run.status == 0, run.describe()
    [warning] = run.named("backfill cutoff is in the future")
    assert warning["cutoff_timestamp"] == "2999-01-01 00:00:00.000000 UTC"
    assert warning["database_now"] < warning["cutoff_timestamp"]
    assert run.summary()["processed"] == 8


async def test_a_past_cutoff_says_nothing_of_the_future(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    await seed(layer_db, rows_per_cache=4)

    run = await cli(backfill_args(cache_types=CACHES), env)

    assert run.status == 0, run.describe()
    assert run.named("backfill cutoff is in the future") == []


async def test_log_file_directory_gets_every_line_as_json_as_sdfs_does(
    layer_db: LayerDb, env: dict[str, str], tmp_path: Path
) -> None:
    await seed(layer_db, rows_per_cache=4)
    directory = tmp_path / "logs"

    run = await cli(
        [
            *backfill_args(cache_types=CACHES, json_logs=False),
            "--log-file-directory",
            str(directory),
        ],
        env,
    )

    assert run.status == 0, run.describe()
    lines = (directory / LOG_FILE_NAME).read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert [event["event"] for event in events].count("backfill summary") == 3
    assert "completed backfill for all cache types" in [event["event"] for event in events]
    assert "bugbear" not in "".join(lines)  # the app role's password


# --------------------------------------------------------------------------------------------
# Metrics with no OTLP endpoint set: upstream's default, said at start


async def test_without_an_endpoint_metrics_go_to_the_default_grpc_endpoint_as_upstreams(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    await seed(layer_db, rows_per_cache=4)
    with otlp_grpc_receiver(port=4317) as collector:
        # An OTEL_ variable keeps the test harness from turning OTLP off; no endpoint is set.
        run = await cli(backfill_args(cache_types=CACHES), env | {"OTEL_SERVICE_NAME": "sdf"})

    assert run.status == 0, run.describe()
    [start] = run.named("starting backfill for all cache types")
    assert start["metrics"] == (
        "OTLP grpc http://localhost:4317 (default: OTEL_EXPORTER_OTLP_ENDPOINT unset)"
    )
    points = collector.points()
    assert points, "nothing arrived at the default endpoint"
    assert {p.resource["service.version"] for p in points} != {None}
    assert run.named("metrics export failures") == []


async def test_without_a_collector_the_run_says_so_once_and_does_not_wait_at_exit(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    await seed(layer_db, rows_per_cache=4)
    endpoint = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()

    run = await cli(
        backfill_args(cache_types=CACHES), env | {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    )

    assert run.status == 0, run.describe()
    assert time.monotonic() - started < 15
    [failures] = run.named("metrics export failures")
    assert failures["reason"] == f"nothing listens at {endpoint}"
    assert "OTEL_METRICS_EXPORTER=none" in failures["hint"]
    assert [event["level"] for event in run.events].count("warning") == 1


async def test_with_otlp_turned_off_the_start_line_says_metrics_go_nowhere(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    await seed(layer_db, rows_per_cache=4)

    run = await cli(backfill_args(cache_types=CACHES), env | {"OTEL_METRICS_EXPORTER": "none"})

    assert run.status == 0, run.describe()
    [start] = run.named("starting backfill for all cache types")
    assert start["metrics"].startswith("nowhere")
    assert [event for event in run.events if event["level"] == "warning"] == []
