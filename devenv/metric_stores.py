"""Metric stores of our own for tests: Prometheus (scrapes, federates) and VictoriaMetrics
(receives OTLP/HTTP), both answering the Prometheus query API.

The binary is the one on ``PATH``, else Debian 13's package (``prometheus`` 2.53,
``victoria-metrics`` 1.112) fetched once with ``apt-get download`` through a private apt
configuration under ``<repo>/.devenv/<package>`` (the system's sources are untouched) and unpacked
with ``dpkg-deb``; ``*_binary()`` answers (None, why) when neither works. OTLP/HTTP goes to
VictoriaMetrics because Debian builds Prometheus without its OTLP receiver
(``-opentelemetry.usePrometheusNaming`` gives Prometheus' own names: ``…_total``,
``service_name``). ``running_prometheus`` / ``running_victoria_metrics`` start a server on a free
loopback port with its storage in a temporary folder, wait until it answers, and terminate it
(kill after 10 s) on the way out.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from devenv.process import REPO_ROOT, free_port

DEVENV_DIR = REPO_ROOT / ".devenv"
DEBIAN_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian trixie main\n"
)
APT_TIMEOUT_S = 300
READY_TIMEOUT_S = 30.0
VICTORIA_OTLP_PATH = "/opentelemetry/v1/metrics"


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
    )


def _fetch_debian_package(package: str, target: Path) -> str | None:
    """Download and unpack Debian 13's ``package`` into ``target``; None on success."""
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt_get is None or dpkg_deb is None:
        return f"no apt-get/dpkg-deb to fetch Debian's {package} package"
    apt_dir = target / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(DEBIAN_SOURCE, encoding="utf-8")
    options = [
        f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
        "-oDir::State::status=/dev/null",
        "-oAPT::Sandbox::User=root",
    ]
    for step in ([apt_get, *options, "update"], [apt_get, *options, "download", package]):
        result = _run(step, cwd=apt_dir / "debs")
        if result.returncode != 0:
            return f"apt-get {step[-1]} failed: {result.stderr.strip()[-400:]}"
    packages = sorted((apt_dir / "debs").glob(f"{package}_*.deb"))
    if not packages:
        return f"apt-get download {package} left no package"
    unpacked = _run([dpkg_deb, "-x", str(packages[-1]), str(target)])
    if unpacked.returncode != 0:
        return f"dpkg-deb -x failed: {unpacked.stderr.strip()[-400:]}"
    return None


def debian_binary(package: str, binary: str) -> tuple[str | None, str]:
    """(path, "") of ``binary`` from ``PATH`` or Debian 13's ``package``, or (None, why not)."""
    on_path = shutil.which(binary)
    if on_path is not None:
        return on_path, ""
    target = DEVENV_DIR / package
    local = target / "usr" / "bin" / binary
    if not local.exists():
        failure = _fetch_debian_package(package, target)
        if failure is not None:
            return None, failure
    if not local.exists():
        return None, f"Debian's {package} package has no usr/bin/{binary}"
    return str(local), ""


def prometheus_binary() -> tuple[str | None, str]:
    return debian_binary("prometheus", "prometheus")


def victoria_metrics_binary() -> tuple[str | None, str]:
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
