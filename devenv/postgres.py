"""Real PostgreSQL servers: ``LocalPostgres`` from the machine's binaries, or a container.

``LocalPostgres`` runs the binaries under ``/usr/lib/postgresql/<version>/bin`` (or
``$SI_DEVENV_PG_BIN``) in a private temporary directory holding the data directory, the
unix-socket directory and the log: ``initdb`` (``--locale=C.UTF-8``, falling back to
``--no-locale``), then ``pg_ctl`` on a free port, tuned for throwaway data (``fsync=off``...)
unless ``durable=True`` (fsync and synchronous commits on, as a production server, for
benchmarks that compare durable writes).
Socket connections are trusted, TCP ones need a password (SCRAM), so the app role
``si``/``bugbear`` really authenticates; the superuser ``postgres``/``postgres-dev`` is kept for
tests that create roles or databases. ``LocalPostgres(tls=True)`` also serves TLS (``ssl=on``)
with a CA and a server certificate for 127.0.0.1/localhost made for it at start
(``devenv.tls.make_local_pki``, in the private directory, owned by the server's OS user, the key
mode 0600); ``pki`` names the files, and clients may still connect without TLS. As root, every
binary runs as the ``postgres`` OS user through ``runuser``. ``LocalPostgres.start_standby()``
makes a hot standby of a running ``LocalPostgres``: ``pg_basebackup -R`` over the primary's
socket into a directory of its own, started on a free port, streaming the primary's WAL (its
roles and databases are the primary's); ``LocalStandby.catch_up()`` waits until it has replayed
everything the primary has written. The standby exists only for the local binaries: with a
``ContainerPostgres`` (Docker) the read replica tests are skipped, saying so.
``ContainerPostgres`` runs ``postgres:15`` through testcontainers when a Docker engine answers
(``si`` is its superuser). Shutting down (see ``devenv.process``): ``pg_ctl stop -m fast``
(``-m immediate`` if that fails), then the directory is deleted (stop a standby before its
primary); containers are removed by testcontainers, whose Ryuk reaper also removes them if this
process is killed.
"""

from __future__ import annotations

import abc
import os
import pwd
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from devenv.process import (
    PROCESS_STOP_TIMEOUT_S,
    SERVER_READY_TIMEOUT_S,
    _describe_failure,
    _make_workdir,
    _ManagedServer,
    _poll_until,
    _run,
    _tail,
    docker_available,
    free_port,
)
from devenv.tls import LocalPki, make_local_pki

if TYPE_CHECKING:
    from testcontainers.community.postgres import PostgresContainer

APP_USER = "si"
APP_PASSWORD = "bugbear"
APP_DBNAME = "si_layer_db"
LOCAL_SUPERUSER = "postgres"
LOCAL_SUPERUSER_PASSWORD = "postgres-dev"
POSTGRES_OS_USER = "postgres"
POSTGRES_IMAGE = "postgres:15"

PG_BIN_ENV = "SI_DEVENV_PG_BIN"
PG_CTL_TIMEOUT_S = 60
STANDBY_CATCH_UP_TIMEOUT_S = 30.0

# The order in which initdb locales are tried: C.UTF-8 keeps UTF-8 character semantics with
# byte-order collation; --no-locale (plain C) works on any machine.
INITDB_LOCALE_CHOICES: tuple[tuple[str, ...], ...] = (("--locale=C.UTF-8",), ("--no-locale",))


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


def start_postgres(*, prefer_docker: bool | None = None, durable: bool = False) -> PostgresServer:
    """Start PostgreSQL: True = in Docker, False = local binaries, None = Docker if it answers.
    ``durable``: fsync and synchronous commits on (a container always has them)."""
    use_docker = docker_available() if prefer_docker is None else prefer_docker
    server: PostgresServer = ContainerPostgres() if use_docker else LocalPostgres(durable=durable)
    server.start()
    return server


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

    def __init__(
        self, *, bin_dir: Path | None = None, tls: bool = False, durable: bool = False
    ) -> None:
        super().__init__()
        self._bin_dir = bin_dir if bin_dir is not None else _postgres_bin_dir()
        self._tls = tls
        self._durable = durable
        self._pki: LocalPki | None = None
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
        if self._tls:
            self._pki = self._make_pki()
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
        self._pki = None

    @property
    def pki(self) -> LocalPki:
        """The CA and server certificate of a server started with ``tls=True``."""
        if self._pki is None:
            raise RuntimeError("this LocalPostgres does not serve TLS (start it with tls=True)")
        return self._pki

    def _make_pki(self) -> LocalPki:
        """A CA and a server certificate, readable by the server's OS user alone."""
        assert self._workdir is not None
        pki = make_local_pki(self._workdir / "tls", name="si-devenv-postgres")
        if self._os_user is not None:
            for path in (pki.ca_file.parent, pki.ca_file, pki.cert_file, pki.key_file):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
        return pki

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
                *self._throwaway_options(),
                *("-c", "max_connections=200"),
                *self._tls_options(),
            ]
        )

    def _throwaway_options(self) -> list[str]:
        """Skip the disk flushes a throwaway database does not need (none when durable)."""
        if self._durable:
            return []
        return [
            *("-c", "fsync=off"),
            *("-c", "synchronous_commit=off"),
            *("-c", "full_page_writes=off"),
        ]

    def _tls_options(self) -> list[str]:
        if self._pki is None:
            return []
        return [
            *("-c", "ssl=on"),
            *("-c", f"ssl_cert_file={self._pki.cert_file}"),
            *("-c", f"ssl_key_file={self._pki.key_file}"),
        ]

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

    def query(self, *statements: str, dbname: str = "postgres") -> str:
        """Run statements (each its own transaction, in one session) as the superuser over the
        socket; the last line they print, unaligned."""
        result = self._run_binary(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self._socket_dir), "-p", str(self._port),
            "-U", LOCAL_SUPERUSER, "-d", dbname,
            *(arg for statement in statements for arg in ("-c", statement)),
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(_describe_failure(result))
        lines = result.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def start_standby(self, *, settings: Mapping[str, str] | None = None) -> LocalStandby:
        """A running hot standby of this server; ``settings`` are its own server options
        (``max_standby_streaming_delay``, ``hot_standby_feedback``...)."""
        standby = LocalStandby(self, settings=settings)
        standby.start()
        return standby


class LocalStandby(LocalPostgres):
    """A hot standby of a running ``LocalPostgres``, streaming its WAL; read-only, same roles."""

    def __init__(
        self, primary: LocalPostgres, *, settings: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(bin_dir=primary._bin_dir)
        self._primary = primary
        self._settings = dict(settings or {})

    def _launch(self) -> PostgresEndpoint:
        primary = self._primary.endpoint  # raises unless the primary runs
        self._workdir = _make_workdir("pg-standby", owner=self._os_user)
        # -R writes standby.signal and primary_conninfo (the primary's socket, as the superuser,
        # whom the socket trusts, for replication too); -X stream copies the WAL of the copy.
        result = self._run_binary(
            "pg_basebackup", "-D", str(self._data_dir), "-R", "-X", "stream",
            "-c", "fast", "--no-sync",
            "-h", str(self._primary._socket_dir), "-p", str(primary.port), "-U", LOCAL_SUPERUSER,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(_describe_failure(result))
        self._port = free_port()
        self._pg_ctl("start", "-l", str(self._log_file), "-o", self._options())
        if self.query("SELECT pg_is_in_recovery()") != "t":
            raise RuntimeError(f"the standby in {self._data_dir} is not in recovery")
        return replace(primary, port=self._port)

    def _options(self) -> str:
        settings = {"hot_standby": "on", **self._settings}
        extra = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        return f"{super()._options()} {shlex.join(extra)}"

    def catch_up(self, *, timeout_s: float = STANDBY_CATCH_UP_TIMEOUT_S) -> None:
        """Wait until this standby has replayed all the WAL its primary has written so far
        (so rows committed there are visible here); TimeoutError after ``timeout_s``."""
        # The primary commits asynchronously (synchronous_commit=off), so its latest commits
        # may not be written yet: a transaction that logs a message (no data) and commits with
        # it on flushes all the WAL before it, which the WAL sender then streams.
        target = self._primary.query(
            "SET synchronous_commit = on",
            "SELECT pg_logical_emit_message(true, 'si-devenv', 'standby catch-up')",
            "SELECT pg_current_wal_lsn()",
        )
        replayed = f"SELECT pg_last_wal_replay_lsn() >= {_sql_literal(target)}::pg_lsn"
        deadline = time.monotonic() + timeout_s
        while self.query(replayed) != "t":
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the standby did not replay up to {target} within {timeout_s:.0f} s\n"
                    f"--- standby log ---\n{_tail(self._log_file)}"
                )
            time.sleep(0.02)


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
