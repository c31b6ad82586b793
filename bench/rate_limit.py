"""The rate-limit section: each upload limit held, and nothing lost when it is above S3's pace.

``python -m bench`` runs this section after its scenarios (not with ``--smoke`` or
``--no-rate-limit``). Every run is the ``backfill`` scenario with tuned concurrency (the
product's default, ``--rate-concurrency`` its ceiling), logging a ``backfill checkpoint`` every
second, and stopped (drained, as on SIGTERM) once it has had its window; every run has a fresh
bucket. What a run did is read from those checkpoints: each carries ``uploaded`` and
``bytes_uploaded`` so far and the log's own timestamp, and a run's rate is the change between
two of them over the time between them (``steady_window``: the first checkpoint after
``--rate-warmup-s`` seconds, while the tuned limit climbs, and the one ``--rate-window-s`` later;
never past the stop).

On ``--rate-rows`` rows of ``--rate-value-size`` bytes: the backfill without a limit, then
``--rate-rounds`` times with both limits at 10x what that first run gave (uploads a second and
bytes a second) followed by one more without a limit; the limited runs' median rate over the
unlimited runs' median is the throughput kept when the limits are above what S3 gives (target
>= 0.95, or within the unlimited runs' spread, the run-to-run noise). Then
``--backfill-max-uploads-per-second`` at ``--rate-share`` of the unlimited median, over a
``--rate-window-s`` window: the achieved rate against the limit (target: within 5 %). Then on
``--rate-large-rows`` rows of 16-128 KiB (1 % of 1-4 MiB), the backfill without a limit and with
``--backfill-max-bytes-per-second`` at the same share of the bytes a second it gave, likewise.
A limit is lowered below its share when the table holds too little to last the window at it
(``limit_for``; the share used is reported). Each run is a subprocess of its own, stopped
by the runner's timeout; nothing here keeps a server or a file open.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from bench.common import CUTOFF, MIB, ScenarioRunner
from bench.data import SeededDatabase, seed_and_report, uniform_sizes
from bench.report import format_table
from devenv.postgres import PostgresEndpoint
from devenv.seed import SizeMix

LIMIT_TOLERANCE = 0.05  # the achieved rate within this share of the limit
KEPT_SHARE = 0.95  # throughput with limits above S3's pace, over the unlimited runs'
ABOVE_FACTOR = 10  # the limits of that run, over what the first unlimited run gave
CHECKPOINT_INTERVAL_S = 1.0
STOP_MARGIN_S = 3.0  # a run stops this long after its window should have closed
LARGE_SIZES = SizeMix(small=(16 * 1024, 128 * 1024), large=(MIB, 4 * MIB), large_share=0.01)
STARTED = "starting backfill for all cache types"
CHECKPOINT = "backfill checkpoint"
STOPPING = "stop requested, draining in-flight uploads"


class LoggingRunner(ScenarioRunner, Protocol):
    """A runner that keeps each run's stderr (the product's JSON logs) as ``<label>.log``."""

    logs_dir: Path


@dataclass(frozen=True)
class Checkpoint:
    """One ``backfill checkpoint``: seconds after the caches started, and what was uploaded."""

    at_s: float
    uploaded: int
    bytes_uploaded: int


@dataclass(frozen=True)
class RunLog:
    """A run's checkpoints, and when it was told to stop (None: it ran to the end)."""

    checkpoints: list[Checkpoint]
    stop_at_s: float | None = None


def read_run_log(lines: Iterable[str]) -> RunLog:
    """The checkpoints of a run that walked one cache, from its JSON log lines."""
    events = []
    for line in lines:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") in (STARTED, CHECKPOINT, STOPPING):
                events.append(event)
    starts = [event for event in events if event["event"] == STARTED]
    if len(starts) != 1:
        raise ValueError(f"expected one {STARTED!r} event, found {len(starts)}")
    origin = datetime.fromisoformat(starts[0]["timestamp"])

    def seconds(event: Mapping[str, Any]) -> float:
        return (datetime.fromisoformat(event["timestamp"]) - origin).total_seconds()

    checkpoints = [event for event in events if event["event"] == CHECKPOINT]
    caches = {event["cache_type"] for event in checkpoints}
    if len(caches) > 1:
        raise ValueError(f"the section's runs walk one cache, this one walked {sorted(caches)}")
    stops = [seconds(event) for event in events if event["event"] == STOPPING]
    return RunLog(
        [Checkpoint(seconds(e), e["uploaded"], e["bytes_uploaded"]) for e in checkpoints],
        min(stops, default=None),
    )


@dataclass(frozen=True)
class Window:
    """Two checkpoints of a run, and the rates between them."""

    start: Checkpoint
    end: Checkpoint

    @property
    def seconds(self) -> float:
        return self.end.at_s - self.start.at_s

    @property
    def uploads_per_s(self) -> float:
        return (self.end.uploaded - self.start.uploaded) / self.seconds

    @property
    def bytes_per_s(self) -> float:
        return (self.end.bytes_uploaded - self.start.bytes_uploaded) / self.seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "from_s": round(self.start.at_s, 3),
            "to_s": round(self.end.at_s, 3),
            "seconds": round(self.seconds, 3),
            "uploads": self.end.uploaded - self.start.uploaded,
            "bytes": self.end.bytes_uploaded - self.start.bytes_uploaded,
            "uploads_per_s": round(self.uploads_per_s, 2),
            "bytes_per_s": round(self.bytes_per_s, 1),
        }


def steady_window(log: RunLog, *, warmup_s: float, window_s: float) -> Window:
    """From the first checkpoint at or after ``warmup_s`` to the first one ``window_s`` later
    (half an interval early counts), or the last one before the stop if the run is shorter (a
    run shorter than its warm-up is measured from its first checkpoint)."""
    usable = [
        checkpoint
        for checkpoint in log.checkpoints
        if log.stop_at_s is None or checkpoint.at_s <= log.stop_at_s
    ]
    after_warmup = [checkpoint for checkpoint in usable if checkpoint.at_s >= warmup_s]
    if len(after_warmup) < 2:
        after_warmup = usable
    if len(after_warmup) < 2:
        raise ValueError("the run logged fewer than two checkpoints: give it more rows")
    start = after_warmup[0]
    due = start.at_s + window_s - CHECKPOINT_INTERVAL_S / 2
    end = next((c for c in after_warmup if c.at_s >= due), after_warmup[-1])
    return Window(start, end)


def whole_run(summary: Mapping[str, Any]) -> Window:
    """A scenario's whole timed section as a window (for a run too short for checkpoints)."""
    return Window(
        Checkpoint(0.0, 0, 0),
        Checkpoint(summary["seconds"], summary["objects_uploaded"], summary["bytes_uploaded"]),
    )


def limit_for(share: float, unlimited: float, available: float, room_s: float) -> float:
    """``share`` of the unlimited rate, or less if the table holds too little for ``room_s``
    seconds at that rate (``available`` uploads or bytes)."""
    return min(share * unlimited, available / room_s)


@dataclass(frozen=True)
class LimitVerdict:
    """A limit against the rate achieved under it."""

    limit: float
    achieved: float
    window_s: float
    window_wanted_s: float
    share: float  # the limit over the unlimited run's rate

    @property
    def error(self) -> float:
        return self.achieved / self.limit - 1

    @property
    def holds(self) -> bool:
        """Within the tolerance, over the whole window."""
        full = self.window_s >= self.window_wanted_s - CHECKPOINT_INTERVAL_S
        return full and abs(self.error) <= LIMIT_TOLERANCE + 1e-9  # 5.0% is within 5%

    def as_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "achieved": round(self.achieved, 2),
            "error_pct": round(100 * self.error, 2),
            "window_s": round(self.window_s, 3),
            "share_of_unlimited": round(self.share, 3),
            "holds": self.holds,
        }


@dataclass(frozen=True)
class KeptVerdict:
    """The runs with limits above S3's pace against the unlimited runs between them, by
    medians; the unlimited runs' spread is the run-to-run noise."""

    unlimited: tuple[float, ...]
    limited: tuple[float, ...]

    @property
    def unlimited_median(self) -> float:
        return statistics.median(self.unlimited)

    @property
    def ratio(self) -> float:
        return statistics.median(self.limited) / self.unlimited_median

    @property
    def noise(self) -> float:
        """The unlimited runs' spread (largest less smallest) over their median."""
        return (max(self.unlimited) - min(self.unlimited)) / self.unlimited_median

    @property
    def holds(self) -> bool:
        """At least ``KEPT_SHARE``, or within the noise."""
        return self.ratio >= min(KEPT_SHARE, 1 - self.noise)

    def as_json(self) -> dict[str, Any]:
        return {
            "unlimited_uploads_per_s": [round(rate, 2) for rate in self.unlimited],
            "limited_uploads_per_s": [round(rate, 2) for rate in self.limited],
            "ratio": round(self.ratio, 3),
            "noise": round(self.noise, 3),
            "holds": self.holds,
        }


def add_rate_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The section's flags (``python -m bench`` has them)."""
    parser.add_argument("--no-rate-limit", action="store_true", help="skip the rate-limit section")
    parser.add_argument("--rate-rows", type=int, default=40_000, help="rows for the uploads/s runs")
    parser.add_argument("--rate-value-size", type=int, default=4096, help="bytes a value there")
    parser.add_argument(
        "--rate-large-rows", type=int, default=8_000, help="rows of 16-128 KiB for bytes/s"
    )
    parser.add_argument(
        "--rate-share", type=float, default=0.5, help="the limits, over the unlimited rate"
    )
    parser.add_argument("--rate-window-s", type=float, default=60.0, help="the limits' window")
    parser.add_argument("--rate-warmup-s", type=float, default=5.0, help="not in any window")
    parser.add_argument(
        "--rate-unlimited-window-s", type=float, default=15.0, help="the unlimited runs' window"
    )
    parser.add_argument(
        "--rate-concurrency", type=int, default=64, help="the tuned limit's ceiling"
    )
    parser.add_argument(
        "--rate-rounds", type=int, default=2, help="runs with limits 10x above S3's pace"
    )


def run_rate_limit_section(
    runner: LoggingRunner, pg: PostgresEndpoint, args: argparse.Namespace
) -> dict[str, Any]:
    """Seed both tables, run the unlimited, 10x and limited runs; the section's JSON."""
    print(
        f"rate limits: {args.rate_rows:,} rows of {args.rate_value_size:,} bytes, then"
        f" {args.rate_large_rows:,} of 16-128 KiB; tuned concurrency up to"
        f" {args.rate_concurrency}, limits at {args.rate_share:g} x the unlimited rate:",
        flush=True,
    )
    small = seed_and_report(
        pg,
        f"rate_{args.rate_rows}_{args.rate_value_size}",
        args.rate_rows,
        cutoff=CUTOFF,
        sizes=uniform_sizes(args.rate_value_size),
    )
    large = seed_and_report(
        pg,
        f"rate_large_{args.rate_large_rows}",
        args.rate_large_rows,
        cutoff=CUTOFF,
        sizes=LARGE_SIZES,
    )
    runs: dict[str, dict[str, Any]] = {}

    def run(
        label: str, database: SeededDatabase, window_s: float, limits: tuple[str, ...] = ()
    ) -> Window:
        stop_after = args.rate_warmup_s + window_s + STOP_MARGIN_S
        log_label = f"rate-{label}"
        summary = runner.run(
            "backfill",
            runner.target(database, runner.new_prefix(log_label)),
            concurrency=args.rate_concurrency,
            rows=database.rows,
            extra_args=(
                *("--concurrency-mode", "tuned"),
                *("--checkpoint-interval-s", str(CHECKPOINT_INTERVAL_S)),
                *("--stop-after-s", str(stop_after)),
                "--no-pg-stats",
                *limits,
            ),
            label=log_label,
        )
        log_path = runner.logs_dir / f"{log_label}.log"
        try:
            window = steady_window(
                read_run_log(log_path.read_text().splitlines()),
                warmup_s=args.rate_warmup_s,
                window_s=window_s,
            )
        except ValueError:  # a table too small for two checkpoints: the whole run's rate
            window = whole_run(summary)
        runs[label] = {"summary": summary, "window": window.as_json(), "limits": list(limits)}
        return window

    unlimited_window = args.rate_unlimited_window_s
    unlimited = [run("unlimited-1", small, unlimited_window)]
    above = (
        *("--max-uploads-per-second", f"{ABOVE_FACTOR * unlimited[0].uploads_per_s:.1f}"),
        *("--max-bytes-per-second", str(round(ABOVE_FACTOR * unlimited[0].bytes_per_s))),
    )
    limited = []
    for number in range(1, args.rate_rounds + 1):  # alternating, unlimited first and last
        limited.append(run(f"above-10x-{number}", small, unlimited_window, above))
        unlimited.append(run(f"unlimited-{number + 1}", small, unlimited_window))
    kept = KeptVerdict(
        tuple(window.uploads_per_s for window in unlimited),
        tuple(window.uploads_per_s for window in limited),
    )

    # Room for the warm-up, the window and the stop, and a little more: the table must not run
    # out before the window closes.
    room_s = args.rate_warmup_s + args.rate_window_s + 2 * STOP_MARGIN_S
    uploads_limit = round(
        limit_for(args.rate_share, kept.unlimited_median, small.rows_below_cutoff, room_s), 1
    )
    uploads = run(
        "uploads-limited",
        small,
        args.rate_window_s,
        ("--max-uploads-per-second", str(uploads_limit)),
    )
    uploads_verdict = LimitVerdict(
        uploads_limit,
        uploads.uploads_per_s,
        uploads.seconds,
        args.rate_window_s,
        share=uploads_limit / kept.unlimited_median,
    )

    large_unlimited = run("large-unlimited", large, unlimited_window)
    bytes_limit = round(
        limit_for(args.rate_share, large_unlimited.bytes_per_s, large.bytes_below_cutoff, room_s)
    )
    limited_bytes = run(
        "bytes-limited",
        large,
        args.rate_window_s,
        ("--max-bytes-per-second", str(bytes_limit)),
    )
    bytes_verdict = LimitVerdict(
        bytes_limit,
        limited_bytes.bytes_per_s,
        limited_bytes.seconds,
        args.rate_window_s,
        share=bytes_limit / large_unlimited.bytes_per_s,
    )
    return {
        "concurrency": args.rate_concurrency,
        "share": args.rate_share,
        "window_s": args.rate_window_s,
        "warmup_s": args.rate_warmup_s,
        "measured_by": "backfill checkpoint events every 1 s (uploaded, bytes_uploaded) and "
        "their log timestamps",
        "databases": {"small": small.as_json(), "large": large.as_json()},
        "above_factor": ABOVE_FACTOR,
        "kept": kept.as_json(),
        "uploads_per_s": uploads_verdict.as_json(),
        "bytes_per_s": bytes_verdict.as_json(),
        "runs": runs,
    }


def rate_limit_report(section: Mapping[str, Any]) -> str:
    """The section as text: one table of the runs, then the verdicts."""
    runs = section["runs"]

    def limits(run: Mapping[str, Any]) -> str:
        given = dict(zip(run["limits"][::2], run["limits"][1::2], strict=True))
        shown = []
        if "--max-uploads-per-second" in given:
            shown.append(f"{float(given['--max-uploads-per-second']):,.0f}/s")
        if "--max-bytes-per-second" in given:
            shown.append(f"{int(given['--max-bytes-per-second']) / MIB:,.1f} MiB/s")
        return ", ".join(shown) or "none"

    rows = [
        [
            label,
            limits(run),
            f"{run['window']['seconds']:.1f}",
            f"{run['window']['uploads_per_s']:,.1f}",
            f"{run['window']['bytes_per_s'] / MIB:,.2f}",
            f"{run['summary']['cpu_ms_per_object']:.3f}",
        ]
        for label, run in runs.items()
    ]
    headers = ["run", "limits", "window s", "uploads/s", "MiB/s", "CPU ms/obj"]
    verdict = {True: "yes", False: "NO"}
    kept = section["kept"]
    lines = [
        f"rate limits (tuned concurrency up to {section['concurrency']}; rates over a window"
        f" after {section['warmup_s']:g} s, from the run's own checkpoints):",
        format_table(headers, rows),
    ]
    for name, unit in (("uploads_per_s", "uploads/s"), ("bytes_per_s", "bytes/s")):
        held = section[name]
        lines.append(
            f"{unit} limit {_rate(name, held['limit'])}"
            f" ({held['share_of_unlimited']:.2f} x unlimited):"
            f" {_rate(name, held['achieved'])} over {held['window_s']:.1f} s,"
            f" {held['error_pct']:+.2f}%; within {100 * LIMIT_TOLERANCE:g}% over"
            f" {section['window_s']:g} s: {verdict[held['holds']]}"
        )
    lines.append(
        f"limits {section['above_factor']}x above the unlimited rate:"
        f" {_rates(kept['limited_uploads_per_s'])} uploads/s against"
        f" {_rates(kept['unlimited_uploads_per_s'])} unlimited (noise {100 * kept['noise']:.1f}%):"
        f" {kept['ratio']:.3f} x by medians; >= {KEPT_SHARE} (or within the noise):"
        f" {verdict[kept['holds']]}"
    )
    return "\n".join(lines)


def _rate(name: str, value: float) -> str:
    return f"{value:,.1f}/s" if name == "uploads_per_s" else f"{value / MIB:,.2f} MiB/s"


def _rates(values: Sequence[float]) -> str:
    return ", ".join(f"{value:,.1f}" for value in values)
