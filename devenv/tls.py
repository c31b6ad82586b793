"""Throwaway TLS for local servers: a CA and certificates made at run time, and a relay that
puts TLS in front of a plain-TCP server.

``make_local_pki(directory)`` writes a fresh CA (``ca.pem``), a server certificate for
``127.0.0.1`` and ``localhost`` signed by it (``server.pem``, key ``server-key.pem``, mode 0600)
and a client certificate for mutual TLS (``client.pem``, ``client-key.pem``), ECDSA P-256, valid
from a day ago for a week; nothing is reused between runs, so no private key is ever committed.
``TlsRelay(upstream_url, pki)`` listens on a free loopback port, completes the TLS handshake
with the server certificate and copies bytes both ways to the upstream over plain TCP, so an S3
server that speaks only HTTP (moto, SeaweedFS) is reached at ``https://127.0.0.1:<port>``
exactly as a client reaches an on-premises MinIO or Ceph behind a private CA. The relay runs its
own event loop on a thread, so a session fixture, a synchronous test and child processes can all
use it. Shutting down: ``stop()`` closes the listener and every relayed connection, then ends
the thread."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devenv.process import SERVER_READY_TIMEOUT_S, _ManagedServer

LOOPBACK_NAMES: tuple[str, ...] = ("127.0.0.1", "localhost")
RELAY_CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class LocalPki:
    """A CA, one server certificate and one client certificate it signed, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca_file.read_bytes()

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alternative_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_local_pki(
    directory: Path, *, hosts: tuple[str, ...] = LOOPBACK_NAMES, name: str = "si-devenv"
) -> LocalPki:
    """Write a new CA and a server certificate for ``hosts`` into ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{name} test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, *, sans: bool) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(_subject_alternative_names(hosts), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(f"{name} server", ExtendedKeyUsageOID.SERVER_AUTH, sans=True)
    client_key, client_cert = leaf(f"{name} client", ExtendedKeyUsageOID.CLIENT_AUTH, sans=False)
    directory.mkdir(parents=True, exist_ok=True)
    pki = LocalPki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server-key.pem",
        directory / "client.pem",
        directory / "client-key.pem",
    )
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for cert_file, cert, key_file, key in (
        (pki.cert_file, server_cert, pki.key_file, server_key),
        (pki.client_cert_file, client_cert, pki.client_key_file, client_key),
    ):
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as key_out:
            key_out.write(key_bytes)
    return pki


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the end on (or close, where TLS cannot half-close)."""
    try:
        while data := await reader.read(RELAY_CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (ConnectionError, ssl.SSLError):
        writer.close()


class TlsRelay(_ManagedServer[str]):
    """TLS on ``https://127.0.0.1:<free port>`` in front of ``upstream_url`` (plain TCP);
    the endpoint is the relay's URL. ``connections`` counts the TCP connections accepted,
    ``refused_handshakes`` those whose TLS handshake failed."""

    def __init__(self, upstream_url: str, pki: LocalPki) -> None:
        super().__init__()
        parts = urlsplit(upstream_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream URL needs a host and a port: {upstream_url}")
        self._upstream = (parts.hostname, parts.port)
        self._pki = pki
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._context = pki.server_context()
        self.connections = 0  # TCP connections accepted
        self.refused_handshakes = 0  # of those, TLS handshakes that failed (the client refused)

    @property
    def url(self) -> str:
        return self.endpoint

    def _launch(self) -> str:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="tls-relay", daemon=True)
        self._thread.start()
        listening: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(self._listen(), loop)
        self._server = listening.result(timeout=SERVER_READY_TIMEOUT_S)
        port = self._server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}"

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0)

    async def _relay(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [client]
        try:
            try:  # TLS after the accept, so that a connection whose handshake fails counts
                await client.start_tls(self._context)
            except (ssl.SSLError, ConnectionError):
                self.refused_handshakes += 1
                return
            upstream_reader, upstream = await asyncio.open_connection(*self._upstream)
            writers.append(upstream)
            await asyncio.gather(_pipe(client_reader, upstream), _pipe(upstream_reader, client))
        except OSError:
            pass  # the upstream refused: the client sees its connection close
        finally:
            for writer in writers:
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            self._tasks.discard(task)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop, self._thread, self._server = None, None, None
