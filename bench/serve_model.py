"""Model folders for ``bench/serve_bench.py``: W1's Qwen2-VL-2B shape for an OpenAI-style server.

``build_w1_model(out_dir, tiny=False)`` writes the folder with ``bench.gpu_throughput``'s builder
(``build_model_dir``: config, random weights, 151,936-id byte-level tokenizer, Qwen2-VL-2B's
preprocessor_config.json; bf16 on CUDA, or the tiny shape in fp32 on CPU) and then
``add_serving_files``, which adds what a chat server needs and that builder does not write:

* a chat template (Qwen2-VL's) in tokenizer_config.json, chat_template.jinja (transformers 5
  processors) and chat_template.json (transformers 4 processors): /v1/chat/completions needs one
  (vlmserve answers 400 without; vLLM's processor applies the processor's template);
* ``tokenizer_class: Qwen2Tokenizer`` instead of transformers 5's ``TokenizersBackend`` (a name
  transformers 4 cannot load, and Qwen2VLProcessor wants a Qwen2 tokenizer); the same
  tokenizer.json is read either way (checked: identical ids and decoding under transformers 5);
* processor_config.json and video_preprocessor_config.json, so that ``AutoProcessor`` builds a
  ``Qwen2VLProcessor`` with its video processor (vLLM's Qwen2-VL processing asks for it);
* ``rope_scaling`` {type: mrope, mrope_section} and ``rope_theta`` in text_config, as the real
  Qwen2-VL-2B-Instruct config.json has them, for readers that predate ``rope_parameters``
  (transformers 5 and vlmserve read ``rope_parameters``, whose rope_type stays "default").

gpu_throughput.py itself is unchanged (it writes into its own folder). ``check_processor`` loads
the folder as vLLM would (needs torchvision, for the video processor) and says what it got.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAMP = ".serve_bench_model.json"
STAMP_VERSION = 1

# Qwen2-VL-2B-Instruct's chat template (string content, or a list of image / video / text parts):
# the one the tests' tiny Qwen2-VL carries.
sys.path.insert(0, str(REPO_ROOT / "tests"))
from tiny_vlm import QWEN2_VL_CHAT_TEMPLATE  # noqa: E402


def _update_json(path: Path, **items) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(items)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def add_serving_files(out_dir: Path) -> None:
    """Add the chat template, a portable tokenizer class, the processor / video processor configs
    and the transformers-4 rope keys to a folder written by ``gpu_throughput.build_model_dir``."""
    out_dir = Path(out_dir)
    _update_json(out_dir / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer",
                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    (out_dir / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}, indent=2) + "\n")
    _update_json(out_dir / "processor_config.json", processor_class="Qwen2VLProcessor")
    pp = json.loads((out_dir / "preprocessor_config.json").read_text())
    video = {k: pp[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                                "image_mean", "image_std") if k in pp}
    _update_json(out_dir / "video_preprocessor_config.json", video_processor_type="Qwen2VLVideoProcessor",
                 processor_class="Qwen2VLProcessor", **video)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("architectures", ["Qwen2VLForConditionalGeneration"])
    text = config.get("text_config", config)
    rope = text.get("rope_parameters") or {}
    if "mrope_section" in rope:
        text.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
        text.setdefault("rope_scaling", {"type": "mrope", "mrope_section": rope["mrope_section"]})
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def check_processor(model_dir: Path) -> str:
    """Load the folder with ``AutoProcessor`` (as vLLM does) and render one chat prompt; returns a
    one-line description, or why it could not be checked."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # Qwen2VLVideoProcessor needs it
        return "not checked: torchvision is not installed (the video processor needs it)"
    try:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(str(model_dir))
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        video = type(getattr(proc, "video_processor", None)).__name__
        ok = "<|vision_start|><|image_pad|><|vision_end|>Hi" in text
        return (f"{type(proc).__name__} (tokenizer {type(proc.tokenizer).__name__}, video processor {video}); "
                f"chat template {'renders' if ok else 'renders WITHOUT the image placeholder'}")
    except Exception as exc:  # noqa: BLE001 (a report, not a failure of the bench)
        return f"AutoProcessor failed: {type(exc).__name__}: {exc}"


def build_w1_model(out_dir: Path, tiny: bool = False, device: str | None = None, seed: int = 0) -> Path:
    """Build (once; a stamp file marks a finished build) W1's model folder ready to serve: the
    Qwen2-VL-2B shape in bf16 on CUDA, or the tiny shape in fp32 on CPU when ``tiny``."""
    out_dir = Path(out_dir)
    want = {"version": STAMP_VERSION, "tiny": tiny, "builder": "bench.gpu_throughput.build_model_dir"}
    stamp = out_dir / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out_dir
    import torch

    from bench.gpu_throughput import build_model_dir

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu"))
    torch.manual_seed(seed)
    model, _info = build_model_dir(out_dir, tiny, dev, torch.float32 if tiny else torch.bfloat16)
    del model
    add_serving_files(out_dir)
    stamp.write_text(json.dumps(want) + "\n")
    return out_dir


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build W1's model folder for serving (see bench/serve_bench.py)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args()
    print(build_w1_model(a.out_dir, a.tiny))
    print(check_processor(a.out_dir))
