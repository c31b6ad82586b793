"""Latency scenarios: S3 behind a delay, a fixed-concurrency sweep against the tuned limit.

``python -m bench`` runs this section after its others (``python -m bench.latency`` runs it
alone, on servers of its own). It seeds ``--latency-rows`` rows of one value size; for each
latency of ``--latency-ms`` it puts a delay (``uniform(latency ± jitter)`` per request, in a
process of its own) in front of S3: by default ``bench.delay_relay``, at the TCP level, which
costs the shared machine under a third of the CPU of ``--latency-delay proxy`` (the HTTP proxy
the figures before it were measured with). Then it runs the ``backfill`` scenario tuned (the
sweep's largest level as its ceiling), at each fixed level of ``--latency-sweep``, and tuned
again, each on a fresh bucket. One run is noisy on a shared machine (+-10-25 % here), and the
best of five single runs is biased upwards by the noise alone, so the sweep's two fastest levels
and tuned then run ``--latency-repeat`` more rounds, each round in a rotated order, and every
level and tuned are judged by the median of their runs. At the best level the bare PUT loop and
the upstream loop then run once each, for rows/s and client CPU per object beside the
backfill's. Then the throttling check: a proxy that answers SlowDown above ``--throttle-rate``
requests/s, the backfill at the sweep's largest fixed level and tuned, counting the 503s. The
report is the sweep's table, a verdict per latency (tuned's median at least 0.9x the best fixed
level's, with the best single run beside it), a table of each way to copy at each latency and
the throttling lines; alone, it writes
``<results-dir>/latency-<UTC timestamp>.json``. Every server and proxy is stopped on the way out
(context managers); the exit status is 0 whenever every run finished, whatever the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench.common import CUTOFF, ScenarioRunner, Target, comma_ints
from bench.data import SeededDatabase, seed_and_report, uniform_sizes
from bench.delay_proxy import delayed_endpoint
from bench.machine import machine_info, pg_version, s3_server_pid
from bench.report import format_table
from bench.runner import Runner, logs_dir
from devenv.faults import SLOWDOWN
from devenv.postgres import PostgresEndpoint, start_postgres
from devenv.s3 import S3Endpoint, start_s3

TARGET_SHARE_OF_BEST = 0.9
STORM_SHARE = 0.05  # more than this share of S3 requests answered SlowDown is a storm
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
TUNED = ("--concurrency-mode", "tuned")
FINALISTS = 2  # the sweep's fastest fixed levels that run again beside tuned
_DELAY_KINDS = {"relay": "the TCP relay", "proxy": "the HTTP proxy"}
BASELINES = ("bare_put", "upstream")  # run once each at the best fixed level, per latency
T = TypeVar("T")


@dataclass(frozen=True)
class Verdict:
    """The tuned run against the best fixed concurrency of the sweep."""

    best_fixed: int
    best_fixed_rows_per_s: float
    tuned_rows_per_s: float

    @property
    def ratio(self) -> float:
        return self.tuned_rows_per_s / self.best_fixed_rows_per_s

    @property
    def holds(self) -> bool:
        return self.ratio >= TARGET_SHARE_OF_BEST

    def line(self, latency_ms: float) -> str:
        """One line: the figures and whether the target holds."""
        return (
            f"+{latency_ms:g} ms: tuned {self.tuned_rows_per_s:,.0f} rows/s = {self.ratio:.2f}x "
            f"the best fixed (C={self.best_fixed}, {self.best_fixed_rows_per_s:,.0f} rows/s); "
            f">= {TARGET_SHARE_OF_BEST}x: {'yes' if self.holds else 'NO'}"
        )


def verdict(fixed_rows_per_s: Mapping[int, float], tuned_rows_per_s: float) -> Verdict:
    """Compare the tuned run with the fastest fixed concurrency."""
    best = max(fixed_rows_per_s, key=lambda level: fixed_rows_per_s[level])
    return Verdict(best, fixed_rows_per_s[best], tuned_rows_per_s)


def finalists(fixed_rows_per_s: Mapping[int, float], count: int = FINALISTS) -> list[int]:
    """The ``count`` fastest fixed levels of a sweep, fastest first."""
    return sorted(fixed_rows_per_s, key=lambda level: -fixed_rows_per_s[level])[:count]


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` started ``turn`` places in (a Latin square over rounds: no run is always first
    or last, so drift within a round does not fall on one of them)."""
    if not items:
        return []
    start = turn % len(items)
    return [*items[start:], *items[:start]]


def judged(
    fixed_runs: Mapping[int, Sequence[float]], tuned_runs: Sequence[float]
) -> tuple[Verdict, Verdict]:
    """The verdict on medians (each level's runs against tuned's), and the one the sweep alone
    gives: each level's first run, the best of them against the mean of tuned's first two."""
    medians = {level: statistics.median(runs) for level, runs in fixed_runs.items()}
    sweep_only = {level: runs[0] for level, runs in fixed_runs.items()}
    return (
        verdict(medians, statistics.median(tuned_runs)),
        verdict(sweep_only, statistics.fmean(tuned_runs[:2])),
    )


def slowdown_share(counts: Mapping[str, int]) -> float:
    """Share of the proxy's requests answered SlowDown (its per-outcome totals only)."""
    totals = {outcome: count for outcome, count in counts.items() if ":" not in outcome}
    return totals.get(SLOWDOWN, 0) / max(sum(totals.values()), 1)


def _through(target: Target, endpoint: S3Endpoint) -> Target:
    return replace(target, s3=endpoint)


def latency_sweep(
    runner: ScenarioRunner,
    database: SeededDatabase,
    *,
    latency_ms: float,
    jitter: float,
    levels: Sequence[int],
    repeat: int = 0,
    relay: bool = True,
) -> dict[str, Any]:
    """The fixed sweep and the tuned run (twice: first and last, so drift in the machine's load
    falls on both sides) at one latency; then ``repeat`` rounds of the two fastest levels and
    tuned, each round in a rotated order, and the verdict on the medians; then the bare PUT loop
    and the upstream loop once each at the best level."""
    low_s, high_s = latency_ms * (1 - jitter) / 1000, latency_ms * (1 + jitter) / 1000
    ceiling = max(levels)
    runs: dict[str, dict[str, Any]] = {}
    with delayed_endpoint(runner.s3, low_s, high_s, relay=relay) as delayed:

        def run(
            label: str, concurrency: int, extra: tuple[str, ...] = (), scenario: str = "backfill"
        ) -> dict[str, Any]:
            target = _through(runner.target(database, runner.new_prefix(label)), delayed.endpoint)
            return runner.run(
                scenario,
                target,
                concurrency=concurrency,
                rows=database.rows,
                extra_args=extra,
                label=f"{label}-{latency_ms:g}ms",
            )

        runs["tuned-1"] = run("tuned-first", ceiling, TUNED)
        for level in levels:
            runs[f"fixed-{level}"] = run(f"fixed-c{level}", level)
        runs["tuned-2"] = run("tuned-last", ceiling, TUNED)
        fixed_runs = {level: [float(runs[f"fixed-{level}"]["rows_per_s"])] for level in levels}
        tuned_runs = [float(runs[f"tuned-{n}"]["rows_per_s"]) for n in (1, 2)]
        again: list[int | None] = [*finalists({lv: v[0] for lv, v in fixed_runs.items()}), None]
        for round_number in range(2, repeat + 2):
            for finalist in rotated(again, round_number):  # None: tuned
                if finalist is None:
                    name = f"tuned-{round_number + 1}"
                    runs[name] = run(f"tuned-r{round_number}", ceiling, TUNED)
                    tuned_runs.append(float(runs[name]["rows_per_s"]))
                else:
                    name = f"fixed-{finalist}-{round_number}"
                    runs[name] = run(f"fixed-c{finalist}-r{round_number}", finalist)
                    fixed_runs[finalist].append(float(runs[name]["rows_per_s"]))
        on_medians, sweep_only = judged(fixed_runs, tuned_runs)
        best = on_medians.best_fixed
        for scenario in BASELINES:
            runs[scenario] = run(f"{scenario}-c{best}", best, scenario=scenario)
    return {
        "latency_ms": latency_ms,
        "jitter": jitter,
        "delay": "relay" if relay else "proxy",
        "fixed_rows_per_s": {
            str(level): statistics.median(values) for level, values in fixed_runs.items()
        },
        "fixed_runs_rows_per_s": {str(level): values for level, values in fixed_runs.items()},
        "tuned_rows_per_s": on_medians.tuned_rows_per_s,
        "tuned_runs_rows_per_s": tuned_runs,
        "best_fixed": on_medians.best_fixed,
        "ratio_to_best": round(on_medians.ratio, 3),
        "holds": on_medians.holds,
        "verdict": on_medians.line(latency_ms),
        "sweep_only": {
            "best_fixed": sweep_only.best_fixed,
            "best_fixed_rows_per_s": sweep_only.best_fixed_rows_per_s,
            "tuned_rows_per_s": sweep_only.tuned_rows_per_s,
            "ratio_to_best": round(sweep_only.ratio, 3),
        },
        "proxy_counts": delayed.counts,
        "clients": client_costs(runs, best),
        "runs": runs,
    }


def client_costs(runs: Mapping[str, Mapping[str, Any]], best: int) -> dict[str, dict[str, float]]:
    """rows/s and client CPU per object of each way to copy at this latency: the bare loop and
    upstream (one run each, at the best fixed level), the backfill at that level and tuned (the
    medians of their runs)."""

    def medians(names: Sequence[str]) -> dict[str, float]:
        return {
            key: statistics.median(float(runs[name][key]) for name in names)
            for key in ("rows_per_s", "cpu_ms_per_object")
        }

    costs = {f"{scenario} (C={best})": medians([scenario]) for scenario in BASELINES}
    costs[f"backfill (C={best})"] = medians(
        [name for name in runs if name.split("-")[:2] == ["fixed", str(best)]]
    )
    costs["backfill (tuned)"] = medians([name for name in runs if name.startswith("tuned-")])
    return costs


def throttle_check(
    runner: ScenarioRunner,
    database: SeededDatabase,
    *,
    latency_ms: float,
    rate_per_s: float,
    fixed_level: int,
) -> dict[str, Any]:
    """Fixed concurrency and tuned against a proxy throttling above ``rate_per_s``."""
    latency_s = latency_ms / 1000
    results: dict[str, Any] = {"latency_ms": latency_ms, "rate_per_s": rate_per_s}
    for label, extra in (("fixed", ()), ("tuned", TUNED)):
        with delayed_endpoint(
            runner.s3,
            latency_s * 0.9,
            latency_s * 1.1,
            max_rate_per_s=rate_per_s,
        ) as delayed:
            target = _through(
                runner.target(database, runner.new_prefix(f"throttle-{label}")), delayed.endpoint
            )
            summary = runner.run(
                "backfill",
                target,
                concurrency=fixed_level,
                rows=database.rows,
                extra_args=extra,
                label=f"throttle-{label}-c{fixed_level}",
            )
        share = slowdown_share(delayed.counts)
        results[label] = {
            "rows_per_s": summary["rows_per_s"],
            "slowdowns": delayed.counts.get(SLOWDOWN, 0),
            "requests": sum(v for k, v in delayed.counts.items() if ":" not in k),
            "slowdown_share": round(share, 4),
            "storm": share > STORM_SHARE,
            "run": summary,
        }
    return results


def latency_report(section: Mapping[str, Any]) -> str:
    """The sweep table, the verdicts and the throttling check, as text."""
    sweeps: list[Mapping[str, Any]] = section["sweeps"]
    levels = list(sweeps[0]["fixed_rows_per_s"]) if sweeps else []
    headers = ["S3 latency", *(f"C={level}" for level in levels), "tuned", "tuned/best"]
    rows = [
        [
            f"+{sweep['latency_ms']:g} ms",
            *(
                _median_cell(
                    sweep["fixed_rows_per_s"][level], sweep["fixed_runs_rows_per_s"][level]
                )
                for level in levels
            ),
            _median_cell(sweep["tuned_rows_per_s"], sweep["tuned_runs_rows_per_s"]),
            f"{sweep['ratio_to_best']:.2f}",
        ]
        for sweep in sweeps
    ]
    lines = [
        f"rows/s of the backfill with S3 behind a delay ({_DELAY_KINDS[sweeps[0]['delay']]}; "
        "the median of (n) runs):"
        if sweeps
        else "rows/s of the backfill with S3 behind a delay: no latency given",
        format_table(headers, rows),
    ]
    for sweep in sweeps:
        alone = sweep["sweep_only"]
        lines += [
            sweep["verdict"],
            f"  the sweep alone (each level once, the best single run against tuned's first "
            f"two): {alone['ratio_to_best']:.2f}x (C={alone['best_fixed']}, "
            f"{alone['best_fixed_rows_per_s']:,.0f} rows/s)",
        ]
    lines += _client_costs_table(sweeps)
    check = section.get("throttle")
    if check:
        lines.append(
            f"throttling above {check['rate_per_s']:g} requests/s at +{check['latency_ms']:g} ms:"
        )
        for label in ("fixed", "tuned"):
            run = check[label]
            lines.append(
                f"  {label:<5} {run['rows_per_s']:>8,.0f} rows/s, {run['slowdowns']:,} SlowDown "
                f"of {run['requests']:,} requests ({100 * run['slowdown_share']:.1f}%); "
                f"storm (> {100 * STORM_SHARE:g}%): {'YES' if run['storm'] else 'no'}"
            )
    return "\n".join(lines)


def _client_costs_table(sweeps: Sequence[Mapping[str, Any]]) -> list[str]:
    """rows/s and client CPU per object of each way to copy, at each latency."""
    rows = []
    for sweep in sweeps:
        costs: Mapping[str, Mapping[str, float]] = sweep["clients"]
        bare = next((cost for name, cost in costs.items() if name.startswith("bare_put")), None)
        for name, cost in costs.items():
            cpu = cost["cpu_ms_per_object"]
            rows.append(
                [
                    f"+{sweep['latency_ms']:g} ms",
                    name,
                    f"{cost['rows_per_s']:,.0f}",
                    f"{cpu:.3f}",
                    f"{cpu / bare['cpu_ms_per_object']:.2f}" if bare else "-",
                ]
            )
    if not rows:
        return []
    return [
        "each way to copy at each latency (bare loop and upstream: one run at the best fixed "
        "level; backfill: the median of its runs):",
        format_table(["S3 latency", "scenario", "rows/s", "CPU ms/obj", "CPU x bare"], rows),
    ]


def add_latency_flags(parser: argparse.ArgumentParser) -> None:
    """The latency section's flags (``python -m bench`` has them too)."""
    parser.add_argument("--latency-ms", default="20,60", help="added S3 latencies, ms")
    parser.add_argument("--latency-jitter", type=float, default=0.1, help="± share of it")
    parser.add_argument("--latency-sweep", default="16,32,64,128", help="fixed levels")
    parser.add_argument(
        "--latency-repeat",
        type=int,
        default=2,
        help="more rounds of the two fastest fixed levels and tuned (judged by medians)",
    )
    parser.add_argument("--latency-rows", type=int, default=40_000, help="rows seeded")
    parser.add_argument("--latency-value-size", type=int, default=4096, help="bytes a value")
    parser.add_argument(
        "--latency-delay",
        choices=("relay", "proxy"),
        default="relay",
        help="what delays S3: the TCP relay, or the HTTP proxy (3.5x its CPU, same cores)",
    )
    parser.add_argument(
        "--throttle-rate", type=float, default=150.0, help="SlowDown above, requests/s (0: off)"
    )


def _median_cell(median: float, runs: Sequence[float]) -> str:
    return f"{median:,.0f} ({len(runs)})" if len(runs) > 1 else f"{median:,.0f}"


def check_latency_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse latency flags out of range (``parser.error``: one line, exit status 2)."""
    if (
        args.latency_rows < 1
        or args.latency_value_size < 1
        or args.latency_repeat < 0
        or not 0 <= args.latency_jitter < 1
    ):
        parser.error(
            "--latency-rows, --latency-value-size > 0; --latency-repeat >= 0; "
            "--latency-jitter in [0, 1)"
        )


def run_latency_section(
    runner: ScenarioRunner, pg: PostgresEndpoint, args: argparse.Namespace
) -> dict[str, Any]:
    """Seed the section's table, run the sweeps and the throttling check; the section's JSON."""
    levels = comma_ints(args.latency_sweep)
    latencies = [float(value) for value in args.latency_ms.split(",") if value.strip()]
    rows, size = args.latency_rows, args.latency_value_size
    print(f"latency scenarios: {rows:,} rows of {size:,} bytes", flush=True)
    database = seed_and_report(
        pg, f"latency_{rows}_{size}", rows, cutoff=CUTOFF, sizes=uniform_sizes(size)
    )
    sweeps = []
    for latency_ms in latencies:
        print(f"S3 at +{latency_ms:g} ms (±{100 * args.latency_jitter:g}%):", flush=True)
        sweeps.append(
            latency_sweep(
                runner,
                database,
                latency_ms=latency_ms,
                jitter=args.latency_jitter,
                levels=levels,
                repeat=args.latency_repeat,
                relay=args.latency_delay == "relay",
            )
        )
    section: dict[str, Any] = {"database": database.as_json(), "sweeps": sweeps}
    if args.throttle_rate > 0:
        print(f"throttling above {args.throttle_rate:g} requests/s:", flush=True)
        section["throttle"] = throttle_check(
            runner,
            database,
            latency_ms=latencies[0],
            rate_per_s=args.throttle_rate,
            fixed_level=max(levels),
        )
    return section


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    """Only the latency section, on servers of its own; the results document."""
    document: dict[str, Any] = {
        "started_at": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
        "load_average": {"start": os.getloadavg()[0]},
        "config": vars(args) | {"results_dir": str(args.results_dir)},
    }
    started = time.monotonic()
    with start_postgres() as pg_server, start_s3(kind=args.s3) as s3_server, logs_dir() as logs:
        pg, s3 = pg_server.endpoint, s3_server.endpoint
        document["machine"] = machine_info(s3, asyncio.run(pg_version(pg)))
        runner = Runner(args, pg, s3, statements=False, logs_dir=logs)
        runner.pg_pid = pg_server.pid
        runner.s3_pid = s3_server_pid(s3)
        document["latency"] = run_latency_section(runner, pg, args)
    document["wall_seconds"] = round(time.monotonic() - started, 1)
    document["load_average"]["end"] = os.getloadavg()[0]
    print()
    print(latency_report(document["latency"]))
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"latency-{document['started_at']}.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"\nwrote {path}")
    return document


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The latency benchmark's flags."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    add_latency_flags(parser)
    parser.add_argument("--key-batch-size", type=int, default=1000)
    parser.add_argument(
        "--s3", default="seaweedfs", choices=("s3rver", "moto", "seaweedfs", "minio")
    )
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    args.shards = 1  # the main bench's runner passes it on; no shards run here
    check_latency_flags(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    run_latency(parse_args(argv))


if __name__ == "__main__":
    main()
