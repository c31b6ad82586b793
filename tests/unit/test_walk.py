from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layer_cache.budget import ByteBudget
from layer_cache.pg import RowRef
from layer_cache.s3 import StoredObject, content_md5, etag_contradicts
from migrations_mode.bucket_index import UNKNOWN, BucketIndex, ListingWindow
from migrations_mode.display import RateMeter, eta_seconds
from migrations_mode.tables import format_duration
from migrations_mode.walk import KeyRange, Shard, plan_chunks

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@given(
    key=st.text(alphabet="0123456789abcdef", min_size=1, max_size=64),
    count=st.integers(min_value=1, max_value=64),
)
def test_every_key_falls_in_exactly_one_shard(key: str, count: int) -> None:
    owners = [i for i in range(count) if Shard(i, count).key_range.contains(key)]
    assert len(owners) == 1


def test_shard_ranges_split_the_hex_space_evenly() -> None:
    assert [Shard(i, 4).key_range for i in range(4)] == [
        KeyRange(None, "4000"),
        KeyRange("4000", "8000"),
        KeyRange("8000", "c000"),
        KeyRange("c000", None),
    ]
    assert Shard(1, 4).label == "1-of-4"
    assert Shard(1, 4).done_ratio("6000") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shard index"):
        Shard(4, 4)


def row(key: str, size: int) -> RowRef:
    return RowRef(key, NOW, size)


def test_chunks_stay_under_the_byte_cap_and_big_rows_travel_alone() -> None:
    rows = [row("a", 4), row("b", 4), row("c", 30), row("d", 1), row("e", 1), row("f", 1)]
    chunks = [[r.key for r in chunk] for chunk in plan_chunks(rows, max_bytes=10, max_rows=2)]
    assert chunks == [["a", "b"], ["c"], ["d", "e"], ["f"]]


def test_listing_window_answers_present_absent_and_unknown() -> None:
    window = ListingWindow(start_after="aa")
    first, third = StoredObject(5, "e1"), StoredObject(7, "e3")
    window.add([("ab/01", first), ("ab/03", third)], exhausted=False)
    assert window.stored("ab/01") == first
    assert window.stored("ab/02") is None  # inside what was listed: absent
    assert window.stored("ab/09") is UNKNOWN  # beyond the listing so far
    assert window.drop_through("ab/02") == [("ab/01", first)]
    assert window.stored("ab/01") is UNKNOWN  # already passed: the caller must HEAD
    window.add([], exhausted=True)
    assert window.stored("zz") is None


async def test_bucket_index_lists_only_as_far_as_each_page_needs() -> None:
    a1, a2, b1 = StoredObject(1, "x"), StoredObject(2), StoredObject(3, "y")
    pages = {
        None: ([("a/1", a1), ("a/2", a2)], "t1"),
        "t1": ([("b/1", b1)], None),
    }
    calls: list[str | None] = []

    async def list_page(
        start_after: str | None, token: str | None
    ) -> tuple[list[tuple[str, StoredObject]], str | None]:
        calls.append(token)
        return pages[token]

    index = BucketIndex(list_page, start_after=None, stop_at=None)
    found, unmatched = await index.objects_for(["a/1", "a/15"])
    assert (found, unmatched, calls) == ([a1, None], [], [None])
    found, unmatched = await index.objects_for(["b/0", "b/1"])
    assert (found, unmatched, index.requests) == ([None, b1], [("a/2", a2)], 2)
    assert await index.objects_for(["c/1"]) == ([None], [])
    assert index.requests == 2  # exhausted: no more requests, ever


def test_a_listed_etag_vouches_for_content_only_when_it_is_the_rows_md5() -> None:
    md5 = hashlib.md5(b"value").hexdigest()
    assert StoredObject.from_response(5, f'"{md5.upper()}"').etag_vouches_for(md5)
    assert not StoredObject(5, md5).etag_vouches_for(None)
    assert not StoredObject(5, "0" * 32).etag_vouches_for(md5)  # SSE-KMS looks like this too
    assert not StoredObject(5, f"{md5}-2").etag_vouches_for(md5)  # multipart
    assert not StoredObject(5, None).etag_vouches_for(md5)


def test_etag_check_catches_a_stored_body_that_differs() -> None:
    body = b"value bytes"
    good = f'"{hashlib.md5(body).hexdigest()}"'
    assert not etag_contradicts(good, body)
    assert etag_contradicts(good, body + b"!")
    assert not etag_contradicts('"abc-2"', body)  # multipart or KMS: not an MD5, not judged
    assert not etag_contradicts(None, body)
    assert content_md5(b"") == "1B2M2Y8AsgTpgAmY7PhCfg=="


async def test_byte_budget_bounds_bytes_in_flight_and_lets_a_big_value_through_alone() -> None:
    budget = ByteBudget(10)
    await budget.acquire(6)
    waiter = asyncio.create_task(budget.acquire(6))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert budget.used == 6
    budget.release(6)
    await asyncio.wait_for(waiter, 1)
    budget.release(6)
    await asyncio.wait_for(budget.acquire(50), 1)  # larger than the cap, alone
    assert budget.used == 50


def test_rate_and_eta() -> None:
    meter = RateMeter(window_s=60)
    meter.add(0.0, 0)
    meter.add(10.0, 500)
    assert meter.rate == 50.0
    assert eta_seconds(1000, meter.rate) == 20.0
    assert eta_seconds(1000, 0.0) is None
    assert eta_seconds(0, 0.0) == 0.0
    assert [format_duration(s) for s in (None, 42, 185, 3720)] == ["?", "42s", "3m05s", "1h02m"]
