"""A fault-injecting HTTP proxy that sits between an S3 client and a real S3 test server.

``FaultProxy`` is an aiohttp server on a free loopback port with one catch-all route; for each
request it reads the whole body, consults the current ``FaultPlan`` (read per request, so a test
may swap it) and answers an S3 error (SlowDown, InternalError, ExpiredToken, InvalidRequest),
cuts the connection mid-body, or forwards the request intact (``Host`` as signed, body unchanged)
and relays the answer, optionally with a rewritten PUT ETag. It can also refuse a bucket (403
AccessDenied), answer conditional PUTs 501 NotImplemented or forward them without the condition,
as servers without conditional writes do, and damage PUT bodies on the way. Draws come from
``random.Random(plan.seed)``, two per covered request, so a seed and a request order give the
same faults; ``proxy.counts`` records every outcome before the client sees it. ``stop()`` closes
the listener, lets requests finish for ``stop_timeout_s``, then cancels (and counts) the rest and
closes the upstream session; it is idempotent. Full behaviour: ``docs/fault-proxy.md``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import logging
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Final, Self
from urllib.parse import unquote
from xml.sax.saxutils import escape, unescape

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = [
    "ACCESS_DENIED",
    "BAD_GATEWAY",
    "CANCELLED",
    "CONDITION_IGNORED",
    "DAMAGED",
    "ETAG_REWRITTEN",
    "EXPIRED_TOKEN",
    "FORWARDED",
    "INTERNAL_ERROR",
    "NOT_IMPLEMENTED",
    "REFUSED",
    "RESET",
    "SLOWDOWN",
    "UPSTREAM_ERROR",
    "ConditionalPuts",
    "EtagRewrite",
    "FaultPlan",
    "FaultProxy",
    "RateGate",
    "path_style_bucket",
    "path_style_object",
    "signing_access_key",
]

logger = logging.getLogger(__name__)

FORWARDED: Final = "forwarded"
ETAG_REWRITTEN: Final = "etag_rewritten"
EXPIRED_TOKEN: Final = "expired_token"
REFUSED: Final = "refused"
ACCESS_DENIED: Final = "access_denied"
NOT_IMPLEMENTED: Final = "not_implemented"
CONDITION_IGNORED: Final = "condition_ignored"
DAMAGED: Final = "damaged"
SLOWDOWN: Final = "slowdown"
INTERNAL_ERROR: Final = "internal_error"
RESET: Final = "reset"
UPSTREAM_ERROR: Final = "upstream_error"
CANCELLED: Final = "cancelled"
BAD_GATEWAY: Final = "BadGateway"

# RFC 9110 section 7.6.1, plus the non-standard Proxy-Connection. Headers named in a Connection
# header are hop-by-hop too. Expect is answered by the proxy itself (100-continue).
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED: Final = _HOP_BY_HOP | {"content-length", "expect"}
_NOT_RELAYED: Final = _HOP_BY_HOP | {"content-length"}
# Headers aiohttp's client would add on its own; the upstream must see only the client's.
_NO_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")

_SLOWDOWN_MESSAGE: Final = "Please reduce your request rate."
_INTERNAL_ERROR_MESSAGE: Final = "We encountered an internal error. Please try again."
_REFUSED_MESSAGE: Final = "The fault proxy refuses writes to this key."
_ACCESS_DENIED_MESSAGE: Final = "Access Denied"
_NOT_IMPLEMENTED_MESSAGE: Final = (
    "A header you provided implies functionality that is not implemented"
)

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024 * 1024
DEFAULT_UPSTREAM_TIMEOUT_S: Final = 60.0
DEFAULT_STOP_TIMEOUT_S: Final = 5.0
_FLUSH_TIMEOUT_S: Final = 5.0


class EtagRewrite(StrEnum):
    """How ``FaultPlan.put_etag`` rewrites a successful PUT's answer: which encryption it claims.

    Every rewrite replaces the ETag with a different 32-hex value; the encryption headers are
    those S3 sends for an object stored with that encryption.
    """

    PLAIN = "plain"
    """No encryption header: the answer says the stored bytes are not the ones sent."""
    SSE_KMS = "aws:kms"
    """``x-amz-server-side-encryption: aws:kms`` and a KMS key id."""
    DSSE_KMS = "aws:kms:dsse"
    """``x-amz-server-side-encryption: aws:kms:dsse`` and a KMS key id."""
    SSE_C = "sse-c"
    """``x-amz-server-side-encryption-customer-algorithm: AES256`` and the key's MD5."""

    @property
    def headers(self) -> dict[str, str]:
        """The response headers this rewrite adds."""
        if self is EtagRewrite.PLAIN:
            return {}
        if self is EtagRewrite.SSE_C:
            customer_key_md5 = hashlib.md5(b"fault-proxy customer key", usedforsecurity=False)
            return {
                "x-amz-server-side-encryption-customer-algorithm": "AES256",
                "x-amz-server-side-encryption-customer-key-MD5": base64.b64encode(
                    customer_key_md5.digest()
                ).decode("ascii"),
            }
        return {
            "x-amz-server-side-encryption": self.value,
            "x-amz-server-side-encryption-aws-kms-key-id": (
                "arn:aws:kms:us-east-1:000000000000:key/fault-proxy"
            ),
        }

    def etag(self, upstream_etag: str) -> str:
        """A quoted 32-hex ETag derived from (so, but for a 2^-128 chance, other than)
        ``upstream_etag``."""
        rewritten = hashlib.md5(f"{self.value}:{upstream_etag}".encode(), usedforsecurity=False)
        return f'"{rewritten.hexdigest()}"'


class ConditionalPuts(StrEnum):
    """What ``FaultPlan.conditional_puts`` does to a PUT carrying ``If-None-Match``."""

    NOT_IMPLEMENTED = "not_implemented"
    """Answer 501 ``NotImplemented``, never forwarded: a server without conditional writes
    (VersityGW before its 2025-09 release)."""
    IGNORED = "ignored"
    """Forward it without ``If-None-Match``: a server that ignores the condition and overwrites.
    The header is signed, so only a server that does not check signatures (moto) accepts it."""


@dataclass
class FaultPlan:
    """Which faults the proxy injects, and how often; validated when constructed."""

    slowdown_share: float = 0.0
    """Share of requests answered 503 SlowDown, never forwarded upstream."""
    internal_error_share: float = 0.0
    """Share of requests answered 500 InternalError, never forwarded upstream."""
    reset_share: float = 0.0
    """Share of requests forwarded, then cut off mid-body (before the response if bodiless)."""
    latency_s: tuple[float, float] = (0.0, 0.0)
    """Bounds of the uniform delay added before forwarding a request."""
    methods: frozenset[str] | None = None
    """HTTP methods the faults and latency apply to (upper-cased); ``None`` means all."""
    seed: int = 0
    """Seed of the ``random.Random`` the faults and delays are drawn from."""
    put_etag: EtagRewrite | None = None
    """Rewrite the ETag (and add encryption headers) of every PUT the upstream stored."""
    expired_access_keys: frozenset[str] = frozenset()
    """Access key ids whose requests are answered 400 ExpiredToken, never forwarded."""
    refused_keys: frozenset[str] = frozenset()
    """Object keys whose PUTs are answered 400 InvalidRequest (not retryable), never forwarded."""
    access_denied_buckets: frozenset[str] = frozenset()
    """Buckets whose every request is answered 403 AccessDenied, never forwarded."""
    conditional_puts: ConditionalPuts | None = None
    """Refuse (501) or strip the ``If-None-Match`` condition of every PUT that carries one."""
    damaged_puts: int = 0
    """The next this many PUTs with a body are forwarded with their last byte changed: a body
    damaged on the way, which a server that checks ``Content-MD5`` refuses and one that does not
    (moto) stores, answering the ETag of what it stored."""
    max_rate_per_s: float | None = None
    """Covered requests beyond this rate (a token bucket holding one tenth of a second's worth,
    at least one) are answered 503 SlowDown, never forwarded, as S3 throttles a prefix."""

    def __post_init__(self) -> None:
        if self.damaged_puts < 0:
            raise ValueError(f"damaged_puts must be >= 0: {self.damaged_puts}")
        if self.max_rate_per_s is not None and not (0 < self.max_rate_per_s < math.inf):
            raise ValueError(f"max_rate_per_s must be positive and finite: {self.max_rate_per_s}")
        shares = (self.slowdown_share, self.internal_error_share, self.reset_share)
        if any(not (0.0 <= share <= 1.0) for share in shares):
            raise ValueError(f"fault shares must lie in [0, 1], got {shares}")
        if math.fsum(shares) > 1.0 + 1e-9:
            raise ValueError(f"fault shares must add up to at most 1, got {shares}")
        low, high = self.latency_s
        if not (0.0 <= low <= high) or math.isinf(high):
            raise ValueError(f"latency_s must be finite (low, high), 0 <= low <= high: {low, high}")
        if self.methods is not None:
            self.methods = frozenset(method.upper() for method in self.methods)


class RateGate:
    """A token bucket: ``rate_per_s`` tokens a second, at most ``burst``; pure in ``now``."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._at = now

    def admit(self, now: float) -> bool:
        """Take a token if one is there at ``now`` (monotonic seconds)."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)
        self._at = max(self._at, now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    @classmethod
    def for_plan(cls, plan: FaultPlan) -> RateGate | None:
        """The gate ``plan.max_rate_per_s`` asks for, full; None without a rate."""
        if plan.max_rate_per_s is None:
            return None
        rate = plan.max_rate_per_s
        return cls(rate, max(1.0, rate / 10), time.monotonic())


class FaultProxy:
    """A fault-injecting HTTP proxy in front of ``upstream_url``; an async context manager.

    It listens on ``127.0.0.1:<free port>`` once started; see the module docstring.
    """

    def __init__(
        self,
        upstream_url: str,
        plan: FaultPlan,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        upstream_timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S,
        stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
    ) -> None:
        upstream = URL(upstream_url)
        if upstream.scheme not in {"http", "https"} or not upstream.host:
            raise ValueError(f"upstream_url must be an http(s) URL, got {upstream_url!r}")
        if upstream.path not in {"", "/"} or upstream.query_string or upstream.fragment:
            raise ValueError(f"upstream_url must have no path or query, got {upstream_url!r}")
        self.upstream_url = str(upstream.origin())
        self.counts: Counter[str] = Counter()
        self.operations: Counter[str] = Counter()  # forwarded requests by S3 operation
        self._plan = plan
        self._rng = random.Random(plan.seed)
        self._gate = RateGate.for_plan(plan)
        self._damage_left = plan.damaged_puts
        self._max_body_bytes = max_body_bytes
        self._upstream_timeout_s = upstream_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._url: str | None = None

    @property
    def plan(self) -> FaultPlan:
        """The plan applied to the next request; assigning one re-seeds the fault draws."""
        return self._plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._rng = random.Random(plan.seed)
        self._gate = RateGate.for_plan(plan)
        self._damage_left = plan.damaged_puts

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``; RuntimeError unless the proxy runs."""
        if self._url is None:
            raise RuntimeError("FaultProxy is not running")
        return self._url

    @property
    def running(self) -> bool:
        return self._url is not None

    async def start(self) -> None:
        """Open the upstream session and listen on a free loopback port; no-op if running."""
        if self._runner is not None:
            return
        try:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                skip_auto_headers=_NO_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=self._upstream_timeout_s),
            )
            app = web.Application(client_max_size=self._max_body_bytes)
            app.router.add_route("*", "/{path:.*}", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=self._stop_timeout_s)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            host, port = self._runner.addresses[0][:2]
            self._url = f"http://{host}:{port}"
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish, close everything; idempotent."""
        self._url = None
        runner, self._runner = self._runner, None
        try:
            if runner is not None:
                await runner.cleanup()  # requests finishing in the grace period need the session
        finally:
            session, self._session = self._session, None
            if session is not None:
                await session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # ----------------------------------------------------------------------------------------

    def _count(self, method: str, outcome: str) -> None:
        self.counts[outcome] += 1
        self.counts[f"{method}:{outcome}"] += 1

    def _draw(self, method: str) -> tuple[str, float]:
        """The outcome planned for a request, and the delay before forwarding it."""
        plan = self._plan
        if plan.methods is not None and method not in plan.methods:
            return FORWARDED, 0.0
        roll = self._rng.random()
        delay = self._rng.uniform(*plan.latency_s)
        threshold = plan.slowdown_share
        if roll < threshold:
            return SLOWDOWN, delay
        threshold += plan.internal_error_share
        if roll < threshold:
            return INTERNAL_ERROR, delay
        threshold += plan.reset_share
        if roll < threshold:
            return RESET, delay
        return FORWARDED, delay

    def _over_rate(self, method: str) -> bool:
        plan = self._plan
        if self._gate is None or (plan.methods is not None and method not in plan.methods):
            return False
        return not self._gate.admit(time.monotonic())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        method = request.method
        try:
            body = await request.read()
            if signing_access_key(request.headers, request.query) in self._plan.expired_access_keys:
                self._count(method, EXPIRED_TOKEN)
                return _s3_error(request, 400, "ExpiredToken", "The provided token has expired.")
            if path_style_bucket(request.raw_path) in self._plan.access_denied_buckets:
                self._count(method, ACCESS_DENIED)
                return _s3_error(request, 403, "AccessDenied", _ACCESS_DENIED_MESSAGE)
            if method == "PUT" and self._plan.refused_keys:
                target = path_style_object(request.raw_path)
                if target is not None and target[1] in self._plan.refused_keys:
                    self._count(method, REFUSED)
                    return _s3_error(request, 400, "InvalidRequest", _REFUSED_MESSAGE)
            conditional = method == "PUT" and "If-None-Match" in request.headers
            condition = self._plan.conditional_puts if conditional else None
            if condition is ConditionalPuts.NOT_IMPLEMENTED:
                self._count(method, NOT_IMPLEMENTED)
                return _s3_error(request, 501, "NotImplemented", _NOT_IMPLEMENTED_MESSAGE)
            planned, delay = self._draw(method)
            if planned != SLOWDOWN and self._over_rate(method):
                planned = SLOWDOWN
            if planned == SLOWDOWN:
                self._count(method, SLOWDOWN)
                return _s3_error(request, 503, "SlowDown", _SLOWDOWN_MESSAGE)
            if planned == INTERNAL_ERROR:
                self._count(method, INTERNAL_ERROR)
                return _s3_error(request, 500, "InternalError", _INTERNAL_ERROR_MESSAGE)
            if delay > 0:
                await asyncio.sleep(delay)
            dropped = {"if-none-match"} if condition is ConditionalPuts.IGNORED else set()
            damaged = method == "PUT" and bool(body) and self._damage_left > 0
            if damaged:
                self._damage_left -= 1
                body = body[:-1] + bytes([body[-1] ^ 0xFF])
            try:
                upstream = await self._forward(request, body, dropped)
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("fault proxy: %s %s upstream failed: %r", method, request.path, exc)
                self._count(method, UPSTREAM_ERROR)
                return _s3_error(request, 502, BAD_GATEWAY, f"Upstream request failed: {exc!r}")
            if planned == FORWARDED and self._plan.put_etag is not None:
                rewritten = _rewrite_put_etag(request, upstream, self._plan.put_etag)
                if rewritten is not None:
                    upstream, planned = rewritten, ETAG_REWRITTEN
                else:
                    upstream = _rewrite_read_etags(request, upstream, self._plan.put_etag)
            if planned == FORWARDED and damaged:
                planned = DAMAGED
            elif planned == FORWARDED and dropped:
                planned = CONDITION_IGNORED
            self._count(method, planned)
            self.operations[s3_operation(request)] += 1
            if planned == RESET:
                return await _reset(request, upstream)
            return await _relay(request, upstream)
        except asyncio.CancelledError:
            logger.warning("fault proxy: %s %s cancelled (proxy stopping)", method, request.path)
            self._count(method, CANCELLED)
            raise

    async def _forward(
        self, request: web.Request, body: bytes, dropped: set[str] | None = None
    ) -> _Upstream:
        assert self._session is not None
        headers = _without(request.headers, _NOT_FORWARDED | frozenset(dropped or ()))
        has_body = bool(body) or request.content_length is not None or _is_chunked(request)
        url = URL(self.upstream_url + request.raw_path, encoded=True)
        async with self._session.request(
            request.method,
            url,
            headers=headers,
            # BytesIO, not bytes: aiohttp warns (ResourceWarning) about large raw bytes bodies.
            data=io.BytesIO(body) if has_body else None,
            allow_redirects=False,
        ) as response:
            payload = await response.read()
            return _Upstream(response.status, response.reason, response.headers, payload)


@dataclass(frozen=True)
class _Upstream:
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes


def _rewrite_put_etag(
    request: web.Request, upstream: _Upstream, rewrite: EtagRewrite
) -> _Upstream | None:
    """The upstream answer to a stored PUT with its ETag rewritten; None for other answers."""
    if request.method != "PUT":
        return None
    return _with_rewritten_etag_header(upstream, rewrite)


def _with_rewritten_etag_header(upstream: _Upstream, rewrite: EtagRewrite) -> _Upstream | None:
    etag = upstream.headers.get("ETag")
    if upstream.status != 200 or etag is None:
        return None
    headers = CIMultiDict(upstream.headers)
    headers["ETag"] = rewrite.etag(etag)
    headers.update(rewrite.headers)
    return _Upstream(upstream.status, upstream.reason, CIMultiDictProxy(headers), upstream.body)


_LISTED_ETAG = re.compile(rb"<ETag>(.*?)</ETag>")


def _rewrite_read_etags(
    request: web.Request, upstream: _Upstream, rewrite: EtagRewrite
) -> _Upstream:
    """An encrypting bucket's ETags are the same wherever they are read: a stored object's HEAD
    and GET answers and the bucket's listings carry the ETag its PUT was answered with (derived
    from the upstream's, so the same object always has the same one). A ``PLAIN`` rewrite
    simulates one damaged upload, not a bucket: reads are left alone."""
    if rewrite is EtagRewrite.PLAIN or request.method not in ("GET", "HEAD"):
        return upstream
    if path_style_object(request.raw_path) is not None:
        return _with_rewritten_etag_header(upstream, rewrite) or upstream
    if upstream.status != 200 or "list-type" not in request.query:
        return upstream

    def replace(match: re.Match[bytes]) -> bytes:
        upstream_etag = unescape(match[1].decode())
        return f"<ETag>{escape(rewrite.etag(upstream_etag), {chr(34): '&quot;'})}</ETag>".encode()

    body = _LISTED_ETAG.sub(replace, upstream.body)
    headers = CIMultiDict(upstream.headers)
    headers["Content-Length"] = str(len(body))
    return _Upstream(upstream.status, upstream.reason, CIMultiDictProxy(headers), body)


def s3_operation(request: web.Request) -> str:
    """The S3 operation a path-style request is (for request counts), or ``other``."""
    on_object = path_style_object(request.raw_path) is not None
    method = request.method
    if method == "GET":
        if on_object:
            return "GetObject"
        return "ListObjectsV2" if "list-type" in request.query else "other"
    operations = {"HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
    return operations.get(method, "other") if on_object else "other"


def signing_access_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The access key id a SigV4 request is signed with (header or presigned URL), if any."""
    authorization = headers.get("Authorization", "")
    if authorization.startswith("AWS4-HMAC-SHA256 "):
        for part in authorization.removeprefix("AWS4-HMAC-SHA256 ").split(","):
            name, _, value = part.strip().partition("=")
            if name == "Credential":
                return value.split("/", 1)[0]
        return None
    credential = query.get("X-Amz-Credential")
    return credential.split("/", 1)[0] if credential else None


def path_style_bucket(raw_path: str) -> str | None:
    """The bucket a path-style request path names, percent-decoded; None for the service root."""
    bucket = raw_path.partition("?")[0].removeprefix("/").partition("/")[0]
    return unquote(bucket) if bucket else None


def path_style_object(raw_path: str) -> tuple[str, str] | None:
    """``(bucket, key)`` of a path-style request path (``/bucket/key?query``), percent-decoded;
    None when the path names no object (the service root or a bucket)."""
    path = raw_path.partition("?")[0].removeprefix("/")
    bucket, slash, key = path.partition("/")
    if not bucket or not slash or not key:
        return None
    return unquote(bucket), unquote(key)


def _is_chunked(request: web.Request) -> bool:
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _without(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    """``headers`` minus ``dropped`` and the headers the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    return CIMultiDict(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in dropped and name.lower() not in named
    )


def _response_head(request: web.Request, upstream: _Upstream) -> web.StreamResponse:
    """A response with the upstream status and headers, Content-Length set for ``request``."""
    headers = _without(upstream.headers, _NOT_RELAYED)
    if request.method == "HEAD" and "Content-Length" in upstream.headers:
        headers["Content-Length"] = upstream.headers["Content-Length"]
    else:
        headers["Content-Length"] = str(len(upstream.body))
    return web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)


async def _relay(request: web.Request, upstream: _Upstream) -> web.StreamResponse:
    response = _response_head(request, upstream)
    await response.prepare(request)
    if upstream.body and request.method != "HEAD":
        await response.write(upstream.body)
    await response.write_eof()
    return response


async def _reset(request: web.Request, upstream: _Upstream) -> web.StreamResponse:
    """Send the head and half the body (if there is a body), then abort the connection."""
    transport = request.transport
    response = _response_head(request, upstream)
    if transport is None:  # the client is gone already
        return response
    bodiless = request.method == "HEAD" or upstream.status in {204, 304} or not upstream.body
    if not bodiless:
        # abort() drops whatever the transport still buffers, so hand the partial body to the
        # kernel first: with a zero high-water mark the writer's drain() returns only once the
        # transport's buffer is empty (or the client has stopped reading for too long).
        transport.set_write_buffer_limits(high=0)
        writer = await response.prepare(request)
        await response.write(upstream.body[: len(upstream.body) // 2])
        if writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.drain(), _FLUSH_TIMEOUT_S)
    transport.abort()
    # aiohttp's finish_response() now fails to write to the closed transport, treats that as a
    # client disconnect (a ConnectionError it swallows) and ends the connection.
    return response


def _s3_error(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """An S3-style error response; HEAD gets the status and headers only, as S3 does."""
    request_id = uuid.uuid4().hex[:16].upper()
    headers = {"x-amz-request-id": request_id}
    if request.method == "HEAD":
        return web.Response(status=status, headers=headers)
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId></Error>"
    )
    return web.Response(
        status=status, headers=headers, body=body.encode(), content_type="application/xml"
    )
