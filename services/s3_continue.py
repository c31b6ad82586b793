"""``Expect: 100-continue`` only on PUT bodies of 2 MiB and more.

botocore asks every PutObject (and UploadPart) whose body is a file object to wait for the
server's ``100 Continue`` before sending the body (``botocore.handlers.add_expect_header``;
S3's PutObject turns a ``bytes`` body into a file object first), and aiohttp honours it: the
headers go out, the client waits for the interim answer, then sends the body. For the layer
cache's values, mostly a few KiB, that is one extra round trip to S3 per upload, and about a
tenth of the client CPU a small PUT costs (a second send, read and event-loop wake-up; see
docs/bench.md). The handshake only pays where a refused request would otherwise push a large
body for nothing, which is why the AWS SDKs for Go, Kotlin and JavaScript send the header only
from a threshold up (2 MiB in Go and Kotlin, ``ContinueHeaderThresholdBytes``).

``expect_continue_only_for_large_bodies(client)`` registers one ``before-call.s3`` handler,
last, that removes the header botocore set when the body's length is known and below
``EXPECT_CONTINUE_MIN_BYTES``. botocore still decides where the header goes; a body of unknown
length keeps it. The header is not part of the SigV4 signature (botocore never signs
``Expect``), so nothing else changes. Nothing is opened or closed here.
"""

from __future__ import annotations

from typing import Any, Final

from botocore.utils import determine_content_length

EXPECT_CONTINUE_MIN_BYTES: Final = 2 * 1024 * 1024
_HANDLER_ID: Final = "si-layer-cache-expect-continue-only-for-large-bodies"


def keeps_expect_continue(body_length: int | None) -> bool:
    """Whether a request body of this many bytes (``None``: unknown) waits for 100 Continue."""
    return body_length is None or body_length >= EXPECT_CONTINUE_MIN_BYTES


def drop_expect_continue_for_small_bodies(params: dict[str, Any], **_: Any) -> None:
    """A ``before-call`` handler: remove ``Expect: 100-continue`` from a request whose body is
    known to be shorter than ``EXPECT_CONTINUE_MIN_BYTES``."""
    headers = params.get("headers")
    if not headers or "Expect" not in headers:
        return
    if not keeps_expect_continue(determine_content_length(params.get("body"))):
        del headers["Expect"]


def expect_continue_only_for_large_bodies(client: Any) -> None:
    """Have ``client`` (an S3 client) wait for 100 Continue only before large bodies; calling
    it again changes nothing."""
    client.meta.events.register_last(
        "before-call.s3", drop_expect_continue_for_small_bodies, unique_id=_HANDLER_ID
    )
