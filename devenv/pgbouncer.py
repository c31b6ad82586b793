"""A real PgBouncer in front of a running PostgreSQL, for tests (transaction pool mode by default).

``LocalPgBouncer(upstream)`` writes a ``pgbouncer.ini`` and a ``userlist.txt`` (the app role and
the superuser, SCRAM between client and PgBouncer) into a private temporary directory and runs
the machine's ``pgbouncer`` binary (Debian's ``pgbouncer`` package; ``make test`` installs it) in
the foreground on a free loopback port, in a session of its own. PgBouncer refuses to run as
root, so root runs it as the ``postgres`` OS user through ``runuser``. Its endpoint is the
upstream's with PgBouncer's host and port, so a client cannot tell it from the database.

``default_pool_size`` is small on purpose: clients share few server connections, so a client that
keeps session state (asyncpg's named prepared statements) meets another client's server session.

Shutting down: ``stop()`` (also at exit and on SIGTERM, as every ``devenv.process`` server) sends
SIGTERM, then SIGKILL after 10 s, and deletes the directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

from devenv.postgres import POSTGRES_OS_USER, PostgresEndpoint
from devenv.process import (
    SERVER_READY_TIMEOUT_S,
    _make_workdir,
    _ManagedServer,
    _poll_until,
    _tail,
    _terminate,
    free_port,
)

PGBOUNCER_BINARIES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_binary() -> Path:
    """The installed ``pgbouncer``; a RuntimeError that says how to install it otherwise."""
    found = shutil.which("pgbouncer") or next(
        (path for path in PGBOUNCER_BINARIES if Path(path).exists()), None
    )
    if found is None:
        raise RuntimeError("pgbouncer is not installed: apt-get install pgbouncer (make test does)")
    return Path(found)


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class LocalPgBouncer(_ManagedServer[PostgresEndpoint]):
    """PgBouncer in ``pool_mode`` in front of ``upstream``, on a free loopback port."""

    def __init__(
        self, upstream: PostgresEndpoint, *, pool_mode: str = "transaction", pool_size: int = 2
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._pool_mode = pool_mode
        self._pool_size = pool_size
        self._os_user = pwd.getpwnam(POSTGRES_OS_USER) if os.geteuid() == 0 else None
        self._workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._port = 0

    def _launch(self) -> PostgresEndpoint:
        binary = pgbouncer_binary()
        self._workdir = _make_workdir("pgbouncer", owner=self._os_user)
        self._port = free_port()
        config = self._write_config()
        command = [str(binary), str(config)]
        if self._os_user is not None:
            command = ["runuser", "-u", self._os_user.pw_name, "--", *command]
        self._process = subprocess.Popen(
            command,
            cwd=self._workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _poll_until(self._accepts_tcp, timeout_s=SERVER_READY_TIMEOUT_S, what="pgbouncer")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; its log:\n{_tail(self._log_file)}") from None
        return replace(self._upstream, host="127.0.0.1", port=self._port)

    def _shutdown(self) -> None:
        if self._process is not None:
            _terminate(self._process)
            self._process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def _log_file(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "pgbouncer.log"

    def _write_config(self) -> Path:
        assert self._workdir is not None
        upstream = self._upstream
        users = {upstream.user: upstream.password, upstream.superuser: upstream.superuser_password}
        userlist = self._workdir / "userlist.txt"
        userlist.write_text(
            "".join(f"{_quoted(user)} {_quoted(password)}\n" for user, password in users.items())
        )
        config = self._workdir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={upstream.host} port={upstream.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self._port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {userlist}\n"
            f"pool_mode = {self._pool_mode}\n"
            f"default_pool_size = {self._pool_size}\n"
            "max_client_conn = 500\n"
            f"logfile = {self._log_file}\n"
            f"pidfile = {self._workdir / 'pgbouncer.pid'}\n"
        )
        if self._os_user is not None:
            for path in (userlist, config):
                os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)
            userlist.chmod(0o600)
        return config

    def _accepts_tcp(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with {self._process.returncode}:\n{_tail(self._log_file)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=1):
                return True
        except OSError:
            return False
