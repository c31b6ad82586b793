"""A TCP relay that delays what the client sends, as a network's latency does, for little CPU.

``DelayRelay`` listens on 127.0.0.1 and opens one upstream connection per client connection.
What the server sends back is passed straight through; what the client sends is held and
released after a delay drawn uniformly from ``[low_s, high_s]`` when a burst begins (bytes that
arrive while a burst is held join it, so a request's head and body leave together and in
order, and a request pays the delay once, whatever its size). A connection's first burst pays
the delay twice: opening a connection costs a network round trip (TCP's handshake; against AWS,
TLS adds more). The HTTP proxy (``devenv.faults.FaultProxy``) parses and re-sends every request
and response in Python, which on a 2-core machine took a third of a core from the client it
measured at 600 requests/s; this relay copies bytes, so the delay costs what network latency
costs in production: time, not the client's CPU. It cannot answer SlowDown (that needs the
HTTP proxy). Either side's pause in reading (flow control) is passed to the other. ``close``
stops listening and closes every relayed connection; ``counts`` are connections and bursts.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Self
from urllib.parse import urlsplit


class _ServerSide(asyncio.Protocol):
    """The upstream connection: what the server sends goes straight to the client."""

    def __init__(self, client: _ClientSide) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client.upstream_ready(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.client.transport.can_write_eof():
            self.client.transport.write_eof()
        return True  # keep the upstream open for writing until the client is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class _ClientSide(asyncio.Protocol):
    """An accepted connection: what the client sends is held for a delay, then sent on."""

    def __init__(self, relay: DelayRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport
        self.upstream: asyncio.Transport | None = None
        self._held = bytearray()
        self._release: asyncio.TimerHandle | None = None
        self._first = True
        self._eof = False
        self._connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay.opened(self)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(
                lambda: _ServerSide(self), self.relay.upstream_host, self.relay.upstream_port
            )
        except OSError:
            self.relay.counts["upstream_refused"] += 1
            self.transport.close()

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        if self.transport.is_closing():
            transport.close()
        elif self._release is None and (self._held or self._eof):
            self._flush()  # its delay passed while the connection opened

    def data_received(self, data: bytes) -> None:
        self._held += data
        if self._release is None:
            self.relay.counts["bursts"] += 1
            delay = self.relay.delay()
            if self._first:
                self._first, delay = False, 2 * delay
            self._release = asyncio.get_running_loop().call_later(delay, self._released)

    def _released(self) -> None:
        self._release = None
        if self.upstream is not None:
            self._flush()

    def _flush(self) -> None:
        assert self.upstream is not None
        if self._held:
            self.upstream.write(bytes(self._held))
            self._held.clear()
        if self._eof and self.upstream.can_write_eof():
            self.upstream.write_eof()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._release is None and self.upstream is not None:
            self._flush()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.closed(self)
        self.close()

    def close(self) -> None:
        """Close both sides; anything still held is dropped."""
        if self._release is not None:
            self._release.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()


class DelayRelay:
    """``async with DelayRelay(upstream_url, low_s, high_s) as relay``: ``relay.url`` is the
    delayed endpoint (the upstream's scheme, 127.0.0.1 and a free port)."""

    def __init__(self, upstream_url: str, low_s: float, high_s: float, *, seed: int = 0) -> None:
        if not 0.0 <= low_s <= high_s:
            raise ValueError(f"delay bounds must satisfy 0 <= low <= high: {low_s, high_s}")
        parts = urlsplit(upstream_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream URL needs a host and a port: {upstream_url}")
        self.scheme = parts.scheme
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.low_s, self.high_s = low_s, high_s
        self.counts: Counter[str] = Counter()
        self.connections: set[_ClientSide] = set()
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._none_open = asyncio.Event()
        self._none_open.set()
        self.url = ""

    def delay(self) -> float:
        return self._random.uniform(self.low_s, self.high_s)

    def opened(self, connection: _ClientSide) -> None:
        self.connections.add(connection)
        self.counts["connections"] += 1
        self._none_open.clear()

    def closed(self, connection: _ClientSide) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._none_open.set()

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientSide(self), "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening, then close every relayed connection."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.close()
        await self._server.wait_closed()
        self._server = None
        await asyncio.wait_for(self._none_open.wait(), 5)  # connection_lost runs later
