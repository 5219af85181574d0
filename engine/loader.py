"""Finding a model folder and streaming its safetensors weights into our model classes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache) via huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model: {path} has no config.json")
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")):
        raise ValueError(f"model: {model} is not a model folder")
    if model == "vlmserve-demo":
        # The demo checkpoint ships inside the package (no download where vlmserve is first
        # tried); a local folder of that name, checked above, still wins.
        from runtime.demo_vlm import demo_model_dir

        return demo_model_dir()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, revision=revision, allow_patterns=_ALLOW)
    except Exception as exc:  # network errors, gated repos, unknown ids
        raise ValueError(
            f"model: {model!r} is neither a local folder nor a hub id that could be fetched ({exc.__class__.__name__}: {exc})"
        ) from exc
    return Path(local)


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's shard files, from the index when the checkpoint is sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {model_dir}")
    return files


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every shard, one shard open at a time."""
    for file in safetensors_files(model_dir):
        with safe_open(os.fspath(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(model_config, platform, attn_backend) -> torch.nn.Module:
    """Build our model class for the checkpoint's architecture and load its weights."""
    from engine.models import get_model_class

    cls = get_model_class(model_config.architecture)
    with torch.device(platform.torch_device):
        torch.set_default_dtype(model_config.dtype)
        try:
            # Some models size tables or choose settings by the engine's context length (Phi-3's LongRoPE).
            extra = {"max_model_len": model_config.max_model_len} if getattr(cls, "takes_max_model_len", False) else {}
            model = cls(model_config.hf_config, attn_backend, **extra)
        finally:
            torch.set_default_dtype(torch.float32)
    model = model.to(platform.torch_device)  # buffers built on the host (rotary tables)
    loaded = model.load_weights(iterate_weights(model_config.model_dir))
    missing = {n for n, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(f"model: checkpoint lacks weights for {sorted(missing)[:5]} (and {max(0, len(missing) - 5)} more)")
    return model.eval()
