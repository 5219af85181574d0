"""One device abstraction for CPU, CUDA and Cambricon MLU.

Everything device-specific the engine needs (memory figures, synchronisation, the distributed
backend's name, the default attention backend) sits behind ``Platform``; the rest of the engine
never branches on the device type. MLU support imports ``torch_mlu`` only when asked for or when
probing ``"auto"``; it is untested here (no MLU hardware) beyond the selection logic.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Platform:
    """A device type and the handful of operations the engine needs from it."""

    type: str  # "cpu" | "cuda" | "mlu"
    dist_backend: str  # "gloo" | "nccl" | "cncl"
    index: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.type == "cpu" else torch.device(self.type, self.index)

    @property
    def is_accelerator(self) -> bool:
        return self.type != "cpu"

    def _module(self):
        return getattr(torch, self.type)

    def synchronize(self) -> None:
        if self.is_accelerator:
            self._module().synchronize(self.index)

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory; for CPU, the bounded KV space is configured instead."""
        if not self.is_accelerator:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
            return avail, total
        return self._module().mem_get_info(self.index)

    def max_memory_allocated(self) -> int:
        return self._module().max_memory_allocated(self.index) if self.is_accelerator else 0

    def reset_peak_memory_stats(self) -> None:
        if self.is_accelerator:
            self._module().reset_peak_memory_stats(self.index)

    def empty_cache(self) -> None:
        if self.is_accelerator:
            self._module().empty_cache()

    def device_name(self) -> str:
        if self.type == "cpu":
            return "cpu"
        return self._module().get_device_name(self.index)

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        # fp16 matmuls on CPU are emulated and very slow; bf16 and fp32 are fine everywhere.
        return not (self.type == "cpu" and dtype == torch.float16)


def _mlu_available() -> bool:
    try:
        importlib.import_module("torch_mlu")  # registers torch.mlu
    except ImportError:
        return False
    return hasattr(torch, "mlu") and torch.mlu.is_available()


_DIST_BACKEND = {"cpu": "gloo", "cuda": "nccl", "mlu": "cncl"}


def get_platform(device: str = "auto") -> Platform:
    """Resolve ``"auto" | "cpu" | "cuda[:i]" | "mlu[:i]"`` to a Platform.

    ``"auto"`` prefers CUDA, then MLU, then CPU. Asking for an absent accelerator raises ValueError.
    """
    if not isinstance(device, str):
        raise ValueError(f"device: expected a string, got {type(device).__name__}")
    kind, _, idx = device.partition(":")
    index = int(idx) if idx else 0
    if kind == "auto":
        if torch.cuda.is_available():
            kind = "cuda"
        elif _mlu_available():
            kind = "mlu"
        else:
            kind = "cpu"
    if kind not in _DIST_BACKEND:
        raise ValueError(f"device: unknown device {device!r}; use auto, cpu, cuda or mlu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
    if kind == "mlu" and not _mlu_available():
        raise ValueError("device: 'mlu' requested but torch_mlu is not importable or no MLU is visible")
    return Platform(type=kind, dist_backend=_DIST_BACKEND[kind], index=index)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host: on CUDA through pinned memory and a
    non-blocking copy. (A copy from pageable memory makes the host wait until the device has
    finished everything queued before it: a stall in the middle of launching a step.)"""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
