"""Shared pytest fixtures: tiny random-weight HF checkpoints built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(_TESTS_DIR))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama, MHA (4 heads / 4 kv heads), untied embeddings."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return tiny_models.build_tiny_model(out, "llama", num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="session")
def tiny_llama_gqa(tmp_path_factory) -> Path:
    """Llama, GQA (8 heads / 2 kv heads, head_dim 8) with two eos ids in generation_config:
    the tokenizer's eos plus a regular token id."""
    out = tmp_path_factory.mktemp("tiny_llama_gqa")
    # The tokenizer is deterministic, so the eos id is known before building; take it from a
    # throwaway tokenizer to avoid hard-coding ids.
    tok = tiny_models.train_tokenizer(tmp_path_factory.mktemp("tiny_llama_gqa_tok"), "llama")
    extra = tok.convert_tokens_to_ids("Ġthe")  # an ordinary, frequent BPE token
    assert isinstance(extra, int) and extra != tok.unk_token_id
    return tiny_models.build_tiny_model(
        out,
        "llama",
        num_attention_heads=8,
        num_key_value_heads=2,
        seed=1,
        eos_token_ids=[tok.eos_token_id, extra],
    )


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Qwen2, GQA (4 heads / 2 kv heads), q/k/v biases, tied embeddings."""
    out = tmp_path_factory.mktemp("tiny_qwen2")
    return tiny_models.build_tiny_model(
        out, "qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, seed=2
    )


@pytest.fixture(scope="session")
def tiny_qwen2_sharded(tmp_path_factory) -> Path:
    """Same weights as tiny_qwen2, saved as several safetensors shards + index.json."""
    out = tmp_path_factory.mktemp("tiny_qwen2_sharded")
    return tiny_models.build_tiny_model(
        out,
        "qwen2",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        seed=2,
        max_shard_size="100KB",
    )


# ---------------------------------------------------------------------------------------------
# Weight scales (tests/weight_scale.py): HF-equality tests run at the tiny init and a large one
# ---------------------------------------------------------------------------------------------

import weight_scale  # noqa: E402

@pytest.fixture(scope="module", params=weight_scale.SCALES)
def scale(request) -> str:
    """The weight scale of a module's checkpoint: "tiny" (the builders' init) or "large"."""
    return request.param


@pytest.fixture(scope="session")
def tiny_llama_large(tmp_path_factory) -> Path:
    """tiny_llama's architecture with HF's init at weight_scale.LARGE_STD."""
    out = tmp_path_factory.mktemp("tiny_llama_large")
    return weight_scale.build_at_scale(
        tiny_models.build_tiny_model, out, "large", arch="llama", num_attention_heads=4, num_key_value_heads=4
    )


@pytest.fixture(scope="session")
def tiny_qwen2_large(tmp_path_factory) -> Path:
    """tiny_qwen2's architecture (GQA, q/k/v biases, tied embeddings) with HF's init at LARGE_STD."""
    out = tmp_path_factory.mktemp("tiny_qwen2_large")
    return weight_scale.build_at_scale(
        tiny_models.build_tiny_model, out, "large", arch="qwen2", num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, seed=2,
    )


# ---------------------------------------------------------------------------------------------
# A tiny Qwen2-VL served by `vlmserve serve` (tests/qwen2_vl_serve.py), shared by several modules
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def served_qwen2_vl(tmp_path_factory) -> Path:
    import qwen2_vl_serve

    return qwen2_vl_serve.build(tmp_path_factory.mktemp("served_qwen2_vl"))


@pytest.fixture(scope="session")
def qwen2_vl_servers(served_qwen2_vl, tmp_path_factory):
    """{"generate": CliServer, "embedding": CliServer} on ``served_qwen2_vl`` (qwen2_vl_serve)."""
    import qwen2_vl_serve

    with qwen2_vl_serve.start(served_qwen2_vl, tmp_path_factory.mktemp("qwen2_vl_serve_logs")) as servers:
        yield servers
