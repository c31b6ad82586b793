"""Fixtures of the integration tests beyond the servers and databases of ``tests/conftest.py``:
an HTTP client, and layer cache servers started in the test's loop (``tests.server_support``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from devenv.s3 import S3Server
from tests.conftest import LayerDb
from tests.server_support import ServerFactory


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def start_server(
    layer_db: LayerDb, s3_server: S3Server, bucket_prefix: str, tmp_path: Path
) -> AsyncIterator[ServerFactory]:
    """Factory: ``await start_server(mode, config, s3_url=…, env=…)`` → a listening server over
    this test's database and buckets; ``start_server.through_proxy(mode)`` → one whose S3 calls
    go through a new fault proxy, and the proxy. All are shut down when the test ends."""
    async with AsyncExitStack() as stack:
        factory = ServerFactory(stack, layer_db, s3_server, bucket_prefix, tmp_path)
        try:
            yield factory
        finally:
            await factory.close()
