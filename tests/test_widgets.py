"""widgets: KVCacheMap and BatchingTimeline built from hand-made frames and from real tiny runs.

Each test moves a control programmatically and checks the artists it must have changed
(the image array of a step, the highlighted row), against what the frame implies.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex, to_rgba  # noqa: E402

from kit.builder import BuildConfig  # noqa: E402
from kit.config import ModelConfig  # noqa: E402
from kit.executor import KvCacheConfig  # noqa: E402
from kit.kv_cache_inspector import _COLORS as kv_html_colors  # noqa: E402
from kit.kv_cache import KVCacheInspector, KVCacheManager  # noqa: E402
from kit.llm import LLM  # noqa: E402
from kit.loader import LoadedModel, random_weights  # noqa: E402
from kit.request import Request  # noqa: E402
from kit.sampling_params import SamplingParams  # noqa: E402
from widgets.batching import NONE, BatchingTimeline, runs  # noqa: E402
from widgets.figure import figure_png  # noqa: E402
from widgets.kv_cache import CACHED_COLOR, FREE_COLOR, REQUEST_PALETTE, KVCacheMap  # noqa: E402
from widgets.layer_timing import NONE as NO_COMPARE  # noqa: E402
from widgets.layer_timing import LayerTimingView, profiles_json_frames  # noqa: E402
from widgets.quant_compare import QuantComparison  # noqa: E402

WHITE, GREY = to_rgba(FREE_COLOR), to_rgba(CACHED_COLOR)


# ------------------------------------------------------------------ hand-made frames
def _block_rows(step, owners, states):
    return [{"step": step, "block_id": b, "owner_request_ids": o, "ref_count": len(o), "hash": None, "state": s,
             "num_tokens": 4 if s != "free" else 0} for b, (o, s) in enumerate(zip(owners, states))]


@pytest.fixture
def history():
    """5 blocks over 3 steps: A and B allocate, B finishes (its block cached), C shares A's block."""
    rows = (_block_rows(1, [("A",), ("A",), ("B",), (), ()], ["used", "used", "used", "free", "free"])
            + _block_rows(2, [("A",), ("A",), (), (), ()], ["used", "used", "cached", "free", "free"])
            + _block_rows(3, [("A", "C"), ("A",), (), ("C",), ()], ["used", "used", "cached", "used", "free"]))
    return pd.DataFrame(rows)


def _expected_image(frame, colors, ncols):
    """What a block map implies, computed independently of the widget: cell b = (b // ncols, b % ncols)."""
    n = len(frame)
    img = np.zeros((-(-n // ncols), ncols, 4))
    for b, owners, state in zip(frame["block_id"], frame["owner_request_ids"], frame["state"]):
        img[b // ncols, b % ncols] = (to_rgba(colors[owners[0]]) if state == "used" else
                                      GREY if state == "cached" else WHITE)
    return img


def test_kv_cache_map_from_hand_made_history(history):
    w = KVCacheMap(history, ncols=3)
    assert w.steps == [1, 2, 3] and w.num_blocks == 5 and (w.nrows, w.ncols) == (2, 3)
    assert list(w.colors) == ["A", "B", "C"] and len(set(w.colors.values())) == 3
    assert (w.slider.min, w.slider.max, w.slider.value) == (1, 3, 1)
    img = w.image.get_array()
    assert img.shape == (2, 3, 4)
    assert tuple(img[0, 0]) == tuple(img[0, 1]) == to_rgba(w.colors["A"])
    assert tuple(img[0, 2]) == to_rgba(w.colors["B"]) and tuple(img[1, 0]) == WHITE
    assert tuple(img[1, 2]) == (0, 0, 0, 0)  # past the last block: transparent
    assert "used 3" in w.label.value and "cached 0" in w.label.value and "free 2" in w.label.value

    w.slider.value = 2  # B finished: its block is cached (grey), A keeps its colour
    img2 = w.image.get_array()
    np.testing.assert_array_equal(img2, _expected_image(history[history.step == 2], w.colors, 3))
    assert tuple(img2[0, 2]) == GREY and tuple(img2[0, 0]) == to_rgba(w.colors["A"])
    assert w.counts() == {"used": 2, "cached": 1, "free": 2, "shared": 0, "tokens": 8}
    assert len(w.shared_marks.get_offsets()) == 0

    w.slider.value = 3  # C shares block 0 with A: a dot on cell (0, 0); block 3 is C's
    np.testing.assert_array_equal(w.image.get_array(), _expected_image(history[history.step == 3], w.colors, 3))
    assert tuple(w.image.get_array()[1, 0]) == to_rgba(w.colors["C"])
    np.testing.assert_array_equal(np.asarray(w.shared_marks.get_offsets()), [[0, 0]])
    assert w.step == 3 and "step 3" in w.label.value and "shared 1" in w.label.value
    assert w.children[2].value  # the PNG view was rendered


def test_kv_cache_map_from_one_block_map_of_a_manager():
    """A single KVCacheInspector.block_map() (no step column): used, cached and free blocks."""
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_prefix_caching=True)
    a, b = Request("a", list(range(10)), max_tokens=4), Request("b", list(range(100, 105)), max_tokens=4)
    for r in (a, b):
        kv.allocate_slots(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
        kv.cache_full_blocks(r)
    kv.free(b)  # b's first block is full and hashed -> cached; its tail -> free
    bm = KVCacheInspector(kv).block_map()
    w = KVCacheMap(bm)
    assert w.steps == [0] and w.slider.disabled and w.ncols == 6
    expected = _expected_image(bm, w.colors, 6)
    np.testing.assert_array_equal(w.image.get_array(), expected)
    assert [tuple(c) for c in w.image.get_array()[0]] == [to_rgba(w.colors["a"])] * 3 + [GREY, WHITE, WHITE]
    stats = KVCacheInspector(kv).stats()
    assert w.counts()["used"] == stats["used"] and w.counts()["cached"] == stats["cached"] == 1
    assert w.counts()["free"] == stats["free"]


def test_kv_cache_map_refuses_an_empty_history():
    with pytest.raises(ValueError, match="record_kv_cache=True"):
        KVCacheMap(pd.DataFrame())


def _stats_rows():
    """A runs 1-4, B runs 1-2, is preempted at 3, runs again 5-6; C runs 4-6."""
    sched = {1: ["A", "B"], 2: ["A", "B"], 3: ["A"], 4: ["A", "C"], 5: ["B", "C"], 6: ["B", "C"]}
    pre = {3: ["B"]}
    return pd.DataFrame([{
        "iteration": it, "time_s": 0.01 * it, "duration_ms": 10.0, "request_ids": ids,
        "num_prefill_tokens": 8 if it in (1, 4, 5) else 0, "num_decode_tokens": len(ids) - (it in (1, 4, 5)),
        "batch_size": len(ids), "kv_blocks_used": 2 * len(ids), "kv_blocks_total": 6,
        "num_preemptions": len(pre.get(it, [])), "preempted_request_ids": pre.get(it, []), "num_waiting": 0}
        for it, ids in sched.items()])


def _bar_spans(coll):
    """(x0, width) of each bar of a broken_barh collection."""
    out = []
    for path in coll.get_paths():
        xs = path.vertices[:, 0]
        out.append((round(float(xs.min()), 6), round(float(xs.max() - xs.min()), 6)))
    return sorted(out)


def test_batching_timeline_from_hand_made_stats():
    t = BatchingTimeline(_stats_rows())
    assert t.requests == ["A", "B", "C"]
    assert t.schedule("B") == {"iterations": [1, 2, 5, 6], "runs": [(1, 2), (5, 6)], "preempted_at": [3],
                               "first": 1, "last": 6, "num_iterations": 4}
    assert _bar_spans(t.rows["B"]) == [(0.6, 1.8), (4.6, 1.8)]  # iterations 1-2 and 5-6, bars 0.8 wide
    np.testing.assert_array_equal(np.asarray(t.preemption_marks.get_offsets()), [[3, 1]])  # (iteration, row of B)
    assert [b.get_height() for b in t.prefill_bars] == [8, 0, 0, 8, 8, 0]
    assert [b.get_height() for b in t.decode_bars] == [1, 2, 1, 1, 1, 2]
    np.testing.assert_array_equal(t.batch_line.get_ydata(), [2, 2, 1, 2, 2, 2])
    assert not t.highlight.get_visible()
    assert t.dropdown.value == NONE and t.dropdown.label == "(none)" and t.dropdown.index == 0  # a visible default
    ax_g, ax_tokens, ax_batch, ax_kv = t.axes  # one quantity per axis: the pool size is on the KV axis only
    np.testing.assert_array_equal(t.kv_line.get_ydata(), [4, 4, 2, 4, 4, 4])
    assert t.kv_total_line.axes is ax_kv and list(t.kv_total_line.get_ydata()) == [6, 6]
    assert t.batch_line.axes is ax_batch and ax_batch is not ax_kv and ax_kv.get_ylim()[1] >= 6
    assert ax_batch.get_ylim()[1] < 6  # batch sizes (max 2) are not drawn against the pool's scale
    assert t.kv_total_line.get_visible() and t.kv_line.get_label() == "KV blocks used (peak 4 of 6)"
    big_pool = BatchingTimeline(_stats_rows().assign(kv_blocks_total=100))  # 4 of 100 blocks: zoom on the use
    assert big_pool.axes[3].get_ylim() == (0, 5.0) and not big_pool.kv_total_line.get_visible()
    assert "pool: 100 blocks (above this axis)" in [t.get_text() for t in big_pool.axes[3].get_legend().get_texts()]

    t.dropdown.value = "B"
    assert t.highlight.get_visible() and t.highlight.get_y() == 0.5  # row 1 spans 0.5 .. 1.5
    assert t.rows["B"].get_alpha() == 1.0 and t.rows["A"].get_alpha() < 1.0 and t.rows["C"].get_alpha() < 1.0
    outlined = [it for it, bar in zip(t.iterations, t.decode_bars) if bar.get_linewidth() > 0]
    assert outlined == [1, 2, 5, 6]
    assert "preempted at iteration 3" in t.schedule_html.value and "1&ndash;2, 5&ndash;6" in t.schedule_html.value

    t.dropdown.value = "C"
    assert t.highlight.get_y() == 1.5 and t.rows["B"].get_alpha() < 1.0
    t.dropdown.value = None  # cleared from code: the dropdown shows "(none)", not a blank
    assert t.dropdown.value == NONE and t.dropdown.label == "(none)" and t.selected is None
    assert not t.highlight.get_visible() and all(c.get_alpha() == 1.0 for c in t.rows.values())
    t.dropdown.value = "A"
    t.dropdown.value = NONE  # chosen by hand: stays visible
    assert t.dropdown.label == "(none)" and not t.highlight.get_visible()
    with pytest.raises(KeyError):
        t.schedule("Z")


def test_runs_and_bad_input():
    assert runs([1, 2, 3, 7, 8, 10]) == [(1, 3), (7, 8), (10, 10)] and runs([]) == []
    with pytest.raises(ValueError, match="Executor.stats"):
        BatchingTimeline(pd.DataFrame())


# ------------------------------------------------------------------ real tiny runs
TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_model():
    return LoadedModel(TINY, random_weights(TINY, seed=0), name="tiny", source_format="synthetic")


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


def _run(loaded, prompts, **kw):
    bc = BuildConfig(max_batch_size=4, max_seq_len=64, max_input_len=32, max_num_tokens=16, block_size=4)
    with LLM(loaded, device="cpu", build_config=bc, record_kv_cache=True, **kw) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    # NOTE: read the stats after shutdown (which joins the loop): the executor publishes the last
    # results before it records that iteration, so right after generate() the last row may be missing
    return outs, llm.executor.stats(), llm.executor.kv_cache_history()


def test_widgets_over_a_real_run_with_preemptions(tiny_model):
    outs, stats, hist = _run(tiny_model, _prompts((5, 9, 3, 7)), kv_cache_config=KvCacheConfig(num_blocks=10),
                             scheduler_policy="max_utilization")
    assert int(stats["num_preemptions"].sum()) >= 1 and all(len(o.token_ids) == 10 for o in outs)

    w = KVCacheMap(hist)
    assert w.steps == stats["iteration"].tolist() and w.num_blocks == 10
    assert set(w.colors) == {o.request_id for o in outs}
    for step in (3, w.steps[-1]):
        w.slider.value = step
        frame = hist[hist.step == step]
        np.testing.assert_array_equal(w.image.get_array(), _expected_image(frame, w.colors, w.ncols))
        c = w.counts()
        assert c["used"] == (frame.state == "used").sum() and c["used"] + c["cached"] + c["free"] == 10

    t = BatchingTimeline(stats)
    assert set(t.requests) == {o.request_id for o in outs}
    victim = stats.loc[stats.num_preemptions > 0, "preempted_request_ids"].iloc[0][0]
    t.dropdown.value = victim
    s = t.schedule(victim)
    assert s["iterations"] == [int(i) for i, ids in zip(stats.iteration, stats.request_ids) if victim in ids]
    assert s["preempted_at"] and len(s["runs"]) >= 2  # it ran, was preempted, ran again
    assert t.highlight.get_y() == t.requests.index(victim) - 0.5 and t.rows[victim].get_alpha() == 1.0
    marks = {(int(x), int(y)) for x, y in np.asarray(t.preemption_marks.get_offsets())}
    assert marks == {(int(it), t.requests.index(r)) for it, ids in zip(stats.iteration, stats.preempted_request_ids)
                     for r in ids}


def test_kv_cache_map_over_a_real_run_with_prefix_caching(tiny_model):
    """Prompts sharing 8 tokens (2 blocks): once the first finishes, its full blocks are cached (grey)
    or shared by a later request (a dot)."""
    shared = _prompts((8,), seed=1)[0]
    prompts = [shared + p for p in _prompts((3, 5, 2), seed=2)]
    bc = BuildConfig(max_batch_size=1, max_seq_len=64, max_input_len=32, max_num_tokens=16, block_size=4)
    with LLM(tiny_model, device="cpu", build_config=bc, record_kv_cache=True, enable_prefix_caching=True,
             kv_cache_config=KvCacheConfig(num_blocks=12)) as llm:
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    hist = llm.executor.kv_cache_history()
    assert llm.kv_cache_inspector.stats()["hit_rate"] > 0
    w = KVCacheMap(hist)
    cached_steps = sorted(hist.loc[hist.state == "cached", "step"].unique())
    assert cached_steps
    w.slider.value = int(cached_steps[-1])
    frame = hist[hist.step == cached_steps[-1]]
    img = w.image.get_array()
    np.testing.assert_array_equal(img, _expected_image(frame, w.colors, w.ncols))
    for b in frame.loc[frame.state == "cached", "block_id"]:
        assert tuple(img[b // w.ncols, b % w.ncols]) == GREY


def test_widget_modules_never_import_the_engine():
    code = ("import sys, widgets.kv_cache, widgets.batching; "
            "bad = [m for m in sys.modules if m.startswith(('kit.engine', 'kit.backends', 'kit.executor', 'torch'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_widgets_use_the_live_ipympl_canvas_under_matplotlib_widget():
    """Under `%matplotlib widget` the figure's own canvas is the view (in a subprocess: it switches backend)."""
    code = """
import matplotlib
matplotlib.use("module://ipympl.backend_nbagg")
import pandas as pd
from widgets.batching import BatchingTimeline
from widgets.kv_cache import KVCacheMap
rows = [{"step": s, "block_id": b, "owner_request_ids": ("a",) if b < s else (), "ref_count": int(b < s),
         "hash": None, "state": "used" if b < s else "free", "num_tokens": 4} for s in (1, 2) for b in range(4)]
w = KVCacheMap(pd.DataFrame(rows))
w.slider.value = 2
assert type(w.children[2]).__name__ == "Canvas" and w.children[2] is w.figure.canvas
assert (w.image.get_array()[0, 1] == matplotlib.colors.to_rgba(w.colors["a"])).all()
stats = pd.DataFrame([{"iteration": 1, "request_ids": ["a"], "num_prefill_tokens": 3, "num_decode_tokens": 0,
                       "batch_size": 1, "kv_blocks_used": 1, "kv_blocks_total": 4, "preempted_request_ids": []}])
t = BatchingTimeline(stats)
t.dropdown.value = "a"
assert t.children[2] is t.figure.canvas and t.highlight.get_visible()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ LayerTimingView over the H100 profiles
PROFILES = Path(__file__).resolve().parents[1] / "bench" / "results" / "profiles_h100.json"


def test_layer_timing_pages_through_every_layer_of_the_h100_profiles():
    data = json.loads(PROFILES.read_text())
    frames = profiles_json_frames(data)
    assert list(frames) == ["smollm2-135m, bs 1 (H100)", "smollm2-135m, bs 64 (H100)",
                            "synthetic:llama-3.2-1b, bs 1 (H100)", "synthetic:llama-3.2-1b, bs 64 (H100)"]
    assert list(frames["smollm2-135m, bs 1 (H100)"]) == ["prefill", "decode"]
    prefill = frames["smollm2-135m, bs 1 (H100)"]["prefill"]
    assert len(prefill) == 213

    v = LayerTimingView(frames, max_layers=30)
    assert v.num_pages == 8 and v.page.max == 7  # 213 layers: 7 pages of 30 and one of 3
    seen = []
    for page in range(v.num_pages):
        v.page.value = page
        seen += [t.get_text() for t in v.ax_layers.get_yticklabels()]
        assert v.bar_heights == pytest.approx(prefill["latency_ms"].iloc[30 * page:30 * page + 30].tolist())
    assert seen == prefill["layer"].tolist()  # every layer, in network order, each once
    assert "page 8 of 8: layers 210&ndash;212" in v.page_label.value
    assert all(t.get_fontsize() >= 8 and t.get_rotation() == 0 for t in v.ax_layers.get_yticklabels())

    # compare: another engine (the same model at batch 64), matched by layer name
    assert v.compare.value == NO_COMPARE and v.compare.label == "(none)"
    assert "smollm2-135m, bs 1 (H100)" not in v.compare.options  # never the engine itself
    v.phase.value = "decode"
    v.page.value = 0
    v.compare.value = "smollm2-135m, bs 64 (H100)"
    d1 = frames["smollm2-135m, bs 1 (H100)"]["decode"]
    d64 = frames["smollm2-135m, bs 64 (H100)"]["decode"]
    assert v.bar_heights == pytest.approx(d1["latency_ms"].iloc[:30].tolist() + d64["latency_ms"].iloc[:30].tolist())
    ratio = d1["latency_ms"].sum() / d64["latency_ms"].sum()
    assert f"({ratio:.2f}x; 213 layer names in common)" in v.summary.value

    v.engine.value = "smollm2-135m, bs 64 (H100)"  # compare follows: the engine itself leaves the options
    assert v.compare.value == NO_COMPARE and "smollm2-135m, bs 1 (H100)" in v.compare.options
    assert v.phase.value == "decode" and len(v.bar_heights) == 30 and v.page.value == 0


def test_layer_timing_takes_named_frames_with_a_phase_column():
    """Several named DataFrames (a CPU profile and the H100 rows), each with its `phase` column."""
    data = json.loads(PROFILES.read_text())
    h100 = pd.concat([pd.DataFrame(p["layers"]) for p in data["profiles"]
                      if p["model"] == "smollm2-135m" and p["batch_size"] == 1])
    cpu = h100.assign(latency_ms=h100["latency_ms"] * 3)
    v = LayerTimingView({"cpu": cpu, "H100": h100}, max_layers=50)
    assert list(v.phase.options) == ["prefill", "decode"] and v.num_pages == 5
    v.compare.value = "H100"
    assert "(3.00x; 213 layer names in common)" in v.summary.value
    with pytest.raises(ValueError, match=r"frames\['x'\]\['prefill'\] misses columns \['latency_ms'\]"):
        LayerTimingView({"x": {"prefill": pd.DataFrame({"layer": ["a"], "kind": ["mlp"]})}})
    with pytest.raises(TypeError, match=r"frames\['x'\] must be a DataFrame"):
        LayerTimingView({"x": [1, 2]})
    with pytest.raises(ValueError, match="max_layers must be >= 1"):
        LayerTimingView({"cpu": cpu}, max_layers=0)


# ------------------------------------------------------------------ QuantComparison
SCHEMES = ["float", "int8_wo", "fp8", "fp8_pc_pt", "w8a8", "int8_sq", "int4_wo", "int4_awq", "int4_gptq"]


def _quant_results():
    delta = [0.0, 0.3, 1.1, 0.6, 2.5, 1.4, 9.0, 5.0, 4.0]
    mib = [400.0, 200.0, 200.0, 200.0, 200.0, 200.0, 106.0, 106.0, 106.0]
    return pd.DataFrame({"scheme": SCHEMES, "perplexity": [20 * (1 + d / 100) for d in delta], "ppl_delta_pct": delta,
                         "kl_div": [d / 100 for d in delta], "top1_agreement": [1 - d / 50 for d in delta],
                         "linear_weight_mib": mib, "num_tokens": 2048})


def test_quant_comparison_fixed_colours_every_speed_point_and_sources():
    speed = pd.DataFrame({"scheme": ["float", "fp8", "int8_wo", "int4_wo"],
                          "tokens_per_s": [128.1, 173.9, 173.7, 153.6]})
    errs = pd.DataFrame({"layer": [f"l{i}" for i in range(6)], "kind": ["embedding", "qkv_proj", "mlp", "qkv_proj",
                                                                          "mlp", "lm_head"],
                         "block": [None, 0, 0, 1, 1, None], "rel_mse": [0.0, 2e-4, 5e-4, 3e-4, 8e-4, 0.0]})
    src = "H100, Llama-3.1-8B, bench/results/quant_decode_h100.json"
    w = QuantComparison(_quant_results(), speed=speed, layer_errors={"int4_wo": errs}, speed_source=src,
                        accuracy_source="SmolLM2-135M, CPU")
    colors = dict(w.colors)
    assert w.plotted == SCHEMES and len(set(colors.values())) == 9
    assert [t.get_text() for t in w.ax.get_legend().get_texts()] == SCHEMES  # every scheme named in a legend
    assert "speed:" not in w.source_text.get_text() and "accuracy: SmolLM2-135M, CPU" in w.source_text.get_text()

    w.x.value = "tokens_per_s"  # every scheme with a speed stays, in its own colour; the others are named
    assert w.plotted == ["float", "int8_wo", "fp8", "int4_wo"]
    np.testing.assert_allclose(w.point_data, [[128.1, 0.0], [173.7, 0.3], [173.9, 1.1], [153.6, 9.0]])
    drawn = {c.get_label(): to_hex(c.get_facecolor()[0]) for c in w.ax.collections}
    assert drawn == {s: colors[s] for s in w.plotted} and w.colors == colors
    assert w.missing_speed == ["fp8_pc_pt", "w8a8", "int8_sq", "int4_awq", "int4_gptq"]
    assert "no speed for: fp8_pc_pt, w8a8, int8_sq, int4_awq, int4_gptq" in w.ax.get_title()
    assert f"speed: {src}" in w.source_text.get_text().replace("\n", " ")

    # layer errors: exact zeros are counted, the log axis spans the real errors only
    lo, hi = w.ax_layers.get_ylim()
    assert lo == pytest.approx(2e-4 / 3) and hi == pytest.approx(8e-4 * 3)
    assert "(2 layers with zero error not drawn)" in w.ax_layers.get_title()
    png = w._repr_mimebundle_()["image/png"]
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"

    unnamed = QuantComparison(_quant_results(), speed=speed)
    unnamed.x.value = "tokens_per_s"
    assert "speed: source not given (pass speed_source=...)" in unnamed.source_text.get_text()
    with pytest.raises(ValueError, match=r"speed needs columns \['scheme', 'tokens_per_s'\]"):
        QuantComparison(_quant_results(), speed=pd.DataFrame({"scheme": ["float"], "tok_s": [1.0]}))


def test_every_widget_display_bundle_carries_a_png_of_its_figure(history):
    """The widget view for JupyterLab and a PNG of the current figure for readers without a kernel."""
    shown = [KVCacheMap(history), BatchingTimeline(_stats_rows()),
             LayerTimingView(profiles_json_frames(json.loads(PROFILES.read_text())), max_layers=10),
             QuantComparison(_quant_results())]
    for w in shown:
        bundle = w._repr_mimebundle_()
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == w.model_id
        png = base64.b64decode(bundle["image/png"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == figure_png(w.figure)


def test_kv_cache_colours_match_the_html_grid_of_the_inspector():
    """One legend for KVCacheMap and KVCacheInspector's HTML grid: free and cached colours are the same."""
    assert (FREE_COLOR, CACHED_COLOR) == (kv_html_colors["free"], kv_html_colors["cached"])
    assert not {FREE_COLOR, CACHED_COLOR} & set(REQUEST_PALETTE)
    assert len(set(REQUEST_PALETTE)) == len(REQUEST_PALETTE) == 15


def test_kv_cache_map_play_moves_slider_label_and_picture_together(history):
    """Play's ticks go through Python, which sets the slider, the label and the image in one step
    (a jslink would let the browser's slider run ahead of the label)."""
    w = KVCacheMap(history, ncols=3)
    for value in (2, 3, 1):
        w.play.value = value
        assert w.slider.value == value and w.step == value
        assert f"<b>step {value}</b>" in w.label.value and w.step_text.get_text().startswith(f"step {value}:")
        np.testing.assert_array_equal(w.image.get_array(), _expected_image(history[history.step == value],
                                                                            w.colors, 3))
    w.slider.value = 3  # dragged by hand: Play resumes from there
    assert w.play.value == 3


def test_kv_cache_map_is_wide_with_readable_block_numbers(history):
    w = KVCacheMap(history)
    assert w.figure.get_figwidth() >= 9.0  # ~900 px at 100 dpi, not ~480
    numbers = [t for t in w.ax.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in numbers] == ["0", "1", "2", "3", "4"] and min(t.get_fontsize() for t in numbers) >= 9
    gaps = pd.concat([history[history.step == 1].assign(step=1), history[history.step == 3].assign(step=4)])
    g = KVCacheMap(gaps)
    g.slider.value = 3  # no step 3 recorded: the label says which recorded step is drawn
    assert "step 3 (pool as recorded at step 1)" in g.label.value and g.step == 1

