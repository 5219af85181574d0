"""Ecosystem conventions of the real server (``python -m runtime`` serving a tiny Qwen2 on CPU, a
subprocess on free ports), checked with the ecosystem's own tools (issue 17):

* ``/metrics`` negotiated as OpenMetrics (what Prometheus 2.x asks for) keeps vLLM's names in
  the sample lines, and a real Prometheus (Debian's ``prometheus``; skipped where it is not
  installed) scraping the server finds the series under vLLM's names through its HTTP API;
* Triton's model configuration: ``tritonclient`` ``get_model_config`` over HTTP and gRPC;
* vLLM's ``/health`` and ``/v1/models`` answer 503 until the model is ready, then 200;
* vLLM's manifest flags are accepted on the real command line, ``--allowed-origins`` answering
  CORS preflights;
* the log: one start-up banner listing the endpoints, no per-request trace lines, no traceback
  for a 404, no "OpenAI endpoints not registered".
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.http as httpclient
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from server_harness import ServerProcess, free_port, server_env
from test_server_v2 import _import_tritonclient_grpc

MODEL = "tiny"
ORIGIN = "https://ui.example"
# What Prometheus 2.x sends when it scrapes (scrape.acceptHeader, 2.42 and later 2.x).
PROMETHEUS_2_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                       "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
VLLM_SERIES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "vllm:generation_tokens_total", "vllm:request_success_total",
               "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"]


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path) -> None:
        # vLLM manifest flags (runtime.compat_args) on the real command line.
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", "512", "-tp", "1", "--runner", "generate",
                "--disable-log-requests", "--uvicorn-log-level", "info", "--allowed-origins", f'["{ORIGIN}"]']
        super().__init__(model_dir, log_path, MODEL, args, server_env())
        self.before_ready: dict[str, set[int]] = {"/health": set(), "/v1/models": set()}

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Also record what /health and /v1/models answered while /v2/health/ready said no."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                answers = {p: httpx.get(self.url + p, timeout=2).status_code for p in self.before_ready}
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
                self.saw_not_ready = True
                for path, status in answers.items():
                    self.before_ready[path].add(status)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.tail()}")


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("conventions") / "server.log")
    try:
        srv.wait_ready()
        # One generation, so that the counters and histograms have samples.
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": MODEL, "prompt": "The sea", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()


# -- /metrics ---------------------------------------------------------------------------------------
def test_openmetrics_keeps_vllm_names(server):
    r = httpx.get(f"{server.url}/metrics", headers={"Accept": PROMETHEUS_2_ACCEPT}, timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    lines = r.text.splitlines()
    # prometheus-client >= 0.23 wrote vllm_num_requests_running here under "# TYPE vllm:...".
    assert any(line.startswith('vllm:num_requests_running{model_name="tiny"}') for line in lines), r.text[:2000]
    assert not any(line.startswith("vllm_") for line in lines)
    families = {f.name: f for f in text_string_to_metric_families(r.text)}  # OpenMetrics' own parser
    assert families["vllm:num_requests_running"].samples[0].labels == {"model_name": MODEL}
    assert any(s.value >= 4 for s in families["vllm:generation_tokens"].samples)
    # The classic text format is unchanged.
    plain = httpx.get(f"{server.url}/metrics", timeout=5)
    assert plain.headers["content-type"].startswith("text/plain")
    assert 'vllm:num_requests_running{model_name="tiny"}' in plain.text


def _prometheus_query(url: str, query: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def test_real_prometheus_finds_vllm_series(server, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian/Ubuntu: apt-get install -y prometheus; "
                    "scripts/test.sh installs it when run as root)")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""\
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: vlmserve
    static_configs: [{{targets: ["127.0.0.1:{server.port}"]}}]
""")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, missing, targets = time.monotonic() + 45, VLLM_SERIES, None
        while time.monotonic() < deadline and missing:
            time.sleep(1)
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
                missing = [name for name in VLLM_SERIES
                           if not _prometheus_query(url, f'{{__name__="{name}",model_name="{MODEL}"}}')]
            except httpx.TransportError:
                continue
        assert not missing, f"Prometheus has no {missing}; its targets: {targets}"
        # And by the names dashboards and autoscalers write (a colon is valid in PromQL names).
        tokens = _prometheus_query(url, f'sum(vllm:generation_tokens_total{{model_name="{MODEL}"}})')
        assert float(tokens[0]["value"][1]) >= 4
        assert targets and targets[0]["health"] == "up" and not targets[0]["lastError"]
    finally:
        proc.terminate()
        proc.wait(10)


# -- Triton's model configuration ----------------------------------------------------------------------
def _check_config(config: dict) -> None:
    assert config["name"] == MODEL
    # Shapes are given without a batch dimension (gRPC's JSON leaves out a proto3 field at 0).
    assert config.get("max_batch_size", 0) == 0
    inputs = {t["name"]: t for t in config["input"]}
    outputs = {t["name"]: t for t in config["output"]}
    assert inputs["text_input"]["data_type"] == "TYPE_STRING" and [int(d) for d in inputs["text_input"]["dims"]] == [1]
    assert inputs["stream"]["data_type"] == "TYPE_BOOL"
    assert outputs["text_output"]["data_type"] == "TYPE_STRING"
    assert outputs["num_input_tokens"]["data_type"] == "TYPE_INT32"
    # Streams answer several responses per request: Triton calls such a model decoupled.
    assert config["model_transaction_policy"] == {"decoupled": True}


def test_model_config_http_and_grpc(server):
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    try:
        _check_config(http.get_model_config(MODEL))
        assert http.get_model_config(MODEL)["max_batch_size"] == 0
        _check_config(http.get_model_config(MODEL, model_version="1"))
        with pytest.raises(Exception, match="(?i)not.*exist|not found|unknown"):
            http.get_model_config("no-such-model")
    finally:
        http.close()
    missing = httpx.get(f"{server.url}/v2/models/no-such-model/config", timeout=5)
    assert missing.status_code == 404 and "error" in missing.json()

    grpcclient = _import_tritonclient_grpc()
    grpc = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    try:
        _check_config(grpc.get_model_config(MODEL, as_json=True)["config"])
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException) as err:
            grpc.get_model_config("no-such-model")
        assert err.value.status() == "StatusCode.NOT_FOUND"
    finally:
        grpc.close()


# -- readiness from the OpenAI side ---------------------------------------------------------------
def test_health_and_models_follow_readiness(server):
    assert server.saw_not_ready, "the model was ready before the first poll: nothing checked"
    assert server.before_ready == {"/health": {503}, "/v1/models": {503}}
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    models = httpx.get(f"{server.url}/v1/models", timeout=5)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL


# -- the log ------------------------------------------------------------------------------------------
def test_log_is_quiet_and_starts_with_a_banner(server):
    assert httpx.get(f"{server.url}/v2/models/no-such-model", timeout=5).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/no-such-model/ready", timeout=5).status_code == 404
    assert httpx.get(f"{server.url}/v1/models/no-such-model", timeout=5).status_code == 404
    log = server.log_path.read_text()
    assert "Traceback" not in log  # a client's 404 is no server error
    assert "kserve.trace" not in log  # KServe's two timing lines for every request
    assert "endpoints not registered" not in log  # KServe's own OpenAI routes; ours are served
    banners = [line for line in log.splitlines() if "vlmserve serving" in line]
    assert len(banners) == 1, log[-3000:]
    for endpoint in (f"http://127.0.0.1:{server.port}", "/v1/chat/completions", "/health", f"/v2/models/{MODEL}/infer",
                     "/v2/health/ready", "/metrics", f"127.0.0.1:{server.grpc_port}"):
        assert endpoint in banners[0], banners[0]


def test_allowed_origins_answer_cors(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{server.url}/v1/chat/completions", headers=preflight, timeout=5)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{server.url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                      timeout=5)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
