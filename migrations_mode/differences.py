"""What a verification or a repair found: one record per object that is not its row's bytes.

``Difference`` is one finding: its kind (``missing``, ``size``, ``content`` or ``extra``: an
object no row accounts for), the sizes and digests seen (the row's MD5 as Postgres computes it,
the object's ETag, and the MD5 of its body when it was read), and whether the repair re-uploaded
it. ``DifferenceReport`` records each: as one JSON line in the ``--backfill-verify-report`` file
(line-buffered, so a killed run leaves every line it found), and as a warning for the first
``WARNINGS_PER_CACHE`` of each cache (the rest are only counted and in the report, so a badly
damaged bucket does not flood the log). ``open_difference_report`` opens the file, truncated
(one run, one report), and closes it when the run ends, whichever way it ends; without a path
the report only logs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TextIO

import structlog

from layer_cache.cache_types import CacheType

log = structlog.get_logger(__name__)

WARNINGS_PER_CACHE = 100


class DifferenceKind(StrEnum):
    """How an object differs from its row."""

    MISSING = "missing"  # no object for the row
    SIZE = "size"  # an object of another size
    CONTENT = "content"  # the same size, other bytes
    EXTRA = "extra"  # an object in the walked range that no row accounts for


@dataclass(frozen=True, slots=True)
class Difference:
    """One object that is not its row's bytes (or has no row)."""

    cache_type: CacheType
    key: str
    object_key: str
    kind: DifferenceKind
    row_size: int | None = None
    object_size: int | None = None
    row_md5: str | None = None
    object_etag: str | None = None
    object_md5: str | None = None  # of the body, when it was read
    repaired: bool = False

    def as_json(self) -> str:
        """One line of the report."""
        fields = asdict(self)
        fields["cache_type"] = self.cache_type.value
        fields["kind"] = self.kind.value
        return json.dumps(fields, separators=(",", ":"))


class DifferenceReport:
    """Records the differences of one run: report lines and (a bounded number of) warnings."""

    def __init__(self, stream: TextIO | None = None, path: Path | None = None) -> None:
        self._stream = stream
        self.path = path
        self.recorded: Counter[CacheType] = Counter()

    def record(self, difference: Difference) -> None:
        """Write the difference's line and, for the first ones of its cache, a warning."""
        if self._stream is not None:
            self._stream.write(difference.as_json() + "\n")
        self.recorded[difference.cache_type] += 1
        count = self.recorded[difference.cache_type]
        if count <= WARNINGS_PER_CACHE:
            log.warning(
                "verify: object has no row"
                if difference.kind is DifferenceKind.EXTRA
                else "verify: object missing"
                if difference.kind is DifferenceKind.MISSING
                else "verify: object differs",
                key=difference.key,
                object_key=difference.object_key,
                kind=difference.kind.value,
                row_size=difference.row_size,
                object_size=difference.object_size,
                repaired=difference.repaired,
            )
        if count == WARNINGS_PER_CACHE:
            log.warning(
                "verify: further differences are counted, not logged",
                logged=WARNINGS_PER_CACHE,
                report=None if self.path is None else str(self.path),
            )


@contextmanager
def open_difference_report(path: Path | None) -> Iterator[DifferenceReport]:
    """The run's report: written to ``path`` (created or truncated, line-buffered), or only
    logged without one. An unwritable path is an ``OSError`` raised before anything runs."""
    if path is None:
        yield DifferenceReport()
        return
    with path.open("w", encoding="utf-8", buffering=1) as stream:
        yield DifferenceReport(stream, path)
