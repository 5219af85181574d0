"""MiniCPM-V 2.6 inputs: ``(<image>./</image>)`` tags, sliced images, ``<unk>`` placeholder runs.

Prompt format (the published ``MiniCPMVProcessor``): each ``(<image>./</image>)`` in the text is
replaced with image i's placeholder text (``minicpmv_slicing.placeholder_text``: an
``<image_id>i</image_id>`` tag, the overview's ``<image>`` + 64 x ``<unk>`` + ``</image>``, then the
slices' ``<slice>`` runs) and the whole text is tokenised. Every placeholder starts and ends with a
special token, so tokenising the pieces around the tags one by one gives the same ids: here
(``tokenize``) a tag becomes one ``<image>`` id, which ``process`` replaces with the tokenised
placeholder of that image. Prompts given as token ids carry one ``<image>`` id per image.

Each overview / slice is its own ``MultiModalFeature`` covering its run of ``query_num`` ``<unk>``
tokens (the tokens between runs keep their text embeddings); its identifier is the image's content
hash plus the slice index, so the encoder cache and prefix cache work per slice.

Images: a PIL image (sliced here; patches cut on the device: ``minicpmv_pixels``), or vLLM's
precomputed form ``{"image_embeds": ..., "image_size_list": [(width, height), ...]}`` (also spelt
``image_sizes``) covering one or more images: the embeddings are the resampler's outputs, per image
``[num_slices, query_num, hidden]`` (or those rows flattened), given as one tensor for all images
``[num_images, ...]`` or a list; the sizes rebuild the placeholder text.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from engine.mm_processor import MultiModalProcessor, ProcessedPrompt, _is_pil
from engine.mm_processors.minicpmv_pixels import preprocessor_config
from engine.mm_processors.minicpmv_slicing import SliceConfig, num_slices, placeholder_text, slice_images_u8
from engine.multimodal import MultiModalFeature, hash_item

IMAGE_TAG = "(<image>./</image>)"
MARKER = "<image>"  # one per image in tokenised prompts, before expansion
UNK = "<unk>"
_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<unk>", "<image_id>", "</image_id>")


def slice_config(model_dir: Any, hf_config: Any) -> SliceConfig:
    """The slicing settings from preprocessor_config.json (the published processor's fields)."""
    pp = preprocessor_config(model_dir)
    if not pp.get("slice_mode", True):
        raise ValueError("minicpmv: preprocessor_config.json slice_mode=false is not supported")
    cfg = SliceConfig(
        max_slice_nums=int(pp.get("max_slice_nums", 9)),
        scale_resolution=int(pp.get("scale_resolution", 448)),
        patch_size=int(pp.get("patch_size", 14)),
        query_num=int(pp.get("image_feature_size", getattr(hf_config, "query_num", 64))),
        use_image_id=bool(pp.get("use_image_id", getattr(hf_config, "use_image_id", True))),
    )
    if cfg.query_num != int(getattr(hf_config, "query_num", cfg.query_num)):
        raise ValueError(f"minicpmv: preprocessor_config.json image_feature_size {cfg.query_num} differs "
                         f"from config.json query_num {hf_config.query_num}")
    if cfg.max_slice_nums < 1:
        raise ValueError("minicpmv: max_slice_nums must be >= 1")
    return cfg


def _sizes(value: Any) -> list[tuple[int, int]]:
    sizes = value.tolist() if isinstance(value, torch.Tensor) else value
    if isinstance(sizes, (list, tuple)) and len(sizes) == 2 and all(isinstance(v, int) for v in sizes):
        sizes = [sizes]  # one (width, height)
    if not isinstance(sizes, (list, tuple)) or not all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v > 0 for v in s) for s in sizes
    ):
        raise ValueError("multi_modal_data: image_size_list must be a list of (width, height) pairs of positive ints")
    return [(int(w), int(h)) for w, h in sizes]


class MiniCPMVProcessor(MultiModalProcessor):
    image_placeholder_text = IMAGE_TAG
    image_placeholder_token = IMAGE_TAG

    def __init__(self, config: Any, tokenizer: Any) -> None:
        super().__init__(config, tokenizer)
        hf = config.model.hf_config
        self.lm_hidden = int(hf.hidden_size)
        self.cfg = slice_config(config.model.model_dir, hf)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _TOKENS}
        bad = [t for t, i in ids.items() if not isinstance(i, int) or not 0 <= i < int(hf.vocab_size)]
        if bad or len(set(ids.values())) != len(ids):
            raise ValueError(f"minicpmv: the tokenizer lacks the image tokens {bad or list(ids)}")
        self.marker_id, self.unk_id = ids[MARKER], ids[UNK]

    # -- text -----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text with ``(<image>./</image>)`` tags -> ids with one ``<image>`` id per tag."""
        if IMAGE_TAG not in text:
            return super().tokenize(text, add_special_tokens)
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i:
                ids.append(self.marker_id)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=add_special_tokens and i == 0).input_ids)
        return ids

    # -- images ---------------------------------------------------------------------------------

    def split_items(self, modality: str, items: list[Any]) -> list[Any]:
        """An ``{"image_embeds", "image_size_list"}`` dict covering n images -> n per-image dicts."""
        if modality != "image":
            return items
        out: list[Any] = []
        for item in items:
            if not (isinstance(item, dict) and "image_embeds" in item):
                out.append(item)
                continue
            raw = item.get("image_size_list", item.get("image_sizes"))
            if raw is None:
                raise ValueError("multi_modal_data: MiniCPM-V image_embeds need image_size_list "
                                 "(each image's (width, height)) to build its placeholder text")
            sizes = _sizes(raw)
            embeds = item["image_embeds"]
            n = len(sizes)
            if isinstance(embeds, (list, tuple)):
                per_image = list(embeds)
            elif isinstance(embeds, torch.Tensor) and embeds.dim() >= 3 and embeds.shape[0] == n:
                per_image = list(embeds)  # [num_images, ...]
            elif isinstance(embeds, torch.Tensor) and n == 1:
                per_image = [embeds]  # one image's [num_slices, query_num, hidden] or rows
            else:
                shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"multi_modal_data: image_embeds {shape} do not match {n} image size(s)")
            if len(per_image) != n:
                raise ValueError(f"multi_modal_data: {len(per_image)} image_embeds for {n} image size(s)")
            out.extend({"image_embeds": e, "image_size": s} for e, s in zip(per_image, sizes))
        return out

    def _slices(self, index: int, item: Any) -> tuple[tuple[int, int], list[dict[str, torch.Tensor]], str]:
        """((width, height), per-slice feature data, content hash) of one image item."""
        q = self.cfg.query_num
        if isinstance(item, dict) and "image_embeds" in item:
            size = item["image_size"]
            rows = torch.as_tensor(item["image_embeds"])
            expected = num_slices(size, self.cfg) * q
            if not rows.is_floating_point() or rows.shape[-1] != self.lm_hidden or rows.numel() != expected * self.lm_hidden:
                raise ValueError(
                    f"multi_modal_data: image {index}: image_embeds of a {size[0]}x{size[1]} image must hold "
                    f"{expected // q} slice(s) x {q} rows of {self.lm_hidden} floats, got {tuple(rows.shape)} {rows.dtype}")
            rows = rows.reshape(expected, self.lm_hidden)
            return size, [{"image_embeds": r} for r in rows.split(q)], hash_item([rows, list(size)])
        if not _is_pil(item):
            raise ValueError(f"multi_modal_data: image {index}: expected a PIL image or a dict with "
                             f"image_embeds and image_size_list, got {type(item).__name__}")
        try:
            rgb = item.convert("RGB")  # decodes lazily opened files: truncated or corrupt data fails here
            slices = slice_images_u8(rgb, self.cfg)
        except Exception as exc:
            raise ValueError(f"multi_modal_data: image {index} could not be processed: {exc}") from exc
        # The slicing settings are part of what the features depend on: keyed with the pixels.
        key = hash_item([rgb, repr(self.cfg)])
        return rgb.size, [{"slice_u8": torch.from_numpy(s)} for s in slices], key

    def _placeholder_ids(self, size: tuple[int, int], index: int) -> tuple[list[int], list[int]]:
        """(ids of image ``index``'s placeholder text, start of each ``<unk>`` run in them)."""
        ids = self.tokenizer(placeholder_text(size, index, self.cfg), add_special_tokens=False).input_ids
        starts = [i for i, t in enumerate(ids) if t == self.unk_id and (i == 0 or ids[i - 1] != self.unk_id)]
        return ids, starts

    def process(self, token_ids: list[int], items: dict[str, list[Any]]) -> ProcessedPrompt:
        if "video" in items:
            raise ValueError("multi_modal_data: video input is not supported for this model")
        images = items.get("image", [])
        markers = [i for i, t in enumerate(token_ids) if t == self.marker_id]
        if len(markers) != len(images):
            raise ValueError(f"multi_modal_data: the prompt has {len(markers)} image placeholder(s) "
                             f"({IMAGE_TAG}) but {len(images)} image item(s) were given")
        out: list[int] = []
        features: list[MultiModalFeature] = []
        prev = 0
        for index, (pos, item) in enumerate(zip(markers, images)):
            size, datas, key = self._slices(index, item)
            ids, starts = self._placeholder_ids(size, index)
            if len(starts) != len(datas):  # a tokenizer that merges <unk> runs would break this
                raise ValueError(f"minicpmv: the placeholder of image {index} has {len(starts)} <unk> runs "
                                 f"for {len(datas)} slices")
            out.extend(token_ids[prev:pos])
            base = len(out)
            out.extend(ids)
            for k, (start, data) in enumerate(zip(starts, datas)):
                ident = hashlib.sha256(f"{key}/slice{k}".encode()).hexdigest()
                features.append(MultiModalFeature("image", ident, base + start, self.cfg.query_num, data))
            prev = pos + 1
        out.extend(token_ids[prev:])
        return ProcessedPrompt(out, features)
