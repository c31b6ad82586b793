"""Upstream's "LayerCache Metrics" dashboard, imported unchanged, over the layer cache server's
series in a real Prometheus, labelled as upstream's pipeline labels them.

The dashboard is upstream's JSON byte for byte (``tests/fixtures/upstream``, its blob id checked).
Four servers run in this process, one per persister mode, each with a memory cache tier, its
metrics on a free port (``metrics_port=0``) and S3 through one fault proxy, over the suite's
Postgres and S3. A ``prometheus`` process of our own scrapes the four under one job and reads
them back through its ``/federate`` endpoint under a second job, whose ``job`` clashes with theirs:
Prometheus renames theirs ``exported_job``, as when it scrapes an OpenTelemetry collector's
Prometheus exporter (upstream's pipeline), and a relabelling sets it to ``si/sdf``, the
collector's name for the service (``test_dashboard.py`` does the same for our own dashboard).

The load touches every path, in rounds a second apart (so rates see increases): writes; reads
answered by the tier, by each backend and by none; S3Primary's fallback to Postgres and its
write-back; bulk reads; evicts. Then the faults: S3 PUTs answered 503 (retried by the S3 write
queue, and failing an S3Only PUT), objects the proxy refuses (dead letters under the opt-in
attempt cap, and a permanent S3Only failure), and Postgres INSERTs and a DELETE refused by a
trigger for chosen keys a chosen number of times (``tests.support.refuse_rows``): rows through the
Postgres retry queue, written after a failed retry or dead-lettered; a permanent write failure;
an evict that fails.

Each template variable's ``label_values`` query is resolved as Grafana does; then every target's
expression is sent to ``/api/v1/query`` with the variables filled in as Grafana fills them: the
service's value, ``All`` (``.*``) for the other multi-value variables, ``1m`` for the intervals
(the panels' minimum), and a repeated panel once per value of its variable. Every target must
return at least one series unless ``SKIPPED`` lists it with its reason, and every listed one must
return none: a new gap, or a skip that has become stale, fails the test. A few totals are checked
against what the load did.

The collector itself (no binary of it is obtainable here): the servers also export over
OTLP/gRPC to a real receiver (``devenv.otlp_receiver``), and every metric received, named as the
collector's Prometheus exporter names it (``_total``, ``_bucket``, unit words), must be a series
Prometheus holds under ``exported_job``: both paths give upstream's names.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from devenv.faults import SLOWDOWN, FaultPlan, FaultProxy
from devenv.metric_stores import MetricStore, prometheus_binary, running_prometheus
from devenv.otlp_receiver import otlp_grpc_receiver
from devenv.process import free_port
from devenv.s3 import S3Server
from devenv.tools import MissingTool
from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import object_key
from layer_cache.write_queue import PG_RETRY_QUEUE, S3_ATTEMPTS_METRIC, S3_WRITE_QUEUE, queue_status
from services.context import open_services_context
from tests.conftest import LayerDb
from tests.integration.test_dashboard import OTEL_SERVICE, scrape_jobs
from tests.server_support import (
    RunningServer,
    counter_values,
    hex_key,
    insert_row,
    put_object,
    serve_tiered,
    settings_for,
)
from tests.support import CACHE, REPO_ROOT, SERVER, STORAGE, refuse_rows

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.timeout(180)

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "upstream" / "layer-cache-metrics.json"
UPSTREAM_BLOB = "356e10aaed151c5da6d264419b4133a4863e211c"
JOB = "layer-cache-server"
SNAPSHOT = CacheType.WORKSPACE_SNAPSHOT
MODES = ("PostgresOnly", "DualWrite", "S3Primary", "S3Only")
READS_PG = ("PostgresOnly", "DualWrite", "S3Primary")
READS_S3 = ("S3Primary", "S3Only")
QUEUED = ("DualWrite", "S3Primary")  # the modes with both durable queues
ROUNDS = 4
ROUND_GAP_S = 1.1
MAX_ATTEMPTS = 8  # the opt-in cap: a refused object is a dead letter after 8 PUTs
SERIALIZATION_FAILURE, RAISED = "40001", "P0001"  # transient; an error no retry fixes
RETRIED_ONCE = 3 + 1  # the request's 3 attempts, then the retry queue's first
FOREVER = 1_000
# What Grafana puts in for $__interval and $__rate_interval: the panels' minimum interval.
INTERVALS = {"__interval": "1m", "__rate_interval": "1m"}

NATS = (
    "NATS only: upstream publishes every write and evict to NATS for the other replicas' "
    "caches; this server has no NATS (content never changes under a key, and its tier is per "
    "replica), so there is no NATS error, nor a Postgres and NATS error at once"
)
RETIRED = (
    "s3_write_attempts_total results throttle and error_* came from upstream's single-worker "
    "S3QueueProcessor, which 0fd391ffd (2025-12) replaced by workers counting success, retry and "
    "dead_letter_queue, as upstream's code and this server count: empty upstream too (counting a "
    "failed attempt twice would halve the success rate the other panels show)"
)
NEVER_FAILS = (
    "the tier's evict cannot fail: the key leaves memory and the disk index at once (upstream's "
    "foyer remove cannot fail either, and upstream emits no eviction series at all)"
)
# (panel title, refId) → why the target has no data here.
SKIPPED = {
    ("System Health - Overall Error Rate", "A"): RETIRED,
    ("S3 Write Error Breakdown by Category", "A"): RETIRED,
    ("Persister - Error Source (Write)", "B"): NATS,
    ("Persister - Error Source (Write)", "C"): NATS,
    ("Persister - Error Source (Evict)", "B"): NATS,
    ("Persister - Error Source (Evict)", "C"): NATS,
    ("Foyer - Evict Failures", "A"): NEVER_FAILS,
}

LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?([a-zA-Z_][a-zA-Z0-9_]*)\)\s*$")
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

Json = dict[str, Any]


@pytest.fixture(scope="module")
def prometheus_path() -> str:
    try:
        return prometheus_binary()
    except MissingTool as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


# --------------------------------------------------------------------------------------------
# The dashboard: targets and variables, as Grafana reads them


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str
    repeat: str | None


def load_dashboard() -> Json:
    blob = subprocess.run(
        ["git", "hash-object", str(FIXTURE)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert blob == UPSTREAM_BLOB, "the vendored dashboard is not upstream's file unchanged"
    dashboard: Json = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return dashboard


def dashboard_targets(dashboard: Json) -> list[Target]:
    found = []
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                found.append(
                    Target(nested["title"], target["refId"], target["expr"], nested.get("repeat"))
                )
    return found


def fill(text: str, values: Mapping[str, str]) -> str:
    """``text`` with its ``$name`` / ``${name}`` variables replaced, as Grafana's templating."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown variable ${name} in {text!r}"
        return values[name]

    return VARIABLE.sub(one, text)


async def resolve_variables(prometheus: MetricStore, dashboard: Json) -> dict[str, list[str]]:
    """Each query variable's options, in dashboard order (a later query may use an earlier
    variable, filled with its options as a regex alternation)."""
    options: dict[str, list[str]] = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        filled = {name: "|".join(values) for name, values in options.items()}
        parsed = LABEL_VALUES.match(fill(variable["query"], filled))
        assert parsed is not None, variable["query"]
        selector, label = parsed.groups()
        options[variable["name"]] = sorted(await prometheus.label_values(label, selector))
    return options


def instances(target: Target, options: Mapping[str, list[str]]) -> list[str]:
    """The target's expression as Grafana sends it: one per value of a repeated panel's
    variable, else with ``All`` (``.*``) for the multi-value variables but the service."""
    chosen = INTERVALS | dict.fromkeys(options, ".*") | {"service": OTEL_SERVICE}
    if target.repeat is None:
        return [fill(target.expr, chosen)]
    return [fill(target.expr, chosen | {target.repeat: value}) for value in options[target.repeat]]


# --------------------------------------------------------------------------------------------
# The load


@dataclass
class Seeds:
    """Values put where a mode reads them before the load, per round: read singly and in bulk."""

    gets: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)
    bulk: dict[tuple[str, int], dict[str, bytes]] = field(default_factory=dict)


async def seed_backends(
    layer_db: LayerDb, s3_client: S3Client, bucket_prefix: str, rng: random.Random
) -> Seeds:
    """Per mode and round: values on each backend it reads (S3Primary: one only in Postgres,
    read through the fallback, and one in S3), for single reads and for a bulk read."""
    seeds = Seeds()
    for mode in MODES:
        for round_ in range(ROUNDS):
            for chosen in (seeds.gets, seeds.bulk):
                values: dict[str, bytes] = {}
                if mode in READS_PG:
                    key, value = hex_key(rng), rng.randbytes(rng.randint(100, 3000))
                    await insert_row(layer_db, SNAPSHOT, key, value)
                    values[key] = value
                if mode in READS_S3:
                    key, value = hex_key(rng), rng.randbytes(rng.randint(100, 3000))
                    await put_object(s3_client, bucket_prefix, SNAPSHOT, key, value)
                    values[key] = value
                chosen[(mode, round_)] = values
    return seeds


class Client:
    """Requests to one server, each answered as expected."""

    def __init__(self, http: aiohttp.ClientSession, server: RunningServer) -> None:
        self.http = http
        self.server = server

    async def put(self, key: str, value: bytes, expected: int = 201) -> None:
        async with self.http.put(self.server.v1(SNAPSHOT, key), data=value) as response:
            assert response.status == expected, await response.text()

    async def get(self, key: str, expected: bytes | None) -> None:
        async with self.http.get(self.server.v1(SNAPSHOT, key)) as response:
            if expected is None:
                assert response.status == 404, await response.text()
            else:
                assert (response.status, await response.read()) == (200, expected)

    async def bulk(self, keys: list[str], expected: dict[str, bytes]) -> None:
        url = self.server.v1(SNAPSHOT, "get-bulk")
        async with self.http.post(url, json={"keys": keys}) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        found = {key: base64.b64decode(value) for key, value in body["values"].items()}
        assert found == expected

    async def evict(self, key: str, expected: int = 204) -> None:
        async with self.http.delete(self.server.v1(SNAPSHOT, key)) as response:
            assert response.status == expected, await response.text()


async def steady_round(client: Client, mode: str, round_: int, seeds: Seeds) -> None:
    """Writes, reads from the tier, from the backends and from none, a bulk read, an evict."""
    rng = random.Random(f"{mode} {round_}")
    written = {hex_key(rng): rng.randbytes(rng.randint(100, 3000)) for _ in range(2)}
    for key, value in written.items():
        await client.put(key, value)
    kept, evicted = written
    await client.get(kept, written[kept])  # the tier
    for key, value in seeds.gets[(mode, round_)].items():
        await client.get(key, value)  # a backend (S3Primary: S3, or Postgres after S3 missed)
    await client.get(hex_key(rng), None)  # on no backend
    bulk = seeds.bulk[(mode, round_)]
    await client.bulk([kept, *bulk, hex_key(rng)], {kept: written[kept]} | bulk)
    await client.evict(evicted)


async def until(condition: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def two_samples_of_every_series(prometheus: MetricStore, selector: str) -> None:
    """Wait until every series ``selector`` matches has two samples in the last 5 s."""
    deadline = time.monotonic() + 30.0
    while True:
        answer = await prometheus.query(f"{selector}[5s]")
        assert answer["status"] == "success", answer
        fewest = min((len(series["values"]) for series in answer["data"]["result"]), default=0)
        if fewest >= 2:
            return
        assert time.monotonic() < deadline, f"a series of {selector} has {fewest} samples"
        await asyncio.sleep(0.25)


def s3_retries(server: RunningServer) -> int:
    return sum(
        value
        for attributes, value in counter_values(server.metrics, S3_ATTEMPTS_METRIC).items()
        if dict(attributes)["result"] == "retry"
    )


def settled(directory: Path) -> bool:
    """Both queues empty, with one dead letter each."""
    for kind in (S3_WRITE_QUEUE, PG_RETRY_QUEUE):
        status = queue_status(directory, kind).get(SNAPSHOT)
        if status is None or (status.queued, status.dead_letters) != (0, 1):
            return False
    return True


@dataclass(frozen=True)
class FaultKeys:
    """The keys each fault is for."""

    slow: dict[str, str]  # mode → a key whose first S3 PUT is answered 503
    refused: dict[str, str]  # mode → a key whose every S3 PUT the proxy refuses
    retried: dict[str, str]  # queued mode → a row Postgres refuses 4 times
    dead: dict[str, str]  # queued mode → a row Postgres refuses every time
    raised: str  # PostgresOnly: a row Postgres refuses with an error no retry fixes
    undeletable: str  # PostgresOnly: a row whose delete Postgres refuses

    @staticmethod
    def draw(rng: random.Random) -> FaultKeys:
        return FaultKeys(
            slow={mode: hex_key(rng) for mode in (*QUEUED, "S3Only")},
            refused={mode: hex_key(rng) for mode in (*QUEUED, "S3Only")},
            retried={mode: hex_key(rng) for mode in QUEUED},
            dead={mode: hex_key(rng) for mode in QUEUED},
            raised=hex_key(rng),
            undeletable=hex_key(rng),
        )

    def postgres_refusals(self) -> dict[tuple[str, str], tuple[str, int]]:
        refusals = {
            (key, "INSERT"): (SERIALIZATION_FAILURE, RETRIED_ONCE) for key in self.retried.values()
        }
        refusals |= {
            (key, "INSERT"): (SERIALIZATION_FAILURE, FOREVER) for key in self.dead.values()
        }
        refusals[(self.raised, "INSERT")] = (RAISED, FOREVER)
        refusals[(self.undeletable, "DELETE")] = (SERIALIZATION_FAILURE, FOREVER)
        return refusals


async def faults(
    clients: dict[str, Client], proxy: FaultProxy, keys: FaultKeys, queue_dirs: dict[str, Path]
) -> None:
    """Every failure path once: S3 retries and dead letters, S3Only's failed PUTs, Postgres
    rows retried and dead-lettered, a permanent Postgres failure, a failed evict."""
    value = b"a value"
    proxy.plan = FaultPlan(slowdown_share=1.0, methods=frozenset({"PUT"}))
    await clients["S3Only"].put(keys.slow["S3Only"], value, expected=503)  # after its retries
    # Queued at once, so each queue's first PUT is answered 503 long before its 8th could be.
    await asyncio.gather(*(clients[mode].put(keys.slow[mode], value) for mode in QUEUED))
    await until(
        lambda: all(s3_retries(clients[mode].server) > 0 for mode in QUEUED), "a retried S3 PUT"
    )
    assert proxy.counts[SLOWDOWN] >= 3 + len(QUEUED)
    proxy.plan = FaultPlan(refused_keys=frozenset(object_key(k) for k in keys.refused.values()))
    await clients["S3Only"].put(keys.refused["S3Only"], value, expected=500)
    for mode in QUEUED:
        await clients[mode].put(keys.refused[mode], value)  # queued, refused: a dead letter
        await clients[mode].put(keys.retried[mode], value)  # Postgres: the retry queue
        await clients[mode].put(keys.dead[mode], value)  # Postgres: a dead letter
    await clients["PostgresOnly"].put(keys.raised, value, expected=500)
    await clients["PostgresOnly"].put(keys.undeletable, value)
    await clients["PostgresOnly"].evict(keys.undeletable, expected=503)
    await until(lambda: all(settled(queue_dirs[mode]) for mode in QUEUED), "every queue settled")


# --------------------------------------------------------------------------------------------
# The test


async def test_every_panel_of_upstreams_dashboard_has_data_but_the_listed_ones(
    prometheus_path: str,
    layer_db: LayerDb,
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    dashboard = load_dashboard()
    targets = dashboard_targets(dashboard)
    titles = {target.panel for target in targets}
    assert {panel for panel, _ref_id in SKIPPED} <= titles
    rng = random.Random(23)
    keys = FaultKeys.draw(rng)
    await refuse_rows(layer_db.pool, SNAPSHOT, keys.postgres_refusals())
    seeds = await seed_backends(layer_db, s3_client, bucket_prefix, rng)
    queue_dirs = {mode: tmp_path / mode for mode in MODES}

    async with AsyncExitStack() as stack:
        receiver = stack.enter_context(otlp_grpc_receiver())
        for name, setting in {
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        }.items():
            monkeypatch.setenv(name, setting)
        proxy = await stack.enter_async_context(FaultProxy(s3_server.endpoint.url, FaultPlan()))
        servers: dict[str, RunningServer] = {}
        for mode in MODES:
            env = {
                STORAGE + "ENDPOINT": proxy.url,
                "SI_SDF__METRICS_PORT": "0",
                SERVER + "WRITE_QUEUE_DIR": str(queue_dirs[mode]),
                SERVER + "WRITE_QUEUE_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                SERVER + "WRITE_QUEUE_BASE_DELAY_SECS": "0.1",
                SERVER + "WRITE_QUEUE_MAX_DELAY_SECS": "0.4",
                SERVER + "GRACE_PERIOD_SECS": "3",
                SERVER + "CACHE_MEMORY_BYTES": "8MiB",
                CACHE + "DISK_LAYER": "false",
            }
            settings = settings_for(layer_db, s3_server, bucket_prefix, mode, **env)
            metrics = InMemoryMetricReader()
            context = await stack.enter_async_context(
                open_services_context(settings, metric_readers=[metrics])
            )
            servers[mode] = await serve_tiered(context, settings, metrics)
            stack.push_async_callback(servers[mode].shut_down)
        targets_up = [
            f"127.0.0.1:{server.server.context.telemetry.scrape_port}"
            for server in servers.values()
        ]
        port = free_port()
        prometheus = await stack.enter_async_context(
            running_prometheus(
                prometheus_path, scrape_jobs(targets_up, f"127.0.0.1:{port}", job=JOB), port=port
            )
        )
        await prometheus.wait_until(
            f'up{{job="{JOB}"}} == 1', lambda values: len(values) == len(MODES), "every server up"
        )

        clients = {mode: Client(http, server) for mode, server in servers.items()}
        for round_ in range(ROUNDS):
            started = time.monotonic()
            await asyncio.gather(
                *(steady_round(clients[mode], mode, round_, seeds) for mode in MODES)
            )
            await asyncio.sleep(max(0.0, ROUND_GAP_S - (time.monotonic() - started)))
        await faults(clients, proxy, keys, queue_dirs)
        finished_at = time.time()

        service = f'exported_job="{OTEL_SERVICE}"'
        await prometheus.wait_until(
            f"sum(s3_dlq_depth{{{service}}})", lambda values: values == [2.0], "both dead letters"
        )
        await prometheus.wait_until(
            f"min(timestamp(layer_cache_requests_total{{{service}}}))",
            lambda values: bool(values) and values[0] > finished_at,
            "a scrape of every server after the load, federated",
        )
        # rate() needs two samples in its window, the series that appeared last included.
        await two_samples_of_every_series(prometheus, f"{{{service}}}")
        options = await resolve_variables(prometheus, dashboard)
        answers = {
            target: [await prometheus.query(promql) for promql in instances(target, options)]
            for target in targets
        }
        totals = {
            name: await prometheus.values(f"sum({name}{{{service}}})")
            for name in (
                "layer_cache_retry_queue_enqueued_total",
                "layer_cache_retry_queue_success_total",
                "layer_cache_retry_queue_permanent_failure_total",
                "layer_cache_persister_write_failed_permanent_total",
                "layer_cache_eviction_failures_total",
            )
        }
        dead_letter_attempts = await prometheus.values(
            f's3_write_attempts_total{{{service}, result="dead_letter_queue"}}'
        )
        scraped = set(await prometheus.label_values("__name__", f"{{{service}}}"))
        resources = {
            f"{point.resource['service.namespace']}/{point.resource['service.name']}"
            for point in receiver.points()
        }
        exported_over_otlp = receiver.prometheus_names()

    assert options["service"] == [OTEL_SERVICE]
    assert options["cache"] == [CACHE_SPECS[SNAPSHOT].table]
    assert options["operation"] == ["evict", "retry", "write"]
    for target, found in answers.items():
        for answer in found:
            assert answer["status"] == "success", f"{target}: {answer}"
    empty = {
        (target.panel, target.ref_id)
        for target, found in answers.items()
        if not any(answer["data"]["result"] for answer in found)
    }
    unexplained = sorted(empty - SKIPPED.keys())
    assert not unexplained, "targets without data: " + "; ".join(
        f"{panel} [{ref_id}]: {target.expr}"
        for target in answers
        for panel, ref_id in unexplained
        if (target.panel, target.ref_id) == (panel, ref_id)
    )
    assert sorted(SKIPPED.keys() - empty) == [], "skipped, yet they have data"
    assert (len(answers), len(empty)) == (82, len(SKIPPED))  # upstream's 82 targets, 75 with data

    # What the load did: each queued mode one retried and one dead Postgres row, S3Only's refused
    # PUT and PostgresOnly's raised INSERT, PostgresOnly's refused DELETE.
    assert totals == {
        "layer_cache_retry_queue_enqueued_total": [4.0],
        "layer_cache_retry_queue_success_total": [2.0],
        "layer_cache_retry_queue_permanent_failure_total": [2.0],
        "layer_cache_persister_write_failed_permanent_total": [2.0],
        "layer_cache_eviction_failures_total": [1.0],  # Postgres's: the tier's never fails
    }
    assert sorted(dead_letter_attempts) == [1.0, 1.0]

    # Through the collector's exporter, every metric gets a name Prometheus holds here.
    assert resources == {OTEL_SERVICE}
    assert not exported_over_otlp - scraped, sorted(exported_over_otlp - scraped)
    assert not [name for name in scraped if "_milliseconds" in name]
