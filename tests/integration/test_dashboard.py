"""Every query of the dashboard, run through a real Prometheus that scraped a real backfill.

Two services contexts run side by side in this process, as two replicas of one job would: one
walks ``cas`` and ``change_batch`` in key order through a fault proxy that throttles a few PUTs
(so retries, the throttling panel and the adaptive concurrency limit have something to show),
the other walks ``workspace_snapshot`` newest-first (the only order that reports checkpoint lag).
Some objects are already in S3 with the right size (skipped) or the wrong one (repaired). Both
contexts serve their metrics on a free port (``metrics_port=0``); a ``prometheus`` process of our
own, with its own config and storage in a temporary folder, scrapes both every second under one
job. When the runs are over and Prometheus has scraped the final values, every query of every
panel is sent to ``/api/v1/query`` with the dashboard's variables filled in, and must be valid
and return at least one series; a few values are checked against what the runs reported.

Prometheus is Debian's ``prometheus`` package: installed with apt-get when missing and the
process is root, otherwise the test is skipped. The package's own service plays no part.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp
import pytest
import yaml

from devenv.faults import SLOWDOWN, FaultPlan, FaultProxy
from devenv.servers import S3Server, free_port
from grafana.dashboard import JSON_PATH
from layer_cache.cache_types import CacheType
from migrations_mode.config import BackfillConfig
from migrations_mode.coordinator import run_backfill
from migrations_mode.walk import WalkOrder
from services.context import open_services_context
from services.settings import Settings, load_settings
from services.signals import StopRequest
from tests.conftest import LayerDb
from tests.support import SeedRow, cache_bucket, expected_objects, insert_rows, random_key

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

pytestmark = pytest.mark.timeout(240)

JOB = "layer-cache-backfill"
CUTOFF = datetime(2026, 1, 13, 17, 30, 26, 445817, tzinfo=UTC)
KEY_ORDER_CACHES = (CacheType.CAS, CacheType.CHANGE_BATCH)
NEWEST_FIRST_CACHE = CacheType.WORKSPACE_SNAPSHOT
ROWS = {CacheType.CAS: 450, CacheType.CHANGE_BATCH: 300, CacheType.WORKSPACE_SNAPSHOT: 450}
ALREADY_COPIED = 60  # cas rows whose object is in S3 with the right size: skipped
WRONG_SIZE = 15  # cas rows whose object has the wrong size: repaired
# What Grafana would put in for the variables; $service is the scrape job's name.
VARIABLES = {
    "datasource": "",
    "service": JOB,
    "cache_type": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
}
VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
READY_TIMEOUT_S = 30.0
SCRAPED_TIMEOUT_S = 30.0


def prometheus_install_failure() -> str | None:
    """Install Debian's prometheus package; None on success, else why it cannot be."""
    if os.geteuid() != 0:
        return "prometheus is not installed and only root may apt-get install it"
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        return "prometheus is not installed and there is no apt-get to install it"
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "--no-install-recommends", "prometheus"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # perhaps no package lists yet
        subprocess.run([apt_get, "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return "apt-get install prometheus failed: " + result.stderr.strip()[-500:]
    return None


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        failure = prometheus_install_failure()
        if failure is not None:
            pytest.skip(failure)
        binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus package installed no prometheus binary on PATH")
    return binary


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus and an HTTP session to its API."""

    url: str
    session: aiohttp.ClientSession

    async def query(self, promql: str) -> dict[str, Any]:
        """The ``/api/v1/query`` answer (status error included) for an instant query now."""
        async with self.session.get(
            f"{self.url}/api/v1/query", params={"query": promql}
        ) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
            return answer

    async def values(self, promql: str) -> list[float]:
        """The sample values of a query that must succeed."""
        answer = await self.query(promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        return [float(item["value"][1]) for item in answer["data"]["result"]]

    async def wait_until(self, promql: str, accept: Any, what: str) -> list[float]:
        """Poll ``promql`` until ``accept(values)``; fail after ``SCRAPED_TIMEOUT_S``."""
        deadline = time.monotonic() + SCRAPED_TIMEOUT_S
        values: list[float] = []
        while time.monotonic() < deadline:
            values = await self.values(promql)
            if accept(values):
                return values
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {promql} = {values}")


def write_config(path: Path, targets: list[str]) -> None:
    """One job scraping ``targets`` every second."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-2000:]


@contextmanager
def log_file(path: Path) -> Iterator[IO[bytes]]:
    with path.open("wb") as handle:
        yield handle


@asynccontextmanager
async def running_prometheus(binary: str, targets: list[str]) -> AsyncIterator[Prometheus]:
    """Our own prometheus process: config, storage and log in a temporary folder, 1 s scrapes."""
    with tempfile.TemporaryDirectory(prefix="dashboard-prometheus-") as folder:
        workdir = Path(folder)
        write_config(workdir / "prometheus.yml", targets)
        address = f"127.0.0.1:{free_port()}"
        with log_file(workdir / "prometheus.log") as log:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={address}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            try:
                async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=10)
                ) as session:
                    prometheus = Prometheus(f"http://{address}", session)
                    await wait_ready(prometheus, process, workdir / "prometheus.log")
                    yield prometheus
            finally:
                if process.returncode is None:
                    process.terminate()
                    try:
                        await asyncio.wait_for(process.wait(), timeout=10)
                    except TimeoutError:
                        process.kill()
                        await process.wait()


async def wait_ready(
    prometheus: Prometheus, process: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            break
        try:
            async with prometheus.session.get(f"{prometheus.url}/-/ready") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"prometheus did not become ready (exit {process.returncode}):\n{log_tail(log)}"
    )


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def promql(self) -> str:
        """The expression with the dashboard variables filled in, as Grafana would."""

        def fill(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            assert name in VARIABLES, f"{self.panel}: unknown variable ${name}"
            return VARIABLES[name]

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


async def test_every_dashboard_query_returns_data_from_a_real_backfill(
    prometheus_binary: str,
    layer_db: LayerDb,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_client: S3Client,
    bucket_prefix: str,
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
        prometheus = await stack.enter_async_context(running_prometheus(prometheus_binary, targets))
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
        # Keep both endpoints up until Prometheus has scraped the final values.
        counter = f'layer_cache_backfill_items_processed_total{{job="{JOB}"}}'
        await prometheus.wait_until(
            f"sum({counter})", lambda values: values == [processed], "the final count"
        )
        await prometheus.wait_until(
            f"min(timestamp({counter}))",
            lambda values: bool(values) and values[0] > finished_at,
            "a scrape of both targets after the runs ended",
        )

        answers = {query: await prometheus.query(query.promql) for query in dashboard_queries()}

    problems = [
        f"{query.panel} [{query.ref_id}] {answer.get('status')}: "
        f"{answer.get('error') or 'no series'}\n    {query.promql}"
        for query, answer in answers.items()
        if answer["status"] != "success" or not answer["data"]["result"]
    ]
    assert not problems, "dashboard queries failed:\n" + "\n".join(problems)
    assert len(answers) >= 25

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
    # The runs must be long enough for rate() to see several scrapes.
    assert backfill_s > 3, f"the backfill took only {backfill_s:.1f}s"
