"""The fused kernels of kit/kernels/ against their torch references (the unfused math of kit/ops.py):
on the CPU through Triton's interpreter with tiny shapes, on a GPU in bf16; and the PyTorch backend
with fusion on against fusion off."""

import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first JIT-decorated

from helpers import FAMILY_CONFIGS, error_against, run_chunks  # noqa: E402
from kit.backends.torch_backend import TorchBackend  # noqa: E402
from kit.backends.triton_attention import triton_available  # noqa: E402
from kit.engine import Engine, ForwardBatch, SequenceInput  # noqa: E402
from kit.kernels import (  # noqa: E402
    LaunchCounter,
    fused_add_rms_norm,
    greedy_pick,
    greedy_pick_reference,
    rms_norm_kernel,
    rope_kv_write,
    rope_kv_write_reference,
    silu_mul,
)
from kit.config import ModelConfig  # noqa: E402
from kit.loader import LoadedModel, ModelLoader, random_weights  # noqa: E402
from kit.network import Network, NetworkBuilder  # noqa: E402
from kit.quantization.config import QuantConfig  # noqa: E402
from kit.quantization.kv_cache import dequantize_kv  # noqa: E402
from kit.ops import apply_rope, rms_norm, rope_cos_sin, swiglu  # noqa: E402

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")
# bf16 keeps 8 mantissa bits: the Triton kernels round once where the references round per op
BF16_TOL = dict(atol=3e-2, rtol=2e-2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------- references are the unfused ops
def test_references_are_the_unfused_ops_exactly():
    g = _gen(0)
    x, res, w = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
    expected_res = res + x
    expected = rms_norm(expected_res, w, 1e-6)
    out = fused_add_rms_norm(x, res, w, 1e-6, impl="torch")
    assert torch.equal(res, expected_res) and torch.equal(out, expected)
    assert torch.equal(rms_norm_kernel(x, w, 1e-6, impl="torch"), rms_norm(x, w, 1e-6))
    gu = torch.randn(2, 10, generator=g)
    assert torch.equal(silu_mul(gu, impl="torch"), swiglu(gu[:, :5], gu[:, 5:]))


def _qkv_case(dtype, t=3, heads=4, kv_heads=2, d=16, seed=1):
    g = _gen(seed)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)  # the qkv GEMM's output
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.reshape(t, heads, d), k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d)  # strided views
    inv = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)])
    caches = [torch.zeros(6, 4, kv_heads, d, dtype=dtype) for _ in range(4)]
    return q, k, v, inv, caches


def test_rope_kv_write_reference_is_apply_rope_and_the_scatter():
    q, k, v, inv, (kc, vc, _, _) = _qkv_case(torch.float32)
    pos, slots = torch.tensor([0, 7, 12]), torch.tensor([5, 22, 1])
    q_rot = rope_kv_write(q, k, v, pos, inv, kc, vc, slots, impl="torch")
    cos, sin = rope_cos_sin(pos, inv)
    assert torch.equal(q_rot, apply_rope(q, cos[:, None], sin[:, None]))
    flat_k, flat_v = kc.view(-1, 2, 16), vc.view(-1, 2, 16)
    assert torch.equal(flat_k[slots], apply_rope(k, cos[:, None], sin[:, None]))
    assert torch.equal(flat_v[slots], v) and flat_k.abs().sum(-1).sum(-1).nonzero().flatten().tolist() == [1, 5, 22]


# ------------------------------------------------------------------------- Triton (interpreter) vs reference
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [48, 64])
def test_fused_add_rms_norm_triton_matches_reference(dtype, hidden):
    g = _gen(hidden)
    x = torch.randn(5, hidden, generator=g).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    res_t, res_r = res.clone(), res.clone()
    out_t = fused_add_rms_norm(x, res_t, w, 1e-5, impl="triton")
    out_r = fused_add_rms_norm(x, res_r, w, 1e-5, impl="torch")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else BF16_TOL
    assert out_t.dtype == dtype and out_t.shape == (5, hidden)
    torch.testing.assert_close(res_t.float(), res_r.float(), **tol)  # the residual was updated in place
    torch.testing.assert_close(out_t.float(), out_r.float(), **tol)
    torch.testing.assert_close(rms_norm_kernel(x, w, 1e-5, impl="triton").float(), rms_norm(x, w, 1e-5).float(), **tol)


@requires_triton
def test_a_float32_update_of_a_bf16_residual_is_rounded_first():
    """A tensor-parallel float32 partial sum reaches the norm unrounded: both paths round it to bf16 and add it
    as a bf16 update would be added (the residual equals the add of the rounded update, in both)."""
    g = _gen(7)
    x = torch.randn(5, 64, generator=g) * 0.37
    res = torch.randn(5, 64, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16()
    want = res.clone()
    out_want = fused_add_rms_norm(x.bfloat16(), want, w, 1e-5, impl="torch")
    for impl in ("torch", "triton"):
        got = res.clone()
        out = fused_add_rms_norm(x, got, w, 1e-5, impl=impl)
        assert got.dtype == out.dtype == torch.bfloat16
        if impl == "torch":
            assert torch.equal(got, want)
        else:  # NOTE: the interpreter's casts to bf16 truncate (the GPU test below asserts equality)
            torch.testing.assert_close(got.float(), want.float(), **BF16_TOL)
        torch.testing.assert_close(out.float(), out_want.float(), **BF16_TOL)
    with pytest.raises(ValueError, match="or be float32"):
        fused_add_rms_norm(x.half(), res.clone(), w, 1e-5)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_triton_matches_reference(dtype):
    gu = torch.randn(3, 2 * 1100, generator=_gen(2)).to(dtype)  # inter 1100: two column blocks, a ragged one
    out = silu_mul(gu, impl="triton")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else BF16_TOL
    assert out.shape == (3, 1100) and out.dtype == dtype
    torch.testing.assert_close(out.float(), swiglu(gu[:, :1100], gu[:, 1100:]).float(), **tol)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write_triton_matches_reference(dtype):
    q, k, v, inv, (kc_t, vc_t, kc_r, vc_r) = _qkv_case(dtype)
    pos = torch.tensor([0, 9, 5000])  # a long-context angle: the kernel's range reduction
    slots = torch.tensor([3, 17, -1])  # a negative slot writes nothing
    q_t = rope_kv_write(q, k, v, pos, inv, kc_t, vc_t, slots, impl="triton")
    q_r = rope_kv_write_reference(q, k, v, pos, inv, kc_r, vc_r, slots.clamp(min=0))
    kc_r.view(-1, 2, 16)[0] = 0  # the reference wrote token 2 into slot 0; the kernel skipped it
    vc_r.view(-1, 2, 16)[0] = 0
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(q_t.float(), q_r.float(), **tol)
    torch.testing.assert_close(kc_t.float(), kc_r.float(), **tol)
    assert torch.equal(vc_t, vc_r)  # v is copied, not rotated


def _quantized_case(dtype, kv, **shape):
    """_qkv_case with int8 / fp8 caches (two written by each path) and their float32 scales."""
    q, k, v, inv, caches = _qkv_case(dtype, **shape)
    cdt = torch.int8 if kv == "INT8" else torch.float8_e4m3fn
    caches = [c.to(cdt) for c in caches]
    scales = [torch.zeros(c.shape[:3]) for c in caches]
    return q, k, v, inv, caches, scales


def _check_quantized_write(kv, q, k, v, inv, pos, slots, caches, scales):
    """The kernel against the reference (apply_rope, quantize_kv, scatter): v's codes and scales exactly (the same
    IEEE divisions and rounding), k's dequantized values within one code of each other (the kernel rotates in
    float32 from exact cos / sin, the reference rounds them: a value near a code boundary may round apart)."""
    (kc_t, vc_t, kc_r, vc_r), (ks_t, vs_t, ks_r, vs_r) = caches, scales
    q_t = rope_kv_write(q, k, v, pos, inv, kc_t, vc_t, slots, impl="triton", k_scale=ks_t, v_scale=vs_t)
    q_r = rope_kv_write(q, k, v, pos, inv, kc_r, vc_r, slots, impl="torch", k_scale=ks_r, v_scale=vs_r)
    tol = dict(atol=2e-5, rtol=1e-5) if q.dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(q_t.float(), q_r.float(), **tol)
    assert torch.equal(vc_t.view(torch.int8), vc_r.view(torch.int8)) and torch.equal(vs_t, vs_r)
    torch.testing.assert_close(ks_t, ks_r, rtol=2e-2 if q.dtype == torch.bfloat16 else 1e-5, atol=0)
    deq_t = dequantize_kv(kc_t, ks_t)
    deq_r = dequantize_kv(kc_r, ks_r)
    step = torch.maximum(ks_t, ks_r)[..., None] * (1.0 if kv == "INT8" else 32.0)  # fp8: 3 mantissa bits near 448
    step = step * (1.01 if q.dtype == torch.float32 else 2.0)  # 16-bit: the rotated keys differ by an ulp too
    assert bool(((deq_t - deq_r).abs() <= step + 1e-6).all())
    written = torch.zeros(kc_t.shape[:3], dtype=torch.bool, device=kc_t.device)
    written.view(-1, kc_t.shape[2])[slots] = True
    assert bool((ks_t[written] > 0).all()) and bool((ks_t[~written] == 0).all())  # only the tokens' slots


@requires_triton
@pytest.mark.parametrize("kv", ["INT8", "FP8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_write_quantizes_an_8bit_cache_like_quantize_kv(kv, dtype):
    q, k, v, inv, caches, scales = _quantized_case(dtype, kv)
    _check_quantized_write(kv, q, k, v, inv, torch.tensor([0, 9, 5000]), torch.tensor([3, 17, 22]), caches, scales)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_pick_triton_matches_reference(dtype):
    """One read of each row: the argmax (the lowest id among equal logits, across lanes and tiles, as
    torch.argmax) and its log-softmax, against the unfused ops."""
    g = _gen(11)
    x = torch.randn(4, 9000, generator=g).to(dtype)  # 3 tiles of 4096
    top = (x.float().max() + 1).to(dtype)
    x[0, [5, 5 + 4096, 8200]] = top  # ties in one lane, two tiles apart, and in another: the lowest id wins
    x[1, [150, 70]] = top
    x[2] = float("-inf")
    x[2, 6000] = 0.0  # one finite logit: probability 1
    ids, packed = greedy_pick(x, impl="triton")
    ref_ids, ref = greedy_pick_reference(x)
    assert ids.tolist() == ref_ids.tolist() and ids.tolist()[:3] == [5, 70, 6000]
    assert torch.equal(packed[:, 0], ids.double()) and packed.dtype == torch.float64
    torch.testing.assert_close(packed[:, 1], ref[:, 1], rtol=0, atol=1e-5)
    assert packed[2, 1].item() == 0.0
    small = torch.randn(3, 50, generator=g)  # a vocabulary smaller than a tile
    assert torch.equal(greedy_pick(small, impl="triton")[0], small.argmax(-1))
    many = torch.randn(100, 9000, generator=g).to(dtype)  # many rows, random logits
    ids, packed = greedy_pick(many, impl="triton")
    ref_ids, ref = greedy_pick_reference(many)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(packed[:, 1], ref[:, 1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous rows"):
        greedy_pick(x.t(), impl="triton")


def test_bad_inputs_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        fused_add_rms_norm(x, x.clone(), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="x must match residual"):
        fused_add_rms_norm(torch.randn(2, 8).half(), x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up must be"):
        silu_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="impl must be one of"):
        silu_mul(torch.randn(2, 8), impl="cuda")
    q, k, v, inv, (kc, vc, _, _) = _qkv_case(torch.float32)
    with pytest.raises(ValueError, match=r"an torch.int8 cache needs k_scale \(6, 4, 2\) float32, got None"):
        rope_kv_write(q, k, v, torch.zeros(3, dtype=torch.long), inv, kc.to(torch.int8), vc.to(torch.int8),
                      torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="writes 16- or 32-bit caches, or int8 / float8_e4m3fn ones"):
        rope_kv_write(q, k, v, torch.zeros(3, dtype=torch.long), inv, kc.to(torch.uint8), vc.to(torch.uint8),
                      torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="inv_freq must be"):
        rope_kv_write(q, k, v, torch.zeros(3, dtype=torch.long), inv[:3], kc, vc, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="fuse must be"):
        TorchBackend(_tiny_network(), fuse="yes")
    with pytest.raises(ValueError, match="kernels must be"):
        TorchBackend(_tiny_network(), kernels="cuda")


# ------------------------------------------------------------------------- the backend, fused vs unfused
_NETWORKS = {}


def _tiny_network(path=None):
    key = str(path)
    if key not in _NETWORKS:
        if path is not None:
            loaded = ModelLoader(path).load()
        else:
            cfg = ModelConfig(family="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16)
            loaded = LoadedModel(cfg, random_weights(cfg, seed=0), name="tiny")
        _NETWORKS[key] = NetworkBuilder(loaded).build()
    return _NETWORKS[key]


SCHEDULE = [[5, 3], [1, 4], [1, 1], [1, 1]]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fused_backend_equals_unfused_on_the_cpu(family, tiny_checkpoints):
    net = _tiny_network(tiny_checkpoints[family][0])
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    fused = run_chunks(Engine(net, TorchBackend(net, fuse=True)), seqs, SCHEDULE, block_size=4)
    plain = run_chunks(Engine(net, TorchBackend(net, fuse=False)), seqs, SCHEDULE, block_size=4)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)  # on the CPU the fused ops run the unfused math


class _WrapsProjections(TorchBackend):
    """Like tensor parallel's backend: wraps o_proj / mlp and relies on their `hidden = hidden + proj`."""

    def _wrapped(self, layer):
        fn = TorchBackend._PREPARE[layer.kind](self, layer)

        def run(env, batch, kv):
            residual = env["hidden"]
            env["hidden"] = torch.zeros_like(residual)
            fn(env, batch, kv)  # 0 + proj(x)
            env["hidden"] = residual + env["hidden"]  # (an all-reduce of env["hidden"] would go here)
        return run

    _PREPARE = {**TorchBackend._PREPARE, "o_proj": _wrapped, "mlp": _wrapped}


def test_a_subclass_wrapping_the_projections_keeps_the_residual_add():
    net = _tiny_network()
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    wrapped = _WrapsProjections(net)
    assert wrapped.fuse and not wrapped.defer_residual and TorchBackend(net).defer_residual
    for a, b in zip(run_chunks(Engine(net, wrapped), seqs, SCHEDULE, block_size=4),
                    run_chunks(Engine(net, TorchBackend(net, fuse=False)), seqs, SCHEDULE, block_size=4)):
        assert torch.equal(a, b)


def test_an_8bit_kv_cache_is_written_by_the_fused_rope_as_by_the_unfused_path():
    """The fused rope quantizes an 8-bit cache on write (one rope_kv_write per layer, no separate quantize); on
    the CPU its reference path is the unfused math exactly."""
    net = _tiny_network()
    qnet = Network(net.config, net.layers, net.weights, name="tiny-int8-kv",
                   quant_config=QuantConfig("NO_QUANT", kv_cache_quant_algo="int8"))
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    engines = {fuse: Engine(qnet, TorchBackend(qnet, fuse=fuse)) for fuse in (False, True)}
    assert engines[True].allocate_kv_cache(2, 4).is_quantized
    with LaunchCounter() as launches:
        fused = run_chunks(engines[True], seqs, SCHEDULE, block_size=4)
    assert launches.ops["rope_kv_write"] == len(SCHEDULE) * net.config.num_hidden_layers
    plain = run_chunks(engines[False], seqs, SCHEDULE, block_size=4)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


@requires_triton
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_backend_through_the_triton_interpreter(family, tiny_checkpoints):
    net = _tiny_network(tiny_checkpoints[family][0])
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    triton = run_chunks(Engine(net, TorchBackend(net, kernels="triton")), seqs, SCHEDULE, block_size=4)
    plain = run_chunks(Engine(net, TorchBackend(net, fuse=False)), seqs, SCHEDULE, block_size=4)
    for a, b in zip(triton, plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@requires_triton
@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_fused_8bit_cache_write_through_the_triton_interpreter(kv):
    """The fused rope's quantized write (kernels='triton', float32) against the unfused quantize + scatter: the same
    logits but where a key rotated in float32 from exact cos / sin lands on the other side of a code boundary."""
    net = _tiny_network()
    qnet = Network(net.config, net.layers, net.weights, name=f"tiny-{kv}-kv",
                   quant_config=QuantConfig("NO_QUANT", kv_cache_quant_algo=kv))
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    triton = run_chunks(Engine(qnet, TorchBackend(qnet, kernels="triton")), seqs, SCHEDULE, block_size=4)
    plain = run_chunks(Engine(qnet, TorchBackend(qnet, fuse=False)), seqs, SCHEDULE, block_size=4)
    for a, b in zip(triton, plain):
        torch.testing.assert_close(a, b, atol=2e-2 if kv == "fp8" else 5e-3, rtol=0)


def _decode_step(engine, batch_size=2, context=6):
    kv = engine.allocate_kv_cache(batch_size * 3, 4)
    batch = ForwardBatch.build([SequenceInput([7], context, [3 * i, 3 * i + 1]) for i in range(batch_size)], 4)
    return batch, kv


@requires_triton
def test_fused_decode_step_launches_fewer_kernels():
    """Counted on the CPU as a GPU would launch them: the fused ops through Triton (interpreted) are one each."""
    net = _tiny_network()  # 2 blocks
    counts = {}
    for fuse in (False, True):
        engine = Engine(net, TorchBackend(net, fuse=fuse, kernels="triton", attention="reference"))
        batch, kv = _decode_step(engine)
        with LaunchCounter() as counter:
            engine.forward(batch, kv)
        counts[fuse] = counter
    fused, plain = counts[True], counts[False]
    # gone, per block: 2 residual adds; 2 norms (pow, mean, add eps, rsqrt, normalising and weight products);
    # rope's neg, cat, 2 products and a sum for q and for k; the K and V scatter; silu and its product.
    # Once a step: the final norm, the cos / sin tables (positions cast, times inv_freq, cat, cos, sin)
    norms = 2 * 2 + 1
    removed = Counter(add=2 * 2 + 2 * 2, pow=norms, mean=norms, add_=norms, rsqrt=norms,
                      mul=2 * norms + 2 * 4 + 2 + 1, neg=2 * 2, cat=2 * 2 + 1, index_put_=2 * 2, silu=2,
                      _to_copy=1, cos=1, sin=1)
    added = Counter(fused_add_rms_norm=norms, rope_kv_write=2, silu_mul=2)
    assert fused.ops == plain.ops - removed + added
    assert fused.total == plain.total - sum(removed.values()) + sum(added.values())
    assert fused.syncs == plain.syncs == 0  # a forward pass never waits on the host


def test_hooks_see_unfused_values_of_fused_layers():
    net = _tiny_network()
    outs = {}
    for fuse in (False, True):
        engine = Engine(net, TorchBackend(net, fuse=fuse))
        batch, kv = _decode_step(engine)
        seen = {}

        class Keep:
            def before(self, layer, inputs):
                pass

            def after(self, layer, outputs):
                seen[layer.name] = {k: v.clone() for k, v in outputs.items()}
        engine.forward(batch, kv, hooks=[Keep()])
        outs[fuse] = seen
    for name in ("layers.0.o_proj", "layers.0.mlp", "layers.1.rope", "lm_head"):
        for key, value in outs[False][name].items():
            assert torch.equal(outs[True][name][key], value), (name, key)


# ------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [576, 2048, 4096])
def test_fused_kernels_match_reference_on_cuda(hidden):
    g = _gen(hidden)
    x = torch.randn(64, hidden, generator=g).bfloat16().cuda()
    res = torch.randn(64, hidden, generator=g).bfloat16().cuda()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16().cuda()
    r1, r2 = res.clone(), res.clone()
    torch.testing.assert_close(fused_add_rms_norm(x, r1, w, 1e-5, impl="triton").float(),
                               fused_add_rms_norm(x, r2, w, 1e-5, impl="torch").float(), **BF16_TOL)
    assert torch.equal(r1, r2)  # both round the same float32 sum to bf16
    r1, r2 = res.clone(), res.clone()  # a float32 update (tensor-parallel partial sums): rounded, then added
    fused_add_rms_norm(x.float() * 1.37, r1, w, 1e-5, impl="triton")
    fused_add_rms_norm((x.float() * 1.37).bfloat16(), r2, w, 1e-5, impl="torch")
    assert torch.equal(r1, r2)
    gu = torch.randn(64, 2 * 4 * hidden, generator=g).bfloat16().cuda()
    torch.testing.assert_close(silu_mul(gu, impl="triton").float(), silu_mul(gu, impl="torch").float(), **BF16_TOL)
    q, k, v, inv, caches = _qkv_case(torch.bfloat16, t=64, heads=32, kv_heads=8, d=128)
    q, k, v, inv = q.cuda(), k.cuda(), v.cuda(), inv.cuda()
    kc_t, vc_t, kc_r, vc_r = (c.new_zeros(64, 4, 8, 128).cuda() for c in caches)
    pos = torch.arange(0, 64 * 131, 131, device="cuda")
    slots = torch.randperm(256, generator=g)[:64].cuda()
    qt = rope_kv_write(q, k, v, pos, inv, kc_t, vc_t, slots, impl="triton")
    qr = rope_kv_write(q, k, v, pos, inv, kc_r, vc_r, slots, impl="torch")
    torch.testing.assert_close(qt.float(), qr.float(), **BF16_TOL)
    torch.testing.assert_close(kc_t.float(), kc_r.float(), **BF16_TOL)
    assert torch.equal(vc_t, vc_r)
    for kv in ("INT8", "FP8"):  # an 8-bit cache: quantized on write, as quantize_kv does
        q, k, v, inv, caches, scales = _quantized_case(torch.bfloat16, kv, t=64, heads=32, kv_heads=8, d=128)
        caches = [c.new_zeros(64, 4, 8, 128).cuda() for c in caches]
        scales = [torch.zeros(64, 4, 8, device="cuda") for _ in scales]
        _check_quantized_write(kv, q.cuda(), k.cuda(), v.cuda(), inv.cuda(), pos, slots, caches, scales)


@pytest.mark.gpu
def test_bf16_decode_with_fusion_matches_unfused_with_cuda_graphs():
    """Fused and unfused bf16 round differently, and random weights leave near-ties in the logits, so
    both are held to a float32 run of the unfused path: the fused logits' largest error must stay within
    1.5x of the unfused path's own (or 0.3), and their top-1 agreement with float32 within 3 points."""
    from kit.builder import BuildConfig

    loaded = ModelLoader.synthetic("qwen2.5-0.5b", device="cuda", dtype=torch.bfloat16)
    net = NetworkBuilder(loaded).build()
    bc = BuildConfig(max_batch_size=4, max_seq_len=128, max_input_len=64, max_num_tokens=256)
    seqs = [list(range(100, 140)), list(range(300, 307)), list(range(500, 590))]
    sched = [[34, 1, 84]] + [[1, 1, 1]] * 6
    logits = {}
    for name, fuse, dtype in (("unfused", False, torch.bfloat16), ("fused", True, torch.bfloat16),
                              ("float32", False, torch.float32)):
        engine = Engine(net, TorchBackend(net, device="cuda", dtype=dtype, fuse=fuse), build_config=bc)
        assert engine.backend.kernel_impl == "triton"
        logits[name] = run_chunks(engine, seqs, sched, 16)
    err, agree = {}, {}
    for k in ("unfused", "fused"):
        err[k], agree[k] = error_against(logits[k], logits["float32"])
    assert err["fused"] <= max(0.3, 1.5 * err["unfused"]), (err, agree)
    assert agree["fused"] >= agree["unfused"] - 0.03, (err, agree)


@pytest.mark.gpu
def test_greedy_pick_on_cuda_matches_argmax_and_log_softmax():
    g = _gen(12)
    x = (3 * torch.randn(64, 128256, generator=g)).bfloat16().cuda()
    ids, packed = greedy_pick(x, impl="triton")
    ref_ids, ref = greedy_pick_reference(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(packed, ref, rtol=0, atol=2e-5)
