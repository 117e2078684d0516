"""Tests for kit/ops.py (the decoder's math) and kit/layer_kinds.py (the kinds every consumer dispatches on)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kit.ops as ops
from kit.backends.tensorrt_lowering import TensorRTLowering
from kit.backends.tensorrt_reference import _Reference
from kit.backends.torch_backend import TorchBackend
from kit.batch import ForwardBatch, SequenceInput
from kit.config import ModelConfig
from kit.layer_kinds import LAYER_KINDS, CostShape, check_covers
from kit.network import LAYER_KINDS as NETWORK_KINDS
from kit.ops import apply_rope, causal_mask, paged_attention, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

KIT = Path(__file__).resolve().parents[1] / "kit"
CFG = dict(family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16)


def test_rms_norm_is_the_float32_formula_cast_before_the_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), 1 + 0.1 * torch.randn(64, generator=g)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(rms_norm(x, w, 1e-5), expected, atol=1e-6, rtol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    got = rms_norm(xb, wb, 1e-5)
    assert got.dtype == torch.bfloat16
    xf = xb.float()
    expected = wb * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert (got.float() - expected.float()).abs().max() <= 2 ** -7 * expected.float().abs().max()


def test_rope_inv_freq_default_linear_and_llama3():
    base = ModelConfig(**CFG, rope_theta=10000.0)
    inv = rope_inv_freq(base)
    assert inv.shape == (8,) and inv.dtype == torch.float32
    torch.testing.assert_close(inv, torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)]))
    linear = ModelConfig(**CFG, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope_inv_freq(linear), inv / 4)
    llama3 = ModelConfig(**CFG, rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    scaled = rope_inv_freq(llama3)
    wavelen = 2 * math.pi / inv
    short, long = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long.any()
    torch.testing.assert_close(scaled[short], inv[short])  # short wavelengths kept
    torch.testing.assert_close(scaled[long], inv[long] / 8)  # long ones scaled by the factor
    mid = ~short & ~long
    assert ((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 8)).all()  # a smooth ramp between


def test_rope_rotates_pairs_and_position_zero_is_identity():
    inv = rope_inv_freq(ModelConfig(**CFG))
    pos = torch.tensor([0, 1, 5, 9])
    cos, sin = rope_cos_sin(pos, inv)
    assert cos.shape == (4, 16) and torch.equal(cos[:, :8], cos[:, 8:])
    half_cos, half_sin = rope_cos_sin(pos, inv, torch.float16)
    assert half_cos.dtype == torch.float16 and torch.equal(half_cos, cos.half()) and torch.equal(half_sin, sin.half())
    x = torch.randn(4, 3, 16)  # (T, H, D)
    y = apply_rope(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(y[0], x[0])
    pair = lambda t: t[..., :8].pow(2) + t[..., 8:].pow(2)  # noqa: E731  (the rotated pairs: i and i + D/2)
    torch.testing.assert_close(pair(y), pair(x))
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    q, k = torch.randn(16), torch.randn(16)

    def dot(m: int, n: int) -> float:
        c, s = rope_cos_sin(torch.tensor([m, n]), inv)
        return float(apply_rope(q, c[0], s[0]) @ apply_rope(k, c[1], s[1]))
    assert dot(7, 3) == pytest.approx(dot(14, 10), rel=1e-4)


def test_causal_mask_and_sliding_window():
    pos = torch.arange(5)
    assert torch.equal(causal_mask(pos, pos), torch.ones(5, 5, dtype=torch.bool).tril())
    window = causal_mask(pos, pos, 2)
    assert window.sum(-1).tolist() == [1, 2, 2, 2, 2] and not window[4, 2] and window[4, 3]
    offset = causal_mask(torch.tensor([3, 4]), torch.arange(5))  # new tokens after 3 cached ones
    assert offset.sum(-1).tolist() == [4, 5]


def test_paged_attention_equals_dense_causal_attention():
    g = torch.Generator().manual_seed(3)
    bs, kvh, h, d = 4, 2, 4, 16
    lengths, order = (6, 3), [[5, 2], [0]]
    k_cache, v_cache = torch.randn(8, bs, kvh, d, generator=g), torch.randn(8, bs, kvh, d, generator=g)
    batch = ForwardBatch.build([SequenceInput(list(range(6)), 0, order[0]), SequenceInput([1], 2, order[1])], bs)
    q = torch.randn(batch.num_tokens, h, d, generator=g)
    out = paged_attention(q, k_cache, v_cache, batch, 0.25)
    assert out.shape == (7, h, d)
    for s, (n, table) in enumerate(zip(lengths, order)):
        k = k_cache[table].reshape(-1, kvh, d)[:n].repeat_interleave(h // kvh, 1)  # (n, H, D)
        v = v_cache[table].reshape(-1, kvh, d)[:n].repeat_interleave(h // kvh, 1)
        rows = slice(int(batch.query_start_loc[s]), int(batch.query_start_loc[s + 1]))
        qpos = batch.positions[rows]
        scores = torch.einsum("thd,lhd->htl", q[rows], k) * 0.25
        scores = scores.masked_fill(~causal_mask(qpos, torch.arange(n)), float("-inf"))
        expected = torch.einsum("htl,lhd->thd", scores.softmax(-1), v)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


def test_swiglu():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)


def test_each_op_is_defined_once_in_kit():
    defined: dict[str, list[str]] = {}
    for path in KIT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defined.setdefault(node.name, []).append(str(path.relative_to(KIT)))
    for name in ("rms_norm", "rope_inv_freq", "rope_cos_sin", "apply_rope", "causal_mask", "paged_attention",
                 "swiglu"):
        assert defined[name] == ["ops.py"], (name, defined[name])
    assert not [n for n in defined if n in ("rope", "_rope", "_inv_freq", "rms")]  # no private copies


# ---------------------------------------------------------------- the kind table
def test_every_consumer_handles_exactly_the_layer_kinds():
    assert set(NETWORK_KINDS) == set(LAYER_KINDS)
    for table in (TorchBackend._PREPARE, TensorRTLowering._LOWER, _Reference.RUN):
        assert set(table) == set(LAYER_KINDS)
    with pytest.raises(TypeError, match=r"missing \['rope'\], unknown \['conv'\]"):
        check_covers("X", [k for k in LAYER_KINDS if k != "rope"] + ["conv"])
    for kind in LAYER_KINDS.values():
        assert all(callable(getattr(ops, name)) for name in kind.ops) and kind.computes


def test_kind_costs():
    c = ModelConfig(**CFG)
    s = CostShape(num_tokens=8, num_seqs=2, q_len=4, ctx_len=10, elem=2)
    params = 3 * c.hidden_size * c.intermediate_size
    assert LAYER_KINDS["mlp"].cost(c, params, 2 * params, s) == (
        2.0 * 8 * params, float(2 * params + 8 * (2 * c.hidden_size + 3 * c.intermediate_size) * 2))
    flops, _ = LAYER_KINDS["lm_head"].cost(c, c.vocab_size * c.hidden_size, 0, s)
    assert flops == 2.0 * 2 * c.vocab_size * c.hidden_size  # only the logits rows (one per sequence)
    keys = 10 - 1.5
    assert LAYER_KINDS["attention"].cost(c, 0, 0, s)[0] == 4.0 * 2 * 4 * keys * c.num_attention_heads * c.head_dim
