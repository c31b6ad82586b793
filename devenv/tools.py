"""The test tools pip does not install: fetched by ``make`` (``python -m devenv.fetch``), only
looked up by the tests.

The fetchers: Debian 13's ``prometheus`` and ``victoria-metrics`` packages with ``apt-get
download`` through a private apt configuration under ``<repo>/.devenv/<package>`` (the system's
sources are untouched) unpacked by ``dpkg-deb``; the npm package ``s3rver`` into
``<repo>/.devenv/node``; every step bounded (5 minutes), a failure returned as one line. The
lookups (``debian_binary``: ``PATH`` first; ``s3rver_script``) never download: a missing tool
raises ``MissingTool`` naming ``make test``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from devenv.process import REPO_ROOT

DEVENV_DIR = REPO_ROOT / ".devenv"
NODE_CACHE_DIR = DEVENV_DIR / "node"
S3RVER_PACKAGE = "s3rver"
S3RVER_VERSION = "3.7.1"
DEBIAN_SOURCE = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
    "http://deb.debian.org/debian trixie main\n"
)
STEP_TIMEOUT_S = 300
FETCH_COMMAND = "`make test` fetches it (python -m devenv.fetch)"


class MissingTool(RuntimeError):
    """A tool the tests need is not installed; the message names the command that fetches it."""


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {STEP_TIMEOUT_S} s")


def _failure(step: str, result: subprocess.CompletedProcess[str]) -> str:
    last_line = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:]
    return f"{step} failed (exit {result.returncode}): {' '.join(last_line)}"


def _debian_local_binary(package: str, binary: str) -> Path:
    return DEVENV_DIR / package / "usr" / "bin" / binary


def debian_binary(package: str, binary: str) -> str:
    """``binary`` from ``PATH``, else from Debian's ``package`` fetched under ``.devenv``."""
    on_path = shutil.which(binary)
    if on_path is not None:
        return on_path
    local = _debian_local_binary(package, binary)
    if not local.exists():
        raise MissingTool(f"{binary} is not installed: {FETCH_COMMAND}")
    return str(local)


def fetch_debian_package(package: str, binary: str) -> str | None:
    """Download and unpack Debian 13's ``package`` under ``.devenv``; None on success, else why."""
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt_get is None or dpkg_deb is None:
        return (
            f"no apt-get/dpkg-deb here: install Debian's {package} package or put {binary} on PATH"
        )
    target = DEVENV_DIR / package
    apt_dir = target / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(DEBIAN_SOURCE, encoding="utf-8")
    options = [
        f"-oDir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={apt_dir / 'lists'}",
        f"-oDir::Cache={apt_dir / 'cache'}",
        "-oDir::State::status=/dev/null",
        "-oAPT::Sandbox::User=root",
    ]
    for step in ([apt_get, *options, "update"], [apt_get, *options, "download", package]):
        result = _run(step, cwd=apt_dir / "debs")
        if result.returncode != 0:
            return _failure(f"apt-get {step[-1]}", result)
    packages = sorted((apt_dir / "debs").glob(f"{package}_*.deb"))
    if not packages:
        return f"apt-get download {package} left no package"
    unpacked = _run([dpkg_deb, "-x", str(packages[-1]), str(target)])
    if unpacked.returncode != 0:
        return _failure("dpkg-deb -x", unpacked)
    if not _debian_local_binary(package, binary).exists():
        return f"Debian's {package} package has no usr/bin/{binary}"
    return None


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` (two ``make`` runs install once)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _s3rver_dir() -> Path:
    return NODE_CACHE_DIR / "node_modules" / S3RVER_PACKAGE


def _installed_npm_version(package_dir: Path) -> str | None:
    try:
        manifest = json.loads((package_dir / "package.json").read_text())
    except FileNotFoundError:
        return None
    version = manifest.get("version")
    return version if isinstance(version, str) else None


def s3rver_script() -> Path:
    """The CLI script of the s3rver installed under ``.devenv/node`` at ``S3RVER_VERSION``."""
    if _installed_npm_version(_s3rver_dir()) != S3RVER_VERSION:
        raise MissingTool(f"s3rver {S3RVER_VERSION} is not installed: {FETCH_COMMAND}")
    return _s3rver_dir() / "bin" / "s3rver.js"


def install_s3rver() -> str | None:
    """Install s3rver into the repo's node cache; None on success, else why not."""
    npm = shutil.which("npm")
    if npm is None:
        return "`npm` is not on PATH: install Node.js (apt-get install nodejs npm)"
    with _exclusive_lock(NODE_CACHE_DIR / ".install.lock"):
        if _installed_npm_version(_s3rver_dir()) == S3RVER_VERSION:
            return None
        result = _run(
            [
                npm, "install", "--no-audit", "--no-fund",
                "--prefix", str(NODE_CACHE_DIR), f"{S3RVER_PACKAGE}@{S3RVER_VERSION}",
            ]
        )  # fmt: skip
    return None if result.returncode == 0 else _failure("npm install s3rver", result)
