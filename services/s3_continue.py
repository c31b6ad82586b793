"""PUT bodies below 2 MiB go out as they are: ``bytes``, without ``Expect: 100-continue``.

botocore turns every PutObject (and UploadPart) ``bytes`` body into a ``BytesIO`` first
(``botocore.handlers.convert_body_to_file_like_object``), and asks every file-object body to
wait for the server's ``100 Continue`` before it is sent (``add_expect_header``); aiohttp honours
that: the headers go out, the client waits for the interim answer, then sends the body. For the
layer cache's values, mostly a few KiB, that is one extra round trip to S3 per upload, and
about a tenth of the client CPU a small PUT costs (a second send, read and event-loop wake-up;
see docs/bench.md). The file object costs CPU of its own on the way: aiobotocore wraps it in a
proxy object, aiohttp looks its payload type up by a linear ``isinstance`` search through that
proxy, and the signer reads it back in chunks. The handshake only pays where a refused request
would otherwise push a large body for nothing, which is why the AWS SDKs for Go, Kotlin and
JavaScript send the header only from a threshold up (2 MiB in Go and Kotlin,
``ContinueHeaderThresholdBytes``).

``expect_continue_only_for_large_bodies(client)`` changes two handlers of one client:

- ``file_object_only_for_large_bodies`` takes the place of botocore's conversion: a ``bytes``
  or ``str`` body from ``EXPECT_CONTINUE_MIN_BYTES`` up becomes a ``BytesIO`` as before (so
  botocore still gives it ``Expect: 100-continue``); a shorter one stays ``bytes``, which botocore
  signs, sends and re-sends on a retry as it is.
- ``drop_expect_continue_for_small_bodies`` (registered last on ``before-call.s3``) removes the
  header from a file-object body that a caller passed in, when its length is known and below
  the threshold; a body of unknown length keeps it.

The header is not part of the SigV4 signature (botocore never signs ``Expect``), so nothing else
changes. Nothing is opened or closed here.
"""

from __future__ import annotations

import io
from typing import Any, Final

from botocore.handlers import convert_body_to_file_like_object
from botocore.utils import determine_content_length

EXPECT_CONTINUE_MIN_BYTES: Final = 2 * 1024 * 1024
_DROP_HANDLER_ID: Final = "si-layer-cache-expect-continue-only-for-large-bodies"
_BODY_HANDLER_ID: Final = "si-layer-cache-file-object-only-for-large-bodies"
# Where botocore registers convert_body_to_file_like_object (botocore.handlers).
_BODY_EVENTS: Final = (
    "before-parameter-build.s3.PutObject",
    "before-parameter-build.s3.UploadPart",
)


def keeps_expect_continue(body_length: int | None) -> bool:
    """Whether a request body of this many bytes (``None``: unknown) waits for 100 Continue."""
    return body_length is None or body_length >= EXPECT_CONTINUE_MIN_BYTES


def file_object_only_for_large_bodies(params: dict[str, Any], **_: Any) -> None:
    """A ``before-parameter-build`` handler: botocore's body conversion, for large bodies only."""
    body = params.get("Body")
    if isinstance(body, str):
        body = params["Body"] = body.encode("utf-8")
    if isinstance(body, bytes) and keeps_expect_continue(len(body)):
        params["Body"] = io.BytesIO(body)


def drop_expect_continue_for_small_bodies(params: dict[str, Any], **_: Any) -> None:
    """A ``before-call`` handler: remove ``Expect: 100-continue`` from a request whose body is
    known to be shorter than ``EXPECT_CONTINUE_MIN_BYTES``."""
    headers = params.get("headers")
    if not headers or "Expect" not in headers:
        return
    if not keeps_expect_continue(determine_content_length(params.get("body"))):
        del headers["Expect"]


def expect_continue_only_for_large_bodies(client: Any) -> None:
    """Have ``client`` (an S3 client) send small bodies as ``bytes`` and wait for 100 Continue
    only before large ones; calling it again changes nothing."""
    events = client.meta.events
    for event in _BODY_EVENTS:
        events.unregister(event, convert_body_to_file_like_object)
        events.register_last(
            event, file_object_only_for_large_bodies, unique_id=f"{_BODY_HANDLER_ID}-{event}"
        )
    events.register_last(
        "before-call.s3", drop_expect_continue_for_small_bodies, unique_id=_DROP_HANDLER_ID
    )
