"""Tiny random-weight Hugging Face checkpoints built locally for tests.

The builders live in the package (``runtime.demo_model``, which also builds the CLI's demo model)
and are re-exported here, so tests keep calling ``tiny_models.build_tiny_model(...)``.
Nothing is downloaded: the tokenizer is trained on a small embedded corpus with the
``tokenizers`` library and the model is built from a ``transformers`` config with random
weights, then saved with ``save_pretrained`` exactly as a real checkpoint would be.

Public API:

* ``train_tokenizer(out_dir, style)`` -> ``PreTrainedTokenizerFast`` (style "qwen2" or "llama");
  ``train_tokenizer_with_special_tokens`` and ``reinit_weights_`` (shared by the VLM builders)
* ``build_tiny_model(out_dir, arch="llama", ...)`` -> ``out_dir`` (config, safetensors, tokenizer,
  generation_config.json)
* ``hf_greedy(model_dir, prompts_token_ids, max_new_tokens)`` -> new token ids per prompt, from
  HF ``generate`` (reference outputs for the engine; eos kept when generation stopped on it)
* ``load_hf_cached(model_cls, model_dir)`` -> cached fp32 HF model of that class (the VLM test
  helpers use it too); ``load_hf_model(model_dir)`` -> the same for ``AutoModelForCausalLM``;
  ``greedy_margins(model_dir, prompts)`` ->
  top1-top2 logit gaps along greedy trajectories (diagnostics)

Imported as a plain module (``import tiny_models``); ``tests/conftest.py`` puts this directory
on ``sys.path``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from runtime.demo_model import (  # noqa: F401  (re-exported for the tests)
    BIAS_STD,
    WEIGHT_STD,
    build_tiny_model,
    reinit_weights_,
    train_tokenizer,
    train_tokenizer_with_special_tokens,
)

# ---------------------------------------------------------------------------------------------
# HF reference generation
# ---------------------------------------------------------------------------------------------

_HF_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def load_hf_cached(model_cls, model_dir) -> torch.nn.Module:
    """``model_cls.from_pretrained(model_dir, dtype=float32)`` in eval mode, cached per class and folder."""
    key = str(Path(model_dir).resolve())
    if (model_cls.__name__, key) not in _HF_CACHE:
        m = model_cls.from_pretrained(key, dtype=torch.float32)
        _HF_CACHE[model_cls.__name__, key] = m.eval()
    return _HF_CACHE[model_cls.__name__, key]


def load_hf_model(model_dir) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(model_dir, dtype=float32)``, cached per folder."""
    return load_hf_cached(AutoModelForCausalLM, model_dir)


@torch.no_grad()
def hf_greedy(model_dir, prompts_token_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy reference outputs from HF ``generate``, one prompt at a time (no padding).

    Stops at any id of generation_config.eos_token_id (an int or a list) or after
    ``max_new_tokens``. Returns only the newly generated ids per prompt; if generation stopped
    on an eos token, that eos id IS included as the last element.
    """
    model = load_hf_model(model_dir)
    gen_cfg = model.generation_config
    eos = gen_cfg.eos_token_id
    pad = gen_cfg.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    outs = []
    for ids in prompts_token_ids:
        inp = torch.tensor([list(ids)], dtype=torch.long)
        out = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        outs.append(out[0, inp.shape[1]:].tolist())
    return outs


@torch.no_grad()
def greedy_margins(model_dir, prompts_token_ids: list[list[int]], steps: int = 16) -> list[float]:
    """top1 - top2 logit gaps along each prompt's greedy trajectory (a sanity/diagnostic aid)."""
    model = load_hf_model(model_dir)
    gaps: list[float] = []
    for ids in prompts_token_ids:
        seq = list(ids)
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1]
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
    return gaps
