import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402


def _frame(scale):
    layers = [("embedding", "embedding"), ("layers.0.qkv_proj", "qkv_proj"), ("layers.0.attention", "attention"),
              ("layers.0.mlp", "mlp"), ("lm_head", "lm_head")]
    return pd.DataFrame({"layer": [l for l, _ in layers], "kind": [k for _, k in layers],
                         "latency_ms": [scale * v for v in (0.1, 0.5, 0.3, 1.0, 0.6)],
                         "achieved_gbps": [10.0, 20.0, 30.0, 40.0, 50.0], "share_pct": [4, 20, 12, 40, 24]})


def test_switching_phase_engine_and_compare_redraws():
    from widgets.layer_timing import LayerTimingView

    view = LayerTimingView({"bf16": {"prefill": _frame(1.0), "decode": _frame(0.1)},
                            "int4": {"prefill": _frame(0.5), "decode": _frame(0.05)}})
    assert view.bar_heights == pytest.approx([0.1, 0.5, 0.3, 1.0, 0.6])
    view.phase.value = "decode"
    assert view.bar_heights == pytest.approx([0.01, 0.05, 0.03, 0.1, 0.06])
    view.compare.value = "int4"
    assert len(view.bar_heights) == 10 and "2.00x" in view.summary.value
    view.metric.value = "achieved_gbps"
    assert view.bar_heights[:5] == pytest.approx([10, 20, 30, 40, 50])


def test_with_a_real_profile(smollm2):
    from kit.engine import Engine
    from kit.network import NetworkBuilder
    from kit.profiler import ProfiledEngine
    from widgets.layer_timing import LayerTimingView

    prof = ProfiledEngine(Engine.from_network(NetworkBuilder(smollm2).build()))
    frames = {"fp32": {"decode": prof.profile(1, 16, "decode", iters=1, warmup=1)}}
    view = LayerTimingView(frames, max_layers=20)
    assert len(view.bar_heights) == 20
    assert view.bar_heights[0] == pytest.approx(frames["fp32"]["decode"]["latency_ms"].iloc[0])
    with pytest.raises(ValueError):
        LayerTimingView({})
