"""Render and validate charts/vlmserve with real tools, for the deployment tests.

* ``render(values)`` -> the chart's objects (dicts), rendered by Helm's own library
  (``helm-python-sdk``: Helm v4's Go SDK through its C ABI; there is no ``helm`` binary in the
  Debian or npm registries); ``lint(values)`` -> Helm's lint report.
* ``validate(obj)``: a Kubernetes object against Kubernetes' OpenAPI schemas
  (``kubernetes-validate``, strict: unknown fields are errors); a KServe object against the
  ``openAPIV3Schema`` of KServe's CRD (vendored in ``tests/kserve_crds``, from
  ``../shared/kserve-crds``), with unknown fields reported too (the API server would drop
  them silently, i.e. a typo would be a setting that never takes effect), and its pod fields
  (containers, volumes) once more against Kubernetes' own Pod schema.
* ``PROFILES``: the accelerator profiles the chart must render (values for each).

Imports of the tools are done by the callers (``pytest.importorskip``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "vlmserve"
KUBE_VERSION = "1.30"
PROFILES: dict[str, dict[str, Any]] = {
    "mlu": {"accelerator": {"type": "mlu"}},
    "mlu370": {"accelerator": {"type": "mlu", "resourceName": "cambricon.com/mlu370"},
               "nodeSelector": {"cambricon.com/mlu.model": "MLU370"},
               "tolerations": [{"key": "cambricon.com/mlu", "operator": "Exists", "effect": "NoSchedule"}]},
    "gpu": {"accelerator": {"type": "gpu"}},
    "cpu": {"accelerator": {"type": "cpu"}, "resources": {"requests": {"cpu": "2", "memory": "4Gi"}}},
}
RESOURCE_NAMES = {"mlu": "cambricon.com/mlu", "mlu370": "cambricon.com/mlu370", "gpu": "nvidia.com/gpu", "cpu": None}
ISVC = {"enabled": True, "storageUri": "hf://Qwen/Qwen2-VL-2B-Instruct", "minReplicas": 1, "maxReplicas": 4}


def crd_dirs() -> list[Path]:
    """The vendored copy first (tests/kserve_crds), then the project's shared one."""
    return [REPO / "tests" / "kserve_crds", REPO.parent / "shared" / "kserve-crds"]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def render(values: dict[str, Any], name: str = "demo", namespace: str = "ml") -> list[dict[str, Any]]:
    import helm_python as helm

    manifests = helm.Chart.load(str(CHART)).render(values, name=name, namespace=namespace)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def lint(values: dict[str, Any]) -> dict[str, Any]:
    import helm_python as helm

    return helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}.0")


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): openAPIV3Schema} of KServe's CRDs."""
    folder = next((d for d in crd_dirs() if d.is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"KServe's CRDs are in none of {crd_dirs()}")
    schemas = {}
    for path in folder.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(obj: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields of ``obj`` that ``schema`` does not declare (what ``kubectl --validate=strict``
    reports); ``x-kubernetes-preserve-unknown-fields`` and ``additionalProperties`` allow any."""
    problems = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props and key in props:
                problems += unknown_fields(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                problems += unknown_fields(value, extra, f"{where}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{where}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            problems += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return problems


def _validate_kube(obj: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')}: {str(exc).splitlines()[0]} "
                             f"at {list(exc.absolute_path)}") from None


def validate(obj: dict[str, Any]) -> None:
    """Raise AssertionError naming the first problem of ``obj``."""
    import jsonschema

    key = (obj["apiVersion"], obj["kind"])
    if not obj["apiVersion"].startswith("serving.kserve.io/"):
        _validate_kube(obj)
        return
    schema = crd_schemas()[key]
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path))
    assert not errors, f"{key}: {errors[0].message} at {list(errors[0].absolute_path)}"
    unknown = unknown_fields(obj, schema)
    assert not unknown, f"{key}: fields the CRD does not declare: {unknown}"
    pod = pod_spec(obj)
    if pod:
        _validate_kube({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": obj["metadata"]["name"]}, "spec": pod})


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The pod fields of a ServingRuntime (its containers, volumes, placement) as a PodSpec."""
    if obj["kind"] not in ("ServingRuntime", "ClusterServingRuntime"):
        return None
    spec = obj["spec"]
    return {k: spec[k] for k in ("containers", "volumes", "nodeSelector", "tolerations", "affinity",
                                 "imagePullSecrets") if k in spec}
