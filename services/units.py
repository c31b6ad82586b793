"""Byte sizes as operators write them: ``65536``, ``64MiB``, ``64Mi``, ``1.5 GiB``, ``100MB``.

``parse_byte_size`` is pure. Binary units (``KiB``/``Ki``/``K``, ``MiB``/``Mi``/``M``, …) are
powers of 1024, as Kubernetes' ``Ki``/``Mi`` and most tools' ``K``/``M`` are; decimal units
(``kB``, ``MB``, ``GB``, ``TB``) are powers of 1000. Units ignore case. A fraction is allowed
where the product is a whole number of bytes (``1.5KiB`` = 1536). ``ByteSize`` is the pydantic
type for a setting that takes one: an int, or a string in this form.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "ki": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "ti": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$")

UNITS_HELP = "bytes, or with a unit: 64MiB, 64Mi, 1.5GiB, 100MB"


def parse_byte_size(text: str) -> int:
    """A whole number of bytes from ``text``; ``ValueError`` says what is accepted."""
    match = _SIZE.match(text)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a byte size; use {UNITS_HELP}")
    try:
        value = Decimal(match["number"]) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
        raise ValueError(f"{text!r} is not a byte size; use {UNITS_HELP}") from None
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def _byte_size(value: Any) -> Any:
    return parse_byte_size(value) if isinstance(value, str) else value


ByteSize = Annotated[int, BeforeValidator(_byte_size)]
"""An int setting that also takes ``64MiB``-style strings (validated by ``parse_byte_size``)."""
