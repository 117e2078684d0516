"""Tests for kit/quantization/: configs, each scheme's format and error, AWQ / GPTQ /
SmoothQuant against their baselines, the Quantizer end to end through the engine, the
KV-cache helpers, and (marked gpu) the CUDA fast paths against the CPU reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_chunks
from kit.config import ModelConfig
from kit.engine import Engine, ForwardBatch, SequenceInput
from kit.engine_dir import load_engine, read_engine_config, save_engine
from kit.loader import LoadedModel, random_weights
from kit.network import NetworkBuilder
from kit.quantization import (QUANT_PRESETS, SCHEMES, FloatLinear, KVCacheQuantAlgo, QuantAlgo, QuantConfig,
                              Quantizer, QuantScheme, build_linear, dequantize_kv, get_scheme, kv_cache_dtype,
                              quantize_kv)
from kit.quantization import awq, fp8, gptq, int4, int8_weight_only, smoothquant
from kit.quantization.calibration import BlockRunner, embed, final_norm
from kit.quantization.linear import TRITON_MAX_M

TINY = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
            max_position_embeddings=256)
ALL_ALGOS = [a for a in QuantAlgo if a is not QuantAlgo.NO_QUANT]
SEQ = [5 + (7 * i) % 240 for i in range(37)]


def tiny_model(seed: int = 0, **overrides) -> LoadedModel:
    cfg = ModelConfig(**{**TINY, **overrides})
    w = random_weights(cfg, seed=seed, std=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for k in w:  # non-trivial norms, so that folding scales into them is exercised
        if k.endswith("norm.weight"):
            w[k] = 1 + 0.2 * torch.rand(w[k].shape, generator=g)
    return LoadedModel(cfg, w, name="tiny", source_format="synthetic")


def calib_tokens(n: int = 4, length: int = 32, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n, length), generator=g).tolist()


def qconfig(algo: QuantAlgo, **kw) -> QuantConfig:
    return QuantConfig(quant_algo=algo, group_size=32, calib_size=4, calib_max_seq_len=32, **kw)


def logits(loaded: LoadedModel) -> torch.Tensor:
    engine = Engine.from_network(NetworkBuilder(loaded).build())
    return run_chunks(engine, [SEQ], [[20], [17]], block_size=16)[0]


def outlier_acts(t: int, k: int, seed: int, scale: float = 30.0) -> torch.Tensor:
    """Calibration-like activations: a few large latent directions, mixed into every channel
    (the same mixing for every seed, fresh samples), so a few channels are outliers and
    all channels are correlated, as in an LLM's residual stream."""
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=torch.Generator().manual_seed(1234)) / k**0.5
    z = torch.randn(t, k, generator=torch.Generator().manual_seed(seed))
    z[:, [3, 17, 40]] *= scale
    return z @ mix


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------- config
def test_config_defaults_and_names():
    qc = QuantConfig()
    assert qc.quant_algo is QuantAlgo.NO_QUANT and qc.exclude_modules == ("lm_head",)
    expected = {"fp8": QuantAlgo.FP8, "int8_wo": QuantAlgo.W8A16, "int4_wo": QuantAlgo.W4A16,
                "int4_awq": QuantAlgo.W4A16_AWQ, "int4_gptq": QuantAlgo.W4A16_GPTQ,
                "int8_sq": QuantAlgo.W8A8_SQ_PER_CHANNEL, "w8a8": QuantAlgo.W8A8}
    for name, algo in expected.items():
        assert QuantConfig.from_name(name).quant_algo is algo
    assert QuantConfig.from_name("INT4-AWQ", group_size=64).group_size == 64
    with pytest.raises(ValueError, match="int4_awq") as e:
        QuantConfig.from_name("int3")
    assert all(n in str(e.value) for n in QUANT_PRESETS)
    qc = QuantConfig("W4A16_GPTQ", kv_cache_quant_algo="fp8", has_zero_point=True)
    assert qc.quant_algo is QuantAlgo.W4A16_GPTQ and qc.kv_cache_quant_algo is KVCacheQuantAlgo.FP8
    assert QuantConfig.from_dict(qc.to_dict()) == qc
    assert qc.is_int4 and qc.is_weight_only and qc.needs_calibration and qc.weight_bits == 4
    assert not QuantConfig.from_name("int8_wo").needs_calibration
    assert "group 128" in str(qc)


@pytest.mark.parametrize("field,value", [
    ("quant_algo", "INT3"), ("kv_cache_quant_algo", "int4"), ("group_size", 100), ("group_size", 8),
    ("smoothquant_alpha", 1.5), ("calib_size", 0), ("calib_max_seq_len", -1), ("exclude_modules", "lm_head"),
    ("has_zero_point", 1),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_exclude_patterns():
    qc = QuantConfig(exclude_modules=("lm_head", "*.mlp.down_proj", "model.layers.0.*"))
    assert qc.is_excluded("lm_head")
    assert qc.is_excluded("model.layers.5.mlp.down_proj")
    assert qc.is_excluded("model.layers.0.self_attn.q_proj")
    assert not qc.is_excluded("model.layers.1.self_attn.q_proj")
    with pytest.raises(ValueError, match="unknown field"):
        QuantConfig.from_dict({"quant_algo": "FP8", "bits": 4})


# ------------------------------------------------------------------ registry
def test_registry_has_one_scheme_per_quant_algo():
    assert list(SCHEMES) == list(QuantAlgo)  # every algo, in the enum's order, once
    for algo, scheme in SCHEMES.items():
        assert isinstance(scheme, QuantScheme) and scheme.algo is algo
        assert get_scheme(algo) is scheme and get_scheme(algo.value.lower()) is scheme
        assert QuantConfig(quant_algo=algo).scheme is scheme
    assert {name: algo for name, (algo, _) in QUANT_PRESETS.items()} == {
        s.preset: s.algo for s in SCHEMES.values() if s.preset is not None}
    assert [a for a in QuantAlgo if SCHEMES[a].needs_calibration] == [
        QuantAlgo.FP8, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A8_SQ_PER_CHANNEL]
    assert [a for a in QuantAlgo if SCHEMES[a].sequential] == [QuantAlgo.W4A16_GPTQ]
    assert {a: SCHEMES[a].bits for a in QuantAlgo} == {
        QuantAlgo.NO_QUANT: 16, QuantAlgo.FP8: 8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: 8, QuantAlgo.W8A16: 8,
        QuantAlgo.W4A16: 4, QuantAlgo.W4A16_AWQ: 4, QuantAlgo.W4A16_GPTQ: 4, QuantAlgo.W8A8_SQ_PER_CHANNEL: 8,
        QuantAlgo.W8A8: 8}
    with pytest.raises(ValueError, match="'INT3'.*W4A16_AWQ"):
        get_scheme("INT3")


@pytest.mark.parametrize("algo", list(QuantAlgo), ids=str)
def test_stored_format_round_trips_through_the_config(algo):
    qc = QuantConfig(quant_algo=algo, group_size=32, has_zero_point=algo is QuantAlgo.W4A16)
    d = json.loads(json.dumps(qc.to_dict()))  # as an engine directory's config.json holds it
    assert d["stored_format"] == qc.stored_format and d["stored_format"]["scheme"] == algo.value
    assert QuantConfig.from_dict(d) == qc
    if qc.is_int4:
        assert d["stored_format"]["group_size"] == 32
        assert ("weight_zero" in d["stored_format"]["tensors"]) == qc.has_zero_point
    bad = {**d, "stored_format": {**d["stored_format"], "version": 0}}
    with pytest.raises(ValueError, match="stored_format"):
        QuantConfig.from_dict(bad)


@pytest.mark.parametrize("algo", ALL_ALGOS, ids=str)
def test_quantized_tensors_are_what_the_stored_format_names(quantized_models, algo):
    _, models = quantized_models
    q = models[algo]
    fmt = q.quant_config.stored_format
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        names = {k[len(prefix) + 1:] for k in q.weights if k.startswith(prefix + ".")}
        assert set(fmt["tensors"]) <= names <= set(fmt["tensors"]) | set(fmt["optional"])
        for name, spec in fmt["tensors"].items():
            assert spec.split()[0] == str(q.weights[f"{prefix}.{name}"].dtype).replace("torch.", "")
    missing = {k: v for k, v in q.weights.items() if k != "model.layers.0.mlp.down_proj.weight_scale"}
    with pytest.raises(ValueError, match="missing weight_scale"):
        build_linear(missing, ["model.layers.0.mlp.down_proj"], q.quant_config, bias=False, device="cpu",
                     dtype=torch.float32)


def test_engine_directory_records_the_stored_format(quantized_models, tmp_path):
    _, models = quantized_models
    q = models[QuantAlgo.W4A16_AWQ]
    engine = Engine.from_network(NetworkBuilder(q).build())
    path = save_engine(engine, tmp_path / "awq")
    assert read_engine_config(path)["quant_config"]["stored_format"] == q.quant_config.stored_format
    again = load_engine(path, device="cpu")
    assert again.network.quant_config == q.quant_config
    torch.testing.assert_close(run_chunks(again, [SEQ], [[37]], block_size=16)[0],
                               run_chunks(engine, [SEQ], [[37]], block_size=16)[0], rtol=0, atol=0)


# -------------------------------------------------------- formats and errors
def test_int4_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (5, 12), generator=g, dtype=torch.uint8)
    packed = int4.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 6)
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))  # even column in the low nibble
    assert torch.equal(int4.unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        int4.pack_int4(codes[:, :3])


def test_int4_quantize_weight_format_and_group_error():
    w = torch.randn(8, 64)
    q, s, z = int4.quantize_weight(w, 32, has_zero_point=True)
    assert (q.dtype, q.shape, s.dtype, s.shape, z.dtype, z.shape) == (
        torch.uint8, (8, 32), torch.float16, (8, 2), torch.uint8, (8, 2))
    assert torch.equal(int4.dequantize_weight(q, s, z, 32), int4.fake_quantize(w, 32, True))
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize_weight(torch.randn(4, 48), 32)


@pytest.mark.parametrize("name,bound", [
    ("int8", 0.010), ("fp8_tensor", 0.035), ("fp8_channel", 0.035),
    ("int4_g32", 0.11), ("int4_g128", 0.13), ("int4_g128_zero", 0.115),
])
def test_weight_reconstruction_error_within_bits(name, bound):
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    if name == "int8":
        deq = int8_weight_only.dequantize_weight(*int8_weight_only.quantize_weight(w))
    elif name == "fp8_tensor":
        deq = fp8.dequantize(*fp8.quantize_weight_per_tensor(w))
    elif name == "fp8_channel":
        deq = fp8.dequantize(*fp8.quantize_weight_per_channel(w))
    else:
        group = int(name.split("_g")[1].split("_")[0])
        deq = int4.dequantize_weight(*int4.quantize_weight(w, group, name.endswith("zero")), group)
    err = rel(deq, w)
    assert 0 < err < bound


def test_awq_beats_rtn_on_outlier_activations():
    x, x_test = outlier_acts(1024, 128, 0), outlier_acts(512, 128, 1)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(7)) * 0.05
    res = awq.search_scale(x, [w], 32)
    assert res.alpha > 0 and min(res.losses) == res.losses[res.losses.index(min(res.losses))]
    assert min(res.losses) < 0.6 * res.rtn_loss
    s = res.scale
    rtn = int4.fake_quantize(w, 32)
    awq_w = int4.fake_quantize(w * s, 32)
    err_rtn = ((x_test @ rtn.T - x_test @ w.T) ** 2).mean()
    err_awq = (((x_test / s) @ awq_w.T - x_test @ w.T) ** 2).mean()
    assert err_awq < 0.6 * err_rtn  # on held-out tokens of the same distribution too


def test_gptq_beats_rtn_on_outlier_activations():
    x, x_test = outlier_acts(2048, 128, 0), outlier_acts(512, 128, 1)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(7)) * 0.05
    for zp in (False, True):
        stored, deq = gptq.gptq_quantize(w, gptq.hessian(x), 32, zp)
        assert torch.equal(deq, int4.dequantize_weight(stored["qweight"], stored["weight_scale"],
                                                       stored.get("weight_zero"), 32))
        rtn = int4.fake_quantize(w, 32, zp)
        for xx in (x, x_test):
            err_rtn = ((xx @ rtn.T - xx @ w.T) ** 2).mean()
            err_gptq = ((xx @ deq.T - xx @ w.T) ** 2).mean()
            assert err_gptq < 0.2 * err_rtn


def test_smoothquant_beats_plain_w8a8_on_outlier_channels():
    x = outlier_acts(512, 128, 0, scale=60.0)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(7)) * 0.05
    ref = x @ w.T
    plain = smoothquant.int8_linear_reference(x, *int8_weight_only.quantize_weight(w))
    s = smoothquant.smooth_scales(x.abs().amax(0), [w], alpha=0.5)
    smoothed = smoothquant.int8_linear_reference(x / s, *int8_weight_only.quantize_weight(w * s))
    assert rel(smoothed, ref) < 0.5 * rel(plain, ref)
    assert rel(smoothed, ref) < 0.02


# ----------------------------------------------------------- linear layers
def _expected(lin, x: torch.Tensor, algo: QuantAlgo) -> torch.Tensor:
    """What the format means, computed from the stored tensors with the scheme's own helpers."""
    if algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        xq, xs = lin.quantize_input(x)
        return fp8.dequantize(xq, xs) @ lin.dequantized_weight().T
    xin = x if getattr(lin, "pqs", None) is None else x * lin.pqs
    if algo in (QuantAlgo.W8A8, QuantAlgo.W8A8_SQ_PER_CHANNEL):
        xq, xs = int8_weight_only.quantize_per_token(xin)
        return (xq.float() * xs) @ lin.dequantized_weight().T
    return xin @ lin.dequantized_weight().T


@pytest.fixture(scope="module")
def quantized_models():
    loaded = tiny_model()
    return loaded, {algo: Quantizer(qconfig(algo)).quantize(loaded, calib_tokens(), progress=False)
                    for algo in ALL_ALGOS}


@pytest.mark.parametrize("algo", ALL_ALGOS, ids=str)
def test_cpu_linear_equals_dequantized_weight_times_x(quantized_models, algo):
    _, models = quantized_models
    q = models[algo]
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    for prefixes, in_f in (([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], 64), ([f"{attn}.o_proj"], 64),
                           ([f"{mlp}.gate_proj", f"{mlp}.up_proj"], 64), ([f"{mlp}.down_proj"], 128)):
        lin = build_linear(q.weights, prefixes, q.quant_config, bias=False, device="cpu", dtype=torch.float32)
        xx = torch.randn(9, in_f) * 2
        y = lin(xx)
        assert lin.path == "reference" and y.shape == (9, lin.out_features) and y.dtype == torch.float32
        torch.testing.assert_close(y, _expected(lin, xx, algo), rtol=1e-5, atol=1e-5)
        assert "path: reference" in lin.describe()


def test_fused_per_tensor_fp8_keeps_each_prefix_scale(quantized_models):
    _, models = quantized_models
    q = models[QuantAlgo.FP8]
    attn = "model.layers.0.self_attn"
    prefixes = [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]
    scales = [q.weights[f"{p}.weight_scale"] for p in prefixes]
    assert all(s.shape == (1,) and s.dtype == torch.float32 for s in scales)
    assert len({s.item() for s in scales}) == 3  # three different per-tensor scales ...
    fused = build_linear(q.weights, prefixes, q.quant_config, bias=False, device="cpu", dtype=torch.float32)
    x = torch.randn(5, 64)
    alone = [build_linear(q.weights, [p], q.quant_config, bias=False, device="cpu", dtype=torch.float32)(x)
             for p in prefixes]
    torch.testing.assert_close(fused(x), torch.cat(alone, -1))  # ... fused into one GEMM, same result


def test_weight_bytes_follow_the_bits():
    torch.manual_seed(0)
    out_f, in_f = 256, 512
    bf16_bytes = out_f * in_f * 2
    w = {"l.weight": torch.randn(out_f, in_f) * 0.02}
    x_amax = torch.tensor(3.0)
    cases = {
        QuantAlgo.W8A16: int8_weight_only.quantize_linear(w["l.weight"]),
        QuantAlgo.FP8: fp8.quantize_linear(w["l.weight"], per_channel=False, input_amax=x_amax),
        QuantAlgo.W4A16: int4.quantize_linear(w["l.weight"], 128, False),
    }
    float_lin = build_linear(w, ["l"], QuantConfig(), bias=False, device="cpu", dtype=torch.bfloat16)
    assert isinstance(float_lin, FloatLinear) and float_lin.weight_bytes == bf16_bytes
    for algo, stored in cases.items():
        lin = build_linear({f"l.{k}": v for k, v in stored.items()}, ["l"], QuantConfig(algo), bias=False,
                           device="cpu", dtype=torch.bfloat16)
        ratio = lin.weight_bytes / bf16_bytes
        if algo is QuantAlgo.W4A16:
            assert 0.25 < ratio < 0.25 + 2 / 128  # + one float16 scale per 128 weights
        else:
            assert 0.5 < ratio < 0.51


# ------------------------------------------------------------- end to end
def test_calibration_forward_matches_engine():
    loaded = tiny_model(qkv_bias=True, tie_word_embeddings=True)
    want = logits(loaded)
    h = embed(loaded.weights, torch.tensor([SEQ]))
    for i in range(loaded.config.num_hidden_layers):
        h, _ = BlockRunner(loaded.config, loaded.weights, i).run(h)
    got = final_norm(loaded.weights, loaded.config, h)[0] @ loaded.weights["model.embed_tokens.weight"].T
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


LOGIT_BOUNDS = {  # relative Frobenius error of the logits vs the float model (tiny random model)
    QuantAlgo.FP8: 0.12, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: 0.12, QuantAlgo.W8A16: 0.03,
    QuantAlgo.W4A16: 0.35, QuantAlgo.W4A16_AWQ: 0.35, QuantAlgo.W4A16_GPTQ: 0.40,
    QuantAlgo.W8A8_SQ_PER_CHANNEL: 0.05, QuantAlgo.W8A8: 0.05,
}
STORED_DTYPES = {
    QuantAlgo.FP8: torch.float8_e4m3fn, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: torch.float8_e4m3fn,
    QuantAlgo.W8A16: torch.int8, QuantAlgo.W8A8: torch.int8, QuantAlgo.W8A8_SQ_PER_CHANNEL: torch.int8,
    QuantAlgo.W4A16: torch.uint8, QuantAlgo.W4A16_AWQ: torch.uint8, QuantAlgo.W4A16_GPTQ: torch.uint8,
}


@pytest.mark.parametrize("algo", ALL_ALGOS, ids=str)
def test_quantized_model_runs_in_the_engine_close_to_float(quantized_models, algo):
    loaded, models = quantized_models
    q = models[algo]
    assert q.quant_config.quant_algo is algo
    p = "model.layers.0."
    assert f"{p}self_attn.q_proj.weight" not in q.weights
    assert q.weights[f"{p}self_attn.q_proj.qweight"].dtype is STORED_DTYPES[algo]
    assert torch.equal(q.weights["lm_head.weight"], loaded.weights["lm_head.weight"])  # excluded by default
    assert torch.equal(q.weights["model.embed_tokens.weight"], loaded.weights["model.embed_tokens.weight"])
    folded = algo in (QuantAlgo.W4A16_AWQ, QuantAlgo.W8A8_SQ_PER_CHANNEL)
    assert (f"{p}mlp.down_proj.pre_quant_scale" in q.weights) == folded
    assert torch.equal(q.weights[f"{p}input_layernorm.weight"], loaded.weights[f"{p}input_layernorm.weight"]) != folded
    assert q.weight_bytes < loaded.weight_bytes
    assert rel(logits(q), logits(loaded)) < LOGIT_BOUNDS[algo]


def test_quantizer_respects_exclusions_and_tied_embeddings():
    loaded = tiny_model(tie_word_embeddings=True)
    qc = qconfig(QuantAlgo.W4A16_AWQ, exclude_modules=("lm_head", "k_proj", "model.layers.1.mlp.*"))
    quantizer = Quantizer(qc)
    q = quantizer.quantize(loaded, calib_tokens(), progress=False)
    k = "model.layers.0.self_attn.k_proj"
    assert f"{k}.weight" in q.weights and f"{k}.qweight" not in q.weights
    # k_proj reads the same (rescaled) norm as q/v: its float weight carries the AWQ scale
    assert not torch.equal(q.weights[f"{k}.weight"], loaded.weights[f"{k}.weight"])
    assert "model.layers.1.mlp.down_proj.weight" in q.weights and "lm_head.weight" not in q.weights
    assert torch.equal(q.weights["model.embed_tokens.weight"], loaded.weights["model.embed_tokens.weight"])
    rep = quantizer.report
    assert set(rep["scheme"]) == {"float", "W4A16_AWQ"} and len(rep) == 2 * 7
    assert rep.loc[rep["scheme"] == "W4A16_AWQ", "alpha"].notna().all()
    assert rel(logits(q), logits(loaded)) < LOGIT_BOUNDS[QuantAlgo.W4A16_AWQ]


def test_lm_head_can_be_quantized_when_untied():
    loaded = tiny_model()
    q = Quantizer(qconfig(QuantAlgo.W8A16, exclude_modules=())).quantize(loaded, progress=False)
    assert "lm_head.qweight" in q.weights and "lm_head.weight" not in q.weights
    assert rel(logits(q), logits(loaded)) < LOGIT_BOUNDS[QuantAlgo.W8A16]


@pytest.mark.parametrize("algo", [QuantAlgo.W4A16_AWQ, QuantAlgo.FP8], ids=str)
def test_quantize_lm_head_quantizes_the_untied_head_despite_the_default_exclusion(algo):
    loaded = tiny_model()
    qc = qconfig(algo, quantize_lm_head=True)
    assert qc.exclude_modules == ("lm_head",) and not qc.is_excluded("lm_head") and qc.is_excluded("x.lm_head")
    assert "lm_head quantized" in str(qc) and QuantConfig.from_dict(qc.to_dict()) == qc
    q = Quantizer(qc).quantize(loaded, calib_tokens(), progress=False)
    assert "lm_head.qweight" in q.weights and "lm_head.weight" not in q.weights
    head = build_linear(q.weights, ["lm_head"], qc, bias=False, device="cpu", dtype=torch.float32)
    assert head.scheme != "float" and head.out_features == TINY["vocab_size"]
    assert head.weight_bytes < loaded.weights["lm_head.weight"].numel() * 4 / 3  # 8 or 4 bits, not 32
    assert rel(logits(q), logits(loaded)) < LOGIT_BOUNDS[algo]
    # the default keeps it in float; a model stored that way cannot be built as if quantized
    plain = Quantizer(qconfig(algo)).quantize(loaded, calib_tokens(), progress=False)
    assert "lm_head.weight" in plain.weights
    with pytest.raises(ValueError, match="quantize_lm_head"):
        build_linear(plain.weights, ["lm_head"], qc, bias=False, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="quantize_lm_head must be a bool"):
        qconfig(algo, quantize_lm_head="yes")


def test_quantize_lm_head_leaves_a_tied_head_on_the_embedding():
    loaded = tiny_model(tie_word_embeddings=True)
    q = Quantizer(qconfig(QuantAlgo.W8A16, quantize_lm_head=True)).quantize(loaded, progress=False)
    assert "lm_head.qweight" not in q.weights
    assert torch.equal(q.weights["model.embed_tokens.weight"], loaded.weights["model.embed_tokens.weight"])
    assert rel(logits(q), logits(loaded)) < LOGIT_BOUNDS[QuantAlgo.W8A16]


def test_calibration_needs_a_tokenizer_for_text():
    with pytest.raises(ValueError, match="tokenizer"):
        Quantizer(qconfig(QuantAlgo.FP8)).quantize(tiny_model(), ["some text"], progress=False)
    q = Quantizer(qconfig(QuantAlgo.FP8)).quantize(tiny_model(), progress=False)  # random tokens, noted
    assert any("random tokens" in n for n in q.notes)


# ---------------------------------------------------------------- KV cache
@pytest.mark.parametrize("algo,dtype,bound", [("INT8", torch.int8, 1 / 254 + 1e-6), ("FP8", torch.float8_e4m3fn, 1 / 16)])
def test_kv_cache_round_trip(algo, dtype, bound):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 2, 32, generator=g) * torch.rand(3, 16, 2, 1, generator=g) * 5  # (..., KVH, D)
    q, scale = quantize_kv(x, algo)
    assert q.dtype is dtype is kv_cache_dtype(algo) and q.shape == x.shape and scale.shape == (3, 16, 2)
    back = dequantize_kv(q, scale, torch.float32)
    # each element within half a step of its own (token, head) vector's grid
    step_err = ((back - x).abs() / x.abs().amax(-1, keepdim=True)).max().item()
    assert step_err <= bound
    assert rel(back, x) < (0.006 if algo == "INT8" else 0.03)
    assert dequantize_kv(q, scale, torch.bfloat16).dtype is torch.bfloat16
    with pytest.raises(ValueError, match="INT8"):
        quantize_kv(x, "int4")


# --------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("algo,zero_point", [(a, False) for a in ALL_ALGOS]
                         + [(QuantAlgo.W4A16, True), (QuantAlgo.W4A16_GPTQ, True)], ids=str)
def test_gpu_fast_path_matches_reference(algo, zero_point):
    loaded = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=32)
    qc = QuantConfig(algo, group_size=64, has_zero_point=zero_point, calib_size=4, calib_max_seq_len=64)
    q = Quantizer(qc).quantize(loaded.to("cuda"), progress=False)
    a, m = "model.layers.0.self_attn", "model.layers.0.mlp"
    for prefixes, in_f in (([f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"], 256), ([f"{a}.o_proj"], 256),
                           ([f"{m}.gate_proj", f"{m}.up_proj"], 256), ([f"{m}.down_proj"], 512)):
        kw = dict(bias=False, device="cuda", dtype=torch.bfloat16)
        fast = build_linear(q.weights, prefixes, qc, **kw)
        ref = build_linear(q.weights, prefixes, qc, force_reference=True, **kw)
        assert fast.path != "reference" and ref.path == "reference"
        for rows in (1, 5, 16, 33, TRITON_MAX_M + 36):
            x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
            y, y_ref = fast(x), ref(x)
            assert y.dtype is torch.bfloat16 and y.shape == y_ref.shape
            assert rel(y, y_ref) < 1e-2, (prefixes[0], rows, fast.describe())


@pytest.mark.gpu
@cuda
def test_gpu_quantized_engine_close_to_float():
    loaded = tiny_model(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=32).to("cuda", torch.bfloat16)
    def cuda_logits(model: LoadedModel) -> torch.Tensor:
        engine = Engine.from_network(NetworkBuilder(model).build(), device="cuda", dtype=torch.bfloat16)
        kv = engine.allocate_kv_cache(num_blocks=4, block_size=16)
        batch = ForwardBatch.build([SequenceInput(SEQ, 0, [2, 0, 3], logits="all")], 16, device="cuda")
        return engine.forward(batch, kv).float()

    want = cuda_logits(loaded)
    for algo in ALL_ALGOS:
        q = Quantizer(QuantConfig(algo, group_size=64, calib_size=4, calib_max_seq_len=64)).quantize(
            loaded, progress=False)
        got = cuda_logits(q)
        assert math.isfinite(got.sum().item())
        assert rel(got, want) < max(2 * LOGIT_BOUNDS[algo], 0.1), algo  # bf16 engine, 256 calibration tokens


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bits,zero_point,group", [(8, False, 0), (4, False, 64), (4, True, 32), (4, False, 256)])
def test_gpu_triton_kernels_match_dequantized_reference(bits, zero_point, group):
    from kit.quantization.stream_gemm import new_counters, stream_gemm
    from kit.quantization.triton_gemm import dequantize
    from kit.quantization.weight_layout import int4_words, transpose_groups

    torch.manual_seed(0)
    n, k = 320, 512
    w = torch.randn(n, k, device="cuda") * 0.02
    if bits == 8:
        q, s = int8_weight_only.quantize_weight(w)
        z, ref_w = None, int8_weight_only.dequantize_weight(q, s)
    else:
        q, s, z = int4.quantize_weight(w, group, zero_point)
        ref_w = int4.dequantize_weight(q, s, z, group)
        q, s, z = int4_words(q), transpose_groups(s), transpose_groups(z)  # the run-time layout
    kw = dict(bits=bits, group_size=group, out_features=n)
    deq = dequantize(q, s, z, in_features=k, dtype=torch.bfloat16, **kw)
    torch.testing.assert_close(deq, ref_w.to(torch.bfloat16))
    counters = new_counters(n, "cuda")
    for m in (1, 7, 16, 40, 64):  # the decode and small tile configs (larger M: dequantize + cuBLAS)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = stream_gemm(x, q, s, kind="int4" if bits == 4 else "int8", out_features=n, counters=counters,
                        group_size=group, zero=z)
        assert y.dtype is torch.bfloat16 and rel(y, x.float() @ ref_w.T) < 1e-2, m
