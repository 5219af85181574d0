"""Train ``vlmserve-demo``: a tiny Qwen2-VL that answers questions about synthetic pictures.

    nice -n 10 python scripts/train_demo_vlm.py --out runtime/vlmserve-demo --seed 0

(the shipped checkpoint: these defaults, 3000 vision-only steps then 1200 steps, ~15 min on 1 thread)

The pictures and questions come from ``runtime.demo_pictures`` (shapes in named colours, one to
four per picture). The model is transformers' ``Qwen2VLForConditionalGeneration`` with a small
config, our own byte-level BPE tokenizer (trained here on the question/answer vocabulary) and
Qwen2-VL's chat template; images go through the real HF image processor
(``Qwen2VLImageProcessorPil``) with small min/max pixels, exactly as the engine and HF will
preprocess them at inference. It trains on CPU in fp32 and is deterministic given ``--seed`` and
the thread count (float reductions may depend on how work is split between threads).

Written to ``--out``: config.json, model.safetensors, tokenizer files with the chat template,
preprocessor_config.json, generation_config.json and training.json (arguments, time, the
teacher-forced accuracy of the last evaluation). The model card (README.md) is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from runtime.demo_model import train_tokenizer_with_special_tokens  # noqa: E402
from runtime.demo_pictures import COLORS, KINDS, NUMBERS, POSITIONS, QUESTIONS, SHAPES, make_example  # noqa: E402

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The model sees pictures of 56 x 56 to 112 x 112 pixels' area (2 x 2 to 4 x 4 image tokens of
# 28 x 28 px for a square picture): small enough to train in minutes on a CPU. At 84 x 84 at most
# shapes were learnt far more slowly than colours (a shape was then 2-3 patches of 14 px across).
# --patch-size / --min-pixels / --max-pixels try other resolutions (the engine reads all three from
# the checkpoint); patch 7 at <= 84 x 84 px was no faster to learn shapes in 600 steps.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 112 * 112
# Question kinds in a training batch: colour and shape first (the demo's promise), shape the hardest.
KIND_WEIGHTS = {"color": 0.2, "shape": 0.5, "count": 0.15, "where": 0.15}

# Qwen2-VL's chat template (string content, or a list of {"type": "image" | "video" | "text"} parts),
# less the default system prompt: the model has no use for it and every token costs training time.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def demo_corpus() -> list[str]:
    """Every question and answer the model is taught, for the tokenizer's merges."""
    lines = [q for kind in ("color", "shape", "count") for q in QUESTIONS[kind]]
    lines += [f"Where is the {c} {s}?" for c in COLORS for s in SHAPES]
    lines += [*COLORS, *SHAPES, *NUMBERS, *POSITIONS.values()]
    return lines * 4


def build_config(tok, args: argparse.Namespace) -> transformers.Qwen2VLConfig:
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    head_dim = args.hidden // args.heads
    # M-RoPE splits head_dim / 2 rotary frequencies into (temporal, height, width) sections in
    # Qwen2-VL's proportions (16, 24, 24 of 64).
    quarter = head_dim // 8
    section = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2]
    return transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
            max_position_embeddings=1024, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            depth=args.vision_layers, embed_dim=args.vision_width, num_heads=args.vision_width // 32, mlp_ratio=4,
            hidden_act="quick_gelu", patch_size=args.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            in_channels=3, hidden_size=args.hidden,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def save_image_processor(out: Path, args: argparse.Namespace):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unit = (args.patch_size * 2) ** 2  # min/max pixels: whole image tokens (patch x 2 x 2 merge)
    if args.min_pixels % unit or args.max_pixels % unit:
        raise SystemExit(f"--min-pixels / --max-pixels must be multiples of {unit}")
    ip = Qwen2VLImageProcessorPil(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                                  patch_size=args.patch_size, merge_size=2)
    ip.save_pretrained(out)
    # Real checkpoints also carry the v4 keys (read by transformers 4.x and vLLM-style code).
    path = out / "preprocessor_config.json"
    pp = json.loads(path.read_text())
    pp.update(image_processor_type="Qwen2VLImageProcessor", min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    path.write_text(json.dumps(pp, indent=2) + "\n")
    return ip


class Batcher:
    """Turns examples into model inputs: the chat template is rendered once per distinct
    (question, image order) and the single ``<|image_pad|>`` expanded to the picture's tokens."""

    def __init__(self, tok, image_processor, image_token_id: int) -> None:
        self.tok, self.ip, self.image_token_id = tok, image_processor, image_token_id
        self.end = tok.convert_tokens_to_ids("<|im_end|>")
        self._prompts: dict[tuple[str, bool], list[int]] = {}

    def prompt_ids(self, question: str, image_first: bool) -> list[int]:
        key = (question, image_first)
        if key not in self._prompts:
            parts = [{"type": "image"}, {"type": "text", "text": question}]
            msgs = [{"role": "user", "content": parts if image_first else parts[::-1]}]
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            self._prompts[key] = self.tok(text).input_ids
        return self._prompts[key]

    def __call__(self, examples, orders) -> dict[str, torch.Tensor]:
        o = self.ip(images=[e.picture.image for e in examples], return_tensors="pt")
        seqs, labels = [], []
        for e, first, grid in zip(examples, orders, o["image_grid_thw"].tolist()):
            n = math.prod(grid) // 4  # tokens after the 2 x 2 spatial merge
            ids: list[int] = []
            for t in self.prompt_ids(e.question, first):
                ids += [t] * n if t == self.image_token_id else [t]
            answer = self.tok(e.answer).input_ids + [self.end]
            seqs.append(ids + answer)
            labels.append([-100] * len(ids) + answer)
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.tok.pad_token_id)
        label_t = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lab) in enumerate(zip(seqs, labels)):  # right padding, masked out
            input_ids[i, : len(s)] = torch.tensor(s)
            label_t[i, : len(s)] = torch.tensor(lab)
            mask[i, : len(s)] = 1
        return dict(input_ids=input_ids, attention_mask=mask, labels=label_t,
                    mm_token_type_ids=(input_ids == self.image_token_id).int(),
                    pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"])


def sample(rng: np.random.Generator, n: int, weights: dict[str, float] = KIND_WEIGHTS):
    total = sum(weights.values())
    kinds = rng.choice(len(KINDS), size=n, p=[weights.get(k, 0.0) / total for k in KINDS])
    return [make_example(rng, KINDS[k]) for k in kinds], [bool(b) for b in rng.random(n) < 0.7]


def pretrain_vision(model, ip, args: argparse.Namespace) -> None:
    """Stage 1 (``--vision-steps``): the vision tower alone, with a throw-away linear head on its
    mean-pooled output, classifies the shape and the colour of one-shape pictures. Through the
    language model the tower learnt shapes very slowly; supervised directly it learns them in a
    few thousand cheap steps, and stage 2 (the whole model on questions) then only reads them out."""
    visual = model.model.visual
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(SHAPES) + len(COLORS))
    params = [*visual.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.05)
    rng, colors = np.random.default_rng([args.seed, 3]), list(COLORS)

    def logits(o):
        h = visual(o["pixel_values"], grid_thw=o["image_grid_thw"])
        h = h.pooler_output if hasattr(h, "pooler_output") else h  # merged tokens, the LM's input
        sizes = [math.prod(g) // 4 for g in o["image_grid_thw"].tolist()]
        return head(torch.stack([x.mean(0) for x in torch.split(h, sizes)]))

    def batch(rng, n):
        ex = [make_example(rng, "shape") for _ in range(n)]
        o = ip(images=[e.picture.image for e in ex], return_tensors="pt")
        return (o, torch.tensor([SHAPES.index(e.picture.objects[0][1]) for e in ex]),
                torch.tensor([colors.index(e.picture.objects[0][0]) for e in ex]))

    eval_o, eval_s, eval_c = batch(np.random.default_rng([args.seed, 4]), 128)
    start = time.time()
    for step in range(args.vision_steps):
        for g in opt.param_groups:  # linear warmup, then constant, the last 20% down to 10%
            t = max(0.0, (step - 0.8 * args.vision_steps) / (0.2 * args.vision_steps))
            g["lr"] = args.vision_lr * min(1.0, (step + 1) / 50) * (1 - 0.9 * t)
        o, s, c = batch(rng, args.batch_size)
        out = logits(o)
        loss = (torch.nn.functional.cross_entropy(out[:, : len(SHAPES)], s)
                + torch.nn.functional.cross_entropy(out[:, len(SHAPES):], c))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.vision_steps:
            with torch.no_grad():
                out = logits(eval_o)
            shape = (out[:, : len(SHAPES)].argmax(-1) == eval_s).float().mean().item()
            color = (out[:, len(SHAPES):].argmax(-1) == eval_c).float().mean().item()
            print(f"vision step {step + 1} loss {loss.item():.3f} shape {shape:.3f} colour {color:.3f} "
                  f"{time.time() - start:.0f}s", flush=True)


@torch.no_grad()
def teacher_forced_accuracy(model, batch, examples) -> dict[str, float]:
    """Per question kind: the share of examples whose every answer token is the argmax."""
    model.eval()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model.train()
    pred, lab = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    ok = ((pred == lab) | (lab == -100)).all(-1).tolist()
    return {k: float(np.mean([o for o, e in zip(ok, examples) if e.kind == k])) for k in KINDS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runtime/vlmserve-demo"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    # One thread by default: on a shared 2-core machine two OpenMP threads spin-waiting on each
    # other made a step 10x slower (8.5 s vs 0.7 s); alone on 2 cores, --threads 2 is faster.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=96)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=14, help="vision patch side in pixels (merged 2 x 2 into one token)")
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS, help="image area bounds of the image processor")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    p.add_argument("--vision-steps", type=int, default=3000,
                   help="stage 1: steps of the vision tower alone classifying shape and colour (0: none)")
    p.add_argument("--vision-lr", type=float, default=1.5e-3)
    p.add_argument("--kind-weights", type=lambda v: {k: float(w) for k, w in (kv.split("=") for kv in v.split(","))},
                   default=KIND_WEIGHTS, help="question mix, e.g. color=0.2,shape=0.3,count=0.2,where=0.3")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer_with_special_tokens(
        out, "qwen2", ["<|im_start|>", "<|im_end|>", *VISION_TOKENS], CHAT_TEMPLATE, extra_corpus=demo_corpus())
    config = build_config(tok, args)
    config.dtype = torch.float32
    model = transformers.Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.train()
    ip = save_image_processor(out, args)
    batcher = Batcher(tok, ip, config.image_token_id)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M", flush=True)

    start0 = time.time()
    if args.vision_steps:
        pretrain_vision(model, ip, args)
    # Training data and the evaluation batch come from separate streams of the same seed.
    data_rng = np.random.default_rng([args.seed, 1])
    eval_examples, eval_orders = sample(np.random.default_rng([args.seed, 2]), 128)
    eval_batch = batcher(eval_examples, eval_orders)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warmup, then cosine down to 5%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    start, acc, running = time.time(), {}, None
    for step in range(args.steps):
        examples, orders = sample(data_rng, args.batch_size, args.kind_weights)
        batch = batcher(examples, orders)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1} loss {running:.4f} lr {lr_at(step):.2e} {time.time() - start:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = teacher_forced_accuracy(model, eval_batch, eval_examples)
            print(f"eval step {step + 1}: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
            # Saved at every evaluation, so that an interrupted run still leaves a usable checkpoint.
            save(model, tok, out, args, step + 1, time.time() - start0, acc)
    print(f"saved to {out} in {time.time() - start0:.0f} s", flush=True)


def save(model, tok, out: Path, args: argparse.Namespace, steps: int, seconds: float, acc: dict) -> None:
    model.save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                     do_sample=False).save_pretrained(out)
    info = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "steps_done": steps, "train_seconds": round(seconds), "torch": torch.__version__,
            "transformers": transformers.__version__, "teacher_forced_accuracy_128_examples": acc}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
