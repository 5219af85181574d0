"""Multimodal inputs on the model's device: the model runner's last preprocessing step.

The front end's ``MultiModalFeature.data`` holds plain CPU tensors (it may be pickled to the
engine-core process). Before a vision pass, the runner hands the data dicts of that pass's items
of one modality to the architecture's device preprocessor, which returns the model's inputs on the
device, one dict per item, in order. Work that is cheaper batched on the accelerator than per
item on one host core lives here, e.g. Qwen2-VL's rescale / normalize / patch layout
(``engine.mm_processors.qwen2_vl_pixels``). Architectures without one get ``DevicePreprocessor``,
which moves every tensor as it is.

Registered lazily by architecture, like ``engine.mm_processor``'s processors.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from engine.device import to_device_async

_DEVICE_PREPROCESSORS: dict[str, tuple[str, str]] = {
    "Qwen2VLForConditionalGeneration": ("engine.mm_processors.qwen2_vl_pixels", "Qwen2VLDevicePreprocessor"),
    "Qwen2_5_VLForConditionalGeneration": ("engine.mm_processors.qwen2_vl_pixels", "Qwen2VLDevicePreprocessor"),
    "Phi3VForCausalLM": ("engine.mm_processors.phi3v_pixels", "Phi3VDevicePreprocessor"),
    "MiniCPMV": ("engine.mm_processors.minicpmv_pixels", "MiniCPMVDevicePreprocessor"),
}


class DevicePreprocessor:
    """Feature data dicts of one modality -> the model's inputs on ``device``; this default
    moves every tensor there unchanged, except the ``host_keys``: metadata the model reads on the
    host (e.g. grid shapes), which would cost a device sync to read back (``tolist`` of a device
    tensor waits for every kernel queued before it, stalling the launch of a step)."""

    host_keys: frozenset[str] = frozenset()

    def __init__(self, config: Any, device: torch.device) -> None:
        self.config = config
        self.device = torch.device(device)

    def prepare(self, modality: str, items: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """One input dict per item (same order) with its tensors on the device."""
        return [{k: v if k in self.host_keys else to_device_async(v, self.device) for k, v in d.items()} for d in items]


def get_device_preprocessor(config: Any, device: torch.device) -> DevicePreprocessor:
    """The device preprocessor of ``config.model.architecture`` (built once, with the runner)."""
    entry = _DEVICE_PREPROCESSORS.get(config.model.architecture)
    if entry is None:
        return DevicePreprocessor(config, device)
    return getattr(importlib.import_module(entry[0]), entry[1])(config, device)
