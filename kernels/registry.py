"""Backend registry: backends are registered by import path and imported only when chosen, so a
machine without Triton or Cambricon's ops never imports them."""

from __future__ import annotations

import importlib

from kernels.backend import AttentionBackend

# name -> (module path, class name, device types it can run on)
_REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch": ("kernels.torch_ref", "TorchReferenceBackend", ("cpu", "cuda", "mlu")),
}
# Preferred backend per device type, best first; the first that imports wins.
_PREFERENCE: dict[str, list[str]] = {"cpu": ["torch"], "cuda": ["torch"], "mlu": ["torch"]}
_INSTANCES: dict[str, AttentionBackend] = {}


def register_backend(
    name: str, module: str, cls: str, device_types: tuple[str, ...], preferred: bool = False
) -> None:
    """Register a backend lazily; ``preferred`` puts it first for its device types."""
    _REGISTRY[name] = (module, cls, device_types)
    for dt in device_types:
        order = _PREFERENCE.setdefault(dt, [])
        if name in order:
            order.remove(name)
        order.insert(0 if preferred else len(order), name)


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def _load(name: str) -> AttentionBackend:
    if name not in _INSTANCES:
        module, cls, _ = _REGISTRY[name]
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def get_backend(device_type: str, name: str | None = None) -> AttentionBackend:
    """The backend called ``name``, or the best importable one for ``device_type``."""
    if name is not None:
        if name not in _REGISTRY:
            raise ValueError(f"attention_backend: unknown backend {name!r}; known: {available_backends()}")
        if device_type not in _REGISTRY[name][2]:
            raise ValueError(f"attention_backend: {name!r} does not run on device type {device_type!r}")
        return _load(name)
    for candidate in _PREFERENCE.get(device_type, ["torch"]):
        try:
            return _load(candidate)
        except ImportError:
            continue
    return _load("torch")


# Triton kernels for CUDA: preferred there whenever `triton` imports, else the torch reference.
register_backend("triton", "kernels.triton_attention", "TritonBackend", ("cuda",), preferred=True)
# Cambricon's ops on MLU: preferred there whenever `torch_mlu_ops` imports, else the torch reference.
register_backend("mlu_ops", "kernels.mlu_ops", "MLUOpsBackend", ("mlu",), preferred=True)
