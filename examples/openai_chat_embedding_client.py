"""Embeddings of a chat conversation with an image (vLLM's ``/v1/embeddings`` with ``messages``)
against a running ``vlmserve serve --task embedding``.

    vlmserve serve MrLight/dse-qwen2-2b-mrl-v1 --task embedding --max-model-len 8192 \\
        --chat-template examples/template_dse_qwen2_vl.jinja
    python examples/openai_chat_embedding_client.py --model MrLight/dse-qwen2-2b-mrl-v1

The official ``openai`` client has no ``messages`` form for embeddings, so the request goes through
its generic ``client.post``. ``--image``: an http(s):// URL or a local file (sent as a data: URL);
without it a generated picture is sent. ``--model`` defaults to the bundled demo model's name.
``--json`` prints ``{"embedding": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from openai_chat_client import demo_image_url, image_url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY", help="the server's --api-key, if it has one")
    parser.add_argument("--model", default="vlmserve-demo", help="a served model name")
    parser.add_argument("--image", default=None, help="image URL or file (default: a generated picture)")
    parser.add_argument("--text", default="What is shown in this image?")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import openai
    from openai.types import CreateEmbeddingResponse

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    url = image_url(args.image) if args.image else demo_image_url(0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": args.text},
    ]}]
    try:
        resp = client.post("/embeddings", cast_to=CreateEmbeddingResponse,
                           body={"model": args.model, "messages": messages, "encoding_format": "float"})
    except openai.APIError as exc:
        sys.exit(f"error: {exc}")
    embedding = resp.data[0].embedding
    if args.json:
        print(json.dumps({"embedding": embedding}))
    else:
        print(f"{len(embedding)} dimensions: {embedding[:4]} ...  ({resp.usage.prompt_tokens} prompt tokens)")


if __name__ == "__main__":
    main()
