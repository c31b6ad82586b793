"""Pure planning for the walk over a cache table: order, shard key ranges, value chunks.

``key`` order (the default) pages by primary-key range scans that start where the last stopped,
so Postgres reads each row about once without a ``created_at`` index, and rows come in their S3
object keys' order, which lets one bucket listing replace a HEAD per row; ``newest-first`` is
upstream's ``(created_at, key)`` descending, a full scan and top-N sort per page without an index.
Shards split the key space into ``count`` disjoint ranges on the first four hex digits (keys are
uniform hashes, so the shares are equal; the first range is open below and the last above, so
every string falls in exactly one). Chunks bound each value read by ``max_bytes`` (``octet_length``)
and ``max_rows``. Pure functions: nothing to start or shut down.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from layer_cache.pg import RowRef

_SHARD_SPACE = 16**4


class WalkOrder(StrEnum):
    """The order rows are walked in."""

    KEY = "key"
    NEWEST_FIRST = "newest-first"


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys ``low <= key < high``; None means unbounded on that side."""

    low: str | None = None
    high: str | None = None

    def contains(self, key: str) -> bool:
        """Whether a key falls in the range (bytewise comparison, as Python orders str)."""
        return (self.low is None or key >= self.low) and (self.high is None or key < self.high)


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard index must be in 0..{self.count - 1}, got {self.index}")

    @property
    def label(self) -> str:
        """A stable name for progress records, e.g. ``2-of-4``."""
        return f"{self.index}-of-{self.count}"

    @property
    def key_range(self) -> KeyRange:
        """This shard's keys."""
        return KeyRange(
            None if self.index == 0 else _boundary(self.index, self.count),
            None if self.index == self.count - 1 else _boundary(self.index + 1, self.count),
        )

    def done_ratio(self, key: str) -> float | None:
        """How far ``key`` is through this shard's share of the key space (None if not hex)."""
        try:
            point = int(key[:4].ljust(4, "0"), 16)
        except ValueError:
            return None
        low = self.index * _SHARD_SPACE // self.count
        high = (self.index + 1) * _SHARD_SPACE // self.count
        return min(max((point - low) / (high - low), 0.0), 1.0)


def _boundary(index: int, count: int) -> str:
    return format(index * _SHARD_SPACE // count, "04x")


def plan_chunks(rows: Sequence[RowRef], *, max_bytes: int, max_rows: int) -> Iterator[list[RowRef]]:
    """Consecutive groups of rows whose summed sizes stay within ``max_bytes`` (a larger single
    row forms a chunk of its own) and that hold at most ``max_rows`` rows."""
    chunk: list[RowRef] = []
    chunk_bytes = 0
    for row in rows:
        if chunk and (chunk_bytes + row.size > max_bytes or len(chunk) >= max_rows):
            yield chunk
            chunk, chunk_bytes = [], 0
        chunk.append(row)
        chunk_bytes += row.size
    if chunk:
        yield chunk
