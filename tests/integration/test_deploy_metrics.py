"""The rendered workloads, run from their own environment: a backfill serves every series the
dashboard queries on its metrics port; a server answers its probes on its http port and serves
its write queue's series on its metrics port.

The environment is the container's in deploy/rendered/default/backfill-job.yaml, resolved as the
kubelet would (``tests.manifests.container_env``): the Secret references read a Secret holding
the test servers' credentials, and only what must point at the test servers is replaced (the
Postgres host, port, user, database and sslmode, without the CA file; the S3 endpoint, region
and bucket prefix; the cutoff, which the committed Job leaves as a placeholder; the metrics port,
a free one instead of the rendered 9464). Everything else is the Job's: the migration and
persister modes, all eight cache types, the grace period, the value budget, JSON logs, the pool
size and ``OTEL_METRICS_EXPORTER=none``. One test-only variable paces the run
(``SI_BACKFILL_MAX_UPLOADS_PER_SECOND``) so it lives long enough to be scraped.

While it runs, the test scrapes ``/metrics`` until every ``layer_cache_backfill_…`` series named in
grafana/layer-cache-backfill.json's queries is there (with the names Prometheus gives them:
``_total`` counters, ``_bucket`` histogram), then lets the run finish and checks it copied
everything. The one series left out is ``checkpoint_lag_seconds``, which only a newest-first walk
reports; the Job walks in key order, the default, and its panel says so.

The server runs from the rendered StatefulSet's container environment, pointed at the test
servers the same way, with free ports for the API and the metrics, a temporary directory for
the write queue the pod would mount from its claim, and its token Secret's volume projected into
a temporary directory as the kubelet would (a fresh token per role; the rendered
``…_TOKENS_FILE`` paths moved there): the readiness and liveness probes' paths answer 200 without
a token on the port the probes name, the API answers 401 without a token and to an unknown one,
a read token reads (404 for a key not written yet, then 200) and is refused a PUT (403), a write
token's PUT goes through the write queue to S3, and the dashboard's write-queue gauges and
counters of a healthy queue are on the metrics port. SIGTERM stops it with 143.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import signal
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy import render
from devenv.process import free_port
from grafana.dashboard import JSON_PATH
from layer_cache.cache_types import CacheType
from tests.cli_harness import Job
from tests.conftest import LayerDb
from tests.manifests import (
    Manifest,
    container_env,
    literal,
    load_documents,
    pod_spec,
    project_volumes,
    relocated,
    the_container,
)
from tests.support import CUTOFF_RFC3339, PG, SeedRow, insert_rows, random_key

pytestmark = pytest.mark.timeout(180)

JOB_FILE = render.RENDERED_DIR / render.DEFAULT_EXAMPLE / render.BACKFILL_FILE
SERVER_FILE = render.RENDERED_DIR / render.DEFAULT_EXAMPLE / render.SERVER_FILE
BACKFILL_SERIES = re.compile(r"\blayer_cache_backfill_\w+")
NEWEST_FIRST_ONLY = {"layer_cache_backfill_checkpoint_lag_seconds"}
SEEDED = {CacheType.CAS: 90, CacheType.WORKSPACE_SNAPSHOT: 60, CacheType.CHANGE_BATCH: 60}
UPLOADS_PER_SECOND = 30  # 210 rows: about 7 s of run to scrape
METRICS_PORT = "SI_SDF__METRICS_PORT"
SCRAPE_EVERY_S = 0.25


def dashboard_series(pattern: re.Pattern[str]) -> set[str]:
    """Every series matching ``pattern`` that a panel of the dashboard queries."""
    dashboard = json.loads(JSON_PATH.read_text(encoding="utf-8"))
    found: set[str] = set()
    for panel in dashboard["panels"]:
        for nested in [panel, *panel.get("panels", [])]:
            for target in nested.get("targets", []):
                found |= set(pattern.findall(target["expr"]))
    return found


def scrape(port: int) -> set[str] | None:
    """The sample names on the metrics endpoint (None while nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def pointed_at_the_test_servers(
    container: Manifest,
    layer_db: LayerDb,
    env: dict[str, str],
    replaced: dict[str, str],
    projected: dict[str, Path] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet would set it (the Secret references read a
    Secret holding the test servers' credentials), with the test servers and ``replaced`` in
    place of what the manifest names, and paths into ``projected`` volumes moved to where their
    files were written; each replaced variable must be one the manifest sets."""
    assert "envFrom" not in container, "the default example loads nothing of sdf's"
    secret_name = render.load_values().secret.name
    assert secret_name is not None
    credentials = "SI_SDF__LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__AUTH__STATIC_CREDENTIALS__"
    secret = {
        render.PG_PASSWORD_KEY: env[PG + "PASSWORD"],
        render.S3_ACCESS_KEY_KEY: env[credentials + "ACCESS_KEY"],
        render.S3_SECRET_KEY_KEY: env[credentials + "SECRET_KEY"],
    }
    rendered = relocated(container_env(container, secrets={secret_name: secret}), projected or {})
    servers = {
        name: value
        for name, value in env.items()
        if not name.endswith(("PASSWORD", "ACCESS_KEY", "SECRET_KEY"))
    }
    servers |= {PG + "DBNAME": layer_db.dbname} | replaced
    missing = set(servers) - set(rendered)
    assert not missing, f"the manifest does not set {sorted(missing)}: nothing to replace"
    del rendered[PG + "SSL_CA_CERT"]  # the test Postgres speaks plain TCP (sslmode disable)
    return rendered | servers


def job_environment(layer_db: LayerDb, env: dict[str, str], metrics_port: int) -> dict[str, str]:
    """The rendered Job's environment, pointed at the test servers."""
    (job,) = load_documents(JOB_FILE)
    assert literal(job, "SI_BACKFILL_CUTOFF_TIMESTAMP").startswith("REPLACE")
    replaced = {"SI_BACKFILL_CUTOFF_TIMESTAMP": CUTOFF_RFC3339, METRICS_PORT: str(metrics_port)}
    environment = pointed_at_the_test_servers(the_container(job), layer_db, env, replaced)
    assert "SI_BACKFILL_ORDER" not in environment, "key order: no checkpoint lag to report"
    return environment | {"SI_BACKFILL_MAX_UPLOADS_PER_SECOND": str(UPLOADS_PER_SECOND)}


async def seed(layer_db: LayerDb) -> int:
    rng = random.Random(22)
    cutoff = datetime.fromisoformat(CUTOFF_RFC3339)
    for cache_type, count in SEEDED.items():
        rows = [
            SeedRow(random_key(rng), rng.randbytes(rng.randint(64, 1024)), cutoff - timedelta(s))
            for s in range(1, count + 1)
        ]
        await insert_rows(layer_db.pool, cache_type, rows)
    return sum(SEEDED.values())


async def test_the_rendered_job_serves_every_series_the_dashboard_queries(
    layer_db: LayerDb, env: dict[str, str]
) -> None:
    wanted = dashboard_series(BACKFILL_SERIES) - NEWEST_FIRST_ONLY
    assert len(wanted) >= 15, sorted(wanted)
    rows = await seed(layer_db)
    port = free_port()
    environment = job_environment(layer_db, env, port)
    assert environment["OTEL_METRICS_EXPORTER"] == "none"

    async with Job([], environment) as job:
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while not wanted <= seen:
            assert job.running, (
                f"the run ended before the dashboard's series were all scraped; "
                f"missing {sorted(wanted - seen)}\n{job.output()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"never scraped {sorted(wanted - seen)}"
            scraped = await asyncio.to_thread(scrape, port)
            seen |= scraped or set()
            await asyncio.sleep(SCRAPE_EVERY_S)
        run = await job.finish(within_s=90)

    assert run.status == 0, run.describe()
    total = run.summary()
    assert (total["processed"], total["uploaded"]) == (rows, rows)
    started = run.named("starting backfill for all cache types")
    assert started, run.describe()
    assert f"port {port}" in started[0]["metrics"]


# The write-queue series a healthy queue has after one PUT (retries, dead letters and write-backs
# appear only when they happen).
WRITE_QUEUE_SERIES = {
    "s3_write_queue_depth",
    "s3_dlq_depth",
    "layer_cache_write_queue_oldest_age_seconds",
    "layer_cache_write_queue_enqueued_total",
    "s3_write_attempts_total",
}


def request(url: str, *, token: str | None = None, body: bytes | None = None) -> int:
    """The status of a GET (or, with ``body``, a PUT), with ``token`` as the bearer token."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    method = "GET" if body is None else "PUT"
    call = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            answer.read()
            status: int = answer.status
            return status
    except urllib.error.HTTPError as refused:
        refused.read()
        return refused.code


def token_secret(statefulset: Manifest, tokens: dict[str, str]) -> dict[str, dict[str, str]]:
    """The token Secret the StatefulSet mounts, holding ``tokens`` (file in the mount → token)
    under the keys the volume projects to those files."""
    (volume,) = [v for v in pod_spec(statefulset)["volumes"] if v["name"] == render.TOKENS_VOLUME]
    source = volume["secret"]
    items = {item["path"]: item["key"] for item in source["items"]}
    assert set(items) == set(tokens), "a token file per role"
    return {source["secretName"]: {items[file]: token + "\n" for file, token in tokens.items()}}


async def test_the_rendered_server_answers_its_probes_and_serves_its_queue_metrics(
    layer_db: LayerDb, env: dict[str, str], tmp_path: Path
) -> None:
    queue_series = re.compile(r"\b(?:layer_cache_write_queue_\w+|s3_(?:write|dlq)_\w+)")
    assert dashboard_series(queue_series) >= WRITE_QUEUE_SERIES
    (statefulset,) = [d for d in load_documents(SERVER_FILE) if d["kind"] == "StatefulSet"]
    container = the_container(statefulset)
    api_port, metrics_port = free_port(), free_port()
    queue_dir = tmp_path / "write-queue"
    replaced = {
        "SI_SDF__SOCKET_ADDR": f"127.0.0.1:{api_port}",
        METRICS_PORT: str(metrics_port),
        "SI_SDF__SERVER__WRITE_QUEUE_DIR": str(queue_dir),
    }
    reader, writer = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    tokens = {render.READ_TOKENS_FILE: reader, render.WRITE_TOKENS_FILE: writer}
    projected = project_volumes(
        statefulset,
        tmp_path / "volumes",
        secrets=token_secret(statefulset, tokens),
        only={render.TOKENS_VOLUME},  # the Postgres CA is left out: the test server is plain TCP
    )
    environment = pointed_at_the_test_servers(container, layer_db, env, replaced, projected)
    assert environment["SI_SDF__LAYER_DB_CONFIG__PERSISTER_MODE"] == "DualWrite"
    assert environment["SI_SDF__SERVER__AUTH"] == "tokens"
    for name in ("SI_SDF__SERVER__READ_TOKENS_FILE", "SI_SDF__SERVER__WRITE_TOKENS_FILE"):
        assert Path(environment[name]).is_relative_to(tmp_path), f"{name} not projected"
    probes = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("readinessProbe", "livenessProbe")
    }
    assert {port for _path, port in probes.values()} == {"http"}
    http = f"http://127.0.0.1:{api_port}"

    async with Job([], environment) as server:
        await server.wait_for_event("layer cache server listening", within_s=60)
        for probe, (path, _port) in probes.items():
            status = await asyncio.to_thread(request, http + path)
            assert status == 200, f"{probe} {path} without a token: {status}"
        url = f"{http}/v1/cas/0123456789abcdef0123456789abcdef"
        assert await asyncio.to_thread(request, url) == 401
        assert await asyncio.to_thread(request, url, token=secrets.token_urlsafe(32)) == 401
        assert await asyncio.to_thread(request, url, token=reader) == 404  # not written yet
        assert await asyncio.to_thread(request, url, token=reader, body=b"value") == 403
        assert await asyncio.to_thread(request, url, token=writer, body=b"value") == 201
        assert await asyncio.to_thread(request, url, token=reader) == 200
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while not seen >= WRITE_QUEUE_SERIES:
            assert time.monotonic() < deadline, f"never scraped {sorted(WRITE_QUEUE_SERIES - seen)}"
            scraped = await asyncio.to_thread(scrape, metrics_port)
            seen |= scraped or set()
            await asyncio.sleep(SCRAPE_EVERY_S)
        assert (queue_dir / "write-queue.sqlite3").is_file()
        server.send(signal.SIGTERM)
        run = await server.finish(within_s=60)
    assert run.status == 143, run.describe()
