"""Test checkpoints at two weight scales: the builders' tiny init and HF's own init at a large std.

The builders (``tiny_models``, ``tiny_vlm``, ``tiny_vlm25``, ``tiny_llava``) draw weights that keep
activations O(1) (``reinit_weights_``). Real checkpoints have larger activations, and a random
network with larger weights is more chaotic: a rounding difference that the tiny init damps can
flip a greedy token there. So the HF-equality tests also run each architecture at ``LARGE_STD``:

* ``SCALES`` — the two scale ids tests are parametrized over ("tiny", "large");
* ``rescale_checkpoint(model_dir, std, seed)`` — redraws every tensor of a saved checkpoint as
  transformers' ``_init_weights`` does with ``initializer_range = std`` (Linear / Conv /
  Embedding weights ~ N(0, std), biases 0, norm scales 1) in both the text and the vision config,
  and records that ``initializer_range`` in config.json;
* ``build_at_scale(build, out_dir, scale, **kw)`` — ``build(out_dir, **kw)``, then rescaled for
  "large";
* the ``scale`` fixture (tests/conftest.py) parametrizes a module's checkpoint over ``SCALES``;
  ``tiny_only`` marks a test there that checks no fidelity (errors, caches, lifecycle): it runs
  at the tiny scale alone, which keeps CI time in check.

Imported as a plain module (``tests/conftest.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCALES = ("tiny", "large")
LARGE_STD = 0.2  # the repro: initializer_range 0.2 in the text and the vision config

tiny_only = pytest.mark.parametrize("scale", ["tiny"], indirect=True)


def _is_norm_scale(name: str, tensor: torch.Tensor) -> bool:
    # RMSNorm / LayerNorm weights (Llama's *layernorm / norm, Qwen's norm1 / ln_q, CLIP's
    # layer_norm1 / pre_layrnorm / post_layernorm): HF's init sets them to 1.
    parts = name.split(".")
    module = parts[-2] if len(parts) >= 2 else ""
    return tensor.dim() == 1 and parts[-1] == "weight" and ("norm" in module or module.startswith("ln"))


def _redraw(name: str, tensor: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros_like(tensor)
    if _is_norm_scale(name, tensor):
        return torch.ones_like(tensor)
    # matrices, conv kernels, embeddings (and CLIP's 1-D class embedding)
    return (torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std).to(tensor.dtype)


def _set_initializer_range(config: dict, std: float) -> None:
    config["initializer_range"] = std
    for key in ("text_config", "vision_config"):
        if isinstance(config.get(key), dict):
            config[key]["initializer_range"] = std


def rescale_checkpoint(model_dir: Path, std: float = LARGE_STD, seed: int = 0) -> Path:
    """Redraw every tensor of the safetensors checkpoint in ``model_dir`` in place (see the module
    docstring); tensors are drawn in sorted-name order from ``Generator(seed)`` so a rebuild gives
    the same weights. Sharded checkpoints keep their shards. Returns ``model_dir``."""
    model_dir = Path(model_dir)
    gen = torch.Generator().manual_seed(seed)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {model_dir}")
    tensors: dict[Path, dict[str, torch.Tensor]] = {}
    metadata: dict[Path, dict[str, str] | None] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            metadata[path] = f.metadata()
            tensors[path] = {k: f.get_tensor(k) for k in f.keys()}
    owner = {name: path for path, ts in tensors.items() for name in ts}
    for name in sorted(owner):
        ts = tensors[owner[name]]
        ts[name] = _redraw(name, ts[name], std, gen)
    for path in files:
        save_file(tensors[path], str(path), metadata=metadata[path])
    cfg_path = model_dir / "config.json"
    config = json.loads(cfg_path.read_text())
    _set_initializer_range(config, std)
    cfg_path.write_text(json.dumps(config, indent=2) + "\n")
    return model_dir


def build_at_scale(build: Callable[..., Path], out_dir: Path, scale: str, **kwargs) -> Path:
    """``build(out_dir, **kwargs)`` at ``scale`` ("tiny": as built; "large": ``rescale_checkpoint``
    with ``LARGE_STD``, seeded from ``kwargs['seed']``)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    model_dir = build(out_dir, **kwargs)
    if scale == "large":
        rescale_checkpoint(model_dir, LARGE_STD, seed=int(kwargs.get("seed", 0)))
    return model_dir
