"""Qwen2-VL / Qwen2.5-VL inputs: images and videos.

``<|image_pad|>`` / ``<|video_pad|>`` expands to t*h*w / merge^2 tokens per item (from its grid),
and M-RoPE positions are computed for the expanded prompt.

Images: a PIL image, or precomputed embeddings ``{"image_embeds": [rows, hidden] or [n,
feature_size, hidden], "image_grid_thw": [n, 3]}`` — which counts as ``n`` images (rows split by
grid, as vLLM does; the 3-D form holds images of one size).
A PIL image is only converted to RGB and resized here (``engine.mm_processors.qwen2_vl_resize``,
with the model folder's HF image processor settings, by PIL or as HF's fast processor resizes:
``use_fast``, decided as HF decides, see ``engine.mm_processors.qwen2_vl_fast``); its feature data is ``{"image_u8": uint8
[h, w, 3], "image_grid_thw": [[1, h/p, w/p]]}`` and the model runner turns it into HF's
``pixel_values`` on the device (``engine.mm_processors.qwen2_vl_pixels``).

Videos (``engine.mm_processors.qwen_video``): a list of PIL frames, a (T, H, W, 3) uint8 array,
``{"frames": <either>, "fps": float}``, or ``{"video_embeds": [rows, hidden], "video_grid_thw":
[n, 3], "second_per_grid_ts"?: float | [n]}`` (``n`` videos). Bounds: ``max_video_frames`` frames
and ``max_video_pixels`` input pixels per video (constructor arguments).

Qwen2.5-VL (vision config with ``tokens_per_second``) spaces a video's temporal positions by
``tokens_per_second * second_per_grid_ts`` where ``second_per_grid_ts = temporal_patch_size / fps``;
``fps`` is the item's, else 2.0 (HF's default). Qwen2-VL ignores fps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.mm_processor import (
    MultiModalProcessor,
    ProcessedPrompt,
    _is_pil,
    expand_placeholders,
)
from engine.mm_processors.qwen2_vl_fast import resolve_use_fast, video_use_fast
from engine.mm_processors.qwen2_vl_resize import QwenResizeSpec, image_to_u8
from engine.mm_processors.qwen_video import (
    DEFAULT_FPS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_TOTAL_PIXELS,
    QwenVideoConfig,
    QwenVideoPreprocessor,
)
from engine.multimodal import MultiModalFeature, hash_item


def _run_offsets(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """Start index of each item's placeholder run in a fully expanded prompt."""
    positions = [i for i, t in enumerate(ids) if t == token]
    offsets, k = [], 0
    for c in counts:
        offsets.append(positions[k])
        k += c
    return offsets


class Qwen2VLProcessor(MultiModalProcessor):
    image_placeholder_text = "<|vision_start|><|image_pad|><|vision_end|>"
    image_placeholder_token = "<|image_pad|>"
    video_placeholder_text = "<|vision_start|><|video_pad|><|vision_end|>"
    video_placeholder_token = "<|video_pad|>"

    def __init__(
        self,
        config: Any,
        tokenizer: Any,
        *,
        max_video_frames: int = DEFAULT_MAX_FRAMES,
        max_video_pixels: int = DEFAULT_MAX_TOTAL_PIXELS,
        default_fps: float = DEFAULT_FPS,
    ) -> None:
        super().__init__(config, tokenizer)
        hf = config.model.hf_config
        self.hf_config = hf
        self.image_token_id = hf.image_token_id
        self.video_token_id = hf.video_token_id
        self.merge = hf.vision_config.spatial_merge_size
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf.text_config
        self.lm_hidden = int(text.hidden_size)
        self.tokens_per_second = getattr(hf.vision_config, "tokens_per_second", None)
        self.max_video_frames = max_video_frames
        self.max_video_pixels = max_video_pixels
        if not default_fps > 0:
            raise ValueError(f"default_fps: must be positive, got {default_fps}")
        self.default_fps = float(default_fps)
        self.mm_processor_kwargs = dict(getattr(config.model, "mm_processor_kwargs", None) or {})
        self._image_processor = None
        self._use_fast: bool | None = None
        self._resize_spec: QwenResizeSpec | None = None
        self._video_processor: QwenVideoPreprocessor | None = None

    def load(self) -> None:
        self.resize_spec  # noqa: B018 (loads the image processor and its settings)

    @property
    def image_processor(self) -> Any:
        if self._image_processor is None:
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.config.model.model_dir)
        return self._image_processor

    @property
    def use_fast(self) -> bool:
        """Whether images follow HF's fast (torchvision-backend) processor: ``mm_processor_kwargs``'
        ``use_fast`` when given, else the backend HF's AutoImageProcessor chose for the folder
        (torchvision when importable). The device preprocessor makes the same choice."""
        if self._use_fast is None:
            self._use_fast = resolve_use_fast(self.mm_processor_kwargs, self.image_processor)
        return self._use_fast

    @property
    def resize_spec(self) -> QwenResizeSpec:
        """The image processor's resize settings (the processor object is only read, never called)."""
        if self._resize_spec is None:
            self._resize_spec = QwenResizeSpec.from_image_processor(self.image_processor, fast=self.use_fast)
        return self._resize_spec

    @property
    def video_processor(self) -> QwenVideoPreprocessor:
        if self._video_processor is None:
            cfg = QwenVideoConfig.from_model_dir(self.config.model.model_dir)
            cfg.check_against(self.hf_config.vision_config)
            self._video_processor = QwenVideoPreprocessor(
                cfg, max_frames=self.max_video_frames, max_total_pixels=self.max_video_pixels,
                fast=video_use_fast(self.mm_processor_kwargs),
            )
        return self._video_processor

    @property
    def temporal_patch_size(self) -> int:
        return int(getattr(self.hf_config.vision_config, "temporal_patch_size", 2))

    # -- items ----------------------------------------------------------------------------------

    def split_items(self, modality: str, items: list[Any]) -> list[Any]:
        """An embeddings dict whose grid has n rows stands for n items: split its rows by grid."""
        out: list[Any] = []
        for index, item in enumerate(items):
            key = f"{modality}_embeds"
            if isinstance(item, dict) and key in item and f"{modality}_grid_thw" in item:
                out.extend(self._split_embeds(modality, index, item))
            else:
                out.append(item)
        return out

    def _split_embeds(self, modality: str, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        where = f"multi_modal_data: {modality} {index}"
        key, grid_key = f"{modality}_embeds", f"{modality}_grid_thw"
        embeds = item[key]
        if isinstance(embeds, (list, tuple)) and embeds and all(torch.is_tensor(e) or isinstance(e, np.ndarray) for e in embeds):
            embeds = torch.cat([torch.as_tensor(e) for e in embeds])
        try:
            embeds = torch.as_tensor(embeds)
            grid = torch.as_tensor(item[grid_key]).long()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{where}: {key} / {grid_key} must be tensors: {exc}") from None
        if grid.dim() == 1:
            grid = grid.view(1, -1)
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
            raise ValueError(f"{where}: {grid_key} must have shape (n, 3), got {tuple(grid.shape)}")
        if (grid <= 0).any():
            raise ValueError(f"{where}: {grid_key} entries must be positive, got {grid.tolist()}")
        counts = [int(g.prod()) // self.merge**2 for g in grid]
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]  # a batch of one: (1, total_feature_size, hidden)
        if embeds.dim() == 3:
            embeds = self._flatten_stacked(embeds, counts, where, key, grid_key)
        if embeds.dim() != 2 or not embeds.is_floating_point():
            raise ValueError(f"{where}: {key} must be a floating-point (rows, hidden) tensor, got {tuple(embeds.shape)} {embeds.dtype}")
        if embeds.shape[1] != self.lm_hidden:
            raise ValueError(f"{where}: {key} has hidden size {embeds.shape[1]}, the model's is {self.lm_hidden}")
        if embeds.shape[0] != sum(counts):
            raise ValueError(
                f"{where}: {key} has {embeds.shape[0]} rows but {grid_key} {grid.tolist()} implies {sum(counts)}"
            )
        n = grid.shape[0]
        seconds = None
        if modality == "video":
            seconds = self._seconds_per_grid(item, n, where)
        out, start = [], 0
        for i, c in enumerate(counts):
            part: dict[str, Any] = {key: embeds[start : start + c], grid_key: grid[i : i + 1]}
            if seconds is not None:
                part["second_per_grid_ts"] = seconds[i]
            out.append(part)
            start += c
        return out

    @staticmethod
    def _flatten_stacked(
        embeds: torch.Tensor, counts: list[int], where: str, key: str, grid_key: str
    ) -> torch.Tensor:
        """(num_items, feature_size, hidden) -> (num_items * feature_size, hidden), the rows of
        the items one after another (vLLM's multi-image form). One tensor holds items of one
        size only: each grid row must give feature_size tokens."""
        n, size = embeds.shape[0], embeds.shape[1]
        if n != len(counts):
            raise ValueError(
                f"{where}: {key} holds num_images={n} items (its first dimension) but {grid_key} has "
                f"{len(counts)} rows; give one grid row per item"
            )
        if any(c != size for c in counts):
            raise ValueError(
                f"{where}: {key} has feature_size {size} per item but {grid_key} implies {counts}; items "
                f"of different sizes go as one (total_feature_size, hidden) tensor of their rows concatenated"
            )
        return embeds.reshape(n * size, embeds.shape[2])

    def _seconds_per_grid(self, item: dict[str, Any], n: int, where: str) -> list[float]:
        """second_per_grid_ts of the n videos of a dict item: given, from its fps, or the default fps."""
        if item.get("second_per_grid_ts") is not None:
            value = item["second_per_grid_ts"]
            values = value.reshape(-1).tolist() if torch.is_tensor(value) or isinstance(value, np.ndarray) else value
            values = [values] * n if isinstance(values, (int, float)) else list(values)
            if len(values) != n or not all(isinstance(v, (int, float)) and v > 0 for v in values):
                raise ValueError(f"{where}: second_per_grid_ts must be a positive number or {n} of them, got {value!r}")
            return [float(v) for v in values]
        return [self.temporal_patch_size / self._fps(item, where)] * n

    def _fps(self, item: dict[str, Any], where: str) -> float:
        fps = item.get("fps", self.default_fps)
        if fps is None:
            fps = self.default_fps
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ValueError(f"{where}: fps must be a positive number, got {fps!r}")
        return float(fps)

    def _check_embeds(self, modality: str, index: int, embeds: torch.Tensor, grid: torch.Tensor) -> int:
        count = int(grid.prod()) // (self.merge**2)
        if embeds.shape[0] != count:
            raise ValueError(
                f"multi_modal_data: {modality} {index}: {modality}_embeds has {embeds.shape[0]} rows "
                f"but {modality}_grid_thw implies {count}"
            )
        return count

    def _image_feature(self, index: int, item: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, str]:
        """(vision-tower inputs, grid [3], content hash) of one image item."""
        if isinstance(item, dict):  # {"image_embeds": [n, hidden], "image_grid_thw": [1, 3]} (split already)
            if "image_embeds" not in item or "image_grid_thw" not in item:
                raise ValueError(f"multi_modal_data: image {index}: a dict item needs 'image_embeds' and 'image_grid_thw'")
            grid = torch.as_tensor(item["image_grid_thw"]).reshape(-1)[:3].long()
            embeds = torch.as_tensor(item["image_embeds"])
            return {"image_embeds": embeds}, grid, hash_item(item)
        if torch.is_tensor(item) or isinstance(item, np.ndarray):
            # Qwen2-VL's positions (M-RoPE) and placeholder counts come from each image's grid.
            raise ValueError(
                f"multi_modal_data: image {index}: image embeddings need their grids; pass "
                "{'image_embeds': (num_images, feature_size, hidden) or (total_feature_size, hidden), "
                "'image_grid_thw': (num_images, 3)}"
            )
        if not _is_pil(item):
            raise ValueError(
                f"multi_modal_data: image {index}: expected a PIL image or an image_embeds dict, got {type(item).__name__}"
            )
        pixels, ident = self._image_u8(index, item)  # [h, w, 3] uint8
        p = self.resize_spec.patch_size
        grid = torch.tensor([1, pixels.shape[0] // p, pixels.shape[1] // p], dtype=torch.int64)
        return {"image_u8": pixels, "image_grid_thw": grid[None]}, grid, ident

    def _image_u8(self, index: int, image: Any) -> tuple[torch.Tensor, str]:
        """A PIL image -> (its resized RGB pixels, uint8 [h, w, 3], content hash of them)."""
        try:
            pixels = image_to_u8(image, self.resize_spec)
        except Exception as exc:  # corrupt or truncated image data surfaces here
            raise ValueError(f"multi_modal_data: image {index} could not be processed: {exc}") from exc
        return torch.from_numpy(pixels), hash_item(pixels)  # the exact input of its vision pass

    def _video_feature(
        self, index: int, item: Any, max_tokens: int | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, str, float]:
        """(vision-tower inputs, grid [3], content hash, second_per_grid_ts) of one video item."""
        where = f"multi_modal_data: video {index}"
        fps = self.default_fps
        if isinstance(item, dict):
            if "video_embeds" in item:  # split already: one video
                if "video_grid_thw" not in item:
                    raise ValueError(f"{where}: a video_embeds dict needs 'video_grid_thw'")
                grid = torch.as_tensor(item["video_grid_thw"]).reshape(-1)[:3].long()
                seconds = self._seconds_per_grid(item, 1, where)[0]
                data = {"video_embeds": torch.as_tensor(item["video_embeds"])}
                return data, grid, hash_item({"video": item, "second_per_grid_ts": seconds}), seconds
            if "frames" not in item:
                raise ValueError(f"{where}: a dict item needs 'frames' (with an optional 'fps') or 'video_embeds'")
            fps = self._fps(item, where)
            item = item["frames"]
        pixels, grid = self.video_processor(item, where, max_tokens)
        seconds = self.temporal_patch_size / fps
        # fps joins the hash: on Qwen2.5-VL it changes the positions, so the KV of later tokens.
        ident = hash_item({"video": item, "second_per_grid_ts": seconds})
        return {"pixel_values_videos": pixels, "video_grid_thw": grid}, grid[0], ident, seconds

    # -- prompt ---------------------------------------------------------------------------------

    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        from engine.models.qwen2_vl import get_mrope_positions

        images = self.split_items("image", items.get("image", []))
        videos = self.split_items("video", items.get("video", []))
        features: list[tuple[str, dict, torch.Tensor, str]] = []
        for i, item in enumerate(images):
            d, g, h = self._image_feature(i, item)
            features.append(("image", d, g, h))
        max_tokens = self.config.scheduler.max_model_len - 1
        seconds: list[float] = []
        for i, item in enumerate(videos):
            d, g, h, s = self._video_feature(i, item, max_tokens)
            features.append(("video", d, g, h))
            seconds.append(s)
        counts = [int(g.prod()) // (self.merge**2) for _, _, g, _ in features]
        index = {"image": 0, "video": 0}
        for (modality, d, g, _), c in zip(features, counts):
            if f"{modality}_embeds" in d:
                self._check_embeds(modality, index[modality], d[f"{modality}_embeds"], g)
            index[modality] += 1

        img_counts = counts[: len(images)]
        vid_counts = counts[len(images) :]
        ids, _ = expand_placeholders(token_ids, self.image_token_id, img_counts, "image")
        ids, _ = expand_placeholders(ids, self.video_token_id, vid_counts, "video")
        # Offsets after both expansions (expanding videos moves the images after them).
        offsets = _run_offsets(ids, self.image_token_id, img_counts) + _run_offsets(ids, self.video_token_id, vid_counts)
        mm_features = [
            MultiModalFeature(modality, h, off, c, d)
            for (modality, d, _, h), off, c in zip(features, offsets, counts)
        ]
        mm_features.sort(key=lambda f: f.offset)
        image_grid = torch.stack([g for m, _, g, _ in features if m == "image"]) if images else None
        video_grid = torch.stack([g for m, _, g, _ in features if m == "video"]) if videos else None
        spgt = seconds if videos and self.tokens_per_second is not None else None
        positions, delta = get_mrope_positions(ids, image_grid, video_grid, self.hf_config, spgt)
        return ProcessedPrompt(ids, mm_features, positions, delta)
