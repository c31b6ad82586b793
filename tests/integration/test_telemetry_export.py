"""OTLP export of a real backfill (``python -m services`` as a subprocess, real Postgres and S3)
into real receivers: over gRPC (the default, as upstream) into an OTLP/gRPC ``MetricsService``
(``devenv.otlp_receiver``); over ``http/protobuf`` into VictoriaMetrics' OTLP receiver
(``devenv.metric_stores``; Debian builds Prometheus without its own); and to an endpoint of the
other protocol, where the job must still exit 0 after saying so: a warning naming both settings
when it can tell up front, and the number of failed exports at exit.
"""

from __future__ import annotations

import operator
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import timedelta
from functools import partial
from typing import Any

import pytest

from devenv.metric_stores import MetricStore, running_victoria_metrics, victoria_metrics_binary
from devenv.otlp_receiver import OtlpGrpcReceiver, otlp_grpc_receiver
from devenv.tools import MissingTool
from layer_cache.cache_types import CacheType
from tests.cli_harness import cli
from tests.conftest import LayerDb
from tests.support import CUTOFF, SeedRow, insert_rows, random_key

pytestmark = pytest.mark.timeout(180)

ROWS = {CacheType.CAS: 40, CacheType.CHANGE_BATCH: 25}
CLI_TIMEOUT_S = 90.0
PROCESSED = "layer_cache.backfill.items_processed"
UPLOADED = "layer_cache.backfill.items_uploaded"
BYTES_UPLOADED = "layer_cache.backfill.bytes_uploaded"

Event = dict[str, Any]


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    with otlp_grpc_receiver() as receiver:
        yield receiver


@pytest.fixture
async def victoria() -> AsyncIterator[MetricStore]:
    try:
        binary = victoria_metrics_binary()
    except MissingTool as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None
    async with running_victoria_metrics(binary) as running:
        yield running


async def seed(layer_db: LayerDb) -> dict[CacheType, int]:
    """Rows below the cutoff in two caches; returns the bytes seeded per cache."""
    rng = random.Random(7)
    seeded_bytes = {}
    for cache_type, count in ROWS.items():
        rows = [
            SeedRow(random_key(rng), rng.randbytes(rng.randint(16, 512)), CUTOFF - timedelta(s))
            for s in range(1, count + 1)
        ]
        await insert_rows(layer_db.pool, cache_type, rows)
        seeded_bytes[cache_type] = sum(len(row.value) for row in rows)
    return seeded_bytes


async def backfill(env: Mapping[str, str], otel: Mapping[str, str]) -> tuple[int, list[Event]]:
    """One backfill of ``ROWS``' caches with JSON logs; (exit status, log events)."""
    args = [
        "--migration-mode",
        "backfillLayerCache",
        "--log-json",
        "--backfill-cutoff-timestamp",
        CUTOFF.isoformat(),
        "--backfill-cache-types",
        ",".join(cache_type.value for cache_type in ROWS),
    ]
    result = await cli(args, dict(env) | dict(otel), within_s=CLI_TIMEOUT_S)
    return result.status, result.events


def named(events: list[Event], name: str) -> list[Event]:
    return [event for event in events if event.get("event") == name]


async def test_grpc_is_the_default_and_the_receiver_gets_every_backfill_counter(
    layer_db: LayerDb, env: dict[str, str], grpc_receiver: OtlpGrpcReceiver
) -> None:
    seeded_bytes = await seed(layer_db)

    status, events = await backfill(env, {"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint})

    assert status == 0, events
    assert named(events, "metrics export failures") == [], events
    assert named(events, "otlp metrics export failed") == []
    points = grpc_receiver.points()
    assert points, "no OTLP request arrived over gRPC"
    assert {(p.resource["service.name"], p.resource["service.namespace"]) for p in points} == {
        ("sdf", "si")
    }
    # Cumulative counters: the last point of each series is its total.
    last = {(p.metric, p.attributes.get("cache_type")): p.value for p in points}
    for cache_type, count in ROWS.items():
        assert last[(PROCESSED, cache_type.value)] == count
        assert last[(UPLOADED, cache_type.value)] == count
        assert last[(BYTES_UPLOADED, cache_type.value)] == seeded_bytes[cache_type]
    assert {p.metric for p in points} >= {
        "layer_cache.backfill.items_skipped",
        "layer_cache.backfill.upload_duration_seconds",
        "layer_cache.backfill.rows_remaining_estimate",
    }


async def test_http_protobuf_metrics_arrive_in_victoria_metrics_otlp_receiver(
    layer_db: LayerDb, env: dict[str, str], victoria: MetricStore
) -> None:
    await seed(layer_db)

    status, events = await backfill(
        env,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": victoria.otlp_metrics_url,
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        },
    )

    assert status == 0, events
    assert named(events, "metrics export failures") == [], events
    assert named(events, "otlp endpoint looks like the other protocol's") == []
    # The resource's attributes are labels of every series (Prometheus naming).
    for cache_type, count in ROWS.items():
        selector = (
            f'{{service_name="sdf", service_namespace="si", cache_type="{cache_type.value}"}}'
        )
        await victoria.wait_until(
            f"layer_cache_backfill_items_processed_total{selector}",
            partial(operator.eq, [float(count)]),
            f"{cache_type.value}'s processed count",
        )
        assert await victoria.values(f"layer_cache_backfill_items_uploaded_total{selector}") == [
            count
        ]
    assert await victoria.values(
        'count(layer_cache_backfill_upload_duration_seconds_bucket{service_name="sdf"}) > 0'
    )


async def test_grpc_protocol_with_an_otlp_http_url_warns_up_front_and_counts_failures(
    layer_db: LayerDb, env: dict[str, str], victoria: MetricStore
) -> None:
    await seed(layer_db)

    started = time.monotonic()
    status, events = await backfill(
        env,
        {
            # The protocol is left at its default, grpc: the classic mistake.
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": victoria.otlp_metrics_url,
            "OTEL_METRIC_EXPORT_TIMEOUT": "2000",
        },
    )
    took = time.monotonic() - started

    assert status == 0, events
    [warning] = named(events, "otlp endpoint looks like the other protocol's")
    assert warning["level"] == "warning"
    assert warning["protocol"] == "grpc"
    assert warning["protocol_setting"] == "default"
    assert warning["endpoint_setting"] == "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
    assert "no path" in warning["reason"]
    [report] = named(events, "metrics export failures")
    assert report["level"] == "warning"
    assert report["failed_exports"] >= 1
    assert took < CLI_TIMEOUT_S
    assert await victoria.values("count(layer_cache_backfill_items_processed_total)") == []


async def test_http_protocol_at_a_grpc_receiver_counts_failures_and_still_exits_0(
    layer_db: LayerDb, env: dict[str, str], grpc_receiver: OtlpGrpcReceiver
) -> None:
    await seed(layer_db)

    status, events = await backfill(
        env,
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_METRIC_EXPORT_TIMEOUT": "2000",
        },
    )

    assert status == 0, events
    [first] = named(events, "otlp metrics export failed")
    assert first["endpoint"] == grpc_receiver.endpoint + "/v1/metrics"
    assert first["protocol_setting"] == "OTEL_EXPORTER_OTLP_PROTOCOL"
    [report] = named(events, "metrics export failures")
    assert report["failed_exports"] >= 1
    assert report["failed_exports"] <= report["exports"]
    assert grpc_receiver.points() == []


async def test_an_unknown_protocol_exits_2_with_one_line(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    status, events = await backfill(
        env,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        },
    )

    assert status == 2
    [line] = events
    assert line["level"] == "error"
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in line["event"]
