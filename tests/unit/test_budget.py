"""The byte budget and the upload slot pool: a waiter cancelled in any state takes nothing."""

from __future__ import annotations

import asyncio

import pytest

from layer_cache.budget import ByteBudget
from layer_cache.concurrency import SlotPool


async def test_a_budget_waiter_cancelled_then_passed_over_by_a_release_leaves_cleanly() -> None:
    """A stop cancels the producer while it waits for bytes, and a finishing upload releases
    before the producer resumes: the release drops the cancelled waiter, which must not fail
    looking for itself."""
    budget = ByteBudget(10)
    await budget.acquire(10)
    waiting = asyncio.create_task(budget.acquire(5))
    await asyncio.sleep(0)

    waiting.cancel()
    budget.release(10)

    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert budget.used == 0
    await asyncio.wait_for(budget.acquire(10), timeout=1)


async def test_a_slot_waiter_cancelled_then_passed_over_by_a_release_leaves_cleanly() -> None:
    pool = SlotPool(1)
    await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)

    waiting.cancel()
    pool.release()

    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.in_use == 0
    await asyncio.wait_for(pool.acquire(), timeout=1)
