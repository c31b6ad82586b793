"""The live progress table: its columns are the progress fields, and its last frame, drawn once
the run's outcomes are known, shows the summary's own figures."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console

from layer_cache.cache_types import CacheType
from migrations_mode.display import LiveProgress, progress_report
from migrations_mode.progress import CacheStats
from migrations_mode.summary import CacheOutcome, Status, format_summary_table


@dataclass
class FakeCache:
    """A cache as the display sees it: this run's stats, rows done in walk order (all runs)."""

    cache_type: CacheType
    stats: CacheStats
    rows_done: int
    completed: bool = False
    gauges: dict[str, float] = field(default_factory=dict)

    def gauge_values(self) -> dict[str, float]:
        return self.gauges


def test_progress_fields_say_this_runs_rows_apart_from_all_runs() -> None:
    stats = CacheStats(CacheType.CAS, processed=40, retries=Counter({"throttled": 3}))
    cache = FakeCache(
        CacheType.CAS,
        stats,
        rows_done=135,  # 100 by an earlier run, 35 of this run's 40 in walk order
        gauges={
            "rows_total_estimate": 1000,
            "rows_remaining_estimate": 865,
            "uploads_in_flight": 4,
            "upload_concurrency_limit": 9,
        },
    )

    fields = progress_report(cache, rate=20.0).as_fields()

    assert fields == {
        "processed": 40,
        "rows_done_all_runs": 135,
        "rows_total_estimate": 1000,
        "rows_remaining_estimate": 865,
        "percent_complete": 13.5,
        "recent_rows_per_s": 20.0,
        "eta_s": 43,
        "uploads_in_flight": 4,
        "upload_concurrency_limit": 9,
        "retried": 3,
        "status": "running",
    }


TITLE = "Layer cache backfill"


def last_frame(console: Console) -> list[list[str]]:
    """The cells of the rows of the last frame the display printed (no title, header, rule)."""
    *_, last = console.export_text().split(TITLE)
    lines = [line.split() for line in last.splitlines() if line.strip()]
    header, rule, *rows = lines
    assert header[:2] == ["cache", "processed"], lines
    assert set(rule[0]) == {"─"}, lines
    return rows


def summary_rows(table: str) -> dict[str, list[str]]:
    return {
        cells[0]: cells
        for cells in (line.split() for line in table.splitlines()[2:])
        if cells and cells[0] in {c.value for c in CacheType}
    }


async def test_the_last_frame_after_an_interrupt_shows_the_summarys_counts() -> None:
    # Interrupted: 57 rows processed, but only 50 finished in walk order (7 finished out of
    # order past a row that never ran); the walk was resumed, so all runs did 250.
    interrupted = FakeCache(
        CacheType.CAS,
        CacheStats(CacheType.CAS, processed=57, uploaded=57, retries=Counter({"transient": 2})),
        rows_done=250,
        gauges={"rows_total_estimate": 1000, "rows_remaining_estimate": 750},
    )
    # Already complete: nothing ran this run.
    complete = FakeCache(
        CacheType.CHANGE_BATCH,
        CacheStats(CacheType.CHANGE_BATCH),
        rows_done=300,
        completed=True,
        gauges={"rows_total_estimate": 300, "rows_remaining_estimate": 0},
    )
    console = Console(record=True, width=100, force_terminal=False, color_system=None)
    display = LiveProgress([interrupted, complete], console)
    task = asyncio.create_task(display.run())
    await asyncio.sleep(0.6)  # a redraw or two
    interrupted.stats.processed += 3  # the drain finished a few more
    interrupted.stats.uploaded += 3
    for cache in (interrupted, complete):
        cache.stats.finished_at = cache.stats.started_at + 2.0
    outcomes = [
        CacheOutcome(interrupted.stats, Status.INTERRUPTED),
        CacheOutcome(complete.stats, Status.COMPLETED, already_complete=True),
    ]

    display.finish(outcomes)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    last = last_frame(console)
    summary = summary_rows(format_summary_table(outcomes))
    cas, change_batch = last
    # cache, processed, left ~, %, rows/s, status (in the ETA column), in flight, retries
    assert cas == ["cas", "60", "750", "25.0", "30", "interrupted", "0/0", "2"]
    assert summary["cas"][1:3] == ["interrupted", "60"]
    assert summary["cas"][-1] == "30"
    assert change_batch == ["change_batch", "0", "0", "100.0", "-", "completed", "0/0", "0"]
    assert summary["change_batch"][1:3] == ["completed", "0"]
    assert summary["change_batch"][-1] == "-"
