"""Start-up warm-up of the vision path, so that the first burst of image traffic runs at full speed.

Decode-step and small-prefill CUDA graphs are captured when the model runner starts, but a vision
tower's graphs are keyed by the images of each pass (``engine.cuda_graphs.EncoderGraphCache``):
without this, the first requests of each image size and batch pay for the captures (and for the
kernels' first compilations) while users wait. Measured on an H200 before this existed: the first
offline W1 after start ran at 11.1k output tok/s, a warm one at 21.7k.

``warm_up_vision(core)`` runs, for each configured image size, steps that hold 1, 2, ... k
requests with one image each (k: as many as one step's token budget takes), so that every pass
of up to k images of that size has been captured; then one burst of ``max_num_seqs`` requests
with text around the image, decoding until the last of them is prefilled, so that prefills cut
across steps and steps that mix prefill with up to ``max_num_seqs`` decodes have run too. (On an
H200 the first offline W1 after start, with the sweep alone, still had two steps of 1.9 s and
1.5 s against 0.2 s warm; with a burst of 2k, one of 1.2 s, in a step of 191 sequences: kernels
compiled for the batch shapes of a full engine.) Each image is distinct noise, so no
prefix or encoder cache hit skips the tower. It runs inside ``EngineCore.__init__``: the offline ``LLM``
and the server's engine core are warm before they return / report ready. Only where vision graphs
are used (CUDA, not ``enforce_eager``); a no-op elsewhere.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def _noise_image(height: int, width: int, seed: int) -> Any:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def warm_up_vision(core: Any) -> None:
    """Capture the vision graphs of ``core.config.model.warmup_image_sizes`` (see module doc)."""
    config = core.config
    sizes = config.model.warmup_image_sizes
    if not sizes or getattr(core.runner.model, "visual_runner", None) is None:
        return
    from engine.processor import InputProcessor, load_tokenizer

    processor = InputProcessor(config, load_tokenizer(config))
    mm = processor.mm_processor
    if mm is None or not mm.image_placeholder_text:
        return
    t0, seed, requests = time.perf_counter(), 0, 0
    for height, width in sizes:

        def request(i: int, text: str = "", max_tokens: int = 1) -> Any:
            prompt = {"prompt": text + mm.image_placeholder_text + text,
                      "multi_modal_data": {"image": [_noise_image(height, width, i)]}}
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            return processor.process(f"vlmserve-warmup-{i}", prompt, params)[1]

        first = request(seed)
        tokens = len(first.prompt_token_ids)
        sched = config.scheduler
        most = max(1, min(sched.max_num_seqs, sched.max_num_batched_tokens // tokens))
        # batch k takes seeds seed + k(k-1)/2 ... + k - 1: every image distinct
        batches = [[first] if k == 1 else [request(seed + k * (k - 1) // 2 + j) for j in range(k)]
                   for k in range(1, most + 1)]
        seed += most * (most + 1) // 2
        burst, steps = sched.max_num_seqs, -(-sched.max_num_seqs // most)  # prefill steps of the burst
        text = " Describe the picture in a few words."
        batches.append([request(seed + j, text, steps + 2) for j in range(burst)])
        seed += burst
        for batch in batches:
            for req in batch:
                core.add_request(req)
            while core.has_unfinished():
                core.step()
            requests += len(batch)
    core.block_manager.reset_prefix_cache()  # the noise will never be asked for again
    core.block_manager.num_queried_tokens = core.block_manager.num_hit_tokens = 0
    logger.info("vision warm-up: %d requests of sizes %s in %.1f s", requests,
                ", ".join(f"{h}x{w}" for h, w in sizes), time.perf_counter() - t0)
