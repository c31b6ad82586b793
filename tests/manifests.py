"""Reading rendered Kubernetes manifests the way the API server and the kubelet would.

``container_env`` gives the environment a container starts with: its ``envFrom`` sources in
order (a missing optional one skipped), then its ``env`` entries, which win over them; Secret
and ConfigMap references resolved from the mappings the test passes in, and the downward API's
completion index set as an Indexed Job's kubelet sets it. ``project_volumes`` writes the files
a container's Secret and ConfigMap volumes would hold into a directory of the test's, and
``relocated`` points the environment's paths into the mounts there. Used by
tests/unit/test_deploy.py and by the integration tests that run a backfill and a server from the
rendered workloads' own environment.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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


def project_volumes(
    workload: Manifest,
    root: Path,
    *,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    config_maps: Mapping[str, Mapping[str, str]] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Path]:
    """Write what each Secret and ConfigMap volume the container mounts (``only`` those named)
    would hold (each listed item's key at its path, or every key without items) under ``root``;
    returns each mount's path in the pod and where its files are here."""
    config_maps, secrets = config_maps or {}, secrets or {}
    volumes = {volume["name"]: volume for volume in pod_spec(workload)["volumes"]}
    projected: dict[str, Path] = {}
    for mount in the_container(workload).get("volumeMounts", []):
        if only is not None and mount["name"] not in only:
            continue
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            source, data = volume["secret"], secrets[volume["secret"]["secretName"]]
        elif "configMap" in volume:
            source, data = volume["configMap"], config_maps[volume["configMap"]["name"]]
        else:
            continue
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        directory = root / mount["name"]
        for item in items:
            path = directory / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]], encoding="utf-8")
        projected[mount["mountPath"]] = directory
    return projected


def relocated(env: Mapping[str, str], projected: Mapping[str, Path]) -> dict[str, str]:
    """``env`` with every value that is a path inside a projected mount pointed at the file
    written for it."""
    moved = dict(env)
    for name, value in env.items():
        for mount_path, directory in projected.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                moved[name] = str(directory / value[len(mount_path.rstrip("/")) + 1 :])
    return moved
