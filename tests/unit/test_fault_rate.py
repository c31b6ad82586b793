"""The fault proxy's rate throttle: a token bucket driven by explicit times."""

from __future__ import annotations

import pytest

from devenv.faults import FaultPlan, RateGate


def test_the_gate_admits_its_burst_then_its_rate() -> None:
    gate = RateGate(rate_per_s=100, burst=10, now=0.0)
    assert [gate.admit(0.0) for _ in range(12)] == [True] * 10 + [False] * 2
    assert gate.admit(0.005) is False  # half a token back
    assert gate.admit(0.010) is True  # one token back
    admitted = sum(gate.admit(0.010 + step / 1000) for step in range(1, 1001))
    assert admitted == 100  # one second at 1,000 requests/s: the rate gets through


def test_the_bucket_never_holds_more_than_its_burst() -> None:
    gate = RateGate(rate_per_s=100, burst=10, now=0.0)
    assert sum(gate.admit(60.0) for _ in range(50)) == 10


def test_a_plan_gate_holds_a_tenth_of_a_second_at_least_one() -> None:
    fast = RateGate.for_plan(FaultPlan(max_rate_per_s=500))
    slow = RateGate.for_plan(FaultPlan(max_rate_per_s=2))
    assert fast is not None
    assert slow is not None
    assert (fast.burst, slow.burst) == (50, 1)
    assert RateGate.for_plan(FaultPlan()) is None


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf")])
def test_a_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="max_rate_per_s"):
        FaultPlan(max_rate_per_s=rate)
