"""A tiny random-weight MiniCPM-V 2.6 (``MiniCPMV``) checkpoint, and its reference model built from
transformers' native classes (nothing is downloaded; no remote code is run).

Public API:

* ``build_tiny_minicpmv(out_dir, scale=0.02, seed=0)`` -> ``out_dir`` holding config.json as the
  published checkpoint writes it (``model_type: "minicpmv"``, ``architectures: ["MiniCPMV"]``,
  ``auto_map`` to remote code that is NOT in the folder, ``version: 2.6``, ``query_num: 64``,
  ``slice_config``, a tiny ``vision_config``), model.safetensors under the published names
  (``llm.*``, ``vpm.*``, ``resampler.*``), a Qwen2-style byte-level tokenizer with the image tokens
  whose tokenizer_config.json names the remote ``MiniCPMVTokenizerFast`` (as published), the
  ChatML chat template (string content only), preprocessor_config.json and generation_config.json.
  ``scale`` is the LM's ``initializer_range`` and the std of the resampler's matrices.
* ``Oracle(model_dir)`` -> the reference: HF ``Qwen2ForCausalLM`` + ``SiglipVisionModel`` from that
  checkpoint, with the glue written here independently of the engine (slicing, NaViT position ids,
  the resampler on ``torch.nn.MultiheadAttention``, placeholder text, image bounds):
  ``prompt_ids(text, images)``, ``slice_embeds(image)`` [num_slices, 64, hidden],
  ``greedy(text, images, max_new)``, ``logprobs(text, images, continuation)``.
* ``Published`` -> the published image processor's grid / resize / placeholder formulas, transcribed.
* ``random_image(height, width, seed)`` (from tiny_vlm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from tiny_models import train_tokenizer_with_special_tokens
from tiny_vlm import random_image  # noqa: F401  (re-exported for the tests)

IMAGE_TOKENS = ["<image>", "</image>", "<slice>", "</slice>", "<unk>", "<image_id>", "</image_id>"]
# MiniCPM-V 2.6's template: ChatML, string content, a default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             image_size=980, patch_size=14, model_type="siglip")
QUERY_NUM = 64
PREPROCESSOR = dict(max_slice_nums=9, scale_resolution=448, patch_size=14, use_image_id=True,
                    image_feature_size=QUERY_NUM, slice_mode=True, norm_mean=[0.5, 0.5, 0.5],
                    norm_std=[0.5, 0.5, 0.5], version=2.6)


def build_tiny_minicpmv(out_dir: Path, scale: float = 0.02, seed: int = 0) -> Path:
    """Write the checkpoint (see the module docstring); returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer_with_special_tokens(out_dir, "qwen2", IMAGE_TOKENS, CHAT_TEMPLATE)
    tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="MiniCPMVTokenizerFast",
                   auto_map={"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = dict(
        model_type="minicpmv", architectures=["MiniCPMV"], version=2.6, torch_dtype="float32",
        auto_map={"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                  "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=4096, initializer_range=scale, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=4096, max_window_layers=2,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=eos,
        query_num=QUERY_NUM, image_size=448, patch_size=14, use_image_id=True, slice_mode=True,
        slice_config={"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        drop_vision_last_layer=False, batch_vision_input=True, vision_batch_size=16, vision_config=TOWER,
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    torch.manual_seed(seed)
    lm = transformers.Qwen2ForCausalLM(_qwen2_config(config)).float()
    tower = transformers.SiglipVisionModel(_siglip_config(config)).float()
    hidden, width = config["hidden_size"], TOWER["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    resampler = {
        "query": randn(QUERY_NUM, hidden, std=scale * 10), "kv_proj.weight": randn(hidden, width, std=0.2),
        "attn.in_proj_weight": randn(3 * hidden, hidden, std=scale), "attn.in_proj_bias": randn(3 * hidden, std=scale),
        "attn.out_proj.weight": randn(hidden, hidden, std=scale), "attn.out_proj.bias": randn(hidden, std=scale),
        "proj": randn(hidden, hidden, std=scale * 2),
    }
    for ln in ("ln_q", "ln_kv", "ln_post"):  # not the identity: the test sees each norm applied
        resampler[f"{ln}.weight"] = 1 + randn(hidden, std=0.1)
        resampler[f"{ln}.bias"] = randn(hidden, std=0.1)
    tensors = {f"llm.{k}": v.contiguous() for k, v in lm.state_dict().items()}
    tensors.update({f"vpm.{k.removeprefix('vision_model.')}": v.contiguous() for k, v in tower.state_dict().items()
                    if "position_ids" not in k})
    tensors.update({f"resampler.{k}": v.contiguous() for k, v in resampler.items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    (out_dir / "preprocessor_config.json").write_text(json.dumps(dict(
        PREPROCESSOR, image_processor_type="MiniCPMVImageProcessor", processor_class="MiniCPMVProcessor",
        auto_map={"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
                  "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor"}), indent=2) + "\n")
    GenerationConfig(eos_token_id=[eos, tok.convert_tokens_to_ids("<|endoftext|>")], do_sample=False,
                     pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>")).save_pretrained(out_dir)
    return out_dir


def _qwen2_config(raw: dict) -> transformers.Qwen2Config:
    skip = {"model_type", "architectures", "auto_map", "vision_config", "slice_config", "torch_dtype"}
    return transformers.Qwen2Config(**{k: v for k, v in raw.items() if k not in skip})


def _siglip_config(raw: dict) -> transformers.SiglipVisionConfig:
    fields = {k: v for k, v in raw["vision_config"].items() if k != "model_type"}
    return transformers.SiglipVisionConfig(**fields, vision_use_head=False)


# ---------------------------------------------------------------------------------------------
# The published image processor's arithmetic, transcribed
# ---------------------------------------------------------------------------------------------

class Published:
    """MiniCPMVImageProcessor (2.6): get_sliced_grid, find_best_resize, get_refine_size,
    get_slice_image_placeholder."""

    def __init__(self, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14,
                 image_feature_size: int = QUERY_NUM, use_image_id: bool = True) -> None:
        self.max_slice_nums, self.scale_resolution, self.patch_size = max_slice_nums, scale_resolution, patch_size
        self.image_feature_size, self.use_image_id = image_feature_size, use_image_id

    @staticmethod
    def ensure_divide(length, patch_size):
        return max(round(length / patch_size) * patch_size, patch_size)

    def find_best_resize(self, original_size, allow_upscale=False):
        width, height = original_size
        if (width * height > self.scale_resolution * self.scale_resolution) or allow_upscale:
            r = width / height
            height = int(self.scale_resolution / math.sqrt(r))
            width = int(height * r)
        return self.ensure_divide(width, self.patch_size), self.ensure_divide(height, self.patch_size)

    def get_refine_size(self, original_size, grid):
        width, height = original_size
        grid_x, grid_y = grid
        refine_width = self.ensure_divide(width, grid_x)
        refine_height = self.ensure_divide(height, grid_y)
        best = self.find_best_resize((refine_width / grid_x, refine_height / grid_y), allow_upscale=True)
        return best[0] * grid_x, best[1] * grid_y

    def get_sliced_grid(self, image_size):
        original_width, original_height = image_size
        log_ratio = math.log(original_width / original_height)
        ratio = original_width * original_height / (self.scale_resolution * self.scale_resolution)
        multiple = min(math.ceil(ratio), self.max_slice_nums)
        if multiple <= 1:
            return None
        candidate_split_grids_nums = [i for i in [multiple - 1, multiple, multiple + 1]
                                      if i != 1 and i <= self.max_slice_nums]
        candidate_grids = []
        for split_grids_nums in candidate_split_grids_nums:
            m = 1
            while m <= split_grids_nums:
                if split_grids_nums % m == 0:
                    candidate_grids.append([m, split_grids_nums // m])
                m += 1
        best_grid, min_error = [1, 1], float("inf")
        for grid in candidate_grids:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:
                best_grid, min_error = grid, error
        return best_grid

    def get_slice_image_placeholder(self, image_size, image_idx=0):
        grid = self.get_sliced_grid(image_size)
        unk = "<unk>" * self.image_feature_size
        placeholder = "<image>" + unk + "</image>"
        if self.use_image_id:
            placeholder = f"<image_id>{image_idx}</image_id>" + placeholder
        if grid is not None:
            placeholder += "\n".join("".join(["<slice>" + unk + "</slice>"] * grid[0]) for _ in range(grid[1]))
        return placeholder

    def slice_image(self, image) -> list:
        """PIL slices: the source image first, then the grid's patches row by row."""
        from PIL import Image

        grid = self.get_sliced_grid(image.size)
        if grid is None:
            return [image.resize(self.find_best_resize(image.size, allow_upscale=True), Image.Resampling.BICUBIC)]
        source = image.copy().resize(self.find_best_resize(image.size), resample=Image.Resampling.BICUBIC)
        refine = image.resize(self.get_refine_size(image.size, grid), resample=Image.Resampling.BICUBIC)
        gx, gy = int(refine.size[0] / grid[0]), int(refine.size[1] / grid[1])
        return [source] + [refine.crop((j, i, j + gx, i + gy))
                           for i in range(0, refine.size[1], gy) for j in range(0, refine.size[0], gx)]


# ---------------------------------------------------------------------------------------------
# Reference model
# ---------------------------------------------------------------------------------------------

def navit_position_ids(nb_patches_h: int, nb_patches_w: int, num_patches_per_side: int) -> torch.Tensor:
    """The published SiglipVisionEmbeddings' position ids of one image (tgt_sizes given as int32)."""
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    tgt = torch.tensor([nb_patches_h, nb_patches_w], dtype=torch.int32)
    fractional_coords_h = torch.arange(0, 1 - 1e-6, 1 / tgt[0])
    fractional_coords_w = torch.arange(0, 1 - 1e-6, 1 / tgt[1])
    bucket_coords_h = torch.bucketize(fractional_coords_h, boundaries, right=True)
    bucket_coords_w = torch.bucketize(fractional_coords_w, boundaries, right=True)
    return (bucket_coords_h[:, None] * num_patches_per_side + bucket_coords_w).flatten()


def sincos_table(embed_dim: int, h: int, w: int) -> np.ndarray:
    """The published get_2d_sincos_pos_embed (version 2.5+): [h, w, embed_dim], numpy float32."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=0)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=-1)


class Oracle:
    """HF Qwen2ForCausalLM + SiglipVisionModel with this file's glue (fp32)."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.dir = Path(model_dir)
        raw = json.loads((self.dir / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.ids = {t: self.tok.token_to_id(t) for t in IMAGE_TOKENS}
        self.eos = json.loads((self.dir / "generation_config.json").read_text())["eos_token_id"]
        pp = json.loads((self.dir / "preprocessor_config.json").read_text())
        self.published = Published(pp["max_slice_nums"], pp["scale_resolution"], pp["patch_size"],
                                   pp["image_feature_size"], pp["use_image_id"])
        w = load_file(str(self.dir / "model.safetensors"))
        self.lm = transformers.Qwen2ForCausalLM(_qwen2_config(raw)).float().eval()
        self.lm.load_state_dict({k[4:]: v for k, v in w.items() if k.startswith("llm.")})
        self.tower = transformers.SiglipVisionModel(_siglip_config(raw)).float().eval()
        self.tower.load_state_dict({k[4:]: v for k, v in w.items() if k.startswith("vpm.")},
                                                strict=False)  # position_ids: a buffer
        hidden = raw["hidden_size"]
        self.mha = torch.nn.MultiheadAttention(hidden, hidden // 128).eval()
        self.mha.load_state_dict({k[len("resampler.attn."):]: v for k, v in w.items()
                                  if k.startswith("resampler.attn.")})
        self.rs = {k[len("resampler."):]: v for k, v in w.items() if k.startswith("resampler.")}

    # -- images ---------------------------------------------------------------------------------

    def _slice_features(self, pil) -> tuple[torch.Tensor, int, int]:
        """One slice -> (post-layernorm tower features [h*w, C], h, w), the slice on its own."""
        x = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255
        x = (x - 0.5) / 0.5
        pixels = torch.from_numpy(x).permute(2, 0, 1)[None]  # [1, 3, H, W]
        vm = self.tower  # transformers 5: no vision_model level
        patches = vm.embeddings.patch_embedding(pixels)  # [1, C, h, w]: the conv itself
        _, _, h, w = patches.shape
        side = vm.embeddings.config.image_size // vm.embeddings.config.patch_size
        emb = patches.flatten(2).transpose(1, 2) + vm.embeddings.position_embedding(navit_position_ids(h, w, side))
        out = vm.encoder(inputs_embeds=emb).last_hidden_state
        return vm.post_layernorm(out)[0], h, w

    def _resample(self, feats: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[h*w, C] -> [64, hidden]: nn.MultiheadAttention with (L, N=1, E) inputs."""
        p = self.rs
        ln = torch.nn.functional.layer_norm
        dim = p["proj"].shape[0]
        kv = ln(feats @ p["kv_proj.weight"].T, (dim,), p["ln_kv.weight"], p["ln_kv.bias"], 1e-6)
        pos = torch.from_numpy(sincos_table(dim, h, w).reshape(h * w, dim)).float()
        q = ln(p["query"], (dim,), p["ln_q.weight"], p["ln_q.bias"], 1e-6)
        out = self.mha(q[:, None], (kv + pos)[:, None], kv[:, None], need_weights=False)[0][:, 0]
        return ln(out, (dim,), p["ln_post.weight"], p["ln_post.bias"], 1e-6) @ p["proj"]

    @torch.no_grad()
    def slice_embeds(self, image) -> torch.Tensor:
        """[num_slices, 64, hidden]: the overview, then the slices row-major."""
        return torch.stack([self._resample(*self._slice_features(s)) for s in self.published.slice_image(
            image.convert("RGB"))])

    # -- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, text: str, images: list) -> list[int]:
        """MiniCPMVProcessor: each (<image>./</image>) replaced with the image's placeholder, the
        whole text tokenised at once."""
        chunks = text.split("(<image>./</image>)")
        assert len(chunks) == len(images) + 1
        final = chunks[0]
        for i, im in enumerate(images):
            final += self.published.get_slice_image_placeholder(im.size, i) + chunks[i + 1]
        return self.tok.encode(final).ids

    def image_bounds(self, ids: list[int]) -> list[tuple[int, int]]:
        """The processor's _convert: [start + 1, end) between <image>/<slice> and </image>/</slice>."""
        t = torch.tensor(ids)
        starts = torch.where((t == self.ids["<image>"]) | (t == self.ids["<slice>"]))[0] + 1
        ends = torch.where((t == self.ids["</image>"]) | (t == self.ids["</slice>"]))[0]
        return list(zip(starts.tolist(), ends.tolist()))

    @torch.no_grad()
    def inputs_embeds(self, ids: list[int], images: list) -> torch.Tensor:
        emb = self.lm.model.embed_tokens(torch.tensor([ids]))
        if images:
            rows = torch.cat([self.slice_embeds(im) for im in images])  # [all slices, 64, hidden]
            bounds = self.image_bounds(ids)
            assert len(bounds) == rows.shape[0]
            for (s, e), r in zip(bounds, rows):
                assert e - s == r.shape[0]
                emb[0, s:e] = r
        return emb

    @torch.no_grad()
    def greedy(self, text: str, images: list, max_new: int) -> list[int]:
        ids = self.prompt_ids(text, images)
        out = self.lm.generate(inputs_embeds=self.inputs_embeds(ids, images),
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                               max_new_tokens=max_new, eos_token_id=self.eos, pad_token_id=self.eos[-1],
                               temperature=None, top_p=None, top_k=None)
        return out[0, -max_new:].tolist() if out.shape[1] > max_new else out[0].tolist()

    @torch.no_grad()
    def logprobs(self, text: str, images: list, continuation: list[int]) -> torch.Tensor:
        """log-softmax [len(continuation), vocab] of the distributions that chose each continuation token."""
        ids = self.prompt_ids(text, images)
        emb = torch.cat([self.inputs_embeds(ids, images), self.lm.model.embed_tokens(torch.tensor([continuation]))], 1)
        logits = self.lm(inputs_embeds=emb).logits[0, len(ids) - 1: len(ids) - 1 + len(continuation)]
        return torch.log_softmax(logits.float(), dim=-1)
