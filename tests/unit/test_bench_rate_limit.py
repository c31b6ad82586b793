"""The rate-limit section's reading of a run (``bench.rate_limit``): checkpoints from the
product's JSON log, the steady window, and the verdicts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bench.rate_limit import (
    CHECKPOINT,
    STARTED,
    STOPPING,
    Checkpoint,
    KeptVerdict,
    LimitVerdict,
    RunLog,
    limit_for,
    rate_limit_report,
    read_run_log,
    steady_window,
    whole_run,
)

ORIGIN = datetime(2026, 12, 6, 23, 0, 0, tzinfo=UTC)


def line(event: str, at_s: float, **fields: Any) -> str:
    """A JSON log line as the product writes it, ``at_s`` seconds after ``ORIGIN``."""
    timestamp = (ORIGIN + timedelta(seconds=at_s)).isoformat().replace("+00:00", "Z")
    return json.dumps({"event": event, "timestamp": timestamp, "level": "info", **fields})


def checkpoint_line(at_s: float, uploaded: int, bytes_uploaded: int = 0) -> str:
    return line(
        CHECKPOINT, at_s, cache_type="cas", uploaded=uploaded, bytes_uploaded=bytes_uploaded
    )


def test_a_runs_checkpoints_are_read_relative_to_the_start_until_the_stop() -> None:
    lines = [
        "not json: a library's warning",
        line("starting backfill", 0.1, cache_type="cas"),
        line(STARTED, 0.5),
        checkpoint_line(1.5, 100, 409_600),
        checkpoint_line(2.5, 300, 1_228_800),
        line(STOPPING, 2.9, grace_period_s=20),
        checkpoint_line(3.5, 310, 1_269_760),
    ]

    log = read_run_log(lines)

    assert log.checkpoints == [
        Checkpoint(1.0, 100, 409_600),
        Checkpoint(2.0, 300, 1_228_800),
        Checkpoint(3.0, 310, 1_269_760),
    ]
    assert log.stop_at_s == pytest.approx(2.4)


def test_a_log_without_one_start_or_of_two_caches_is_refused() -> None:
    with pytest.raises(ValueError, match="one 'starting backfill for all cache types'"):
        read_run_log([checkpoint_line(1.0, 5)])
    two_caches = [
        line(STARTED, 0.0),
        checkpoint_line(1.0, 5),
        line(CHECKPOINT, 1.0, cache_type="workspace_snapshot", uploaded=1, bytes_uploaded=1),
    ]
    with pytest.raises(ValueError, match="walk one cache"):
        read_run_log(two_caches)


def every_second(seconds: int, per_s: int, *, stop_at_s: float | None = None) -> RunLog:
    return RunLog(
        [Checkpoint(float(at), at * per_s, at * per_s * 4096) for at in range(1, seconds + 1)],
        stop_at_s,
    )


def test_the_window_starts_after_the_warmup_and_lasts_the_window() -> None:
    window = steady_window(every_second(80, 100), warmup_s=5, window_s=60)

    assert (window.start.at_s, window.end.at_s, window.seconds) == (5.0, 65.0, 60.0)
    assert window.uploads_per_s == 100
    assert window.bytes_per_s == 409_600
    assert window.as_json()["uploads"] == 6000


def test_the_window_ends_at_the_stop_when_the_run_is_shorter() -> None:
    window = steady_window(every_second(80, 100, stop_at_s=40.5), warmup_s=5, window_s=60)

    assert (window.start.at_s, window.end.at_s) == (5.0, 40.0)


def test_a_run_shorter_than_its_warmup_is_measured_from_its_first_checkpoint() -> None:
    window = steady_window(every_second(3, 50), warmup_s=5, window_s=60)
    assert (window.start.at_s, window.end.at_s) == (1.0, 3.0)
    with pytest.raises(ValueError, match="fewer than two checkpoints"):
        steady_window(every_second(1, 50), warmup_s=5, window_s=60)


def test_a_run_too_short_for_checkpoints_is_measured_over_its_timed_section() -> None:
    window = whole_run({"seconds": 2.0, "objects_uploaded": 300, "bytes_uploaded": 3_000_000})
    assert (window.seconds, window.uploads_per_s, window.bytes_per_s) == (2.0, 150.0, 1_500_000)


@pytest.mark.parametrize(
    ("achieved", "window_s", "holds"),
    [(95.0, 60.0, True), (105.0, 59.0, True), (94.9, 60.0, False), (100.0, 58.9, False)],
)
def test_a_limit_holds_within_five_percent_over_the_whole_window(
    achieved: float, window_s: float, holds: bool
) -> None:
    verdict = LimitVerdict(100.0, achieved, window_s, 60.0, share=0.5)
    assert verdict.holds is holds
    assert verdict.as_json()["error_pct"] == pytest.approx(achieved - 100, abs=0.01)


def test_throughput_kept_is_judged_by_medians_against_the_share_or_the_noise() -> None:
    kept = KeptVerdict(unlimited=(100.0, 90.0, 110.0), limited=(96.0, 94.0))
    assert kept.ratio == pytest.approx(0.95)
    assert kept.noise == pytest.approx(0.2)
    assert kept.holds
    within_noise = KeptVerdict(unlimited=(100.0, 80.0, 120.0), limited=(70.0, 90.0))
    assert within_noise.ratio == pytest.approx(0.8)
    assert within_noise.holds
    assert not KeptVerdict(unlimited=(100.0, 99.0, 101.0), limited=(94.0, 94.0)).holds


def test_a_limit_is_its_share_unless_the_table_would_run_out() -> None:
    assert limit_for(0.5, 800.0, available=100_000, room_s=70) == 400.0
    assert limit_for(0.5, 800.0, available=14_000, room_s=70) == 200.0


def test_the_report_shows_each_run_and_each_verdict() -> None:
    window = {"seconds": 60.0, "uploads_per_s": 400.0, "bytes_per_s": 1_638_400.0}
    summary = {"cpu_ms_per_object": 1.2}
    section = {
        "concurrency": 64,
        "warmup_s": 5.0,
        "window_s": 60.0,
        "above_factor": 10,
        "runs": {
            "unlimited-1": {"summary": summary, "window": window, "limits": []},
            "uploads-limited": {
                "summary": summary,
                "window": window,
                "limits": ["--max-uploads-per-second", "400.0"],
            },
            "bytes-limited": {
                "summary": summary,
                "window": window,
                "limits": ["--max-bytes-per-second", "1638400"],
            },
        },
        "uploads_per_s": LimitVerdict(400.0, 398.0, 60.0, 60.0, share=0.5).as_json(),
        "bytes_per_s": LimitVerdict(1_638_400, 1_700_000, 60.0, 60.0, share=0.3).as_json(),
        "kept": KeptVerdict((800.0, 790.0), (805.0,)).as_json(),
    }

    report = rate_limit_report(section).splitlines()

    assert [row.split()[:2] for row in report[3:6]] == [
        ["unlimited-1", "none"],
        ["uploads-limited", "400/s"],
        ["bytes-limited", "1.6"],
    ]
    assert report[6] == (
        "uploads/s limit 400.0/s (0.50 x unlimited): 398.0/s over 60.0 s, -0.50%;"
        " within 5% over 60 s: yes"
    )
    assert report[7].startswith("bytes/s limit 1.56 MiB/s (0.30 x unlimited): 1.62 MiB/s")
    assert report[7].endswith("+3.76%; within 5% over 60 s: yes")
    assert report[8] == (
        "limits 10x above the unlimited rate: 805.0 uploads/s against 800.0, 790.0 unlimited"
        " (noise 1.3%): 1.013 x by medians; >= 0.95 (or within the noise): yes"
    )
