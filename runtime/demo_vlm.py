"""The bundled demo model, ``vlmserve-demo``: a tiny Qwen2-VL trained on synthetic pictures.

``vlmserve serve`` with no model serves it, and ``LLM(model="vlmserve-demo")``,
``vlmserve serve vlmserve-demo`` and ``python -m runtime --model_name=vlmserve-demo
--model_dir=vlmserve-demo`` load it by name (``engine.loader.resolve_model_dir`` maps the name to
this folder). It knows only the pictures of ``runtime.demo_pictures``; its model card
(``runtime/vlmserve-demo/README.md``) says what it was trained on and how
(``scripts/train_demo_vlm.py``).

Public API:

* ``DEMO_MODEL_NAME``: "vlmserve-demo", the name it is served and loaded under.
* ``demo_model_dir()`` -> the folder of the checkpoint inside the installed package.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "vlmserve-demo"


def demo_model_dir() -> Path:
    """The checkpoint folder shipped in the ``runtime`` package (package data, see pyproject.toml)."""
    return Path(__file__).resolve().parent / DEMO_MODEL_NAME
