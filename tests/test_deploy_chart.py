"""charts/vlmserve rendered by Helm's library for each accelerator profile (mlu, mlu370, gpu, cpu),
with the InferenceService off and on, linted, and every object validated: Kubernetes objects
against Kubernetes' schemas, KServe objects against KServe's CRDs (``tests/chart_render.py``).
Then what the chart must say for KServe and for us: protocols, KServe's arguments, the h2c port,
/dev/shm, probes, the accelerator, scraping, scaling, the API key."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk (the test extras) renders the chart")
pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extras) validates it")

from chart_render import ISVC, PROFILES, RESOURCE_NAMES, lint, merge, render, validate  # noqa: E402


def _by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def _container(runtime: dict) -> dict:
    (container,) = runtime["spec"]["containers"]
    return container


@pytest.mark.parametrize("isvc", [False, True], ids=["runtime-only", "with-isvc"])
@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles_render_lint_and_validate(profile, isvc):
    values = merge(PROFILES[profile], {"inferenceService": ISVC} if isvc else {})
    report = lint(values)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
    objects = render(values)
    for obj in objects:
        validate(obj)
    kinds = _by_kind(objects)
    assert set(kinds) == ({"ServingRuntime", "InferenceService"} if isvc else {"ServingRuntime"})

    runtime = kinds["ServingRuntime"]
    spec, container = runtime["spec"], _container(runtime)
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    assert spec["supportedModelFormats"][0]["name"] == "vlmserve" and spec["supportedModelFormats"][0]["autoSelect"]
    args = container["args"]
    assert args[:4] == ["--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080", "--grpc_port=8081"]
    device = {"mlu": "mlu", "mlu370": "mlu", "gpu": "cuda", "cpu": "cpu"}[profile]
    assert f"--device={device}" in args
    assert container["image"].endswith("-" + PROFILES[profile]["accelerator"]["type"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http1": 8080, "h2c": 8081}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow loads: 15 minutes
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["runAsUser"] == 1000
    assert spec["annotations"] == {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"}

    resource = RESOURCE_NAMES[profile]
    limits = container["resources"]["limits"]
    accelerators = {k for k in limits if "/" in k}
    assert accelerators == ({resource} if resource else set())
    if resource:
        assert container["resources"]["requests"][resource] == limits[resource] == 1
    if profile == "mlu370":
        assert spec["nodeSelector"] == {"cambricon.com/mlu.model": "MLU370"}
        assert spec["tolerations"][0]["key"] == "cambricon.com/mlu"

    if isvc:
        svc = kinds["InferenceService"]
        pred = svc["spec"]["predictor"]
        assert pred["model"]["runtime"] == runtime["metadata"]["name"]
        assert pred["model"]["storageUri"] == ISVC["storageUri"]
        assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (
            1, 4, "concurrency", 8)
        notes = svc["metadata"]["annotations"]
        assert notes["serving.kserve.io/enable-prometheus-scraping"] == "true"
        if resource:
            assert json.loads(notes["serving.kserve.io/gpu-resource-types"]) == [resource]
            assert pred["model"]["resources"]["limits"][resource] == 1
        else:
            assert "serving.kserve.io/gpu-resource-types" not in notes


def test_cluster_runtime_monitoring_api_key_and_engine_flags():
    values = {"servingRuntime": {"cluster": True},
              "inferenceService": merge(ISVC, {"autoscaling": {"mode": "waiting"}}),
              "accelerator": {"type": "mlu", "extraResources": {"cambricon.com/mlu.smlu.vmemory": 16,
                                                                "cambricon.com/mlu.smlu.vcore": 50}},
              "monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True},
                             "grafanaDashboard": {"enabled": True}},
              "apiKey": {"value": "s3cret"},
              "engineArgs": {"max-model-len": 8192, "enforce-eager": True, "trust-remote-code": False,
                             "limit-mm-per-prompt": "image=4", "served-model-name": ["qwen2-vl", "gpt-4o-mini"]}}
    assert not lint(values)["errors"]
    objects = render(values)
    kinds = _by_kind(objects)
    assert set(kinds) == {"ClusterServingRuntime", "InferenceService", "PodMonitor", "ServiceMonitor", "ConfigMap",
                          "Secret"}
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # prometheus-operator's CRDs are not in ../shared: checked by hand below
        validate(obj)
    runtime = kinds["ClusterServingRuntime"]
    assert "namespace" not in runtime["metadata"]
    container = _container(runtime)
    args = container["args"]
    assert {"--max-model-len=8192", "--enforce-eager", "--limit-mm-per-prompt=image=4"} <= set(args)
    assert "--trust-remote-code" not in args
    i = args.index("--served-model-name")
    assert args[i + 1:i + 3] == ["qwen2-vl", "gpt-4o-mini"]
    limits = container["resources"]["limits"]
    assert (limits["cambricon.com/mlu"], limits["cambricon.com/mlu.smlu.vmemory"], limits["cambricon.com/mlu.smlu.vcore"]) == (
        1, 16, 50)
    env = {e["name"]: e for e in container["env"]}
    secret = kinds["Secret"]
    assert env["VLMSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "api-key"}
    assert secret["stringData"] == {"api-key": "s3cret"}

    svc = kinds["InferenceService"]
    assert svc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"
    (metric,) = svc["spec"]["predictor"]["autoScaling"]["metrics"]
    assert 'vllm:num_requests_waiting{namespace="ml",model_name="demo-vlmserve"}' in metric["external"]["metric"]["query"]
    assert "scaleMetric" not in svc["spec"]["predictor"]

    pod_monitor = kinds["PodMonitor"]["spec"]
    assert pod_monitor["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "demo-vlmserve"}
    assert pod_monitor["podMetricsEndpoints"][0]["port"] == "http1"
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"

    dashboard = json.loads(kinds["ConfigMap"]["data"]["vlmserve.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for series in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                   "vllm:time_to_first_token_seconds_bucket", "vlmserve:images_processed_total"):
        assert series in exprs, series


def test_existing_secret_and_bad_values_are_refused():
    objects = render({"apiKey": {"existingSecret": "team-key", "existingSecretKey": "token"}})
    env = {e["name"]: e for e in _container(_by_kind(objects)["ServingRuntime"])["env"]}
    assert env["VLMSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "team-key", "key": "token"}
    assert "Secret" not in _by_kind(objects)
    import helm_python as helm

    for values, words in (({"accelerator": {"type": "tpu"}}, "accelerator.type"),
                          ({"inferenceService": {"enabled": True}}, "storageUri"),
                          ({"inferenceService": merge(ISVC, {"minReplicas": 3, "maxReplicas": 2})}, "maxReplicas")):
        with pytest.raises(helm.HelmError, match=words):
            render(values)
