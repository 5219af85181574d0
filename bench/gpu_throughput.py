"""GPU throughput of vlmserve's engine on a Qwen2-VL-2B-shaped model, against HF ``generate``.

One script for one device call. It builds the Qwen2-VL-2B-Instruct shape from its public config
values with random bf16 weights (a ``transformers.Qwen2VLForConditionalGeneration`` initialised
on the GPU, saved once with ``save_pretrained``), a byte-level BPE tokenizer whose 151,936 ids
carry Qwen2's special tokens at their real ids, Qwen2-VL-2B-Instruct's preprocessor_config.json
and a plain greedy generation_config.json; then, in the same process:

* device ceilings: a large device-to-device copy (GB/s, read + write) and an 8192^3 bf16 matmul;
* HF ``generate`` in its default mode (dynamic cache, sdpa, eager) on the first ``--hf-batch`` W1
  requests in one batch, image preprocessing included;
* workload W1 through our engine: ``--num-requests`` requests, each a distinct 448x448 PIL image +
  42 chat-like text tokens (``<|vision_start|><|image_pad|><|vision_end|>`` inside), 128 output
  tokens, greedy with EOS suppressed (``min_tokens = max_tokens``), timed from PIL images;
* batch 1: time to first token (one image, max_tokens=1, median of repeats) and decode latency
  ((total - ttft) / (n - 1) over one request of ``--batch1-tokens`` tokens);
* where the time goes: a smaller run (``--breakdown-requests``) with synchronised timers around
  the front end, image preprocessing, scheduler, input preparation, vision tower, LM forward,
  LM head, sampler and output processing, split into steps with prefill and decode-only steps;
  then torch.profiler over a few decode-only steps (kernel time by kind vs wall time);
* optionally (``--hf-compile``, if the deadline allows) HF at its best: static cache, which makes
  ``generate`` compile the forward.

Results are written after every section (so a timeout keeps what was measured) to
``$OUT/gpu_throughput.json`` when ``OUT`` is set, else ``bench/results/gpu_throughput_<card>.json``,
and a table is printed at the end. ``--tiny`` runs the same code on CPU with a tiny model shape
(for checking the script without a GPU).

    PYTHONPATH=. python bench/gpu_throughput.py [--hf-compile] [--num-requests 512 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from engine import LLM, SamplingParams

T_START = time.perf_counter()

# Qwen2 / Qwen2-VL token ids
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151654, 151655, 151656
SPECIALS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>",
}
VOCAB = 151936
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" in Qwen2's vocabulary
CHAT_HEAD = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
# "<|im_end|>\n<|im_start|>assistant\n"
CHAT_TAIL = [151645, 198, 151644, 77091, 198]

# Qwen2-VL-2B-Instruct's public config (text + vision)
TEXT_2B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, mrope_section=[16, 24, 24])
VISION_2B = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536)
TEXT_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3])
VISION_TINY = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64)

# What /work/shared/ARCHITECTURE.md records for this shape and workload on the lent H100
ARCH_BASELINES = {
    "hf_default": {"decode_ms_per_step": "56-61 (batch 1..128)", "w1_out_tok_per_s_batch128": 1862,
                   "prefill_ms_batch1": 43},
    "hf_best_static_compile": {"decode_ms_per_step_batch1": 4.8,
                               "w1_out_tok_per_s": {"64": 4995, "128": 5547, "256": 6535}},
    "vllm_0_24": {"w1_out_tok_per_s": 6741, "w1_seconds": 9.7, "batch1_decode_ms": 2.84, "batch1_ttft_ms": 49},
    "device": {"copy_GBps": 2640, "matmul_bf16_TFLOPs": 782},
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T_START


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model shape on CPU (checks the script)")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--text-tokens", type=int, default=42, help="text tokens per prompt (vision start/end included)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-async-scheduling", action="store_true", help="every engine step synchronous")
    p.add_argument("--no-warmup-w1", dest="warmup_w1", action="store_false",
                   help="skip the W1-shaped warm-up run (W1 is then the engine's first run of those shapes)")
    p.add_argument("--w1-sweep", default="", metavar="SEQS:TOKENS,...",
                   help="after W1, rerun it (fresh images) with these max_num_seqs:max_num_batched_tokens in the "
                        "same engine (created with the largest of each)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--preprocess-workers", type=int, default=None,
                   help="threads processing prompts in LLM.generate (default: the engine's, LLM.preprocess_workers)")
    p.add_argument("--w1-compare-eager-vision", action="store_true",
                   help="after W1, rerun it (fresh images) with big vision passes run eagerly (no chunk graphs)")
    p.add_argument("--w1-compare-vit-attention", choices=("sdpa", "triton"), default=None,
                   help="after W1, rerun it (fresh images) with this ViT attention kernel (VLMSERVE_VIT_ATTENTION)")
    p.add_argument("--w1-compare-vision-chunk", type=int, default=None, metavar="PATCHES",
                   help="after W1, rerun it (fresh images) with vision chunk graphs of at most PATCHES patches "
                        "(EncoderGraphCache.chunk_patches)")
    p.add_argument("--w1-compare-workers", type=int, default=None, metavar="N",
                   help="after W1, rerun it (fresh images) with N preprocessing threads (0: the calling thread)")
    p.add_argument("--batch1-tokens", type=int, default=512)
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument("--breakdown-requests", type=int, default=64)
    p.add_argument("--profile-steps", type=int, default=4, help="decode-only steps under torch.profiler (0: skip)")
    p.add_argument("--profile-requests", type=int, default=None,
                   help="requests in the profiled run (decode steps are profiled once all run; default: "
                        "--breakdown-requests)")
    p.add_argument("--hf-batch", type=int, default=64, help="W1 requests in HF's default-mode batch (0: skip HF)")
    p.add_argument("--hf-output-len", type=int, default=None, help="default: --output-len")
    p.add_argument("--hf-compile", action="store_true", help="also HF with static cache + compile, if time allows")
    p.add_argument("--hf-compile-start-by", type=float, default=330.0,
                   help="run the HF compile section only if it can start this many seconds into the script")
    p.add_argument("--skip-micro", action="store_true")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Model folder
# ---------------------------------------------------------------------------------------------


def build_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE over a 151,936-id vocabulary: the 256 byte symbols, filler words, and Qwen2's
    special tokens at their real ids (no merges: text encodes byte by byte; decoding is real)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), VOCAB):
        vocab[SPECIALS.get(i, f"\u0120w{i}")] = i  # "\u0120" is byte-level BPE's space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    ids = fast.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    assert ids == [IM_END, VISION_START, IMAGE_PAD, VISION_END], ids


def build_model_dir(out_dir: Path, tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[Any, dict]:
    """Write config + random weights (save_pretrained) + tokenizer + preprocessor config; returns
    (the HF model, still on the device, for the HF baseline; info)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_tokenizer(out_dir)
    t_tok = time.perf_counter() - t0
    text, vision = (TEXT_TINY, VISION_TINY) if tiny else (TEXT_2B, VISION_2B)
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text["num_key_value_heads"], hidden_act="silu", max_position_embeddings=32768,
            rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768,
            max_window_layers=text["num_hidden_layers"], attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": text["mrope_section"]},
            bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT, tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=vision["depth"], embed_dim=vision["embed_dim"], num_heads=vision["num_heads"], mlp_ratio=4,
            hidden_act="quick_gelu", patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            hidden_size=vision["hidden_size"],
        ),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT,
    )
    config.dtype = dtype
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT, do_sample=False)
    t0 = time.perf_counter()
    model.save_pretrained(out_dir)
    t_save = time.perf_counter() - t0
    # Qwen2-VL-2B-Instruct's preprocessor_config.json
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }, indent=2) + "\n")
    vis = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings().weight
    info = dict(
        params_total=total, params_vision=vis, params_text=total - vis,
        tied_embeddings=emb.data_ptr() == out_emb.data_ptr(), dtype=str(dtype).removeprefix("torch."),
        checkpoint_bytes=sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
        seconds=dict(tokenizer=t_tok, init_on_device=t_init, save_pretrained=t_save),
        text=text, vision=vision,
    )
    return model, info


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def random_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def chat_prompt(n_text: int, seed: int) -> list[int]:
    """Chat-like ids: system + user header, vision start / image pad / vision end, random user words,
    assistant header. ``n_text`` counts every id except the image pad."""
    n_user = n_text - len(CHAT_HEAD) - 2 - len(CHAT_TAIL)
    if n_user < 1:
        raise ValueError(f"--text-tokens must be at least {len(CHAT_HEAD) + 3 + len(CHAT_TAIL)}")
    rng = np.random.default_rng(10_000 + seed)
    user = rng.integers(1000, 100_000, n_user).tolist()
    return CHAT_HEAD + [VISION_START, IMAGE_PAD, VISION_END] + user + CHAT_TAIL


class Inputs:
    """Distinct images and prompts by index; each section takes its own range of indices."""

    def __init__(self, size: int, n_text: int) -> None:
        self.size, self.n_text = size, n_text

    def requests(self, start: int, n: int) -> list[dict]:
        return [{"prompt_token_ids": chat_prompt(self.n_text, i),
                 "multi_modal_data": {"image": random_image(self.size, i)}} for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------------------


def cuda_timed(fn, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after 3 warm-ups, by CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def bench_micro(device: torch.device) -> dict:
    timed = cuda_timed
    n = 1 << 30  # 1 Gi bf16 elements: 2 GiB each way
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 20)
    copy = 2 * n * 2 / t / 1e9
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t2 = timed(lambda: a @ b, 20)
    src = dst = a = b = None
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "copy_bytes_each_way": 2 * n, "matmul_bf16_TFLOPs": 2 * m**3 / t2 / 1e12,
            "matmul_seconds": t2, "note": "median of 20 after 3 warm-ups, CUDA events, random data"}


# ---------------------------------------------------------------------------------------------
# HF generate
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_generate(model, image_processor, reqs: list[dict], out_len: int, device: torch.device) -> tuple[float, list]:
    """One batched ``generate`` from PIL images (preprocessing included); returns (seconds, new ids)."""
    sync(device)
    t0 = time.perf_counter()
    px = image_processor(images=[r["multi_modal_data"]["image"] for r in reqs], return_tensors="pt")
    grids = px["image_grid_thw"]
    rows = []
    for r, g in zip(reqs, grids.tolist()):
        n = g[0] * g[1] * g[2] // 4
        ids = r["prompt_token_ids"]
        k = ids.index(IMAGE_PAD)
        rows.append(ids[:k] + [IMAGE_PAD] * n + ids[k + 1:])
    width = max(map(len, rows))
    ids = torch.tensor([[ENDOFTEXT] * (width - len(x)) + x for x in rows], device=device)  # left padding
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in rows], device=device)
    mm = (ids == IMAGE_PAD).long()
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=px["pixel_values"].to(device),
        image_grid_thw=grids.to(device), mm_token_type_ids=mm, do_sample=False, max_new_tokens=out_len,
        min_new_tokens=out_len, pad_token_id=ENDOFTEXT, temperature=None, top_p=None, top_k=None,
    )
    sync(device)
    dt = time.perf_counter() - t0
    return dt, out[:, width:].tolist()


# ---------------------------------------------------------------------------------------------
# Engine helpers
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def w1_llm(max_num_seqs: int, max_num_batched_tokens: int, tiny: bool = False) -> LLM:
    """The W1 engine of the profiling scripts: the Qwen2-VL-2B shape (random bf16 weights, built
    once under $TMPDIR) on CUDA, or the tiny shape on CPU (a check of the script)."""
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / ("vlmserve-qwen2vl-tiny" if tiny else "vlmserve-qwen2vl-2b")
    if not (model_dir / "config.json").exists():
        hf_model, _ = build_model_dir(model_dir, tiny, device, dtype)
        del hf_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."), device=device.type, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=0.85)


def greedy_params(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n)


class StepRecorder:
    """Host timestamps of every engine step (no synchronisation added: each step() waits for the
    tokens of the step it returns), and what that step computed. With async scheduling a call
    returns the step launched by the previous call while the next one runs."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.core_step = llm.core.step
        self.process = llm.core._process
        self.steps: list[tuple[float, float, int, int]] = []  # (start, end, tokens, requests)
        self._last = (0, 0)
        # CUDA events around every runner.launch, in launch order: how long the device runs each
        # step and how long it sits idle between steps waiting for the host (no sync added)
        self.runner = llm.core.runner
        self.launch = self.runner.launch
        self.collect = self.runner.collect
        self.events: list[tuple[Any, Any, int, int, float]] = []  # (start, end, tokens, requests, host s)
        # host seconds in the engine's calls (the rest of a step is scheduling and output handling)
        self.host: dict[str, float] = defaultdict(float)

    def __enter__(self):
        rec = self

        def process(out, result):
            rec._last = (out.num_batched_tokens, len(out.scheduled))
            return rec.process(out, result)

        def step(*args, **kwargs):
            rec._last = (0, 0)
            idle = kwargs.get("idle")
            if idle is not None:
                def timed_idle():
                    t = time.perf_counter()
                    idle()
                    rec.host["idle"] += time.perf_counter() - t
                kwargs["idle"] = timed_idle
            t0 = time.perf_counter()
            r = rec.core_step(*args, **kwargs)
            if rec._last[1]:
                rec.steps.append((t0, time.perf_counter(), *rec._last))
            return r

        def launch(sched_out, *args, **kwargs):
            t = time.perf_counter()
            if not torch.cuda.is_available():
                h = rec.launch(sched_out, *args, **kwargs)
                rec.host["launch"] += time.perf_counter() - t
                return h
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            h = rec.launch(sched_out, *args, **kwargs)
            end.record()
            dt = time.perf_counter() - t
            rec.host["launch"] += dt
            rec.events.append((start, end, sched_out.num_batched_tokens, len(sched_out.scheduled), dt))
            return h

        def collect(h):
            t = time.perf_counter()
            r = rec.collect(h)
            rec.host["collect (waits for the device)"] += time.perf_counter() - t
            return r

        self.llm.core._process = process
        self.llm.core.step = step
        self.runner.launch = launch
        self.runner.collect = collect
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.core._process
        del self.llm.core.step
        del self.runner.launch
        del self.runner.collect

    def device_summary(self) -> dict:
        """Device time per step and idle gaps between steps, from the launch events (after a sync)."""
        if not self.events:
            return {}
        torch.cuda.synchronize()
        busy = {"prefill": 0.0, "decode": 0.0}
        idle = {"prefill": 0.0, "decode": 0.0}
        trace = []
        launch = {"prefill": 0.0, "decode": 0.0}
        for i, (s, e, tok, n, host) in enumerate(self.events):
            kind = "decode" if tok == n else "prefill"
            ms = s.elapsed_time(e)
            gap = self.events[i - 1][1].elapsed_time(s) if i else 0.0
            busy[kind] += ms
            idle[kind] += max(gap, 0.0)
            launch[kind] += host
            trace.append([round(ms, 2), round(gap, 2), round(1e3 * host, 2), tok, n])
        return dict(
            note="trace, per launched step: [device ms from its first to its last kernel's end as "
                 "queued (events around runner.launch), device idle ms before it (previous step's end "
                 "event to this one's start: waiting for the host), host ms in its launch, tokens, "
                 "requests]; a step whose device ms exceeds its kernels' sum waited for its own launch",
            host_seconds_in=dict(self.host) | {f"launch ({k} steps)": v for k, v in launch.items()},
            device_busy_seconds={k: v / 1e3 for k, v in busy.items()},
            device_idle_before_step_seconds={k: v / 1e3 for k, v in idle.items()},
            trace=trace,
        )


def step_summary(steps: list[tuple[float, float, int, int]], t0: float, t_end: float, full_batch: int) -> dict:
    if not steps:
        return {}
    decode = [(e - s) for s, e, tok, n in steps if tok == n]
    mixed = [(e - s) for s, e, tok, n in steps if tok != n]
    full = [(e - s) for s, e, tok, n in steps if tok == n and n >= full_batch]
    return dict(
        steps=len(steps), steps_with_prefill=len(mixed), decode_only_steps=len(decode),
        front_end_seconds_before_first_step=steps[0][0] - t0,
        seconds_in_steps_with_prefill=sum(mixed), seconds_in_decode_only_steps=sum(decode),
        seconds_between_steps=(t_end - steps[0][0]) - sum(e - s for s, e, _, _ in steps),
        decode_only_step_ms_median=1e3 * statistics.median(decode) if decode else None,
        decode_step_ms_at_full_batch=1e3 * statistics.median(full) if full else None,
        full_batch=full_batch, full_batch_decode_steps=len(full),
        prefill_step_ms_median=1e3 * statistics.median(mixed) if mixed else None,
        max_batch=max(n for _, _, _, n in steps),
        # every step: [ms in step() (launch of the next + wait for this one), tokens, requests]
        trace=[[round(1e3 * (e - s), 2), tok, n] for s, e, tok, n in steps],
    )


def run_w1(llm: LLM, reqs: list[dict], out_len: int, full_batch: int) -> dict:
    params = greedy_params(out_len)
    with StepRecorder(llm) as rec:
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == len(reqs) * out_len, f"engine produced {n_out} tokens, expected {len(reqs) * out_len}"
    prompt_len = len(outs[0].prompt_token_ids)
    return dict(requests=len(reqs), prompt_tokens_each=prompt_len, output_tokens=n_out, seconds=dt,
                out_tok_per_s=n_out / dt, total_tok_per_s=(n_out + prompt_len * len(reqs)) / dt,
                steps=step_summary(rec.steps, t0, t0 + dt, full_batch),
                device=rec.device_summary(),
                outputs=[list(o.outputs[0].token_ids) for o in outs])


class Timers:
    """Synchronised timers wrapped around engine functions (instance attributes, removed after)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = "front end"
        self._patched: list[tuple[Any, str]] = []

    def timed(self, fn, name: str, gpu: bool = True, phase_setter=None, phase_from_result=None):
        timers = self

        def timed(*args, **kwargs):
            if phase_setter is not None:
                phase_setter(*args)
            if gpu:
                sync(timers.device)
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            if gpu:
                sync(timers.device)
            if phase_from_result is not None:
                phase_from_result(result)
            key = f"{timers.phase} | {name}"
            timers.seconds[key] += time.perf_counter() - t0
            timers.calls[key] += 1
            return result

        return timed

    def wrap(self, obj: Any, attr: str, name: str, gpu: bool = True, phase_setter=None, phase_from_result=None) -> None:
        setattr(obj, attr, self.timed(getattr(obj, attr), name, gpu, phase_setter, phase_from_result))
        self._patched.append((obj, attr))

    def unwrap(self) -> None:
        for obj, attr in reversed(self._patched):
            try:
                delattr(obj, attr)
            except AttributeError:
                pass
        self._patched.clear()


def run_breakdown(llm: LLM, reqs: list[dict], out_len: int, device: torch.device) -> dict:
    """Synchronised timers around the parts of a run; async scheduling is off meanwhile (a timer
    that waits for the GPU would serialise it anyway)."""
    core, runner = llm.core, llm.core.runner
    timers = Timers(device)
    sampler = runner.sampler
    async_was, core.async_scheduling = core.async_scheduling, False

    def set_phase(sched_out):
        timers.phase = "decode-only steps" if sched_out.num_batched_tokens == len(sched_out.scheduled) else "steps with prefill"

    timers.wrap(llm.processor, "process", "input processing total (tokens, image preprocessing, M-RoPE)", gpu=False)
    mm = llm.processor.mm_processor
    # Qwen2-VL's front end only converts / resizes / hashes; pixel_values are built on the device.
    timers.wrap(mm, "_image_u8", "image to uint8 (PIL -> resized RGB array + hash)", gpu=False)
    timers.wrap(core.scheduler, "schedule", "scheduler.schedule",
                phase_from_result=lambda out: set_phase(out) if out.scheduled else None)
    timers.wrap(core.scheduler, "update_from_output", "scheduler.update_from_output")
    timers.wrap(runner, "launch", "runner.execute total", phase_setter=set_phase)
    timers.wrap(runner, "prepare", "runner.prepare (host arrays + H2D)")
    timers.wrap(runner, "_merge_multimodal", "embed + merge (incl. vision tower)")
    timers.wrap(runner.mm_preprocessor, "prepare", "device preprocessing (H2D, uint8 -> pixel_values)")
    timers.wrap(runner.model, "embed_multimodal", "vision tower")
    timers.wrap(runner.model, "forward", "LM forward (28 layers)")
    timers.wrap(runner.model, "compute_logits", "LM head (logits)")
    timers.wrap(sampler, "sample", "sampler")
    timers.wrap(llm.output_processor, "process", "output processing (detokenise)", gpu=False)
    timers.wrap(core, "step", "engine step total")

    try:
        timers.phase = "front end"
        t0 = time.perf_counter()
        outs = llm.generate(reqs, greedy_params(out_len), use_tqdm=False)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        timers.unwrap()
        core.async_scheduling = async_was
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    rows = {k: {"seconds": v, "calls": timers.calls[k], "ms_per_call": 1e3 * v / max(1, timers.calls[k]),
                "share_of_total": v / total} for k, v in sorted(timers.seconds.items())}
    # derived: what is not inside the named parts
    derived = {}
    for phase in ("steps with prefill", "decode-only steps"):
        ex = rows.get(f"{phase} | runner.execute total", {}).get("seconds", 0.0)
        parts = sum(rows.get(f"{phase} | {n}", {}).get("seconds", 0.0) for n in (
            "runner.prepare (host arrays + H2D)", "embed + merge (incl. vision tower)", "LM forward (28 layers)",
            "LM head (logits)", "sampler"))
        derived[f"{phase} | runner.execute other (python between parts)"] = ex - parts
        merge = rows.get(f"{phase} | embed + merge (incl. vision tower)", {}).get("seconds", 0.0)
        vis = rows.get(f"{phase} | vision tower", {}).get("seconds", 0.0)
        derived[f"{phase} | embed + merge excluding vision tower"] = merge - vis
    steps = sum(v for k, v in timers.seconds.items() if k.endswith("| engine step total"))
    derived["LLM.generate outside engine steps (front end + output loop)"] = total - steps
    return dict(requests=len(reqs), output_tokens=n_out, seconds=total, out_tok_per_s=n_out / total,
                note="every timer synchronises the GPU before and after, so GPU work is attributed to the part "
                     "that launched it; the run is slower than an untimed one",
                parts=rows, derived_seconds=derived)


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("_decode_kernel", "_decode_reduce", "_prefill_kernel", "_write_kv")):
        return "paged attention + KV write (Triton)"
    if any(s in n for s in ("flash", "fmha", "efficient_attention", "cudnn", "attention")):
        return "SDPA (vision attention)"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul", "splitk")):
        return "GEMM"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if "reduce" in n or "argmax" in n or "max" in n:
        return "reductions (argmax, norms)"
    return "elementwise / other"


class _Done:
    """A step already collected (the profiler wraps launch + collect in one call)."""

    token_ids = None

    def __init__(self, result: Any) -> None:
        self.result = result


def run_profile(llm: LLM, reqs: list[dict], out_len: int, n_steps: int, device: torch.device) -> dict:
    """torch.profiler over ``n_steps`` decode-only runner.execute calls (and the first prefill one)."""
    from torch.profiler import ProfilerActivity, profile

    runner = llm.core.runner
    orig_launch, orig_collect = runner.launch, runner.collect

    def execute(sched_out):  # launch + collect: async scheduling is off while profiling
        return orig_collect(orig_launch(sched_out))

    async_was, llm.core.async_scheduling = llm.core.async_scheduling, False
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    state = {"decode": 0, "prefill": 0}
    captures: dict[str, list] = {"decode": [], "prefill": []}

    def profiled(sched_out, prev=None):
        kind = "decode" if sched_out.num_batched_tokens == len(sched_out.scheduled) else "prefill"
        limit = n_steps if kind == "decode" else 1
        # profile decode steps only once the batch is at its largest (every request admitted)
        if state[kind] >= limit or (kind == "decode" and len(sched_out.scheduled) < len(reqs)):
            return execute(sched_out)
        state[kind] += 1
        sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            result = execute(sched_out)
            sync(device)
            wall = time.perf_counter() - t0
        captures[kind].append((prof, wall, sched_out.num_batched_tokens, len(sched_out.scheduled)))
        return result

    runner.launch = lambda sched_out, prev=None: _Done(profiled(sched_out))
    runner.collect = lambda h: h.result if isinstance(h, _Done) else orig_collect(h)
    try:
        llm.generate(reqs, greedy_params(out_len), use_tqdm=False)
    finally:
        del runner.launch, runner.collect
        llm.core.async_scheduling = async_was
    result = {}
    for kind, caps in captures.items():
        if not caps:
            continue
        by_cat: dict[str, float] = defaultdict(float)
        by_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
        launches = 0
        for prof, _, _, _ in caps:
            for e in prof.events():
                if e.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                t = float(getattr(e, "device_time", 0.0) or 0.0) / 1e3  # us -> ms
                by_cat[kernel_category(e.name)] += t
                by_kernel[e.name][0] += t
                by_kernel[e.name][1] += 1
                launches += 1
        k = len(caps)
        wall = sum(c[1] for c in caps) * 1e3 / k
        gpu = sum(by_cat.values()) / k
        top = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:15]
        result[kind] = dict(
            steps_profiled=k, tokens_per_step=caps[0][2], requests_per_step=caps[0][3],
            wall_ms_per_step=wall, kernel_ms_per_step=gpu, gpu_busy_fraction=gpu / wall if wall else None,
            kernel_launches_per_step=launches / k,
            kernel_ms_per_step_by_category={c: v / k for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            top_kernels=[{"name": n[:120], "ms_per_step": v[0] / k, "calls_per_step": v[1] / k} for n, v in top],
            note="wall includes the profiler's own overhead on the host",
        )
    return result


def launch_overhead(llm: LLM, device: torch.device) -> dict:
    """Host cost of one launch, GPU idle: a 1-element torch op, a small cuBLAS linear, and the engine's
    Triton KV write for one token (into the null block 0), each timed over many back-to-back calls."""
    runner = llm.core.runner

    def per_call(fn, n: int) -> float:
        for _ in range(20):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / n * 1e6

    x = torch.zeros(1, device=device)
    h = torch.randn(1, 1536, dtype=torch.bfloat16, device=device)
    w = torch.randn(1536, 1536, dtype=torch.bfloat16, device=device)
    kv = runner.kv_caches[0]
    hk = runner.model.num_kv_heads
    k = torch.randn(1, hk, runner.model.head_dim, dtype=kv.dtype, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    s = 0
    for i in range(1_000_000):
        s += i
    py_loop = (time.perf_counter() - t0) * 1e3
    return {"torch_add_us": per_call(lambda: x.add_(1), 2000),
            "torch_linear_1x1536x1536_us": per_call(lambda: torch.nn.functional.linear(h, w), 2000),
            "triton_write_kv_1_token_us": per_call(lambda: runner.backend.write_kv(k, k, kv, slot), 1000),
            "python_loop_1e6_adds_ms": py_loop,
            "note": "host time per call with the GPU otherwise idle (launch-bound)"}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = total = first = 0
    for x, y in zip(a, b):
        total += len(x)
        first += int(bool(x) and bool(y) and x[0] == y[0])
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return {"pairs": min(len(a), len(b)), "first_token_match": first / max(1, min(len(a), len(b))),
            "positions_before_first_divergence": same / total if total else 1.0}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
        dtype = torch.float32
        if args.image_size == 448:
            args.image_size = 112
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --tiny for a CPU check)")
        device = torch.device("cuda")
        dtype = torch.bfloat16
    hf_out_len = args.hf_output_len or args.output_len
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    short = "h200" if "H200" in card else "h100" if "H100" in card else ("cpu" if device.type == "cpu" else "gpu")
    if args.out is None:
        out_env = os.environ.get("OUT")
        args.out = (Path(out_env) / "gpu_throughput.json") if out_env else (
            REPO_ROOT / "bench" / "results" / f"gpu_throughput_{short}.json")
    model_dir = args.model_dir or Path(os.environ.get("TMPDIR", "/tmp")) / ("vlmserve-qwen2vl-tiny" if args.tiny else "vlmserve-qwen2vl-2b")
    torch.manual_seed(args.seed)

    result: dict[str, Any] = dict(
        benchmark="gpu_throughput", device=card, device_kind=short, torch=torch.__version__,
        transformers=transformers.__version__, python=platform.python_version(),
        cuda=torch.version.cuda, cpu_count=os.cpu_count(),
        workload=dict(name="W1", requests=args.num_requests, image=f"{args.image_size}x{args.image_size} distinct PIL",
                      text_tokens=args.text_tokens, output_len=args.output_len, greedy=True,
                      eos="suppressed (min_tokens=max_tokens; HF min_new_tokens=max_new_tokens)",
                      timing="from PIL images: image preprocessing included"),
        engine_args=dict(dtype=str(dtype).removeprefix("torch."), device=device.type, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         async_scheduling=not args.no_async_scheduling),
        environment={k: os.environ[k] for k in ("VLMSERVE_VIT_ATTENTION", "VLMSERVE_FUSED_KERNELS") if k in os.environ},
        architecture_md_baselines=ARCH_BASELINES, sections_seconds={}, errors={},
    )
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    def section(name: str):
        class _S:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()
                log(f"== {name}")

            def __exit__(self_inner, et, ev, tb):
                result["sections_seconds"][name] = time.perf_counter() - self_inner.t0
                if et is not None:
                    import traceback

                    result["errors"][name] = "".join(traceback.format_exception(et, ev, tb))[-3000:]
                    log(f"!! {name} failed: {et.__name__}: {ev}")
                save()
                return et is not None and name not in ("build", "engine init")  # build/init failures are fatal
        return _S()

    inputs = Inputs(args.image_size, args.text_tokens)
    # index ranges of distinct inputs: W1 [0, N), batch-1 [1e6...), breakdown [2e6...), warm-up [3e6...)
    w1 = inputs.requests(0, args.num_requests)
    log(f"device {card}; {len(w1)} W1 requests built")

    # -- device ceilings ----------------------------------------------------------------------
    if device.type == "cuda" and not args.skip_micro:
        with section("micro"):
            result["micro"] = bench_micro(device)
            log(f"copy {result['micro']['copy_GBps']:.0f} GB/s, matmul {result['micro']['matmul_bf16_TFLOPs']:.0f} TFLOP/s")

    # -- model folder -------------------------------------------------------------------------
    with section("build"):
        hf_model, info = build_model_dir(model_dir, args.tiny, device, dtype)
        result["model"] = info
        log(f"model: {info['params_total'] / 1e9:.3f} B params ({info['params_vision'] / 1e9:.3f} B vision), "
            f"{info['checkpoint_bytes'] / 1e9:.2f} GB on disk, {info['seconds']}")

    # -- HF default ---------------------------------------------------------------------------
    hf_outputs = None
    if args.hf_batch > 0:
        with section("hf default"):
            from transformers import AutoImageProcessor

            ip = AutoImageProcessor.from_pretrained(model_dir)
            result.setdefault("image_processor_class", {})["hf"] = f"{type(ip).__module__}.{type(ip).__name__}"
            hf_generate(hf_model, ip, inputs.requests(3_000_000, 2), 4, device)  # warm-up
            hf_reqs = w1[: args.hf_batch]
            dt, hf_outputs = hf_generate(hf_model, ip, hf_reqs, hf_out_len, device)
            n = len(hf_reqs) * hf_out_len
            assert sum(map(len, hf_outputs)) == n
            result["hf_default"] = dict(mode="default (DynamicCache, sdpa, eager; no compile)", batch=len(hf_reqs),
                                output_len=hf_out_len, seconds=dt, w1_out_tok_per_s=n / dt,
                                note="one batched generate over the first W1 requests, image preprocessing included")
            log(f"HF default: batch {len(hf_reqs)}: {dt:.2f} s, {n / dt:.0f} out tok/s")

    # -- our engine ---------------------------------------------------------------------------
    with section("engine init"):
        t0 = time.perf_counter()
        sweep = [tuple(int(v) for v in item.split(":")) for item in args.w1_sweep.split(",") if item]
        llm = LLM(str(model_dir), dtype=str(dtype).removeprefix("torch."), device=device.type,
                  max_num_seqs=max([args.max_num_seqs] + [a for a, _ in sweep]),
                  max_num_batched_tokens=max([args.max_num_batched_tokens] + [b for _, b in sweep]),
                  gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                  async_scheduling=not args.no_async_scheduling)
        if args.preprocess_workers is not None:
            llm.preprocess_workers = args.preprocess_workers
        if sweep:  # the engine is sized for the sweep's largest; W1 itself runs with the arguments
            import dataclasses

            llm.core.scheduler.config = dataclasses.replace(
                llm.core.scheduler.config, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
        eng = result["engine"] = dict(
            init_seconds=time.perf_counter() - t0, attention_backend=llm.core.runner.backend.name,
            num_kv_blocks=llm.core.runner.num_blocks, block_size=llm.config.cache.block_size,
            max_model_len=llm.config.scheduler.max_model_len)
        ip_e = llm.processor.mm_processor.image_processor
        result.setdefault("image_processor_class", {})["engine"] = f"{type(ip_e).__module__}.{type(ip_e).__name__}"
        log(f"engine up in {eng['init_seconds']:.1f} s: {eng['num_kv_blocks']} KV blocks, backend {eng['attention_backend']}, "
            f"image processor {result['image_processor_class']['engine']}")
        if device.type == "cuda":
            eng["gpu_memory_allocated_GB_after_init"] = torch.cuda.memory_allocated() / 1e9

    if device.type == "cuda":
        with section("launch overhead"):
            result["launch_overhead"] = launch_overhead(llm, device)
            log(f"launch overhead: {result['launch_overhead']}")

    with section("engine warm-up"):
        llm.generate(inputs.requests(3_000_100, 8), greedy_params(4), use_tqdm=False)
        # a decode step at a large batch (kernels specialise on the batch's split count)
        big = min(args.max_num_seqs, 200 if not args.tiny else 16)
        rng = np.random.default_rng(1)
        llm.generate([{"prompt_token_ids": rng.integers(1000, 100000, 16).tolist()} for _ in range(big)],
                     greedy_params(3), use_tqdm=False)
        if args.warmup_w1:
            # One W1-shaped run with other images first: the first run meets every vision-pass
            # shape for the first time (cuDNN attention plans, cuBLAS heuristics, Triton configs)
            # and is slower; its figure is kept as w1_first_run.
            r = run_w1(llm, inputs.requests(7_000_000, args.num_requests), args.output_len, args.max_num_seqs)
            r.pop("outputs")
            eng["w1_first_run"] = r
            log(f"W1-shaped warm-up run (first run): {r['seconds']:.2f} s, {r['out_tok_per_s']:.0f} out tok/s")

    with section("engine W1"):
        r = run_w1(llm, w1, args.output_len, args.max_num_seqs)
        eng_outputs = r.pop("outputs")
        eng.update(w1_out_tok_per_s=r["out_tok_per_s"], w1=r)
        log(f"engine W1: {r['requests']} requests, {r['seconds']:.2f} s, {r['out_tok_per_s']:.0f} out tok/s; "
            f"steps {json.dumps({k: v for k, v in r['steps'].items() if k != 'trace'})}")
        if r.get("device"):
            log(f"engine W1 device: {json.dumps({k: v for k, v in r['device'].items() if k not in ('trace', 'note')})}")
        if hf_outputs is not None:
            result["greedy_agreement_engine_vs_hf_default"] = agreement(eng_outputs[: len(hf_outputs)], hf_outputs)
            log(f"agreement with HF: {result['greedy_agreement_engine_vs_hf_default']}")

    def rerun_w1(obj: Any, attr: str, value: Any, start: int, key: str, what: str, warm: bool = False) -> None:
        """W1 again (fresh images) with ``obj.attr = value``, restored after; recorded as eng[key].
        ``warm``: one untimed W1 first, for a change that captures new CUDA graphs (or compiles
        kernels) on first use, which the W1 it is compared with had done in its warm-up."""
        kept = getattr(obj, attr)
        setattr(obj, attr, value)
        try:
            if warm:
                run_w1(llm, inputs.requests(start + 50_000, args.num_requests), args.output_len, args.max_num_seqs)
            r = run_w1(llm, inputs.requests(start, args.num_requests), args.output_len, args.max_num_seqs)
        finally:
            setattr(obj, attr, kept)
        r.pop("outputs")
        eng[key] = r
        dev = {k: v for k, v in r["device"].items() if k not in ("trace", "note")}
        log(f"W1 with {what} (W1 above: {attr}={kept}): {r['seconds']:.2f} s, {r['out_tok_per_s']:.0f} out tok/s; "
            f"device {json.dumps(dev)}")

    vis = getattr(llm.core.runner.model, "visual_runner", None)
    if args.w1_compare_eager_vision and vis is not None:
        with section("engine W1, big vision passes eager"):
            rerun_w1(vis, "chunk_patches", 0, 5_500_000, "w1_big_vision_passes_eager", "big vision passes eager")
    if args.w1_compare_vit_attention is not None:
        with section("engine W1, other ViT attention kernel"):
            from kernels import fused_ops

            class _Choice:  # rerun_w1's obj / attr: the kernel choice, vision graphs dropped on each change
                @property
                def kernel(self) -> str:
                    return fused_ops.vit_attention_choice()

                @kernel.setter
                def kernel(self, value: str) -> None:
                    fused_ops.set_vit_attention(value)
                    if vis is not None:
                        vis.clear()

            choice = args.w1_compare_vit_attention
            rerun_w1(_Choice(), "kernel", choice, 5_700_000, f"w1_vit_attention_{choice}", f"ViT attention by {choice}",
                     warm=True)
    if args.w1_compare_vision_chunk is not None and vis is not None:
        with section("engine W1, other vision chunk size"):
            n = args.w1_compare_vision_chunk
            rerun_w1(vis, "chunk_patches", n, 5_600_000, f"w1_vision_chunk_{n}", f"vision chunks of {n} patches",
                     warm=True)

    if args.w1_compare_workers is not None:
        with section("engine W1, other preprocessing threads"):
            eng["w1_preprocess_workers"] = llm.preprocess_workers
            rerun_w1(llm, "preprocess_workers", args.w1_compare_workers, 5_000_000,
                     f"w1_with_{args.w1_compare_workers}_preprocess_workers",
                     f"{args.w1_compare_workers} preprocessing threads")

    if sweep:
        with section("engine W1 sweep"):
            base = llm.core.scheduler.config
            eng["w1_sweep"] = []
            try:
                for k, (seqs, tokens) in enumerate(sweep):
                    llm.core.scheduler.config = dataclasses.replace(base, max_num_seqs=seqs, max_num_batched_tokens=tokens)
                    r = run_w1(llm, inputs.requests(4_000_000 + 10_000 * k, args.num_requests), args.output_len, seqs)
                    r.pop("outputs")
                    eng["w1_sweep"].append(dict(max_num_seqs=seqs, max_num_batched_tokens=tokens, **r))
                    log(f"W1 sweep {seqs}:{tokens}: {r['seconds']:.2f} s, {r['out_tok_per_s']:.0f} out tok/s; "
                        f"steps {json.dumps({k: v for k, v in r['steps'].items() if k != 'trace'})}")
            finally:
                llm.core.scheduler.config = base

    with section("engine batch 1"):
        ttfts = []
        for i in range(args.ttft_repeats + 1):
            req = inputs.requests(1_000_000 + i, 1)
            sync(device)
            t0 = time.perf_counter()
            llm.generate(req, greedy_params(1), use_tqdm=False)
            ttfts.append(time.perf_counter() - t0)
        ttfts = ttfts[1:]  # the first is a warm-up
        req = inputs.requests(1_000_100, 1)
        n = args.batch1_tokens
        with StepRecorder(llm) as rec:
            t0 = time.perf_counter()
            out = llm.generate(req, greedy_params(n), use_tqdm=False)
            total = time.perf_counter() - t0
        assert len(out[0].outputs[0].token_ids) == n
        ttft_in_run = rec.steps[0][1] - t0
        decode = (total - ttft_in_run) / (n - 1)
        step_ms = [1e3 * (e - s) for s, e, _, _ in rec.steps[1:]]
        eng.update(batch1_ttft_ms=1e3 * statistics.median(ttfts), batch1_ttft_all_ms=[1e3 * t for t in ttfts],
                   batch1_decode_ms=1e3 * decode, batch1_total_seconds=total, batch1_output_tokens=n,
                   batch1_ttft_in_decode_run_ms=1e3 * ttft_in_run,
                   batch1_decode_step_ms_median_inside_step=statistics.median(step_ms) if step_ms else None)
        log(f"batch 1: TTFT {eng['batch1_ttft_ms']:.1f} ms (median of {len(ttfts)}), decode {eng['batch1_decode_ms']:.2f} ms/step")
        if llm.core.async_scheduling:
            # the same decode with every step synchronous: what async scheduling buys, same process
            llm.core.async_scheduling = False
            try:
                t0 = time.perf_counter()
                llm.generate(inputs.requests(1_000_200, 1), greedy_params(n), use_tqdm=False)
                total_sync = time.perf_counter() - t0
            finally:
                llm.core.async_scheduling = True
            eng["batch1_decode_ms_async_off"] = 1e3 * (total_sync - ttft_in_run) / (n - 1)
            log(f"batch 1 decode with async scheduling off: {eng['batch1_decode_ms_async_off']:.2f} ms/step")

    with section("engine breakdown"):
        bd = run_breakdown(llm, inputs.requests(2_000_000, args.breakdown_requests), args.output_len, device)
        result["breakdown"] = bd
        log(f"breakdown run: {bd['seconds']:.2f} s ({bd['out_tok_per_s']:.0f} out tok/s with timers)")
        # batch-1 decode breakdown (64 tokens)
        bd1 = run_breakdown(llm, inputs.requests(2_100_000, 1), 64, device)
        result["breakdown_batch1"] = bd1

    if args.profile_steps > 0 and device.type == "cuda":
        with section("engine profile"):
            result["profile"] = run_profile(llm, inputs.requests(2_200_000, args.profile_requests or args.breakdown_requests),
                                            max(8, min(args.output_len, 24)), args.profile_steps, device)
            for kind, p in result["profile"].items():
                log(f"profile {kind}: wall {p['wall_ms_per_step']:.2f} ms, kernels {p['kernel_ms_per_step']:.2f} ms, "
                    f"{p['kernel_launches_per_step']:.0f} launches/step")
            # batch-1 decode, profiled too
            p1 = run_profile(llm, inputs.requests(2_300_000, 1), 16, args.profile_steps, device)
            if "decode" in p1:
                result["profile_batch1_decode"] = p1["decode"]

    # -- HF at its best (optional) ------------------------------------------------------------
    if args.hf_compile and args.hf_batch > 0:
        if elapsed() > args.hf_compile_start_by:
            result["hf"] = {"skipped": f"{elapsed():.0f} s in, past --hf-compile-start-by {args.hf_compile_start_by}"}
            save()
        else:
            with section("hf static+compile"):
                llm.core.runner.kv_caches.clear()
                del llm
                gc.collect()
                torch.cuda.empty_cache()
                from transformers import AutoImageProcessor

                ip = AutoImageProcessor.from_pretrained(model_dir)
                hf_model.generation_config.cache_implementation = "static"
                hf_reqs = w1[: args.hf_batch]
                dt1, _ = hf_generate(hf_model, ip, hf_reqs, hf_out_len, device)  # compiles
                log(f"HF static+compile first call (compiles): {dt1:.1f} s")
                dt, _ = hf_generate(hf_model, ip, hf_reqs, hf_out_len, device)
                n = len(hf_reqs) * hf_out_len
                result["hf"] = dict(mode="static cache + compile (generation_config.cache_implementation='static')",
                                         batch=len(hf_reqs), output_len=hf_out_len, first_call_seconds=dt1,
                                         seconds=dt, w1_out_tok_per_s=n / dt)
                log(f"HF static+compile: batch {len(hf_reqs)}: {dt:.2f} s, {n / dt:.0f} out tok/s")

    result["total_seconds"] = elapsed()
    save()
    print_table(result)
    log(f"wrote {args.out}")
    return 0


_PHASES = ["front end", "steps with prefill", "decode-only steps"]
_PARTS = ["input processing total", "image to uint8", "engine step total", "scheduler.schedule", "runner.execute total",
          "runner.prepare", "embed + merge", "device preprocessing", "vision tower", "LM forward", "LM head", "sampler",
          "scheduler.update_from_output", "output processing"]


def _part_order(key: str) -> tuple[int, int]:
    phase, _, part = key.partition(" | ")
    pi = _PHASES.index(phase) if phase in _PHASES else len(_PHASES)
    qi = next((i for i, p in enumerate(_PARTS) if part.startswith(p)), len(_PARTS))
    return pi, qi


def print_table(r: dict) -> None:
    eng, hf, best = r.get("engine", {}), r.get("hf_default", {}), r.get("hf", {})
    v = ARCH_BASELINES["vllm_0_24"]
    hb = ARCH_BASELINES["hf_best_static_compile"]

    def f(x, spec=".0f"):
        return format(x, spec) if isinstance(x, (int, float)) else "-"

    print(f"\n## Qwen2-VL-2B shape, random bf16 weights, on {r['device']} (torch {r['torch']}, "
          f"transformers {r['transformers']})\n")
    print("| system | W1 out tok/s | batch | batch-1 decode ms/step | batch-1 TTFT ms |")
    print("|---|---:|---:|---:|---:|")
    w1 = eng.get("w1", {})
    print(f"| vlmserve engine (this run) | {f(eng.get('w1_out_tok_per_s'))} | {w1.get('requests', '-')} reqs, "
          f"max_num_seqs {r['engine_args']['max_num_seqs']} | {f(eng.get('batch1_decode_ms'), '.2f')} | "
          f"{f(eng.get('batch1_ttft_ms'), '.1f')} |")
    if hf:
        print(f"| HF generate, default mode (this run) | {f(hf.get('w1_out_tok_per_s'))} | {hf.get('batch')} | - | - |")
    if best.get("w1_out_tok_per_s"):
        print(f"| HF generate, static cache + compile (this run) | {f(best['w1_out_tok_per_s'])} | {best['batch']} | - | - |")
    print("| HF default (ARCHITECTURE.md) | 1862 | 128 | 56-61 | - |")
    print(f"| HF static+compile (ARCHITECTURE.md) | {hb['w1_out_tok_per_s']['64']} / {hb['w1_out_tok_per_s']['128']} / "
          f"{hb['w1_out_tok_per_s']['256']} | 64 / 128 / 256 | 4.8 | - |")
    print(f"| vLLM 0.24 (ARCHITECTURE.md) | {v['w1_out_tok_per_s']} | 512 reqs | {v['batch1_decode_ms']} | {v['batch1_ttft_ms']} |")
    lo = r.get("launch_overhead")
    if lo:
        print(f"host cost per launch: torch add {lo['torch_add_us']:.1f} us, small linear "
              f"{lo['torch_linear_1x1536x1536_us']:.1f} us, Triton write_kv {lo['triton_write_kv_1_token_us']:.1f} us; "
              f"python 1e6-add loop {lo['python_loop_1e6_adds_ms']:.0f} ms")
    m = r.get("micro")
    if m:
        print(f"\ndevice: copy {m['copy_GBps']:.0f} GB/s (ARCHITECTURE.md 2640), bf16 matmul {m['matmul_bf16_TFLOPs']:.0f} "
              f"TFLOP/s (782)")
    s = w1.get("steps", {})
    if s:
        print(f"W1 steps: {s.get('steps')} ({s.get('steps_with_prefill')} with prefill), front end before first step "
              f"{f(s.get('front_end_seconds_before_first_step'), '.2f')} s, in prefill steps "
              f"{f(s.get('seconds_in_steps_with_prefill'), '.2f')} s, in decode-only steps "
              f"{f(s.get('seconds_in_decode_only_steps'), '.2f')} s, decode step at batch {s.get('full_batch')}: "
              f"{f(s.get('decode_step_ms_at_full_batch'), '.2f')} ms")
    bd = r.get("breakdown")
    if bd:
        print(f"\n### where the time goes ({bd['requests']} requests x {bd['output_tokens'] // max(1, bd['requests'])} "
              f"tokens, synchronised timers; {bd['seconds']:.2f} s total)\n")
        print("| phase \\| part | seconds | calls | ms/call | share |")
        print("|---|---:|---:|---:|---:|")
        for k, row in sorted(bd["parts"].items(), key=lambda kv: _part_order(kv[0])):
            print(f"| {k} | {row['seconds']:.3f} | {row['calls']} | {row['ms_per_call']:.2f} | {row['share_of_total']:.1%} |")
        for k, sec in bd["derived_seconds"].items():
            print(f"| {k} (derived) | {sec:.3f} | | | {sec / bd['seconds']:.1%} |")
    b1 = r.get("breakdown_batch1")
    if b1:
        parts = {k.split(" | ", 1)[1]: v for k, v in b1["parts"].items() if k.startswith("decode-only steps | ")}
        print("\nbatch-1 decode step, ms per call (synchronised timers): " + ", ".join(
            f"{k} {v['ms_per_call']:.2f}" for k, v in sorted(parts.items(), key=lambda kv: _part_order("x | " + kv[0]))))
    for key in ("profile",):
        for kind, p in r.get(key, {}).items():
            print(f"\nprofile, {kind} step ({p['requests_per_step']} reqs, {p['tokens_per_step']} tokens): wall "
                  f"{p['wall_ms_per_step']:.2f} ms, kernels {p['kernel_ms_per_step']:.2f} ms "
                  f"({f(p['gpu_busy_fraction'], '.0%')} busy), {p['kernel_launches_per_step']:.0f} launches; "
                  + ", ".join(f"{c} {ms:.2f}" for c, ms in p["kernel_ms_per_step_by_category"].items()))
    p1 = r.get("profile_batch1_decode")
    if p1:
        print(f"profile, batch-1 decode: wall {p1['wall_ms_per_step']:.2f} ms, kernels {p1['kernel_ms_per_step']:.2f} ms, "
              f"{p1['kernel_launches_per_step']:.0f} launches; "
              + ", ".join(f"{c} {ms:.2f}" for c, ms in p1["kernel_ms_per_step_by_category"].items()))
    if r.get("errors"):
        print("\nerrors in sections: " + ", ".join(r["errors"]))


if __name__ == "__main__":
    sys.exit(main())
