"""Loading a model folder's ``config.json`` as a transformers config, without remote code.

Most checkpoints name a ``model_type`` that transformers ships; ``AutoConfig`` loads those. Some
architectures we implement natively ship their config class only as remote code
(``configuration_*.py`` + ``auto_map``), e.g. Phi-3-vision (``model_type: "phi3_v"``) and MiniCPM-V
(``model_type: "minicpmv"``). Running
that code is neither needed nor wanted (this machine may not even be able to fetch it), so for
those model types the config is built here from a transformers class that describes the same
language model, keeping every extra field (``img_processor``, ``embd_layer``, ...) as an attribute.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _phi3_v(raw: dict[str, Any]) -> Any:
    """Phi-3-vision / Phi-3.5-vision / VLM2Vec: a ``Phi3Config`` (the text model) plus the vision
    fields. transformers' longrope validation wants ``original_max_position_embeddings`` inside
    the rope dict, where the published checkpoints keep it at top level."""
    from transformers import Phi3Config

    raw = dict(raw)
    rope = raw.get("rope_scaling") or raw.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("type", rope.get("rope_type")) in ("su", "longrope"):
        rope = dict(rope)
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings", 4096))
        raw["rope_scaling" if "rope_scaling" in raw else "rope_parameters"] = rope
    return Phi3Config.from_dict(raw)


def _minicpmv(raw: dict[str, Any]) -> Any:
    """MiniCPM-V 2.6: a ``Qwen2Config`` (the text model; the published config.json is one plus
    the vision fields) keeping ``vision_config``, ``query_num``, ``slice_config``, ``version``, ...
    as plain attributes (``vision_config`` stays a dict: the model builds its tower from it)."""
    from transformers import Qwen2Config

    return Qwen2Config.from_dict(dict(raw))


# config.json model_type -> builder of the config object from the parsed JSON.
_NATIVE_CONFIGS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "phi3_v": _phi3_v,
    "minicpmv": _minicpmv,
}

# config.json model_type -> the transformers tokenizer class that loads the folder's tokenizer,
# for checkpoints whose tokenizer_config.json names a remote-code class (MiniCPM-V 2.6's
# ``MiniCPMVTokenizerFast`` is a Qwen2 tokenizer plus id properties the engine does not use).
_NATIVE_TOKENIZERS: dict[str, str] = {
    "minicpmv": "Qwen2Tokenizer",
}


def native_tokenizer_class(hf_config: Any) -> type | None:
    """The tokenizer class to load this model type's folder with, or None for AutoTokenizer."""
    name = _NATIVE_TOKENIZERS.get(getattr(hf_config, "model_type", None))
    if name is None:
        return None
    import transformers

    return getattr(transformers, name)


def load_hf_config(model_dir: Path, trust_remote_code: bool) -> Any:
    """The folder's config: built natively for the model types above (even with
    ``trust_remote_code``: their remote code is never run), else ``AutoConfig.from_pretrained``."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model: cannot read {path}: {exc}") from exc
    builder = _NATIVE_CONFIGS.get(raw.get("model_type")) if isinstance(raw, dict) else None
    if builder is not None:
        return builder(raw)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
