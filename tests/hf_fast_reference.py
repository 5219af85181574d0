"""HF's fast (torchvision-backend) Qwen2-VL processor as a reference, run in a subprocess.

The shared test venv has no torchvision (installing it would switch every other test's HF image
processor to the torchvision backend), so ``tests/test_qwen2_vl_fast.py`` runs this script with a
private torchvision on ``PYTHONPATH``. Here, with torchvision importable:

* ``AutoImageProcessor.from_pretrained(model_dir)`` (HF's default) must pick the torchvision
  backend; its ``pixel_values`` are recorded per image, and for all the images in one call (HF
  groups same-size images into one resize);
* HF's video processor (``AutoVideoProcessor``, torchvision only) on a few frame lists;
* HF ``generate`` (greedy) on each prompt, with that processor;
* the engine with default settings (no ``mm_processor_kwargs``): its greedy tokens, and whether it
  chose the fast path, so that the parent can check it follows HF's rule.

Usage: ``python hf_fast_reference.py SPEC_JSON OUT_PT``; SPEC: {"model_dir", "images": [[h, w,
seed], ...], "videos": [[frames, h, w, seed], ...], "prompts": [[image indices], ...], "max_tokens"}.

The PyPI torchvision wheel is a CUDA build: against a CPU-only torch its C extension (detection
ops such as ``nms``) does not load, and ``import torchvision`` then fails while registering fake
kernels for those ops. The image transforms HF uses are Python over torch ops, so those two
registration modules are stubbed out when (and only when) the extension cannot load.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch


def _import_torchvision() -> str:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchvision is not importable here")
    lib = Path(list(spec.submodule_search_locations)[0]) / "_C.so"
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError):  # a CUDA build on a CPU-only torch: see the module doc
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
    import torchvision

    return torchvision.__version__


def main(spec_path: str, out_path: str) -> None:
    tv_version = _import_torchvision()
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_vlm
    from transformers import AutoImageProcessor
    from transformers.utils import is_torchvision_available

    spec = json.loads(Path(spec_path).read_text())
    model_dir = spec["model_dir"]
    images = [tiny_vlm.random_image(h, w, seed) for h, w, seed in spec["images"]]

    ip = AutoImageProcessor.from_pretrained(model_dir)  # HF's default choice, as users run it
    pixels = [ip(images=[im], return_tensors="pt")["pixel_values"] for im in images]
    batch = ip(images=images, return_tensors="pt")["pixel_values"]
    from transformers import AutoVideoProcessor

    vp = AutoVideoProcessor.from_pretrained(model_dir)  # HF's only Qwen2-VL video processor: torchvision
    videos = []
    for frames, h, w, seed in spec.get("videos", []):
        video = [tiny_vlm.random_image(h, w, seed + i) for i in range(frames)]
        o = vp(videos=[video], return_tensors="pt", cap_pixels_per_frame=False)
        videos.append((o["pixel_values_videos"], o["video_grid_thw"]))

    from engine import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=4)
    hf = tiny_vlm.load_hf_qwen2_vl(model_dir)
    ref = tiny_vlm.hf_greedy_reference(hf, ip, llm.get_tokenizer(), spec["max_tokens"])
    greedy = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    hf_tokens, engine_tokens, prompt_ids = [], [], []
    for indices in spec["prompts"]:
        text = tiny_vlm.make_prompt(len(indices))
        ims = [images[i] for i in indices]
        ids, expected = ref(text, ims)
        out = llm.generate(tiny_vlm.mm(text, ims), greedy, use_tqdm=False)[0]
        hf_tokens.append(expected)
        prompt_ids.append((ids, out.prompt_token_ids))
        engine_tokens.append(list(out.outputs[0].token_ids))
    torch.save(
        {
            "torchvision": tv_version,
            "hf_torchvision_available": is_torchvision_available(),
            "hf_backend": getattr(ip, "backend", type(ip).__name__),
            "pixel_values": pixels,
            "batch_pixel_values": batch,
            "video_processor": type(vp).__name__,
            "videos": videos,
            "hf_tokens": hf_tokens,
            "engine_tokens": engine_tokens,
            "prompt_ids": prompt_ids,
            "engine_use_fast": llm.processor.mm_processor.use_fast,
        },
        out_path,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
