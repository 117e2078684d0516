"""widgets.beam_tree: the tree of a hand-made beam history, and of a real finished beam request."""

import base64

import pytest

pytest.importorskip("ipywidgets")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from kit.builder import BuildConfig  # noqa: E402
from kit.llm import LLM  # noqa: E402
from kit.sampling_params import SamplingParams  # noqa: E402
from widgets.beam_tree import ALL, PRUNED, RANK_COLORS, BeamTree, tree_layout  # noqa: E402
from widgets.figure import figure_png  # noqa: E402


def _row(step, beam, parent, token, cum, kind="running", score=None, rank=-1):
    return {"step": step, "beam": beam, "parent": parent, "token": token, "text": f"t{token}",
            "cumulative_logprob": cum, "score": score, "kind": kind, "rank": rank}


@pytest.fixture
def history():
    """Width 2, three steps: beam 1 of step 1 is pruned at step 2; one hypothesis finishes at step 2 (rank 1),
    another at step 3 (rank 0)."""
    return pd.DataFrame([
        _row(1, 0, -1, 10, -0.5), _row(1, 1, -1, 11, -0.9),
        _row(2, -1, 0, 2, -1.0, "finished", -0.5, rank=1),
        _row(2, 0, 0, 12, -1.2), _row(2, 1, 0, 13, -1.4),
        _row(3, -1, 1, 2, -1.5, "finished", -0.4, rank=0),
        _row(3, 0, 0, 14, -1.8), _row(3, 1, 0, 15, -2.0),
    ])


def test_layout_and_paths_of_a_hand_made_history(history):
    pos, parents = tree_layout(history)
    assert pos[2] == (2.0, 2.0) and pos[5] == (3.0, 2.0)  # finished hypotheses below the two beam slots
    assert parents == [-1, -1, 0, 0, 0, 4, 3, 3]
    t = BeamTree(history)
    assert t.paths == {0: [0, 4, 5], 1: [0, 2]}
    assert t.tokens(0) == [10, 13, 2] and t.tokens(1) == [10, 2]
    assert len(t.edges.get_segments()) == len(history)
    colors = [to_hex(c) for c in t.edges.get_colors()]
    assert colors[5] == RANK_COLORS[0] and colors[2] == RANK_COLORS[1]
    assert colors[1] == PRUNED  # step-1 beam 1 has no descendant
    assert t.finished_nodes.get_offsets().shape == (2, 2)
    t.dropdown.value = 0
    assert list(t.selected_line.get_xdata()) == [0.0, 1.0, 2.0, 3.0]
    assert list(t.selected_line.get_ydata()) == [0.0, 0.0, 1.0, 2.0]
    assert "score -0.4000" in t.summary_html.value
    t.dropdown.value = ALL
    assert len(t.selected_line.get_xdata()) == 0
    bundle = t._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]) == figure_png(t.figure)


def test_refuses_a_frame_without_the_history_columns():
    with pytest.raises(ValueError, match="missing columns"):
        BeamTree(pd.DataFrame({"step": [1]}))


def test_tree_of_a_real_beam_request(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    bc = BuildConfig(max_batch_size=2, max_input_len=32, max_seq_len=64, max_num_tokens=16, block_size=4,
                     max_beam_width=4)
    with LLM(str(path), device="cpu", build_config=bc) as llm:
        out = llm.generate([5, 6, 7, 8, 9], SamplingParams(max_tokens=10, use_beam_search=True, n=3, best_of=4,
                                                           length_penalty=1.0, early_stopping=False))
    history = out.metrics["beam_history"]
    t = BeamTree(history)
    assert sorted(t.paths) == [0, 1, 2]
    for o in out.outputs:  # the tree's paths are exactly the returned outputs
        assert t.tokens(o.index) == o.token_ids
        assert float(t.frame["cumulative_logprob"][t.paths[o.index][-1]]) == pytest.approx(o.cumulative_logprob)
    frame = history.frame()
    assert (frame.loc[frame.kind == "running"].groupby("step").size() == 4).all()  # four beams every step
