"""Fixtures of the unit tests: an S3 client that builds requests and never sends one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import pytest


class RequestBuilt(Exception):
    """Raised by a ``before-send`` handler to stop a call once its request is built."""


@pytest.fixture
async def s3_client() -> AsyncIterator[Any]:
    """An aioboto3 S3 client for an endpoint nothing listens on (port 9, discard); tests stop
    its calls at ``before-send`` with ``RequestBuilt``."""
    session = aioboto3.Session()
    async with session.client(
        "s3",
        region_name="eu-west-1",
        endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="not-a-secret",
    ) as client:
        yield client
