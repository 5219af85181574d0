"""Sampling parameters with vLLM's names, defaults and validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

# Seeds torch.Generator.manual_seed takes: signed or unsigned 64-bit (a negative seed is read as
# its two's complement). Every sample's seed (seed + index, see ``for_child``) must fit.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
# The engine's tensors hold token ids and top_k as int64.
INT64_MAX = 2**63 - 1
# Samples per request. vLLM has no cap, but each sample is a sequence of its own in the batch:
# one request must not be able to take the whole engine (or its memory) with n = 10**6.
MAX_N = 128


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # True is an int to Python, not to the API


def _is_finite(x: Any) -> bool:
    """A real number that is not inf or nan (bools are not numbers here either)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class SamplingParams:
    """How to sample one request's continuation. Invalid values raise ValueError naming the field."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Filled by the engine: EOS ids beyond the tokenizer's (generation_config), which also stop.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"{name}: must be a list, got {value!r}")
            setattr(self, name, list(value or []))
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {msg}, got {getattr(self, name)!r}")

        need(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an integer in [1, {MAX_N}]")
        need(_is_finite(self.temperature) and self.temperature >= 0.0, "temperature",
             "must be a finite number >= 0")
        need(_is_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(_is_int(self.top_k) and 0 <= self.top_k <= INT64_MAX, "top_k",
             "must be -1 (disabled), 0 or a positive integer below 2**63")
        need(_is_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        need(_is_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             "must be in [-2, 2]")
        need(_is_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             "must be in [-2, 2]")
        need(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0.0, "repetition_penalty",
             "must be a finite number > 0")
        need(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             "max_tokens", "must be an integer >= 1")
        need(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be a non-negative integer")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        self._verify_seed()
        need(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "logprobs", "must be an integer in [0, 20]")
        need(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs", "must be an integer in [0, 20]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids), "stop_token_ids",
             "must be token ids")

    def _verify_seed(self) -> None:
        """A seed must seed a torch.Generator for every sample (seed + index, see for_child): a
        seed torch refuses would otherwise fail in the engine core."""
        seed = self.seed
        if seed is None:
            return
        if not _is_int(seed) or not MIN_SEED <= seed <= MAX_SEED:
            raise ValueError(f"seed: must be an integer in [-2**63, 2**64 - 1], got {seed!r}")
        if seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed: with n={self.n} the samples use seeds {seed} .. {seed + self.n - 1}, "
                             f"which must not exceed 2**64 - 1; use a seed <= {MAX_SEED - self.n + 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def with_eos(self, eos_token_id: int | None, extra_eos_ids: tuple[int, ...] = ()) -> "SamplingParams":
        """A copy that also stops on the model's EOS ids (unless ``ignore_eos``).

        As in vLLM, the tokenizer's EOS is the EOS (stop_reason None); further EOS ids from
        generation_config join ``stop_token_ids`` (so stop_reason names the id)."""
        params = replace(self)
        if not self.ignore_eos:
            extra = [t for t in extra_eos_ids if t != eos_token_id and t not in params.stop_token_ids]
            params.stop_token_ids = params.stop_token_ids + extra
            params._all_stop_token_ids = set(params.stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        return params

    def for_child(self, index: int) -> "SamplingParams":
        """Parameters of the index-th of ``n`` samples: n=1, and a distinct seed when seeded."""
        params = replace(self, n=1, seed=None if self.seed is None else self.seed + index)
        params._all_stop_token_ids = set(self._all_stop_token_ids)
        return params
