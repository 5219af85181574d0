"""Images inside ``messages`` on the server's ``/v1/embeddings`` (vLLM's chat-embeddings form), on a
tiny Qwen2-VL served as the guide serves DSE-Qwen2: ``vlmserve serve DIR --task embedding
--chat-template examples/template_dse_qwen2_vl.jinja`` (``qwen2_vl_serve``, large weight scale).

The oracle is HF's ``Qwen2VLModel``: the last layer's hidden state (after the final norm) at the
last token, L2-normalised (the server's default pooling: LAST, normalised), on the prompt that
the published DSE template renders — transcribed here as text, not rendered by the server's code —
with each ``<|image_pad|>`` expanded by HF's image processor grid.
"""

from __future__ import annotations

import math

import httpx
import pytest
import torch

import tiny_vlm
from qwen2_vl_serve import SERVED_NAME, data_url

IMAGES = [tiny_vlm.random_image(100, 150, 31), tiny_vlm.random_image(60, 200, 32)]
QUESTION = "What is shown in this image?"
TOL = 1e-5
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@torch.no_grad()
def hf_embedding(model_dir, text: str, images: list) -> tuple[torch.Tensor, int]:
    """(normalised last-token hidden state, prompt length) of ``text`` with ``images`` in HF."""
    hf = tiny_vlm.load_hf_qwen2_vl(model_dir)
    o = tiny_vlm.load_image_processor(model_dir)(images=images, return_tensors="pt")
    from transformers import AutoTokenizer

    image_token = hf.config.image_token_id
    ids, grids = [], iter(o["image_grid_thw"].tolist())
    for t in AutoTokenizer.from_pretrained(str(model_dir))(text).input_ids:
        ids += [t] * (math.prod(next(grids)) // 4) if t == image_token else [t]
    inp = torch.tensor([ids])
    hidden = hf.model(input_ids=inp, pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"],
                      mm_token_type_ids=(inp == image_token).int()).last_hidden_state
    return torch.nn.functional.normalize(hidden[0, -1].float(), dim=-1), len(ids)


def _embed(server, messages: list[dict]) -> dict:
    r = httpx.post(f"{server.url}/v1/embeddings", timeout=120,
                   json={"model": SERVED_NAME, "messages": messages, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("count", [1, 2])
def test_image_messages_embedding_equals_hf(qwen2_vl_servers, served_qwen2_vl, count):
    images = IMAGES[:count]
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in images]
    body = _embed(qwen2_vl_servers["embedding"], [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}])
    # What the published template renders for this conversation (vLLM's default for embeddings:
    # no generation prompt): its default system turn, the images' placeholders, <|endoftext|>.
    text = f"{SYSTEM}<|im_start|>user\n{VISION * count}{QUESTION}<|im_end|>\n<|endoftext|>"
    want, n_tokens = hf_embedding(served_qwen2_vl, text, images)
    got = torch.tensor(body["data"][0]["embedding"])
    assert got.shape == want.shape and torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    assert body["usage"]["prompt_tokens"] == n_tokens


def test_the_image_matters_and_errors_are_400(qwen2_vl_servers):
    server = qwen2_vl_servers["embedding"]
    a, b = (_embed(server, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                        {"type": "text", "text": QUESTION}]}])["data"][0]["embedding"]
            for img in IMAGES)
    assert torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0) < 0.9999
    r = httpx.post(f"{server.url}/v1/embeddings", timeout=60, json={"model": SERVED_NAME, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"], r.text
