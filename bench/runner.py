"""Each benchmark scenario in a process of its own: ``Runner``, the ``ScenarioRunner`` that
``python -m bench`` and the sections that run alone (``python -m bench.latency``) hand the
sections.

A scenario runs as ``python -m bench.scenarios`` against its own bucket set (``new_prefix``),
with this environment minus the service's own settings, so only its ``--target`` configures it;
its stderr goes to ``<label>.log`` under ``logs_dir()`` (a temporary directory, removed on the
way out) and its JSON summary is read back from stdout. A scenario that fails or outlasts its
timeout ends the benchmark (``SystemExit`` with the tail of its log).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import CUTOFF, REPO_ROOT, TABLE, Target
from bench.data import SeededDatabase
from devenv.postgres import PostgresEndpoint
from devenv.s3 import S3Endpoint, create_buckets
from layer_cache.keys import bucket_name


class Runner:
    """Runs scenarios in subprocesses, each against a fresh bucket set unless one is named."""

    def __init__(
        self,
        args: argparse.Namespace,
        pg: PostgresEndpoint,
        s3: S3Endpoint,
        *,
        statements: bool,
        logs_dir: Path,
    ) -> None:
        self.args = args
        self.pg = pg
        self.s3 = s3
        self.statements = statements
        self.logs_dir = logs_dir
        self.run_id = "b" + secrets.token_hex(3)
        self._counter = 0
        self.s3_pid: int | None = None
        self.pg_pid: int | None = None
        self.fingerprints: dict[str, str] = {}  # scenario label -> product code it ran

    def new_prefix(self, label: str) -> str:
        """A bucket prefix no other scenario uses, with its ``cas`` bucket created."""
        self._counter += 1
        prefix = f"{self.run_id}-{self._counter:02d}-{label.replace('_', '-')}"[:40]
        create_buckets(self.s3, [bucket_name(TABLE, prefix)])
        return prefix

    def target(self, database: SeededDatabase, prefix: str) -> Target:
        """The ``--target`` of a scenario."""
        return Target(
            pg=self.pg,
            s3=self.s3,
            dbname=database.dbname,
            bucket_prefix=prefix,
            cutoff=CUTOFF,
            statements=self.statements,
            s3_pid=self.s3_pid,
            pg_pid=self.pg_pid,
        )

    def run(
        self,
        name: str,
        target: Target,
        *,
        concurrency: int,
        rows: int,
        extra_args: tuple[str, ...] = (),
        label: str | None = None,
    ) -> dict[str, Any]:
        """Run one scenario process; its JSON summary."""
        label = label or f"{name}-c{concurrency}-{target.dbname}"
        command = [
            sys.executable, "-m", "bench.scenarios", name,
            "--target", target.to_json(),
            "--json",
            "--concurrency", str(concurrency),
            "--key-batch-size", str(self.args.key_batch_size),
            "--shards", str(self.args.shards),
            *extra_args,
        ]  # fmt: skip
        log_path = self.logs_dir / f"{label}.log"
        timeout_s = 120 + rows / 20
        print(f"  {label:<40} ...", end="", flush=True)
        with log_path.open("w") as log:
            try:
                completed = subprocess.run(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    cwd=REPO_ROOT,
                    env=_scenario_environment(),
                    timeout=timeout_s,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                print(" timed out", flush=True)
                raise SystemExit(
                    f"{label} took over {timeout_s:.0f} s\n{_tail(log_path)}"
                ) from None
        if completed.returncode != 0:
            print(" failed", flush=True)
            raise SystemExit(
                f"{label} exited with {completed.returncode}\n{completed.stdout}\n{_tail(log_path)}"
            )
        lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
        summary: dict[str, Any] = json.loads(lines[-1])
        self.fingerprints[label] = summary.get("code_fingerprint", "?")
        print(
            f" {summary['rows']:>7,} rows {summary['seconds']:>7.2f} s"
            f" {summary['rows_per_s']:>8,.0f} rows/s",
            flush=True,
        )
        return summary


def _scenario_environment() -> dict[str, str]:
    """This environment minus the service's own settings, so only the target configures it."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SI_", "OTEL_", "PG"))
    }


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def logs_dir() -> Iterator[Path]:
    """A temporary directory for the scenarios' logs, removed on the way out."""
    directory = Path(tempfile.mkdtemp(prefix="si-bench-logs-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
