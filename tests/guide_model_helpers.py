"""What the oracle tests of the guide's remote-code models share (tests/test_phi3v.py,
tests/test_minicpmv.py): the guide's ``LLM`` arguments, memoised oracle tokens, and checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM

MAX_NEW = 8
BLOCK = 16


def mm(images: list) -> dict:
    return {"multi_modal_data": {"image": images}} if images else {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add spin-waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_llm(model_dir: Path, **kwargs: Any) -> LLM:
    # The guide's arguments, plus what makes the comparison exact (fp32 on the CPU).
    args = dict(trust_remote_code=True, max_model_len=4096, limit_mm_per_prompt={"image": 2},
                dtype="float32", device="cpu", seed=0, block_size=BLOCK)
    args.update(kwargs)
    return LLM(model=str(model_dir), **args)


_MEMO: dict[tuple, list[int]] = {}


def expected(oracle: Any, text: str, images: list) -> list[int]:
    """The oracle's greedy tokens (computed once per model, prompt and image objects)."""
    key = (str(oracle.dir), text, tuple(id(i) for i in images))
    if key not in _MEMO:
        _MEMO[key] = oracle.greedy(text, images, MAX_NEW)
    return _MEMO[key]


def assert_idle(llm: LLM) -> None:
    bm = llm.core.block_manager
    assert not llm.core.has_unfinished() and bm.num_free_blocks == bm.num_usable_blocks
