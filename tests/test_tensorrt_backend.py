"""Tests for kit/backends/tensorrt_backend.py.

Real TensorRT plans are built here (TensorRT-RTX builds ahead of time without a GPU), so
the lowering, its dynamic shapes, its profile and its layer names are checked on the
plan TensorRT accepted. The plan cannot run on this machine; the math of the lowered
graph is checked instead through `reference_forward`, its op-for-op PyTorch mirror,
against the kit's PyTorch engine on a paged cache.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from helpers import run_chunks
from kit.backends.base import Backend
from kit.backends.tensorrt_backend import (
    TensorRTBackend,
    TensorRTLowering,
    TensorRTPlan,
    build_plan,
    import_tensorrt,
    kit_layer_of,
    reference_forward,
)
from kit.backends.tensorrt_plan import resolve_precision
from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig, Builder
from kit.config import ModelConfig
from kit.engine import Engine
from kit.loader import LoadedModel, random_weights
from kit.network import Network, NetworkBuilder

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
FAMILIES = {
    "llama": dict(family="llama", tie_word_embeddings=False),
    "llama3_rope": dict(family="llama", rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "qwen2": dict(family="qwen2", rope_theta=1000000.0, tie_word_embeddings=True, qkv_bias=True),
    "qwen3": dict(family="qwen3", rope_theta=1000000.0, qk_norm=True),
    "mistral": dict(family="mistral", sliding_window=3),
}
LIMITS = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=32).optimization_profiles()
KVH, D = TINY["num_key_value_heads"], TINY["head_dim"]


def tiny_network(family: str = "llama", seed: int = 0) -> Network:
    cfg = ModelConfig(**TINY, **FAMILIES[family])
    weights = random_weights(cfg, seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in weights.items():  # random norms, so that a mis-wired norm cannot hide behind ones
        if name.endswith("norm.weight"):
            t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
    return NetworkBuilder(LoadedModel(cfg, weights, name=f"tiny-{family}")).build()


@pytest.fixture(scope="module")
def trt():
    """TensorRT proper if installed, else TensorRT-RTX (the `tensorrt` extra); skip without either."""
    try:
        import tensorrt  # type: ignore[import-not-found]

        return tensorrt
    except ImportError:
        return pytest.importorskip("tensorrt_rtx", reason="pip install .[tensorrt]")


@pytest.fixture(scope="module")
def tiny():
    return tiny_network("llama")


@pytest.fixture(scope="module")
def tiny_plan(trt, tiny) -> TensorRTPlan:
    t0 = time.perf_counter()
    plan = build_plan(tiny, LIMITS, dtype=torch.float16, progress=False)
    print(f"\ntiny plan: lowered in {plan.lower_seconds:.2f} s, built in {plan.build_seconds:.2f} s, "
          f"{time.perf_counter() - t0:.2f} s in all, {plan.nbytes} bytes")
    return plan


# ------------------------------------------------------------------ import_tensorrt
def test_import_tensorrt_names_the_extra_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ImportError, match=r"pip install \.\[tensorrt\]"):
        import_tensorrt()


def test_import_tensorrt_finds_a_flavour(trt):
    module, flavour = import_tensorrt()
    assert flavour in ("tensorrt", "tensorrt_rtx")
    assert module.__name__ == flavour


# ------------------------------------------------------------------------ the plan
def test_plan_is_bytes(trt, tiny_plan):
    assert isinstance(tiny_plan.plan, bytes) and len(tiny_plan.plan) > 0
    assert tiny_plan.flavour in ("tensorrt", "tensorrt_rtx")
    assert tiny_plan.version == trt.__version__
    assert tiny_plan.dtype == "float16"
    assert tiny_plan.build_seconds > 0
    assert tiny_plan.layer_info is None or isinstance(tiny_plan.layer_info, dict)
    if not torch.cuda.is_available():
        assert tiny_plan.layer_info is None  # the inspector needs a GPU that can deserialize the plan


def test_plan_inputs_and_outputs(tiny_plan):
    kv16 = {"dtype": "float16", "shape": (-1, KVH, -1, D)}
    assert tiny_plan.inputs == [
        {"name": "input_ids", "dtype": "int32", "shape": (-1, -1)},
        {"name": "position_ids", "dtype": "int32", "shape": (-1, -1)},
        {"name": "past_key_0", **kv16}, {"name": "past_value_0", **kv16},
        {"name": "past_key_1", **kv16}, {"name": "past_value_1", **kv16},
    ]
    assert tiny_plan.outputs == [
        {"name": "logits", "dtype": "float32", "shape": (-1, -1, TINY["vocab_size"])},
        {"name": "present_key_0", **kv16}, {"name": "present_value_0", **kv16},
        {"name": "present_key_1", **kv16}, {"name": "present_value_1", **kv16},
    ]


def test_plan_profile_follows_the_arguments(tiny_plan):
    # BuildConfig.optimization_profiles(): batch [1, max//2, max], new tokens [1, max_input_len//2,
    # max_input_len], past [0, max_seq_len//2, max_seq_len-1]
    tokens = ((1, 1), (2, 8), (4, 16))
    kv = ((1, KVH, 0, D), (2, KVH, 16, D), (4, KVH, 31, D))
    assert tiny_plan.profiles == [{
        "input_ids": tokens, "position_ids": tokens,
        "past_key_0": kv, "past_value_0": kv, "past_key_1": kv, "past_value_1": kv,
    }]


def test_profile_opt_batch_size(trt, tiny):
    bc = BuildConfig(max_batch_size=8, max_input_len=4, max_seq_len=10, opt_batch_size=3)
    lowering = TensorRTLowering(tiny, bc.optimization_profiles())
    shapes = lowering.profile_shapes()
    assert shapes["input_ids"] == ((1, 1), (3, 2), (8, 4))
    assert shapes["past_value_1"] == ((1, KVH, 0, D), (3, KVH, 5, D), (8, KVH, 9, D))
    one_token = BuildConfig(max_batch_size=1, max_input_len=1, max_seq_len=1).optimization_profiles()
    one = TensorRTLowering(tiny, one_token).profile_shapes()
    assert one["input_ids"] == ((1, 1), (1, 1), (1, 1))
    assert one["past_key_0"] == ((1, KVH, 0, D),) * 3


GOOD = {"batch_size": (1, 1, 2), "input_len": (1, 2, 4), "past_len": (0, 4, 7)}


@pytest.mark.parametrize("change, field", [
    ({"batch_size": (1, 1, 0)}, r"profiles\['batch_size'\]"),
    ({"batch_size": (1, 3, 2)}, r"profiles\['batch_size'\]"),
    ({"past_len": None}, r"profiles\['past_len'\]"),
    ({"input_len": (1, 2, 9)}, "input_len max"),
    ({"dtype": torch.int8}, "dtype"),
    ({"profiling_verbosity": "loud"}, "profiling_verbosity"),
])
def test_lowering_validates_its_arguments(trt, tiny, change, field):
    profiles = {k: v for k, v in {**GOOD, **change}.items() if k in GOOD and v is not None}
    kwargs = {k: v for k, v in change.items() if k not in GOOD}
    with pytest.raises(ValueError, match=field):
        TensorRTLowering(tiny, profiles, **kwargs)


def test_lowering_refuses_quantized_networks(trt, tiny):
    quantized = Network(tiny.config, tiny.layers, tiny.weights, name="q", quant_config="int8-weight-only")
    with pytest.raises(ValueError, match="unquantized"):
        TensorRTLowering(quantized, GOOD)


def test_layer_names_map_back_to_kit_layers(tiny_plan, tiny):
    kit_names = [layer.name for layer in tiny]
    assert tiny_plan.num_layers == len(tiny_plan.layers)
    assert all(layer["kit_layer"] in kit_names for layer in tiny_plan.layers)
    assert tiny_plan.kit_layers() == kit_names  # every kit layer lowered, in order
    names = {layer["name"] for layer in tiny_plan.layers}
    for name in ("embedding/gather", "layers.0.input_norm/mean", "layers.0.qkv_proj/matmul", "layers.0.rope/cos",
                 "layers.1.attention/present_k", "layers.1.attention/softmax", "layers.1.mlp/gate_up",
                 "final_norm/rsqrt", "lm_head/matmul"):
        assert name in names
    assert kit_layer_of("layers.3.mlp/gate_up") == "layers.3.mlp"
    types = set(tiny_plan.to_frame()["type"])
    assert {"GATHER", "MATRIX_MULTIPLY", "CONSTANT", "REDUCE", "SOFTMAX", "CONCATENATION"} <= types
    assert not any(t.startswith("PLUGIN") for t in types)  # standard layers only


def test_tied_embedding_is_one_constant(tiny_plan, trt):
    tied = tiny_network("qwen2")
    plan = build_plan(tied, LIMITS, progress=False)
    frame = plan.to_frame()
    assert list(frame[frame["type"] == "CONSTANT"]["name"]).count("embedding/weight") == 1
    assert not any(name.startswith("lm_head/") for name in frame[frame["type"] == "CONSTANT"]["name"])


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_variants_lower_and_build(trt, family):
    # progress=True: tqdm over the kit layers and TensorRT's IProgressMonitor (called from its threads)
    plan = build_plan(tiny_network(family), LIMITS, dtype=torch.bfloat16, progress=True)
    names = {layer["name"] for layer in plan.layers}
    assert plan.nbytes > 0 and plan.dtype == "bfloat16"
    assert {io["dtype"] for io in plan.inputs[2:]} == {"bfloat16"}
    extra = {"qwen2": "layers.0.qkv_proj/bias_add", "qwen3": "layers.0.qk_norm/k/rsqrt",
             "mistral": "layers.0.attention/mask_sliding"}[family]
    assert extra in names


def test_save_and_load(tiny_plan, tmp_path):
    out = tiny_plan.save(tmp_path / "engine")
    assert (out / "rank0.engine").read_bytes() == tiny_plan.plan
    meta = json.loads((out / "trt_build.json").read_text())
    assert meta["plan_bytes"] == tiny_plan.nbytes
    assert meta["inputs"][0] == {"name": "input_ids", "dtype": "int32", "shape": [-1, -1]}
    assert meta["profiles"][0]["past_key_0"] == [[1, KVH, 0, D], [2, KVH, 16, D], [4, KVH, 31, D]]
    assert TensorRTPlan.load(out) == tiny_plan


def test_repr_html(tiny_plan):
    text = tiny_plan._repr_html_()
    assert "TensorRTPlan" in text and "input_ids" in text and "present_value_1" in text
    assert "(4, 16)" in text  # the profile's max
    assert "tiny-llama" in repr(tiny_plan)


# ---------------------------------------------------------------------- runtime
def test_check_runtime_on_this_machine(tiny_plan):
    backend = TensorRTBackend(tiny_plan)
    assert backend.name == "tensorrt"
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
    if torch.cuda.is_available() and not (hopper and tiny_plan.flavour == "tensorrt_rtx"):
        pytest.skip("this machine has a GPU the plan may run on")
    with pytest.raises(RuntimeError, match="CUDA GPU|Hopper"):
        backend.check_runtime()


def test_check_runtime_without_gpu(tiny_plan, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*backend='torch'"):
        TensorRTBackend(tiny_plan).check_runtime()


def test_check_runtime_refuses_hopper_for_rtx(tiny_plan, monkeypatch):
    if tiny_plan.flavour != "tensorrt_rtx":
        pytest.skip("TensorRT proper runs on Hopper")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    msg = "TensorRT-RTX does not run on compute capability 9.0 (Hopper); use the PyTorch backend (backend='torch')"
    with pytest.raises(RuntimeError) as e:
        TensorRTBackend(tiny_plan).check_runtime()
    assert str(e.value) == msg


# -------------------------------------------------------- the lowered graph's math
@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_forward_matches_the_paged_engine(family):
    """Prefill 5, then 2, then 1 token for two sequences; contiguous KV vs the paged engine."""
    network = tiny_network(family)
    engine = Engine.from_network(network, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    seqs = torch.randint(0, TINY["vocab_size"], (2, 8), generator=g)
    expected = run_chunks(engine, seqs.tolist(), [[5, 5], [2, 2], [1, 1]], block_size=4,
                          block_order=[5, 0, 3, 1, 4, 2])
    past, got, done = None, [], 0
    for n in (5, 2, 1):
        ids = seqs[:, done:done + n].to(torch.int32)
        pos = torch.arange(done, done + n, dtype=torch.int32).expand(2, n)
        logits, past = reference_forward(network, ids, pos, past)
        assert logits.shape == (2, n, TINY["vocab_size"]) and logits.dtype == torch.float32
        assert [tuple(k.shape) for k, _ in past] == [(2, KVH, done + n, D)] * TINY["num_hidden_layers"]
        got.append(logits)
        done += n
    got = torch.cat(got, 1)
    for row in range(2):
        torch.testing.assert_close(got[row], expected[row], atol=2e-5, rtol=1e-4)
    assert expected[0].abs().max() > 0.1  # the logits are not trivially small


def test_reference_forward_half_precision_tracks_float32():
    network = tiny_network("qwen3")
    ids = torch.tensor([[3, 14, 15, 92, 65]], dtype=torch.int32)
    pos = torch.arange(5, dtype=torch.int32)[None]
    ref, _ = reference_forward(network, ids, pos)
    half, present = reference_forward(network, ids, pos, dtype=torch.float16)
    assert present[0][0].dtype == torch.float16
    torch.testing.assert_close(half, ref, atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------- SmolLM2
@pytest.mark.slow  # the tiny plans above check the same lowering in make test
def test_smollm2_plan(trt):  # ~40 s on 2 cores (+20 s the first time, to convert the GGUF)
    from kit.loader import ModelLoader

    loaded = ModelLoader("smollm2-135m", dtype=torch.float16).load()
    network = NetworkBuilder(loaded).build()
    c = network.config
    t0 = time.perf_counter()
    profiles = BuildConfig(max_batch_size=8, max_input_len=512, max_seq_len=2048).optimization_profiles()
    plan = build_plan(network, profiles, dtype=torch.float16, progress=False)
    print(f"\nSmolLM2-135M plan: lowered in {plan.lower_seconds:.1f} s, built in {plan.build_seconds:.1f} s, "
          f"{time.perf_counter() - t0:.1f} s in all, {plan.nbytes / 2**20:.1f} MiB "
          f"(weights {network.weight_bytes / 2**20:.1f} MiB)")
    assert [io["name"] for io in plan.inputs] == ["input_ids", "position_ids"] + [
        f"past_{kv}_{i}" for i in range(c.num_hidden_layers) for kv in ("key", "value")]
    assert [io["name"] for io in plan.outputs] == ["logits"] + [
        f"present_{kv}_{i}" for i in range(c.num_hidden_layers) for kv in ("key", "value")]
    assert plan.outputs[0]["shape"] == (-1, -1, c.vocab_size)
    assert plan.inputs[2]["shape"] == (-1, c.num_key_value_heads, -1, c.head_dim)
    assert plan.profiles[0]["past_key_0"][2] == (8, c.num_key_value_heads, 2047, c.head_dim)
    assert plan.kit_layers() == [layer.name for layer in network]
    assert plan.nbytes >= 0.95 * network.weight_bytes  # fp16 weights live in the plan (tied embedding once)


# ------------------------------------------------------- precision (float32 networks)
@pytest.fixture(scope="module")
def fp32_plan(trt):
    network = tiny_network("llama")
    assert network.weights["model.embed_tokens.weight"].dtype == torch.float32  # the CPU's default dtype
    return build_plan(network, LIMITS, progress=False)


def test_a_float32_network_builds_a_float16_plan_and_says_so(fp32_plan, tmp_path):
    if fp32_plan.flavour != "tensorrt_rtx":
        pytest.skip("TensorRT proper compiles float32 GEMMs")
    assert fp32_plan.dtype == "float16" and fp32_plan.requested_dtype == "float32"
    assert "FP32 GEMM is not supported" in fp32_plan.precision_reason
    assert fp32_plan.precision.startswith("float16 (float32 requested: TensorRT-RTX cannot compile float32 GEMMs")
    assert [io["name"] for io in fp32_plan.inputs] == ["input_ids", "position_ids", "past_key_0", "past_value_0",
                                                      "past_key_1", "past_value_1"]
    assert [io["name"] for io in fp32_plan.outputs] == ["logits", "present_key_0", "present_value_0",
                                                       "present_key_1", "present_value_1"]
    assert {io["dtype"] for io in fp32_plan.inputs[2:]} == {"float16"}
    assert fp32_plan.profiles[0]["input_ids"] == ((1, 1), (2, 8), (4, 16))
    meta = json.loads((fp32_plan.save(tmp_path / "p") / "trt_build.json").read_text())
    assert (meta["dtype"], meta["requested_dtype"]) == ("float16", "float32")
    assert "FP32 GEMM" in meta["precision_reason"]
    assert TensorRTPlan.load(tmp_path / "p") == fp32_plan
    assert "float32 requested" in fp32_plan._repr_html_()
    assert "float32 requested" in TensorRTBackend(fp32_plan).describe()  # the builder's log shows describe()


def test_explicit_float32_is_refused_before_building(trt, monkeypatch):
    if import_tensorrt()[1] != "tensorrt_rtx":
        pytest.skip("TensorRT proper compiles float32 GEMMs")
    network = tiny_network("llama")
    monkeypatch.setattr("kit.backends.tensorrt_plan.TensorRTLowering", None)  # never reached
    with pytest.raises(ValueError) as e:
        build_plan(network, LIMITS, dtype=torch.float32, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "dtype=torch.float32" in msg and "torch.float16" in msg


def test_precision_of_half_networks_is_kept(trt):
    half = tiny_network("llama")
    half = Network(half.config, half.layers, {k: v.half() for k, v in half.weights.items()}, name="half")
    flavour = import_tensorrt()[1]
    assert resolve_precision(half, None, flavour) == (torch.float16, None, None)
    assert resolve_precision(half, torch.bfloat16, flavour) == (torch.bfloat16, None, None)
    with pytest.raises(ValueError, match="dtype"):
        resolve_precision(half, torch.int8, flavour)


def test_builder_of_a_float32_network_passes_the_profile_and_verbosity(trt):
    network = tiny_network("llama")
    bc = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=32, profiling_verbosity="detailed")
    engine = Builder("tensorrt", device="cpu").build(network, bc, enable_build_cache=False, progress=False)
    plan = engine.backend.plan
    assert plan.profiles[0]["past_key_0"] == ((1, KVH, 0, D), (2, KVH, 16, D), (4, KVH, 31, D))
    if plan.flavour == "tensorrt_rtx":
        assert plan.dtype == "float16" and plan.requested_dtype == "float32"
        assert "float32 requested" in engine.build_log[0]["detail"]


def test_the_backend_cannot_execute_and_says_what_it_can(tiny_plan):
    backend = TensorRTBackend(tiny_plan)
    assert isinstance(backend, Backend) and backend.can_execute is False
    assert "builds and inspects plans" in backend.capabilities and "backend='torch'" in backend.capabilities
    batch = ForwardBatch.build([SequenceInput([1, 2], 0, [0])], 4)
    with pytest.raises(RuntimeError) as e:
        backend.forward(batch, None)
    assert str(e.value) == backend.capabilities
