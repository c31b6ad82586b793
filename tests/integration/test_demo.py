"""``make demo-up`` (``python -m devenv.demo --up``) for real: its own Postgres and S3 server stay
up, the ``export`` lines it prints are all a backfill needs to reach them, and Ctrl-C stops them."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys

import pytest

from tests.cli_harness import backfill_args, run_cli
from tests.support import REPO_ROOT, S3_ENDPOINT

pytestmark = pytest.mark.timeout(240)

ROWS_PER_CACHE = 60
PG_PORT = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__PORT"


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


def test_demo_up_leaves_its_servers_up_prints_their_environment_and_stops_them_on_ctrl_c() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "devenv.demo", "--up", "--rows-per-cache", str(ROWS_PER_CACHE)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        printed: list[str] = []
        for line in demo.stdout:
            printed.append(line)
            if line.startswith("#     --backfill-cutoff-timestamp"):
                break
        output = "".join(printed)
        env = dict(
            shlex.split(line.removeprefix("export "))[0].split("=", 1)
            for line in printed
            if line.startswith("export ")
        )
        assert env.get("OTEL_METRICS_EXPORTER") == "none", output
        [cutoff] = shlex.split(printed[-1].split("--backfill-cutoff-timestamp", 1)[1])
        [cas_row] = [line.split() for line in printed if line.startswith("cas ")]
        to_copy = int(cas_row[-1])

        run = run_cli(backfill_args(cutoff=cutoff, cache_types="cas"), env)

        assert run.status == 0, run.stderr
        assert run.summary()["uploaded"] == to_copy, output
        assert demo.poll() is None, "the servers went away"
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest
    assert "stopping the local servers" in rest
    assert refuses(int(env[PG_PORT])), "Postgres still runs after Ctrl-C"
    assert refuses(int(env[S3_ENDPOINT].rsplit(":", 1)[1])), "S3 still runs after Ctrl-C"
