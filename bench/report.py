"""Turning scenario results into the printed tables and the target checks (measured, not
asserted: a target that does not hold is reported as ``NO``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from migrations_mode.tables import build_table, render_table

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
    return render_table(build_table(headers, rows))


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


# The client CPU comparison: what each PUT path is, in the order printed.
CPU_PATHS = (
    ("backfill", "aioboto3, lean settings, Content-MD5 + ETag check"),
    ("bare_put", "aioboto3, default settings"),
    ("obstore_put", "obstore (Rust object_store), reference only"),
)


def cpu_per_object_table(results: Mapping[str, Summary]) -> str:
    """Client CPU per object of the backfill, the bare loop and obstore, and each over the
    bare loop's."""
    bare = results.get("bare_put")
    rows = [
        [
            name,
            what,
            _number(results[name]["cpu_ms_per_object"], 3),
            _number(
                _ratio(
                    results[name]["cpu_ms_per_object"],
                    bare["cpu_ms_per_object"] if bare else None,
                ),
                2,
            ),
        ]
        for name, what in CPU_PATHS
        if name in results
    ]
    return format_table(["scenario", "PUT path", "client CPU ms/obj", "x bare loop"], rows)


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


@dataclass(frozen=True)
class Run:
    """This run's numbers as the targets read them: scenario summaries and the scaling runs."""

    results: Mapping[str, Summary]
    scaling: Mapping[str, Any] | None
    latency: Mapping[str, Any] | None = None
    rate_limit: Mapping[str, Any] | None = None

    def value(self, scenario: str, name: str) -> Any:
        result = self.results.get(scenario)
        return None if result is None else result.get(name)

    def ratio(self, name: str, scenario: str, over: str) -> float | None:
        """``name`` of ``scenario`` over the same number of ``over``."""
        return _ratio(self.value(scenario, name), self.value(over, name))

    def scaled(self, name: str) -> Any:
        return None if self.scaling is None else self.scaling.get(name)


@dataclass(frozen=True)
class Target:
    """One issue target: its name, the number it reads, when that holds and how it is shown.

    ``scaled_name`` replaces ``name`` when the run has scaling numbers; a target that does not
    ``apply`` to a run is left out of it.
    """

    name: str
    measure: Callable[[Run], float | None]
    holds: Callable[[float, Run], bool]
    shown: Callable[[float, Run], str]
    scaled_name: Callable[[Mapping[str, Any]], str] | None = None
    applies: Callable[[Run], bool] = lambda _run: True

    def check(self, run: Run) -> TargetCheck:
        name = self.name
        if run.scaling and self.scaled_name is not None:
            name = self.scaled_name(run.scaling)
        measured = self.measure(run)
        if measured is None:
            return TargetCheck(name, "not measured", None)
        return TargetCheck(name, self.shown(measured, run), self.holds(measured, run))


def _tuples_per_row(run: Run) -> float | None:
    backfill = run.results.get("backfill")
    if not backfill or not backfill.get("pg"):
        return None
    tuples = float(backfill["pg"]["seq_tup_read"] + backfill["pg"]["idx_tup_fetch"])
    return tuples / max(float(backfill["rows_below_cutoff"]), 1.0)


def _per_row(metric: str, scenario: str) -> Callable[[Run], float | None]:
    return lambda run: run.value(scenario, metric)


def _scaled(name: str) -> Callable[[Run], float | None]:
    return lambda run: run.scaled(name)


def _at_most(limit: float) -> Callable[[float, Run], bool]:
    return lambda measured, _run: measured <= limit


def _at_least(limit: float) -> Callable[[float, Run], bool]:
    return lambda measured, _run: measured >= limit


def _shown_as(template: str) -> Callable[[float, Run], str]:
    return lambda measured, _run: template.format(measured)


def _rerun_speedup(wall_ratio: float, run: Run) -> str:
    rate = run.ratio("rows_per_s", "backfill_rerun", "upstream_rerun")
    return f"{wall_ratio:.1f} x time ({rate or 0:.1f} x rows/s)"


def _cpu_against_bare(ratio: float, run: Run) -> str:
    ours, bare = (
        run.value("backfill", "cpu_ms_per_object"),
        run.value("bare_put", "cpu_ms_per_object"),
    )
    return f"{ratio:.2f} x ({ours:.3f} vs {bare:.3f} ms)"


def _time_linear(time_ratio: float, run: Run) -> bool:
    rows_ratio = run.scaled("rows_ratio")
    return bool(rows_ratio) and 0.75 * rows_ratio <= time_ratio <= 1.25 * rows_ratio


def _most_tuples_per_row(run: Run) -> float | None:
    tuples = run.scaled("pg_tuples_per_row") or {}
    known = [float(value) for value in tuples.values() if value is not None]
    return max(known) if known else None


def _tuples_flat(most: float, run: Run) -> bool:
    return bool(run.scaled("tuples_ok"))


def _tuned_against_best(run: Run) -> float | None:
    sweeps = (run.latency or {}).get("sweeps") or []
    return min((float(sweep["ratio_to_best"]) for sweep in sweeps), default=None)


def _tuned_shown(worst: float, run: Run) -> str:
    sweeps = (run.latency or {})["sweeps"]
    return ", ".join(
        f"{float(sweep['ratio_to_best']):.2f} x at +{sweep['latency_ms']:g} ms" for sweep in sweeps
    )


def _limit_error(name: str) -> Callable[[Run], float | None]:
    """The achieved rate's error against a limit, as a share (None: not run)."""

    def measure(run: Run) -> float | None:
        held = (run.rate_limit or {}).get(name)
        return None if held is None else float(held["error_pct"]) / 100

    return measure


def _limit_held(name: str) -> Callable[[float, Run], bool]:
    return lambda _error, run: bool((run.rate_limit or {})[name]["holds"])


def _limit_shown(name: str) -> Callable[[float, Run], str]:
    def shown(error: float, run: Run) -> str:
        held = (run.rate_limit or {})[name]
        return f"{100 * error:+.2f}% over {held['window_s']:.0f} s"

    return shown


def _kept_ratio(run: Run) -> float | None:
    kept = (run.rate_limit or {}).get("kept")
    return None if kept is None else float(kept["ratio"])


def _kept_shown(ratio: float, run: Run) -> str:
    kept = (run.rate_limit or {})["kept"]
    return f"{ratio:.3f} x (noise {100 * float(kept['noise']):.1f}%)"


def _scale_rows(scaling: Mapping[str, Any]) -> tuple[str, str]:
    return f"{scaling['rows']['smaller']:,}", f"{scaling['rows']['larger']:,}"


def _round_trips(scenario: str) -> Target:
    return Target(
        f"PG round trips <= 0.01/row ({scenario})",
        _per_row("pg_round_trips_per_row", scenario),
        _at_most(0.01),
        _shown_as("{:.4f}/row"),
    )


TARGETS = (
    Target(
        "PG tuples read <= 3 x rows below cutoff (backfill)",
        _tuples_per_row,
        _at_most(3),
        _shown_as("{:.2f} x"),
    ),
    _round_trips("backfill"),
    _round_trips("backfill_rerun"),
    Target(
        "S3 requests <= 1.05/row, empty bucket (backfill)",
        _per_row("s3_requests_per_row", "backfill"),
        _at_most(1.05),
        _shown_as("{:.4f}/row"),
    ),
    Target(
        "S3 requests <= 0.02/row, re-run over full bucket (backfill_rerun)",
        _per_row("s3_requests_per_row", "backfill_rerun"),
        _at_most(0.02),
        _shown_as("{:.4f}/row"),
    ),
    Target(
        "throughput >= 0.9 x bare PUT loop, same C",
        lambda run: run.ratio("rows_per_s", "backfill", "bare_put"),
        _at_least(0.9),
        _shown_as("{:.2f} x"),
    ),
    # (throughput >= 1.8 x the upstream baseline is retired by issue 13: the bare loop itself
    # reaches 1.6-1.7 x here. The main table still shows the ratio.)
    Target(
        "re-run over full bucket >= 4 x faster than baseline re-run (wall time)",
        lambda run: run.ratio("seconds", "upstream_rerun", "backfill_rerun"),
        _at_least(4),
        _rerun_speedup,
    ),
    Target(
        "client CPU per object <= 0.8 x bare PUT loop (aioboto3 defaults)",
        lambda run: run.ratio("cpu_ms_per_object", "backfill", "bare_put"),
        _at_most(0.8),
        _cpu_against_bare,
    ),
    Target(
        "self-tuned >= 0.9 x the best fixed level, medians of runs (S3 behind a delay)",
        _tuned_against_best,
        _at_least(0.9),
        _tuned_shown,
    ),
    Target(
        "--backfill-max-uploads-per-second held within 5% over 60 s",
        _limit_error("uploads_per_s"),
        _limit_held("uploads_per_s"),
        _limit_shown("uploads_per_s"),
    ),
    Target(
        "--backfill-max-bytes-per-second held within 5% over 60 s",
        _limit_error("bytes_per_s"),
        _limit_held("bytes_per_s"),
        _limit_shown("bytes_per_s"),
    ),
    Target(
        "limits 10x above S3's pace keep >= 0.95 x throughput (or within the noise)",
        _kept_ratio,
        lambda _ratio, run: bool((run.rate_limit or {})["kept"]["holds"]),
        _kept_shown,
    ),
    Target(
        "peak RSS grows < 50 MiB with rows",
        _scaled("rss_growth_mib"),
        _at_most(50),
        _shown_as("{:+.1f} MiB"),
        scaled_name=lambda scaling: (
            "peak RSS of the {1}-row run within 50 MiB of the {0}-row run".format(
                *_scale_rows(scaling)
            )
        ),
    ),
    Target(
        "time grows linearly",
        _scaled("time_ratio"),
        _time_linear,
        lambda ratio, run: f"{ratio:.2f} x time for {run.scaled('rows_ratio'):.2f} x rows",
        scaled_name=lambda scaling: (
            "time grows linearly: {} -> {} rows, time ratio = rows ratio +-25%".format(
                *_scale_rows(scaling)
            )
        ),
    ),
    Target(
        "PG tuples read <= 3 per row and flat (scale runs)",
        _most_tuples_per_row,
        _tuples_flat,
        lambda _most, run: " -> ".join(
            f"{value:.2f}" for value in (run.scaled("pg_tuples_per_row") or {}).values()
        ),
    ),
)


def check_targets(
    results: Mapping[str, Summary],
    *,
    scaling: Mapping[str, Any] | None,
    latency: Mapping[str, Any] | None = None,
    rate_limit: Mapping[str, Any] | None = None,
) -> list[TargetCheck]:
    """Evaluate the issue's targets on this run's numbers."""
    run = Run(results, scaling, latency, rate_limit)
    return [target.check(run) for target in TARGETS if target.applies(run)]


def targets_table(checks: Sequence[TargetCheck]) -> str:
    """The target checks as a table."""
    verdict = {True: "yes", False: "NO", None: "-"}
    return format_table(
        ["issue target", "measured", "holds"],
        [[check.name, check.measured, verdict[check.holds]] for check in checks],
    )
