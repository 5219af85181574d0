"""The runnable examples (examples/*.py), each run as a subprocess against a tiny Qwen2-VL built
here (``qwen2_vl_serve``): the offline scripts with ``--model DIR``, the OpenAI clients with
``--model``/``--base-url`` of the servers ``vlmserve serve`` runs (``qwen2_vl_servers``). Each
script's output must be what the engine gives in this process for the same input: the offline
``LLM.chat`` (greedy text) and ``LLM.embed`` on the chat prompt the DSE template renders.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import tiny_vlm
from qwen2_vl_serve import DSE_TEMPLATE, SERVED_NAME
from server_harness import REPO, server_env

from engine import LLM, SamplingParams

EXAMPLES = REPO / "examples"
MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
IMAGES = [tiny_vlm.random_image(90, 120, 41), tiny_vlm.random_image(120, 80, 42)]


def run(script: str, *args: str) -> list[dict]:
    """The script's ``--json`` lines."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args, "--json"], cwd=REPO, env=server_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(EXAMPLES))  # the clients import their sibling's helpers
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("example_images")
    paths = []
    for i, image in enumerate(IMAGES):
        image.save(out / f"image{i}.png")
        paths.append(str(out / f"image{i}.png"))
    return paths


@pytest.fixture(scope="module")
def llm(served_qwen2_vl):
    return LLM(str(served_qwen2_vl), dtype="float32", device="cpu", max_model_len=2048,
               limit_mm_per_prompt={"image": 4})


def engine_text(llm, images: list, question: str) -> str:
    content = [*({"type": "image", "image": img} for img in images), {"type": "text", "text": question}]
    return llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)[0].outputs[0].text


@pytest.mark.parametrize("script,count", [("offline_single_image.py", 1), ("offline_multi_image.py", 2)])
def test_offline_scripts(served_qwen2_vl, llm, image_files, script, count):
    question = "Describe the pictures."
    args = ["--model", str(served_qwen2_vl), "--question", question, "--max-tokens", str(MAX_TOKENS),
            "--dtype", "float32", "--device", "cpu"]
    for path in image_files[:count]:
        args += ["--image", path]
    (got,) = run(script, *args)
    assert got["text"] == engine_text(llm, IMAGES[:count], question)


def test_openai_chat_client_single_and_multi_image(qwen2_vl_servers, llm, image_files):
    questions = script_module("openai_chat_client").QUESTIONS
    lines = run("openai_chat_client.py", "--base-url", f"{qwen2_vl_servers['generate'].url}/v1",
                "--model", SERVED_NAME, "--image", image_files[0], "--image", image_files[1],
                "--max-tokens", str(MAX_TOKENS))
    assert [line["request"] for line in lines] == ["single-image", "multi-image"]
    assert lines[0]["text"] == engine_text(llm, IMAGES[:1], questions["single-image"])
    assert lines[1]["text"] == engine_text(llm, IMAGES, questions["multi-image"])


def test_openai_chat_embedding_client(qwen2_vl_servers, served_qwen2_vl, image_files):
    text = "Represent this picture."
    (got,) = run("openai_chat_embedding_client.py", "--base-url", f"{qwen2_vl_servers['embedding'].url}/v1",
                 "--model", SERVED_NAME, "--image", image_files[0], "--text", text)
    embed = LLM(str(served_qwen2_vl), dtype="float32", device="cpu", max_model_len=2048, task="embed")
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": text}]}]
    prompt = embed.processor.chat_prompt(messages, embed.media_loader, DSE_TEMPLATE.read_text(),
                                         add_generation_prompt=False)  # vLLM's default for embeddings
    want = np.asarray(embed.embed(prompt, use_tqdm=False)[0].outputs.embedding)
    assert np.allclose(np.asarray(got["embedding"]), want, atol=1e-5, rtol=0)
