"""The real server (``python -m runtime``, a subprocess on free ports) through the official
``openai`` client: chat / completions (streamed and not) against the offline engine, models,
n, stop strings, logprobs, errors, API key, client disconnects and SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import ServerProcess, post_and_hang_up, running, server_env

from engine import LLM, SamplingParams

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_MODEL_LEN = 1024
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about the sea."}]


class Server(ServerProcess):
    def __init__(self, model_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        args = ["--served-model-name", "tiny-alias", "--dtype", "float32", "--device", "cpu",
                "--max_model_len", str(MAX_MODEL_LEN), "--graceful_shutdown_timeout", "20", *extra_args]
        super().__init__(model_dir, log_path, "tiny", args, server_env(api_key=API_KEY))

    def gauge(self, name: str = "vllm:num_requests_running") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        m = re.search(rf'^{re.escape(name)}\{{model_name="tiny"\}} (\S+)$', text, re.MULTILINE)
        assert m, text
        return float(m.group(1))


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("server") / "server.log")
    # The offline reference engine loads while the server starts.
    with running(srv, lambda: LLM(model=str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)):
        yield srv


@pytest.fixture(scope="module")
def offline(server):
    return server.offline


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_health_metadata_and_metrics(server):
    # HTTP came up before the engine was warm, and readiness said so meanwhile.
    assert server.saw_not_ready
    get = lambda path, **kw: httpx.get(server.url + path, timeout=5, **kw)
    assert get("/v2/health/live").json() == {"live": True}
    assert get("/v2/health/ready").json() == {"ready": True}
    assert get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    meta = get("/v2/models/tiny", headers=AUTH).json()
    assert meta["name"] == "tiny" and {i["name"] for i in meta["inputs"]} >= {"text_input", "sampling_parameters"}
    assert get("/v2/models/tiny").status_code == 401  # v2 routes need the key; health does not
    assert get("/metrics").status_code == 200 and server.gauge() == 0.0


def test_grpc_v2_health_metadata_and_api_key(server):
    import grpc

    from runtime._kserve import kserve  # kserve imported without parsing pytest's argv

    pb, pb_grpc = kserve.protocol.grpc.grpc_predict_v2_pb2, kserve.protocol.grpc.grpc_predict_v2_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny"), timeout=10).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="tiny"), timeout=10,
                                  metadata=[("authorization", f"Bearer {API_KEY}")])
        assert meta.name == "tiny" and "text_input" in [t.name for t in meta.inputs]


def test_chat_matches_offline_engine(client, offline):
    ref = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == "tiny" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # Text parts, the alias name and the /openai/v1 prefix give the same answer.
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    other = openai.OpenAI(base_url=f"{client.base_url}".replace("/v1", "/openai/v1"), api_key=API_KEY, max_retries=0)
    r2 = other.chat.completions.create(model="tiny-alias", messages=parts, temperature=0, max_completion_tokens=24)
    assert r2.choices[0].message.content == ref.outputs[0].text and r2.model == "tiny-alias"


def test_chat_stream_equals_non_stream(client):
    kw = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 32}
    full = client.chat.completions.create(**kw)
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    text, finishes, roles, usage, chunks = "", [], [], None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            text += c.delta.content or ""
            finishes += [c.finish_reason] if c.finish_reason else []
    assert chunks > 3
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason] and roles == ["assistant"]
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_and_not(client, offline):
    prompt = "The capital of France is"
    ref = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=20)
    assert r.object == "text_completion" and r.choices[0].text == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, temperature=0, max_tokens=20, stream=True) if c.choices)
    assert streamed == ref.outputs[0].text

    refs = offline.generate([prompt, "Hello"], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    many = client.completions.create(model="tiny", prompt=[prompt, "Hello"], temperature=0, max_tokens=5)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [o.outputs[0].text for o in refs]


def test_models_list_and_get(client):
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-alias"}
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert "no-such-model" in err.value.body["message"]


def test_n2_and_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, temperature=1.0, seed=3, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 16
    # Streamed, each of the n choices finishes exactly once, and the usage adds up.
    finishes: dict[int, list[str]] = {0: [], 1: []}
    tokens = 0
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, temperature=1.0, seed=3,
                                                max_tokens=8, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            finishes[c.index] += [c.finish_reason] if c.finish_reason else []
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    assert all(len(f) == 1 for f in finishes.values()) and tokens == r.usage.completion_tokens

    r = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=6,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 2 and tok.logprob <= 0
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob)  # greedy: the top token


def test_stop_string(client):
    kw = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 40}
    full = client.chat.completions.create(**kw).choices[0].message.content
    m = re.search(r"[A-Za-z]{2,}", full[4:])
    assert m, full
    stop = m.group(0)
    expected = full[: full.index(stop)]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stop=stop, stream=True, **kw) if c.choices)
    assert streamed == expected


def _post(server, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=30)


def test_bad_inputs_get_openai_errors(server, client):
    def check(resp: httpx.Response, status: int, *words: str) -> None:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) >= {"message", "type", "code"}
        for w in words:
            assert w in err["message"], err

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    check(_post(server, "/v1/chat/completions", '{"model": "tiny", "messages": ['), 400, "JSON")
    check(_post(server, "/v1/chat/completions", {**chat, "max_tokens": -5}), 400, "max_tokens")
    check(_post(server, "/v1/chat/completions", {"model": "tiny"}), 400, "messages")
    check(_post(server, "/v1/chat/completions", {**chat, "temperature": -1}), 400, "temperature")
    check(_post(server, "/v1/chat/completions", {**chat, "model": "gpt-17"}), 404, "gpt-17")
    check(_post(server, "/v1/completions", {"model": "tiny", "prompt": "sea " * 1500}), 400,
          "max_model_len", str(MAX_MODEL_LEN))
    check(_post(server, "/v1/chat/completions", chat, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    check(_post(server, "/v1/chat/completions", chat, headers={}), 401, "API key")

    # A generative model does not serve embeddings.
    check(_post(server, "/v1/embeddings", {"model": "tiny", "input": "hi"}), 400, "does not support embeddings")
    with pytest.raises(openai.BadRequestError, match="does not support embeddings"):
        client.embeddings.create(model="tiny", input=["hi"])

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=-1)
    assert "max_tokens" in err.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    # Still serving.
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).usage.completion_tokens == 3


def _aborted(server) -> float:
    """vllm:request_success_total{finished_reason="abort"} (0 before the first abort)."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    m = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _wait_gauge(server, value: float, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.gauge() == value:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"vllm:num_requests_running stayed at {server.gauge()} (want {value})")


def test_client_disconnect_aborts_engine_request(server):
    # ~1000 tokens would take tens of seconds; the abort must free the engine within a few.
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping a half-read iterator closes the connection
        data = [line for line, _ in zip((x for x in lines if x.startswith("data: ")), range(3))]
        assert len(data) == 3 and server.gauge() == 1.0
    assert _wait_gauge(server, 0.0, timeout=10) < 5

    # A non-streaming request whose client gives up (once the engine runs it) is cancelled too:
    # counted as aborted, not left to run its 900 tokens.
    aborted = _aborted(server)
    chat = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}
    post_and_hang_up(server.url, "/v1/chat/completions", chat, lambda: server.gauge() == 1.0, AUTH)
    assert _wait_gauge(server, 0.0, timeout=10) < 5
    assert _aborted(server) == aborted + 1


def test_sigterm_drains_in_flight_and_exits_zero(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
        it = r.iter_lines()
        next(line for line in it if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.get(f"{server.url}/v2/health/live", timeout=2)
        events = [line[6:] for line in it if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert finishes == ["length"]  # the in-flight request ran to completion
    assert server.proc.wait(30) == 0, server.tail()
