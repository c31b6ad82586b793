"""One table renderer for everything this project prints as a table: the run summary, the dry
run's estimates, the benchmark reports and the live progress view.

``build_table`` makes a ``rich`` table (header, a rule, the rows, and an optional total set off
by a second rule); the live view redraws it on a terminal. ``render_table`` turns one into plain
text without colour or terminal codes, as wide as its content (never wrapped), so it reads the
same in a terminal, a pod log or a results file. The first ``left_columns`` columns are text and
left-aligned, the rest are numbers and right-aligned. The cell formats (``format_count``,
``format_bytes``, ``format_duration``) keep a number at most 7 characters wide whatever its size,
so a table's width does not grow with the run. Nothing here holds a resource.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import StringIO

from rich import box
from rich.console import Console
from rich.table import Table

_NO_WRAP_WIDTH = 10_000


def build_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    total: Sequence[object] | None = None,
    left_columns: int = 1,
    title: str | None = None,
    narrow: bool = False,
) -> Table:
    """A table of ``rows`` under ``columns``; ``total``, when given, is the last line;
    ``narrow`` puts two spaces between columns instead of three."""
    for row in [*rows, *([total] if total is not None else [])]:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns: {row!r}")
    table = Table(
        box=box.SIMPLE,
        show_edge=False,
        pad_edge=False,
        show_footer=total is not None,
        title=title,
        title_justify="left",
        collapse_padding=narrow,
    )
    for index, name in enumerate(columns):
        table.add_column(
            name,
            footer="" if total is None else str(total[index]),
            justify="left" if index < left_columns else "right",
            no_wrap=True,
        )
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def render_table(table: Table) -> str:
    """``table`` as plain text, one line per row, trailing spaces removed."""
    buffer = StringIO()
    console = Console(
        file=buffer,
        width=_NO_WRAP_WIDTH,
        color_system=None,
        force_terminal=False,
        highlight=False,
        emoji=False,
        markup=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


_EXACT_BELOW = 1_000_000
_COUNT_UNITS = ((1_000_000_000, "B"), (1_000_000, "M"))
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _significant(value: float, digits: int) -> str:
    """``value`` (at least 1) to ``digits`` significant digits, without exponent."""
    decimals = max(digits - len(str(int(value))), 0)
    shown = f"{value:.{decimals}f}"
    if decimals and len(shown) - 1 > digits:  # rounding added a digit: 9.996 -> 10.00
        shown = f"{value:.{decimals - 1}f}"
    return shown


def format_count(value: int) -> str:
    """Exact with thousands separators below a million (``999,999``), else four significant
    digits and M or B (``1.235M``, ``123.5M``, ``12.35B``): never wider than 7 characters
    below a trillion."""
    if value < _EXACT_BELOW:
        return f"{value:,}"
    for scale, unit in _COUNT_UNITS:
        if value >= scale:
            shown = _significant(value / scale, 4)
            if float(shown) >= 1000 and unit == "M":  # 999,999,999 rounds up to a billion
                return f"{_significant(value / 1_000_000_000, 4)}B"
            return f"{shown}{unit}"
    raise AssertionError("unreachable: every count of a million or more has a unit")


def format_bytes(value: int) -> str:
    """Binary units, three significant digits (``512B``, ``9.77KiB``, ``1.21GiB``, ``1023MiB``):
    never wider than 7 characters."""
    size = float(value)
    for unit in _BYTE_UNITS:
        if size < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value}B" if unit == "B" else f"{_significant(size, 3)}{unit}"
        size /= 1024
    raise AssertionError("unreachable: the last unit takes any size")


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s`` or ``?``."""
    if seconds is None:
        return "?"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
