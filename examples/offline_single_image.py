"""Offline inference with one image: ``LLM.chat`` with an image part and a question.

    python examples/offline_single_image.py                       # the bundled demo model
    python examples/offline_single_image.py --model Qwen/Qwen2-VL-2B-Instruct --image cat.jpg

``--model``: any Qwen2-VL-family folder or hub id (or another vision-language model vlmserve runs;
its chat template places the image). Without it the bundled demo model is used
(``vlmserve-demo``). ``--image``: a file, or an http(s):// / data: URL;
without it a generated picture is used, so the script runs offline. ``--json`` prints
``{"text": ...}`` instead of prose.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def demo_image(seed: int = 0) -> Any:
    """A generated 160x120 picture (colour gradient and a disc), so no download is needed."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120))
    img.putdata([((x * 8 + seed * 40) % 256, (y * 2 + seed * 90) % 256, 128) for y in range(120) for x in range(160)])
    ImageDraw.Draw(img).ellipse((40 + 20 * seed, 20, 110 + 20 * seed, 90), fill=(240, 220, 30))
    return img


def image_part(ref: str | None, seed: int = 0) -> dict[str, Any]:
    """A content part for a file path or URL (the engine loads URLs), or the demo picture."""
    if ref is None:
        return {"type": "image", "image": demo_image(seed)}
    if ref.startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": ref}}
    from PIL import Image

    return {"type": "image", "image": Image.open(ref).convert("RGB")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the bundled demo model)")
    parser.add_argument("--image", default=None, help="image file or URL (default: a generated picture)")
    parser.add_argument("--question", default="What is the content of this image?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help='print {"text": ...}')
    args = parser.parse_args()

    from engine import LLM, SamplingParams

    model = args.model or "vlmserve-demo"  # the bundled demo model, loaded by name
    llm = LLM(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              limit_mm_per_prompt={"image": 1})
    messages = [{"role": "user", "content": [image_part(args.image), {"type": "text", "text": args.question}]}]
    try:
        out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)[0]
    except ValueError as exc:  # e.g. a text-only model, or an image that cannot be loaded
        sys.exit(f"error: {exc}")
    text = out.outputs[0].text
    print(json.dumps({"text": text}) if args.json else f"Output: {text}")


if __name__ == "__main__":
    main()
