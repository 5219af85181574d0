"""A tiny random-weight Phi-3-vision (``Phi3VForCausalLM``) checkpoint, and its reference model
built from transformers' native classes (nothing is downloaded; no remote code is run).

Public API:

* ``build_tiny_phi3v(out_dir, scale=0.02, seed=0, ...)`` -> ``out_dir`` holding config.json as the
  published checkpoints write it (``model_type: "phi3_v"``, ``architectures: ["Phi3VForCausalLM"]``,
  ``auto_map`` to remote code that is NOT in the folder, ``embd_layer``, ``img_processor`` plus the
  ``vision_config`` override for a tiny tower), model.safetensors under the published names
  (``model.*``, ``lm_head.*``, ``model.vision_embed_tokens.*``), a byte-level tokenizer (adds BOS,
  like Llama's) with Phi-3's chat tokens and ``<|image|>``, Phi-3.5-vision's chat template (string
  content only), preprocessor_config.json (``num_crops``) and generation_config.json.
  ``scale`` is the LM's ``initializer_range`` and the std of the projector / separators.
* ``Oracle(model_dir)`` -> the reference: HF ``Phi3ForCausalLM`` + ``CLIPVisionModel`` loaded from
  that checkpoint, with the image glue (HD resize, crops, penultimate-layer patch features, 2x2
  merge, separators, projection) written here independently of the engine:
  ``prompt_ids(text, images)``, ``image_embeds(image)``, ``greedy(text, images, max_new)``,
  ``logprobs(text, images, continuation)``,
  ``embedding(text, images)`` (VLM2Vec: last token's final hidden state, L2-normalised).
* ``published_token_count(width, height, num_crops)`` -> the published processor's
  ``calc_num_image_tokens_from_image_size`` formula, transcribed.
* ``random_image(height, width, seed)`` (from tiny_vlm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from tiny_models import train_tokenizer_with_special_tokens
from tiny_vlm import random_image  # noqa: F401  (re-exported for the tests)

CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|image|>"]
# Phi-3.5-vision's template: string content only, no BOS (the tokenizer adds it).
PHI3V_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '<|assistant|>\n' }}{% endif %}"
)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _text_fields(vocab: int, tok, scale: float, max_pos: int, original_max: int) -> dict:
    head_dim = 16
    rng = np.random.default_rng(7)
    return dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-5, initializer_range=scale,
        max_position_embeddings=max_pos, original_max_position_embeddings=original_max, rope_theta=10000.0,
        # LongRoPE ("su", as Phi-3-vision writes it) with distinct short / long factors.
        rope_scaling={"type": "su", "short_factor": [float(x) for x in 1 + rng.random(head_dim // 2)],
                      "long_factor": [float(x) for x in 2 + 4 * rng.random(head_dim // 2)]},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), tie_word_embeddings=False,
    )


def build_tiny_phi3v(out_dir: Path, scale: float = 0.02, seed: int = 0, *, num_crops: int = 4,
                     max_position_embeddings: int = 131072, original_max_position_embeddings: int = 4096) -> Path:
    """Write the checkpoint (see the module docstring); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer_with_special_tokens(out_dir, "llama", CHAT_TOKENS, PHI3V_CHAT_TEMPLATE)
    # Phi-3's tokenizer ends text with <|endoftext|> (not Llama's </s>), one of generation_config's eos ids.
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(tok_cfg, eos_token="<|endoftext|>"), indent=2))
    text = _text_fields(len(tok), tok, scale, max_position_embeddings, original_max_position_embeddings)
    config = dict(
        text, model_type="phi3_v", architectures=["Phi3VForCausalLM"], torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                  "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                    "use_hd_transform": True, "with_learnable_separator": True},
        img_processor={"image_dim_out": TOWER["hidden_size"], "model_name": "openai/clip-vit-large-patch14-336",
                       "name": "clip_vision_model", "num_img_tokens": 144, "vision_config": TOWER},
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    torch.manual_seed(seed)
    lm = transformers.Phi3ForCausalLM(_phi3_config(config)).float()
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **TOWER, initializer_factor=scale / 0.02)).float()
    c4, hidden = 4 * TOWER["hidden_size"], text["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    vision = {
        "glb_GN": torch.randn(1, 1, c4, generator=g) * scale * 10,
        "sub_GN": torch.randn(1, 1, 1, c4, generator=g) * scale * 10,
        "img_projection.0.weight": torch.randn(hidden, c4, generator=g) * scale,
        "img_projection.0.bias": torch.randn(hidden, generator=g) * scale,
        "img_projection.2.weight": torch.randn(hidden, hidden, generator=g) * scale,
        "img_projection.2.bias": torch.randn(hidden, generator=g) * scale,
    }
    tensors = {k: v.contiguous() for k, v in lm.state_dict().items()}
    # The published names keep transformers 4's vision_model level (5.x's CLIPVisionModel has none).
    tensors.update({f"model.vision_embed_tokens.img_processor.vision_model.{k.removeprefix('vision_model.')}":
                    v.contiguous() for k, v in tower.state_dict().items()})
    tensors.update({f"model.vision_embed_tokens.{k}": v.contiguous() for k, v in vision.items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor", "num_crops": num_crops,
        "image_mean": MEAN.tolist(), "image_std": STD.tolist(), "do_convert_rgb": True,
        "auto_map": {"AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
                     "AutoProcessor": "processing_phi3_v.Phi3VProcessor"},
    }, indent=2) + "\n")
    eos = [tok.convert_tokens_to_ids("<|end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=eos[1], bos_token_id=tok.bos_token_id,
                     do_sample=False).save_pretrained(out_dir)
    return out_dir


def _phi3_config(raw: dict) -> transformers.Phi3Config:
    """The text model's Phi3Config (transformers wants original_max_position_embeddings in the rope dict)."""
    fields = {k: raw[k] for k in raw if k not in ("model_type", "architectures", "auto_map", "embd_layer",
                                                   "img_processor", "torch_dtype")}
    fields["rope_scaling"] = dict(fields["rope_scaling"],
                                  original_max_position_embeddings=raw["original_max_position_embeddings"])
    return transformers.Phi3Config(**fields)


# ---------------------------------------------------------------------------------------------
# The published processor's arithmetic, transcribed
# ---------------------------------------------------------------------------------------------

def _hd_transform_size(width: int, height: int, hd_num: int) -> tuple[int, int]:
    """calc_hd_transform_size: (padded width, padded height)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_width = int(scale * 336)
    new_height = int(new_width / ratio)
    padded_height = int(np.ceil(new_height / 336) * 336)
    return (padded_height, new_width) if transposed else (new_width, padded_height)


def published_token_count(width: int, height: int, num_crops: int) -> int:
    """calc_num_image_tokens_from_image_size."""
    w, h = _hd_transform_size(width, height, num_crops)
    return int((h // 336 * w // 336 + 1) * 144 + 1 + (h // 336 + 1) * 12)


# ---------------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------------

class Oracle:
    """HF Phi3ForCausalLM + CLIPVisionModel with this file's image glue (fp32)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import PreTrainedTokenizerFast

        self.dir = Path(model_dir)
        raw = json.loads((self.dir / "config.json").read_text())
        self.raw = raw
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(self.dir))  # AutoTokenizer would read config.json
        self.num_crops = json.loads((self.dir / "preprocessor_config.json").read_text())["num_crops"]
        self.image_token_id = self.tok.convert_tokens_to_ids("<|image|>")
        self.eos = json.loads((self.dir / "generation_config.json").read_text())["eos_token_id"]
        weights = load_file(str(self.dir / "model.safetensors"))
        vis = "model.vision_embed_tokens."
        self.lm = transformers.Phi3ForCausalLM(_phi3_config(raw)).float().eval()
        self.lm.load_state_dict({k: v for k, v in weights.items() if not k.startswith(vis)})
        img = raw["img_processor"]
        self.tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**img["vision_config"])).float().eval()
        tower = vis + "img_processor.vision_model."
        self.tower.load_state_dict({k[len(tower):]: v for k, v in weights.items() if k.startswith(tower)})
        self.layer_idx = img.get("layer_idx", -2)
        self.glue = {k[len(vis):]: v for k, v in weights.items()
                     if k.startswith(vis) and not k.startswith(vis + "img_processor.")}

    # -- images ---------------------------------------------------------------------------------

    def pixels(self, image) -> tuple[torch.Tensor, int, int]:
        """(pixel_values [1 + hc*wc, 3, 336, 336], hc, wc) as Phi3VImageProcessor.preprocess makes them."""
        from PIL import Image

        im = image.convert("RGB")
        trans = im.width < im.height
        if trans:
            im = im.transpose(Image.Transpose.TRANSPOSE)
        w, h = im.size
        ratio = w / h
        scale = 1
        while scale * np.ceil(scale / ratio) <= self.num_crops:
            scale += 1
        scale -= 1
        new_w = int(scale * 336)
        new_h = int(new_w / ratio)
        arr = np.asarray(im.resize((new_w, new_h), Image.Resampling.BILINEAR))
        target = int(np.ceil(new_h / 336) * 336)
        top = int((target - new_h) / 2)
        arr = np.pad(arr, ((top, target - new_h - top), (0, 0), (0, 0)), constant_values=255)
        if trans:
            arr = arr.transpose(1, 0, 2)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255
        x = (x - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
        glob = F.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)
        hc, wc = x.shape[1] // 336, x.shape[2] // 336
        crops = [x[:, r * 336:(r + 1) * 336, c * 336:(c + 1) * 336] for r in range(hc) for c in range(wc)]
        return torch.cat([glob, torch.stack(crops)]), hc, wc

    def _merge(self, feats: torch.Tensor) -> torch.Tensor:
        """[576, C] patch features of one crop -> [12, 12, 4C]: each 2x2 block's four features
        (top-left, top-right, bottom-left, bottom-right) side by side."""
        g = int(math.isqrt(feats.shape[0]))
        f = feats.reshape(g, g, -1)
        return torch.cat([f[0::2, 0::2], f[0::2, 1::2], f[1::2, 0::2], f[1::2, 1::2]], dim=-1)

    def _rows(self, grid: torch.Tensor) -> list[torch.Tensor]:
        sub = self.glue["sub_GN"].reshape(-1)
        out = []
        for row in grid:  # each row of the grid, then the newline separator
            out.extend(list(row))
            out.append(sub)
        return out

    @torch.no_grad()
    def image_embeds(self, image) -> torch.Tensor:
        """[num_image_tokens, hidden] for one image."""
        pv, hc, wc = self.pixels(image)
        states = self.tower(pixel_values=pv, output_hidden_states=True).hidden_states[self.layer_idx][:, 1:]
        merged = [self._merge(s) for s in states]
        tiled = torch.cat([torch.cat(merged[1 + r * wc: 1 + (r + 1) * wc], dim=1) for r in range(hc)], dim=0)
        seq = torch.stack(self._rows(tiled) + [self.glue["glb_GN"].reshape(-1)] + self._rows(merged[0]))
        p = self.glue
        h = F.gelu(F.linear(seq, p["img_projection.0.weight"], p["img_projection.0.bias"]))
        return F.linear(h, p["img_projection.2.weight"], p["img_projection.2.bias"])

    # -- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, text: str, images: list) -> list[int]:
        """Phi3VProcessor: pieces between <|image_N|> tags tokenised one by one (tokenizer
        defaults), image N's placeholder run in place of its tag."""
        import re

        if not images:
            return self.tok(text).input_ids
        pieces = re.split(r"<\|image_\d+\|>", text)
        tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", text)]
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids += self.tok(piece).input_ids
            if i < len(tags):
                im = images[tags[i] - 1]
                ids += [self.image_token_id] * published_token_count(im.width, im.height, self.num_crops)
        return ids

    @torch.no_grad()
    def inputs_embeds(self, ids: list[int], images: list) -> torch.Tensor:
        emb = self.lm.model.embed_tokens(torch.tensor([ids]))
        if images:
            rows = torch.cat([self.image_embeds(im) for im in images])
            mask = torch.tensor(ids) == self.image_token_id
            assert int(mask.sum()) == rows.shape[0]
            emb[0, mask] = rows
        return emb

    @torch.no_grad()
    def greedy(self, text: str, images: list, max_new: int) -> list[int]:
        ids = self.prompt_ids(text, images)
        emb = self.inputs_embeds(ids, images)
        out = self.lm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=max_new, eos_token_id=self.eos,
                               pad_token_id=self.eos[-1], temperature=None, top_p=None, top_k=None)
        return out[0, -max_new:].tolist() if out.shape[1] > max_new else out[0].tolist()

    @torch.no_grad()
    def logprobs(self, text: str, images: list, continuation: list[int]) -> torch.Tensor:
        """log-softmax [len(continuation), vocab] of the distributions that chose each continuation token."""
        ids = self.prompt_ids(text, images)
        emb = torch.cat([self.inputs_embeds(ids, images), self.lm.model.embed_tokens(torch.tensor([continuation]))], 1)
        logits = self.lm(inputs_embeds=emb).logits[0, len(ids) - 1 : len(ids) - 1 + len(continuation)]
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def embedding(self, text: str, images: list) -> torch.Tensor:
        ids = self.prompt_ids(text, images)
        hidden = self.lm.model(inputs_embeds=self.inputs_embeds(ids, images)).last_hidden_state[0, -1]
        return F.normalize(hidden, dim=-1)
