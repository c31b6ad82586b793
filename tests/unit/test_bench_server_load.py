"""The server load test's pure parts: flags, the delayed phase's bounds and label, percentiles."""

from __future__ import annotations

from typing import Any

import pytest

from bench.server_load import (
    PhaseResult,
    WriteLatency,
    delay_bounds,
    delay_label,
    describe,
    format_table,
    format_write_latency,
    parse_args,
    percentile,
)


def test_smoke_runs_postgres_only_and_dual_write_small_with_the_delayed_phase() -> None:
    args = parse_args(["--smoke"])
    assert args.modes == ["PostgresOnly", "DualWrite"]
    assert (args.requests, args.concurrency, args.phase_secs) == (100, 8, 3.0)
    assert args.s3_delay_ms == 60.0
    assert args.write_concurrencies == [8]


def test_the_write_latency_rows_are_at_8_and_64_in_flight_unless_told() -> None:
    assert parse_args([]).write_concurrencies == [8, 64]
    assert parse_args(["--write-concurrencies", "16"]).write_concurrencies == [16]
    assert parse_args(["--write-concurrencies"]).write_concurrencies == []


def test_delay_bounds_are_delay_plus_minus_jitter_in_seconds_never_negative() -> None:
    assert delay_bounds(parse_args([])) == pytest.approx((0.055, 0.065))
    assert delay_bounds(parse_args(["--s3-delay-ms", "60", "--s3-jitter-ms", "0"])) == (0.06, 0.06)
    assert delay_bounds(parse_args(["--s3-delay-ms", "3", "--s3-jitter-ms", "5"])) == (0.0, 0.008)


def test_delay_label_names_the_jitter_only_when_there_is_some() -> None:
    assert delay_label(parse_args([])) == "60±5 ms"
    assert delay_label(parse_args(["--s3-jitter-ms", "0"])) == "60 ms"


@pytest.mark.parametrize(
    "flags",
    [
        ["--s3-delay-ms", "-1"],
        ["--s3-jitter-ms", "-1"],
        ["--requests", "0"],
        ["--concurrency", "0"],
        ["--phase-secs", "0"],
        ["--write-concurrencies", "8", "0"],
    ],
)
def test_unusable_flags_end_in_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(flags)
    assert exited.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_percentile_is_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) == 0.0


def test_describe_gives_status_and_body_start_in_one_line() -> None:
    assert describe(503, b'{"code":"storage_error"}') == '503 {"code":"storage_error"}'
    assert describe(200, b"") == "200 with a value other than the one written"
    assert len(describe(500, b"x" * 1000)) == len("500 ") + 200


def test_table_shows_the_delay_and_a_dash_where_nothing_was_counted_in_s3() -> None:
    common: dict[str, Any] = {
        "errors": 0,
        "seconds": 1.0,
        "requests_per_s": 10.0,
        "p50_ms": 1.5,
        "p99_ms": 9.0,
    }
    table = format_table(
        [
            PhaseResult(mode="PostgresOnly", operation="PUT", requests=10, **common),
            PhaseResult(
                mode="DualWrite",
                operation="PUT",
                requests=10,
                s3_delay="60±5 ms",
                in_s3_at_end=4,
                in_s3_after_stop=10,
                **common,
            ),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == [
        "mode", "S3", "delay", "op", "requests", "errors", "req/s", "p50", "ms", "p99", "ms",
        "in", "S3", "at", "end", "after", "stop",
    ]  # fmt: skip
    postgres_only = ["PostgresOnly", "none", "PUT", "10", "0", "10.0", "1.5", "9.0", "-", "-"]
    delayed = ["DualWrite", "60±5", "ms", "PUT", "10", "0", "10.0", "1.5", "9.0", "4", "10"]
    assert lines[2].split() == postgres_only
    assert lines[3].split() == delayed


def test_write_latency_rows_give_both_modes_and_dual_writes_ratios() -> None:
    def put(mode: str, p50: float, p99: float) -> PhaseResult:
        return PhaseResult(
            mode=mode,
            operation="PUT",
            requests=100,
            errors=0,
            seconds=1.0,
            requests_per_s=100.0,
            p50_ms=p50,
            p99_ms=p99,
        )

    row = WriteLatency(8, put("PostgresOnly", 2.0, 8.0), put("DualWrite", 2.5, 10.0), True)
    assert (row.p50_ratio, row.p99_ratio) == (1.25, 1.25)
    assert row.as_json()["dual_write"]["p50_ms"] == 2.5
    assert row.as_json()["postgres_fsync"] is True
    lines = format_write_latency([row]).splitlines()
    assert lines[0].split()[:5] == ["Postgres", "fsync", "in", "flight", "PostgresOnly"]
    assert lines[2].split() == [
        "on", "8", "100.0", "2.0", "8.0", "100.0", "2.5", "10.0", "1.25", "1.25",
    ]  # fmt: skip
