"""Every query of the dashboard, run through a real Prometheus that scraped a real backfill,
with the service in ``job`` and in ``exported_job``.

Two services contexts run side by side in this process, as two replicas of one job would: one
walks ``cas`` and ``change_batch`` in key order through a fault proxy that throttles a few PUTs
(so retries, the throttling panel and the adaptive concurrency limit have something to show),
the other walks ``workspace_snapshot`` newest-first (the only order that reports checkpoint lag).
Some objects are already in S3 with the right size (skipped) or the wrong one (repaired). The
layer cache server's write queue runs on the first context's meter and real S3 store, so its
panels have data: one PUT answered 503 then stored, one refused object dead-lettered. Both
contexts serve their metrics on a free port (``metrics_port=0``); a ``prometheus`` process of our
own (``devenv.metric_stores``) scrapes both every second under one job, so the service is in
``job``. A second scrape job reads the same series back from that Prometheus' ``/federate``
endpoint without ``honor_labels``: the target's ``job`` label clashes with the scrape job's and
Prometheus renames it ``exported_job``, exactly as when it scrapes an OpenTelemetry collector's
Prometheus exporter (upstream's pipeline); a relabelling sets it to ``si/sdf``, the name that
exporter gives the service, so no query can find the federated series through ``job``. When the
runs are over and both jobs hold the final values, every query of every panel is sent to
``/api/v1/query`` with the dashboard's variables filled in as Grafana would, once per
``job_label`` value, and must be valid and return at least one series; a few values are checked
against what the runs reported, in both labellings.

The Prometheus binary is the one on PATH, else Debian's package that ``make test`` fetched into
``.devenv``; without either the test fails, naming ``make test``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from devenv.faults import SLOWDOWN, FaultPlan, FaultProxy
from devenv.metric_stores import ScrapeJob, prometheus_binary, running_prometheus
from devenv.process import free_port
from devenv.s3 import S3Server
from devenv.tools import MissingTool
from grafana.dashboard import JSON_PATH
from layer_cache.cache_types import CacheType
from layer_cache.keys import object_key
from layer_cache.persister import PgStore, S3Store
from layer_cache.retry import Backoff
from layer_cache.write_queue import (
    PG_RETRY_QUEUE,
    S3_WRITE_QUEUE,
    QueueBudget,
    WriteBehind,
    queue_status,
)
from migrations_mode.config import BackfillConfig
from migrations_mode.coordinator import run_backfill
from migrations_mode.walk import WalkOrder
from services.context import ServicesContext, open_services_context
from services.settings import Settings, load_settings
from services.signals import StopRequest
from tests.conftest import LayerDb
from tests.support import (
    CUTOFF,
    SeedRow,
    cache_bucket,
    expected_objects,
    insert_rows,
    random_key,
    refuse_rows,
    until,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.timeout(240)

JOB = "layer-cache-backfill"
KEY_ORDER_CACHES = (CacheType.CAS, CacheType.CHANGE_BATCH)
NEWEST_FIRST_CACHE = CacheType.WORKSPACE_SNAPSHOT
WRITE_QUEUE_CACHE = CacheType.REBASE_BATCH  # the server's write queue panels' data
ROWS = {CacheType.CAS: 450, CacheType.CHANGE_BATCH: 300, CacheType.WORKSPACE_SNAPSHOT: 450}
ALREADY_COPIED = 60  # cas rows whose object is in S3 with the right size: skipped
WRONG_SIZE = 15  # cas rows whose object has the wrong size: repaired
COLLECTOR_JOB = "otel-collector"  # the scrape job that displaces the series' job label
# The service as an OTel collector's Prometheus exporter names it: service.namespace/service.name.
OTEL_SERVICE = "si/sdf"
# The service (the value of $service) in each labelling: the scrape job's name in job, the OTel
# service in exported_job. Nothing else carries either value, so a query that selects on the
# wrong label finds nothing.
SERVICES = {"job": JOB, "exported_job": OTEL_SERVICE}
JOB_LABELS = tuple(SERVICES)
# What Grafana would put in for the other variables.
VARIABLES = {
    "datasource": "",
    "cache_type": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@pytest.fixture(scope="session")
def prometheus_binary_path() -> str:
    try:
        return prometheus_binary()
    except MissingTool as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    def promql(self, job_label: str) -> str:
        """The expression with the dashboard variables filled in, as Grafana would."""
        variables = VARIABLES | {"job_label": job_label, "service": SERVICES[job_label]}

        def fill(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            assert name in variables, f"{self.panel}: unknown variable ${name}"
            return variables[name]

        return VARIABLE.sub(fill, self.expr)


def dashboard_queries() -> list[PanelQuery]:
    dashboard = json.loads(JSON_PATH.read_text(encoding="utf-8"))
    found = []
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                found.append(PanelQuery(nested["title"], target["refId"], target["expr"]))
    return found


def seed(rng: random.Random, count: int) -> list[SeedRow]:
    """``count`` rows below the cutoff, one created_at each (newest-first has a lag to show)."""
    return [
        SeedRow(
            random_key(rng),
            rng.randbytes(rng.randint(64, 2048)),
            CUTOFF - timedelta(seconds=count - index),
        )
        for index in range(count)
    ]


def config(cache_types: tuple[CacheType, ...], order: WalkOrder) -> BackfillConfig:
    return BackfillConfig(
        cutoff=CUTOFF,
        cache_types=cache_types,
        key_batch_size=50,
        checkpoint_interval=timedelta(seconds=30),
        max_concurrent_uploads=2,
        grace_period=timedelta(seconds=5),
        order=order,
    )


def settings_with(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, **changes: str) -> Settings:
    """The test's settings, with a scrape endpoint on a free port and ``changes`` to env."""
    for name, value in (env | changes).items():
        monkeypatch.setenv(name, value)
    return load_settings({"metrics_port": 0})


def scrape_jobs(targets: list[str], prometheus_address: str, job: str = JOB) -> list[ScrapeJob]:
    """The targets scraped directly (``job``), and their series federated back
    (``exported_job``, set to the OTel collector's name for the service)."""
    return [
        ScrapeJob(job, targets),
        ScrapeJob(
            COLLECTOR_JOB,
            [prometheus_address],
            metrics_path="/federate",
            params={"match[]": [f'{{job="{job}"}}']},
            # What the collector's exporter would call the service.
            metric_relabel_configs=[
                {
                    "source_labels": ["exported_job"],
                    "regex": job,
                    "target_label": "exported_job",
                    "replacement": OTEL_SERVICE,
                }
            ],
        ),
    ]


async def exercise_write_queue(
    stack: AsyncExitStack, context: ServicesContext, proxy: FaultProxy, tmp_path: Path
) -> WriteBehind:
    """The layer cache server's two queues on one replica's meter and real S3 store (through
    the proxy) and Postgres, made to count every one of their metrics, with the opt-in attempt
    cap: a PUT answered 503 and retried, then stored; a read-through write-back whose object the
    proxy refuses, a dead letter; a Postgres row refused once, then written, and one refused
    until it is a dead letter."""
    budget = QueueBudget(max_attempts=3, backoff=Backoff(base_delay_s=0.05, max_delay_s=0.1))
    store = S3Store(context.s3_layer(WRITE_QUEUE_CACHE))
    queue = WriteBehind(
        tmp_path / "write-queue",
        {WRITE_QUEUE_CACHE: store},
        context.telemetry.meter,
        workers=2,
        budget=budget,
    )
    queue.start()
    stack.push_async_callback(queue.drain, 1.0)
    rng = random.Random(43)
    stored, refused = random_key(rng), random_key(rng)
    proxy.plan = FaultPlan(slowdown_share=1.0, methods=frozenset({"PUT"}))
    await queue.enqueue(store, stored, b"stored after a retry")
    await until(lambda: proxy.counts[SLOWDOWN] > 0, "a PUT answered 503", 30.0, every_s=0.05)
    proxy.plan = FaultPlan(refused_keys=frozenset({object_key(refused)}))
    queue.offer(store, refused, b"refused")

    pg = PgStore(context.pg_layer(WRITE_QUEUE_CACHE))
    written, dead = random_key(rng), random_key(rng)
    serialization_failure = "40001"
    await refuse_rows(
        context.pg_pool,
        WRITE_QUEUE_CACHE,
        {
            (written, "INSERT"): (serialization_failure, 1),
            (dead, "INSERT"): (serialization_failure, 99),
        },
    )
    retries = WriteBehind(
        tmp_path / "write-queue",
        {WRITE_QUEUE_CACHE: pg},
        context.telemetry.meter,
        workers=1,
        budget=budget,
        kind=PG_RETRY_QUEUE,
    )
    retries.start()
    stack.push_async_callback(retries.drain, 1.0)
    await retries.enqueue(pg, written, b"written after a retry")
    await retries.enqueue(pg, dead, b"refused")

    def settled() -> bool:
        directory = tmp_path / "write-queue"
        for kind in (S3_WRITE_QUEUE, PG_RETRY_QUEUE):
            status = queue_status(directory, kind).get(WRITE_QUEUE_CACHE)
            if status is None or status.queued != 0 or status.dead_letters != 1:
                return False
        return True

    await until(
        settled,
        "the stored PUT, the written row and a dead letter in each queue",
        30.0,
        every_s=0.05,
    )
    return queue


async def test_every_dashboard_query_returns_data_with_job_and_with_exported_job(
    prometheus_binary_path: str,
    layer_db: LayerDb,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
    tmp_path: Path,
) -> None:
    storage_endpoint = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__ENDPOINT"
    throttling = FaultPlan(slowdown_share=0.02, methods=frozenset({"PUT"}), seed=3)

    async with AsyncExitStack() as stack:
        proxy = await stack.enter_async_context(FaultProxy(s3_server.endpoint.url, throttling))
        throttled_settings = settings_with(env, monkeypatch, **{storage_endpoint: proxy.url})
        direct_settings = settings_with(env, monkeypatch)
        key_order = await stack.enter_async_context(
            open_services_context(throttled_settings, with_s3=True)
        )
        newest_first = await stack.enter_async_context(
            open_services_context(direct_settings, with_s3=True)
        )
        targets = [
            f"127.0.0.1:{context.telemetry.scrape_port}" for context in (key_order, newest_first)
        ]
        port = free_port()
        prometheus = await stack.enter_async_context(
            running_prometheus(
                prometheus_binary_path, scrape_jobs(targets, f"127.0.0.1:{port}"), port=port
            )
        )
        # Prometheus applies new targets only after 5 s: seed meanwhile.
        rng = random.Random(41)
        rows = {cache_type: seed(rng, count) for cache_type, count in ROWS.items()}
        for cache_type, seeded in rows.items():
            await insert_rows(layer_db.pool, cache_type, seeded)
        cas_bucket = cache_bucket(CacheType.CAS, bucket_prefix)
        for index, row in enumerate(rows[CacheType.CAS][: ALREADY_COPIED + WRONG_SIZE]):
            body = row.value if index < ALREADY_COPIED else row.value + b"!"
            (key,) = expected_objects({row.key: row.value})
            await s3_client.put_object(Bucket=cas_bucket, Key=key, Body=body)
        write_queue = await exercise_write_queue(stack, key_order, proxy, tmp_path)
        proxy.plan = throttling
        await prometheus.wait_until(
            f'up{{job="{JOB}"}} == 1', lambda values: len(values) == 2, "both targets up"
        )

        started = time.monotonic()
        reports = await asyncio.gather(
            run_backfill(key_order, config(KEY_ORDER_CACHES, WalkOrder.KEY), StopRequest()),
            run_backfill(
                newest_first,
                config((NEWEST_FIRST_CACHE,), WalkOrder.NEWEST_FIRST),
                StopRequest(),
            ),
        )
        finished_at = time.time()
        backfill_s = time.monotonic() - started
        assert all(report.complete for report in reports)
        outcomes = {o.stats.cache_type: o.stats for report in reports for o in report.outcomes}
        processed = sum(stats.processed for stats in outcomes.values())
        assert processed == sum(ROWS.values())
        assert proxy.counts[SLOWDOWN] > 0, "the proxy throttled nothing"
        # Keep both endpoints up until both labelings hold the final values.
        for job_label, service in SERVICES.items():
            counter = f'layer_cache_backfill_items_processed_total{{{job_label}="{service}"}}'
            await prometheus.wait_until(
                f"sum({counter})",
                lambda values: values == [processed],
                f"the final count in {job_label}",
            )
            await prometheus.wait_until(
                f"min(timestamp({counter}))",
                lambda values: bool(values) and values[0] > finished_at,
                f"a scrape of both targets after the runs ended, in {job_label}",
            )

        answers = {
            (job_label, query): await prometheus.query(query.promql(job_label))
            for job_label in JOB_LABELS
            for query in dashboard_queries()
        }
        # Through /federate the service is in exported_job; job names the scraping job.
        assert queue_status(write_queue.store.directory)[WRITE_QUEUE_CACHE].dead_letters == 1
        federated = await prometheus.series(
            "count by (job) (layer_cache_backfill_items_processed_total"
            f'{{exported_job="{OTEL_SERVICE}"}})'
        )

    problems = [
        f"{query.panel} [{query.ref_id}] with {job_label}: {answer.get('status')}: "
        f"{answer.get('error') or 'no series'}\n    {query.promql(job_label)}"
        for (job_label, query), answer in answers.items()
        if answer["status"] != "success" or not answer["data"]["result"]
    ]
    assert not problems, "dashboard queries failed:\n" + "\n".join(problems)
    assert len(answers) >= 2 * 25
    for job_label in JOB_LABELS:
        check_panel_values(
            {query: answer for (label, query), answer in answers.items() if label == job_label},
            outcomes,
            processed,
        )
    assert {labels.get("job") for labels, _count in federated} == {COLLECTOR_JOB}
    # The runs must be long enough for rate() to see several scrapes.
    assert backfill_s > 3, f"the backfill took only {backfill_s:.1f}s"


def check_panel_values(
    answers: dict[PanelQuery, dict[str, Any]],
    outcomes: dict[CacheType, Any],
    processed: int,
) -> None:
    """A few panels' values against what the runs reported."""

    def values(panel: str, ref_id: str = "A") -> dict[str, float]:
        """cache_type (or error_class, or "") → value, for one query's answer."""
        (answer,) = (a for q, a in answers.items() if (q.panel, q.ref_id) == (panel, ref_id))
        return {
            item["metric"].get("cache_type", item["metric"].get("error_class", "")): float(
                item["value"][1]
            )
            for item in answer["data"]["result"]
        }

    assert values("Total Items Processed") == {"": processed}
    assert values("Total Items Skipped") == {"": ALREADY_COPIED}
    uploaded = sum(stats.uploaded for stats in outcomes.values())
    assert values("Total Items Uploaded") == {"": uploaded}
    assert values("Total Bytes Uploaded") == {
        "": sum(stats.bytes_uploaded for stats in outcomes.values())
    }
    assert values("Repaired and Vanished Items")[CacheType.CAS.value] == WRONG_SIZE
    every_cache = {cache_type.value for cache_type in ROWS}
    assert values("Items Distribution by Cache Type") == {
        cache_type.value: ROWS[cache_type] for cache_type in ROWS
    }
    # Done means 100 %, both ways, and no time left.
    assert values("Percent Complete by Cache Type", "A") == dict.fromkeys(every_cache, 1.0)
    assert values("Percent Complete by Cache Type", "B") == dict.fromkeys(every_cache, 1.0)
    assert values("ETA by Cache Type") == dict.fromkeys(every_cache, 0.0)
    # Only the newest-first walk reports how far behind the cutoff its checkpoint is.
    assert set(values("Checkpoint Lag by Cache Type")) == {NEWEST_FIRST_CACHE.value}
    throttled = values("Throttling: Throttled Retries by Cache Type")
    assert sum(throttled[cache.value] for cache in KEY_ORDER_CACHES) > 0
    assert throttled[NEWEST_FIRST_CACHE.value] == 0
    assert values("Retries by Class")["throttled"] > 0
    assert set(values("Errors by Class").values()) == {0.0}
    latency = values("Upload Latency p50 / p99", "B")
    assert set(latency) == every_cache
    assert all(math.isfinite(seconds) and seconds > 0 for seconds in latency.values())
