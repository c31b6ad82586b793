"""The server lets in only who belongs: tokens, read-only access, rotation, TLS and mutual TLS,
on the real server over HTTP and HTTPS (a CA made at test time), Postgres and S3 real.

Every route is tried with no token, a bad token, a read token and a write token; tokens are
rotated under load without a restart; a flood of bad tokens from one address does not keep a
client with a token out; a ``-vv`` run's whole log holds no token; mutual TLS refuses a client
without a certificate; and the server refuses to start without tokens unless told ``none``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.metrics.export import NumberDataPoint

from devenv.tls import LocalPki, make_local_pki
from layer_cache_server.auth import FailureLimiter
from layer_cache_server.server import REQUESTS_METRIC
from services.settings import ServerConfig
from tests.cli_harness import Job, cli
from tests.server_support import RunningServer, ServerFactory

READER = "reader-token-0123456789abcdef"
READER_NEXT = "reader-token-next-fedcba9876543210"
WRITER = "writer-token-0123456789abcdef0123"
KEY = "0123456789abcdef0123456789abcdef"


def write_tokens(path: Path, *tokens: str) -> Path:
    """Replace a token file as Kubernetes updates a mounted Secret: write aside, rename over."""
    staged = path.with_name(path.name + ".new")
    staged.write_text("".join(f"{token}\n" for token in tokens))
    os.replace(staged, path)
    return path


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_tokens(tmp_path / "read-tokens", READER), write_tokens(
        tmp_path / "write-tokens", WRITER
    )


@pytest.fixture
async def served(start_server: ServerFactory, token_files: tuple[Path, Path]) -> RunningServer:
    read_file, write_file = token_files
    return await start_server(
        config=ServerConfig(read_tokens_file=read_file, write_tokens_file=write_file)
    )


@pytest.fixture(params=["http", "https"])
async def served_over(
    request: pytest.FixtureRequest,
    start_server: ServerFactory,
    tmp_path: Path,
    token_files: tuple[Path, Path],
) -> tuple[RunningServer, aiohttp.TCPConnector]:
    """The server with tokens over HTTP, and over HTTPS with a CA made now; and a connector
    that trusts it."""
    read_file, write_file = token_files
    config = ServerConfig(read_tokens_file=read_file, write_tokens_file=write_file)
    connector = aiohttp.TCPConnector()
    if request.param == "https":
        pki = make_local_pki(tmp_path / "pki")
        config = config.model_copy(
            update={"tls_cert_file": pki.cert_file, "tls_key_file": pki.key_file}
        )
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=pki.ca_file))
    return await start_server(config=config), connector


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


Request = Callable[[aiohttp.ClientSession, str, dict[str, str]], Awaitable[int]]


async def _status(response: aiohttp.ClientResponse) -> int:
    await response.read()
    return response.status


async def get(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(f"{url}/v1/cas/{KEY}", headers=headers) as response:
        return await _status(response)


async def head(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.head(f"{url}/v1/cas/{KEY}", headers=headers) as response:
        return await _status(response)


async def put(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.put(f"{url}/v1/cas/{KEY}", data=b"value", headers=headers) as response:
        return await _status(response)


async def get_bulk(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    body = {"keys": [KEY]}
    async with http.post(f"{url}/v1/cas/get-bulk", json=body, headers=headers) as response:
        return await _status(response)


async def healthz(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(f"{url}/healthz", headers=headers) as response:
        return await _status(response)


async def readyz(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(f"{url}/readyz", headers=headers) as response:
        return await _status(response)


ROUTES: dict[str, Request] = {
    "get": get,
    "head": head,
    "get-bulk": get_bulk,
    "put": put,
    "healthz": healthz,
    "readyz": readyz,
}
CREDENTIALS: dict[str, str | None] = {
    "none": None,
    "bad": "not-a-token-of-this-server-0000",
    "read": READER,
    "write": WRITER,
}
# What each route answers to each credential (after a write put the key in place).
EXPECTED: dict[str, dict[str, int]] = {
    "get": {"none": 401, "bad": 401, "read": 200, "write": 200},
    "head": {"none": 401, "bad": 401, "read": 200, "write": 200},
    "get-bulk": {"none": 401, "bad": 401, "read": 200, "write": 200},
    "put": {"none": 401, "bad": 401, "read": 403, "write": 200},  # 200: the key exists
    "healthz": {"none": 200, "bad": 200, "read": 200, "write": 200},
    "readyz": {"none": 200, "bad": 200, "read": 200, "write": 200},
}


async def test_every_route_answers_each_credential_as_documented(
    served_over: tuple[RunningServer, aiohttp.TCPConnector],
) -> None:
    served, connector = served_over
    async with aiohttp.ClientSession(connector=connector) as http:
        assert await put(http, served.url, bearer(WRITER)) == 201
        answers = {
            route: {
                name: await request(http, served.url, bearer(token))
                for name, token in CREDENTIALS.items()
            }
            for route, request in ROUTES.items()
        }
        async with http.get(f"{served.url}/v1/cas/{KEY}") as refused:
            challenge = refused.headers["WWW-Authenticate"]
            body = await refused.json()
        async with http.put(
            f"{served.url}/v1/cas/{KEY}", data=b"value", headers=bearer(READER)
        ) as forbidden:
            scope = forbidden.headers["WWW-Authenticate"]

    assert answers == EXPECTED
    assert challenge == 'Bearer realm="si-layer-cache"'
    assert body["error"]["code"] == "unauthorized"
    assert 'error="insufficient_scope"' in scope


async def test_refusals_are_counted_by_status_with_no_token_in_the_labels(
    served: RunningServer,
) -> None:
    async with aiohttp.ClientSession() as http:
        await get(http, served.url, {})
        await get(http, served.url, bearer("x" * 20))
        await put(http, served.url, bearer(READER))
        await get(http, served.url, bearer(READER))

    data = served.metrics.get_metrics_data()
    assert data is not None
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == REQUESTS_METRIC
        for point in metric.data.data_points
    ]
    by_status: Counter[str] = Counter()
    for point in points:
        assert isinstance(point, NumberDataPoint)
        assert point.attributes is not None
        by_status[str(point.attributes["status"])] += int(point.value)
        assert not any(token in str(point.attributes) for token in (READER, WRITER, "x" * 20))
    assert by_status["401"] == 2
    assert by_status["403"] == 1
    assert by_status["404"] == 1  # the read token's GET of a key never written


async def answers(request: Callable[[], Awaitable[int]], status: int) -> None:
    """Wait (10 s at most) until ``request`` answers ``status``: the server reloads token files
    on its own schedule (a poll a second), which no event announces."""
    for _ in range(100):
        if await request() == status:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"the server never answered {status}")


async def test_tokens_rotate_without_a_restart_while_requests_are_in_flight(
    served: RunningServer, token_files: tuple[Path, Path]
) -> None:
    read_file, _write_file = token_files
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic(http: aiohttp.ClientSession, token: str) -> None:
        while not stop.is_set():
            statuses.append(await head(http, served.url, bearer(token)))

    async with aiohttp.ClientSession() as http:
        assert await put(http, served.url, bearer(WRITER)) == 201
        assert await get(http, served.url, bearer(READER_NEXT)) == 401
        # 1. Add the new token beside the old one: both work, nothing is refused meanwhile.
        old_clients = asyncio.create_task(traffic(http, READER))
        write_tokens(read_file, READER, READER_NEXT)
        await answers(lambda: get(http, served.url, bearer(READER_NEXT)), 200)
        new_clients = asyncio.create_task(traffic(http, READER_NEXT))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(old_clients, new_clients)
        assert statuses, "no request ran during the rotation"
        assert set(statuses) == {200}, "a request was refused while both tokens were valid"
        # 2. Remove the old one: it is refused, the new one works, no restart.
        stop.clear()
        statuses.clear()
        new_clients = asyncio.create_task(traffic(http, READER_NEXT))
        write_tokens(read_file, READER_NEXT)
        await answers(lambda: get(http, served.url, bearer(READER)), 401)
        stop.set()
        await new_clients
        assert set(statuses) == {200}
        assert await get(http, served.url, bearer(READER_NEXT)) == 200


async def test_a_flood_of_bad_tokens_from_one_address_does_not_keep_others_out(
    served: RunningServer,
) -> None:
    # The default burst, refilled too slowly to matter during the test however loaded the
    # machine is (at the default 10 a second, 60 slow requests earn back a few 401s).
    served.server.auth_failures = FailureLimiter(rate_per_s=0.01)
    flooder = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=flooder) as bad, aiohttp.ClientSession() as good:
        assert await put(good, served.url, bearer(WRITER)) == 201
        flood = [await get(bad, served.url, bearer("y" * 20)) for _ in range(60)]
        legitimate = [await get(good, served.url, bearer(READER)) for _ in range(20)]
        # Another client behind the flooder's address, with a token, still gets in.
        same_address_with_token = await get(bad, served.url, bearer(READER))

    assert flood[:20] == [401] * 20
    assert set(flood[20:]) == {429}
    assert set(legitimate) == {200}
    assert same_address_with_token == 200


async def test_the_server_refuses_to_start_without_tokens_unless_told_none(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = env | {
        "SI_SDF__SERVER__WRITE_QUEUE_DIR": str(tmp_path / "queue"),
    }
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json"]

    refused = await cli(args, env | {"SI_SDF__SERVER__AUTH": "tokens"})

    assert refused.status == 2, refused.describe()
    [line] = refused.events
    assert "SI_SDF__SERVER__READ_TOKENS_FILE" in line["event"]
    assert "SI_SDF__SERVER__AUTH=none" in line["event"]
    assert not (tmp_path / "queue").exists()

    async with Job(args, env | {"SI_SDF__SERVER__AUTH": "none"}) as job:
        listening = await job.wait_for_event("layer cache server listening", 30)
    assert listening["auth"].startswith("none")


async def test_a_whole_vv_run_logs_no_token(
    env: dict[str, str], token_files: tuple[Path, Path]
) -> None:
    read_file, write_file = token_files
    env = env | {
        "SI_SDF__SERVER__READ_TOKENS_FILE": str(read_file),
        "SI_SDF__SERVER__WRITE_TOKENS_FILE": str(write_file),
    }
    args = ["--migration-mode", "skip", "--socket-addr", "127.0.0.1:0", "--log-json", "-vv"]
    wrong = "wrong-token-that-must-not-be-logged"
    async with Job(args, env) as job:
        listening = await job.wait_for_event("layer cache server listening", 30)
        url = f"http://127.0.0.1:{listening['port']}"
        async with aiohttp.ClientSession() as http:
            assert await put(http, url, bearer(WRITER)) == 201
            assert await get(http, url, bearer(READER)) == 200
            assert await get(http, url, bearer(wrong)) == 401
            write_tokens(read_file, READER, READER_NEXT)
            await job.wait_for_event("token file reloaded", 10)
            assert await get(http, url, bearer(READER_NEXT)) == 200
        job.send(signal.SIGTERM)
        finished = await job.finish(30)

    assert listening["auth"] == "bearer tokens (1 read, 1 write)"
    assert finished.status == 143, finished.describe()
    log = finished.stderr
    assert "debug" in log  # -vv: every level is there
    for token in (READER, READER_NEXT, WRITER, wrong):
        assert token not in log


# --------------------------------------------------------------------------------------------
# TLS


@pytest.fixture
def pki(tmp_path: Path) -> LocalPki:
    return make_local_pki(tmp_path / "pki")


def client_context(pki: LocalPki, *, certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca_file)
    if certificate:
        context.load_cert_chain(pki.client_cert_file, pki.client_key_file)
    return context


async def test_https_serves_with_tokens_and_mutual_tls_refuses_a_client_without_a_certificate(
    start_server: ServerFactory, token_files: tuple[Path, Path], pki: LocalPki
) -> None:
    read_file, write_file = token_files
    config = ServerConfig(
        read_tokens_file=read_file,
        write_tokens_file=write_file,
        tls_cert_file=pki.cert_file,
        tls_key_file=pki.key_file,
        tls_client_ca_file=pki.ca_file,
    )
    running = await start_server(config=config)
    assert running.url.startswith("https://")
    with_certificate = aiohttp.TCPConnector(ssl=client_context(pki, certificate=True))
    async with aiohttp.ClientSession(connector=with_certificate) as http:
        assert await put(http, running.url, bearer(WRITER)) == 201
        assert await get(http, running.url, bearer(READER)) == 200
        assert await get(http, running.url, {}) == 401  # TLS is no substitute for a token
    without = aiohttp.TCPConnector(ssl=client_context(pki, certificate=False))
    async with aiohttp.ClientSession(connector=without) as http:
        with pytest.raises(aiohttp.ClientError):
            await get(http, running.url, bearer(READER))
    async with aiohttp.ClientSession() as http:  # plain HTTP to an HTTPS port
        with pytest.raises(aiohttp.ClientError):
            await get(http, running.url.replace("https://", "http://"), bearer(READER))


async def test_a_renewed_certificate_is_served_without_a_restart(
    start_server: ServerFactory, tmp_path: Path, pki: LocalPki
) -> None:
    served_dir = tmp_path / "served"
    served_dir.mkdir()
    cert, key = served_dir / "tls.crt", served_dir / "tls.key"
    cert.write_bytes(pki.cert_file.read_bytes())
    key.write_bytes(pki.key_file.read_bytes())
    config = ServerConfig(auth="none", tls_cert_file=cert, tls_key_file=key)
    renewed = make_local_pki(tmp_path / "renewed")

    async def served_issuer(ca: LocalPki, url: str) -> int:
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca.ca_file))
        async with aiohttp.ClientSession(connector=connector) as http:
            return await healthz(http, url, {})

    running = await start_server(config=config)
    assert await served_issuer(pki, running.url) == 200
    for name, source in (("tls.key", renewed.key_file), ("tls.crt", renewed.cert_file)):
        staged = served_dir / f".{name}"
        staged.write_bytes(source.read_bytes())
        os.replace(staged, served_dir / name)

    async def renewed_status() -> int:
        try:
            return await served_issuer(renewed, running.url)
        except aiohttp.ClientError:
            return 0  # the old certificate is still served

    await answers(renewed_status, 200)
    with pytest.raises(aiohttp.ClientError):  # the old CA no longer vouches for it
        await served_issuer(pki, running.url)
