"""Turning scenario results into the printed tables and the target checks (measured, not
asserted: a target that does not hold is reported as ``NO``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from migrations_mode.tables import render_table

Summary = Mapping[str, Any]

# Which scenario each one is compared with, for "ratio to baseline".
BASELINE_OF = {
    "bare_put": "upstream",
    "upstream": "upstream",
    "upstream_rerun": "upstream_rerun",
    "backfill": "upstream",
    "backfill_rerun": "upstream_rerun",
    "shards": "upstream",
}
UPLOADING = ("bare_put", "upstream", "backfill", "shards")


def _number(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    return render_table(headers, rows)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


MAIN_HEADERS = (
    "scenario",
    "C",
    "rows",
    "seconds",
    "rows/s",
    "MiB/s",
    "S3 req/row",
    "PG tuples/row",
    "PG RT/row",
    "CPU ms/obj",
    "peak RSS MiB",
    "x bare",
    "x baseline",
)


def main_table(results: Mapping[str, Summary]) -> str:
    """The headline table: one line per scenario."""
    bare = results.get("bare_put")
    rows = []
    for name, result in results.items():
        baseline = results.get(BASELINE_OF.get(name, ""))
        label = name if name != "shards" else f"shards (K={result.get('shards', '?')})"
        rows.append(
            [
                label,
                str(result["concurrency"]),
                f"{result['rows']:,}",
                _number(result["seconds"], 2),
                _number(result["rows_per_s"], 0),
                _number(result["mib_per_s"], 1),
                _number(result["s3_requests_per_row"], 4),
                _number(result["pg_tuples_per_row"], 2),
                _number(result["pg_round_trips_per_row"], 4),
                _number(result["cpu_ms_per_object"], 3),
                _number(result["peak_rss_mib"], 0),
                _number(
                    _ratio(result["rows_per_s"], bare["rows_per_s"] if bare else None)
                    if name in UPLOADING
                    else None,
                    2,
                ),
                _number(
                    _ratio(result["rows_per_s"], baseline["rows_per_s"] if baseline else None), 2
                ),
            ]
        )
    return format_table(MAIN_HEADERS, rows)


def cpu_table(results: Mapping[str, Summary]) -> str:
    """Where the CPU went during each timed section (client, S3 server, Postgres, others)."""
    headers = [
        "scenario",
        "wall s",
        "client CPU s",
        "S3 server CPU s",
        "PG CPU s",
        "other procs CPU s",
        "machine busy %",
        "S3 srv ms/req",
        "PG ms/row",
    ]
    rows = []
    for name, result in results.items():
        spent = result.get("cpu_seconds")
        if spent is None:
            continue
        rows.append(
            [
                name,
                _number(result["seconds"], 2),
                _number(spent["client"], 2),
                _number(spent["s3_server"], 2),
                _number(spent["postgres"], 2),
                _number(spent["other"], 2),
                _number(result["machine_busy_pct"], 0),
                _number(result["s3_server_cpu_ms_per_request"], 3),
                _number(result["pg_server_cpu_ms_per_row"], 3),
            ]
        )
    return format_table(headers, rows)


def sweep_table(sweep: Mapping[int, Mapping[str, Summary]]) -> str:
    """Throughput and CPU per object at each concurrency."""
    headers = [
        "C (in flight)",
        "bare rows/s",
        "backfill rows/s",
        "x bare",
        "upstream rows/s",
        "x baseline",
        "bare CPU ms/obj",
        "backfill CPU ms/obj",
        "CPU x bare",
    ]
    rows = []
    for concurrency, results in sorted(sweep.items()):
        bare, ours, baseline = (
            results.get("bare_put"),
            results.get("backfill"),
            results.get("upstream"),
        )

        def get(result: Summary | None, name: str) -> Any:
            return None if result is None else result[name]

        rows.append(
            [
                str(concurrency),
                _number(get(bare, "rows_per_s"), 0),
                _number(get(ours, "rows_per_s"), 0),
                _number(_ratio(get(ours, "rows_per_s"), get(bare, "rows_per_s")), 2),
                _number(get(baseline, "rows_per_s"), 0),
                _number(_ratio(get(ours, "rows_per_s"), get(baseline, "rows_per_s")), 2),
                _number(get(bare, "cpu_ms_per_object"), 3),
                _number(get(ours, "cpu_ms_per_object"), 3),
                _number(_ratio(get(ours, "cpu_ms_per_object"), get(bare, "cpu_ms_per_object")), 2),
            ]
        )
    return format_table(headers, rows)


@dataclass(frozen=True)
class TargetCheck:
    """One issue target: what was measured and whether it holds."""

    name: str
    measured: str
    holds: bool | None  # None: could not be measured in this run

    def as_json(self) -> dict[str, Any]:
        """For the results file."""
        return {"target": self.name, "measured": self.measured, "holds": self.holds}


def _check(name: str, value: float | None, ok: bool, text: str) -> TargetCheck:
    if value is None:
        return TargetCheck(name, "not measured", None)
    return TargetCheck(name, text, ok)


def check_targets(
    results: Mapping[str, Summary],
    *,
    scaling: Mapping[str, Any] | None,
) -> list[TargetCheck]:
    """Evaluate the issue's targets on this run's numbers."""
    bare, ours, rerun = (
        results.get("bare_put"),
        results.get("backfill"),
        results.get("backfill_rerun"),
    )
    base, base_rerun = results.get("upstream"), results.get("upstream_rerun")
    checks: list[TargetCheck] = []

    def value(result: Summary | None, name: str) -> Any:
        return None if result is None else result.get(name)

    tuples = None
    if ours and ours.get("pg"):
        tuples = ours["pg"]["seq_tup_read"] + ours["pg"]["idx_tup_fetch"]
        tuples /= max(ours["rows_below_cutoff"], 1)
    checks.append(
        _check(
            "PG tuples read <= 3 x rows below cutoff (backfill)",
            tuples,
            tuples is not None and tuples <= 3,
            f"{tuples:.2f} x" if tuples is not None else "",
        )
    )
    for label, result in (("backfill", ours), ("backfill_rerun", rerun)):
        trips = value(result, "pg_round_trips_per_row")
        checks.append(
            _check(
                f"PG round trips <= 0.01/row ({label})",
                trips,
                trips is not None and trips <= 0.01,
                f"{trips:.4f}/row" if trips is not None else "",
            )
        )
    requests = value(ours, "s3_requests_per_row")
    checks.append(
        _check(
            "S3 requests <= 1.05/row, empty bucket (backfill)",
            requests,
            requests is not None and requests <= 1.05,
            f"{requests:.4f}/row" if requests is not None else "",
        )
    )
    requests = value(rerun, "s3_requests_per_row")
    checks.append(
        _check(
            "S3 requests <= 0.02/row, re-run over full bucket (backfill_rerun)",
            requests,
            requests is not None and requests <= 0.02,
            f"{requests:.4f}/row" if requests is not None else "",
        )
    )
    ratio = _ratio(value(ours, "rows_per_s"), value(bare, "rows_per_s"))
    checks.append(
        _check(
            "throughput >= 0.9 x bare PUT loop, same C",
            ratio,
            ratio is not None and ratio >= 0.9,
            f"{ratio:.2f} x" if ratio is not None else "",
        )
    )
    ratio = _ratio(value(ours, "rows_per_s"), value(base, "rows_per_s"))
    checks.append(
        _check(
            "throughput >= 1.8 x upstream baseline, same C",
            ratio,
            ratio is not None and ratio >= 1.8,
            f"{ratio:.2f} x" if ratio is not None else "",
        )
    )
    time_ratio = _ratio(value(base_rerun, "seconds"), value(rerun, "seconds"))
    rate_ratio = _ratio(value(rerun, "rows_per_s"), value(base_rerun, "rows_per_s"))
    checks.append(
        _check(
            "re-run over full bucket >= 4 x faster than baseline re-run (wall time)",
            time_ratio,
            time_ratio is not None and time_ratio >= 4,
            f"{time_ratio:.1f} x time ({rate_ratio or 0:.1f} x rows/s)"
            if time_ratio is not None
            else "",
        )
    )
    ratio = _ratio(value(ours, "cpu_ms_per_object"), value(bare, "cpu_ms_per_object"))
    checks.append(
        _check(
            "client CPU per object <= 1.3 x bare PUT loop",
            ratio,
            ratio is not None and ratio <= 1.3,
            f"{ratio:.2f} x ({value(ours, 'cpu_ms_per_object'):.3f} vs "
            f"{value(bare, 'cpu_ms_per_object'):.3f} ms)"
            if ratio is not None
            else "",
        )
    )
    delta = None if scaling is None else scaling.get("rss_delta_mib")
    checks.append(
        _check(
            f"peak RSS of {scaling['rss_rows']:,}-row run within 50 MiB of "
            f"{scaling['base_rows']:,}-row run"
            if scaling
            else "peak RSS grows < 50 MiB with rows",
            delta,
            delta is not None and delta <= 50,
            f"{delta:+.1f} MiB" if delta is not None else "",
        )
    )
    time_ratio = None if scaling is None else scaling.get("time_ratio")
    factor = None if scaling is None else scaling.get("factor")
    checks.append(
        _check(
            f"time grows linearly: {factor}x rows -> {factor}x time +-25%"
            if scaling
            else "time grows linearly",
            time_ratio,
            time_ratio is not None
            and factor is not None
            and 0.75 * factor <= time_ratio <= 1.25 * factor,
            f"{time_ratio:.2f} x time" if time_ratio is not None else "",
        )
    )
    if scaling and scaling.get("rss_time_ratio") and scaling.get("rss_rows_ratio"):
        per_row = scaling["rss_time_ratio"] / scaling["rss_rows_ratio"]
        checks.append(
            _check(
                f"time grows linearly up to {scaling['rss_rows']:,} rows (time/rows ratio 1 +-25%)",
                per_row,
                0.75 <= per_row <= 1.25,
                f"{scaling['rss_time_ratio']:.1f} x time for {scaling['rss_rows_ratio']:.1f} x"
                f" rows ({per_row:.2f})",
            )
        )
    return checks


def targets_table(checks: Sequence[TargetCheck]) -> str:
    """The target checks as a table."""
    verdict = {True: "yes", False: "NO", None: "-"}
    return format_table(
        ["issue target", "measured", "holds"],
        [[check.name, check.measured, verdict[check.holds]] for check in checks],
    )
