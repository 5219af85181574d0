"""The guide's Phi-3.5-vision and VLM2Vec commands against a tiny ``Phi3VForCausalLM`` folder, checked
against the independent reference (``tiny_phi3v.Oracle``):

* ``vlmserve serve DIR --task generate --trust-remote-code --max-model-len 4096
  --limit-mm-per-prompt image=2`` with the OpenAI client (an image and a question);
* VLM2Vec: ``LLM(..., task="embed")`` and ``vlmserve serve DIR --task embedding --trust-remote-code
  --max-model-len 4096 --chat-template examples/template_vlm2vec.jinja`` with the guide's
  ``requests.post(.../v1/embeddings, json={"messages": ...})``: last-token pooling, normalised,
  cosine >= 0.9999 (fp32) with the oracle's embedding.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import requests
import torch
from server_harness import REPO, CliServer, running

import tiny_phi3v
from engine import LLM

TEMPLATE = REPO / "examples" / "template_vlm2vec.jinja"
IMAGE = tiny_phi3v.random_image(240, 400, seed=5)
QUESTION = "What is shown in this image?"


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


VlmserveServe = CliServer  # ``vlmserve serve MODEL_DIR <guide flags>``, fp32 on the CPU


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_phi3v.build_tiny_phi3v(tmp_path_factory.mktemp("phi3v_serve"), scale=0.2, seed=1)


@pytest.fixture(scope="module")
def oracle(model_dir):
    return tiny_phi3v.Oracle(model_dir)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Both guide servers, started together (their start-ups overlap)."""
    logs = tmp_path_factory.mktemp("phi3v_serve_logs")
    common = ["--trust-remote-code", "--max-model-len", "4096"]
    generate = ["--task", "generate", *common, "--limit-mm-per-prompt", "image=2"]
    embedding = ["--task", "embedding", *common, "--chat-template", str(TEMPLATE)]
    gen = VlmserveServe(model_dir, logs / "generate.log", generate)
    try:
        emb = VlmserveServe(model_dir, logs / "embedding.log", embedding)
        with running(emb), running(gen):
            yield {"generate": gen, "embedding": emb}
    finally:
        gen.stop()


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_serve_generate_openai_client(model_dir, oracle, servers):
    client = openai.OpenAI(base_url=f"{servers['generate'].url}/v1", api_key="EMPTY", max_retries=0, timeout=60)
    resp = client.chat.completions.create(
        model=str(model_dir), max_tokens=8, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
        ]}],
    )
    # Phi-3.5-vision's template takes strings: the parts become "<question>\n<|image_1|>".
    text = f"<|user|>\n{QUESTION}\n<|image_1|><|end|>\n<|assistant|>\n"
    want = oracle.greedy(text, [IMAGE], 8)
    assert resp.usage.prompt_tokens == len(oracle.prompt_ids(text, [IMAGE]))
    assert resp.choices[0].message.content == oracle.tok.decode(want, skip_special_tokens=True)


def test_offline_embeddings_match_oracle(model_dir, oracle):
    llm = LLM(model=str(model_dir), task="embed", trust_remote_code=True, max_model_len=4096,
              dtype="float32", device="cpu")
    text = "<|image_1|> Represent the given image."
    other = tiny_phi3v.random_image(300, 200, seed=6)
    outs = llm.embed([{"prompt": text, "multi_modal_data": {"image": img}} for img in (IMAGE, other)], use_tqdm=False)
    for img, out in zip((IMAGE, other), outs):
        got, want = np.asarray(out.outputs.embedding), oracle.embedding(text, [img]).numpy()
        assert out.prompt_token_ids == oracle.prompt_ids(text, [img])
        assert abs(np.linalg.norm(got) - 1) < 1e-5 and cosine(got, want) >= 0.9999
    assert cosine(outs[0].outputs.embedding, outs[1].outputs.embedding) < 0.9999  # the image matters


def test_serve_vlm2vec_embeddings_request(model_dir, oracle, servers):
    response = requests.post(f"{servers['embedding'].url}/v1/embeddings", timeout=60, json={
        "model": str(model_dir),
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
            {"type": "text", "text": "Represent the given image."},
        ]}],
        "encoding_format": "float",
    })
    response.raise_for_status()
    body = response.json()
    got = body["data"][0]["embedding"]
    want = oracle.embedding("<|image_1|> Represent the given image.", [IMAGE]).numpy()
    assert len(got) == 64 and cosine(got, want) >= 0.9999
    assert body["usage"]["prompt_tokens"] == len(oracle.prompt_ids("<|image_1|> Represent the given image.", [IMAGE]))
