"""``python -m bench --smoke``: every scenario runs end to end and lands in the table and JSON;
a tiny run of the latency and scale sections does too, and one of the rate-limit section.

The benchmark starts its own PostgreSQL and SeaweedFS, so these tests need no fixture; each
takes under a minute. Numbers are not checked: the benchmark measures targets, it does not
assert them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import aioboto3
import pytest
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError

from bench.common import S3RequestCounter
from devenv.faults import FaultPlan, FaultProxy
from devenv.s3 import S3Server
from tests.support import REPO_ROOT

SCENARIOS = ("bare_put", "upstream", "upstream_rerun", "backfill", "backfill_rerun", "shards")
HEADLINE = (
    "rows_per_s",
    "mib_per_s",
    "s3_requests_per_row",
    "pg_tuples_per_row",
    "pg_round_trips_per_row",
    "cpu_ms_per_object",
    "peak_rss_mib",
)


def run_bench(tmp_path: Path, *flags: str, timeout_s: float, module: str = "bench") -> str:
    """``python -m <module>`` (the benchmark, or one of the server's) with these flags, writing
    into ``tmp_path``; its stdout. Fails the test unless it exits 0."""
    environment = {name: value for name, value in os.environ.items() if not name.startswith("SI_")}
    completed = subprocess.run(
        [sys.executable, "-m", module, *flags, "--results-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = completed.stdout
    assert completed.returncode == 0, f"{output[-4000:]}\n{completed.stderr[-4000:]}"
    return output


def test_smoke_run_reports_every_scenario(tmp_path: Path) -> None:
    output = run_bench(tmp_path, "--smoke", timeout_s=120)

    table_lines = [line for line in output.splitlines() if line.split(" ", 1)[0] in SCENARIOS]
    assert {line.split(" ", 1)[0] for line in table_lines} == set(SCENARIOS)
    assert "S3 req/row" in output
    assert "issue targets" in output

    latest = json.loads((tmp_path / "latest.json").read_text())
    assert set(latest["scenarios"]) == set(SCENARIOS)
    for name, summary in latest["scenarios"].items():
        assert summary["scenario"] == name
        assert summary["rows"] > 0, name
        assert summary["seconds"] > 0, name
        for field in HEADLINE:
            assert summary[field] is not None, (name, field)
    assert latest["machine"]["nproc"] >= 1
    assert latest["targets"]
    stamped = [path for path in tmp_path.glob("*.json") if path.name != "latest.json"]
    assert len(stamped) == 1
    assert json.loads(stamped[0].read_text()) == latest


def test_latency_and_scale_sections_run_end_to_end_and_land_in_the_report(tmp_path: Path) -> None:
    output = run_bench(
        tmp_path,
        *("--rows", "300", "--key-batch-size", "100", "--concurrency", "8", "--no-sweep"),
        *("--latency-rows", "300", "--latency-sweep", "4,8", "--latency-ms", "5"),
        *("--latency-repeat", "1"),
        *("--throttle-rate", "40", "--scale-rows", "2000", "--scale-shards", "1,2"),
        "--no-rate-limit",
        timeout_s=240,
    )
    assert "rows/s of the backfill with S3 behind a delay" in output
    assert "scale: one cache, 256-byte values, C=8" in output
    assert "100M rows client-CPU bound" in output

    latest = json.loads((tmp_path / "latest.json").read_text())
    [sweep] = latest["latency"]["sweeps"]
    assert sweep["delay"] == "relay"
    assert set(sweep["clients"]) == {
        f"{name} (C={sweep['best_fixed']})" for name in ("bare_put", "upstream", "backfill")
    } | {"backfill (tuned)"}
    assert "each way to copy at each latency" in output
    assert sweep["proxy_counts"]["connections"] >= 1  # the relay's, not the HTTP proxy's
    assert set(sweep["fixed_rows_per_s"]) == {"4", "8"}
    assert sweep["tuned_rows_per_s"] > 0
    # one more round of both levels (the two fastest) and tuned: medians of 2 and 3 runs
    assert sorted(map(len, sweep["fixed_runs_rows_per_s"].values())) == [2, 2]
    assert len(sweep["tuned_runs_rows_per_s"]) == 3
    assert "the sweep alone (each level once" in output
    assert {"fixed", "tuned"} <= set(latest["latency"]["throttle"])
    scale = latest["scaling"]
    assert scale["rows"] == {"smaller": 448, "larger": 1_799}  # below the cutoff of 500 and 2,000
    assert set(scale["runs"]) == {"smaller", "larger", "shards-2"}
    assert scale["runs"]["shards-2"]["rows"] == 448  # two shards, every row once
    assert set(scale["extrapolation"]["hours_at_measured_rate"]) == {"1", "2"}
    names = {target["target"] for target in latest["targets"]}
    tuned = "self-tuned >= 0.9 x the best fixed level, medians of runs (S3 behind a delay)"
    assert tuned in names
    assert "PG tuples read <= 3 per row and flat (scale runs)" in names


def test_rate_limit_section_runs_end_to_end_and_lands_in_the_report(tmp_path: Path) -> None:
    output = run_bench(
        tmp_path,
        *("--rows", "300", "--key-batch-size", "100", "--concurrency", "8", "--no-sweep"),
        *("--no-latency", "--no-scaling", "--rate-rows", "3000", "--rate-large-rows", "600"),
        *("--rate-warmup-s", "0.5", "--rate-window-s", "2", "--rate-unlimited-window-s", "1"),
        *("--rate-rounds", "1"),
        timeout_s=240,
    )
    assert "rate limits (tuned concurrency up to 64" in output
    assert "uploads/s limit" in output
    assert "bytes/s limit" in output

    section = json.loads((tmp_path / "latest.json").read_text())["rate_limit"]
    assert list(section["runs"]) == [
        "unlimited-1",
        "above-10x-1",
        "unlimited-2",
        "uploads-limited",
        "large-unlimited",
        "bytes-limited",
    ]
    for label, run in section["runs"].items():
        assert run["window"]["uploads"] > 0, label
    limited = section["runs"]["uploads-limited"]["limits"]
    assert limited[0] == "--max-uploads-per-second"
    assert float(limited[1]) == section["uploads_per_s"]["limit"]
    assert section["runs"]["bytes-limited"]["limits"][0] == "--max-bytes-per-second"
    assert len(section["kept"]["unlimited_uploads_per_s"]) == 2
    names = {
        target["target"] for target in json.loads((tmp_path / "latest.json").read_text())["targets"]
    }
    assert "--backfill-max-uploads-per-second held within 5% over 60 s" in names


def test_server_load_smoke_reports_write_latency_with_s3_healthy_and_delayed(
    tmp_path: Path,
) -> None:
    """``python -m bench.server_load --smoke``: DualWrite writes with S3 direct and behind the
    60 ms delay proxy, PostgresOnly for reference, and the write-latency rows; every request
    answered, two tables, one JSON."""
    output = run_bench(tmp_path, "--smoke", module="bench.server_load", timeout_s=120)
    assert "p50 ms" in output
    assert "p99 ms" in output
    assert "in S3 at end" in output

    (written,) = tmp_path.glob("server-load-*.json")
    report = json.loads(written.read_text())
    assert report["settings"]["smoke"] is True
    assert report["settings"]["s3_delay_ms"] == 60
    rows = {(r["mode"], r["s3_delay"], r["operation"]): r for r in report["results"]}
    assert set(rows) == {
        ("PostgresOnly", "none", "PUT"),
        ("PostgresOnly", "none", "GET"),
        ("DualWrite", "none", "PUT"),
        ("DualWrite", "none", "GET"),
        ("DualWrite", "60±5 ms", "PUT"),
    }
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == 0, (key, row["first_error"])
        assert 0 < row["p50_ms"] <= row["p99_ms"], key
        assert f"{row['requests']:>8}" in output
    assert rows[("PostgresOnly", "none", "PUT")]["in_s3_at_end"] is None
    assert rows[("PostgresOnly", "none", "PUT")]["in_s3_after_stop"] is None
    for key in (("DualWrite", "none", "PUT"), ("DualWrite", "60±5 ms", "PUT")):
        row = rows[key]
        assert 0 <= row["in_s3_at_end"] <= row["in_s3_after_stop"] <= row["requests"], key
        # 100 writes drain within the server's grace period, even at 60 ms per S3 request.
        assert row["in_s3_after_stop"] == row["requests"], key
    # The write-latency rows: DualWrite's PUTs against PostgresOnly's at 8 in flight.
    [latency] = report["write_latency"]
    assert latency["concurrency"] == 8
    assert latency["postgres_fsync"] is False  # --smoke: the throwaway Postgres only
    for mode in ("postgres_only", "dual_write"):
        assert latency[mode]["requests"] > 0
        assert latency[mode]["errors"] == 0, latency[mode]["first_error"]
    assert latency["p50_ratio"] == round(
        latency["dual_write"]["p50_ms"] / latency["postgres_only"]["p50_ms"], 2
    )
    assert "write latency, PUT, S3 healthy" in output
    # The delayed server's S3 traffic went through the proxy and none of it failed there.
    counts = report["delay_proxy_counts"]
    assert counts["forwarded"] > 0
    assert set(counts) <= {"forwarded"} | {f"{m}:forwarded" for m in ("GET", "HEAD", "PUT")}


async def test_request_counter_counts_each_http_attempt(s3_server: S3Server) -> None:
    """The meter behind "S3 requests/row": one count per attempt, botocore retries included."""
    endpoint = s3_server.endpoint
    counter = S3RequestCounter()
    config = AioConfig(
        s3={"addressing_style": "path"},
        retries={"mode": "standard", "total_max_attempts": 3},
    )
    async with (
        FaultProxy(endpoint.url, FaultPlan(slowdown_share=1.0)) as proxy,
        aioboto3.Session().client(
            "s3",
            endpoint_url=proxy.url,
            region_name=endpoint.region,
            aws_access_key_id=endpoint.access_key,
            aws_secret_access_key=endpoint.secret_key,
            config=config,
        ) as client,
    ):
        counter.attach(client)
        with pytest.raises(ClientError):
            await client.put_object(Bucket="never-forwarded", Key="k", Body=b"x")
    assert counter.by_operation == {"PutObject": 3}
    assert proxy.counts["slowdown"] == 3


def test_server_cache_smoke_reports_hot_reads_hit_ratios_and_the_memory_soak(
    tmp_path: Path,
) -> None:
    """``python -m bench.server_cache --smoke``: hot-set reads with the tier off, from memory
    and from disk (the server's counts say which answered), Zipf hit ratios growing with the
    tier, and the soak's RSS samples; every request answered."""
    output = run_bench(tmp_path, "--smoke", module="bench.server_cache", timeout_s=240)
    assert "hit ratio" in output
    (written,) = tmp_path.glob("server-cache-*.json")
    report = json.loads(written.read_text())
    rows = {(row["mode"], row["tier"]): row for row in report["hot_set"]}
    off, memory, disk = ("PostgresOnly", "off"), ("S3Only", "memory"), ("PostgresOnly", "disk")
    assert set(rows) == {off, memory, disk}
    for key, row in rows.items():
        assert row["requests"] > 0, key
        assert row["errors"] == 0, (key, row["first_error"])
    assert rows[off]["memory_hits"] == rows[off]["disk_hits"] == 0
    assert rows[memory]["memory_hits"] == rows[memory]["requests"]
    assert rows[disk]["disk_hits"] > 0
    ratios = [row["hit_ratio"] for row in report["zipf"]]
    assert len(ratios) == 3
    assert 0 < ratios[0] < ratios[2] <= 1
    soak = report["soak"]
    assert soak["errors"] == 0
    assert soak["samples"]


def test_server_auth_smoke_reports_the_checks_cost_and_each_variant(tmp_path: Path) -> None:
    """``python -m bench.server_auth --smoke``: the per-request check's cost per token count,
    and the server open, with tokens and with tokens over HTTPS, every request answered."""
    run_bench(tmp_path, "--smoke", module="bench.server_auth", timeout_s=180)
    (written,) = tmp_path.glob("server-auth-*.json")
    report = json.loads(written.read_text())
    assert report["errors"] == 0, report["first_error"]
    assert [cost["tokens_per_role"] for cost in report["checks"]] == [1, 2, 10]
    assert all(cost["read_token_us"] > 0 for cost in report["checks"])
    rows = {(row["operation"], row["variant"]): row for row in report["end_to_end"]}
    assert set(rows) == {
        (operation, variant)
        for operation in ("PUT", "GET")
        for variant in ("open", "open, token sent", "tokens", "tokens over HTTPS")
    }
    assert all(row["requests"] == 100 for row in rows.values())
    assert rows[("GET", "open")]["p50_ratio"] == 1.0
