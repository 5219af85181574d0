"""OpenAI-style chat messages -> a templated prompt plus the images and videos it refers to.

Content may be a string or a list of parts: ``{"type": "text", "text"}``,
``{"type": "image_url", "image_url": {"url"}}`` (or a bare ``{"type": "image", "image": PIL}``
offline), and, offline, ``{"type": "video", "video": frames}`` where ``frames`` is a list of PIL
images (or a ``(T, H, W, 3)`` uint8 array), in any order. Parts become ``{"type": "image"}`` /
``{"type": "video"}`` / ``{"type": "text"}`` entries for the chat template; when a template
ignores media parts (it renders no placeholder), the model's placeholder text is written in at
each item's place instead, as vLLM does.

``{"type": "video_url", "video_url": {"url"}}`` parts are decoded by ``MediaLoader.load_video`` (the
URL rules of images; PyAV, an optional dependency: without it a ValueError says what to send
instead) into ``{"frames", "fps"}``, sampled and bounded there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.media import MediaLoader, url_scheme


@dataclass
class ParsedChat:
    messages: list[dict[str, Any]]  # template-ready
    images: list[Any] = field(default_factory=list)  # PIL images, in order of appearance
    string_messages: list[dict[str, Any]] = field(default_factory=list)  # placeholders inlined
    videos: list[Any] = field(default_factory=list)  # frame lists / arrays, in order of appearance


def parse_chat(
    messages: list[dict[str, Any]],
    loader: MediaLoader,
    placeholder: str | Callable[[int], str] | None,
    video_placeholder: str | None = None,
) -> ParsedChat:
    """``placeholder`` / ``video_placeholder``: the model's text for one image / video, or None
    when it takes no images / videos (such parts then raise ValueError). ``placeholder`` may be a
    function of the image's 1-based number (numbered tags such as ``<|image_N|>``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list")
    out, flat, images, videos = [], [], [], []
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
                texts.append(placeholder(len(images)) if callable(placeholder) else placeholder)
            elif kind in ("video_url", "video"):
                if video_placeholder is None:  # before any download or decoding
                    raise ValueError(f"{where}: this model does not take video input")
                if kind == "video_url":
                    videos.append(loader.load_video(_url_of(part, "video_url", where), what=f"{where}.video_url"))
                else:
                    videos.append(_video_of(part, where))
                parts.append({"type": "video"})
                texts.append(video_placeholder)
            else:
                raise ValueError(f"{where}.type: unsupported content part type {kind!r}")
        joined = "\n".join(texts) if len(texts) > 1 else "".join(texts)
        # Text-only part lists become one string (as vLLM does): many templates expect strings.
        media = any(p["type"] != "text" for p in parts)
        out.append(dict(msg, content=parts if media else joined))
        flat.append(dict(msg, content=joined))
    return ParsedChat(out, images, flat, videos)


def _image_of(part: dict[str, Any], kind: str, where: str, loader: MediaLoader) -> Any:
    if kind == "image":  # offline convenience: {"type": "image", "image": PIL.Image}
        img = part.get("image")
        if img is None or not hasattr(img, "convert"):
            raise ValueError(f"{where}.image: expected a PIL image")
        return img
    return loader.load_image(_url_of(part, "image_url", where), what=f"{where}.image_url")


def _url_of(part: dict[str, Any], kind: str, where: str) -> Any:
    """The URL of an ``image_url`` / ``video_url`` part: ``{kind: {"url": ...}}``."""
    ref = part.get(kind)
    if isinstance(ref, str):
        raise ValueError(f"{where}.{kind}: must be an object {{\"url\": ...}}, not a bare string")
    if not isinstance(ref, dict) or "url" not in ref:
        raise ValueError(f"{where}.{kind}: must be an object with a 'url'")
    return ref["url"]


def remote_image_urls(messages: Any) -> list[tuple[str, str]]:
    """``(url, what)`` of every http(s) ``image_url`` and ``video_url`` part, named as
    ``parse_chat`` names it, so a server can fetch them before parsing
    (``MediaLoader.fetch_all_async``). Never raises: parts that ``parse_chat`` rejects are skipped
    here and reported there. Video URLs only where videos can be decoded: else nothing is fetched
    and ``parse_chat`` answers what to send instead."""
    from engine.video_decode import available

    kinds = ("image_url", "video_url") if available() else ("image_url",)
    found = []
    for m_index, msg in enumerate(messages if isinstance(messages, list) else []):
        content = msg.get("content") if isinstance(msg, dict) else None
        for p_index, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in kinds:
                continue
            where = f"messages[{m_index}].content[{p_index}]"
            try:
                url = _url_of(part, kind, where)
            except ValueError:
                continue
            if isinstance(url, str) and url_scheme(url) in ("http", "https"):
                found.append((url, f"{where}.{kind}"))
    return found


def _video_of(part: dict[str, Any], where: str) -> Any:
    """The frames of an offline ``{"type": "video", "video": frames}`` part (checked in depth by
    the model's processor)."""
    import numpy as np

    video = part.get("video")
    if isinstance(video, tuple):
        video = list(video)
    if isinstance(video, list) and video and all(hasattr(f, "convert") or isinstance(f, np.ndarray) for f in video):
        return video
    if isinstance(video, np.ndarray) and video.ndim == 4:
        return video
    raise ValueError(f"{where}.video: expected a non-empty list of PIL images (frames) or a (T, H, W, 3) uint8 array")
