"""OpenAI-style chat messages -> a templated prompt plus the images it refers to.

Content may be a string or a list of parts: ``{"type": "text", "text"}``,
``{"type": "image_url", "image_url": {"url"}}`` (or a bare ``{"type": "image", "image": PIL}``
offline), in any order. Parts become ``{"type": "image"}`` / ``{"type": "text"}`` entries for the
chat template; when a template ignores image parts (it renders no placeholder), the model's
placeholder text is written in at each image's place instead, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.media import MediaLoader


@dataclass
class ParsedChat:
    messages: list[dict[str, Any]]  # template-ready
    images: list[Any] = field(default_factory=list)  # PIL images, in order of appearance
    string_messages: list[dict[str, Any]] = field(default_factory=list)  # placeholders inlined


def parse_chat(messages: list[dict[str, Any]], loader: MediaLoader, placeholder: str | None) -> ParsedChat:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    out, flat, images = [], [], []
    for m_index, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ValueError(f"messages[{m_index}]: must be an object with a 'role'")
        content = msg.get("content")
        if content is None or isinstance(content, str):
            out.append(dict(msg, content=content or ""))
            flat.append(dict(msg, content=content or ""))
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{m_index}].content: must be a string or a list of parts")
        parts, texts = [], []
        for p_index, part in enumerate(content):
            where = f"messages[{m_index}].content[{p_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}.text: must be a string")
                parts.append({"type": "text", "text": part["text"]})
                texts.append(part["text"])
            elif kind in ("image_url", "image"):
                images.append(_image_of(part, kind, where, loader))
                parts.append({"type": "image"})
                if placeholder is None:
                    raise ValueError(f"{where}: this model takes text only")
                texts.append(placeholder)
            else:
                raise ValueError(f"{where}.type: unsupported content part type {kind!r}")
        out.append(dict(msg, content=parts))
        flat.append(dict(msg, content="\n".join(texts) if len(texts) > 1 else "".join(texts)))
    return ParsedChat(out, images, flat)


def _image_of(part: dict[str, Any], kind: str, where: str, loader: MediaLoader) -> Any:
    if kind == "image":  # offline convenience: {"type": "image", "image": PIL.Image}
        img = part.get("image")
        if img is None or not hasattr(img, "convert"):
            raise ValueError(f"{where}.image: expected a PIL image")
        return img
    ref = part.get("image_url")
    if isinstance(ref, str):
        raise ValueError(f"{where}.image_url: must be an object {{\"url\": ...}}, not a bare string")
    if not isinstance(ref, dict) or "url" not in ref:
        raise ValueError(f"{where}.image_url: must be an object with a 'url'")
    return loader.load_image(ref["url"], what=f"{where}.image_url")
