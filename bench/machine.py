"""Where the numbers came from: the machine, the servers' versions and the S3 server's process.

``python -m bench`` and the sections that run alone (``python -m bench.latency``) record these
beside their results. Nothing here starts or stops anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import asyncpg

from bench.cpu import find_process
from devenv.postgres import PostgresEndpoint
from devenv.s3 import S3Endpoint
from devenv.tools import S3RVER_VERSION


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "none"
    result = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def machine_info(s3: S3Endpoint, pg_version: str) -> dict[str, Any]:
    """Where the numbers came from."""
    os_release = Path("/etc/debian_version")
    s3_server = {"s3rver": f"s3rver {S3RVER_VERSION} (Node {_node_version()})"}.get(
        s3.kind, f"{s3.kind} {_version('moto') if s3.kind == 'moto' else ''}".strip()
    )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}"
        + (f", Debian {os_release.read_text().strip()}" if os_release.exists() else ""),
        "python": platform.python_version(),
        "postgres": pg_version,
        "s3_server": s3_server,
        "libraries": {
            name: _version(name) for name in ("aiobotocore", "botocore", "aiohttp", "asyncpg")
        },
    }


async def pg_version(pg: PostgresEndpoint) -> str:
    """The server's version, as the results show it."""
    connection = await asyncpg.connect(pg.dsn(dbname="postgres", superuser=True))
    try:
        version = str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()
    return f"PostgreSQL {version}"


def s3_server_pid(s3: S3Endpoint) -> int | None:
    """The local S3 server's process, whose CPU the scenarios meter; None when not visible."""
    port = s3.url.rsplit(":", 1)[-1]
    if s3.kind == "s3rver":
        return find_process("s3rver.js", f"--port {port} ")
    if s3.kind == "moto":
        return find_process(f"_serve_moto({port})")
    if s3.kind == "seaweedfs":
        return find_process(" mini ", f"-s3.port={port} ")
    return None  # in a container: not visible from here
