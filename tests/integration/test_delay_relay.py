"""``bench.delay_relay.DelayRelay``: bytes through unchanged and in order, each burst delayed.

A plain TCP echo server pins down the relay's timing and stream semantics (lower bounds only:
a loaded machine can only add time); SeaweedFS, which checks signatures and Content-MD5, shows
that S3 traffic through it (small objects and a multi-megabyte body, concurrently) lands byte
for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from bench.delay_relay import DelayRelay
from devenv.s3 import SeaweedS3, create_buckets
from tests.conftest import open_s3_client

DELAY_S = 0.08


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()  # the client's EOF ends the echo

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_each_burst_is_delayed_and_a_new_connection_pays_twice(echo_url: str) -> None:
    async with DelayRelay(echo_url, DELAY_S, DELAY_S) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(relay.url))
        started = time.monotonic()
        writer.write(b"first")
        assert await reader.readexactly(5) == b"first"
        first_s = time.monotonic() - started
        started = time.monotonic()
        writer.write(b"second")
        assert await reader.readexactly(6) == b"second"
        second_s = time.monotonic() - started
        writer.close()
        await writer.wait_closed()
    assert first_s >= 2 * DELAY_S  # the handshake's round trip, then the request's
    assert second_s >= DELAY_S
    assert relay.counts["connections"] == 1
    assert relay.counts["bursts"] == 2


async def test_bytes_arrive_whole_and_in_order_and_eof_passes_through(echo_url: str) -> None:
    chunks = [bytes([n % 251]) * (1 + 977 * n % 70_000) for n in range(60)]
    async with DelayRelay(echo_url, 0.0, 0.01, seed=7) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(relay.url))
        for chunk in chunks:  # some join a held burst, some start a new one
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(), timeout=20)  # up to the server's EOF
        writer.close()
        await writer.wait_closed()
    assert echoed == b"".join(chunks)
    assert 1 <= relay.counts["bursts"] <= len(chunks)


async def test_closing_the_relay_closes_its_connections(echo_url: str) -> None:
    relay = DelayRelay(echo_url, 0.0, 0.0)
    await relay.__aenter__()
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(relay.url))
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    await relay.close()
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    assert not relay.connections
    writer.close()
    await writer.wait_closed()


async def test_an_upstream_that_refuses_closes_the_client_connection() -> None:
    async with DelayRelay("http://127.0.0.1:1", 0.0, 0.0) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(relay.url))
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()
        await writer.wait_closed()
    assert relay.counts["upstream_refused"] == 1


@pytest.mark.parametrize(
    ("url", "low", "high"),
    [("http://127.0.0.1", 0.0, 0.0), ("http://127.0.0.1:9000", 0.2, 0.1)],
)
def test_bad_arguments_are_refused(url: str, low: float, high: float) -> None:
    with pytest.raises(ValueError, match=r"port|low <= high"):
        DelayRelay(url, low, high)


def test_the_relay_cannot_be_asked_to_throttle() -> None:
    command = [sys.executable, "-m", "bench.delay_proxy", "http://127.0.0.1:9", "0", "0"]
    done = subprocess.run(
        [*command, "--relay", "--max-rate-per-s", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--relay cannot answer SlowDown" in done.stderr.strip().splitlines()[-1]


async def test_s3_objects_through_the_relay_land_byte_for_byte(
    verifying_s3_server: SeaweedS3,
) -> None:
    endpoint = verifying_s3_server.endpoint
    bucket = f"relay-{uuid.uuid4().hex[:12]}"
    create_buckets(endpoint, [bucket])
    bodies = {f"small/{n}": hashlib.sha256(str(n).encode()).digest() * (n + 1) for n in range(40)}
    bodies["large"] = bytes(range(256)) * (5 * 4096 + 17)  # 5 MiB and a bit
    async with (
        DelayRelay(endpoint.url, 0.005, 0.015) as relay,
        open_s3_client(replace(endpoint, url=relay.url)) as client,
    ):
        await asyncio.gather(
            *(client.put_object(Bucket=bucket, Key=key, Body=body) for key, body in bodies.items())
        )
        for key, body in bodies.items():
            got = await client.get_object(Bucket=bucket, Key=key)
            async with got["Body"] as stream:
                assert await stream.read() == body, key
    assert relay.counts["connections"] >= 1
