"""widgets/loop_lanes.py: CPU and GPU lanes from hand-made timing frames and from real tiny runs."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from kit.builder import BuildConfig  # noqa: E402
from kit.llm import LLM  # noqa: E402
from kit.sampling_params import SamplingParams  # noqa: E402
from widgets.loop_lanes import LANE_COLUMNS, LoopLanes  # noqa: E402


def _frame(overlap: bool, n: int = 4) -> pd.DataFrame:
    """Steps of 10 ms: 1 ms schedule, 1 ms prepare, 1 ms launch, forward 4 ms, sampling 1 ms, output 2 ms."""
    rows, t = [], 0.0
    for i in range(n):
        launch = t + 0.002
        fwd = launch + 0.0005
        rows.append({"iteration": i + 1, "cpu_schedule_s": t, "cpu_prepare_s": t + 0.001, "cpu_launch_s": launch,
                     "cpu_launch_end_s": launch + 0.001, "gpu_forward_s": fwd, "gpu_sampling_s": fwd + 0.004,
                     "gpu_end_s": fwd + 0.005, "cpu_output_s": fwd + 0.005, "cpu_output_end_s": fwd + 0.007})
        t = fwd + (0.005 if overlap else 0.007)  # overlapped: the next schedule starts when the device ends
    return pd.DataFrame(rows)


def _spans(coll):
    return [(round(p.vertices[0][0], 6), round(p.vertices[2][0] - p.vertices[0][0], 6)) for p in coll.get_paths()]


def test_lanes_from_hand_made_frames():
    lanes = LoopLanes({"off": _frame(False), "on": _frame(True)}, num_iterations=2)
    assert set(LANE_COLUMNS) <= set(_frame(False).columns)
    assert _spans(lanes.bars[("off", "schedule")]) == [(0.0, 1.0), (9.5, 1.0)]
    assert _spans(lanes.bars[("off", "forward")]) == [(2.5, 4.0), (12.0, 4.0)]
    # GPU busy 5 ms a step: synchronous, the second step's device ends at 12 + 5 -> 10 / 17; overlapped the
    # next step starts 2 ms earlier -> 10 / 15
    assert lanes.device_busy("off") == pytest.approx(10 / 17)
    assert lanes.device_busy("on") == pytest.approx(10 / 15)
    assert lanes.slider.max == 2 and "GPU busy" in lanes.summary.value
    lanes.slider.value = 2
    assert list(lanes.window("on")["iteration"]) == [3, 4]
    assert _spans(lanes.bars[("on", "schedule")])[0] == (0.0, 1.0)  # times are relative to the window
    with pytest.raises(ValueError, match="missing"):
        LoopLanes(pd.DataFrame({"iteration": [1]}))


def test_lanes_from_real_runs_with_and_without_overlap(tiny_checkpoints):
    from kit.loader import ModelLoader

    tiny = ModelLoader(tiny_checkpoints["llama"][0]).load()
    bc = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=40, max_num_tokens=64, block_size=4)
    frames = {}
    for overlap in (False, True):
        with LLM(tiny, device="cpu", build_config=bc, overlap=overlap) as llm:
            llm.generate([[5, 6, 7, i] for i in range(4)], SamplingParams(max_tokens=8, temperature=0.0,
                                                                          ignore_eos=True))
            frames[f"overlap {'on' if overlap else 'off'}"] = llm.executor.stats()
    lanes = LoopLanes(frames, num_iterations=4)
    assert not frames["overlap off"]["overlap"].any() and frames["overlap on"]["overlap"].any()
    for label in frames:
        assert 0.0 < lanes.device_busy(label) <= 1.0
        assert len(lanes.bars[(label, "forward")].get_paths()) == 4
    png = lanes._repr_mimebundle_()["image/png"]
    assert isinstance(png, str) and len(png) > 1000
    assert np.isfinite(frames["overlap on"]["forward_ms"]).all()
