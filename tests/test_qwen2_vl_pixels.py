"""Qwen2-VL / Qwen2.5-VL images split between the front end (PIL -> resized RGB uint8,
``engine.mm_processors.qwen2_vl_resize``) and the device (uint8 -> ``pixel_values``,
``engine.mm_processors.qwen2_vl_pixels``) give HF's ``Qwen2VLImageProcessor`` output (its PIL
backend here: no torchvision) — ``pixel_values`` within 1e-5 (bit-identical on CPU in practice)
and the same ``image_grid_thw`` — for images needing no resize, a resize up or down, non-square
sizes, RGBA / LA / L / P / CMYK inputs, several mixed-size images at once (the batched path), other
processor settings, and the tiny Qwen2.5-VL checkpoint's processor; through the real front end
and the runner's device preprocessor as well as the bare functions.
"""

from __future__ import annotations

import io
import pickle
import types

import numpy as np
import pytest
import tiny_vlm
import tiny_vlm25
import torch
from PIL import Image

from engine import EngineArgs
from engine.mm_device_preprocessor import DevicePreprocessor, get_device_preprocessor
from engine.mm_processor import get_mm_processor
from engine.mm_processors.qwen2_vl_pixels import QwenPixelSpec, pack_images
from engine.mm_processors.qwen2_vl_resize import QwenResizeSpec, image_to_u8
from engine.multimodal import hash_item

ATOL = 1e-5
MAX_DIFFS: list[float] = []  # max |ours - HF| per comparison (printed with -s)


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def _rgb(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed), "RGB")


def _rgba(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed, 4), "RGBA")  # alpha noise: compositing matters everywhere


def _la(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed, 2), "LA")


def _gray(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed, 1)[..., 0], "L")


def _palette(h: int, w: int, seed: int, transparent: bool = False) -> Image.Image:
    img = _rgb(h, w, seed).quantize(colors=32)
    if transparent:
        img.info["transparency"] = 3  # palette entry 3 is see-through: HF composites it onto white
    return img


def _cmyk(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed, 4), "CMYK")


# Tiny checkpoints' processor: min_pixels 56*56, max_pixels 28*28*64 (= 224*224), factor 28.
CASES = {
    "no resize 224x224": lambda: _rgb(224, 224, 1),
    "no resize 112x168": lambda: _rgb(112, 168, 2),
    "resize down 448x448": lambda: _rgb(448, 448, 3),
    "resize down 300x500": lambda: _rgb(300, 500, 4),
    "resize up 30x40": lambda: _rgb(30, 40, 5),
    "rounding 100x150": lambda: _rgb(100, 150, 6),
    "wide 60x300": lambda: _rgb(60, 300, 7),
    "RGBA": lambda: _rgba(100, 150, 8),
    "RGBA no resize": lambda: _rgba(112, 112, 9),
    "LA": lambda: _la(90, 70, 10),
    "L": lambda: _gray(120, 200, 11),
    "P": lambda: _palette(80, 120, 12),
    "P transparency": lambda: _palette(80, 120, 13, transparent=True),
    "CMYK": lambda: _cmyk(64, 64, 14),
}


def pil_image_processor(model_dir):
    """HF's PIL-backend processor: the reference our front end reproduces. (Where torchvision is
    installed, AutoImageProcessor picks the torchvision backend, which resizes differently.)"""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # transformers 4.x: the default class is the PIL one
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(str(model_dir), use_fast=False)
    return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_pixels"), seed=0)


@pytest.fixture(scope="module")
def vlm25_dir(tmp_path_factory):
    return tiny_vlm25.build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl_pixels"), seed=0)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return pil_image_processor(vlm_dir)


def ours(images: list, ip, **pack_kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Front end + device pack (CPU) of HF-processor ``ip``'s settings -> (pixel_values, grid)."""
    resize, spec = QwenResizeSpec.from_image_processor(ip), QwenPixelSpec.from_image_processor(ip)
    u8 = [torch.from_numpy(image_to_u8(img, resize)) for img in images]
    grid = torch.tensor([[1, x.shape[0] // spec.patch_size, x.shape[1] // spec.patch_size] for x in u8])
    return torch.cat(pack_images(u8, spec, **pack_kw)), grid


def assert_same_as_hf(got: tuple[torch.Tensor, torch.Tensor], images: list, ip) -> None:
    want = ip(images=images, return_tensors="pt")
    pixels, grid = got
    assert torch.equal(grid, want["image_grid_thw"].long())
    assert pixels.dtype == torch.float32 and pixels.shape == want["pixel_values"].shape
    diff = (pixels - want["pixel_values"]).abs().max().item()
    MAX_DIFFS.append(diff)
    assert diff <= ATOL, diff


TRANSPARENT = {"RGBA", "RGBA no resize", "LA", "P transparency"}


def hf_composites_alpha(ip) -> bool:
    """Whether the installed transformers composites transparency onto white (as ours does; recent
    versions) or drops the alpha band (older ones): a fully transparent black image tells."""
    clear = Image.fromarray(np.zeros((56, 56, 4), dtype=np.uint8), "RGBA")
    white = Image.fromarray(np.full((56, 56, 3), 255, dtype=np.uint8), "RGB")
    a, b = (ip(images=[im], return_tensors="pt")["pixel_values"] for im in (clear, white))
    return bool(torch.equal(a, b))


@pytest.mark.parametrize("case", list(CASES))
def test_one_image_matches_hf(processor, case):
    if case in TRANSPARENT and not hf_composites_alpha(processor):
        pytest.skip("this transformers drops the alpha band; ours composites onto white (current HF)")
    image = CASES[case]()
    assert_same_as_hf(ours([image], processor), [image], processor)


@pytest.mark.parametrize("max_images_per_op", [None, 1, 2])
def test_mixed_batch_matches_hf(processor, max_images_per_op):
    # Three sizes, two of them shared by several images (stacked into one op), in shuffled order.
    images = [_rgb(448, 448, 20), _rgb(100, 150, 21), _rgb(448, 448, 22), _gray(224, 224, 23),
              _rgb(100, 150, 24), _rgb(448, 448, 25), _palette(30, 40, 26)]
    got = ours(images, processor, max_images_per_op=max_images_per_op)
    assert_same_as_hf(got, images, processor)


@pytest.mark.parametrize(
    "settings",
    [
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280),  # Qwen2-VL's defaults: 448x448 unresized
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, resample=2),  # bilinear
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, image_mean=0.5, image_std=0.25),  # scalars
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, do_normalize=False),
        dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, do_rescale=False),
        dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2, temporal_patch_size=3),
    ],
    ids=["default", "bilinear", "scalar-mean-std", "no-normalize", "no-rescale", "temporal-3"],
)
def test_other_processor_settings_match_hf(settings):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    ip = Qwen2VLImageProcessorPil(**settings)
    images = [_rgb(448, 448, 30), _rgb(100, 150, 31), _rgb(333, 97, 32)]
    assert_same_as_hf(ours(images, ip), images, ip)


def _engine_config(model_dir):
    return EngineArgs(model=str(model_dir), dtype="float32", device="cpu").create_engine_config()


@pytest.mark.parametrize("which", ["qwen2_vl", "qwen2_5_vl"])
def test_front_end_and_device_preprocessor_match_hf(which, vlm_dir, vlm25_dir):
    """The real path: Qwen2VLProcessor._image_feature -> (pickled, as to the core process) ->
    the runner's device preprocessor, with items given as embeddings / ready pixel_values mixed in."""
    model_dir = vlm_dir if which == "qwen2_vl" else vlm25_dir
    config = _engine_config(model_dir)
    front = get_mm_processor(config, None)
    device_pre = get_device_preprocessor(config, torch.device("cpu"))
    assert type(device_pre).__name__ == "Qwen2VLDevicePreprocessor"
    ip = pil_image_processor(model_dir)
    images = [CASES[c]() for c in ("resize down 448x448", "L", "no resize 224x224", "P", "rounding 100x150")]
    images.append(images[0].copy())  # same size as images[0]: packed together
    datas = []
    for i, img in enumerate(images):
        data, grid, _ = front._image_feature(i, img)
        assert set(data) == {"image_u8", "image_grid_thw"} and data["image_u8"].dtype == torch.uint8
        assert data["image_grid_thw"].tolist() == [grid.tolist()]
        datas.append(pickle.loads(pickle.dumps(data)))
    ready = ip(images=[images[1]], return_tensors="pt")  # a feature built with HF's pixel_values
    embeds = {"image_embeds": torch.randn(5, 64), "image_grid_thw": torch.tensor([[1, 2, 10]])}
    items = datas[:2] + [dict(ready), embeds] + datas[2:]
    out = device_pre.prepare("image", items)
    assert out[3] is not items[3] and torch.equal(out[3]["image_embeds"], embeds["image_embeds"])
    assert torch.equal(out[2]["pixel_values"], ready["pixel_values"])
    packed = [o for i, o in enumerate(out) if i not in (2, 3)]
    assert all(set(o) == {"pixel_values", "image_grid_thw"} for o in packed)
    got = (torch.cat([o["pixel_values"] for o in packed]), torch.cat([o["image_grid_thw"] for o in packed]))
    assert_same_as_hf(got, images, ip)
    # Videos pass through unchanged.
    video = {"pixel_values_videos": torch.randn(8, 1176), "video_grid_thw": torch.tensor([[1, 2, 4]])}
    assert torch.equal(device_pre.prepare("video", [video])[0]["pixel_values_videos"], video["pixel_values_videos"])


def test_content_hash(vlm_dir):
    front = get_mm_processor(_engine_config(vlm_dir), None)
    a = _rgb(100, 150, 40)
    _, _, h1 = front._image_feature(0, a)
    _, _, h2 = front._image_feature(0, a.copy())  # same pixels, another object
    _, _, h3 = front._image_feature(0, _rgb(100, 150, 41))
    _, _, h4 = front._image_feature(0, _rgb(150, 100, 40))
    assert h1 == h2 and len({h1, h3, h4}) == 3
    pixels = _noise(28, 56, 42)
    assert hash_item(pixels) != hash_item(pixels.reshape(56, 28, 3))  # same bytes, other shape


def test_errors(vlm_dir):
    front = get_mm_processor(_engine_config(vlm_dir), None)
    buf = io.BytesIO()
    _rgb(100, 150, 50).save(buf, format="PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))
    with pytest.raises(ValueError, match=r"multi_modal_data: image 3 could not be processed"):
        front._image_feature(3, truncated)
    with pytest.raises(ValueError, match=r"multi_modal_data: image 0 could not be processed: .*aspect ratio"):
        front._image_feature(0, _rgb(1, 300, 51))
    spec = QwenPixelSpec()
    with pytest.raises(ValueError, match="image_u8: image 0"):
        pack_images([torch.zeros(30, 28, 3, dtype=torch.uint8)], spec)
    with pytest.raises(ValueError, match="image_u8: image 0"):
        pack_images([torch.zeros(28, 28, 3)], spec)
    device_pre = get_device_preprocessor(_engine_config(vlm_dir), torch.device("cpu"))
    bad = {"image_u8": torch.zeros(56, 28, 3, dtype=torch.uint8), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    with pytest.raises(ValueError, match="image_grid_thw"):
        device_pre.prepare("image", [bad])


def test_grids_stay_on_the_host(vlm_dir):
    """Pixels go to the model's device, grids stay host tensors: the tower reads them with
    ``tolist``, which on a device tensor waits for every kernel queued before it (a stall in the
    middle of launching a step). "meta" stands in for an accelerator here."""
    device_pre = get_device_preprocessor(_engine_config(vlm_dir), torch.device("meta"))
    front = get_mm_processor(_engine_config(vlm_dir), None)
    data, _, _ = front._image_feature(0, _rgb(56, 84, 3))
    embeds = {"image_embeds": torch.randn(5, 64), "image_grid_thw": torch.tensor([[1, 2, 10]])}
    out = device_pre.prepare("image", [data, embeds])
    assert out[0]["pixel_values"].device.type == "meta" and out[1]["image_embeds"].device.type == "meta"
    assert out[0]["image_grid_thw"].device.type == "cpu" and out[1]["image_grid_thw"].device.type == "cpu"
    assert out[0]["image_grid_thw"].tolist() == [[1, 4, 6]]  # _rgb(h=56, w=84): 4 x 6 patches of 14
    video = {"pixel_values_videos": torch.randn(8, 1176), "video_grid_thw": torch.tensor([[1, 2, 4]])}
    moved = device_pre.prepare("video", [video])[0]
    assert moved["pixel_values_videos"].device.type == "meta" and moved["video_grid_thw"].device.type == "cpu"


def test_architectures_without_one_just_move_tensors():
    config = types.SimpleNamespace(model=types.SimpleNamespace(architecture="LlavaForConditionalGeneration"))
    pre = get_device_preprocessor(config, torch.device("cpu"))
    assert type(pre) is DevicePreprocessor
    data = {"pixel_values": torch.randn(1, 3, 8, 8)}
    assert torch.equal(pre.prepare("image", [data])[0]["pixel_values"], data["pixel_values"])


def test_report_max_diff():
    """Runs last in this file: the largest |ours - HF| seen above (0.0 means bit-identical)."""
    assert MAX_DIFFS, "no comparison ran"
    print(f"\nmax |pixel_values - HF| over {len(MAX_DIFFS)} comparisons: {max(MAX_DIFFS):.3g}")
    assert max(MAX_DIFFS) <= ATOL
