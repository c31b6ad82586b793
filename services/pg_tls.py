"""TLS to the layer db: the CA the server's certificate must chain to, and why TLS failed.

The CA comes from ``ssl_ca_cert`` (a PEM file) or upstream's ``certificate`` (si-tls
``CertificateSource``): ``path``, ``base64``, ``as_string``, or ``remote``, a URL that
``fetch_remote_ca`` GETs once while the pool opens (at most ``REMOTE_CA_TIMEOUT_S``, no retry;
redirects followed, ``HTTPS_PROXY``/``NO_PROXY`` honoured as upstream's reqwest does). Every
source's bytes are read as upstream reads them (``services.settings.parse_ca_certificates``).
``pg_ssl_option`` turns the settings into asyncpg's ``ssl`` argument, reading the CA before any
connection: a file or inline CA that cannot be used is invalid input (``SettingsError``); a URL
that cannot be fetched, or that serves no certificate, is an environment not ready
(``PgLayerError``). Neither message carries the URL's user info or query, which may hold a
token.

When a connection the settings require to be TLS cannot be opened, ``server_offers_tls`` asks
the server as libpq does, by protocol rather than by asyncpg's message text: an 8-byte
SSLRequest, answered with one byte (``S`` yes, ``N`` no). Nothing here is held open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from layer_cache.errors import (
    ErrorKind,
    PgLayerError,
    SettingsError,
    untrusted_certificate,
    verify_reason,
)
from services.settings import CertificateKind, PgPoolConfig, PgSslMode, parse_ca_certificates

SslModeName = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

SSL_CA_CERT_ENV = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__SSL_CA_CERT"
CERTIFICATE_SOURCE_ENV = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__CERTIFICATE__SOURCE"
REMOTE_CA_TIMEOUT_S = 10.0
"""The whole fetch of a remote CA (connect, request, body): one attempt, then exit 3."""

# The sslmodes under which a connection without TLS is refused by the client.
TLS_REQUIRED: frozenset[PgSslMode] = frozenset(
    {PgSslMode.REQUIRE, PgSslMode.VERIFY_CA, PgSslMode.VERIFY_FULL}
)
SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # length, then the SSLRequest code (1234 5679)


def _verifying(config: PgPoolConfig) -> bool:
    return config.sslmode in (PgSslMode.VERIFY_CA, PgSslMode.VERIFY_FULL)


def remote_ca_url(config: PgPoolConfig) -> str | None:
    """The URL of upstream's ``remote`` certificate when it is to be used (a verifying mode
    and no ``ssl_ca_cert`` of ours), else None."""
    certificate = config.certificate
    if certificate is None or certificate.type is not CertificateKind.REMOTE:
        return None
    if config.ssl_ca_cert is not None or not _verifying(config):
        return None
    return certificate.source


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (they may carry a token), for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _fetch_failure(url: str, reason: str) -> PgLayerError:
    return PgLayerError(
        f"cannot fetch the Postgres CA from {redact_url(url)} ({reason}); check "
        f"{CERTIFICATE_SOURCE_ENV}",
        kind=ErrorKind.OTHER,
    )


async def fetch_remote_ca(url: str, *, timeout_s: float = REMOTE_CA_TIMEOUT_S) -> str | bytes:
    """Upstream's ``remote`` CA: one GET of ``url``, read as si-tls reads it, checked by
    ``ssl``; ``PgLayerError`` naming the setting and the URL when that fails."""
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=True
            ) as session,
            session.get(url, raise_for_status=True) as response,
        ):
            body = await response.read()
    except aiohttp.ClientResponseError as exc:
        raise _fetch_failure(url, f"HTTP {exc.status}") from exc
    except TimeoutError as exc:
        raise _fetch_failure(url, f"no answer within {timeout_s:g} s") from exc
    except aiohttp.ClientConnectorError as exc:
        certificate = untrusted_certificate(exc)
        if certificate is not None:
            reason = f"its TLS certificate is not trusted: {verify_reason(certificate)}"
        else:
            why = exc.os_error.strerror or type(exc.os_error).__name__
            reason = f"{type(exc).__name__}: {why}"
        raise _fetch_failure(url, reason) from exc
    except aiohttp.ClientError as exc:
        raise _fetch_failure(url, type(exc).__name__) from exc
    cadata = parse_ca_certificates(body)
    try:
        if cadata is None:
            raise ValueError("no certificate")
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cadata)
    except (ssl.SSLError, ValueError) as exc:
        raise PgLayerError(
            f"what {redact_url(url)} serves is not a PEM, base64 DER or DER certificate "
            f"({len(body)} bytes); check {CERTIFICATE_SOURCE_ENV}",
            kind=ErrorKind.OTHER,
        ) from exc
    return cadata


def pg_ssl_option(
    config: PgPoolConfig, *, remote_ca: str | bytes | None = None
) -> ssl.SSLContext | SslModeName:
    """asyncpg's ``ssl`` argument: for ``verify-ca``/``verify-full`` a verifying context (the CA
    given, else the system's trust store, as upstream verifies with its built-in roots when it
    has no certificate), else the mode name.

    ``remote_ca`` is what ``fetch_remote_ca`` returned for a ``remote`` certificate. The CA is
    read here, before any connection, as upstream reads a certificate source (a file may hold
    PEM, base64 DER or DER): one that is missing, unreadable or holds no certificate (or an
    inline CA that is not one) raises ``SettingsError`` naming the setting.
    """
    if not _verifying(config):
        return config.sslmode.value
    cadata = remote_ca if remote_ca is not None else config.ssl_ca_data
    setting, what = CERTIFICATE_SOURCE_ENV, "the CA is not a PEM or DER certificate"
    try:  # the file (OSError), then the certificates in it (ssl.SSLError, an OSError, or none)
        if config.ssl_ca_cert is not None:
            setting = SSL_CA_CERT_ENV
            if config.certificate is not None:
                setting += f" (or {CERTIFICATE_SOURCE_ENV})"
            what = f"cannot read the CA certificate file {config.ssl_ca_cert}"
            cadata = parse_ca_certificates(config.ssl_ca_cert.read_bytes())
            if cadata is None:
                raise ValueError("no PEM, base64 DER or DER certificate in it")
        context = ssl.create_default_context(cadata=cadata)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{setting}: {what} ({type(exc).__name__}: {exc})") from exc
    context.check_hostname = config.sslmode is PgSslMode.VERIFY_FULL
    return context


def tls_offered(answer: bytes) -> bool | None:
    """The server's answer to an SSLRequest: ``S`` TLS offered, ``N`` not; None for anything
    else (an error message, a closed connection, not Postgres)."""
    return {b"S": True, b"N": False}.get(answer[:1])


async def server_offers_tls(host: str, port: int, *, timeout_s: float) -> bool | None:
    """Ask the server whether it speaks TLS (one SSLRequest, then hang up); None when it cannot
    be asked or answers something else."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(SSL_REQUEST)
            await writer.drain()
            answer = await reader.read(1)
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):  # already gone: nothing left to close
                await writer.wait_closed()
    return tls_offered(answer)
