"""A tiny Qwen2-VL served as the guide's commands serve one, shared by the tests of the guide's
forms (``tests/test_examples.py``, ``tests/test_server_vlm_embeddings.py``,
``tests/test_video_url.py``) through the session fixtures ``served_qwen2_vl`` and
``qwen2_vl_servers`` (tests/conftest.py): two ``vlmserve serve`` processes started together.

Public API:

* ``SERVED_NAME`` -> the name both servers answer to (``--served-model-name``).
* ``build(out_dir)`` -> the checkpoint: ``tiny_vlm.build_tiny_qwen2_vl`` at the large weight scale
  (``weight_scale.LARGE_STD``), where any difference in the inputs shows in the outputs.
* ``GENERATE_FLAGS`` / ``EMBEDDING_FLAGS`` -> the servers' flags: generation with up to 4 images
  and 1 video a prompt; ``--task embedding`` with ``examples/template_dse_qwen2_vl.jinja`` (the
  guide's DSE-Qwen2 command).
* ``start(model_dir, log_dir)`` -> ``{"generate": CliServer, "embedding": CliServer}``, ready.
* ``data_url(data, mime)`` -> a base64 ``data:`` URL of a PIL image (PNG) or of raw bytes.

Imported as a plain module (``tests/conftest.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tiny_vlm
from server_harness import REPO, CliServer
from weight_scale import build_at_scale

SERVED_NAME = "tiny-qwen2-vl"
MAX_MODEL_LEN = 2048
DSE_TEMPLATE = REPO / "examples" / "template_dse_qwen2_vl.jinja"
GENERATE_FLAGS = ["--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN),
                  "--limit-mm-per-prompt", "image=4,video=1"]
EMBEDDING_FLAGS = ["--task", "embedding", "--served-model-name", SERVED_NAME, "--max-model-len",
                   str(MAX_MODEL_LEN), "--chat-template", str(DSE_TEMPLATE)]


def build(out_dir: Path) -> Path:
    return build_at_scale(tiny_vlm.build_tiny_qwen2_vl, out_dir, "large", seed=7)


@contextlib.contextmanager
def start(model_dir: Path, log_dir: Path) -> Iterator[dict[str, CliServer]]:
    """Both servers, their start-ups overlapping; stopped on exit."""
    servers: dict[str, CliServer] = {}
    try:
        servers["generate"] = CliServer(model_dir, log_dir / "generate.log", GENERATE_FLAGS)
        servers["embedding"] = CliServer(model_dir, log_dir / "embedding.log", EMBEDDING_FLAGS)
        for server in servers.values():
            server.wait_ready(timeout=240)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def data_url(data: Any, mime: str = "image/png") -> str:
    if not isinstance(data, bytes):  # a PIL image
        buf = io.BytesIO()
        data.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode()
