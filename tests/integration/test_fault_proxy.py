"""``devenv.faults.FaultProxy`` between aioboto3 and the session's real S3 server.

The client has botocore retries off, so every fault the proxy injects reaches the test as the
exception the product would see. aiohttp (aiobotocore's transport) still re-sends an idempotent
request once by itself when the connection drops before any response byte arrives (RFC 9112
section 9.3.1.1); the reset tests pin that down because it halves the reset faults a caller sees.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import aioboto3
import aiohttp
import pytest
from aiobotocore.config import AioConfig
from aiohttp import web
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from devenv.faults import ConditionalPuts, EtagRewrite, FaultPlan, FaultProxy
from devenv.process import free_port
from devenv.s3 import S3Endpoint, S3Server, create_buckets

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

MiB = 1024 * 1024
# Upper bound for any single operation: a fault must end in an exception, never in a hang.
OPERATION_TIMEOUT_S = 20.0

T = TypeVar("T")


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    name = f"faults-{uuid.uuid4().hex[:12]}"
    create_buckets(s3_server.endpoint, [name])
    return name


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(s3_server.endpoint.url, FaultPlan()) as running:
        yield running


@asynccontextmanager
async def client_via(url: str, endpoint: S3Endpoint) -> AsyncIterator[S3Client]:
    """An aioboto3 S3 client for ``url`` with ``endpoint``'s credentials and no retries."""
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        config=AioConfig(
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=OPERATION_TIMEOUT_S,
        ),
    ) as client:
        yield client


@pytest.fixture
async def proxied(proxy: FaultProxy, s3_server: S3Server) -> AsyncIterator[S3Client]:
    async with client_via(proxy.url, s3_server.endpoint) as client:
        yield client


async def bounded(operation: Awaitable[T]) -> T:
    return await asyncio.wait_for(operation, OPERATION_TIMEOUT_S)


async def get_bytes(client: S3Client, bucket: str, key: str, **kwargs: str) -> bytes:
    response = await client.get_object(Bucket=bucket, Key=key, **kwargs)  # type: ignore[arg-type]
    async with response["Body"] as stream:
        return await stream.read()


def error_of(exc: ClientError) -> tuple[str | None, int | None]:
    code = exc.response.get("Error", {}).get("Code")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


# --------------------------------------------------------------------------------------------
# No faults: a transparent proxy


async def test_without_faults_objects_pass_through_byte_for_byte(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    rng = random.Random(1)
    prefix = f"pass-{uuid.uuid4().hex[:8]}/"
    objects = {
        f"{prefix}big.bin": rng.randbytes(6 * MiB),
        f"{prefix}empty": b"",
        # A key that only survives if the path is forwarded exactly as the client quoted it.
        f"{prefix}odd key/ü+%&=;~*'()$,!.txt": b"small object with an odd key\n",
    }
    for key, data in objects.items():
        put = await bounded(
            proxied.put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                ContentMD5=content_md5(data),
                Metadata={"origin": "fault-proxy-test"},
            )
        )
        assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'

    for key, data in objects.items():
        assert await bounded(get_bytes(proxied, bucket, key)) == data
        assert await bounded(get_bytes(s3_client, bucket, key)) == data  # stored intact
        head = await bounded(proxied.head_object(Bucket=bucket, Key=key))
        assert head["ContentLength"] == len(data)
        assert head["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
        assert head["Metadata"] == {"origin": "fault-proxy-test"}

    big = objects[f"{prefix}big.bin"]
    ranged = await bounded(get_bytes(proxied, bucket, f"{prefix}big.bin", Range="bytes=10-1048585"))
    assert ranged == big[10:1048586]

    listing = await bounded(proxied.list_objects_v2(Bucket=bucket, Prefix=prefix))
    assert {item["Key"]: item["Size"] for item in listing.get("Contents", [])} == {
        key: len(data) for key, data in objects.items()
    }

    for key in objects:
        await bounded(proxied.delete_object(Bucket=bucket, Key=key))
    after = await bounded(s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix))
    assert after.get("KeyCount") == 0

    operations = 3 * 3 + 1 + 1 + 3  # put/get/head per object, range, list, deletes
    assert proxy.counts == Counter(
        {
            "forwarded": operations,
            "PUT:forwarded": 3,
            "GET:forwarded": 3 + 1 + 1,
            "HEAD:forwarded": 3,
            "DELETE:forwarded": 3,
        }
    )


@dataclass
class Captured:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


def sigv4_signature_matches(request: Captured, secret_key: str) -> bool:
    """Recompute the SigV4 signature of a received request from the headers it signed."""
    authorization = request.headers["authorization"]
    fields = dict(part.strip().split("=", 1) for part in authorization.split(" ", 1)[1].split(","))
    access_key, _date, region, service, _ = fields["Credential"].split("/")
    signed = {name: request.headers[name] for name in fields["SignedHeaders"].split(";")}
    aws_request = AWSRequest(
        method=request.method,
        url=f"http://{request.headers['host']}{request.raw_path}",
        headers=signed,
        data=request.body,
    )
    aws_request.context["timestamp"] = request.headers["x-amz-date"]
    auth = S3SigV4Auth(Credentials(access_key, secret_key), service, region)
    string_to_sign = auth.string_to_sign(aws_request, auth.canonical_request(aws_request))
    return bool(auth.signature(string_to_sign, aws_request) == fields["Signature"])


async def test_upstream_receives_the_client_host_and_a_valid_signature(
    s3_server: S3Server,
) -> None:
    # Neither moto nor s3rver checks SigV4 signatures, so a recording upstream checks them.
    received: list[Captured] = []

    async def record(request: web.Request) -> web.Response:
        received.append(
            Captured(
                request.method,
                request.raw_path,
                {name.lower(): value for name, value in request.headers.items()},
                await request.read(),
            )
        )
        return web.Response(status=204 if request.method == "DELETE" else 200)

    app = web.Application(client_max_size=16 * MiB)
    app.router.add_route("*", "/{path:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    endpoint = s3_server.endpoint
    try:
        async with (
            FaultProxy(f"http://127.0.0.1:{upstream_port}", FaultPlan()) as proxy,
            client_via(proxy.url, endpoint) as client,
        ):
            body = random.Random(2).randbytes(2 * MiB)  # large enough for Expect: 100-continue
            await bounded(
                client.put_object(
                    Bucket="b", Key="a b/ü+%.bin", Body=body, ContentMD5=content_md5(body)
                )
            )
            await bounded(client.head_object(Bucket="b", Key="k"))
            await bounded(client.delete_object(Bucket="b", Key="k"))
            proxy_host = proxy.url.removeprefix("http://")
    finally:
        await runner.cleanup()

    assert [request.method for request in received] == ["PUT", "HEAD", "DELETE"]
    put = received[0]
    assert put.body == body
    assert put.headers["content-length"] == str(len(body))
    assert put.headers["x-amz-content-sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in put.headers  # the proxy answered 100-continue itself
    for request in received:
        assert request.headers["host"] == proxy_host
        assert "accept-encoding" not in request.headers or (
            request.headers["accept-encoding"] == "identity"  # aiobotocore's own value
        )
        assert sigv4_signature_matches(request, endpoint.secret_key), request
    # The check is real: the request signed for the proxy fails once its Host is rewritten.
    rewritten = Captured(
        put.method, put.raw_path, {**put.headers, "host": f"127.0.0.1:{upstream_port}"}, put.body
    )
    assert not sigv4_signature_matches(rewritten, endpoint.secret_key)


# --------------------------------------------------------------------------------------------
# Error faults


@pytest.mark.parametrize(
    ("plan", "code", "status"),
    [
        (FaultPlan(slowdown_share=1.0), "SlowDown", 503),
        (FaultPlan(internal_error_share=1.0), "InternalError", 500),
    ],
    ids=["slowdown", "internal_error"],
)
async def test_error_faults_answer_s3_errors_without_reaching_upstream(
    proxy: FaultProxy,
    proxied: S3Client,
    s3_client: S3Client,
    bucket: str,
    plan: FaultPlan,
    code: str,
    status: int,
) -> None:
    key = f"err-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=f"{key}-existing", Body=b"x")
    proxy.plan = plan
    outcome = "slowdown" if code == "SlowDown" else "internal_error"

    with pytest.raises(ClientError) as put_error:
        await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"never stored"))
    assert error_of(put_error.value) == (code, status)
    with pytest.raises(ClientError) as get_error:
        await bounded(get_bytes(proxied, bucket, f"{key}-existing"))
    assert error_of(get_error.value) == (code, status)
    with pytest.raises(ClientError) as head_error:  # HEAD: no body, so the code is the status
        await bounded(proxied.head_object(Bucket=bucket, Key=f"{key}-existing"))
    assert error_of(head_error.value) == (str(status), status)

    assert proxy.counts == Counter(
        {outcome: 3, f"PUT:{outcome}": 1, f"GET:{outcome}": 1, f"HEAD:{outcome}": 1}
    )
    listing = await s3_client.list_objects_v2(Bucket=bucket, Prefix=key)
    assert [item["Key"] for item in listing.get("Contents", [])] == [f"{key}-existing"]


async def test_error_body_is_s3_xml(proxy: FaultProxy, bucket: str) -> None:
    proxy.plan = FaultPlan(slowdown_share=1.0)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.url}/{bucket}/some-key") as response:
            body = await response.read()
            assert response.status == 503
            assert response.content_type == "application/xml"
            request_id = response.headers["x-amz-request-id"]
        async with session.head(f"{proxy.url}/{bucket}/some-key") as head:
            assert head.status == 503
            assert await head.read() == b""
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(body)
    assert root.tag == "Error"
    assert root.findtext("Code") == "SlowDown"
    assert root.findtext("Message") == "Please reduce your request rate."
    assert root.findtext("RequestId") == request_id


async def test_upstream_failure_answers_502_bad_gateway(s3_server: S3Server) -> None:
    nothing_listens = f"http://127.0.0.1:{free_port()}"
    async with (
        FaultProxy(nothing_listens, FaultPlan()) as proxy,
        client_via(proxy.url, s3_server.endpoint) as client,
    ):
        with pytest.raises(ClientError) as error:
            await bounded(get_bytes(client, "bucket", "key"))
    assert error_of(error.value) == ("BadGateway", 502)
    assert proxy.counts == Counter({"upstream_error": 1, "GET:upstream_error": 1})


# --------------------------------------------------------------------------------------------
# Connection resets


async def test_reset_mid_body_raises_client_payload_error(
    proxy: FaultProxy, proxied: S3Client, bucket: str
) -> None:
    key = f"reset-{uuid.uuid4().hex[:8]}"
    data = random.Random(3).randbytes(MiB)
    proxy.plan = FaultPlan(reset_share=1.0, methods=frozenset({"get"}))
    await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=data))  # PUT: not covered

    response = await bounded(proxied.get_object(Bucket=bucket, Key=key))
    assert response["ContentLength"] == len(data)  # the head arrived intact
    # aiobotocore wraps only ClientConnectionError into ResponseStreamingError; an incomplete
    # body is an aiohttp.ClientPayloadError and reaches the caller unwrapped.
    async with response["Body"] as stream:
        with pytest.raises(aiohttp.ClientPayloadError):
            await bounded(stream.read())

    assert proxy.counts == Counter({"forwarded": 1, "PUT:forwarded": 1, "reset": 1, "GET:reset": 1})


ResetOperation = Callable[["S3Client", str, str], Awaitable[object]]


async def list_objects(client: S3Client, bucket: str, key: str) -> object:
    return await client.list_objects_v2(Bucket=bucket, Prefix=key)


async def head_object(client: S3Client, bucket: str, key: str) -> object:
    return await client.head_object(Bucket=bucket, Key=key)


async def put_object(client: S3Client, bucket: str, key: str) -> object:
    return await client.put_object(Bucket=bucket, Key=key, Body=b"reset me")


async def get_empty_object(client: S3Client, bucket: str, key: str) -> object:
    return await get_bytes(client, bucket, key)


@pytest.mark.parametrize(
    ("operation", "method", "attempts"),
    [
        # ListObjectsV2 has an XML body: cut mid-body; botocore reads it before returning.
        (list_objects, "GET", 1),
        # No body to cut: the connection drops before the response, and aiohttp re-sends
        # an idempotent request once on a fresh connection, which the proxy resets too.
        (head_object, "HEAD", 2),
        (put_object, "PUT", 2),
        (get_empty_object, "GET", 2),
    ],
    ids=["list-mid-body", "head-before-response", "put-before-response", "get-empty"],
)
async def test_reset_of_buffered_responses_raises_connection_closed_error(
    proxy: FaultProxy,
    proxied: S3Client,
    s3_client: S3Client,
    bucket: str,
    operation: ResetOperation,
    method: str,
    attempts: int,
) -> None:
    key = f"reset-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"")
    proxy.plan = FaultPlan(reset_share=1.0)

    with pytest.raises(ConnectionClosedError):
        await bounded(operation(proxied, bucket, key))

    assert proxy.counts == Counter({"reset": attempts, f"{method}:reset": attempts})


# --------------------------------------------------------------------------------------------
# ETag rewrites: answers as an encrypting bucket sends them


@pytest.mark.parametrize(
    ("rewrite", "encryption"),
    [
        (EtagRewrite.SSE_KMS, {"ServerSideEncryption": "aws:kms"}),
        (EtagRewrite.DSSE_KMS, {"ServerSideEncryption": "aws:kms:dsse"}),
        (EtagRewrite.SSE_C, {"SSECustomerAlgorithm": "AES256"}),
        (EtagRewrite.PLAIN, {}),
    ],
    ids=["sse-kms", "dsse-kms", "sse-c", "plain"],
)
async def test_put_etag_rewrite_changes_the_answer_not_the_stored_object(
    proxy: FaultProxy,
    proxied: S3Client,
    s3_client: S3Client,
    bucket: str,
    rewrite: EtagRewrite,
    encryption: dict[str, str],
) -> None:
    key = f"etag-{uuid.uuid4().hex[:8]}"
    data = b"stored as sent"
    md5_etag = f'"{hashlib.md5(data).hexdigest()}"'
    proxy.plan = FaultPlan(put_etag=rewrite)

    put = await bounded(
        proxied.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=content_md5(data))
    )
    assert put["ETag"] != md5_etag
    assert len(put["ETag"].strip('"')) == 32
    int(put["ETag"].strip('"'), 16)  # 32 hex digits, like an MD5
    for field, value in encryption.items():
        assert put.get(field) == value, put
    plain = rewrite is EtagRewrite.PLAIN
    if plain:
        assert "ServerSideEncryption" not in put
        assert "SSECustomerAlgorithm" not in put
    # The stored object is upstream's. An encrypting bucket shows the PUT's ETag on every
    # later read too (with its encryption headers); a PLAIN rewrite is one damaged upload, so
    # later answers are upstream's.
    assert await bounded(get_bytes(s3_client, bucket, key)) == data
    head = await bounded(proxied.head_object(Bucket=bucket, Key=key))
    assert head["ETag"] == (md5_etag if plain else put["ETag"])
    for field, value in encryption.items():
        assert head.get(field) == value, head
    assert proxy.counts == Counter(
        {"etag_rewritten": 1, "PUT:etag_rewritten": 1, "forwarded": 1, "HEAD:forwarded": 1}
    )


async def test_put_etag_rewrite_leaves_refused_puts_alone(
    proxy: FaultProxy, proxied: S3Client, bucket: str
) -> None:
    proxy.plan = FaultPlan(put_etag=EtagRewrite.SSE_KMS)
    with pytest.raises(ClientError) as error:  # upstream refuses: no ETag to rewrite
        await bounded(proxied.put_object(Bucket=f"{bucket}-missing", Key="refused", Body=b"x"))
    assert error_of(error.value) == ("NoSuchBucket", 404)
    assert proxy.counts == Counter({"forwarded": 1, "PUT:forwarded": 1})


async def test_refused_keys_answer_puts_400_without_reaching_upstream(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    prefix = f"refused-{uuid.uuid4().hex[:8]}"
    poison, readable, healthy = f"{prefix}/poison key", f"{prefix}/readable", f"{prefix}/ok"
    await s3_client.put_object(Bucket=bucket, Key=readable, Body=b"stored directly")
    proxy.plan = FaultPlan(refused_keys=frozenset({poison, readable}))

    for key in (poison, readable):
        with pytest.raises(ClientError) as error:
            await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"never stored"))
        assert error_of(error.value) == ("InvalidRequest", 400)
    await bounded(proxied.put_object(Bucket=bucket, Key=healthy, Body=b"stored"))
    assert await bounded(get_bytes(proxied, bucket, readable)) == b"stored directly"

    assert proxy.counts == Counter(
        {"refused": 2, "PUT:refused": 2, "forwarded": 2, "PUT:forwarded": 1, "GET:forwarded": 1}
    )
    listing = await s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert sorted(item["Key"] for item in listing.get("Contents", [])) == [healthy, readable]


async def test_refused_puts_take_no_fault_draws(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    key = f"refused-draws-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    plan = FaultPlan(slowdown_share=0.5, seed=11, refused_keys=frozenset({f"{key}-poison"}))

    proxy.plan = plan
    alone = await fault_sequence(proxy, proxied, bucket, key)
    proxy.plan = plan  # re-seeds; now every HEAD follows a refused PUT
    interleaved = []
    for _ in range(30):
        with pytest.raises(ClientError) as refused:
            await bounded(proxied.put_object(Bucket=bucket, Key=f"{key}-poison", Body=b"x"))
        assert error_of(refused.value) == ("InvalidRequest", 400)
        try:
            await bounded(proxied.head_object(Bucket=bucket, Key=key))
            interleaved.append("ok")
        except ClientError as exc:
            interleaved.append(str(error_of(exc)[1]))

    assert set(alone) == {"ok", "503"}
    assert interleaved == alone
    assert proxy.counts["PUT:refused"] == 30


async def test_access_denied_buckets_answer_403_without_reaching_upstream(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    key = f"denied-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"stored directly")
    proxy.plan = FaultPlan(access_denied_buckets=frozenset({bucket}))
    for call in (
        proxied.put_object(Bucket=bucket, Key=f"{key}-new", Body=b"never stored"),
        proxied.get_object(Bucket=bucket, Key=key),
        proxied.list_objects_v2(Bucket=bucket),
    ):
        with pytest.raises(ClientError) as error:
            await bounded(call)
        assert error_of(error.value) == ("AccessDenied", 403)
    proxy.plan = FaultPlan()  # the policy is fixed
    assert await bounded(get_bytes(proxied, bucket, key)) == b"stored directly"
    assert proxy.counts["access_denied"] == 3
    assert proxy.operations == Counter({"GetObject": 1})
    with pytest.raises(ClientError):
        await s3_client.head_object(Bucket=bucket, Key=f"{key}-new")


async def test_conditional_puts_are_refused_with_501_or_forwarded_without_the_condition(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    key = f"conditional-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"first")
    with pytest.raises(ClientError) as error:  # the upstream honours the condition
        await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"x", IfNoneMatch="*"))
    assert error_of(error.value)[1] == 412

    proxy.plan = FaultPlan(conditional_puts=ConditionalPuts.NOT_IMPLEMENTED)
    with pytest.raises(ClientError) as error:
        await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"x", IfNoneMatch="*"))
    assert error_of(error.value) == ("NotImplemented", 501)
    await bounded(proxied.put_object(Bucket=f"{bucket}", Key=f"{key}-plain", Body=b"plain"))

    proxy.plan = FaultPlan(conditional_puts=ConditionalPuts.IGNORED)
    await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*"))
    assert await bounded(get_bytes(s3_client, bucket, key)) == b"second"  # overwritten
    assert proxy.counts["not_implemented"] == 1
    assert proxy.counts["PUT:condition_ignored"] == 1
    assert proxy.counts["PUT:forwarded"] == 2  # the 412 and the unconditional PUT


# --------------------------------------------------------------------------------------------
# Latency, reproducibility, bookkeeping


async def test_requests_above_the_rate_are_answered_slowdown_and_not_forwarded(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    prefix = f"rate-{uuid.uuid4().hex[:8]}/"
    proxy.plan = FaultPlan(max_rate_per_s=2.0, methods=frozenset({"PUT"}))  # a burst of one
    outcomes = []
    for number in range(3):  # back to back: well inside the half second a token takes
        try:
            await bounded(proxied.put_object(Bucket=bucket, Key=f"{prefix}{number}", Body=b"x"))
            outcomes.append("stored")
        except ClientError as exc:
            outcomes.append(error_of(exc)[0] or "")
    assert outcomes == ["stored", "SlowDown", "SlowDown"]
    assert proxy.counts["PUT:slowdown"] == 2
    await bounded(proxied.head_object(Bucket=bucket, Key=f"{prefix}0"))  # HEAD not covered
    listing = await s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert [item["Key"] for item in listing.get("Contents", [])] == [f"{prefix}0"]


async def test_latency_delays_forwarded_requests(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, bucket: str
) -> None:
    key = f"slow-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    proxy.plan = FaultPlan(latency_s=(0.3, 0.4), methods=frozenset({"HEAD"}))
    for _ in range(3):
        started = time.monotonic()
        await bounded(proxied.head_object(Bucket=bucket, Key=key))
        assert time.monotonic() - started >= 0.3
    assert proxy.counts == Counter({"forwarded": 3, "HEAD:forwarded": 3})


async def fault_sequence(proxy: FaultProxy, client: S3Client, bucket: str, key: str) -> list[str]:
    """What 30 HEAD requests in a row meet: "ok" or the HTTP status of the injected error."""
    outcomes = []
    for _ in range(30):
        try:
            await bounded(client.head_object(Bucket=bucket, Key=key))
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append(str(error_of(exc)[1]))
    return outcomes


async def test_same_seed_gives_same_fault_sequence(
    proxy: FaultProxy, proxied: S3Client, s3_client: S3Client, s3_server: S3Server, bucket: str
) -> None:
    key = f"seed-{uuid.uuid4().hex[:8]}"
    await s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")

    def plan(seed: int) -> FaultPlan:
        return FaultPlan(slowdown_share=0.3, internal_error_share=0.3, seed=seed)

    proxy.plan = plan(7)
    first = await fault_sequence(proxy, proxied, bucket, key)
    proxy.plan = plan(7)  # assigning a plan re-seeds
    again = await fault_sequence(proxy, proxied, bucket, key)
    proxy.plan = plan(8)
    other = await fault_sequence(proxy, proxied, bucket, key)
    # Latency takes a draw of its own whatever its bounds, so it does not shift the faults.
    proxy.plan = FaultPlan(
        slowdown_share=0.3, internal_error_share=0.3, latency_s=(0.0, 0.001), seed=7
    )
    with_latency = await fault_sequence(proxy, proxied, bucket, key)

    assert set(first) == {"ok", "503", "500"}
    assert again == first
    assert with_latency == first
    assert other != first
    async with (
        FaultProxy(proxy.upstream_url, plan(7)) as fresh,
        client_via(fresh.url, s3_server.endpoint) as fresh_client,
    ):
        assert await fault_sequence(fresh, fresh_client, bucket, key) == first


async def test_counts_by_outcome_and_method_follow_plan_changes(
    proxy: FaultProxy, proxied: S3Client, bucket: str
) -> None:
    key = f"count-{uuid.uuid4().hex[:8]}"
    proxy.plan = FaultPlan(slowdown_share=1.0, methods=frozenset({"PUT"}))
    for _ in range(2):
        with pytest.raises(ClientError):
            await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"x"))
    for _ in range(3):
        with pytest.raises(ClientError) as missing:  # forwarded: the 404 is upstream's answer
            await bounded(proxied.head_object(Bucket=bucket, Key=key))
        assert error_of(missing.value) == ("404", 404)

    proxy.plan = FaultPlan()  # faults off
    await bounded(proxied.put_object(Bucket=bucket, Key=key, Body=b"x"))
    await bounded(proxied.head_object(Bucket=bucket, Key=key))

    assert proxy.counts == Counter(
        {
            "slowdown": 2,
            "PUT:slowdown": 2,
            "forwarded": 5,
            "HEAD:forwarded": 4,
            "PUT:forwarded": 1,
        }
    )


# --------------------------------------------------------------------------------------------
# Lifecycle


async def test_stop_closes_the_listener_and_is_idempotent(s3_server: S3Server) -> None:
    proxy = FaultProxy(s3_server.endpoint.url, FaultPlan())
    with pytest.raises(RuntimeError):
        _ = proxy.url
    async with proxy:
        url = proxy.url
        assert url.startswith("http://127.0.0.1:")
    with pytest.raises(RuntimeError):
        _ = proxy.url
    await proxy.stop()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(url)


async def test_stop_lets_requests_in_progress_finish(s3_server: S3Server, bucket: str) -> None:
    proxy = FaultProxy(s3_server.endpoint.url, FaultPlan(latency_s=(0.5, 0.5)))
    async with proxy, client_via(proxy.url, s3_server.endpoint) as client:
        request = asyncio.create_task(client.list_objects_v2(Bucket=bucket, MaxKeys=1))
        await asyncio.sleep(0.2)  # the request now waits out its latency in the proxy
        await proxy.stop()
        listing = await bounded(request)
    assert listing["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert proxy.counts == Counter({"forwarded": 1, "GET:forwarded": 1})


async def test_stop_reports_requests_it_cancels(
    s3_server: S3Server, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="devenv.faults")
    proxy = FaultProxy(
        s3_server.endpoint.url, FaultPlan(latency_s=(30.0, 30.0)), stop_timeout_s=0.2
    )
    async with proxy, client_via(proxy.url, s3_server.endpoint) as client:
        request = asyncio.create_task(client.head_object(Bucket=bucket, Key="k"))
        await asyncio.sleep(0.5)  # the request now waits out its latency in the proxy
        await proxy.stop()
        # The dropped connection makes aiohttp re-send the HEAD, to a port that is closed now.
        with pytest.raises(EndpointConnectionError):
            await bounded(request)
    assert proxy.counts == Counter({"cancelled": 1, "HEAD:cancelled": 1})
    assert "cancelled" in caplog.text


def test_plan_validation() -> None:
    assert FaultPlan(methods=frozenset({"get", "Put"})).methods == frozenset({"GET", "PUT"})
    with pytest.raises(ValueError, match="at most 1"):
        FaultPlan(slowdown_share=0.6, reset_share=0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FaultPlan(internal_error_share=-0.1)
    with pytest.raises(ValueError, match="latency_s"):
        FaultPlan(latency_s=(0.5, 0.1))
    with pytest.raises(ValueError, match="damaged_puts"):
        FaultPlan(damaged_puts=-1)
    with pytest.raises(ValueError, match="upstream_url"):
        FaultProxy("http://127.0.0.1:9000/prefix", FaultPlan())
