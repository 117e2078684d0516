"""The acceptance widget (widgets/speculative.py) over hand-made verifications and a real run."""

import base64

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from kit.builder import BuildConfig  # noqa: E402
from kit.config import ModelConfig  # noqa: E402
from kit.llm import LLM  # noqa: E402
from kit.loader import LoadedModel, random_weights  # noqa: E402
from kit.sampling_params import SamplingParams  # noqa: E402
from kit.speculative import NGramDecodingConfig, VerifyRecord, acceptance_frame  # noqa: E402
from widgets.speculative import KIND_COLORS, AcceptanceView  # noqa: E402


def test_acceptance_view_colours_every_token_by_its_verdict():
    f = acceptance_frame([VerifyRecord("a", 1, 1, (7, 8, 9), 1, 5), VerifyRecord("a", 2, 3, (4, 4), 2, 6),
                          VerifyRecord("b", 2, 1, (1,), 0, 2)])
    v = AcceptanceView(f)
    assert v.requests == ["a", "b"]
    assert v.summary("a") == {"drafted": 5, "accepted": 3, "acceptance_rate": 0.6, "steps": 2,
                              "tokens_per_forward": 2.5}
    # per step: the drafts in order, then the target's token
    assert [t.get_text() for t in v.token_texts] == ["7", "8", "9", "5", "4", "4", "6"]
    kinds = ["accepted", "rejected", "rejected", "target", "accepted", "accepted", "target"]
    for t, k in zip(v.token_texts, kinds):
        assert t.get_bbox_patch().get_facecolor()[:3] == pytest.approx(to_rgba(KIND_COLORS[k])[:3])
    assert [b.get_height() for b in v.drafted_bars] == [3, 2] and [b.get_height() for b in v.accepted_bars] == [1, 2]
    assert "60%" in v.ax_tokens.get_title() and "line-through" in v.token_html.value
    v.dropdown.value = "b"
    assert [t.get_text() for t in v.token_texts] == ["1", "2"] and "0 of 1" in v.ax_tokens.get_title()
    png = base64.b64decode(v._repr_mimebundle_()["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="not in this frame"):
        v.rows("zzz")
    with pytest.raises(ValueError, match="acceptance_frame"):
        AcceptanceView(f.iloc[:0])


def test_acceptance_view_over_a_real_run():
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = LoadedModel(cfg, random_weights(cfg, seed=0), name="tiny", source_format="synthetic")
    with LLM(model, device="cpu", build_config=BuildConfig(max_batch_size=4, max_input_len=32, max_seq_len=64,
                                                           max_num_tokens=64, block_size=4),
             speculative_config=NGramDecodingConfig(max_draft_len=3)) as llm:
        outs = llm.generate([[5, 6, 7, 8] * 4, [9, 10, 11] * 4], SamplingParams(max_tokens=16, temperature=0.0,
                                                                                  ignore_eos=True), use_tqdm=False)
        frame = llm.executor.speculator.acceptance_frame()
    v = AcceptanceView(frame)
    for o in outs:
        s, st = v.summary(o.request_id), o.spec_stats
        assert (s["drafted"], s["accepted"]) == (st.num_draft_tokens, st.num_accepted_draft_tokens)
