"""A CA certificate setting that cannot be used is invalid input (exit 2), found before connecting.

Before, ``ssl.create_default_context`` ran inside the Postgres connect mapping, so a missing file
was reported as "cannot reach Postgres" (exit 3). The CLI runs against a port nothing listens on:
exit 2 with the setting's name proves no connection was needed to find the fault.
"""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from pathlib import Path

import pytest

from devenv.process import free_port
from services.pg_tls import pg_ssl_option
from services.settings import PgPoolConfig, PgSslMode, SettingsError
from tests.cli_harness import run_cli

SSL_CA_CERT = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__SSL_CA_CERT"
PG = "SI_SDF__LAYER_DB_CONFIG__PG_POOL_CONFIG__"


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
