"""Byte sizes as operators write them (``services.units``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.units import parse_byte_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("64MiB", 64 * 1024**2),
        ("64 MiB", 64 * 1024**2),
        ("64Mi", 64 * 1024**2),
        ("64M", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("100MB", 100_000_000),
        ("2kB", 2000),
        ("1Ti", 1024**4),
        ("512B", 512),
        (" 8Ki ", 8192),
    ],
)
def test_byte_sizes_take_binary_and_decimal_units(text: str, expected: int) -> None:
    assert parse_byte_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "64 MiBs", "-1", "1e6", "64 PiB", "0.5B", "1.0001KiB"])
def test_what_is_not_a_whole_byte_size_is_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"byte size|whole number"):
        parse_byte_size(text)


@given(st.integers(min_value=0, max_value=2**50))
def test_a_plain_integer_is_that_many_bytes(value: int) -> None:
    assert parse_byte_size(str(value)) == value
