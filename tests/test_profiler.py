import json

import pytest

from kit.engine import Engine
from kit.network import NetworkBuilder
from kit.profiler import ProfiledEngine, layer_cost


@pytest.fixture(scope="module")
def profiled(smollm2):
    return ProfiledEngine(Engine.from_network(NetworkBuilder(smollm2).build()))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_profile_has_every_layer(profiled, phase):
    df = profiled.profile(batch_size=2, seq_len=32, phase=phase, iters=2, warmup=1)
    net = profiled.engine.network
    assert list(df["layer"]) == [layer.name for layer in net]
    for col in ("latency_ms", "latency_ms_p50", "latency_ms_min", "share_pct", "flops", "bytes",
                "achieved_gbps", "arithmetic_intensity"):
        assert col in df.columns
    assert (df["latency_ms"] > 0).all() and abs(df["share_pct"].sum() - 100) < 1e-6
    s = profiled.last_summary
    assert s["unprofiled_ms"] > 0 and s["phase"] == phase
    assert abs(s["overhead_ms"] - (s["profiled_sum_ms"] - s["unprofiled_ms"])) < 1e-9
    kinds = ProfiledEngine.by_kind(df)
    assert set(kinds["kind"]) == set(df["kind"])
    assert "ProfiledEngine" in profiled._repr_html_()


def test_costs_follow_the_shapes(profiled):
    net = profiled.engine.network
    c = net.config
    mlp = net["layers.0.mlp"]
    flops, nbytes = layer_cost(mlp, net, num_tokens=8, num_seqs=8, q_len=1, ctx_len=100, elem=4)
    assert flops == 2 * 8 * 3 * c.hidden_size * c.intermediate_size
    assert nbytes >= 3 * c.hidden_size * c.intermediate_size * 4  # every weight read once
    # decode attention reads the whole context of K and V
    f, b = layer_cost(net["layers.0.attention"], net, 1, 1, 1, 100, 4)
    assert b >= 100 * 2 * c.kv_size * 4 and f == 4 * 100 * c.num_attention_heads * c.head_dim
    # decode is bandwidth-bound: about 1 FLOP per byte for the weights at batch 1
    df = profiled.profile(batch_size=1, seq_len=16, phase="decode", iters=1, warmup=1)
    mlp_row = df[df.kind == "mlp"].iloc[0]
    assert 0.4 < mlp_row["arithmetic_intensity"] < 1.0


def test_export_trace(profiled, tmp_path):
    path = profiled.export_trace(str(tmp_path / "trace.json"), batch_size=1, seq_len=8, phase="decode")
    names = {e.get("name") for e in json.loads(open(path).read())["traceEvents"]}
    assert "layers.0.mlp" in names and "lm_head" in names


def test_bad_arguments(profiled):
    with pytest.raises(ValueError, match="phase"):
        profiled.profile(phase="both")
    with pytest.raises(ValueError, match="batch_size"):
        profiled.profile(batch_size=0)


def test_roofline_table_per_kind_and_step(profiled):
    df = profiled.profile(batch_size=1, seq_len=16, phase="decode", iters=2, warmup=1)
    table = profiled.roofline(bandwidth=1e9, peak_flops=1e18)
    kinds = ProfiledEngine.by_kind(df)
    assert list(table["kind"]) == list(kinds["kind"]) + ["step"]
    step = table.iloc[-1]
    assert step["bytes"] == df["bytes"].sum() and step["latency_ms"] == profiled.last_summary["unprofiled_ms"]
    assert (table["roofline_ms"] - 1e3 * table["bytes"] / 1e9).abs().max() < 1e-9  # bandwidth bound at batch 1
    assert (table["achieved_fraction"] == table["roofline_ms"] / table["latency_ms"]).all()
    assert profiled.graphed_step_ms() is None  # the CPU has no CUDA graphs
    with pytest.raises(ValueError, match="bandwidth"):
        profiled.roofline(bandwidth=0)


def test_count_kernels_per_layer(profiled):
    df = profiled.count_kernels(batch_size=2, seq_len=8, phase="decode")
    net = profiled.engine.network
    assert list(df["layer"]) == [layer.name for layer in net]
    by_layer = dict(zip(df["layer"], df["kernels"]))
    assert by_layer["layers.0.input_norm"] == 1  # one fused add + RMSNorm
    assert by_layer["layers.0.post_attention_norm"] == 1 and by_layer["final_norm"] == 1
    assert by_layer["layers.1.rope"] == 1  # rope and the K/V cache write
    # on the CPU the first rope also builds the cos / sin tables once a forward (positions cast, times
    # inv_freq, cat, cos, sin); the Triton kernel needs none
    assert by_layer["layers.0.rope"] == 1 + 5
    assert by_layer["layers.0.mlp"] == 3  # gate_up GEMM, silu_mul, down GEMM
    assert by_layer["layers.0.o_proj"] == 1 and by_layer["lm_head"] == 1  # a decode batch: no row gather
    assert df.attrs["host_syncs"] == 0


def test_top_kernels(profiled):
    top = profiled.top_kernels(n=5, batch_size=1, seq_len=8)
    assert list(top.columns) == ["name", "calls", "time_ms", "share_pct"] and 0 < len(top) <= 5
    assert (top["time_ms"].diff().dropna() <= 0).all() and (top["calls"] >= 1).all()


@pytest.mark.gpu
def test_graphed_step_roofline_and_top_kernels_on_cuda():
    import torch

    from kit.loader import ModelLoader

    net = NetworkBuilder(ModelLoader.synthetic("qwen2.5-0.5b", device="cuda", dtype=torch.bfloat16)).build()
    prof = ProfiledEngine(Engine.from_network(net, device="cuda", dtype=torch.bfloat16))
    prof.profile(batch_size=4, seq_len=256, phase="decode", iters=3, warmup=2)
    graphed = prof.graphed_step_ms(iters=10)
    assert graphed is not None and graphed > 0
    table = prof.roofline()
    assert list(table["kind"][-2:]) == ["step", "graphed step"]
    assert table.iloc[-1]["latency_ms"] == graphed
    top = prof.top_kernels(n=20, batch_size=4, seq_len=256)
    assert top["name"].str.contains("rms_norm_kernel|rope_kv_kernel|silu_mul_kernel").any()
    kernels = prof.count_kernels(batch_size=4, seq_len=256)
    assert kernels.set_index("layer").loc["layers.1.rope", "kernels"] == 1  # no cos / sin tables on the GPU


def test_step_kernels_needs_a_cuda_device():
    from kit.profiler import step_kernels

    with pytest.raises(ValueError, match="CUDA"):
        step_kernels(lambda: None, device="cpu")


@pytest.mark.gpu
def test_step_kernels_traces_a_graph_replay():
    """The kernels a CUDA-graph replay runs are traced one by one: as many as an eager step launches."""
    import torch

    from kit.backends.cuda_graphs import CUDAGraphRunner
    from kit.loader import ModelLoader
    from kit.profiler import step_kernels

    net = NetworkBuilder(ModelLoader.synthetic("qwen2.5-0.5b", device="cuda", dtype=torch.bfloat16)).build()
    prof = ProfiledEngine(Engine.from_network(net, device="cuda", dtype=torch.bfloat16))
    eager = int(prof.count_kernels(batch_size=4, seq_len=64)["kernels"].sum())
    batch, kv, _ = prof._batch(4, 64, "decode")
    runner = CUDAGraphRunner(prof.engine.backend, kv, (4,), batch.block_tables.shape[1])
    df = step_kernels(lambda: runner.run(batch), iters=5, device="cuda")  # "cuda": the current device
    a = df.attrs
    assert a["steps"] == 5 and a["kernels_per_step"] >= eager  # (a GEMM may split into two kernels)
    assert df["name"].str.contains("rms_norm_kernel").any()
    assert 0 < a["kernel_ms"] <= a["step_ms"] * 1.05 and a["idle_ms"] >= 0
    assert abs(df["share_pct"].sum() - 100.0) < 1e-6
