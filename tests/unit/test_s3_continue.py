"""services.s3_continue: which PUTs wait for 100 Continue, through the client's own request
building (no request is sent)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from services.s3_continue import (
    EXPECT_CONTINUE_MIN_BYTES,
    drop_expect_continue_for_small_bodies,
    expect_continue_only_for_large_bodies,
    keeps_expect_continue,
)
from tests.unit.conftest import RequestBuilt


@pytest.mark.parametrize(
    ("length", "keeps"),
    [
        (0, False),
        (4096, False),
        (EXPECT_CONTINUE_MIN_BYTES - 1, False),
        (EXPECT_CONTINUE_MIN_BYTES, True),
        (None, True),  # unknown length: botocore's choice stands
    ],
)
def test_only_large_or_unknown_bodies_keep_expect_continue(length: int | None, keeps: bool) -> None:
    assert keeps_expect_continue(length) is keeps


def test_the_handler_leaves_requests_without_the_header_alone() -> None:
    params: dict[str, Any] = {"headers": {"Content-MD5": "x"}, "body": io.BytesIO(b"small")}
    drop_expect_continue_for_small_bodies(params)
    assert params["headers"] == {"Content-MD5": "x"}


async def expect_headers(client: Any, bodies: list[bytes]) -> list[str | None]:
    """The ``Expect`` header of a PutObject of each body, as the client would send it."""
    sent: list[str | None] = []

    def capture(request: Any, **_: Any) -> None:
        value = request.headers.get("Expect")
        sent.append(value.decode() if isinstance(value, bytes) else value)
        raise RequestBuilt

    client.meta.events.register_first("before-send.s3", capture)
    for body in bodies:
        with pytest.raises(RequestBuilt):
            await client.put_object(Bucket="cas", Key="k", Body=body)
    client.meta.events.unregister("before-send.s3", capture)
    return sent


async def test_small_puts_stop_waiting_for_100_continue_large_ones_still_do(
    s3_client: Any,
) -> None:
    """botocore alone sets the header on every PUT body; after the change only large ones keep
    it. If an upgrade stops botocore from setting it, the first assertion says so."""
    bodies = [b"x", bytes(64 * 1024), bytes(EXPECT_CONTINUE_MIN_BYTES)]
    assert await expect_headers(s3_client, bodies) == ["100-continue"] * 3
    expect_continue_only_for_large_bodies(s3_client)
    expect_continue_only_for_large_bodies(s3_client)  # a second call registers nothing more
    assert await expect_headers(s3_client, bodies) == [None, None, "100-continue"]
