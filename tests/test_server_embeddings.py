"""The real server started with ``--task embedding`` (``python -m runtime`` as a subprocess, tiny
Qwen2) through the official ``openai`` client and ``tritonclient.http``: /v1/embeddings (float and
base64, dimensions, token-id inputs, vLLM's ``messages`` form) equals the offline ``LLM.embed``;
generation routes answer 400; v2 metadata and infer give the ``embedding`` output."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from server_harness import running
from test_server_openai import API_KEY, AUTH, MAX_MODEL_LEN, MESSAGES, Server

from engine import LLM, PoolingParams

TEXTS = ["The capital of France is Paris.", "hello", "A much longer sentence about the sea, the sky and the land."]
TOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_qwen2, tmp_path_factory):
    srv = Server(tiny_qwen2, tmp_path_factory.mktemp("embed_server") / "server.log", ("--task", "embedding"))
    with running(srv, lambda: LLM(model=str(tiny_qwen2), dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
                                  task="embed")):
        yield srv


@pytest.fixture(scope="module")
def offline(server):
    return server.offline


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _ref(offline, prompts, params=None) -> np.ndarray:
    return np.array([o.outputs.embedding for o in offline.embed(prompts, params, use_tqdm=False)])


def test_float_and_base64_equal_offline(client, offline):
    want = _ref(offline, TEXTS)
    resp = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    assert resp.object == "list" and resp.model == "tiny" and [d.index for d in resp.data] == [0, 1, 2]
    assert all(d.object == "embedding" for d in resp.data)
    got = np.array([d.embedding for d in resp.data])
    assert got.shape == (3, 64) and np.allclose(got, want, atol=TOL, rtol=0)
    ntok = sum(len(offline.get_tokenizer()(t).input_ids) for t in TEXTS)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == ntok

    raw = httpx.post(f"{client.base_url}embeddings", headers=AUTH, timeout=60,
                     json={"model": "tiny-alias", "input": TEXTS[0], "encoding_format": "base64"}).json()
    assert raw["model"] == "tiny-alias" and isinstance(raw["data"][0]["embedding"], str)
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, want[0], atol=TOL, rtol=0)
    # The openai client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model="tiny", input=TEXTS[0])
    assert np.allclose(default.data[0].embedding, want[0], atol=TOL, rtol=0)


def test_dimensions_and_token_ids(client, offline):
    want = _ref(offline, TEXTS[:1], PoolingParams(dimensions=16))
    resp = client.embeddings.create(model="tiny", input=TEXTS[0], dimensions=16, encoding_format="float")
    got = np.array(resp.data[0].embedding)
    assert got.shape == (16,) and np.allclose(got, want[0], atol=TOL, rtol=0)
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5
    ids = offline.get_tokenizer()(TEXTS[1]).input_ids
    resp = client.embeddings.create(model="tiny", input=[ids, ids[:1]], encoding_format="float")
    want = _ref(offline, [{"prompt_token_ids": ids}, {"prompt_token_ids": ids[:1]}])
    assert np.allclose(np.array([d.embedding for d in resp.data]), want, atol=TOL, rtol=0)


def test_messages_form_equals_templated_prompt(server, offline):
    body = {"model": "tiny", "messages": MESSAGES, "encoding_format": "float"}
    r = httpx.post(f"{server.url}/v1/embeddings", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200, r.text
    prompt = offline.processor.chat_prompt(MESSAGES, offline.media_loader, None, add_generation_prompt=False)
    want = _ref(offline, [prompt])
    assert np.allclose(r.json()["data"][0]["embedding"], want[0], atol=TOL, rtol=0)
    assert r.json()["usage"]["prompt_tokens"] == len(prompt["prompt_token_ids"])
    r2 = httpx.post(f"{server.url}/openai/v1/embeddings", headers=AUTH, json=body, timeout=60)
    assert r2.status_code == 200 and np.allclose(r2.json()["data"][0]["embedding"], want[0], atol=TOL, rtol=0)


def test_errors(server, client):
    def post(path, body):
        return httpx.post(f"{server.url}{path}", headers=AUTH, json=body, timeout=60)

    for path, body in (("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES}),
                       ("/v1/completions", {"model": "tiny", "prompt": "hi"})):
        r = post(path, body)
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"], r.text
    for body, word in (({"model": "tiny"}, "input"), ({"model": "tiny", "input": []}, "input"),
                       ({"model": "tiny", "input": "x", "dimensions": 65}, "dimensions"),
                       ({"model": "tiny", "input": "x", "dimensions": 0}, "dimensions"),
                       ({"model": "tiny", "input": "sea " * 1500}, "max_model_len"),
                       ({"model": "tiny", "input": "x", "encoding_format": "int8"}, "encoding_format")):
        r = post("/v1/embeddings", body)
        assert r.status_code == 400 and word in r.text, (body, r.text)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES)
    # Still serving.
    assert len(client.embeddings.create(model="tiny", input="ok", encoding_format="float").data[0].embedding) == 64


def test_v2_metadata_and_infer(server, offline):
    http = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        meta = http.get_model_metadata("tiny", headers=dict(AUTH))
        assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
        assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 64]}]
        want = _ref(offline, TEXTS[:2])
        for binary in (True, False):
            t = httpclient.InferInput("text_input", [2], "BYTES")
            t.set_data_from_numpy(np.array([s.encode() for s in TEXTS[:2]], dtype=object), binary_data=binary)
            out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
            result = http.infer("tiny", [t], outputs=[out], headers=dict(AUTH))
            got = result.as_numpy("embedding")
            assert got.shape == (2, 64) and got.dtype == np.float32
            assert np.allclose(got, want, atol=TOL, rtol=0)
    finally:
        http.close()
    r = httpx.post(f"{server.url}/v2/models/tiny/generate", headers=AUTH, json={"text_input": "hi"}, timeout=60)
    assert r.status_code == 400 and "embedding model" in r.json()["error"]
