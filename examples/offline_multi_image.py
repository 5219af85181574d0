"""Offline inference with several images in one prompt: ``LLM.chat`` with one image part per
picture, then the question.

    python examples/offline_multi_image.py                        # the bundled demo model
    python examples/offline_multi_image.py --model Qwen/Qwen2-VL-2B-Instruct \\
        --image duck.jpg --image lion.jpg --question "What animals are in the images?"

``--model``: any Qwen2-VL-family folder or hub id (default: the bundled demo model). ``--image``
(repeat it): files or http(s):// / data: URLs; without it two generated pictures are used.
``limit_mm_per_prompt`` is set to the number of images. ``--json`` prints ``{"text": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from offline_single_image import image_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the bundled demo model)")
    parser.add_argument("--image", action="append", default=None,
                        help="image file or URL; repeat for each image (default: two generated pictures)")
    parser.add_argument("--question", default="What is different between these images?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help='print {"text": ...}')
    args = parser.parse_args()

    from engine import LLM, SamplingParams

    model = args.model or "vlmserve-demo"  # the bundled demo model, loaded by name
    images = [image_part(ref) for ref in args.image] if args.image else [image_part(None, 0), image_part(None, 1)]
    llm = LLM(model=model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
              limit_mm_per_prompt={"image": len(images)})
    messages = [{"role": "user", "content": [*images, {"type": "text", "text": args.question}]}]
    try:
        out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)[0]
    except ValueError as exc:  # e.g. a text-only model, or an image that cannot be loaded
        sys.exit(f"error: {exc}")
    text = out.outputs[0].text
    print(json.dumps({"text": text}) if args.json else f"Output: {text}")


if __name__ == "__main__":
    main()
