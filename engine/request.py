"""Requests as the engine core sees them.

``EngineRequest`` is what crosses from the front end (tokenised prompt, resolved parameters) to
the engine core; ``Request`` is the core's mutable state for it. The scheduler knows no prefill or
decode phase: a request has ``num_tokens`` (prompt + generated) and ``num_computed_tokens``
(already in the KV cache), and each step computes some of the difference.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams | None  # None for a pooling request
    arrival_time: float = field(default_factory=time.time)
    # Extra keys mixed into the prefix-cache hash of each block (e.g. image hashes), by block index.
    block_extra_keys: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    # Images/videos of the prompt, in prompt order (engine.multimodal.MultiModalFeature).
    mm_features: list[Any] = field(default_factory=list)
    # M-RoPE (Qwen2-VL): positions [3, num_prompt_tokens] int64, and the offset of later tokens.
    mrope_positions: Any = None
    mrope_delta: int = 0
    # Set for a pooling (embedding) request: the prompt is computed and its pooled hidden state
    # returned; nothing is sampled.
    pooling_params: PoolingParams | None = None
    # The front end wants only the finished result (offline generate without stop strings or
    # logprobs): the core then reports the request once, with all its tokens, when it finishes.
    final_only: bool = False


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    """Engine-core state of one sequence."""

    def __init__(self, req: EngineRequest, max_model_len: int, pooling_type: str = "LAST") -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = list(req.prompt_token_ids)
        self.all_token_ids = list(req.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = req.sampling_params
        self.arrival_time = req.arrival_time
        self.block_extra_keys = req.block_extra_keys
        self.mm_features = req.mm_features
        self.mrope_positions = req.mrope_positions
        self.mrope_delta = req.mrope_delta
        self.max_model_len = max_model_len
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens already sampled on the device by a step still in flight but not yet appended
        # (async scheduling: the next step is launched before this one's tokens reach the host).
        # num_computed_tokens lags by the same amount: the step after the in-flight one computes
        # position num_computed_tokens + num_pending_tokens.
        self.num_pending_tokens = 0
        # Tokens a step still in flight computes for this request (async scheduling): the step
        # scheduled after it starts at position num_computed_tokens + num_inflight_tokens.
        self.num_inflight_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of full blocks, filled by the block manager
        self.num_cached_tokens = 0  # prefix-cache hit length at first schedule
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # torch.Generator of a seeded request, made by EngineCore.add_request (where a bad seed
        # fails this request alone, not a step)
        self.generator: Any = None
        self.first_scheduled_time: float | None = None
        self.prompt_logprobs_acc: list = []  # per prompt position: None or [(token, logprob, rank), ...]
        self.pooling_params = req.pooling_params
        self.pooling_type = pooling_type
        p = self.params
        # Async scheduling may chain this request's decode steps: its sampling reads nothing from
        # the host that a pending token would change, and needs no host sync (logprobs).
        self.chainable = p is not None and self.pooling_params is None and p.logprobs is None \
            and p.prompt_logprobs is None and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 \
            and p.repetition_penalty == 1.0
        self.max_tokens = p.max_tokens if p is not None else None
        self.final_only = req.final_only
        self.pool_acc: Any = None  # MEAN: running fp32 sum of hidden states; CLS: the first row

    @property
    def is_pooling(self) -> bool:
        return self.pooling_params is not None

    @property
    def skip_prefix_cache(self) -> bool:
        """Prefix-cache hits skip computing the cached tokens, whose outputs some requests need:
        prompt logprobs, and MEAN / CLS pooling (LAST pooling only needs the last token, which is
        always computed)."""
        return self.wants_prompt_logprobs or (self.is_pooling and self.pooling_type != "LAST")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params is not None and self.params.prompt_logprobs is not None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1

    def check_stop(self) -> bool:
        """After a token was appended: set a finished status if a token-level stop condition holds."""
        params = self.params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens and last in params._all_stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = None if last not in params.stop_token_ids else last
            return True
        if (params.max_tokens is not None and self.num_output_tokens >= params.max_tokens) or (
            self.num_tokens >= self.max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
