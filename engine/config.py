"""Engine configuration: the user-facing ``EngineArgs`` and the frozen configs passed down.

``EngineArgs`` holds what ``LLM(...)`` and ``vlmserve serve`` accept; ``create_engine_config``
resolves it once (model folder, HF config, dtype, lengths) into frozen dataclasses that every
component receives explicitly. Nothing reads a global configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.device import Platform, get_platform
from engine.pooling_params import POOLING_TYPES

if TYPE_CHECKING:
    from engine.media import MediaConfig

TASKS = ("generate", "embed", "embedding")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelConfig:
    model_dir: Path
    hf_config: Any  # transformers.PretrainedConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    tokenizer_dir: Path
    trust_remote_code: bool
    seed: int
    served_name: str
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    task: str = "generate"  # "generate" | "embed"
    pooling_type: str = "LAST"  # embed task: "LAST" | "MEAN" | "CLS"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode-only steps
    # (height, width) of the images whose vision passes are warmed up at start (engine.warmup).
    warmup_image_sizes: tuple[tuple[int, int], ...] = ()
    # vLLM's mm_processor_kwargs; only use_fast is honoured: HF's fast (torchvision-backend) image
    # processor arithmetic or the PIL one (engine.mm_processors.qwen2_vl_fast). {}: HF's own choice.
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pooling(self) -> bool:
        return self.task == "embed"

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.get_text_config().hidden_size)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    gpu_memory_utilization: float
    cpu_kv_cache_bytes: int
    num_blocks_override: int | None


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool
    # Launch the next decode step before this one's sampled tokens reach the host, so that host
    # work (scheduling, input prep, detokenising) overlaps the device (vLLM's --async-scheduling).
    async_scheduling: bool = True


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    platform: Platform
    attention_backend: str | None


@dataclass
class EngineArgs:
    """Arguments of ``LLM(...)`` / ``vlmserve serve``; names and defaults follow vLLM."""

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space: float = 1.0  # GiB of KV cache on CPU (vLLM's VLLM_CPU_KVCACHE_SPACE)
    num_gpu_blocks_override: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    served_model_name: str | None = None
    attention_backend: str | None = None
    # Max items per prompt by modality; vLLM v1's default of 999 applies to modalities not named.
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    # Media fetching for chat image_url parts (see engine.media).
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    max_image_bytes: int = 20 * 1024 * 1024  # encoded bytes of one image (download or data: URL)
    max_image_pixels: int = 6144 * 6144  # decoded width * height of one image (engine.media.DEFAULT_MAX_PIXELS)
    max_request_image_pixels: int = 8192 * 8192  # decoded pixels of one request's images together (server)
    # Fetch image URLs whose host is or resolves to a loopback, private, link-local or other
    # non-public address (internal image hosts, tests). None: $VLMSERVE_ALLOW_PRIVATE_MEDIA_URLS.
    allow_private_media_urls: bool | None = None
    # "generate" (default) or "embed" / "embedding": serve pooled hidden states (vLLM's --task).
    task: str = "generate"
    # Embedding pooling: "LAST" | "MEAN" | "CLS"; default LAST (vLLM's for *ForCausalLM as embedder).
    pooling_type: str | None = None
    # CUDA: run every step eagerly (no CUDA graphs for decode-only steps), as vLLM's flag.
    enforce_eager: bool = False
    # Overlap host work with the device: launch decode step n+1 before step n's tokens are read
    # back (vLLM's --async-scheduling). Outputs are the same; off runs every step synchronously.
    async_scheduling: bool = True
    # Image sizes (height, width) whose vision passes are captured at start, so the first burst of
    # such images runs at full speed (engine.warmup; CUDA graphs only). () or None: none.
    warmup_image_sizes: tuple[tuple[int, int], ...] | None = ((448, 448),)
    # vLLM's mm_processor_kwargs. Only {"use_fast": bool} is supported: which of HF's two image
    # processors (fast = torchvision backend, else PIL) the engine reproduces; unset, the one HF's
    # AutoImageProcessor picks in this environment (fast where torchvision is installed).
    mm_processor_kwargs: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def media_config(self) -> "MediaConfig":
        from engine.media import MediaConfig

        domains = tuple(self.allowed_media_domains) if self.allowed_media_domains else None
        return MediaConfig(allowed_local_media_path=self.allowed_local_media_path, allowed_media_domains=domains,
                           max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           max_total_pixels=self.max_request_image_pixels,
                           allow_private_media_urls=self.allow_private_media_urls)

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs: must be positive, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len: must be positive, got {self.max_model_len}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens: must be positive, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError("num_gpu_blocks_override: must be at least 2 (block 0 is reserved)")
        for modality, limit in (self.limit_mm_per_prompt or {}).items():
            if modality not in ("image", "video") or not isinstance(limit, int) or limit < 0:
                raise ValueError(
                    f"limit_mm_per_prompt: expected {{'image'|'video': non-negative int}}, got {modality!r}: {limit!r}"
                )
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0 or self.max_request_image_pixels <= 0:
            raise ValueError("max_image_bytes / max_image_pixels / max_request_image_pixels: must be positive")
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling_type is not None and str(self.pooling_type).upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type: expected one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        for size in self.warmup_image_sizes or ():
            if (not isinstance(size, (tuple, list)) or len(size) != 2
                    or not all(isinstance(v, int) and 0 < v <= 8192 for v in size)):
                raise ValueError(f"warmup_image_sizes: expected (height, width) pairs in [1, 8192], got {size!r}")
        if self.allow_private_media_urls is None:  # a bad value fails here, before the model loads
            from engine.media import allow_private_from_env

            allow_private_from_env()
        if self.cpu_kv_cache_space <= 0:
            raise ValueError(f"cpu_kv_cache_space: must be positive GiB, got {self.cpu_kv_cache_space}")
        from engine.mm_processors.qwen2_vl_fast import check_mm_processor_kwargs

        check_mm_processor_kwargs(self.mm_processor_kwargs)

    def create_engine_config(self) -> EngineConfig:
        from engine.hf_configs import load_hf_config
        from engine.loader import resolve_model_dir

        self.validate()
        platform = get_platform(self.device)
        model_dir = resolve_model_dir(self.model, self.revision)
        tokenizer_dir = resolve_model_dir(self.tokenizer, self.revision) if self.tokenizer else model_dir
        hf_config = load_hf_config(model_dir, self.trust_remote_code)
        archs = getattr(hf_config, "architectures", None) or []
        if not archs:
            raise ValueError(f"model: {model_dir}/config.json names no 'architectures'")
        dtype = _resolve_dtype(self.dtype, hf_config, platform)
        text_config = hf_config.get_text_config()
        derived_len = getattr(text_config, "max_position_embeddings", None) or 2048
        max_model_len = self.max_model_len or derived_len
        if max_model_len > derived_len:
            raise ValueError(
                f"max_model_len: {max_model_len} exceeds the model's max_position_embeddings ({derived_len})"
            )
        max_batched = self.max_num_batched_tokens or max(8192, max_model_len if not self.enable_chunked_prefill else 0)
        if not self.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens: {max_batched} is smaller than max_model_len ({max_model_len}); "
                "raise it or enable chunked prefill"
            )
        model = ModelConfig(
            model_dir=model_dir,
            hf_config=hf_config,
            architecture=archs[0],
            dtype=dtype,
            max_model_len=max_model_len,
            eos_token_ids=_eos_token_ids(model_dir, text_config),
            tokenizer_dir=tokenizer_dir,
            trust_remote_code=self.trust_remote_code,
            seed=self.seed,
            served_name=self.served_model_name or self.model,
            limit_mm_per_prompt=dict(self.limit_mm_per_prompt or {}),
            task="embed" if self.task in ("embed", "embedding") else "generate",
            pooling_type=str(self.pooling_type or "LAST").upper(),
            enforce_eager=bool(self.enforce_eager),
            warmup_image_sizes=tuple((int(h), int(w)) for h, w in (self.warmup_image_sizes or ())),
            mm_processor_kwargs=dict(self.mm_processor_kwargs or {}),
        )
        cache = CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization,
            cpu_kv_cache_bytes=int(self.cpu_kv_cache_space * (1 << 30)),
            num_blocks_override=self.num_gpu_blocks_override,
        )
        sched = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            async_scheduling=bool(self.async_scheduling),
        )
        return EngineConfig(model, cache, sched, platform, self.attention_backend)


def _resolve_dtype(dtype: str | torch.dtype, hf_config: Any, platform: Platform) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPES.get(cfg, torch.float32)
        resolved = cfg if isinstance(cfg, torch.dtype) else torch.float32
        if not platform.supports_dtype(resolved):
            resolved = torch.bfloat16 if resolved == torch.float16 else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return resolved


def _eos_token_ids(model_dir: Path, text_config: Any) -> tuple[int, ...]:
    """EOS ids from generation_config.json (may be a list), else from config.json."""
    eos: Any = None
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(text_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
