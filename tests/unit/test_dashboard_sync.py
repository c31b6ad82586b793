"""The committed dashboard JSON is exactly what ``grafana/dashboard.py`` generates, and sound.

Sound means: upstream's uid, title, tags and variables; every panel and query on the
``${datasource}`` variable; every metric selector filtered by ``$service`` and ``$cache_type``;
rates over ``$__rate_interval``; and the metric names are the ones the backfill really exports
(read from a Prometheus exposition of the real instruments), each of them shown somewhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from grafana.dashboard import JSON_PATH, SERVICE_LABELS, main, render
from layer_cache.cache_types import CacheType
from layer_cache.errors import ErrorKind, StorageError
from layer_cache.retry import Backoff
from layer_cache.write_queue import (
    PG_RETRY_QUEUE,
    S3_WRITE_QUEUE,
    CacheQueueStatus,
    QueueBudget,
    QueueKind,
    WriteBehind,
    queue_status,
)
from migrations_mode.progress import GAUGES, BackfillMetrics, CacheProgress
from tests.unit.test_persister import MemoryStore, transient
from tests.unit.test_write_queue import until, until_depth

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The backfill's metrics, and the layer cache server's queue and write-back metrics.
_NAMES = r"(?:layer_cache_(?:backfill|write_queue|retry_queue|fallback_writeback)|s3)_\w+"
METRIC = re.compile(rf"\b{_NAMES}")
SELECTOR = re.compile(rf"\b({_NAMES})\{{([^}}]*)\}}")
# The queues' series that only upstream's dashboard shows (its S3 workers, its disk store, and
# the names without _total it queries): tests/integration/test_upstream_dashboard.py reads them.
UPSTREAM_DASHBOARD_ONLY = {
    "s3_worker_queue_depth",
    "s3_worker_active_uploads",
    "s3_disk_write_duration_ms_bucket",
    "s3_disk_write_duration_ms_sum",
    "s3_disk_write_duration_ms_count",
    "layer_cache_retry_queue_enqueued",
    "layer_cache_retry_queue_success",
    "layer_cache_retry_queue_failed",
    "layer_cache_retry_queue_permanent_failure",
}
RANGE = re.compile(r"\[([^\]]+)\]")
UPSTREAM_TITLES = {
    "Total Items Processed",
    "Total Items Uploaded",
    "Total Items Skipped",
    "Total Bytes Uploaded",
    "Processing Rate by Cache Type",
    "Upload vs Skip Rate by Cache Type",
    "Upload Throughput by Cache Type",
    "Items Distribution by Cache Type",
    "${cache_type} - Item Count Progress",
    "${cache_type} - Bytes Uploaded Progress",
}

Json = dict[str, Any]


@pytest.fixture(scope="module")
def dashboard() -> Json:
    loaded: Json = json.loads(JSON_PATH.read_text(encoding="utf-8"))
    return loaded


def panels(dashboard: Json) -> Iterator[Json]:
    """Every panel, rows included, nested (collapsed-row) panels too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: Json) -> Iterator[tuple[str, Json]]:
    """(panel title, target) for every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target


def variable(dashboard: Json, name: str) -> Json:
    found: Json = next(v for v in dashboard["templating"]["list"] if v["name"] == name)
    return found


def test_committed_json_is_what_the_generator_writes() -> None:
    assert JSON_PATH.read_text(encoding="utf-8") == render(), (
        f"{JSON_PATH.name} is stale or edited by hand: run `python -m grafana.dashboard`"
    )
    assert main(["--check"]) == 0


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "dashboard.json"
    stale.write_text(render().replace("Layer Cache Backfill", "Edited"), encoding="utf-8")

    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0


def test_header_is_upstreams(dashboard: Json) -> None:
    assert dashboard["uid"] == "layer-cache-backfill"
    assert dashboard["title"] == "Layer Cache Backfill"
    assert dashboard["tags"] == ["layercache", "backfill", "s3", "migration"]
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert "`job_label` variable names the Prometheus label" in dashboard["description"]


def test_variables_are_datasource_job_label_service_and_cache_type(dashboard: Json) -> None:
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names == ["datasource", "job_label", "service", "cache_type"]
    datasource = variable(dashboard, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    job_label = variable(dashboard, "job_label")
    assert (job_label["type"], job_label["query"]) == ("custom", "exported_job,job")
    assert [option["value"] for option in job_label["options"]] == ["exported_job", "job"]
    # The default follows upstream's pipeline, an OTel collector scraped by Prometheus, whose
    # scrape job displaces the service's job label into exported_job.
    assert job_label["current"]["value"] == "exported_job"
    assert (job_label["multi"], job_label["includeAll"]) == (False, False)
    service = variable(dashboard, "service")
    assert service["query"] == (
        "label_values(layer_cache_backfill_items_processed_total, $job_label)"
    )
    cache_type = variable(dashboard, "cache_type")
    assert cache_type["query"] == (
        "label_values(layer_cache_backfill_items_processed_total"
        '{$job_label=~"$service"}, cache_type)'
    )
    for multi in (service, cache_type):
        assert multi["type"] == "query"
        assert multi["datasource"] == DATASOURCE
        assert (multi["multi"], multi["includeAll"], multi["allValue"]) == (True, True, ".*")


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: Json) -> None:
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]

    def uids(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource" and isinstance(value, dict) and "uid" in value:
                    yield value["uid"]
                yield from uids(value)
        elif isinstance(node, list):
            for item in node:
                yield from uids(item)

    assert set(uids(dashboard)) == {"${datasource}"}, "a datasource uid is hard-coded"


def test_every_metric_selector_filters_on_service_and_cache_type(dashboard: Json) -> None:
    for title, target in queries(dashboard):
        expr = target["expr"]
        metrics = METRIC.findall(expr)
        selectors = SELECTOR.findall(expr)
        assert metrics, f"{title}: no backfill metric in {expr!r}"
        assert len(selectors) == len(metrics), f"{title}: a metric without a selector: {expr!r}"
        for _name, matchers in selectors:
            assert '$job_label=~"$service"' in matchers, f"{title}: {expr!r}"
            assert 'cache_type=~"$cache_type"' in matchers, f"{title}: {expr!r}"


def test_rates_are_over_the_rate_interval(dashboard: Json) -> None:
    for title, target in queries(dashboard):
        expr = target["expr"]
        assert "$__interval" not in expr, title
        assert set(RANGE.findall(expr)) <= {"$__rate_interval"}, f"{title}: {expr!r}"
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, title


def test_panels_keep_upstreams_and_add_the_new_metrics(dashboard: Json) -> None:
    titles = [panel["title"] for panel in panels(dashboard)]
    assert set(titles) >= UPSTREAM_TITLES
    for added in (
        "Percent Complete by Cache Type",
        "ETA by Cache Type",
        "Checkpoint Lag by Cache Type",
        "Errors by Class",
        "Retries by Class",
        "Throttling: Throttled Retries by Cache Type",
        "Upload Concurrency: Limit vs In Flight",
        "Rate Limit: Uploads Waiting by Cache Type",
        "Upload Latency p50 / p99",
        "Repaired and Vanished Items",
        "Write Queue Depth by Cache",
        "Write Queue Oldest Entry Age",
        "Write Queue Dead Letters",
        "Write Queue Throughput",
        "S3Primary Read-through Write-backs",
    ):
        assert added in titles
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    repeated = next(panel for panel in panels(dashboard) if panel.get("repeat"))
    assert (repeated["type"], repeated["repeat"]) == ("row", "cache_type")
    pie = next(p for p in panels(dashboard) if p["title"] == "Items Distribution by Cache Type")
    assert pie["type"] == "piechart"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    eta = next(p for p in panels(dashboard) if p["title"] == "ETA by Cache Type")
    assert eta["fieldConfig"]["defaults"]["unit"] == "s"
    assert "> 0)" in eta["targets"][0]["expr"], "the division by the rate must be guarded"


@dataclass
class _AllGauges:
    """A gauge source reporting every gauge, as a running cache may."""

    cache_type: CacheType = CacheType.CAS

    def gauge_values(self) -> dict[str, float]:
        return dict.fromkeys(GAUGES, 1.0)


def exported_metric_names() -> set[str]:
    """Sample names of the backfill's real instruments, through OTel's Prometheus exporter."""
    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        metrics = BackfillMetrics(provider.get_meter("test"))
        metrics.watch(_AllGauges())
        CacheProgress(CacheType.CAS, metrics).upload_took(0.02)
        with tempfile.TemporaryDirectory() as directory:
            asyncio.run(exercise_write_queue(Path(directory), provider.get_meter("server")))
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if METRIC.match(line)}


def dead_letters(directory: Path, kind: QueueKind) -> bool:
    return queue_status(directory, kind).get(CacheType.CAS, CacheQueueStatus()).dead_letters == 1


async def exercise_write_queue(directory: Path, meter: Meter) -> None:
    """The server's two queues, made to count every one of their metrics once."""
    for kind in (S3_WRITE_QUEUE, PG_RETRY_QUEUE):
        target = MemoryStore(kind.backend)
        target.failing, target.fail_once = transient(), True
        budget = QueueBudget(max_attempts=2, backoff=Backoff(base_delay_s=0.001, max_delay_s=0.002))
        queue = WriteBehind(
            directory, {CacheType.CAS: target}, meter, workers=1, budget=budget, kind=kind
        )
        queue.start()
        await queue.enqueue(target, "a", b"1")  # retried once, then written
        await until_depth(queue, 0)
        target.failing, target.fail_once = (
            StorageError("denied", kind=ErrorKind.ACCESS_DENIED),
            False,
        )
        queue.offer(target, "b", b"2")  # held, then a dead letter (the opt-in cap)
        await until(partial(dead_letters, directory, kind), "a dead letter")
        await queue.drain(1.0)


def test_queried_metrics_are_exported_and_every_exported_metric_is_shown(
    dashboard: Json,
) -> None:
    exported = exported_metric_names()
    queried = {
        name for _title, target in queries(dashboard) for name in METRIC.findall(target["expr"])
    }

    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
    histogram_totals = {
        "layer_cache_backfill_upload_duration_seconds_sum",
        "layer_cache_backfill_upload_duration_seconds_count",
    }
    assert exported >= UPSTREAM_DASHBOARD_ONLY
    not_shown = exported - histogram_totals - UPSTREAM_DASHBOARD_ONLY - queried
    assert not not_shown, f"not shown: {sorted(not_shown)}"


# Grafana's Prometheus data source fills variables in as text (templateSrv.replace) before it
# parses a variable query (PrometheusMetricFindQuery) or sends a panel query.
LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?([a-zA-Z_][a-zA-Z0-9_]*)\)\s*$")


@pytest.mark.parametrize("label", SERVICE_LABELS)
def test_job_label_fills_in_as_a_label_name_in_every_query(dashboard: Json, label: str) -> None:
    assert set(SERVICE_LABELS) == {"job", "exported_job"}
    for _title, target in queries(dashboard):
        expr = target["expr"].replace("$job_label", label)
        for _name, matchers in SELECTOR.findall(expr):
            assert matchers.startswith(f'{label}=~"$service", '), expr
    service = variable(dashboard, "service")["query"].replace("$job_label", label)
    parsed = LABEL_VALUES.match(service)
    assert parsed is not None, service
    assert parsed.group(2) == label
    cache_type = variable(dashboard, "cache_type")["query"].replace("$job_label", label)
    assert f'{{{label}=~"$service"}}' in cache_type
