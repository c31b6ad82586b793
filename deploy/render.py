"""Render the layer cache's Kubernetes manifests from one values file.

Run from the repository root::

    python -m deploy.render -f my-values.yaml -o manifests/   # write the manifests
    python -m deploy.render -f my-values.yaml                 # print them (kubectl create -f -)
    python -m deploy.render --examples                        # rewrite deploy/rendered/
    python -m deploy.render --examples --check                # exit 1 when it is stale

``deploy/values.yaml`` holds every setting with its default. The values are that file with each
``-f`` file merged on top, in order (mappings key by key; anything else, lists included,
replaces), then checked against ``Values``: an unknown setting (with the closest known name), a
wrong type or a combination the pods would refuse is one line and exit 2, before anything is
written. ``render`` is pure: values in, manifests out (``OUTPUT_FILES``):

* ``backfill-job.yaml``: the backfill, a Job of one pod, or with ``backfill.shards`` K > 1 an
  Indexed Job of K pods that each copy one shard; exits 2 and 3 fail it at once, 1, 137 and 143
  are retried in a new pod that resumes from the saved progress.
* ``server.yaml``: the layer cache server, a Service and a StatefulSet whose replicas each get
  their own PersistentVolumeClaim for the S3 write queue (a queue directory must never be shared
  or opened by two processes, which a Deployment's one claim cannot promise), and a
  NetworkPolicy that admits only the named clients to the API port and the named scrapers to the
  metrics port. The server's token files, TLS pair and client CA are Secret (or ConfigMap)
  volumes mounted whole and read-only, never through env or subPath, so that a rotation reaches
  the running server.
* ``monitoring.yaml``: the Prometheus Operator's PodMonitor (backfill pods) and ServiceMonitor
  (the server's Service), when the values ask for them.

Every pod runs as the image's non-root user with a read-only root file system; what it may write
is a small ``/tmp`` and, for the server, its write-queue volume. Metrics go out both ways
operators run them: a Prometheus port named ``metrics`` (``SI_SDF__METRICS_PORT``) and OTLP to a
collector (``OTEL_EXPORTER_OTLP_ENDPOINT``), or explicitly nowhere (``OTEL_METRICS_EXPORTER=none``).

Standalone by design: the standard library and PyYAML, nothing of the product (import-linter
keeps it so), so any Python 3.11 with PyYAML runs it; ``tests/unit/test_deploy.py`` checks what
it renders against the service's own settings, exit statuses and image. ``deploy/README.md`` is
the operator's guide.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEPLOY_DIR.parent
VALUES_PATH = DEPLOY_DIR / "values.yaml"
EXAMPLES_DIR = DEPLOY_DIR / "examples"
RENDERED_DIR = DEPLOY_DIR / "rendered"
DEFAULT_EXAMPLE = "default"  # deploy/values.yaml alone

BACKFILL_FILE = "backfill-job.yaml"
SERVER_FILE = "server.yaml"
MONITORING_FILE = "monitoring.yaml"
OUTPUT_FILES = (BACKFILL_FILE, SERVER_FILE, MONITORING_FILE)

# The image (Dockerfile): its numeric non-root user and the server's write-queue directory.
RUN_AS = 10001
WRITE_QUEUE_DIR = "/var/lib/si-layer-cache/write-queue"
TMP_DIR = "/tmp"
TMP_SIZE_LIMIT = "64Mi"
PG_CA_DIR = "/etc/si/pg-ca"
PG_CA_FILE = "ca.crt"

# The server's access files (docs/server.md#access-control), each a key of a Secret (the client
# CA: or of a ConfigMap) mounted as a whole volume, read-only: the kubelet updates such a volume
# in place when the Secret changes and the server re-reads the files, so a token or certificate is
# rotated without a restart (a subPath mount is never updated; an env var needs a restart).
TOKENS_DIR = "/etc/si/server-tokens"
READ_TOKENS_FILE = "read-tokens"
WRITE_TOKENS_FILE = "write-tokens"
TLS_DIR = "/etc/si/server-tls"
TLS_CERT_FILE = "tls.crt"  # the keys of a kubernetes.io/tls Secret, as cert-manager writes them
TLS_KEY_FILE = "tls.key"
CLIENT_CA_DIR = "/etc/si/server-client-ca"
CLIENT_CA_FILE = "ca.crt"

# The keys of our Secret (deploy/secret.example.yaml).
PG_PASSWORD_KEY = "pg-password"
S3_ACCESS_KEY_KEY = "s3-access-key"
S3_SECRET_KEY_KEY = "s3-secret-key"

# The service's exit statuses (si_layer_cache.cli) that no retry can fix: invalid input, and an
# environment that is not ready. A test keeps them equal to the CLI's.
EXIT_INVALID_INPUT = 2
EXIT_ENVIRONMENT = 3
# terminationGracePeriodSeconds is the grace period plus this: after the drain the backfill saves
# its progress, closes its pools and flushes metrics (about 10 s at most); the server closes its
# pools and flushes metrics (about 6 s).
BACKFILL_SHUTDOWN_HEADROOM_S = 25
SERVER_SHUTDOWN_HEADROOM_S = 10
COMPLETION_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

APP = "si-layer-cache"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
METRICS_PORT_NAME = "metrics"
HTTP_PORT_NAME = "http"
CONTAINER_NAMES = {"backfill": "backfill", "server": "server"}
MONITORING_API = "monitoring.coreos.com/v1"

SI = "SI_SDF__"
SERVER = SI + "SERVER__"
PG = SI + "LAYER_DB_CONFIG__PG_POOL_CONFIG__"
STORAGE = SI + "LAYER_DB_CONFIG__OBJECT_STORAGE_CONFIG__"

EXIT_OK, EXIT_STALE, EXIT_INVALID = 0, 1, 2

# --------------------------------------------------------------------------------------------
# The values: what deploy/values.yaml may hold, typed. Keys are the field names in camelCase.

Scalar = str | int | float | bool
Quantity = str | int
PersisterMode = Literal["PostgresOnly", "DualWrite", "S3Primary", "S3Only"]
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


@dataclass(frozen=True)
class Image:
    repository: str
    tag: str
    pull_policy: Literal["Always", "IfNotPresent", "Never"]
    pull_secrets: list[str]

    @property
    def reference(self) -> str:
        """``repository:tag``, or ``repository@sha256:…`` for a digest."""
        separator = "@" if self.tag.startswith("sha256:") else ":"
        return f"{self.repository}{separator}{self.tag}"


@dataclass(frozen=True)
class Postgres:
    host: str | None
    port: int | None
    dbname: str | None
    user: str | None
    sslmode: SslMode | None
    ca_secret_name: str | None
    ca_secret_key: str | None
    pool_max_size: int | None


@dataclass(frozen=True)
class ObjectStorage:
    endpoint: str | None
    region: str | None
    bucket_prefix: str | None
    bucket_suffix: str | None
    auth: Literal["static", "iam_role"]
    service_account_name: str | None


@dataclass(frozen=True)
class Secret:
    name: str | None


@dataclass(frozen=True)
class Sdf:
    config_map: str | None
    secret: str | None


@dataclass(frozen=True)
class Prometheus:
    port: int | None
    pod_monitor: bool
    service_monitor: bool
    interval: str
    labels: dict[str, str]


@dataclass(frozen=True)
class Otlp:
    endpoint: str | None
    protocol: Literal["grpc", "http/protobuf"]


@dataclass(frozen=True)
class Metrics:
    prometheus: Prometheus
    otlp: Otlp


@dataclass(frozen=True)
class Resources:
    requests: dict[str, Quantity]
    limits: dict[str, Quantity]


@dataclass(frozen=True)
class Backfill:
    enabled: bool
    name: str
    cutoff: str
    cache_types: list[str]
    shards: int
    grace_period_secs: int
    max_inflight_bytes: Quantity
    active_deadline_seconds: int
    backoff_limit: int
    backoff_limit_per_index: int
    max_failed_indexes: int
    ttl_seconds_after_finished: int
    resources: Resources
    env: dict[str, Scalar]

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    @property
    def termination_grace_period_s(self) -> int:
        return self.grace_period_secs + BACKFILL_SHUTDOWN_HEADROOM_S


@dataclass(frozen=True)
class WriteQueue:
    size: Quantity
    storage_class_name: str | None


@dataclass(frozen=True)
class ServerAuth:
    mode: Literal["tokens", "none"]
    secret_name: str | None
    read_tokens_key: str | None
    write_tokens_key: str | None

    @property
    def token_keys(self) -> dict[str, str]:
        """The token files the server reads (file name in the mount → the Secret's key)."""
        if self.mode == "none":
            return {}
        keys = {READ_TOKENS_FILE: self.read_tokens_key, WRITE_TOKENS_FILE: self.write_tokens_key}
        return {file: key for file, key in keys.items() if key is not None}

    @property
    def secret(self) -> str | None:
        """The token Secret the pods mount (none when the server runs open)."""
        return self.secret_name if self.token_keys else None


@dataclass(frozen=True)
class ClientCa:
    secret_name: str | None
    config_map_name: str | None
    key: str


@dataclass(frozen=True)
class ServerTls:
    secret_name: str | None
    client_ca: ClientCa

    @property
    def enabled(self) -> bool:
        return self.secret_name is not None

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate (a client CA is named)."""
        ca = self.client_ca
        return self.enabled and (ca.secret_name or ca.config_map_name) is not None


@dataclass(frozen=True)
class LabelSelector:
    match_labels: dict[str, str]


@dataclass(frozen=True)
class Peer:
    """A NetworkPolicy peer: pods by namespace labels, pod labels, or both."""

    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None


@dataclass(frozen=True)
class NetworkPolicy:
    enabled: bool
    allow_from: list[Peer]
    metrics_from: list[Peer]
    deny_all: bool


@dataclass(frozen=True)
class Server:
    enabled: bool
    name: str
    replicas: int
    port: int
    migration_mode: Literal["run", "skip"]
    grace_period_secs: int
    pre_stop_sleep_secs: int
    auth: ServerAuth
    tls: ServerTls
    network_policy: NetworkPolicy
    write_queue: WriteQueue
    resources: Resources
    env: dict[str, Scalar]

    @property
    def termination_grace_period_s(self) -> int:
        return self.pre_stop_sleep_secs + self.grace_period_secs + SERVER_SHUTDOWN_HEADROOM_S


@dataclass(frozen=True)
class Values:
    image: Image
    namespace: str | None
    persister_mode: PersisterMode
    postgres: Postgres
    object_storage: ObjectStorage
    secret: Secret
    sdf: Sdf
    metrics: Metrics
    backfill: Backfill
    server: Server
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]


class ValuesError(Exception):
    """Values the renderer refuses; the message is one line naming the setting."""


def setting_key(field_name: str) -> str:
    """The values file's key for a field: camelCase."""
    head, *rest = field_name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _path(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(str(option) for option in get_args(hint))
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    if hint is type(None):
        return "null"
    return _TYPE_NAMES.get(hint, str(hint))


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` as the type ``hint`` describes, or ``ValuesError`` naming ``where``."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _section(hint, value, where)
    if origin in (Union, types.UnionType):
        section = [option for option in get_args(hint) if dataclasses.is_dataclass(option)]
        if section and isinstance(value, dict):
            # A mapping can only be the section: its own error names the setting inside it.
            return _convert(section[0], value, where)
        for option in get_args(hint):
            try:
                return _convert(option, value, where)
            except ValuesError:
                continue
        raise ValuesError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        if value in get_args(hint) and isinstance(value, str):
            return value
        raise ValuesError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ValuesError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, entry, f"{where}[{i}]") for i, entry in enumerate(value)]
    if origin is dict:
        _key, item = get_args(hint)
        if not isinstance(value, dict):
            raise ValuesError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(item, v, _path(where, k)) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool)):
        return value
    raise ValuesError(f"{where}: expected {_describe(hint)}, got {value!r}")


def _section(cls: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ValuesError(f"{where or 'the values'}: expected a mapping, got {value!r}")
    hints = get_type_hints(cls)
    by_key = {setting_key(field.name): field for field in dataclasses.fields(cls)}
    for key in value:
        if key not in by_key:
            close = difflib.get_close_matches(str(key), list(by_key), n=1)
            hint = f" (did you mean {_path(where, close[0])}?)" if close else ""
            raise ValuesError(f"unknown setting {_path(where, key)}{hint}")
    for key, field in by_key.items():
        # Only a list entry's fields have defaults (a peer names one selector or both).
        if key not in value and field.default is dataclasses.MISSING:
            raise ValuesError(f"missing setting {_path(where, key)}")
    return cls(
        **{
            field.name: _convert(hints[field.name], value[key], _path(where, key))
            for key, field in by_key.items()
            if key in value
        }
    )


def merge(base: Any, override: Any) -> Any:
    """``override`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def read_values_file(path: Path) -> dict[str, Any]:
    """One values file as a mapping (empty file: no settings)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValuesError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValuesError(f"{where}: not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ValuesError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValuesError(f"{path}: expected a mapping of settings at the top")
    return loaded


def load_values(overrides: Sequence[Path] = (), *, base: Path = VALUES_PATH) -> Values:
    """deploy/values.yaml with each override merged on top, checked."""
    merged = read_values_file(base)
    for path in overrides:
        merged = merge(merged, read_values_file(path))
    return values_from_mapping(merged)


def values_from_mapping(merged: Mapping[str, Any]) -> Values:
    """Typed and checked values from a merged mapping."""
    values: Values = _section(Values, dict(merged), "")
    check(values)
    return values


# --------------------------------------------------------------------------------------------
# What the pods would refuse, refused here with the setting's name

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The Prometheus Operator's duration format (a Go-like duration without fractions).
DURATION = re.compile(
    r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
)
URL = re.compile(r"^https?://[^/:\s]+(:[0-9]{1,5})?(/\S*)?$")
# A StatefulSet's name ends up in its pods' controller-revision-hash label (63 characters at
# most, with an 11-character suffix).
MAX_STATEFULSET_NAME = 52


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValuesError(message)


def _check_name(name: str, where: str, limit: int = 63) -> None:
    _require(
        bool(DNS_LABEL.match(name)) and len(name) <= limit,
        f"{where}: {name!r} is not a Kubernetes name (lowercase letters, digits and '-', "
        f"at most {limit} characters)",
    )


def _check_port(port: int | None, where: str) -> None:
    _require(port is None or 1 <= port <= 65535, f"{where}: {port} is not a port (1-65535)")


# Variables a setting owns even when the values leave them out (an unsharded Job must not be
# told it is one of several shards; metrics go where metrics.* says; access is server.auth's and
# server.tls's, never a literal path to a file the pod does not mount).
OWNED_ENV = {
    SERVER + "AUTH",
    SERVER + "READ_TOKENS_FILE",
    SERVER + "WRITE_TOKENS_FILE",
    SERVER + "TLS_CERT_FILE",
    SERVER + "TLS_KEY_FILE",
    SERVER + "TLS_CLIENT_CA_FILE",
    "SI_BACKFILL_SHARD_COUNT",
    "SI_BACKFILL_SHARD_INDEX",
    "JOB_COMPLETION_INDEX",
    SI + "METRICS_PORT",
    "OTEL_METRICS_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
}


# Names that hold credentials: never a literal value in a manifest, only a Secret reference.
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDS", re.IGNORECASE)


def _check_env(env: Mapping[str, Scalar], rendered: set[str], where: str) -> None:
    for name in env:
        _require(bool(ENV_NAME.match(name)), f"{where}.{name}: not an environment variable name")
        _require(
            name not in rendered | OWNED_ENV,
            f"{where}.{name}: rendered from the settings already; change that setting instead",
        )
        _require(
            CREDENTIAL_NAME.search(name) is None,
            f"{where}.{name}: a credential as a literal value; put it in a Secret (secret.name "
            "or sdf.secret)",
        )


# A label's name (an optional DNS-subdomain prefix and '/') and value, as the API server checks
# them in a selector; a key of a Secret or ConfigMap.
_LABEL_PART = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
LABEL_NAME = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_PART}$")
LABEL_VALUE = re.compile(rf"^{_LABEL_PART}?$")
DATA_KEY = re.compile(r"^[-._A-Za-z0-9]{1,253}$")


def _check_key(key: str, where: str) -> None:
    _require(
        bool(DATA_KEY.match(key)) and key not in (".", ".."),
        f"{where}: {key!r} is not a key of a Secret or ConfigMap (letters, digits, '-', '_', '.')",
    )


def _check_peers(peers: Sequence[Peer], where: str) -> None:
    for index, peer in enumerate(peers):
        at = f"{where}[{index}]"
        selectors = {
            "namespaceSelector": (peer.namespace_selector, "namespace"),
            "podSelector": (peer.pod_selector, "pod"),
        }
        _require(
            any(selector is not None for selector, _what in selectors.values()),
            f"{at}: name a namespaceSelector, a podSelector or both",
        )
        for key, (selector, what) in selectors.items():
            if selector is None:
                continue
            labels_at = f"{at}.{key}.matchLabels"
            # An empty selector matches every namespace (or pod): never what "name who may
            # connect" means; networkPolicy.enabled false is the honest way to admit everyone.
            _require(bool(selector.match_labels), f"{labels_at}: empty, which matches every {what}")
            for name, value in selector.match_labels.items():
                _require(bool(LABEL_NAME.match(name)), f"{labels_at}: {name!r} is not a label name")
                _require(
                    bool(LABEL_VALUE.match(value)),
                    f"{labels_at}.{name}: {value!r} is not a label value (at most 63 letters, "
                    "digits, '-', '_' and '.')",
                )


def _check_access(values: Values) -> None:
    """server.auth, server.tls and server.networkPolicy."""
    auth, tls, policy = values.server.auth, values.server.tls, values.server.network_policy
    if auth.mode == "tokens":
        _require(
            auth.secret_name is not None,
            "server.auth.secretName: mode tokens reads the tokens from a Secret; name it (or set "
            "mode none to let every client in)",
        )
        _require(
            bool(auth.token_keys),
            "server.auth: mode tokens needs readTokensKey, writeTokensKey or both",
        )
        for name in ("read_tokens_key", "write_tokens_key"):
            key = getattr(auth, name)
            if key is not None:
                _check_key(key, f"server.auth.{setting_key(name)}")
    ca = tls.client_ca
    _require(
        ca.secret_name is None or ca.config_map_name is None,
        "server.tls.clientCa: secretName or configMapName, not both",
    )
    _require(
        tls.enabled or (ca.secret_name is None and ca.config_map_name is None),
        "server.tls.clientCa: mutual TLS needs server.tls.secretName",
    )
    _check_key(ca.key, "server.tls.clientCa.key")
    if not policy.enabled:
        return
    _check_peers(policy.allow_from, "server.networkPolicy.allowFrom")
    _check_peers(policy.metrics_from, "server.networkPolicy.metricsFrom")
    if policy.deny_all:
        _require(
            not policy.allow_from and not policy.metrics_from,
            "server.networkPolicy.denyAll: admits no one, so allowFrom and metricsFrom must be "
            "empty (or set denyAll false)",
        )
        return
    _require(
        bool(policy.allow_from),
        "server.networkPolicy.allowFrom: empty, which admits no client; name the clients' "
        "namespaces or pods (denyAll: true to admit no one on purpose, enabled: false for no "
        "policy)",
    )
    _require(
        not values.metrics.prometheus.service_monitor or bool(policy.metrics_from),
        "server.networkPolicy.metricsFrom: empty, which keeps Prometheus out of the "
        "ServiceMonitor's port; name its namespace (or set metrics.prometheus.serviceMonitor "
        "false)",
    )


def check(values: Values) -> None:
    """Raise ``ValuesError`` for values whose manifests Kubernetes or the service would refuse."""
    backfill, server, storage = values.backfill, values.server, values.object_storage
    prometheus = values.metrics.prometheus
    if values.namespace is not None:
        _check_name(values.namespace, "namespace")
    _require(
        bool(values.image.repository and values.image.tag),
        "image.repository and image.tag: both must be set",
    )
    _check_port(values.postgres.port, "postgres.port")
    _check_port(prometheus.port, "metrics.prometheus.port")
    _check_port(server.port, "server.port")
    _require(
        values.postgres.ca_secret_key is None or ca_secret(values) is not None,
        "postgres.caSecretKey: needs postgres.caSecretName (or secret.name)",
    )
    _require(
        storage.auth != "static" or values.secret.name is not None or values.sdf.secret is not None,
        "objectStorage.auth static: the key pair needs secret.name (or sdf.secret)",
    )
    _require(
        DURATION.match(prometheus.interval) is not None,
        f"metrics.prometheus.interval: {prometheus.interval!r} is not a duration like 15s or 1m",
    )
    for monitor in ("pod_monitor", "service_monitor"):
        _require(
            not getattr(prometheus, monitor) or prometheus.port is not None,
            f"metrics.prometheus.{setting_key(monitor)}: needs metrics.prometheus.port",
        )
    endpoint = values.metrics.otlp.endpoint
    _require(
        endpoint is None or URL.match(endpoint) is not None,
        f"metrics.otlp.endpoint: {endpoint!r} is not an http:// or https:// URL",
    )
    if backfill.enabled:
        _check_name(backfill.name, "backfill.name")
        _require(
            values.persister_mode != "PostgresOnly",
            "persisterMode: the backfill needs DualWrite, S3Primary or S3Only (PostgresOnly has "
            "no S3)",
        )
        _require(bool(backfill.cache_types), "backfill.cacheTypes: name at least one cache type")
        _require(backfill.shards >= 1, "backfill.shards: at least 1")
        _require(
            0 <= backfill.max_failed_indexes <= backfill.shards,
            "backfill.maxFailedIndexes: between 0 and backfill.shards",
        )
        for name in ("grace_period_secs", "backoff_limit", "backoff_limit_per_index"):
            _require(getattr(backfill, name) >= 0, f"backfill.{setting_key(name)}: at least 0")
        _require(backfill.active_deadline_seconds > 0, "backfill.activeDeadlineSeconds: above 0")
        _require(
            backfill.ttl_seconds_after_finished >= 0, "backfill.ttlSecondsAfterFinished: at least 0"
        )
        rendered = {entry["name"] for entry in backfill_env(values, extra=False)}
        _check_env(backfill.env, rendered, "backfill.env")
    if server.enabled:
        _check_name(server.name, "server.name", MAX_STATEFULSET_NAME)
        _require(server.replicas >= 0, "server.replicas: at least 0")
        _require(
            server.port != prometheus.port,
            "server.port: the same port as metrics.prometheus.port",
        )
        for name in ("grace_period_secs", "pre_stop_sleep_secs"):
            _require(getattr(server, name) >= 0, f"server.{setting_key(name)}: at least 0")
        rendered = {entry["name"] for entry in server_env(values, extra=False)}
        _check_env(server.env, rendered, "server.env")
        _check_access(values)


PLACEHOLDER = re.compile(r"REPLACE|(^|[./])example\.(com|internal|org)\b")


def placeholders(values: Values) -> list[str]:
    """The settings still holding a placeholder (REPLACE…, example.com hosts), in what the
    values render (not in a disabled section, nor metricsFrom without a metrics port)."""
    found: list[str] = []
    unused = set()
    if values.metrics.prometheus.port is None:
        unused.add("server.networkPolicy.metricsFrom")

    def walk(node: Any, where: str) -> None:
        if where in unused:
            return
        if dataclasses.is_dataclass(node):
            if getattr(node, "enabled", True) is False:
                return
            for field in dataclasses.fields(node):
                walk(getattr(node, field.name), _path(where, setting_key(field.name)))
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{where}[{index}]")
        elif isinstance(node, dict):
            for key, item in node.items():
                walk(item, _path(where, key))
        elif isinstance(node, str) and PLACEHOLDER.search(node):
            found.append(where)

    walk(values, "")
    return found


def notices(values: Values) -> list[str]:
    """What the operator should know before applying, one line each (never an error)."""
    found = []
    left = placeholders(values)
    if left:
        found.append("still placeholders, edit them before applying: " + ", ".join(left))
    if values.server.enabled and values.server.auth.mode == "none":
        found.append(
            "server.auth.mode none: the server will let every client that reaches it read and "
            "write, without a token"
        )
    return found


# --------------------------------------------------------------------------------------------
# The manifests


def _literal(name: str, value: Scalar) -> dict[str, Any]:
    """A literal env entry; Kubernetes wants a string (true/false for booleans)."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return {"name": name, "value": text}


def _from_secret(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def labels(component: str, instance: str) -> dict[str, str]:
    """The recommended labels of every object and pod of one component."""
    return {NAME_LABEL: APP, INSTANCE_LABEL: instance, COMPONENT_LABEL: component}


def metadata(values: Values, name: str, object_labels: Mapping[str, str]) -> dict[str, Any]:
    namespace = {} if values.namespace is None else {"namespace": values.namespace}
    return {"name": name, **namespace, "labels": dict(object_labels)}


def storage_env(values: Values, application_name: str) -> list[dict[str, Any]]:
    """The layer db and the object store, as the service reads them (``SI_SDF__…``)."""
    pg, storage, secret = values.postgres, values.object_storage, values.secret.name
    env = [_literal(SI + "LAYER_DB_CONFIG__PERSISTER_MODE", values.persister_mode)]
    for suffix, value in (("HOSTNAME", pg.host), ("PORT", pg.port)):
        if value is not None:
            env.append(_literal(PG + suffix, value))
    for suffix, value in (("DBNAME", pg.dbname), ("USER", pg.user)):
        if value is not None:
            env.append(_literal(PG + suffix, value))
    if secret is not None:
        env.append(_from_secret(PG + "PASSWORD", secret, PG_PASSWORD_KEY))
    if pg.sslmode is not None:
        env.append(_literal(PG + "SSLMODE", pg.sslmode))
    if pg.ca_secret_key is not None:
        env.append(_literal(PG + "SSL_CA_CERT", f"{PG_CA_DIR}/{PG_CA_FILE}"))
    env.append(_literal(PG + "APPLICATION_NAME", application_name))
    if pg.pool_max_size is not None:
        env.append(_literal(PG + "POOL_MAX_SIZE", pg.pool_max_size))
    static = storage.auth == "static"
    if static:
        for suffix, setting in (("ENDPOINT", storage.endpoint), ("REGION", storage.region)):
            if setting is not None:
                env.append(_literal(STORAGE + suffix, setting))
    for suffix, setting in (
        ("BUCKET_PREFIX", storage.bucket_prefix),
        ("BUCKET_SUFFIX", storage.bucket_suffix),
    ):
        if setting is not None:
            env.append(_literal(STORAGE + suffix, setting))
    if static and secret is not None:
        credentials = STORAGE + "AUTH__STATIC_CREDENTIALS__"
        env.append(_from_secret(credentials + "ACCESS_KEY", secret, S3_ACCESS_KEY_KEY))
        env.append(_from_secret(credentials + "SECRET_KEY", secret, S3_SECRET_KEY_KEY))
    if not static:
        # The standard AWS chain decides credentials, endpoint and region.
        env.append(_literal(STORAGE + "AUTH", "iam_role"))
        if storage.region is not None:
            env.append(_literal("AWS_REGION", storage.region))
        if storage.endpoint is not None:
            env.append(_literal("AWS_ENDPOINT_URL_S3", storage.endpoint))
    return env


def metrics_env(values: Values) -> list[dict[str, Any]]:
    """The Prometheus port, and OTLP to the collector or explicitly nowhere."""
    env = []
    if values.metrics.prometheus.port is not None:
        env.append(_literal(SI + "METRICS_PORT", values.metrics.prometheus.port))
    otlp = values.metrics.otlp
    if otlp.endpoint is None:
        # Without a collector the OTel SDK would export to localhost:4317, where nothing listens.
        env.append(_literal("OTEL_METRICS_EXPORTER", "none"))
    else:
        env.append(_literal("OTEL_METRICS_EXPORTER", "otlp"))
        env.append(_literal("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint))
        env.append(_literal("OTEL_EXPORTER_OTLP_PROTOCOL", otlp.protocol))
    return env


def backfill_env(values: Values, *, extra: bool = True) -> list[dict[str, Any]]:
    """The backfill container's env: migration mode, storage, the backfill's options, metrics,
    then (``extra``) ``backfill.env``."""
    backfill = values.backfill
    env = [
        _literal(SI + "MIGRATION_MODE", "backfillLayerCache"),
        _literal("SI_LOG_JSON", True),
        *storage_env(values, backfill.name),
        _literal("SI_BACKFILL_CUTOFF_TIMESTAMP", backfill.cutoff),
        _literal("SI_BACKFILL_CACHE_TYPES", ",".join(backfill.cache_types)),
        _literal("SI_BACKFILL_GRACE_PERIOD_SECS", backfill.grace_period_secs),
        _literal("SI_BACKFILL_MAX_INFLIGHT_BYTES", backfill.max_inflight_bytes),
    ]
    if backfill.sharded:
        env.append(_literal("SI_BACKFILL_SHARD_COUNT", backfill.shards))
        env.append(
            {
                "name": "SI_BACKFILL_SHARD_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_PATH}},
            }
        )
    env += metrics_env(values)
    if extra:
        env += [_literal(name, value) for name, value in sorted(backfill.env.items())]
    return env


def server_env(values: Values, *, extra: bool = True) -> list[dict[str, Any]]:
    """The server container's env: migration mode, address, storage, the server's options,
    metrics, then (``extra``) ``server.env``."""
    server = values.server
    env = [
        _literal(SI + "MIGRATION_MODE", server.migration_mode),
        _literal("SI_LOG_JSON", True),
        _literal(SI + "SOCKET_ADDR", f"0.0.0.0:{server.port}"),
        *storage_env(values, server.name),
        _literal(SERVER + "GRACE_PERIOD_SECS", server.grace_period_secs),
        _literal(SERVER + "WRITE_QUEUE_DIR", WRITE_QUEUE_DIR),
        *access_env(values),
    ]
    env += metrics_env(values)
    if extra:
        env += [_literal(name, value) for name, value in sorted(server.env.items())]
    return env


TOKEN_FILE_SETTINGS = {READ_TOKENS_FILE: "READ_TOKENS_FILE", WRITE_TOKENS_FILE: "WRITE_TOKENS_FILE"}


def access_env(values: Values) -> list[dict[str, Any]]:
    """The server's access control: the mode, always explicit (sdf's ConfigMap cannot turn it
    off), and the token, certificate and client-CA files where their volumes are mounted."""
    auth, tls = values.server.auth, values.server.tls
    env = [_literal(SERVER + "AUTH", auth.mode)]
    for file in auth.token_keys:
        env.append(_literal(SERVER + TOKEN_FILE_SETTINGS[file], f"{TOKENS_DIR}/{file}"))
    if tls.enabled:
        env.append(_literal(SERVER + "TLS_CERT_FILE", f"{TLS_DIR}/{TLS_CERT_FILE}"))
        env.append(_literal(SERVER + "TLS_KEY_FILE", f"{TLS_DIR}/{TLS_KEY_FILE}"))
    if tls.mutual:
        env.append(_literal(SERVER + "TLS_CLIENT_CA_FILE", f"{CLIENT_CA_DIR}/{CLIENT_CA_FILE}"))
    return env


def env_from(values: Values) -> list[dict[str, Any]]:
    """sdf's ConfigMap and Secret, whole and optional; the explicit env wins over both."""
    sources: list[dict[str, Any]] = []
    if values.sdf.config_map is not None:
        sources.append({"configMapRef": {"name": values.sdf.config_map, "optional": True}})
    if values.sdf.secret is not None:
        sources.append({"secretRef": {"name": values.sdf.secret, "optional": True}})
    return sources


def _resources(resources: Resources) -> dict[str, Any]:
    return {
        "requests": {kind: str(amount) for kind, amount in resources.requests.items()},
        "limits": {kind: str(amount) for kind, amount in resources.limits.items()},
    }


def _container(
    values: Values,
    name: str,
    env: list[dict[str, Any]],
    resources: Resources,
    ports: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": values.image.reference,
        "imagePullPolicy": values.image.pull_policy,
    }
    sources = env_from(values)
    if sources:
        container["envFrom"] = sources
    container["env"] = env
    if values.metrics.prometheus.port is not None:
        ports = [
            *ports,
            {"name": METRICS_PORT_NAME, "containerPort": values.metrics.prometheus.port},
        ]
    if ports:
        container["ports"] = [port | {"protocol": "TCP"} for port in ports]
    container |= extra
    container["resources"] = _resources(resources)
    container["securityContext"] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [
        *_pg_ca_mounts(values),
        *mounts,
        {"name": "tmp", "mountPath": TMP_DIR},
    ]
    return container


def _pg_ca_mounts(values: Values) -> list[dict[str, Any]]:
    if values.postgres.ca_secret_key is None:
        return []
    return [{"name": "pg-ca", "mountPath": PG_CA_DIR, "readOnly": True}]


def ca_secret(values: Values) -> str | None:
    """The Secret holding the Postgres CA: postgres.caSecretName, else ours."""
    return values.postgres.ca_secret_name or values.secret.name


def _volumes(values: Values, extra: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    volumes = []
    secret = ca_secret(values)
    if values.postgres.ca_secret_key is not None and secret is not None:
        volumes.append(
            {
                "name": "pg-ca",
                "secret": {
                    "secretName": secret,
                    "items": [{"key": values.postgres.ca_secret_key, "path": PG_CA_FILE}],
                },
            }
        )
    volumes += extra
    # The root file system is read-only; a small scratch /tmp for libraries that expect one.
    volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}})
    return volumes


TOKENS_VOLUME = "server-tokens"
TLS_VOLUME = "server-tls"
CLIENT_CA_VOLUME = "server-client-ca"


def _files_volume(
    name: str,
    directory: str,
    kind: Literal["secret", "configMap"],
    source: str,
    files: Mapping[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A volume of the keys ``files`` maps file names to, and its read-only mount: the whole
    volume at ``directory`` (never subPath, which the kubelet does not update)."""
    items = [{"key": key, "path": path} for path, key in files.items()]
    reference = {"secretName": source} if kind == "secret" else {"name": source}
    volume = {"name": name, kind: reference | {"items": items}}
    return volume, {"name": name, "mountPath": directory, "readOnly": True}


def access_volumes(values: Values) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The server's token, certificate and client-CA volumes, each with its mount."""
    auth, tls = values.server.auth, values.server.tls
    found = []
    if auth.secret is not None:
        found.append(
            _files_volume(TOKENS_VOLUME, TOKENS_DIR, "secret", auth.secret, auth.token_keys)
        )
    if tls.secret_name is not None:
        pair = {TLS_CERT_FILE: TLS_CERT_FILE, TLS_KEY_FILE: TLS_KEY_FILE}
        found.append(_files_volume(TLS_VOLUME, TLS_DIR, "secret", tls.secret_name, pair))
    ca = tls.client_ca
    if tls.mutual:
        kind: Literal["secret", "configMap"] = "secret" if ca.secret_name else "configMap"
        source = ca.secret_name or ca.config_map_name
        assert source is not None
        ca_files = {CLIENT_CA_FILE: ca.key}
        found.append(_files_volume(CLIENT_CA_VOLUME, CLIENT_CA_DIR, kind, source, ca_files))
    return found


def _pod_spec(
    values: Values,
    container: dict[str, Any],
    *,
    restart_policy: str,
    termination_grace_period_s: int,
    volumes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    spec: dict[str, Any] = {"restartPolicy": restart_policy}
    spec["terminationGracePeriodSeconds"] = termination_grace_period_s
    if values.object_storage.service_account_name is not None:
        spec["serviceAccountName"] = values.object_storage.service_account_name
    # No Kubernetes API token (IRSA and Pod Identity project their own), and no
    # {SERVICE}_PORT variables from the namespace's Services in the environment.
    spec["automountServiceAccountToken"] = False
    spec["enableServiceLinks"] = False
    spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        # Volumes (the write queue's) are made writable by the image's group.
        "fsGroup": RUN_AS,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if values.image.pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in values.image.pull_secrets]
    if values.node_selector:
        spec["nodeSelector"] = dict(values.node_selector)
    if values.tolerations:
        spec["tolerations"] = list(values.tolerations)
    spec["containers"] = [container]
    spec["volumes"] = _volumes(values, volumes)
    return spec


def backfill_job(values: Values) -> dict[str, Any]:
    """The backfill: a Job of one pod, or an Indexed Job of ``backfill.shards`` pods."""
    backfill = values.backfill
    pod_labels = labels("backfill", backfill.name)
    container_name = CONTAINER_NAMES["backfill"]
    spec: dict[str, Any] = {}
    if backfill.sharded:
        spec |= {
            "completionMode": "Indexed",
            "completions": backfill.shards,
            "parallelism": backfill.shards,
            "backoffLimitPerIndex": backfill.backoff_limit_per_index,
            "maxFailedIndexes": backfill.max_failed_indexes,
        }
    else:
        spec["backoffLimit"] = backfill.backoff_limit
    spec |= {
        "activeDeadlineSeconds": backfill.active_deadline_seconds,
        "ttlSecondsAfterFinished": backfill.ttl_seconds_after_finished,
        # A replacement starts only once the failed pod has terminated (and saved its progress).
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": container_name,
                        "operator": "In",
                        "values": [EXIT_INVALID_INPUT, EXIT_ENVIRONMENT],
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
    }
    container = _container(
        values, container_name, backfill_env(values), backfill.resources, ports=[], mounts=[]
    )
    spec["template"] = {
        "metadata": {"labels": pod_labels},
        "spec": _pod_spec(
            values,
            container,
            restart_policy="Never",
            termination_grace_period_s=backfill.termination_grace_period_s,
        ),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(values, backfill.name, pod_labels),
        "spec": spec,
    }


WRITE_QUEUE_VOLUME = "write-queue"


def server_service(values: Values) -> dict[str, Any]:
    """The Service in front of every server replica (and the StatefulSet's governing one)."""
    server = values.server
    server_labels = labels("server", server.name)
    ports = [{"name": HTTP_PORT_NAME, "port": server.port, "targetPort": HTTP_PORT_NAME}]
    if values.metrics.prometheus.port is not None:
        port = values.metrics.prometheus.port
        ports.append({"name": METRICS_PORT_NAME, "port": port, "targetPort": METRICS_PORT_NAME})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(values, server.name, server_labels),
        "spec": {
            "type": "ClusterIP",
            "selector": server_labels,
            "ports": [port | {"protocol": "TCP"} for port in ports],
        },
    }


def _probe(values: Values, path: str) -> dict[str, Any]:
    """What a probe asks: ``path`` over HTTP, or over HTTPS with TLS (the kubelet does not
    verify the certificate); with mutual TLS only whether the port accepts connections, as the
    kubelet cannot present a client certificate and the handshake would fail."""
    tls = values.server.tls
    if tls.mutual:
        return {"tcpSocket": {"port": HTTP_PORT_NAME}}
    request = {"path": path, "port": HTTP_PORT_NAME}
    if tls.enabled:
        request["scheme"] = "HTTPS"
    return {"httpGet": request}


def server_statefulset(values: Values) -> dict[str, Any]:
    """The server's replicas, each with its own write-queue volume."""
    server = values.server
    server_labels = labels("server", server.name)
    probe = {"timeoutSeconds": 3}
    access = access_volumes(values)
    container = _container(
        values,
        CONTAINER_NAMES["server"],
        server_env(values),
        server.resources,
        ports=[{"name": HTTP_PORT_NAME, "containerPort": server.port}],
        mounts=[
            {"name": WRITE_QUEUE_VOLUME, "mountPath": WRITE_QUEUE_DIR},
            *(mount for _volume, mount in access),
        ],
        readinessProbe={
            **_probe(values, "/readyz"),
            "periodSeconds": 5,
            "failureThreshold": 2,
            **probe,
        },
        livenessProbe={
            **_probe(values, "/healthz"),
            "periodSeconds": 10,
            "failureThreshold": 6,
            **probe,
        },
        lifecycle={"preStop": {"exec": {"command": ["sleep", str(server.pre_stop_sleep_secs)]}}},
    )
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(server.write_queue.size)}},
    }
    if server.write_queue.storage_class_name is not None:
        claim_spec["storageClassName"] = server.write_queue.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(values, server.name, server_labels),
        "spec": {
            "serviceName": server.name,
            "replicas": server.replicas,
            # Replicas share nothing: start and replace them in parallel.
            "podManagementPolicy": "Parallel",
            # A queue may hold writes S3 has not taken yet: keep the claims when scaling down
            # or deleting; a replica that comes back drains its own queue.
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
            "selector": {"matchLabels": server_labels},
            "template": {
                "metadata": {"labels": server_labels},
                "spec": _pod_spec(
                    values,
                    container,
                    restart_policy="Always",
                    termination_grace_period_s=server.termination_grace_period_s,
                    volumes=[volume for volume, _mount in access],
                ),
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": WRITE_QUEUE_VOLUME, "labels": server_labels},
                    "spec": claim_spec,
                }
            ],
        },
    }


def _peer(peer: Peer) -> dict[str, Any]:
    """A peer as Kubernetes' NetworkPolicyPeer."""
    found = {}
    if peer.namespace_selector is not None:
        found["namespaceSelector"] = {"matchLabels": dict(peer.namespace_selector.match_labels)}
    if peer.pod_selector is not None:
        found["podSelector"] = {"matchLabels": dict(peer.pod_selector.match_labels)}
    return found


def server_network_policy(values: Values) -> dict[str, Any]:
    """Who reaches the server's pods: the named clients the API port, the named scrapers the
    metrics port, no one anything else (no rule at all with denyAll). Ingress only."""
    server, policy = values.server, values.server.network_policy
    server_labels = labels("server", server.name)
    ingress = []
    if policy.allow_from:
        ingress.append(
            {
                "from": [_peer(peer) for peer in policy.allow_from],
                "ports": [{"protocol": "TCP", "port": server.port}],
            }
        )
    metrics_port = values.metrics.prometheus.port
    if policy.metrics_from and metrics_port is not None:
        ingress.append(
            {
                "from": [_peer(peer) for peer in policy.metrics_from],
                "ports": [{"protocol": "TCP", "port": metrics_port}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(values, server.name, server_labels),
        "spec": {
            "podSelector": {"matchLabels": server_labels},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def monitors(values: Values) -> list[dict[str, Any]]:
    """The Prometheus Operator's PodMonitor (backfill) and ServiceMonitor (server) asked for."""
    prometheus = values.metrics.prometheus
    endpoint = {"port": METRICS_PORT_NAME, "path": "/metrics", "interval": prometheus.interval}
    found = []
    if prometheus.pod_monitor and values.backfill.enabled:
        pods = labels("backfill", values.backfill.name)
        found.append(
            {
                "apiVersion": MONITORING_API,
                "kind": "PodMonitor",
                "metadata": metadata(values, values.backfill.name, pods | prometheus.labels),
                "spec": {"selector": {"matchLabels": pods}, "podMetricsEndpoints": [endpoint]},
            }
        )
    if prometheus.service_monitor and values.server.enabled:
        service = labels("server", values.server.name)
        found.append(
            {
                "apiVersion": MONITORING_API,
                "kind": "ServiceMonitor",
                "metadata": metadata(values, values.server.name, service | prometheus.labels),
                "spec": {"selector": {"matchLabels": service}, "endpoints": [dict(endpoint)]},
            }
        )
    return found


def render(values: Values) -> dict[str, list[dict[str, Any]]]:
    """The manifests, by output file (only the files the values ask for)."""
    files: dict[str, list[dict[str, Any]]] = {}
    if values.backfill.enabled:
        files[BACKFILL_FILE] = [backfill_job(values)]
    if values.server.enabled:
        # The policy first: applied in order, no replica is ever reachable without it.
        policy = [server_network_policy(values)] if values.server.network_policy.enabled else []
        files[SERVER_FILE] = [*policy, server_service(values), server_statefulset(values)]
    found = monitors(values)
    if found:
        files[MONITORING_FILE] = found
    return files


# --------------------------------------------------------------------------------------------
# Text


class _Dumper(yaml.SafeDumper):
    """Block style, lists indented under their key, never an anchor or alias."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(documents: Sequence[dict[str, Any]]) -> str:
    return yaml.dump_all(
        documents,
        Dumper=_Dumper,
        explicit_start=True,
        sort_keys=False,
        default_flow_style=False,
        width=1000,
    )


def header(sources: Sequence[str]) -> str:
    """The comment on top of rendered manifests, naming the values files they came from."""
    return (
        f"# Rendered by `python -m deploy.render` from {' + '.join(sources)}.\n"
        "# Edit the values and render again; do not edit this file. Guide: deploy/README.md.\n"
    )


def render_text(values: Values, sources: Sequence[str]) -> dict[str, str]:
    """Each output file's text, with the header."""
    top = header(sources)
    return {name: top + to_yaml(documents) for name, documents in render(values).items()}


def _shown(path: Path) -> str:
    """A path as the header shows it: relative to the repository when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def example_files() -> dict[str, list[Path]]:
    """Each committed example: its name and the values files it merges."""
    examples: dict[str, list[Path]] = {DEFAULT_EXAMPLE: []}
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        examples[path.stem] = [path]
    return examples


def render_examples() -> dict[Path, str]:
    """Every file of deploy/rendered/: each example's manifests in a folder of its name."""
    texts: dict[Path, str] = {}
    for name, overrides in example_files().items():
        values = load_values(overrides)
        sources = [_shown(VALUES_PATH), *(_shown(path) for path in overrides)]
        for file_name, text in render_text(values, sources).items():
            texts[RENDERED_DIR / name / file_name] = text
    return texts


def _stale(wanted: Mapping[Path, str], present: Sequence[Path]) -> list[Path]:
    """Files that differ from what is wanted, are missing, or should not be there."""
    extra = [path for path in present if path not in wanted]
    differ = [
        path
        for path, text in wanted.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    return sorted(set(extra) | set(differ))


def _write(wanted: Mapping[Path, str], present: Sequence[Path]) -> None:
    for path in present:
        if path not in wanted:
            path.unlink()
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _rendered_files() -> list[Path]:
    return [path for path in RENDERED_DIR.glob("*/*") if path.is_file()]


def _output_files(directory: Path) -> list[Path]:
    """The renderer's files in ``directory`` (it never touches any other file there)."""
    return [directory / name for name in OUTPUT_FILES if (directory / name).is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.render",
        description="Render the layer cache's Kubernetes manifests from deploy/values.yaml "
        "and your overrides (deploy/README.md).",
    )
    parser.add_argument(
        "-f",
        "--values",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="values merged on top of deploy/values.yaml, in order (repeatable)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="DIR",
        help=f"write {', '.join(OUTPUT_FILES)} here (default: print them)",
    )
    target.add_argument(
        "--examples",
        action="store_true",
        help="render deploy/values.yaml and each deploy/examples/*.yaml into deploy/rendered/",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files are stale"
    )
    args = parser.parse_args(argv)
    if args.check and args.output is None and not args.examples:
        parser.error("--check needs -o DIR or --examples")
    if args.examples and args.values:
        parser.error("--examples renders the committed examples; it takes no -f")
    try:
        if args.examples:
            wanted = render_examples()
            present = _rendered_files()
            command = "python -m deploy.render --examples"
        else:
            values = load_values(args.values)
            sources = [_shown(VALUES_PATH), *(str(path) for path in args.values)]
            if not args.check:
                for notice in notices(values):
                    print(f"deploy.render: {notice}", file=sys.stderr)
            if args.output is None:
                documents = [doc for file in render(values).values() for doc in file]
                sys.stdout.write(header(sources) + to_yaml(documents))
                return EXIT_OK
            texts = render_text(values, sources)
            wanted = {args.output / name: text for name, text in texts.items()}
            present = _output_files(args.output)
            command = (
                "python -m deploy.render "
                + " ".join(f"-f {path}" for path in args.values)
                + f" -o {args.output}"
            )
    except ValuesError as exc:
        print(f"deploy.render: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.check:
        stale = _stale(wanted, present)
        if stale:
            names = ", ".join(_shown(path) for path in stale)
            print(f"deploy.render: stale: {names}; run {command}", file=sys.stderr)
            return EXIT_STALE
        return EXIT_OK
    _write(wanted, present)
    for path in wanted:
        print(_shown(path))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
