"""Input processing: prompts and chat messages -> validated, tokenised ``EngineRequest``s.

Runs in the front end (the caller's process), so tokenisation and chat templating never block
the engine's step loop. Everything a user can get wrong is checked here, before any work is
queued, and raises ValueError naming the field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from engine.config import EngineConfig
from engine.mm_processor import ProcessedPrompt, get_mm_processor
from engine.multimodal import block_extra_keys
from engine.pooling_params import PoolingParams
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


def load_tokenizer(config: EngineConfig):
    from transformers import AutoTokenizer

    from engine.hf_configs import native_tokenizer_class

    native = native_tokenizer_class(config.model.hf_config)
    if native is not None:  # the folder names remote tokenizer code: never run it
        return native.from_pretrained(config.model.tokenizer_dir)
    # The engine's config is handed over so that the tokenizer does not load the model's config
    # again (for model types built natively, e.g. phi3_v, that would run remote configuration code).
    return AutoTokenizer.from_pretrained(
        config.model.tokenizer_dir, trust_remote_code=config.model.trust_remote_code, config=config.model.hf_config
    )


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.scheduler.max_model_len
        self.vocab_size = config.model.hf_config.get_text_config().vocab_size
        config_eos = config.model.eos_token_ids
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if self.eos_token_id is None and config_eos:
            self.eos_token_id = config_eos[0]
        self.extra_eos_ids = tuple(t for t in config_eos if t != self.eos_token_id)
        self.mm_processor = get_mm_processor(config, tokenizer)
        if self.mm_processor is not None:
            self.mm_processor.load()  # not on the first request: it waited seconds behind this

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (through the multimodal processor: it knows its image tags)."""
        if self.mm_processor is not None:
            return self.mm_processor.tokenize(text, add_special_tokens)
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids) of a str, {"prompt": ...} or {"prompt_token_ids": ...}."""
        if isinstance(prompt, str):
            return prompt, self.encode(prompt)
        if not isinstance(prompt, dict):
            raise ValueError(f"prompt: expected a str or a dict, got {type(prompt).__name__}")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids: must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids: ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
            return prompt.get("prompt"), list(ids)
        if "prompt" in prompt:
            if not isinstance(prompt["prompt"], str):
                raise ValueError("prompt: must be a string")
            return prompt["prompt"], self.encode(prompt["prompt"])
        raise ValueError("prompt: a dict prompt needs 'prompt' or 'prompt_token_ids'")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], chat_template: str | None = None, add_generation_prompt: bool = True
    ) -> str:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages: must be a list of {'role': ..., 'content': ...} dicts")
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "chat_template: the model has no chat template and none was given; pass chat_template"
            )
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def chat_prompt(
        self, messages: list[dict[str, Any]], loader: Any, chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, Any]:
        """A conversation -> {"prompt", "prompt_token_ids", "multi_modal_data"?} ready for ``process``."""
        from engine.chat import parse_chat

        mm = self.mm_processor
        parsed = parse_chat(messages, loader, mm.image_placeholder if mm else None,
                            (mm.video_placeholder_text or None) if mm else None)
        try:
            text: str | None = self.apply_chat_template(parsed.messages, chat_template, add_generation_prompt)
        except Exception:
            if not (parsed.images or parsed.videos):
                raise
            text = None  # a template for string content only (e.g. Phi-3.5-vision's) fails on parts
        if text is None or (parsed.images and text.count(mm.image_placeholder_token) < len(parsed.images)) or (
            parsed.videos and text.count(mm.video_placeholder_token) < len(parsed.videos)
        ):
            # The template ignores media parts: inline the placeholders where the items were.
            text = self.apply_chat_template(parsed.string_messages, chat_template, add_generation_prompt)
        # The template already wrote any BOS; do not let the tokenizer add another.
        prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": self.encode(text, add_special_tokens=False)}
        mm_data: dict[str, Any] = {}
        if parsed.images:
            mm_data["image"] = parsed.images
        if parsed.videos:
            mm_data["video"] = parsed.videos  # a list of videos, each a list of frames (or an array)
        if mm_data:
            prompt["multi_modal_data"] = mm_data
        return prompt

    def process(
        self, request_id: str, prompt: PromptType, params: SamplingParams | PoolingParams
    ) -> tuple[str | None, EngineRequest]:
        """A prompt with SamplingParams (generation) or PoolingParams (embedding; the engine's task
        must match) -> (prompt text, EngineRequest)."""
        pooling = self.config.model.is_pooling
        if isinstance(params, PoolingParams):
            if not pooling:
                raise ValueError("pooling_params: this model serves generation (task='generate'), not embeddings; "
                                 "start the engine with task='embed'")
            if params.dimensions is not None and params.dimensions > self.config.model.hidden_size:
                raise ValueError(f"dimensions: {params.dimensions} is more than the model's embedding size "
                                 f"({self.config.model.hidden_size})")
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        elif pooling:
            raise ValueError("sampling_params: this model serves embeddings (task='embed'), not generation; "
                             "use embed() / encode()")
        text, ids = self.tokenize_prompt(prompt)
        processed = self._process_multimodal(prompt, ids)
        ids = processed.prompt_token_ids
        if not ids:
            raise ValueError("prompt: is empty after tokenisation")
        if isinstance(params, PoolingParams):
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompt: {len(ids)} tokens is too long; max_model_len is {self.max_model_len}")
            return text, EngineRequest(
                request_id=request_id,
                prompt_token_ids=ids,
                sampling_params=None,
                pooling_params=params,
                block_extra_keys=block_extra_keys(processed.mm_features, self.config.cache.block_size),
                mm_features=processed.mm_features,
                mrope_positions=processed.mrope_positions,
                mrope_delta=processed.mrope_delta,
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens is too long; max_model_len is {self.max_model_len} "
                "and at least one token must be generated"
            )
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.max_model_len - len(ids))
        params = params.with_eos(self.eos_token_id, self.extra_eos_ids)
        return text, EngineRequest(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling_params=params,
            block_extra_keys=block_extra_keys(processed.mm_features, self.config.cache.block_size),
            mm_features=processed.mm_features,
            mrope_positions=processed.mrope_positions,
            mrope_delta=processed.mrope_delta,
        )

    def _process_multimodal(self, prompt: PromptType, ids: list[int]) -> ProcessedPrompt:
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if self.mm_processor is None:
            if mm_data:
                raise ValueError(f"multi_modal_data: {self.config.model.architecture} takes text only")
            return ProcessedPrompt(ids)
        # Multimodal models always go through their processor (M-RoPE needs positions even for text).
        return self.mm_processor.process(ids, self.mm_processor.normalize(mm_data or {}))


def split_children(req: EngineRequest) -> list[EngineRequest]:
    """A request with n > 1 becomes n core requests ``"{i}_{id}"`` that share the prompt (and, through
    the prefix cache, its KV blocks); each gets ``params.for_child(i)`` (n=1, seed + i when seeded)."""
    n = req.sampling_params.n if req.sampling_params is not None else 1
    if n == 1:
        return [req]
    return [
        replace(req, request_id=f"{i}_{req.request_id}", sampling_params=req.sampling_params.for_child(i))
        for i in range(n)
    ]
