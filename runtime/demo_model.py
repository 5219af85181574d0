"""A tiny demo checkpoint built locally, so ``vlmserve`` runs without downloading anything.

The demo model has RANDOM WEIGHTS: it exercises the whole serving path (tokenizer, chat template,
config, safetensors loading, generation) but the text it produces is meaningless. A real demo
model comes in a later issue.

Nothing is downloaded: the tokenizer is trained on a small embedded corpus with the
``tokenizers`` library and the model is built from a ``transformers`` config with random
weights, then saved with ``save_pretrained`` exactly as a real checkpoint would be.

Public API:

* ``ensure_demo_model(path=None)`` -> the folder of the demo checkpoint (a tiny Qwen2), built
  once into ``$VLMSERVE_DEMO_DIR`` or ``~/.cache/vlmserve/demo-qwen2`` and reused afterwards
* ``train_tokenizer(out_dir, style)`` -> ``PreTrainedTokenizerFast`` (style "qwen2" or "llama")
* ``build_tiny_model(out_dir, arch="llama", ...)`` -> ``out_dir`` (config, safetensors, tokenizer,
  generation_config.json)
* ``train_tokenizer_with_special_tokens(out_dir, style, special_tokens, chat_template)`` and
  ``reinit_weights_(model, seed, ...)``: the pieces the tests' multimodal builders share

The tests build their checkpoints with the same two builders (``tests/tiny_models.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

__all__ = [
    "DEMO_MODEL_KWARGS",
    "build_tiny_model",
    "default_demo_dir",
    "ensure_demo_model",
    "reinit_weights_",
    "train_tokenizer",
    "train_tokenizer_with_special_tokens",
]

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today?",
    "I am fine, thank you. And you?",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "What is the meaning of life, the universe, and everything? It is 42.",
    "Please write a short poem about the sea and the sky.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "She sells sea shells by the sea shore.",
    "My phone number is 555-0123, call me after 6 pm.",
    "In 1969, two astronauts walked on the Moon for the first time.",
    "Machine learning models learn patterns from large amounts of data.",
    "The engine serves many requests at once using continuous batching.",
    "A cat sat on the mat; a dog slept by the door.",
    "Can you tell me a story about a dragon and a knight?",
    "The weather today is sunny with a high of 25 degrees.",
    "He said: \"Don't forget to bring your umbrella!\"",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.718",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } - _ + = * / \\ | @ # $ % ^ & ~ < >",
    "The user asked a question and the assistant gave a helpful answer.",
    "You are a helpful assistant. Answer briefly and clearly.",
    "Summarize the following text in one sentence.",
    "Translate this sentence into French: I like apples.",
    "The train leaves the station at 8:45 every morning.",
    "Green trees, blue rivers, and tall mountains fill the valley.",
    "Why is the sky blue? Because of Rayleigh scattering of sunlight.",
    "List three fruits: apple, banana, cherry.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "The meeting was moved to Tuesday, March 3rd, at 10:30.",
    "Reading books every day makes you smarter and calmer.",
    "Tokens are pieces of words that a model reads and writes.",
    "The price went from $19.99 to $24.50 in two years.",
    "Good morning! Good evening! Good night!",
    "An image of a red car parked next to a white house.",
    "Describe the picture: two people walking on a beach at sunset.",
    "Yes. No. Maybe. Sometimes. Always. Never.",
    "She opened the window and the cold wind came in.",
    "Email: someone@example.com, website: https://example.com/path?q=1",
    "Large language models generate text one token at a time.",
]

# Jinja chat templates (rendered by transformers' sandboxed jinja environment).
_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 style: system prompt folded into the first user turn; bos is added by the template
# (so render with tokenize=False and encode with add_special_tokens=False to avoid a double bos,
# just like the real Llama-2 template).
_LLAMA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = '' %}"
    "{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first %}{% set content = system_message + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# add_generation_prompt: the [/INST] marker already is the generation prompt for Llama-2; the
# flag is accepted (and is a no-op) so callers can pass it uniformly.

# Qwen2's pre-tokenization regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_STYLES = {
    "qwen2": dict(
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        template=_QWEN2_CHAT_TEMPLATE,
    ),
    "llama": dict(
        special=["<unk>", "<s>", "</s>"],
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        template=_LLAMA_CHAT_TEMPLATE,
    ),
}

_VOCAB_SIZE = 512


def _corpus_iter(extra: Sequence[str] = ()):
    # A little repetition and some lowercased/uppercased variants so common merges form.
    for _ in range(3):
        for s in [*_CORPUS, *extra]:
            yield s
            yield s.lower()
    for s in _CORPUS:
        yield s.upper()


def train_tokenizer(out_dir: Path, style: str, extra_corpus: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab ~512) and save it to ``out_dir``.

    ``style="qwen2"``: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ChatML
    template, no bos. ``style="llama"``: ``<unk>``, ``<s>`` (bos, prepended by the post-processor),
    ``</s>`` (eos), ``[INST]`` template. ByteLevel pre-tokenizer + decoder, so
    ``decode(encode(text))`` round-trips any text. ``extra_corpus``: more training sentences (the
    demo VLM's questions and answers), so that its words get merges of their own.
    """
    if style not in _STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {sorted(_STYLES)}")
    st = _STYLES[style]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        # Exactly Qwen2's pipeline. transformers 5's AutoTokenizer ignores the normalizer /
        # pre-tokenizer in tokenizer.json for model_type "qwen2" and rebuilds them in
        # Qwen2Tokenizer (NFC + this split regex + ByteLevel without regex); matching it keeps
        # `tokenizers.Tokenizer.from_file("tokenizer.json")` and AutoTokenizer in agreement.
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        # GPT-2 style byte-level (as in Llama-3 checkpoints); loaded verbatim by TokenizersBackend.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=st["special"],  # ids 0..2, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_iter(extra_corpus), trainer=trainer)

    if st["bos"] is not None:
        bos = st["bos"]
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, bos_id)],
        )

    kwargs = dict(tokenizer_object=tok, eos_token=st["eos"], model_max_length=4096)
    if st["bos"] is not None:
        kwargs["bos_token"] = st["bos"]
    if st["pad"] is not None:
        kwargs["pad_token"] = st["pad"]
    if st["unk"] is not None:
        kwargs["unk_token"] = st["unk"]
    if style == "qwen2":
        kwargs["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    hf_tok = PreTrainedTokenizerFast(**kwargs)
    if st["pad"] is None:
        # Llama has no pad token; reuse eos like most serving stacks do.
        hf_tok.pad_token = st["eos"]
    hf_tok.chat_template = st["template"]
    hf_tok.save_pretrained(out_dir)
    # Declare the class real checkpoints of this family declare (Qwen2: Qwen2Tokenizer; Llama-3
    # style byte-level: PreTrainedTokenizerFast, which v5 maps to TokenizersBackend).
    _portable_tokenizer_config(out_dir / "tokenizer_config.json", _tokenizer_class(style))
    return hf_tok


def train_tokenizer_with_special_tokens(
    out_dir: Path, style: str, special_tokens: list[str], chat_template: str, extra_corpus: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """``train_tokenizer(out_dir, style, extra_corpus)`` plus ``special_tokens`` (additional special
    tokens) and ``chat_template``, saved again into ``out_dir`` (the tests' multimodal checkpoints
    and the demo VLM use it)."""
    tok = train_tokenizer(out_dir, style, extra_corpus)
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir / "tokenizer_config.json", _tokenizer_class(style))
    return tok


def _tokenizer_class(style: str) -> str:
    return "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast"


def _portable_tokenizer_config(path: Path, tokenizer_class: str) -> None:
    """Make tokenizer_config.json loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` (a v5-only name) and the
    extra special tokens as a list under ``extra_special_tokens`` (v4 expects a dict there).
    The v4 spellings (``PreTrainedTokenizerFast`` / ``additional_special_tokens``) load
    identically in v5.
    """
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = tokenizer_class
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list) and extra:
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

# Init std for every Linear / Embedding weight. Random weights with HF's default std=0.02 give
# near-flat logits: on these 2-layer, 64-wide models ~17-20% of greedy steps have a top1-top2
# logit gap < 0.01 (llama median gap ~0.04), so the greedy argmax flips under float noise from
# a different kernel, batch shape or accumulation order. After the final RMSNorm the hidden state
# has unit RMS, so logit std ~ sqrt(hidden) * std_lm_head, and the typical top1-top2 gap among
# 512 logits scales with it. Measured over 12 prompts (6 text, 6 random-token) x 32 greedy steps:
#
#   std    median gap       10th pct gap    steps with gap<0.01   distinct tokens/output
#   0.02   0.04-0.20        0.005-0.03      3-20%                 0.04-0.66 (loops)
#   0.1    0.17-0.57        0.03-0.08       0-1.6%                0.15-0.63
#   0.2    0.33-0.38        0.035-0.054     1.8-3.6%              ~0.89
#   0.3    0.51-0.62        0.076-0.093     1-2%                  0.88-0.94   <- chosen
#
# 0.3 gives the largest margins while outputs stay varied (not stuck repeating one token, which
# would hide KV-cache/position bugs). Attention is fairly sharp at this scale, so bf16 vs fp32
# greedy agreement is ~94% per step (vs ~95% at 0.2): compare bf16 runs with tolerance, not
# exact token equality. fp32 reordering noise (~1e-5) is far below these gaps.
WEIGHT_STD = 0.3
# Biases (qwen2 q/k/v) are random and nonzero so that bias loading is actually exercised.
BIAS_STD = 0.1


@torch.no_grad()
def reinit_weights_(
    model: torch.nn.Module,
    seed: int,
    *,
    norm_std: float = 0.0,
    fan_in_names: tuple[str, ...] = (),
    unit_names: tuple[str, ...] = (),
) -> None:
    """Re-draw every parameter from ``Generator(seed + 1)``, in ``named_parameters`` order.

    Biases ~ N(0, BIAS_STD); names ending in one of ``unit_names`` ~ N(0, 1); 1-D parameters
    (norm scales) = 1 + N(0, ``norm_std``) (exactly 1 when ``norm_std`` is 0: then they must be
    norms); weights whose name contains one of ``fan_in_names`` ~ N(0, 1 / fan_in) (keeps vision
    activations O(1)); every other weight ~ N(0, WEIGHT_STD).
    """
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
        elif name.endswith(unit_names):
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.dim() == 1:  # RMSNorm / LayerNorm scales
            if norm_std:  # perturbed, so that loading them is tested
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * norm_std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                raise AssertionError(f"unexpected 1-D parameter {name}")
        elif any(part in name for part in fan_in_names):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        else:  # Linear / Embedding weights (lm_head is tied or a Linear)
            p.copy_(torch.randn(p.shape, generator=g) * WEIGHT_STD)


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 1024,
    max_shard_size: str | None = None,
    seed: int = 0,
    eos_token_ids: list[int] | None = None,
) -> Path:
    """Write a tiny random-weight ``arch`` ("llama" | "qwen2") checkpoint to ``out_dir``.

    The folder holds config.json, safetensors weights (sharded with an index when
    ``max_shard_size`` is small, e.g. "200KB"), tokenizer files and generation_config.json whose
    ``eos_token_id`` is ``eos_token_ids`` when given, else the tokenizer's eos id.
    """
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir, arch)

    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,  # None for qwen2 style
        hidden_act="silu",
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    else:
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
    config.dtype = torch.float32

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reinit_weights_(model, seed)
    model.eval()

    save_kwargs = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kwargs)

    eos = list(eos_token_ids) if eos_token_ids is not None else tok.eos_token_id
    gen = GenerationConfig(
        eos_token_id=eos,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    gen.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# The demo checkpoint
# ---------------------------------------------------------------------------------------------

# The demo model's shape; changing it (or the builders) must bump _DEMO_VERSION so that cached
# copies built by an older vlmserve are rebuilt.
DEMO_MODEL_KWARGS = dict(
    arch="qwen2",
    num_hidden_layers=2,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=352,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    seed=0,
)
_DEMO_VERSION = 1
# Written last into a finished build; a folder without it (or with another version) is not reused.
_DEMO_STAMP = "vlmserve_demo.json"


def default_demo_dir() -> Path:
    """``$VLMSERVE_DEMO_DIR`` if set, else ``~/.cache/vlmserve/demo-qwen2``."""
    env = os.environ.get("VLMSERVE_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlmserve" / "demo-qwen2"


def _stamp() -> dict:
    return {"demo_version": _DEMO_VERSION, "model": DEMO_MODEL_KWARGS, "random_weights": True}


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / _DEMO_STAMP).read_text()) == _stamp()
    except (OSError, ValueError):
        return False


def ensure_demo_model(path: Path | None = None) -> Path:
    """Return the folder of the demo checkpoint, building it first if it is not there yet.

    The demo is a tiny Qwen2 (2 layers, hidden 128, GQA 4/2 heads, tied embeddings, byte-level
    BPE tokenizer with a ChatML template) with deterministic RANDOM weights: its outputs are
    meaningless text. It is built into ``path``, else ``$VLMSERVE_DEMO_DIR``, else
    ``~/.cache/vlmserve/demo-qwen2``.

    Idempotent and safe against interruption: the checkpoint is written into a temporary folder
    beside the target and renamed into place only when complete (with a stamp file written last),
    so a half-written folder is never reused. A target built by another vlmserve version is
    replaced; a non-empty target that is not a demo build is left alone and raises ValueError.
    """
    target = Path(path).expanduser() if path is not None else default_demo_dir()
    target = target.absolute()
    if _is_complete(target):
        return target
    if target.exists():
        if not target.is_dir():
            raise ValueError(f"demo model: {target} exists and is not a folder")
        if any(target.iterdir()) and not (target / _DEMO_STAMP).exists():
            raise ValueError(
                f"demo model: {target} is not empty and is not a vlmserve demo build; "
                "remove it or point VLMSERVE_DEMO_DIR elsewhere"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the folder gets the usual umask permissions, not 0700.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build_tiny_model(tmp, **DEMO_MODEL_KWARGS)
        (tmp / _DEMO_STAMP).write_text(json.dumps(_stamp(), indent=2) + "\n")
        if target.exists():
            # Empty, or an outdated demo build (it has our stamp): move it aside, then replace it.
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same build first: use theirs.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
