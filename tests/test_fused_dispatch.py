"""The fused-kernel dispatch (kernels/fused_ops.py): which calls take the Triton kernels, the
on/off switch, and tiny bf16 models (Qwen2, Qwen2-VL, Qwen2.5-VL: vision tower + prefill + decode)
with the fused kernels on vs off; in fp32 the kernels never run and outputs are bit-identical.
Also the decode step's linears on the Triton GEMV (kernels/triton_gemv.py) vs ``F.linear``.

Runs on CUDA when there is a device; otherwise on CPU through Triton's interpreter, the CPU
tensors routed to the kernels by ``fused_ops.force_cpu_triton`` (see tests/fused_setup.py).
"""

from __future__ import annotations

import math

import fused_setup
import pytest
import torch
from fused_setup import interpreter_env  # noqa: F401 (autouse fixture)

DEVICE = fused_setup.setup()
pytestmark = pytest.mark.gpu

import kernels.triton_fused as tf
from kernels import fused_ops

CUDA = DEVICE == "cuda"


def randn(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    i = t.view(torch.int32 if t.dtype == torch.float32 else torch.int16).long()
    return torch.where(i < 0, -(2 ** (8 * t.element_size() - 1)) - i, i)


def _tables(n, rot_dim, dtype, seed):
    ang = randn(n, rot_dim // 2, dtype=torch.float32, scale=20.0, seed=seed)
    cos = torch.cat((ang, ang), dim=-1).cos()
    sin = torch.cat((-ang.sin(), ang.sin()), dim=-1)
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


@pytest.fixture
def fused_on():
    """Fused kernels enabled (and forced onto CPU tensors when running in the interpreter)."""
    fused_ops.set_enabled(True)
    fused_ops.force_cpu_triton(not CUDA)
    try:
        yield
    finally:
        fused_ops.force_cpu_triton(False)
        fused_ops.set_enabled(None)


FUSED = ("rms_norm", "fused_add_rms_norm", "fused_add_layer_norm", "silu_and_mul", "act_and_mul", "quick_gelu",
         "rotary", "vision_rotary")


def _count_calls(monkeypatch) -> dict[str, int]:
    """Counts the calls of each public launcher of kernels/triton_fused.py."""
    calls: dict[str, int] = {}
    for name in FUSED:
        fn = getattr(tf, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(tf, name, wrapped)
    if CUDA:  # the Triton attention backend fuses the text rotary into its KV write
        import kernels.triton_attention as ta

        real = ta._rotary_write_kv_kernel

        class _Counting:
            def __getitem__(self, grid):
                calls["rotary_write_kv"] = calls.get("rotary_write_kv", 0) + 1
                return real[grid]

        monkeypatch.setattr(ta, "_rotary_write_kv_kernel", _Counting())
    return calls


def _all_ops(dtype, rot_dim=64):
    x = randn(3, 128, dtype=dtype, seed=1)
    w = torch.ones(128, device=DEVICE, dtype=dtype)
    qk = randn(3, 6, 64, dtype=dtype, seed=2)
    cos, sin = _tables(3, rot_dim, dtype, seed=3)
    qkv = randn(3, 3, 2, 64, dtype=dtype, seed=4)
    vcos, vsin = randn(3, 64, dtype=torch.float32, seed=5), randn(3, 64, dtype=torch.float32, seed=6)
    b = randn(128, dtype=dtype, scale=0.1, seed=7)
    return [
        fused_ops.rms_norm(x, w, 1e-6),
        *fused_ops.fused_add_rms_norm(x, x, w, 1e-6),
        *fused_ops.fused_add_layer_norm(qk.view(9, 128)[:3], x, w, b, 1e-6),
        *fused_ops.fused_add_layer_norm(x, None, w, b, 1e-6),  # first block: torch's LayerNorm
        fused_ops.silu_and_mul(x),
        fused_ops.silu_mul(x, x),
        fused_ops.quick_gelu(x),
        fused_ops.apply_rotary_signed(qk, cos, sin, rot_dim),
        *fused_ops.vision_rotary(qkv, vcos, vsin),
    ]


def test_dispatch_routes(fused_on, monkeypatch):
    calls = _count_calls(monkeypatch)
    _all_ops(torch.bfloat16)
    assert calls == dict.fromkeys(FUSED, 1)
    calls.clear()
    _all_ops(torch.float32)  # fp32 keeps torch
    _all_ops(torch.bfloat16, rot_dim=32)  # partial rotary falls back (the rest still fused)
    assert "rotary" not in calls and calls["rms_norm"] == 1
    # tables broadcast over the tokens, a weight of another dtype: torch path, torch's results
    qk = randn(3, 6, 64, dtype=torch.bfloat16, seed=2)
    cos, sin = _tables(1, 64, torch.bfloat16, seed=3)
    a, b = qk.chunk(2, dim=-1)
    ref = qk * cos + torch.cat((b, a), dim=-1) * sin
    assert torch.equal(fused_ops.apply_rotary_signed(qk, cos, sin, 64), ref)
    x = randn(3, 64, dtype=torch.bfloat16, seed=1)
    w32 = torch.ones(64, device=DEVICE)
    assert fused_ops.rms_norm(x, w32, 1e-6).dtype == torch.float32
    # LayerNorm: fp32 weight (CPU only: torch's CUDA layer_norm itself refuses mixed dtypes), no
    # weight, rows wider than the kernel's: torch's results exactly
    h = randn(3, 64, dtype=torch.bfloat16, seed=2)
    cases = [(None, None, x, h), (None, None, randn(1, 8200, dtype=torch.bfloat16, seed=3),
                                  randn(1, 8200, dtype=torch.bfloat16, seed=4))]
    if DEVICE == "cpu":
        cases.insert(0, (w32, None, x, h))
    for w_, b_, xx, hh in cases:
        normed, res = fused_ops.fused_add_layer_norm(hh, xx, w_, b_, 1e-6)
        assert torch.equal(res, hh + xx)
        assert torch.equal(normed, torch.nn.functional.layer_norm(hh + xx, hh.shape[-1:], w_, b_, 1e-6))
    assert "rotary" not in calls and calls["rms_norm"] == 1 and calls["fused_add_layer_norm"] == 1
    calls.clear()
    fused_ops.set_enabled(False)
    _all_ops(torch.float16)
    assert calls == {}
    monkeypatch.setenv("VLMSERVE_FUSED_KERNELS", "0")
    fused_ops.set_enabled(None)
    assert not fused_ops.is_enabled()
    monkeypatch.setenv("VLMSERVE_FUSED_KERNELS", "1")
    fused_ops.set_enabled(None)
    assert fused_ops.is_enabled()
    _all_ops(torch.float16)
    assert calls["rotary"] == 1


def test_dispatch_matches_reference(fused_on):
    for dtype in (torch.bfloat16, torch.float16):
        fast = _all_ops(dtype)
        fused_ops.set_enabled(False)
        ref = _all_ops(dtype)
        fused_ops.set_enabled(True)
        for a, b in zip(fast, ref):
            assert (_ordered(a) - _ordered(b)).abs().max() <= 2


# -- models: fused on vs off ----------------------------------------------------------------------


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if p.dim() > 1:
            p.data.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        elif "norm" in n or "ln_q" in n:
            p.data.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))


TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}


def _lm_steps(model, dtype, mrope: bool) -> list[torch.Tensor]:
    """Prefill of 21 tokens, then one decode step, through the paged cache: hidden states + logits."""
    from kernels import AttentionMetadata, get_backend

    bs, L = 16, 9 if not CUDA else 37
    backend = get_backend(DEVICE)
    ids = torch.randint(0, 128, (L + 1,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    shape = backend.kv_cache_shape(4, bs, model.num_kv_heads, model.head_dim)
    kv = [torch.zeros(shape, device=DEVICE, dtype=dtype) for _ in range(model.num_layers)]
    blocks = [1, 2, 3]

    def meta(seq_len, q_len):
        slots = [blocks[p // bs] * bs + p % bs for p in range(seq_len - q_len, seq_len)]
        def t(v, dt=torch.int32):
            return torch.tensor(v, dtype=dt, device=DEVICE)

        return AttentionMetadata(
            slot_mapping=t(slots, torch.int64), block_tables=t([blocks]), query_start_loc=t([0, q_len]),
            seq_lens=t([seq_len]), max_query_len=q_len, max_seq_len=seq_len, block_size=bs,
            query_start_loc_cpu=[0, q_len], seq_lens_cpu=[seq_len],
        )

    pos, dpos = torch.arange(L, device=DEVICE), torch.tensor([L], device=DEVICE)
    if mrope:
        pos = torch.stack([pos, pos // 2, pos % 3])
        dpos = dpos.view(1, 1).expand(3, 1).contiguous()
    h1 = model(ids[:L], pos, kv, meta(L, L))
    h2 = model(ids[L:], dpos, kv, meta(L + 1, 1))
    return [h1, h2, model.compute_logits(h2)]


def _build(name: str):
    import transformers

    from engine.models.llama import Qwen2ForCausalLM
    from engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from kernels import get_backend

    backend = get_backend(DEVICE)
    if name == "qwen2":
        return Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT), backend)
    text = dict(TEXT, rope_parameters=MROPE, hidden_act="silu")
    if name == "qwen2_vl":
        vision = {"depth": 2, "embed_dim": 32, "num_heads": 4, "mlp_ratio": 4, "hidden_act": "quick_gelu",
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                  "hidden_size": 64}
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121)
        return Qwen2VLForConditionalGeneration(cfg, backend)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "hidden_act": "silu",
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "window_size": 56, "fullatt_block_indexes": [1],  # one window-attention block, one full
              "tokens_per_second": 2, "out_hidden_size": 64}
    cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121)
    return Qwen2_5_VLForConditionalGeneration(cfg, backend)


def _outputs(name: str, model, dtype) -> list[torch.Tensor]:
    outs = []
    if name != "qwen2":
        grid = [[1, 4, 4], [1, 2, 4]] if not CUDA else [[1, 16, 24], [2, 8, 8], [1, 6, 4]]
        p = sum(t * h * w for t, h, w in grid)
        pix = torch.randn(p, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
        outs.append(model.visual(pix, grid))
    return outs + _lm_steps(model, dtype, mrope=name != "qwen2")


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_model_fused_vs_unfused(name, fused_on, monkeypatch):
    model = _build(name)
    _randomize(model, seed=0)
    model = model.to(DEVICE).eval()
    # fp32: the fused kernels never run and the outputs are bit-identical
    calls = _count_calls(monkeypatch)
    fused_ops.set_enabled(False)
    ref32 = _outputs(name, model, torch.float32)
    fused_ops.set_enabled(True)
    got32 = _outputs(name, model, torch.float32)
    assert calls == {}
    assert all(torch.equal(a, b) for a, b in zip(got32, ref32))

    model = model.to(torch.bfloat16)
    fused_ops.set_enabled(False)
    ref = _outputs(name, model, torch.bfloat16)
    assert calls == {}
    fused_ops.set_enabled(True)
    got = _outputs(name, model, torch.bfloat16)
    expected = {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_write_kv" if CUDA else "rotary"}
    if name == "qwen2_vl":
        expected |= {"quick_gelu", "vision_rotary", "fused_add_layer_norm"}
    if name == "qwen2_5_vl":
        expected |= {"act_and_mul", "vision_rotary"}
    assert set(calls) == expected, calls
    for i, (a, b) in enumerate(zip(got, ref)):
        # one-ulp differences propagate through matmuls: compare against the fp32 outputs' scale
        err = ((a.float() - b.float()).abs().max() / ref32[i].abs().max()).item()
        scale_err = ((b.float() - ref32[i]).abs().max() / ref32[i].abs().max()).item()
        print(f"{name} output {i}: fused vs unfused bf16 {err:.2e} (unfused bf16 vs fp32 {scale_err:.2e})")
        assert err <= max(2e-2, 0.5 * scale_err), (name, i, err, scale_err)


@pytest.mark.parametrize("name", ["qwen2_vl"] + (["qwen2"] if CUDA else []))
@torch.no_grad()
def test_model_gemv_vs_torch_linear(name, fused_on, monkeypatch):
    """Prefill + one decode step with the decode's linears on the Triton GEMV (qkv, o, gate_up,
    down with the activation fused, the LM head) vs ``F.linear``, the other fused kernels on in
    both: the prefill (more than 8 rows) is bit-identical, the decode close in bf16."""
    import kernels.triton_gemv as tg

    if not CUDA and not tg._INTERPRETED:
        pytest.skip("kernels.triton_gemv was imported outside Triton's interpreter")
    model = _build(name)
    _randomize(model, seed=2)
    model = model.to(DEVICE).eval()
    mrope = name != "qwen2"
    ref32 = _lm_steps(model, torch.float32, mrope)
    model = model.to(torch.bfloat16)
    calls: dict[str, int] = {}
    for fn_name in ("gemv", "gemv_silu_mul"):
        fn = getattr(tg, fn_name)

        def wrapped(*a, _fn=fn, _name=fn_name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        monkeypatch.setattr(tg, fn_name, wrapped)
    monkeypatch.setattr(fused_ops, "_gemv_mod", False)  # as if the GEMV failed to import: F.linear
    ref = _lm_steps(model, torch.bfloat16, mrope)
    assert calls == {}
    monkeypatch.setattr(fused_ops, "_gemv_mod", tg)
    got = _lm_steps(model, torch.bfloat16, mrope)
    layers = model.num_layers
    assert calls == {"gemv": 3 * layers + 1, "gemv_silu_mul": layers}, calls
    assert torch.equal(got[0], ref[0])  # prefill: F.linear either way
    for i, (a, b) in enumerate(zip(got, ref)):
        err = ((a.float() - b.float()).abs().max() / ref32[i].abs().max()).item()
        scale_err = ((b.float() - ref32[i]).abs().max() / ref32[i].abs().max()).item()
        print(f"{name} output {i}: GEMV vs F.linear bf16 {err:.2e} (F.linear bf16 vs fp32 {scale_err:.2e})")
        assert err <= max(2e-2, 0.5 * scale_err), (name, i, err, scale_err)


def _hf_order_block(blk, x, cos, sin, groups, residual=None):
    """A vision block as it ran before the residual was carried (and as HF's towers run):
    ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``. Returns (output, None), so that the next
    block and the merger take it as a plain input."""
    assert residual is None
    x = x + blk.attn(blk.norm1(x), cos, sin, groups)
    return x + blk.mlp(blk.norm2(x)), None


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
@torch.no_grad()
def test_vision_tower_residual_form_bit_identical(name, fused_on, monkeypatch):
    """The residual-carrying blocks (each add done in the next norm's call, the last in the
    merger's ln_q) give the same bits as the plain block order on the torch path: fp32 (where the
    kernels never run) and bf16 with them off."""
    from engine.models.qwen2_5_vl import Qwen2_5_VisionBlock
    from engine.models.qwen2_vl import VisionBlock

    model = _build(name)
    _randomize(model, seed=1)
    model = model.to(DEVICE).eval()
    block_cls = VisionBlock if name == "qwen2_vl" else Qwen2_5_VisionBlock
    grid = [[1, 4, 4], [2, 2, 4]]
    p = sum(t * h * w for t, h, w in grid)
    pix = torch.randn(p, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        fused_ops.set_enabled(dtype == torch.float32)  # on in fp32: the torch path all the same
        got = model.visual(pix.to(dtype), grid)
        with monkeypatch.context() as m:
            m.setattr(block_cls, "forward", _hf_order_block)
            ref = model.visual(pix.to(dtype), grid)
        assert got.dtype == dtype and torch.equal(got, ref), (name, dtype)
