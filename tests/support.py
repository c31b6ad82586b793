"""Helpers shared by the integration tests: seeding rows, reading buckets, running the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import asyncpg
import pytest
import structlog

from layer_cache.cache_types import CACHE_SPECS, CacheType
from layer_cache.keys import bucket_name, object_key
from migrations_mode.progress_store import S3_PROGRESS_PREFIX
from si_layer_cache.cli import main as cli_main

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SeedRow:
    """A layer-cache row to insert, with an explicit created_at."""

    key: str
    value: bytes
    created_at: datetime


def random_key(rng: random.Random, length: int = 64) -> str:
    """A lowercase hex key like the content hashes in production."""
    return "".join(rng.choice("0123456789abcdef") for _ in range(length))


async def insert_rows(pool: asyncpg.Pool, cache_type: CacheType, rows: Sequence[SeedRow]) -> None:
    """Insert rows with their created_at, as a restore or bulk copy would."""
    table = CACHE_SPECS[cache_type].table
    await pool.executemany(
        f"INSERT INTO {table} (key, sort_key, created_at, value) VALUES ($1, $1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        [(row.key, row.created_at, row.value) for row in rows],
    )


async def rows_below(
    pool: asyncpg.Pool, cache_type: CacheType, cutoff: datetime
) -> dict[str, bytes]:
    """What the backfill must copy: key → value for rows with created_at < cutoff."""
    table = CACHE_SPECS[cache_type].table
    records = await pool.fetch(f"SELECT key, value FROM {table} WHERE created_at < $1", cutoff)
    return {record["key"]: bytes(record["value"]) for record in records}


def cache_bucket(cache_type: CacheType, bucket_prefix: str) -> str:
    """The bucket a cache type's objects go to."""
    return bucket_name(CACHE_SPECS[cache_type].table, bucket_prefix)


async def bucket_objects(client: S3Client, bucket: str) -> dict[str, bytes]:
    """Every cache object in a bucket (not the backfill's own progress records): key → bytes."""
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket):
        keys.extend(
            item["Key"]
            for item in page.get("Contents", [])
            if not item["Key"].startswith(S3_PROGRESS_PREFIX + "/")
        )

    async def read(key: str) -> bytes:
        response = await client.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            return await stream.read()

    bodies = await asyncio.gather(*(read(key) for key in keys))
    return dict(zip(keys, bodies, strict=True))


def expected_objects(rows: Mapping[str, bytes], key_prefix: str | None = None) -> dict[str, bytes]:
    """The objects a complete backfill of ``rows`` leaves: object key → bytes."""
    return {object_key(key, key_prefix=key_prefix): value for key, value in rows.items()}


def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m services`` with exactly ``env`` (plus PATH) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "services", *args],
        env=cli_environment(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(args: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``python -m services`` in the background, output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "services", *args],
        env=cli_environment(env),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli_in_process(
    args: Sequence[str],
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> subprocess.CompletedProcess[str]:
    """Call the CLI's ``main(args)`` in this process with exactly the environment ``run_cli``
    would give the subprocess, and capture what it prints: for refusals that happen before any
    connection, without the cost of a process. The test must not run in an event loop (``main``
    calls ``asyncio.run``); structlog and the root logger, which ``main`` configures, are put
    back afterwards."""
    wanted = cli_environment(env)
    for name in os.environ.keys() - wanted.keys():
        monkeypatch.delenv(name)
    for name, value in wanted.items():
        monkeypatch.setenv(name, value)
    logging_config = structlog.get_config()
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        status = cli_main(args)
    except SystemExit as exit_:  # argparse: usage errors, --help, --version
        status = int(exit_.code or 0)
    finally:
        structlog.configure(**logging_config)
        root.handlers = root_handlers
        root.setLevel(root_level)
    output = capsys.readouterr()
    return subprocess.CompletedProcess(["services", *args], status, output.out, output.err)


WRITE_QUEUE_DIR_ENV = "SI_SDF__SERVER__WRITE_QUEUE_DIR"


def cli_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A clean environment for the CLI: no inherited SI_ settings, only the given ones (and a
    fresh S3 write queue directory unless ``env`` names one, so servers never share a queue)."""
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SI_", "OTEL_", "AWS_"))
    }
    if WRITE_QUEUE_DIR_ENV not in env:
        base[WRITE_QUEUE_DIR_ENV] = tempfile.mkdtemp(prefix="si-write-queue-")
    return base | dict(env)


class StderrReader:
    """Reads a running process's JSON log lines (stderr) on a thread, so a test can wait for an
    event while the process runs."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, matches: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first event (from here on) that ``matches``; fails on timeout or end of output."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                pytest.fail("the process ended before the awaited event:\n" + "".join(self.lines))
            if line.strip():
                event = json.loads(line)
                if isinstance(event, dict) and matches(event):
                    return event
        pytest.fail(f"no awaited event within {timeout} s:\n" + "".join(self.lines))

    def finish(self, timeout: float) -> str:
        """Everything read, once the stream has ended."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr did not close"
        return "".join(self.lines)

    def events(self, timeout: float) -> list[dict[str, Any]]:
        """Every JSON event read, once the stream has ended."""
        return [json.loads(line) for line in self.finish(timeout).splitlines() if line.strip()]
