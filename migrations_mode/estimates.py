"""How far a cache's walk is and how much is left, computed from a snapshot of its state.

``WalkState`` is taken by ``CacheBackfill`` whenever the gauges, the progress log line or the
live table ask; everything here is pure (no clock, no I/O), so it holds nothing to shut down.
"""

from __future__ import annotations

from dataclasses import dataclass

from migrations_mode.walk import Shard

# Below this share of the key space walked, an extrapolated total is too noisy to show.
EXTRAPOLATE_FROM_RATIO = 0.02


@dataclass(frozen=True, slots=True)
class WalkState:
    """One cache's walk at one moment."""

    completed: bool
    in_key_order: bool
    shard: Shard
    low_water_key: str | None  # the last key finished in walk order (None: none yet)
    rows_done: int  # finished in walk order, resumed runs included
    table_estimate: int | None  # the planner's row count for the whole table
    uploads_in_flight: int
    upload_limit: int
    checkpoint_lag_s: float  # cutoff minus the resumable checkpoint (0 in key order)

    def keyspace_done_ratio(self) -> float | None:
        """How far through this shard's key space the walk is (key order, hex keys only)."""
        if self.completed:
            return 1.0
        if not self.in_key_order:
            return None
        if self.low_water_key is None:
            return 0.0
        return self.shard.done_ratio(self.low_water_key)

    def rows_total_estimate(self) -> int | None:
        """Rows this cache walks: exact once complete; in key order, extrapolated from the share
        of the key space walked (hashes are uniform) once that share says something; else the
        planner's estimate for the table, split across shards."""
        if self.completed:
            return self.rows_done
        ratio = self.keyspace_done_ratio()
        if ratio is not None and ratio >= EXTRAPOLATE_FROM_RATIO:
            return max(round(self.rows_done / ratio), self.rows_done)
        if self.table_estimate is None:
            return None
        return max(self.table_estimate // self.shard.count, self.rows_done)

    def gauge_values(self) -> dict[str, float]:
        """The gauges' current values (see ``migrations_mode.progress``; absent = unknown)."""
        values: dict[str, float] = {
            "uploads_in_flight": self.uploads_in_flight,
            "upload_concurrency_limit": self.upload_limit,
        }
        if not self.in_key_order:
            values["checkpoint_lag_seconds"] = self.checkpoint_lag_s
        ratio = self.keyspace_done_ratio()
        if ratio is not None:
            values["keyspace_done_ratio"] = ratio
        total = self.rows_total_estimate()
        if total is not None:
            values["rows_total_estimate"] = total
            if ratio is not None:
                values["rows_remaining_estimate"] = round(total * (1 - ratio))
            else:
                values["rows_remaining_estimate"] = max(total - self.rows_done, 0)
        return values
