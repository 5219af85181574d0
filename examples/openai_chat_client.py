"""OpenAI chat completions with images against a running ``vlmserve serve``: one request with a
single image, then one with several.

    vlmserve serve                      # the bundled demo model, served as "vlmserve-demo"
    python examples/openai_chat_client.py
    # or: vlmserve serve Qwen/Qwen2-VL-2B-Instruct --limit-mm-per-prompt image=2
    python examples/openai_chat_client.py --model Qwen/Qwen2-VL-2B-Instruct --image https://.../duck.jpg \\
        --image https://.../lion.jpg

``--image`` (repeat it): http(s):// URLs (the server fetches them) or local files (sent inline as
base64 data: URLs); the first goes in the single-image request, all of them in the other. Without
it two generated pictures are sent. ``--json`` prints one ``{"request": ..., "text": ...}`` line a
request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from typing import Any


QUESTIONS = {"single-image": "What is in this image?", "multi-image": "What is different between these images?"}


def demo_image_url(seed: int) -> str:
    """A generated picture as a PNG data: URL (see offline_single_image.demo_image)."""
    from offline_single_image import demo_image

    buf = io.BytesIO()
    demo_image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_url(ref: str) -> str:
    """An http(s)/data URL as it is, a local file as a data: URL."""
    if ref.startswith(("http://", "https://", "data:")):
        return ref
    import mimetypes

    mime = mimetypes.guess_type(ref)[0] or "image/png"
    with open(ref, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def ask(client: Any, model: str, urls: list[str], question: str, max_tokens: int) -> str:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    resp = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.0,
        messages=[{"role": "user", "content": [*content, {"type": "text", "text": question}]}],
    )
    return resp.choices[0].message.content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default="vlmserve-demo", help="a served model name")
    parser.add_argument("--image", action="append", default=None, help="image URL or file; repeat for more")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import openai

    urls = [image_url(ref) for ref in args.image] if args.image else [demo_image_url(0), demo_image_url(1)]
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    requests = [("single-image", urls[:1]), ("multi-image", urls)]
    for name, chosen in requests:
        question = QUESTIONS[name]
        try:
            text = ask(client, args.model, chosen, question, args.max_tokens)
        except openai.APIError as exc:
            sys.exit(f"error: {name} request: {exc}")
        print(json.dumps({"request": name, "text": text}) if args.json else f"{name}: {text}")


if __name__ == "__main__":
    main()
