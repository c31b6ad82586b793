"""ByteBudget: a cap on the value bytes held in memory at once (``--backfill-max-inflight-bytes``).

``acquire(n)`` waits until ``n`` more bytes fit under the capacity; a single request larger than
the whole capacity is let through alone (when nothing else is held), so a 40 MiB value with a
32 MiB cap still moves, one at a time. Waiters are served in order. ``release`` is synchronous so
it can sit in ``finally``.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """Bytes in use, bounded by ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1 byte")
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, amount: int) -> bool:
        return self.used + amount <= self.capacity or self.used == 0

    async def acquire(self, amount: int) -> None:
        """Wait until ``amount`` bytes fit, then hold them."""
        if not self._waiters and self._fits(amount):
            self.used += amount
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.append(entry)
        try:
            await waiter  # the bytes are counted as ours when the waiter is woken
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(amount)
            elif entry in self._waiters:  # a release may have dropped it already
                self._waiters.remove(entry)
            raise

    def release(self, amount: int) -> None:
        """Give bytes back and wake whoever now fits."""
        self.used -= amount
        while self._waiters and self._fits(self._waiters[0][0]):
            amount_waiting, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += amount_waiting
                waiter.set_result(None)
