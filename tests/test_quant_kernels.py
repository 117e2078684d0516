"""Tests for the quantized GEMM kernels: kit/quantization/stream_gemm.py (small-M weight
streaming), kit/quantization/triton_gemm.py (dequantize for prefill) and the run-time layouts
of kit/quantization/weight_layout.py, against the dequantized reference. On the CPU the
kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with tiny
shapes and explicit tiles; on a GPU (marked gpu) with the autotuned ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kit.config import ModelConfig
from kit.loader import LoadedModel, random_weights
from kit.quantization import QuantAlgo, QuantConfig, Quantizer, build_linear, fp8, int4, int8_weight_only
from kit.quantization import linear as linear_mod
from kit.quantization.weight_layout import int4_bytes, int4_words, transpose_groups

triton = pytest.importorskip("triton")
from kit.quantization.stream_gemm import (_CONFIGS, STREAM_MAX_M, _max_split, _prune, new_counters,  # noqa: E402
                                          stream_gemm)
from kit.quantization.triton_gemm import dequantize  # noqa: E402

N, K = 48, 128
BF16 = torch.bfloat16
ULP = 2.0**-7  # one bf16 step, relative: every kernel output is rounded once to bf16 (the interpreter truncates)


def weight(seed: int = 0, n: int = N, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def acts(m: int, k: int = K, seed: int = 1, dtype=BF16, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 2).to(device=device, dtype=dtype)


def assert_rounded_once(y: torch.Tensor, want: torch.Tensor) -> None:
    """y (bf16) is the float32 product `want`, up to float32 summation order and one bf16 rounding."""
    assert y.dtype in (torch.bfloat16, torch.float16) and y.shape == want.shape
    tol = ULP * want.abs() + 1e-4 * want.abs().max()
    err = (y.float() - want).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, at most {tol.max().item():.3g} allowed"


# ------------------------------------------------------------------ layouts
def test_int4_words_are_the_stored_bytes_eight_columns_a_word():
    q, s, _ = int4.quantize_weight(weight(k=256), 32)
    words = int4_words(q)
    assert words.shape == (q.shape[0], q.shape[1] // 4) and words.dtype is torch.int32
    assert words.data_ptr() == q.data_ptr()  # a view: the same bytes
    assert torch.equal(int4_bytes(words), q)
    codes = int4.unpack_int4(q).long()  # (out, in)
    for b in range(8):  # column 8i + b is nibble b of word i
        assert torch.equal((words.long() >> (4 * b)) & 0xF, codes[:, b::8])
    assert torch.equal(transpose_groups(s), s.t()) and transpose_groups(s).is_contiguous()
    with pytest.raises(ValueError, match="multiple of 8"):
        int4_words(q[:, :6].contiguous())
    with pytest.raises(ValueError, match="uint8"):
        int4_words(q.to(torch.int16))
    with pytest.raises(ValueError, match="int32"):
        int4_bytes(q)


# ------------------------------------------------------------------ stream_gemm, interpreter
TILES = [None, {"BLOCK_N": 32, "SPLIT_K": 2}, {"BLOCK_M": 32, "SPLIT_K": 4},
         {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 64, "USE_DOT": False}]
TILE_IDS = ["one-program-a-tile", "split-k-2", "bm32-split-k-4", "gemv-fma"]


@pytest.mark.parametrize("zero_point,group", [(False, 32), (True, 32), (False, 64)])
@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
def test_stream_int4_equals_dequantized_product(zero_point, group, tile):
    q, s, z = int4.quantize_weight(weight(), group, zero_point)
    ref_w = int4.dequantize_weight(q, s, z, group)
    counters = new_counters(N, "cpu")
    pqs = (1 + torch.rand(K, generator=torch.Generator().manual_seed(3))).to(BF16)  # AWQ's x / s
    for m in (1, 5, 17):
        x = acts(m)
        y = stream_gemm(x, int4_words(q), transpose_groups(s), kind="int4", out_features=N,
                        counters=counters, group_size=group, zero=transpose_groups(z), config=tile)
        assert_rounded_once(y, x.float() @ ref_w.T)
        y = stream_gemm(x, int4_words(q), transpose_groups(s), kind="int4", out_features=N,
                        counters=counters, group_size=group, zero=transpose_groups(z), pre_quant_scale=pqs,
                        config=tile, magic=False)
        # x * pqs is rounded to bf16 first, as a separate multiply would (the interpreter truncates
        # where a GPU rounds to nearest: a bound on the whole product, not per element)
        want = (x * pqs).float() @ ref_w.T
        assert (y.float() - want).norm() / want.norm() < ULP
    assert int(counters.abs().sum()) == 0  # split-K leaves its counters at zero


@pytest.mark.parametrize("tile", TILES, ids=TILE_IDS)
def test_stream_int8_equals_dequantized_product(tile):
    q, s = int8_weight_only.quantize_weight(weight(k=100))  # K not a multiple of BLOCK_K: masked tail
    counters = new_counters(N, "cpu")
    for m in (1, 16, 33):
        x = acts(m, k=100)
        y = stream_gemm(x, q, s, kind="int8", out_features=N, counters=counters, config=tile)
        assert_rounded_once(y, x.float() @ int8_weight_only.dequantize_weight(q, s).T)


@pytest.mark.parametrize("per_token", [False, True], ids=["static", "per-token"])
@pytest.mark.parametrize("tile", TILES[:2] + TILES[3:], ids=TILE_IDS[:2] + TILE_IDS[3:])
def test_stream_fp8_quantizes_activations_in_the_prologue(per_token, tile):
    w = weight()
    qw, ws = fp8.quantize_weight_per_channel(w)
    counters = new_counters(N, "cpu")
    for m in (1, 6):
        x = acts(m) * torch.linspace(0.1, 3, m)[:, None].to(BF16)  # tokens of different ranges
        if per_token:
            xq, xs = fp8.quantize_per_token(x)
            static = None
        else:
            static = fp8.activation_scale(x.float().abs().amax() * 0.7)  # some values saturate at 448
            xq, xs = fp8.quantize_static(x, static), static
        y = stream_gemm(x, qw, ws, kind="fp8", out_features=N, counters=counters, x_scale=static,
                        per_token=per_token, config=tile)
        assert_rounded_once(y, (xq.float() @ qw.float().T) * xs * ws[None, :])


@pytest.mark.parametrize("tile", TILES[:2] + TILES[3:], ids=TILE_IDS[:2] + TILE_IDS[3:])
def test_stream_fp8_weight_only_keeps_activations_as_they_are(tile):
    w = weight()
    qw, ws = fp8.quantize_weight_per_channel(w)
    counters = new_counters(N, "cpu")
    for m in (1, 6):
        x = acts(m)
        y = stream_gemm(x, qw, ws, kind="fp8", out_features=N, counters=counters, weight_only=True, config=tile)
        assert_rounded_once(y, x.float() @ fp8.dequantize(qw, ws).T)


@pytest.mark.parametrize("zero_point,dtype", [(False, BF16), (True, BF16), (True, torch.float16)])
def test_stream_int4_gemv_steps_over_several_groups_with_a_short_last_step(zero_point, dtype):
    """BLOCK_K = 3 groups a step over 4 groups: the second step holds one group, the rest masked."""
    q, s, z = int4.quantize_weight(weight(), 32, zero_point)
    want_w = int4.dequantize_weight(q, s, z, 32)
    counters = new_counters(N, "cpu")
    x = acts(1, dtype=dtype)
    for tile in ({"BLOCK_M": 1, "BLOCK_K": 96, "USE_DOT": False, "SPLIT_K": 2}, {"BLOCK_K": 96}):
        y = stream_gemm(x, int4_words(q), transpose_groups(s), kind="int4", out_features=N, counters=counters,
                        group_size=32, zero=transpose_groups(z), config=tile)
        assert_rounded_once(y, x.float() @ want_w.T)
    assert int(counters.abs().sum()) == 0


def test_stream_int8_bit_trick_codes_cover_every_value():
    """The FMA path turns int8 codes into floats by their bits: every code -127..127 (and -128) is exact."""
    q = torch.arange(-128, 128, dtype=torch.int8).reshape(16, 16)
    eye = torch.eye(16, dtype=BF16)
    y = stream_gemm(eye, q, torch.ones(16), kind="int8", out_features=16, counters=new_counters(16, "cpu"),
                    config={"BLOCK_M": 1, "BLOCK_K": 16, "USE_DOT": False})
    assert torch.equal(y.float(), q.float().T)


def test_stream_fp8_activation_codes_are_exactly_torchs():
    """Through an identity weight the kernel returns its fp8 activation codes times the scale:
    every value, ties, subnormals and saturation included, rounds as torch's float8_e4m3fn cast
    does (a wrong code is off by >= 1/16, the bound is one bf16 step)."""
    eye = torch.eye(K)[:64].to(torch.float8_e4m3fn)
    x = torch.cat([acts(2), torch.tensor([[200.0 * 0.37, -126.76 * 0.37, 1000.0, 0.001] + [0.0] * (K - 4)])]).to(BF16)
    scale = torch.tensor([0.37])
    y = stream_gemm(x, eye, torch.ones(64), kind="fp8", out_features=64, counters=new_counters(64, "cpu"),
                    x_scale=scale)
    assert_rounded_once(y, fp8.dequantize(fp8.quantize_static(x, scale), scale)[:, :64])


def test_stream_split_k_is_deterministic_and_resets_its_counters():
    q, s = int8_weight_only.quantize_weight(weight())
    counters = new_counters(N, "cpu")
    x = acts(3)
    runs = [stream_gemm(x, q, s, kind="int8", out_features=N, counters=counters, config={"SPLIT_K": 4})
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and int(counters.abs().sum()) == 0


def test_stream_gemm_rejects_what_it_cannot_run():
    q, s, _ = int4.quantize_weight(weight(), 16)
    c = new_counters(N, "cpu")
    with pytest.raises(ValueError, match="power-of-two group_size >= 32"):
        stream_gemm(acts(1), int4_words(q), s.t().contiguous(), kind="int4", out_features=N, counters=c,
                    group_size=16)
    with pytest.raises(ValueError, match="int32 words"):
        stream_gemm(acts(1), q, s.t().contiguous(), kind="int4", out_features=N, counters=c, group_size=32)
    with pytest.raises(ValueError, match=f"at most {STREAM_MAX_M}"):
        stream_gemm(acts(STREAM_MAX_M + 1), q, s, kind="int8", out_features=N, counters=c)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        stream_gemm(acts(1, dtype=torch.float32), q, s, kind="int8", out_features=N, counters=c)
    with pytest.raises(ValueError, match="x_scale"):
        stream_gemm(acts(1), q, s, kind="fp8", out_features=N, counters=c)
    with pytest.raises(ValueError, match="exactly one of"):
        stream_gemm(acts(1), q, s, kind="fp8", out_features=N, counters=c, per_token=True, weight_only=True)
    with pytest.raises(ValueError, match="BLOCK_M=1"):
        stream_gemm(acts(1), q, s, kind="int8", out_features=N, counters=c, config={"USE_DOT": False})
    with pytest.raises(ValueError, match="counters hold"):
        stream_gemm(acts(40), q, s, kind="int8", out_features=N, counters=c,
                    config={"BLOCK_M": 1, "USE_DOT": False, "SPLIT_K": 2})
    with pytest.raises(ValueError, match="kind 'int2'"):
        stream_gemm(acts(1), q, s, kind="int2", out_features=N, counters=c)


def test_autotuning_candidates_split_k_only_where_the_tiles_do_not_fill_the_gpu():
    def kept(n, k, wkind, group=128, bm=16):
        return {(c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]) for c in _prune(_CONFIGS[bm], {"N": n, "K": k},
                                                                           WKIND=wkind, GROUP=group)}
    lm_head = kept(128256, 4096, 1)  # 8016 tiles of 16 rows: plenty of programs
    assert {s for _, s in lm_head} == {1} and _max_split(16, 128256, 4096, 1, 128) == 1
    down = kept(4096, 14336, 1)  # Llama-3.1-8B down_proj: 64 tiles of 64 rows for 132 SMs
    assert (64, 4) in down and (128, 8) in down and _max_split(16, 4096, 14336, 1, 128) == 8
    assert max(s for _, s in kept(4096, 256, 0)) == 1  # 2 steps of K: nothing to split
    # M = 1: the GEMV (FMAs, one token a program) next to the tensor-core tiles; int4 steps whole groups
    one = _prune(_CONFIGS[1], {"N": 4096, "K": 14336}, WKIND=1, GROUP=128)
    assert {c.kwargs["USE_DOT"] for c in one} == {True, False}
    assert {c.kwargs["BLOCK_M"] for c in one if not c.kwargs["USE_DOT"]} == {1}
    assert all(c.kwargs["BLOCK_K"] % 128 == 0 for c in one)
    assert {c.kwargs["BLOCK_K"] for c in _prune(_CONFIGS[16], {"N": 4096, "K": 4096}, WKIND=1, GROUP=256)} == {256}


# ------------------------------------------------------------------ dequantize (prefill), interpreter
@pytest.mark.parametrize("bits,zero_point,group", [(8, False, 0), (4, False, 32), (4, True, 64), (4, False, 16)])
def test_dequantize_kernel_reads_the_run_time_layout(bits, zero_point, group):
    w = weight()
    if bits == 8:
        q, s = int8_weight_only.quantize_weight(w)
        z, ref = None, int8_weight_only.dequantize_weight(q, s)
    else:
        q, s, z = int4.quantize_weight(w, group, zero_point)
        ref = int4.dequantize_weight(q, s, z, group)
        q, s, z = int4_words(q), transpose_groups(s), transpose_groups(z)
    out = dequantize(q, s, z, bits=bits, group_size=group, out_features=N, in_features=K, dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ------------------------------------------------------------------ the layers' fast paths, interpreter
@pytest.fixture
def fast_on_cpu(monkeypatch):
    """Take the CUDA fast path on the CPU (kernels through the interpreter): the layout prepared
    in the constructor, the streaming kernel up to stream_max_m, the prefill path above."""
    monkeypatch.setattr(linear_mod.WeightOnlyLinear, "_fast_ok", lambda self: True)
    monkeypatch.setattr(linear_mod.FP8Linear, "_fast_ok", lambda self: True)


def _tiny_quantized(algo: QuantAlgo, **kw):
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=64)
    loaded = LoadedModel(cfg, random_weights(cfg, seed=0, std=0.05), name="tiny", source_format="synthetic")
    qc = QuantConfig(algo, group_size=32, calib_size=2, calib_max_seq_len=16, **kw)
    return qc, Quantizer(qc).quantize(loaded, progress=False)


@pytest.mark.parametrize("algo,zero_point", [(QuantAlgo.W8A16, False), (QuantAlgo.W4A16_AWQ, False),
                                             (QuantAlgo.W4A16_GPTQ, True)], ids=str)
def test_weight_only_layer_streams_small_m_and_dequantizes_large_m(fast_on_cpu, algo, zero_point):
    qc, q = _tiny_quantized(algo, has_zero_point=zero_point)
    prefix = ["model.layers.0.mlp.down_proj"]  # AWQ: carries a pre_quant_scale
    ref = build_linear(q.weights, prefix, qc, bias=False, device="cpu", dtype=BF16, force_reference=True)
    fast = build_linear(q.weights, prefix, qc, bias=False, device="cpu", dtype=BF16)
    assert fast.path.startswith("triton stream") and fast.qweight is None  # stored tensors let go
    assert fast.weight_bytes == ref.weight_bytes  # same bytes, other layout
    torch.testing.assert_close(fast.dequantized_weight(), ref.dequantized_weight(), rtol=0, atol=0)
    for m in (2, fast.stream_max_m + 3):  # the streaming kernel, then dequantize + F.linear
        x = acts(m, k=128)
        xin = x if ref.pqs is None else x * ref.pqs.to(BF16)  # the fast path rounds x / s to bf16
        want = xin.float() @ ref.dequantized_weight().T
        y = fast(x)
        assert y.dtype is BF16 and y.shape == want.shape
        assert (y.float() - want).norm() / want.norm() < (ULP if m <= fast.stream_max_m else 1e-2)


@pytest.mark.parametrize("algo", [QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN], ids=str)
def test_fp8_layer_streams_small_m_with_the_references_numerics(fast_on_cpu, algo):
    qc, q = _tiny_quantized(algo)
    a = "model.layers.0.self_attn"
    prefixes = [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]  # per tensor: three scales, fused
    ref = build_linear(q.weights, prefixes, qc, bias=False, device="cpu", dtype=BF16, force_reference=True)
    fast = build_linear(q.weights, prefixes, qc, bias=False, device="cpu", dtype=BF16)
    assert fast.path.startswith("triton stream")
    for m in (1, 3, fast.stream_max_m):
        x = acts(m, k=64)
        assert_rounded_once(fast(x), ref.forward_reference(x))


def test_fp8_layer_weight_only_decode_streams_bf16_activations(fast_on_cpu):
    qc, q = _tiny_quantized(QuantAlgo.FP8)
    prefix = ["model.layers.0.mlp.down_proj"]
    fast = build_linear(q.weights, prefix, qc, bias=False, device="cpu", dtype=BF16)
    fast.weight_only_decode = True
    for m in (1, 4):
        x = acts(m, k=128)
        assert_rounded_once(fast(x), x.float() @ fast.dequantized_weight().T)  # no activation quantization


# ------------------------------------------------------------------ compiled for Hopper, without a GPU
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kit.quantization.stream_gemm import _stream_kernel
from kit.quantization.triton_gemm import _dequantize_kernel

def compile(fn, sig, consts, warps, stages):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return "wgmma" if "wgmma" in k.asm["ptx"] else "mma.sync" if "mma.sync" in k.asm["ptx"] else "none"

for wkind, xq, zero, split, bm, bn, warps, dot in [
        (1, 0, True, 4, 16, 64, 4, True), (1, 0, False, 1, 16, 16, 4, True), (0, 0, False, 8, 16, 128, 8, True),
        (2, 2, False, 2, 64, 128, 8, True), (2, 1, False, 1, 16, 64, 4, True), (1, 0, True, 4, 1, 64, 4, False),
        (2, 0, False, 1, 1, 128, 8, False), (0, 0, False, 8, 1, 64, 4, False)]:
    w = {0: "*i8", 1: "*i32", 2: "*fp8e4nv"}[wkind]
    s = "*fp16" if wkind == 1 else "*fp32"
    sig = {"x_ptr": "*bf16", "w_ptr": w, "s_ptr": s, "z_ptr": "*u8", "xs_ptr": "*fp32", "pqs_ptr": "*bf16",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", **{a: "i32" for a in (
           "M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_ym")}}
    consts = dict(WKIND=wkind, GROUP=128 if wkind == 1 else 0, HAS_ZERO=zero, HAS_PQS=wkind == 1, XQ=xq,
                  MAGIC=0x4300 if wkind == 1 else 0, MAGIC_BIAS=128.0 if wkind == 1 else 0.0, DOT_F32=False,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128 if dot else 256, SPLIT_K=split, USE_DOT=dot)
    print(wkind, bn, compile(_stream_kernel, sig, consts, warps, 3))
sig = {"w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_wn": "i32"}
print("dequant", compile(_dequantize_kernel, sig, dict(INT4=True, GROUP=128, HAS_ZERO=True, BLOCK_N=64, BLOCK_K=128), 4, 1))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run compiles the kernels for real")
def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton's compiler and ptxas build sm_90 code on the CPU: the interpreter accepts things the
    compiler does not (globals, dtypes), so the CPU suite checks the real compile too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    res = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    # the tensor-core tiles use wgmma (fp8 x fp8 too), the GEMV tiles (USE_DOT=False) no tensor cores
    assert lines[:9] == ["1 64 wgmma", "1 16 mma.sync", "0 128 wgmma", "2 128 wgmma", "2 64 wgmma", "1 64 none",
                         "2 128 none", "0 64 none", "dequant none"], res.stdout


# ------------------------------------------------------------------ GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["int8", "int4", "int4-zero", "fp8-static", "fp8-per-token", "fp8-weight-only"])
def test_gpu_stream_gemm_autotuned_and_forced_tiles_match_reference(kind):
    n, k, group = 1056, 2048, 128
    w = weight(n=n, k=k).cuda()
    counters = new_counters(n, "cuda")
    kw: dict = {}
    if kind.startswith("int4"):
        q, s, z = int4.quantize_weight(w, group, kind.endswith("zero"))
        ref_w, args = int4.dequantize_weight(q, s, z, group), (int4_words(q), transpose_groups(s))
        kw = dict(kind="int4", group_size=group, zero=transpose_groups(z))
    elif kind == "int8":
        q, s = int8_weight_only.quantize_weight(w)
        ref_w, args, kw = int8_weight_only.dequantize_weight(q, s), (q, s), dict(kind="int8")
    else:
        q, s = fp8.quantize_weight_per_channel(w)
        ref_w, args = q.float() * s[:, None], (q, s)
        kw = dict(kind="fp8", per_token=kind.endswith("token"), weight_only=kind.endswith("only"))
    for m in (1, 4, 16, 40, 64):
        x = acts(m, k=k, device="cuda")
        if kind == "fp8-static":
            kw["x_scale"] = fp8.activation_scale(x.float().abs().amax())
        xin = x.float()
        if kind in ("fp8-static", "fp8-per-token"):
            xq, xs = fp8.quantize_per_token(x) if kw["per_token"] else (fp8.quantize_static(x, kw["x_scale"]), kw["x_scale"])
            xin = xq.float() * xs
        want = xin @ ref_w.T
        tiles = [None, {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "SPLIT_K": 4}]
        if m == 1:  # the GEMV on FMAs, alone and split
            tiles += [{"BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 256, "USE_DOT": False},
                      {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "USE_DOT": False, "SPLIT_K": 4}]
        for tile in tiles:
            y = stream_gemm(x, *args, out_features=n, counters=counters, config=tile, **kw)
            torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert int(counters.abs().sum()) == 0


@pytest.mark.gpu
@cuda
def test_gpu_stream_gemm_split_k_replays_in_a_cuda_graph():
    q, s = int8_weight_only.quantize_weight(weight(n=4096, k=4096).cuda())
    counters = new_counters(4096, "cuda")
    x = acts(2, k=4096, device="cuda")
    tile = {"BLOCK_N": 64, "SPLIT_K": 8}
    want = stream_gemm(x, q, s, kind="int8", out_features=4096, counters=counters, config=tile)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = stream_gemm(x, q, s, kind="int8", out_features=4096, counters=counters, config=tile)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, want)
    assert int(counters.abs().sum()) == 0


@pytest.mark.gpu
@cuda
def test_gpu_fp8_layer_times_its_two_paths_once_and_matches_the_reference():
    from kit.quantization.path_choice import CHOOSER

    w = weight(n=1024, k=2048).cuda()
    qc = QuantConfig(QuantAlgo.FP8)
    st = fp8.quantize_linear(w, per_channel=False, input_amax=torch.tensor(8.0, device="cuda"))
    kw = dict(bias=False, device="cuda", dtype=BF16)
    fast = build_linear({f"l.{k}": v for k, v in st.items()}, ["l"], qc, **kw)
    ref = build_linear({f"l.{k}": v for k, v in st.items()}, ["l"], qc, force_reference=True, **kw)
    CHOOSER.clear()
    for m in (1, 16):
        x = acts(m, k=2048, device="cuda")
        y = fast(x)
        torch.testing.assert_close(y.float(), ref(x).float(), rtol=2e-2, atol=2e-2 * y.float().abs().max().item())
        key = ("FP8", False, 1, m, 1024, 2048, str(BF16))
        assert CHOOSER.choices[key] in ("stream", "scaled_mm") and set(CHOOSER.times[key]) == {"stream", "scaled_mm"}
    fast.weight_only_decode = True
    x = acts(1, k=2048, device="cuda")
    want = x.float() @ fast.dequantized_weight().T
    torch.testing.assert_close(fast(x).float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
