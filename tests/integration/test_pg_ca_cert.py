"""TLS to the layer db: the CA settings, upstream's certificate sources, and TLS refusals.

A CA certificate setting that cannot be used is invalid input (exit 2), found before connecting.
Before, ``ssl.create_default_context`` ran inside the Postgres connect mapping, so a missing file
was reported as "cannot reach Postgres" (exit 3). The CLI runs against a port nothing listens on:
exit 2 with the setting's name proves no connection was needed to find the fault.

Then a real Postgres serving TLS (``LocalPostgres(tls=True)``, its CA made for this module) is
verified through upstream's certificate sources: ``remote`` (the CA served over HTTP by the
test, fetched once; an unreachable URL, an error status, a body that is no certificate or no
answer in time is exit 3, one line naming the setting and the URL without its secrets) and
``base64`` of the PEM file. A CA that did not sign the server's certificate is exit 3 saying the
certificate is not trusted; ``sslmode=require`` against the suite's Postgres, which has no TLS,
is exit 3 naming ``SSLMODE``, not "cannot reach Postgres".
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from devenv.postgres import LocalPostgres, PostgresServer
from devenv.process import free_port
from devenv.tls import make_local_pki
from layer_cache.errors import ErrorKind, PgLayerError, SettingsError
from services.context import open_pg_pool
from services.pg_tls import fetch_remote_ca, pg_ssl_option
from services.settings import CertificateKind, PgCertificate, PgPoolConfig, PgSslMode
from tests.cli_harness import CliRun, cli, run_cli, the_error_line
from tests.support import PG

SSL_CA_CERT = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__SSL_CA_CERT"


def unusable_ca_files(tmp_path: Path) -> dict[str, Path]:
    not_a_certificate = tmp_path / "garbage.pem"
    not_a_certificate.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    )
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    return {
        "missing": tmp_path / "no-such-ca.pem",
        "directory": tmp_path,
        "not-a-certificate": not_a_certificate,
        "empty": empty,
    }


CASES = ["missing", "directory", "not-a-certificate", "empty"]


@pytest.mark.parametrize("case", CASES)
def test_pg_ssl_option_names_the_setting_of_an_unusable_ca_file(tmp_path: Path, case: str) -> None:
    path = unusable_ca_files(tmp_path)[case]
    config = PgPoolConfig(sslmode=PgSslMode.VERIFY_FULL, ssl_ca_cert=path)
    with pytest.raises(SettingsError) as raised:
        pg_ssl_option(config)
    message = str(raised.value)
    assert message.startswith(f"{SSL_CA_CERT}: cannot read the CA certificate file {path} (")
    assert "\n" not in message


def _check_in_child(path: Path, *, as_uid: int | None) -> tuple[int, str]:
    """``pg_ssl_option`` on ``path`` in a forked child (as ``as_uid``, when given): the exit
    status (2 for a SettingsError) and the error's text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            if as_uid is not None:
                os.setgid(as_uid)
                os.setuid(as_uid)
            pg_ssl_option(PgPoolConfig(sslmode=PgSslMode.VERIFY_CA, ssl_ca_cert=path))
            status = 0
        except SettingsError as exc:
            os.write(write_end, str(exc).encode())
            status = 2
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), message


def test_pg_ssl_option_names_the_setting_of_an_unreadable_ca_file() -> None:
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "ca.pem"
        path.write_text("")
        path.chmod(0)
        # Root reads a file whatever its mode: check as nobody then.
        as_uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else None
        status, message = _check_in_child(path, as_uid=as_uid)
    assert status == 2, message
    assert message.startswith(f"{SSL_CA_CERT}: cannot read the CA certificate file {path} (")
    assert "PermissionError" in message, message


@pytest.mark.parametrize("case", ["missing", "not-a-certificate"])
def test_cli_exits_2_naming_the_setting_before_connecting(tmp_path: Path, case: str) -> None:
    path = unusable_ca_files(tmp_path)[case]
    env = {
        "SI_SDF__MIGRATION_MODE": "runAndQuit",
        PG + "HOSTNAME": "127.0.0.1",
        PG + "PORT": str(free_port()),  # nothing listens: a connection attempt would exit 3
        PG + "PASSWORD": "a-secret-password",
        PG + "SSLMODE": "verify-full",
        SSL_CA_CERT: str(path),
    }
    run = run_cli(["--log-json"], env, timeout=60)
    assert run.status == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    event = json.loads(lines[0])
    assert event["level"] == "error", event
    assert event["event"].startswith(f"{SSL_CA_CERT}: cannot read the CA certificate file"), event
    assert "Postgres" not in event["event"], event
    assert "a-secret-password" not in run.stderr + run.stdout


# --------------------------------------------------------------------------------------------
# A Postgres that serves TLS, verified through upstream's certificate sources

CERTIFICATE_SOURCE = PG + "CERTIFICATE__SOURCE"


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[LocalPostgres]:
    """PostgreSQL with ``ssl=on``, its certificate signed by a CA made for this module."""
    server = LocalPostgres(tls=True)
    server.start()
    yield server
    server.stop()


def pg_env(server: PostgresServer, **settings: str) -> dict[str, str]:
    """runAndQuit against ``server`` as the app role, plus ``settings`` (``PG`` + name)."""
    endpoint = server.endpoint
    return {
        "SI_SDF__MIGRATION_MODE": "runAndQuit",
        PG + "HOSTNAME": endpoint.host,
        PG + "PORT": str(endpoint.port),
        PG + "USER": endpoint.user,
        PG + "PASSWORD": endpoint.password,
        PG + "DBNAME": endpoint.dbname,
        PG + "CONNECT_TIMEOUT_SECS": "5",
    } | {PG + name: value for name, value in settings.items()}


def pool_config(server: PostgresServer, **fields: object) -> PgPoolConfig:
    endpoint = server.endpoint
    return PgPoolConfig.model_validate(
        {
            "hostname": endpoint.host,
            "port": endpoint.port,
            "user": endpoint.user,
            "password": endpoint.password,
            "dbname": endpoint.dbname,
            "pool_max_size": 2,
            **fields,
        }
    )


@asynccontextmanager
async def http_server(routes: dict[str, bytes | None]) -> AsyncIterator[tuple[str, list[str]]]:
    """Serve ``routes`` (path → body; None: never answer; any other path: 404) on a free
    loopback port; yields the base URL and the paths requested, in order."""
    requested: list[str] = []
    closing = asyncio.Event()

    async def answer(request: web.Request) -> web.StreamResponse:
        requested.append(request.path)
        if request.path not in routes:
            return web.Response(status=404)
        body = routes[request.path]
        if body is None:  # hold the request until the server closes
            await closing.wait()
            return web.Response(status=503)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", requested
    finally:
        closing.set()
        await runner.cleanup()


def one_error_line(run: CliRun) -> str:
    assert run.status == 3, run.describe()
    return the_error_line(run, "json")


async def test_remote_ca_is_fetched_once_and_verifies_the_server(tls_pg: LocalPostgres) -> None:
    async with http_server({"/pki/ca.pem": tls_pg.pki.ca_pem}) as (
        url,
        requested,
    ):
        env = pg_env(tls_pg, CERTIFICATE__TYPE="remote", CERTIFICATE__SOURCE=f"{url}/pki/ca.pem")
        run = await cli(["--log-json"], env)
        assert requested == ["/pki/ca.pem"]  # once, at start

        certificate = PgCertificate(type=CertificateKind.REMOTE, source=f"{url}/pki/ca.pem")
        pool = await open_pg_pool(pool_config(tls_pg, certificate=certificate))
        try:
            over_tls = await pool.fetchval(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
        finally:
            await pool.close()

    assert run.status == 0, run.describe()
    assert [event["event"] for event in run.events] == ["layer-db schema up to date"]
    assert over_tls is True


async def test_base64_of_the_ca_pem_file_verifies_the_server(tls_pg: LocalPostgres) -> None:
    """A Kubernetes Secret's base64 of ``ca.pem``: before, its bytes went to ``ssl`` as DER and
    the run ended with "the CA is not a PEM or DER certificate" (exit 2)."""
    source = base64.b64encode(tls_pg.pki.ca_pem).decode()

    run = await cli(
        ["--log-json"], pg_env(tls_pg, CERTIFICATE__TYPE="base64", CERTIFICATE__SOURCE=source)
    )

    assert run.status == 0, run.describe()


async def test_a_der_ca_file_by_path_verifies_the_server_as_upstream_reads_it(
    tls_pg: LocalPostgres, tmp_path: Path
) -> None:
    """si-tls reads a ``path`` source's bytes as PEM, base64 DER or DER; before, a DER file was
    handed to ``ssl`` as PEM and refused (exit 2)."""
    der = tmp_path / "ca.der"
    der.write_bytes(ssl.PEM_cert_to_DER_cert(tls_pg.pki.ca_pem.decode()))

    run = await cli(
        ["--log-json"], pg_env(tls_pg, CERTIFICATE__TYPE="path", CERTIFICATE__SOURCE=str(der))
    )

    assert run.status == 0, run.describe()


async def test_verify_full_without_a_ca_uses_the_system_roots_and_says_what_to_set(
    tls_pg: LocalPostgres,
) -> None:
    """Before: asyncpg looked for ``~/.postgresql/root.crt`` and ended in a
    ``ClientConfigurationError`` that named neither the problem nor a setting."""
    run = await cli(["--log-json"], pg_env(tls_pg, SSLMODE="verify-full"))

    message = one_error_line(run)
    assert run.status == 3, run.describe()
    assert message.startswith("the Postgres server's TLS certificate is not trusted;"), message
    assert SSL_CA_CERT in message


SECRET_URL_PARTS = ("ca-user", "ca-token", "sig=secret")


def with_secrets(url: str, path: str) -> str:
    """``url`` + ``path`` with user info and a query that messages must not show."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://ca-user:ca-token@{rest}{path}?sig=secret"


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ("/missing.pem", "(HTTP 404)"),
        ("/garbage.pem", "is not a PEM, base64 DER or DER certificate"),
    ],
)
async def test_a_remote_ca_url_without_a_certificate_is_exit_3_naming_the_setting(
    tls_pg: LocalPostgres, route: str, reason: str
) -> None:
    garbage = b"<html><body>Sign in</body></html>"
    async with http_server({"/garbage.pem": garbage}) as (url, _requested):
        source = with_secrets(url, route)
        run = await cli(
            ["--log-json"], pg_env(tls_pg, CERTIFICATE__TYPE="remote", CERTIFICATE__SOURCE=source)
        )

    message = one_error_line(run)
    assert reason in message, message
    assert CERTIFICATE_SOURCE in message, message
    assert f"{url}{route}" in message, message
    assert not any(part in run.stderr for part in SECRET_URL_PARTS), run.stderr


async def test_an_unreachable_remote_ca_url_is_exit_3_at_once(tls_pg: LocalPostgres) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    env = pg_env(
        tls_pg, CERTIFICATE__TYPE="remote", CERTIFICATE__SOURCE=with_secrets(url, "/ca.pem")
    )

    started = time.monotonic()
    run = await cli(["--log-json"], env)
    elapsed = time.monotonic() - started

    message = one_error_line(run)
    assert message.startswith(f"cannot fetch the Postgres CA from {url}/ca.pem ("), message
    assert CERTIFICATE_SOURCE in message, message
    assert not any(part in run.stderr for part in SECRET_URL_PARTS), run.stderr
    assert elapsed < 10, elapsed  # no retries: the process's start and one refused connect


async def test_a_remote_ca_that_never_answers_fails_within_the_timeout() -> None:
    async with http_server({"/ca.pem": None}) as (url, _requested):
        started = time.monotonic()
        with pytest.raises(PgLayerError) as raised:
            await fetch_remote_ca(f"{url}/ca.pem", timeout_s=0.5)
        elapsed = time.monotonic() - started

    assert "(no answer within 0.5 s)" in str(raised.value)
    assert 0.5 <= elapsed < 3, elapsed


async def test_a_ca_that_did_not_sign_the_servers_certificate_is_exit_3_untrusted(
    tls_pg: LocalPostgres, tmp_path: Path
) -> None:
    other = make_local_pki(tmp_path / "other", name="another")
    env = pg_env(tls_pg, SSLMODE="verify-full", SSL_CA_CERT=str(other.ca_file))

    run = await cli(["--log-json"], env)

    message = one_error_line(run)
    assert message.startswith("the Postgres server's TLS certificate is not trusted;"), message
    assert SSL_CA_CERT in message
    assert "unable to get local issuer certificate" in message, message
    pool = pool_config(tls_pg, sslmode=PgSslMode.VERIFY_FULL, ssl_ca_cert=other.ca_file)
    with pytest.raises(PgLayerError) as raised:
        await open_pg_pool(pool)
    assert raised.value.kind is ErrorKind.UNTRUSTED_CERTIFICATE


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
async def test_sslmode_needing_tls_against_a_server_without_it_is_exit_3_naming_sslmode(
    pg_server: PostgresServer, sslmode: str, tmp_path: Path
) -> None:
    """The suite's Postgres has no TLS. Before, this said "cannot reach Postgres; check
    …HOSTNAME and __PORT" and the cause showed only with -v."""
    settings = {"SSLMODE": sslmode}
    if sslmode == "verify-full":  # a CA to verify with, so that the connect is tried at all
        settings["SSL_CA_CERT"] = str(make_local_pki(tmp_path).ca_file)

    run = await cli(["--log-json"], pg_env(pg_server, **settings))

    message = one_error_line(run)
    assert message.startswith("the Postgres server does not offer TLS, which "), message
    assert PG + "SSLMODE requires" in message, message
    assert "HOSTNAME and __PORT" not in message, message
    assert f"sslmode {sslmode} needs TLS" in message, message
