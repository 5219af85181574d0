"""examples/template_*.jinja render what vLLM's published example templates of the same names render.

Rendered with jinja2 the way transformers' ``apply_chat_template`` renders (``trim_blocks``,
``lstrip_blocks``, ``raise_exception``), which is what vLLM and our server run. The expected strings
are transcribed from the published templates' logic, whitespace included:

* ``template_llava.jinja``: its indentation and blank lines reach the output (the two trims only act
  around ``{% %}`` tags), e.g. each user turn is ``"\\n        USER: " + content|trim + "\\n\\n"``;
* ``template_dse_qwen2_vl.jinja``: ``bos_token``, Qwen2-VL's ChatML with a default system turn and a
  vision placeholder per image/video part (numbered with ``add_vision_id``), then ``<|endoftext|>``;
* ``template_vlm2vec.jinja``: one message, its text parts and ``<|image_N|>`` tags joined by spaces.
  vLLM has published two versions; ours renders the one without a leading ``bos_token``: the
  Phi-3-vision processor (ours and the published one) already starts every text piece with BOS, so
  the other version's ``<s>`` adds a second one that VLM2Vec's own code never feeds the model.
"""

from __future__ import annotations

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from server_harness import REPO

EXAMPLES = REPO / "examples"
IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def render(name: str, messages: list[dict], add_generation_prompt: bool = False, **special: object) -> str:
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string((EXAMPLES / name).read_text())
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


LLAVA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}


def test_llava():
    one = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    assert render("template_llava.jinja", one, True, **LLAVA_TOKENS) == (
        "\n<s>\n\n        USER: <image>\nWhat is in the image?\n\n\n    ASSISTANT:\n")
    turns = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "<image>\nHi"},
             {"role": "assistant", "content": " Hello "}, {"role": "user", "content": "More?"}]
    assert render("template_llava.jinja", turns, True, **LLAVA_TOKENS) == (
        "\n<s>You are helpful.\n"
        "\n        USER: <image>\nHi\n\n"
        "\n        ASSISTANT: Hello</s>\n\n"
        "\n        USER: More?\n\n"
        "\n    ASSISTANT:\n")
    assert render("template_llava.jinja", turns[1:3], False, **LLAVA_TOKENS) == (
        "\n<s>\n\n        USER: <image>\nHi\n\n\n        ASSISTANT: Hello</s>\n\n\n")
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render("template_llava.jinja", [{"role": "assistant", "content": "x"}], **LLAVA_TOKENS)


def test_dse_qwen2_vl():
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    vision, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    query = [{"role": "user", "content": [IMAGE, text("What is shown in this image?")]}]
    assert render("template_dse_qwen2_vl.jinja", query) == (
        f"{system}<|im_start|>user\n{vision}What is shown in this image?<|im_end|>\n<|endoftext|>")
    assert render("template_dse_qwen2_vl.jinja", query, True) == (
        f"{system}<|im_start|>user\n{vision}What is shown in this image?<|im_end|>\n"
        "<|im_start|>assistant\n<|endoftext|>")
    turns = [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": [IMAGE, VIDEO, {"type": "image_url", "image_url": {"url": "x"}},
                                          text("Compare.")]}]
    assert render("template_dse_qwen2_vl.jinja", turns, True, add_vision_id=True, bos_token="<s>") == (
        "<s><|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\n"
        f"Picture 1: {vision}Video 1: {video}Picture 2: {vision}Compare.<|im_end|>\n"
        "<|im_start|>assistant\n<|endoftext|>")


def test_vlm2vec():
    one = [{"role": "user", "content": [IMAGE, text("Represent the given image.")]}]
    assert render("template_vlm2vec.jinja", one, bos_token="<s>") == "<|image_1|> Represent the given image."
    two = [{"role": "user", "content": [text("Find"), IMAGE, IMAGE, text("in these.")]}]
    assert render("template_vlm2vec.jinja", two, bos_token="<s>") == "Find <|image_1|> <|image_2|> in these."
    with pytest.raises(jinja2.TemplateError, match="one message"):
        render("template_vlm2vec.jinja", one * 2, bos_token="<s>")
