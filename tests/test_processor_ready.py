"""The first image request after start-up must not pay for loading the image processor.

The model folder's image-processor config, and the transformers modules it imports (torch._dynamo
among them: seconds on a busy CPU), used to load on the first image request; on an H200 that made
the first offline W1 run after start-up ~30% slower than the next, and the server's first burst
of image requests waited behind it. A fresh interpreter shows what construction alone loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_llava import build_tiny_llava
from tiny_vlm import build_tiny_qwen2_vl

REPO = Path(__file__).resolve().parents[1]

# What an API process builds before it serves (AsyncLLM.__init__, without the engine core).
PROBE = """
import json, sys
from engine.config import EngineArgs
from engine.processor import InputProcessor, load_tokenizer
config = EngineArgs(model=sys.argv[1], dtype="float32", device="cpu", max_model_len=512).create_engine_config()
InputProcessor(config, load_tokenizer(config))
print(json.dumps({"image_processing_auto": "transformers.models.auto.image_processing_auto" in sys.modules}))
"""


@pytest.mark.parametrize("builder", [build_tiny_qwen2_vl, build_tiny_llava], ids=["qwen2_vl", "llava"])
def test_image_processor_loaded_at_construction(builder, tmp_path) -> None:
    model_dir = builder(tmp_path / "model")
    out = subprocess.run([sys.executable, "-c", PROBE, str(model_dir)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"image_processing_auto": True}
