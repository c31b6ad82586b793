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
    file_object_only_for_large_bodies,
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


def test_small_bodies_stay_bytes_large_ones_become_file_objects() -> None:
    small, large = b"x" * 4096, bytes(EXPECT_CONTINUE_MIN_BYTES)
    caller_file = io.BytesIO(b"from a caller")
    params: list[dict[str, Any]] = [
        {"Body": small},
        {"Body": "text"},
        {"Body": large},
        {"Body": caller_file},
        {"Key": "no-body"},
    ]
    for param in params:
        file_object_only_for_large_bodies(param)
    assert params[0]["Body"] is small
    assert params[1]["Body"] == b"text"
    assert isinstance(params[2]["Body"], io.BytesIO)
    assert params[2]["Body"].getvalue() == large
    assert params[3]["Body"] is caller_file
    assert params[4] == {"Key": "no-body"}


async def expect_headers(client: Any, bodies: list[Any]) -> list[str | None]:
    """The ``Expect`` header of a PutObject of each body, as the client would send it."""
    return [expect for expect, _ in await sent_bodies(client, bodies)]


async def sent_bodies(client: Any, bodies: list[Any]) -> list[tuple[str | None, Any]]:
    """(``Expect`` header, body as handed to the HTTP session) of a PutObject of each body."""
    sent: list[tuple[str | None, Any]] = []

    def capture(request: Any, **_: Any) -> None:
        value = request.headers.get("Expect")
        sent.append((value.decode() if isinstance(value, bytes) else value, request.body))
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


async def test_small_bodies_reach_the_http_session_as_the_bytes_they_were(
    s3_client: Any,
) -> None:
    """No file object, no proxy around it: the body aiohttp gets is the caller's ``bytes``.
    A file object from a caller keeps botocore's handling, without the wait when it is small."""
    small, large = patterned_bytes(4096), patterned_bytes(EXPECT_CONTINUE_MIN_BYTES)
    expect_continue_only_for_large_bodies(s3_client)
    sent = await sent_bodies(s3_client, [small, large, io.BytesIO(b"caller's file")])
    assert sent[0] == (None, small)
    assert sent[1][0] == "100-continue"
    assert isinstance(sent[1][1], io.IOBase)
    assert sent[2][0] is None
    assert isinstance(sent[2][1], io.IOBase)


def patterned_bytes(length: int) -> bytes:
    return bytes(index % 251 for index in range(length))
