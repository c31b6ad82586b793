"""One table renderer for everything this project prints as a table: the run summary, the dry
run's estimates, the benchmark reports and the live progress view.

``build_table`` makes a ``rich`` table (header, a rule, the rows, and an optional total set off
by a second rule); the live view redraws it on a terminal. ``render_table`` turns one into plain
text without colour or terminal codes, as wide as its content (never wrapped), so it reads the
same in a terminal, a pod log or a results file. The first ``left_columns`` columns are text and
left-aligned, the rest are numbers and right-aligned. Nothing here holds a resource.
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
) -> Table:
    """A table of ``rows`` under ``columns``; ``total``, when given, is the last line."""
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


def render_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    total: Sequence[object] | None = None,
    left_columns: int = 1,
    title: str | None = None,
) -> str:
    """The table as plain text, one line per row, trailing spaces removed."""
    table = build_table(columns, rows, total=total, left_columns=left_columns, title=title)
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
