"""TLS for the layer cache server: its certificate, reloaded when the files change, and mTLS.

Plain HTTP stays the default (inside a service mesh the sidecar terminates TLS). With
``SI_SDF__SERVER__TLS_CERT_FILE`` and ``…TLS_KEY_FILE`` the server speaks HTTPS only;
``…TLS_CLIENT_CA_FILE`` adds mutual TLS: a client must present a certificate that CA signed, or
the handshake fails before any HTTP is read. ``ServerTls`` builds the ``ssl.SSLContext`` once,
before anything is opened (an unusable file is exit 2, one line naming the setting), and
``watch`` polls the certificate and key every ``RELOAD_INTERVAL_S``: when either changes (a
renewed cert-manager Secret), it loads the new pair into the same context, so new handshakes
present it and open connections are not disturbed. A pair that does not load (half-written, a
key that does not match) is one error line and the previous pair stays. A client CA is read at
start only (OpenSSL adds CAs to a context but never removes them): changing it needs a restart.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import structlog

from layer_cache.errors import SettingsError
from layer_cache_server.watched import FileIdentity, file_identity
from services.settings import ENV_PREFIX, ServerConfig

log = structlog.get_logger(__name__)

RELOAD_INTERVAL_S = 1.0
CERT_ENV = f"{ENV_PREFIX}SERVER__TLS_CERT_FILE"
KEY_ENV = f"{ENV_PREFIX}SERVER__TLS_KEY_FILE"
CLIENT_CA_ENV = f"{ENV_PREFIX}SERVER__TLS_CLIENT_CA_FILE"


def _identity(*paths: Path) -> tuple[FileIdentity | None, ...]:
    return tuple(file_identity(path) for path in paths)


class ServerTls:
    """The server's TLS context and the files it comes from."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._identity = _identity(cert_file, key_file)
        try:
            self.context.load_cert_chain(cert_file, key_file)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(
                f"{CERT_ENV} / {KEY_ENV}: cannot load {cert_file} and {key_file} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        if client_ca_file is not None:
            try:
                self.context.load_verify_locations(cafile=client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(
                    f"{CLIENT_CA_ENV}: cannot read a CA certificate from {client_ca_file} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self.context.verify_mode = ssl.CERT_REQUIRED

    @property
    def mode(self) -> str:
        """``tls`` or ``mutual tls``, for the start-up line."""
        return "mutual tls" if self.client_ca_file is not None else "tls"

    def reload_if_changed(self) -> bool:
        """Load the pair again when either file changed; True if the new pair is in use."""
        identity = _identity(self.cert_file, self.key_file)
        if identity == self._identity:
            return False
        self._identity = identity
        try:
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "tls certificate not reloaded; the previous one stays",
                cert_file=str(self.cert_file),
                reason=f"{type(exc).__name__}: {exc}",
            )
            return False
        log.info("tls certificate reloaded", cert_file=str(self.cert_file))
        return True

    async def watch(self, interval_s: float = RELOAD_INTERVAL_S) -> None:
        """Reload a changed pair every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.reload_if_changed)


def server_tls(config: ServerConfig) -> ServerTls | None:
    """The server's TLS from its settings, or None for plain HTTP."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    return ServerTls(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
