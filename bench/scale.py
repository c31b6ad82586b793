"""Scale evidence: many small rows of one cache, the backfill at a quarter of them and at all of
them, then K shards, and what that means for 100 million rows.

``python -m bench`` runs this section after its scenarios (not with ``--smoke`` or
``--no-scaling``). It seeds ``--scale-rows`` rows (default 1,000,000) of ``--scale-value-size``
bytes into one database and ``--scale-rows / --scale-factor`` rows into another (the same
generator, so the smaller table is a prefix of the larger), runs the ``backfill`` scenario on
each at ``--concurrency`` (fixed), then the ``shards`` scenario at every K of ``--scale-shards``
above 1 on the smaller table (each of K processes at the same concurrency), every run on a fresh
bucket. The figures: time(larger)/time(smaller) against the rows' ratio (linear within 25 %),
peak RSS growth between the two, Postgres tuples read per row at both sizes (at most 3, and
flat), rows/s per K, and ``Extrapolation`` turns the measured rate and client CPU per object into
hours for 100 million rows per pod and for K pods. Each run is a subprocess of its own, stopped
by the runner's timeout; nothing here keeps a server or a file open.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import CUTOFF, ScenarioRunner, comma_ints
from bench.data import SeededDatabase, seed_and_report, uniform_sizes
from bench.report import format_table
from devenv.postgres import PostgresEndpoint

PRODUCTION_ROWS = 100_000_000
LINEAR_TOLERANCE = 0.25  # time ratio within rows ratio x (1 +- this)
RSS_GROWTH_LIMIT_MIB = 50.0
TUPLES_PER_ROW_LIMIT = 3.0
FLAT_TOLERANCE = 0.10  # tuples per row at both sizes within this share of each other


@dataclass(frozen=True)
class Extrapolation:
    """Hours for ``PRODUCTION_ROWS`` rows from a measured rate and client CPU per object."""

    measured_rows_per_s: float
    cpu_ms_per_object: float

    @property
    def cpu_bound_rows_per_s(self) -> float:
        """What one pod's client can do on one fully used CPU, S3 and Postgres keeping up."""
        return 1000 / self.cpu_ms_per_object

    def hours(self, rows_per_s: float, pods: int = 1) -> float:
        return PRODUCTION_ROWS / (rows_per_s * pods) / 3600

    def as_json(self, pods: Sequence[int]) -> dict[str, Any]:
        return {
            "rows": PRODUCTION_ROWS,
            "measured_rows_per_s": round(self.measured_rows_per_s, 1),
            "cpu_ms_per_object": self.cpu_ms_per_object,
            "cpu_bound_rows_per_s_per_core": round(self.cpu_bound_rows_per_s, 1),
            "hours_at_measured_rate": {
                str(k): round(self.hours(self.measured_rows_per_s, k), 2) for k in pods
            },
            "hours_cpu_bound_one_core_per_pod": {
                str(k): round(self.hours(self.cpu_bound_rows_per_s, k), 2) for k in pods
            },
        }


def scale_figures(
    smaller: Mapping[str, Any],
    larger: Mapping[str, Any],
    shards: Mapping[int, Mapping[str, Any]],
) -> dict[str, Any]:
    """The section's verdicts from the runs' summaries (pure)."""
    rows_ratio = larger["rows"] / max(smaller["rows"], 1)
    time_ratio = larger["seconds"] / max(smaller["seconds"], 1e-9)
    tuples = (smaller["pg_tuples_per_row"], larger["pg_tuples_per_row"])
    tuples_known = all(value is not None for value in tuples)
    rss_growth = larger["peak_rss_mib"] - smaller["peak_rss_mib"]
    single = smaller["rows_per_s"]
    return {
        "rows": {"smaller": smaller["rows"], "larger": larger["rows"]},
        "rows_ratio": round(rows_ratio, 3),
        "time_ratio": round(time_ratio, 3),
        "linear": abs(time_ratio / rows_ratio - 1) <= LINEAR_TOLERANCE,
        "ms_per_row": {
            "smaller": round(1000 * smaller["seconds"] / max(smaller["rows"], 1), 4),
            "larger": round(1000 * larger["seconds"] / max(larger["rows"], 1), 4),
        },
        "peak_rss_mib": {"smaller": smaller["peak_rss_mib"], "larger": larger["peak_rss_mib"]},
        "rss_growth_mib": round(rss_growth, 1),
        "rss_flat": rss_growth <= RSS_GROWTH_LIMIT_MIB,
        "pg_tuples_per_row": {"smaller": tuples[0], "larger": tuples[1]},
        "tuples_ok": tuples_known
        and max(tuples) <= TUPLES_PER_ROW_LIMIT
        and max(tuples) <= (1 + FLAT_TOLERANCE) * min(tuples),
        "shards_rows_per_s": {
            "1": single,
            **{str(k): run["rows_per_s"] for k, run in sorted(shards.items())},
        },
        "shards_speedup": {
            str(k): round(run["rows_per_s"] / max(single, 1e-9), 2)
            for k, run in sorted(shards.items())
        },
    }


def add_scale_flags(parser: argparse.ArgumentParser) -> None:
    """The section's flags (``python -m bench`` has them)."""
    parser.add_argument("--scale-rows", type=int, default=1_000_000, help="the larger table")
    parser.add_argument("--scale-factor", type=int, default=4, help="larger / smaller rows")
    parser.add_argument("--scale-value-size", type=int, default=256, help="bytes a value")
    parser.add_argument("--scale-shards", default="1,2,4", help="K processes, on the smaller")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scale section")


def run_scale_section(
    runner: ScenarioRunner, pg: PostgresEndpoint, args: argparse.Namespace
) -> dict[str, Any]:
    """Seed both tables, run the backfill on each and the shards; the section's JSON."""
    concurrency = args.concurrency
    levels = sorted({*comma_ints(args.scale_shards), 1})
    print(
        f"scale: backfill at C={concurrency} on {args.scale_rows // args.scale_factor:,} and"
        f" {args.scale_rows:,} rows, then K = {', '.join(map(str, levels))} shards:",
        flush=True,
    )
    sizes = uniform_sizes(args.scale_value_size)

    def seed(rows: int) -> SeededDatabase:
        dbname = f"scale_{rows}_{args.scale_value_size}"
        return seed_and_report(pg, dbname, rows, cutoff=CUTOFF, sizes=sizes)

    smaller_db = seed(args.scale_rows // args.scale_factor)
    larger_db = seed(args.scale_rows)

    def backfill(database: SeededDatabase) -> dict[str, Any]:
        return runner.run(
            "backfill",
            runner.target(database, runner.new_prefix(f"scale-{database.rows}")),
            concurrency=concurrency,
            rows=database.rows,
            label=f"scale-backfill-{database.rows}-rows",
        )

    smaller = backfill(smaller_db)
    larger = backfill(larger_db)
    shards = {
        k: runner.run(
            "shards",
            runner.target(smaller_db, runner.new_prefix(f"scale-k{k}")),
            concurrency=concurrency,
            rows=smaller_db.rows,
            extra_args=("--shards", str(k)),
            label=f"scale-shards-k{k}-{smaller_db.rows}-rows",
        )
        for k in levels
        if k > 1
    }
    figures = scale_figures(smaller, larger, shards)
    extrapolation = Extrapolation(larger["rows_per_s"], larger["cpu_ms_per_object"])
    return {
        "concurrency": concurrency,
        "value_size": args.scale_value_size,
        "databases": {"smaller": smaller_db.as_json(), "larger": larger_db.as_json()},
        **figures,
        "extrapolation": extrapolation.as_json(levels),
        "runs": {
            "smaller": smaller,
            "larger": larger,
            **{f"shards-{k}": run for k, run in shards.items()},
        },
    }


def scale_report(section: Mapping[str, Any]) -> str:
    """The section as text: one table of the runs, the verdicts, the extrapolation."""
    runs = section["runs"]
    rows = [
        [
            label,
            f"{run['rows']:,}",
            f"{run['seconds']:,.1f}",
            f"{run['rows_per_s']:,.0f}",
            f"{1000 * run['seconds'] / max(run['rows'], 1):.3f}",
            f"{run['peak_rss_mib']:.0f}",
            "-" if run["pg_tuples_per_row"] is None else f"{run['pg_tuples_per_row']:.2f}",
            f"{run['cpu_ms_per_object']:.3f}",
        ]
        for label, run in (
            ("K=1", runs["smaller"]),
            ("K=1", runs["larger"]),
            *((f"K={run['shards']}", run) for key, run in runs.items() if "shards" in key),
        )
    ]
    headers = [
        *("run", "rows", "s", "rows/s", "ms/row"),
        *("peak RSS MiB", "PG tuples/row", "CPU ms/obj"),
    ]
    verdict = {True: "yes", False: "NO"}
    extrapolation = section["extrapolation"]
    measured = extrapolation["hours_at_measured_rate"]
    bound = extrapolation["hours_cpu_bound_one_core_per_pod"]
    speedups = ", ".join(f"K={k} x{v:.2f}" for k, v in section["shards_speedup"].items())
    lines = [
        f"scale: one cache, {section['value_size']:,}-byte values, C={section['concurrency']}:",
        format_table(headers, rows),
        f"time x{section['time_ratio']:.2f} for rows x{section['rows_ratio']:.2f}; linear within"
        f" {100 * LINEAR_TOLERANCE:g}%: {verdict[section['linear']]}",
        f"peak RSS {section['rss_growth_mib']:+.0f} MiB; <= {RSS_GROWTH_LIMIT_MIB:g} MiB:"
        f" {verdict[section['rss_flat']]}",
        f"PG tuples per row <= {TUPLES_PER_ROW_LIMIT:g} and flat: {verdict[section['tuples_ok']]}",
        f"shards over one process (same rows): {speedups or '-'}",
        f"100M rows at the measured {extrapolation['measured_rows_per_s']:,.0f} rows/s: "
        + ", ".join(f"{k} pod(s) {h:,.1f} h" for k, h in measured.items()),
        f"100M rows client-CPU bound ({extrapolation['cpu_ms_per_object']:.3f} ms/object,"
        f" {extrapolation['cpu_bound_rows_per_s_per_core']:,.0f} rows/s per core): "
        + ", ".join(f"{k} pod(s) {h:,.1f} h" for k, h in bound.items()),
    ]
    return "\n".join(lines)
