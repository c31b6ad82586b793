"""The pure parts of TLS to the layer db and of connection retirement: reading a CA source's
bytes as upstream does, the CA in asyncpg's ``ssl`` argument, the SSLRequest answer, the URL as
messages show it, and the age rule."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devenv.tls import LocalPki, make_local_pki
from services.pg_lifetime import lifetime_reached
from services.pg_tls import SSL_REQUEST, pg_ssl_option, redact_url, remote_ca_url, tls_offered
from services.settings import (
    CertificateKind,
    PgCertificate,
    PgPoolConfig,
    PgSslMode,
    parse_ca_certificates,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return make_local_pki(tmp_path_factory.mktemp("pki"))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------------------------
# A certificate source's bytes, as si-tls reads them


def test_pem_certificates_are_taken_from_around_other_text(pki: LocalPki) -> None:
    ca, server = pki.ca_pem, pki.cert_file.read_bytes()
    bundle = b"# a bundle with a comment\n" + ca + b"\nsome text\n" + server

    parsed = parse_ca_certificates(bundle)

    assert parsed == ca.decode() + server.decode()


def test_base64_of_der_with_surrounding_space_is_the_der(pki: LocalPki) -> None:
    der = der_of(pki.ca_pem)
    assert parse_ca_certificates(b"\n  " + base64.b64encode(der) + b"\n") == der


def test_raw_der_is_the_der(pki: LocalPki) -> None:
    der = der_of(pki.ca_pem)
    assert parse_ca_certificates(der) == der


@pytest.mark.parametrize(
    "data",
    [b"", b"<html>not found</html>", b"\xff\xfe garbage", b"aGVsbG8 (base64 of hello, broken)"],
)
def test_bytes_that_are_no_certificate_are_none(data: bytes) -> None:
    assert parse_ca_certificates(data) is None


def test_base64_source_of_a_pem_file_verifies_with_the_pem(pki: LocalPki) -> None:
    """A Kubernetes Secret holds base64 of ``ca.pem``; ``ssl`` reads bytes as DER, so the
    decoded PEM text must be handed over as text (before: "the CA is not a PEM or DER
    certificate", exit 2)."""
    source = base64.b64encode(pki.ca_pem).decode()
    config = PgPoolConfig(certificate=PgCertificate(type=CertificateKind.BASE64, source=source))

    context = pg_ssl_option(config)

    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname  # no SSLMODE with a certificate: verify-full
    [ca] = context.get_ca_certs()
    assert (("commonName", "si-devenv test CA"),) in ca["subject"]


@pytest.mark.parametrize("encode", ["der-base64", "pem"], ids=["base64-der", "pem"])
def test_as_string_source_of_base64_der_or_pem_verifies(pki: LocalPki, encode: str) -> None:
    source = base64.b64encode(der_of(pki.ca_pem)).decode() if encode == "der-base64" else pki.ca_pem
    certificate = PgCertificate(
        type=CertificateKind.AS_STRING,
        source=source if isinstance(source, str) else source.decode(),
    )

    context = pg_ssl_option(PgPoolConfig(certificate=certificate))

    assert isinstance(context, ssl.SSLContext)
    assert len(context.get_ca_certs()) == 1


def test_fetched_remote_ca_goes_into_the_context(pki: LocalPki) -> None:
    certificate = PgCertificate(type=CertificateKind.REMOTE, source="https://ca.example/ca.pem")
    config = PgPoolConfig(certificate=certificate, sslmode=PgSslMode.VERIFY_CA)

    context = pg_ssl_option(config, remote_ca=parse_ca_certificates(pki.ca_pem))

    assert isinstance(context, ssl.SSLContext)
    assert not context.check_hostname
    assert len(context.get_ca_certs()) == 1


@pytest.mark.parametrize(
    ("sslmode", "ssl_ca_cert", "wanted"),
    [
        (PgSslMode.VERIFY_FULL, None, True),
        (PgSslMode.VERIFY_CA, None, True),
        (PgSslMode.REQUIRE, None, False),  # the CA would not be used: nothing to fetch
        (PgSslMode.VERIFY_FULL, Path("/etc/si/ca.pem"), False),  # ours wins
    ],
)
def test_remote_ca_is_fetched_only_when_it_is_used(
    sslmode: PgSslMode, ssl_ca_cert: Path | None, wanted: bool
) -> None:
    url = "https://ca.example/ca.pem"
    config = PgPoolConfig(
        certificate=PgCertificate(type=CertificateKind.REMOTE, source=url),
        sslmode=sslmode,
        ssl_ca_cert=ssl_ca_cert,
    )
    assert remote_ca_url(config) == (url if wanted else None)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://user:token@ca.example:8443/pki/ca.pem?sig=abc#x",
            "https://ca.example:8443/pki/ca.pem",
        ),
        ("http://127.0.0.1:9/ca.pem", "http://127.0.0.1:9/ca.pem"),
        ("https://[::1]/ca.pem?token=1", "https://[::1]/ca.pem"),
    ],
)
def test_urls_in_messages_lose_user_info_and_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --------------------------------------------------------------------------------------------
# The SSLRequest and its one-byte answer


def test_ssl_request_is_libpqs_eight_bytes() -> None:
    assert SSL_REQUEST.hex() == "0000000804d2162f"


@pytest.mark.parametrize(
    ("answer", "offered"),
    [(b"S", True), (b"N", False), (b"E", None), (b"", None), (b"SX", True), (b"HTTP/1.1", None)],
)
def test_the_servers_answer_says_whether_it_offers_tls(answer: bytes, offered: bool | None) -> None:
    assert tls_offered(answer) is offered


# --------------------------------------------------------------------------------------------
# Connection retirement


@pytest.mark.parametrize(
    ("opened_at", "now", "lifetime_s", "reached"),
    [
        (100.0, 100.0, 72_000.0, False),
        (100.0, 72_099.9, 72_000.0, False),
        (100.0, 72_100.0, 72_000.0, True),  # at the lifetime exactly: retired
        (100.0, 200_000.0, 72_000.0, True),
        (0.0, 1.0, 1.0, True),
    ],
)
def test_a_connection_is_retired_at_or_after_its_lifetime(
    opened_at: float, now: float, lifetime_s: float, reached: bool
) -> None:
    assert lifetime_reached(opened_at, now, lifetime_s) is reached
