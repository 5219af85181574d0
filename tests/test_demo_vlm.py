"""The bundled demo model ``vlmserve-demo`` (issue 16): a tiny Qwen2-VL trained on synthetic pictures.

What is checked, each against a reference independent of the engine:

* accuracy on held-out pictures (a seed the training never used) through ``LLM.chat``, against
  the answers the picture generator knows (``runtime.demo_pictures``);
* HF transformers' greedy ``generate`` on the same checkpoint gives the same token ids (the
  checkpoint is a standard HF model and the engine computes what HF computes);
* the running server (``python -m runtime`` with only the model's name) answers as offline, token
  for token: OpenAI chat with the picture as a data URL, and tritonclient's v2 infer;
* the checkpoint ships in the package and ``vlmserve serve`` with no model picks it.

The full 200-picture table is ``scripts/eval_demo_vlm.py``; this is the quick CI subset.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import resolve_model_dir
from runtime.demo_pictures import Example, chat_messages, held_out_examples, png_bytes, png_data_url
from runtime.demo_vlm import DEMO_MODEL_NAME, demo_model_dir
from server_harness import REPO, ServerProcess, running, server_env

N_ACCURACY = 40  # held-out pictures per question kind for the accuracy check
N_SERVER = 3  # per kind, through each server API
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def _offline() -> LLM:
    return LLM(model=DEMO_MODEL_NAME, device="cpu", seed=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --model_dir names no folder: the bundled demo is found by its name, as a user would serve it.
    srv = ServerProcess(DEMO_MODEL_NAME, tmp_path_factory.mktemp("demo_vlm") / "server.log", DEMO_MODEL_NAME, [],
                        server_env())
    with running(srv, _offline):  # the offline engine loads while the server starts
        yield srv


@pytest.fixture(scope="module")
def offline(server) -> LLM:
    return server.offline


def _chat(llm: LLM, examples: list[Example]):
    return llm.chat([chat_messages(e.question, e.picture.image) for e in examples], GREEDY, use_tqdm=False)


def test_checkpoint_is_bundled_small_and_described():
    path = demo_model_dir()
    assert resolve_model_dir(DEMO_MODEL_NAME) == path
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 20 * 2**20, f"the demo checkpoint is {size} bytes"
    assert "demonstration" in (path / "README.md").read_text().lower()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    # Installed (non-editable) packages carry only declared package data.
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["runtime"]
    shipped = {f.name for f in path.iterdir() if any(f.match(f"runtime/{pattern}") for pattern in data)}
    assert shipped == {f.name for f in path.iterdir()}


@pytest.mark.parametrize("kind", ["color", "shape"])  # issue 16 asks >= 95% for both
def test_held_out_accuracy_offline(offline, kind):
    examples = held_out_examples(kind, N_ACCURACY)
    assert len({e.answer for e in examples}) >= 4  # the set is varied, not one answer repeated
    answers = [o.outputs[0].text.strip() for o in _chat(offline, examples)]
    correct = sum(a == e.answer for a, e in zip(answers, examples))
    wrong = [(e.question, e.answer, a) for a, e in zip(answers, examples) if a != e.answer]
    assert correct / len(examples) >= 0.95, wrong


def test_hf_generate_gives_the_same_tokens(offline):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    path = str(demo_model_dir())
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tok, ip = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    examples = [e for kind in ("color", "shape", "count", "where") for e in held_out_examples(kind, 3)]
    pad = hf.config.image_token_id
    for e, out in zip(examples, _chat(offline, examples)):
        text = tok.apply_chat_template(chat_messages(e.question, e.picture.image), tokenize=False,
                                       add_generation_prompt=True)
        o = ip(images=[e.picture.image], return_tensors="pt")
        n = math.prod(o["image_grid_thw"][0].tolist()) // 4  # one pad per 2 x 2 merged patches
        ids = [i for t in tok(text).input_ids for i in ([t] * n if t == pad else [t])]
        assert ids == out.prompt_token_ids, "the engine expanded the prompt differently from HF"
        inp = torch.tensor([ids])
        with torch.no_grad():
            g = hf.generate(input_ids=inp, attention_mask=torch.ones_like(inp), pixel_values=o["pixel_values"],
                            image_grid_thw=o["image_grid_thw"], mm_token_type_ids=(inp == pad).int(),
                            do_sample=False, max_new_tokens=MAX_TOKENS)
        assert g[0, len(ids):].tolist() == list(out.outputs[0].token_ids), e.question


def _server_examples() -> list[Example]:
    return [e for kind in ("color", "shape", "count", "where") for e in held_out_examples(kind, N_SERVER)]


def test_openai_chat_with_data_url_equals_offline(server, offline):
    from openai import OpenAI

    examples = _server_examples()
    refs = _chat(offline, examples)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL_NAME]
    for e, ref in zip(examples, refs):
        r = client.chat.completions.create(model=DEMO_MODEL_NAME, temperature=0, max_tokens=MAX_TOKENS,
                                           messages=chat_messages(e.question, png_data_url(e.picture.image)))
        assert r.choices[0].message.content == ref.outputs[0].text, e.question
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_tritonclient_v2_infer_equals_offline(server, offline):
    import tritonclient.http as httpclient

    examples = _server_examples()
    refs = _chat(offline, examples)
    tok = offline.get_tokenizer()
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)
    try:
        for e, ref in zip(examples, refs):
            # v2 infer takes the raw prompt: the chat template rendered, its image placeholder in it.
            prompt = tok.apply_chat_template(chat_messages(e.question, e.picture.image), tokenize=False,
                                             add_generation_prompt=True)
            inputs = []
            for name, dtype, value in (("text_input", "BYTES", prompt.encode()),
                                       ("image", "BYTES", png_bytes(e.picture.image)),
                                       ("sampling_parameters", "BYTES", json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS}).encode()),
                                       ("exclude_input_in_output", "BOOL", True)):
                t = httpclient.InferInput(name, [1], dtype)
                t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else bool))
                inputs.append(t)
            r = client.infer(DEMO_MODEL_NAME, inputs)
            assert r.as_numpy("text_output")[0].decode() == ref.outputs[0].text, e.question
            assert int(r.as_numpy("num_output_tokens")[0]) == len(ref.outputs[0].token_ids)
            assert int(r.as_numpy("num_input_tokens")[0]) == len(ref.prompt_token_ids)
    finally:
        client.close()


def test_serve_without_model_serves_the_demo(monkeypatch):
    import argparse

    import runtime.serve as serve_mod

    seen = {}
    monkeypatch.setattr(serve_mod, "launch", lambda ns, name, config: seen.update(model=ns.model, name=name) or 0)
    ns = serve_mod.add_serve_args(argparse.ArgumentParser()).parse_args([])
    assert serve_mod.run_serve(ns) == 0
    assert seen == {"model": DEMO_MODEL_NAME, "name": DEMO_MODEL_NAME}
    assert resolve_model_dir(seen["model"]) == demo_model_dir()
    assert Path(demo_model_dir(), "model.safetensors").exists()
