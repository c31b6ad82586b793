"""Metric stores of our own for tests: Prometheus (scrapes, federates) and VictoriaMetrics
(receives OTLP/HTTP), both answering the Prometheus query API.

The binary is the one on ``PATH``, else Debian 13's package (``prometheus`` 2.53,
``victoria-metrics`` 1.112) that ``make test`` fetched under ``<repo>/.devenv`` (``devenv.tools``);
``*_binary()`` raises ``MissingTool`` naming ``make test`` when it is not there, and never
downloads. OTLP/HTTP goes to VictoriaMetrics because Debian builds Prometheus without its OTLP
receiver (``-opentelemetry.usePrometheusNaming`` gives Prometheus' own names: ``…_total``,
``service_name``). ``running_prometheus`` / ``running_victoria_metrics`` start a server on a free
loopback port with its storage in a temporary folder, wait until it answers, and terminate it
(kill after 10 s) on the way out.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from devenv.process import free_port
from devenv.tools import debian_binary

READY_TIMEOUT_S = 30.0
VICTORIA_OTLP_PATH = "/opentelemetry/v1/metrics"


def prometheus_binary() -> str:
    """Prometheus from ``PATH`` or ``.devenv``; ``MissingTool`` when ``make test`` did not run."""
    return debian_binary("prometheus", "prometheus")


def victoria_metrics_binary() -> str:
    """VictoriaMetrics from ``PATH`` or ``.devenv``; ``MissingTool`` when not fetched."""
    return debian_binary("victoria-metrics", "victoria-metrics")


@dataclass(frozen=True)
class ScrapeJob:
    """A scrape job of our Prometheus config: name, targets, and optionally a path with
    parameters (``/federate`` with ``match[]``) and relabelling of the scraped series."""

    name: str
    targets: Sequence[str]
    metrics_path: str = "/metrics"
    params: dict[str, list[str]] | None = None
    metric_relabel_configs: list[dict[str, Any]] | None = None

    def config(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "job_name": self.name,
            "metrics_path": self.metrics_path,
            "static_configs": [{"targets": list(self.targets)}],
        }
        if self.params:
            found["params"] = self.params
        if self.metric_relabel_configs:
            found["metric_relabel_configs"] = self.metric_relabel_configs
        return found


@dataclass(frozen=True)
class MetricStore:
    """A running Prometheus or VictoriaMetrics and an HTTP session to its query API."""

    url: str
    address: str
    session: aiohttp.ClientSession

    @property
    def otlp_metrics_url(self) -> str:
        """VictoriaMetrics' OTLP/HTTP endpoint (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``)."""
        return self.url + VICTORIA_OTLP_PATH

    async def query(self, promql: str) -> dict[str, Any]:
        """The ``/api/v1/query`` answer (status error included) for an instant query now."""
        async with self.session.get(
            f"{self.url}/api/v1/query", params={"query": promql}
        ) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
            return answer

    async def label_values(self, label: str, selector: str | None = None) -> list[str]:
        """The values of ``label`` (on the series ``selector`` matches), as Grafana's
        ``label_values(selector, label)`` asks for them."""
        params = {} if selector is None else {"match[]": selector}
        async with self.session.get(
            f"{self.url}/api/v1/label/{label}/values", params=params
        ) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
        assert answer["status"] == "success", f"label_values({selector}, {label}): {answer}"
        values: list[str] = answer["data"]
        return values

    async def series(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every series of a query that must succeed."""
        answer = await self.query(promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]

    async def values(self, promql: str) -> list[float]:
        """The sample values of a query that must succeed."""
        return [value for _labels, value in await self.series(promql)]

    async def wait_until(
        self,
        promql: str,
        accept: Callable[[list[float]], bool],
        what: str,
        timeout_s: float = 30.0,
    ) -> list[float]:
        """Poll ``promql`` until ``accept(values)``; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        values: list[float] = []
        while time.monotonic() < deadline:
            values = await self.values(promql)
            if accept(values):
                return values
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}: {promql} = {values}")


def _log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-2000:]


@asynccontextmanager
async def _running(
    command: Sequence[str], address: str, ready_path: str, workdir: Path
) -> AsyncIterator[MetricStore]:
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                store = MetricStore(f"http://{address}", address, session)
                await _wait_ready(store, ready_path, process, log_path)
                yield store
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


@asynccontextmanager
async def running_prometheus(
    binary: str, jobs: Sequence[ScrapeJob], *, port: int | None = None
) -> AsyncIterator[MetricStore]:
    """Our own prometheus process: ``jobs`` scraped every second, on ``port`` (default: a free
    one; choose it to let a job scrape this Prometheus itself, e.g. ``/federate``)."""
    with tempfile.TemporaryDirectory(prefix="devenv-prometheus-") as folder:
        workdir = Path(folder)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [job.config() for job in jobs],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        address = f"127.0.0.1:{port or free_port()}"
        command = [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address={address}",
        ]
        async with _running(command, address, "/-/ready", workdir) as store:
            yield store


@asynccontextmanager
async def running_victoria_metrics(binary: str) -> AsyncIterator[MetricStore]:
    """Our own VictoriaMetrics: OTLP/HTTP in with Prometheus naming, samples queryable at once."""
    with tempfile.TemporaryDirectory(prefix="devenv-victoria-metrics-") as folder:
        workdir = Path(folder)
        address = f"127.0.0.1:{free_port()}"
        command = [
            binary,
            f"-storageDataPath={workdir / 'data'}",
            f"-httpListenAddr={address}",
            "-opentelemetry.usePrometheusNaming",
            "-search.latencyOffset=0s",
            "-search.disableCache",
        ]
        async with _running(command, address, "/health", workdir) as store:
            yield store


async def _wait_ready(
    store: MetricStore, path: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            break
        try:
            async with store.session.get(f"{store.url}{path}") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(
        f"{store.url} did not become ready (exit {process.returncode}):\n{_log_tail(log)}"
    )
