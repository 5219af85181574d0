"""``/metrics`` of the real server (``python -m runtime`` serving the tiny Qwen2-VL, a subprocess on
free ports): vLLM's metric names and types labelled ``model_name``, counters and histograms that
add up to what the API answered (usage, finish reasons), images, prefix cache and preemptions, a
client that disconnects mid-stream bringing the gauges back to 0, and ``promtool check metrics``
(skipped when promtool is not installed)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import tiny_vlm
from prometheus_client.parser import text_string_to_metric_families
from server_harness import ServerProcess, post_and_hang_up, running, server_env

MODEL = "tiny-vl"
MAX_MODEL_LEN = 1024
NUM_BLOCKS = 72  # 71 usable blocks of 16 tokens: one max_model_len request fits, two long ones do not

GAUGES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"]
COUNTERS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vlmserve:images_processed_total"]
HISTOGRAMS = ["vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
              "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
              "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vlmserve:image_preprocess_seconds"]


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path) -> None:
        args = ["--dtype", "float32", "--device", "cpu", "--max_model_len", str(MAX_MODEL_LEN),
                "--num-gpu-blocks-override", str(NUM_BLOCKS), "--limit-mm-per-prompt", "image=2"]
        super().__init__(model_dir, log_path, MODEL, args, server_env())

    def metrics_text(self) -> str:
        r = httpx.get(f"{self.url}/metrics", timeout=5)
        assert r.status_code == 200
        return r.text

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels without model_name): value} of our model's series."""
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.labels.get("model_name") != MODEL:
                    continue
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_metrics"), seed=0)


@pytest.fixture(scope="module")
def server(vlm_dir, tmp_path_factory):
    srv = Server(vlm_dir, tmp_path_factory.mktemp("server") / "server.log")
    with running(srv):
        srv.vocab_size = json.loads((vlm_dir / "config.json").read_text())["text_config"]["vocab_size"]
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _image_url(seed: int, h: int = 56, w: int = 84) -> str:
    buf = io.BytesIO()
    tiny_vlm.random_image(h, w, seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_names_types_and_labels(server):
    text = server.metrics_text()
    for name in GAUGES:
        assert f"# TYPE {name} gauge" in text
    for name in COUNTERS:
        assert f"# TYPE {name} counter" in text
    for name in HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text
        assert re.search(rf'^{re.escape(name)}_bucket\{{le="\+Inf",model_name="{MODEL}"\}} ', text, re.MULTILINE), name
    for name in GAUGES + COUNTERS:
        assert re.search(rf'^{re.escape(name)}\{{(finished_reason="\w+",)?model_name="{MODEL}"', text, re.MULTILINE), name
    for reason in ("stop", "length", "abort"):
        assert f'vllm:request_success_total{{finished_reason="{reason}",model_name="{MODEL}"}}' in text
    assert "# TYPE request_predict_seconds histogram" in text  # KServe's own metrics stay


def test_counters_and_histograms_add_up(server, client):
    before = server.metrics()
    usages, finishes = [], []
    kw = {"model": MODEL, "temperature": 0}
    # finish "length", text only
    r = client.chat.completions.create(messages=[{"role": "user", "content": "Tell me about the sea."}],
                                       max_tokens=7, extra_body={"ignore_eos": True}, **kw)
    usages.append(r.usage)
    finishes.append(r.choices[0].finish_reason)
    # finish "stop": every token id stops it, so it ends after its first token
    r = client.completions.create(prompt="Once upon a time", max_tokens=10,
                                  extra_body={"stop_token_ids": list(range(server.vocab_size))}, **kw)
    usages.append(r.usage)
    finishes.append(r.choices[0].finish_reason)
    assert (finishes[-1], r.usage.completion_tokens) == ("stop", 1)
    # two images, then one image streamed (usage from the last chunk)
    r = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_url(1)}},
        {"type": "image_url", "image_url": {"url": _image_url(2)}},
        {"type": "text", "text": "Compare them."}]}], max_tokens=5, extra_body={"ignore_eos": True}, **kw)
    usages.append(r.usage)
    finishes.append(r.choices[0].finish_reason)
    stream = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_url(3)}}, {"type": "text", "text": "What is it?"}]}],
        max_tokens=6, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **kw)
    for chunk in stream:
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert len(usages) == len(finishes) == 4
    after = server.metrics()

    prompt_tokens = sum(u.prompt_tokens for u in usages)
    generation_tokens = sum(u.completion_tokens for u in usages)
    assert delta(after, before, "vllm:prompt_tokens_total") == prompt_tokens
    assert delta(after, before, "vllm:generation_tokens_total") == generation_tokens
    for reason in ("stop", "length"):
        assert delta(after, before, "vllm:request_success_total", finished_reason=reason) == finishes.count(reason)
    assert delta(after, before, "vllm:request_success_total", finished_reason="abort") == 0

    n = len(usages)
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert delta(after, before, f"{name}_count") == n, name
        assert delta(after, before, f"{name}_bucket", le="+Inf") == n, name
    # One inter-token latency per token after a request's first.
    assert delta(after, before, "vllm:inter_token_latency_seconds_count") == generation_tokens - n
    assert delta(after, before, "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert delta(after, before, "vllm:request_generation_tokens_sum") == generation_tokens
    # Every request's phases fit inside its end-to-end latency.
    e2e = delta(after, before, "vllm:e2e_request_latency_seconds_sum")
    ttft = delta(after, before, "vllm:time_to_first_token_seconds_sum")
    decode = delta(after, before, "vllm:request_decode_time_seconds_sum")
    assert 0 < ttft <= e2e and 0 <= decode <= e2e
    assert delta(after, before, "vllm:request_queue_time_seconds_sum") + \
        delta(after, before, "vllm:request_prefill_time_seconds_sum") <= ttft + 1e-6
    # Histogram buckets are cumulative: the smallest bucket holding every prompt (<= 100 tokens here).
    assert delta(after, before, "vllm:request_prompt_tokens_bucket", le="100.0") == n

    assert delta(after, before, "vlmserve:images_processed_total") == 3
    assert delta(after, before, "vlmserve:image_preprocess_seconds_count") == 2  # one per request with images
    assert delta(after, before, "vlmserve:image_preprocess_seconds_sum") > 0
    # Nothing left running.
    assert value(after, "vllm:num_requests_running") == 0 and value(after, "vllm:kv_cache_usage_perc") == 0


def test_prefix_cache_and_preemption_counters(server, client):
    before = server.metrics()
    text = "The quick brown fox jumps over the lazy dog. " * 12
    for _ in range(2):  # the second time, its full blocks come from the prefix cache
        client.completions.create(model=MODEL, prompt=text, max_tokens=2, temperature=0)
    mid = server.metrics()
    queried = delta(mid, before, "vllm:prefix_cache_queries_total")
    hits = delta(mid, before, "vllm:prefix_cache_hits_total")
    assert queried > 0 and 0 < hits <= queried
    assert hits % 16 == 0  # whole blocks

    # Two long requests at once (one batch request: both reach the engine together) need more KV
    # blocks than there are (2 x 36 > 71 once each has 21 new tokens): the newer one is preempted.
    prompt_ids = [[(7 * i + 11 * k) % 200 + 10 for i in range(540)] for k in range(2)]
    r = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=40, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    after = server.metrics()
    assert delta(after, mid, "vllm:num_preemptions_total") >= 1
    assert delta(after, mid, "vllm:generation_tokens_total") == 80  # recomputed tokens are not counted again
    assert value(after, "vllm:kv_cache_usage_perc") == 0 and value(after, "vllm:num_requests_waiting") == 0


def _wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if all(value(m, g) == 0 for g in GAUGES):
            return m
        time.sleep(0.05)
    raise AssertionError(f"gauges did not come back to 0: {[(g, value(server.metrics(), g)) for g in GAUGES]}")


def test_disconnect_mid_stream_brings_gauges_back_to_zero(server):
    before = server.metrics()
    body = {"model": MODEL, "max_tokens": 900, "ignore_eos": True, "stream": True, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": _image_url(4)}}, {"type": "text", "text": "Go."}]}]}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping a half-read iterator closes the connection
        data = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(4))]
        assert len(data) == 4
        busy = server.metrics()
        assert value(busy, "vllm:num_requests_running") == 1 and value(busy, "vllm:kv_cache_usage_perc") > 0
    t0 = time.monotonic()
    after = _wait_idle(server)
    assert time.monotonic() - t0 < 5
    # Counted as aborted; its tokens so far count as generated, and it is in no latency histogram.
    assert delta(after, before, "vllm:request_success_total", finished_reason="abort") == 1
    assert delta(after, before, "vllm:generation_tokens_total") >= 3
    assert delta(after, before, "vllm:e2e_request_latency_seconds_count") == 0

    # A non-streaming request whose client gives up (once the engine runs it) is aborted too.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 900, "ignore_eos": True}
    post_and_hang_up(server.url, "/v1/chat/completions", chat,
                     lambda: value(server.metrics(), "vllm:num_requests_running") == 1)
    final = _wait_idle(server)
    assert delta(final, before, "vllm:request_success_total", finished_reason="abort") == 2


def test_promtool_accepts_metrics(server, client):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install -y prometheus)")
    client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_url(5)}}, {"type": "text", "text": "Hi"}]}])
    text = server.metrics_text()
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=30)
    # Exit 0: clean. Exit 3: lint findings only (parse errors exit 1). vLLM's own names carry a
    # colon (vllm:..., as do ours, vlmserve:...), which promtool's linter always reports; anything
    # else it finds is a real problem.
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    findings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    unexpected = [f for f in findings
                  if not re.fullmatch(r"(vllm|vlmserve):\S+ metric names should not contain ':'", f.strip())]
    assert not unexpected, "\n".join(unexpected)
