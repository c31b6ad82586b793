"""Reading rendered Kubernetes manifests the way the API server and the kubelet would.

``container_env`` gives the environment a container starts with: its ``envFrom`` sources in
order (a missing optional one skipped), then its ``env`` entries, which win over them; Secret
and ConfigMap references resolved from the mappings the test passes in, and the downward API's
completion index set as an Indexed Job's kubelet sets it. Used by tests/unit/test_deploy.py and
by the integration test that runs a backfill from the rendered Job's own environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]
COMPLETION_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of a manifest file."""
    with path.open(encoding="utf-8") as handle:
        return [document for document in yaml.safe_load_all(handle) if document]


def pod_template(workload: Manifest) -> Manifest:
    """The pod template of a Job or StatefulSet."""
    template: Manifest = workload["spec"]["template"]
    return template


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = pod_template(workload)["spec"]
    return spec


def the_container(workload: Manifest) -> Manifest:
    """The pod's one container."""
    (container,) = pod_spec(workload)["containers"]
    result: Manifest = container
    return result


def env_entries(workload: Manifest) -> dict[str, Manifest]:
    """The container's env entries by name (each name set once)."""
    entries = the_container(workload).get("env", [])
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"env set twice: {names}"
    return {entry["name"]: entry for entry in entries}


def literal(workload: Manifest, name: str) -> str:
    value = env_entries(workload)[name].get("value")
    assert isinstance(value, str), f"{name} must be a literal string value"
    return value


def container_env(
    container: Manifest,
    *,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    completion_index: int | None = None,
) -> dict[str, str]:
    """The environment the kubelet starts ``container`` with (see the module docstring)."""
    config_maps, secrets = config_maps or {}, secrets or {}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        (kind,) = source
        ref = source[kind]
        data = (config_maps if kind == "configMapRef" else secrets).get(ref["name"])
        if data is None:
            assert ref.get("optional") is True, f"{kind} {ref['name']} is missing and required"
            continue
        env |= data
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secrets[ref["name"]][ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = config_maps[ref["name"]][ref["key"]]
        else:
            assert source["fieldRef"]["fieldPath"] == COMPLETION_INDEX_PATH, source
            assert completion_index is not None, f"{name} reads the completion index"
            env[name] = str(completion_index)
    return env
