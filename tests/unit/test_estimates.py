from __future__ import annotations

from dataclasses import replace

import pytest

from migrations_mode.estimates import EXTRAPOLATE_FROM_RATIO, WalkState
from migrations_mode.walk import Shard

KEY_ORDER = WalkState(
    completed=False,
    in_key_order=True,
    shard=Shard(),
    low_water_key=None,
    rows_done=0,
    table_estimate=None,
    uploads_in_flight=3,
    upload_limit=8,
    checkpoint_lag_s=0.0,
)
NEWEST_FIRST = replace(KEY_ORDER, in_key_order=False)


def test_key_order_ratio_is_zero_before_any_row_then_the_low_water_keys_share() -> None:
    assert KEY_ORDER.keyspace_done_ratio() == 0.0
    assert replace(KEY_ORDER, low_water_key="8000").keyspace_done_ratio() == 0.5
    assert replace(KEY_ORDER, low_water_key="not-hex").keyspace_done_ratio() is None


def test_second_shard_of_two_measures_its_own_half() -> None:
    state = replace(KEY_ORDER, shard=Shard(1, 2), low_water_key="c000")
    assert state.keyspace_done_ratio() == 0.5


def test_newest_first_has_no_ratio_until_complete_and_completion_is_exact() -> None:
    assert NEWEST_FIRST.keyspace_done_ratio() is None
    done = replace(NEWEST_FIRST, completed=True, rows_done=42, table_estimate=1000)
    assert done.keyspace_done_ratio() == 1.0
    assert done.rows_total_estimate() == 42


def test_total_extrapolates_from_the_key_space_once_the_share_says_something() -> None:
    early = replace(KEY_ORDER, low_water_key="0001", rows_done=5, table_estimate=900)
    ratio = early.keyspace_done_ratio()
    assert ratio is not None
    assert ratio < EXTRAPOLATE_FROM_RATIO
    assert early.rows_total_estimate() == 900  # too early: the planner's estimate
    quarter = replace(KEY_ORDER, low_water_key="4000", rows_done=250, table_estimate=900)
    assert quarter.rows_total_estimate() == 1000


def test_planner_estimate_is_split_across_shards_and_never_below_rows_done() -> None:
    sharded = replace(NEWEST_FIRST, shard=Shard(0, 4), table_estimate=1000, rows_done=100)
    assert sharded.rows_total_estimate() == 250
    assert replace(sharded, rows_done=300).rows_total_estimate() == 300
    assert replace(sharded, table_estimate=None).rows_total_estimate() is None


def test_newest_first_gauges_carry_the_lag_and_remaining_rows_from_rows_done() -> None:
    state = replace(NEWEST_FIRST, checkpoint_lag_s=12.5, table_estimate=1000, rows_done=400)
    assert state.gauge_values() == {
        "uploads_in_flight": 3,
        "upload_concurrency_limit": 8,
        "checkpoint_lag_seconds": 12.5,
        "rows_total_estimate": 1000,
        "rows_remaining_estimate": 600,
    }


def test_key_order_gauges_carry_the_ratio_and_remaining_rows_from_it() -> None:
    state = replace(KEY_ORDER, low_water_key="4000", rows_done=250)
    assert state.gauge_values() == {
        "uploads_in_flight": 3,
        "upload_concurrency_limit": 8,
        "keyspace_done_ratio": 0.25,
        "rows_total_estimate": 1000,
        "rows_remaining_estimate": 750,
    }


@pytest.mark.parametrize("state", [KEY_ORDER, NEWEST_FIRST])
def test_unknown_totals_leave_the_estimate_gauges_out(state: WalkState) -> None:
    gauges = replace(state, low_water_key=None).gauge_values()
    assert "rows_total_estimate" not in gauges
    assert "rows_remaining_estimate" not in gauges
