"""Sampling parameters with vLLM's names, defaults and validation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


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
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {msg}, got {getattr(self, name)!r}")

        need(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        need(self.temperature >= 0.0, "temperature", "must be non-negative")
        need(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be -1 (disabled), 0 or a positive integer")
        need(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]")
        need(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]")
        need(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]")
        need(self.repetition_penalty > 0.0, "repetition_penalty", "must be positive")
        need(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens", "must be an integer >= 1")
        need(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "must be a non-negative integer")
        need(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", "must not exceed max_tokens")
        need(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer")
        need(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "logprobs", "must be an integer in [0, 20]")
        need(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
             "prompt_logprobs", "must be an integer in [0, 20]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        need(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be token ids")

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
