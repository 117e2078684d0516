"""Tests for kit/sampling_params.py: validation, normalisation, TensorRT-LLM's defaults."""

from __future__ import annotations

import math

import pytest

from kit.guided_decoding import GuidedDecodingParams
from kit.sampling_params import SamplingParams


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_tokens", {"max_tokens": 0}),
        ("min_tokens", {"min_tokens": -1}),
        ("min_tokens", {"max_tokens": 4, "min_tokens": 5}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.inf}),
        ("top_k", {"top_k": -2}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.01}),
        ("min_p", {"min_p": -0.1}),
        ("min_p", {"min_p": 1.5}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
        ("presence_penalty", {"presence_penalty": 2.5}),
        ("frequency_penalty", {"frequency_penalty": -2.5}),
        ("stop", {"stop": ""}),
        ("stop", {"stop": ["ok", ""]}),
        ("stop_token_ids", {"stop_token_ids": [1, -1]}),
        ("ignore_eos", {"ignore_eos": 1}),
        ("seed", {"seed": 1.5}),
        ("n", {"n": 0}),
        ("logprobs", {"logprobs": 21}),
        ("logprobs", {"logprobs": -1}),
        ("prompt_logprobs", {"prompt_logprobs": 21}),
        ("include_stop_str_in_output", {"include_stop_str_in_output": None}),
    ],
)
def test_params_validation_names_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


def test_params_normalise_and_boundaries():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[7, 8]).stop_token_ids == (7, 8)
    # the edges of every range are allowed
    SamplingParams(top_k=-1, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2,
                   logprobs=0, prompt_logprobs=20, min_tokens=16, max_tokens=16, temperature=0)
    hash(SamplingParams(stop=["x"]))  # frozen with tuples: hashable


def test_is_greedy_to_dict_and_html():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=-1).is_greedy
    p = SamplingParams(temperature=0.5, stop="END")
    assert p.to_dict()["stop"] == ("END",) and len(p.to_dict()) == 33  # 28 + 5 beam-search fields
    html = p._repr_html_()
    assert "temperature" in html and "stop" in html and "top_p" not in html


def test_tensorrt_llm_defaults():
    sp = SamplingParams()
    assert sp.max_tokens == 32 and sp.is_greedy and (sp.temperature, sp.top_k, sp.top_p) == (0.0, 0, 1.0)
    assert not SamplingParams(temperature=0.7).is_greedy and SamplingParams(top_k=1).is_greedy
    assert SamplingParams(top_k=5).temperature == 1.0
    assert SamplingParams(logprobs=True).logprobs == 1 and SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(end_id=7).pad_id == 7 and SamplingParams(end_id=7, pad_id=0).pad_id == 0
    assert SamplingParams(min_tokens=None).min_tokens == 0


def test_new_fields_are_checked():
    with pytest.raises(ValueError, match="SamplingParams.n must be 1 under greedy decoding"):
        SamplingParams(n=2)
    with pytest.raises(ValueError, match=r"SamplingParams\.logits_processor must be"):
        SamplingParams(logits_processor=3)
    with pytest.raises(ValueError, match=r"SamplingParams\.guided_decoding must be"):
        SamplingParams(guided_decoding={"json": {}})
    with pytest.raises(ValueError, match=r"SamplingParams\.stop must be empty when detokenize=False"):
        SamplingParams(stop=".", detokenize=False)
    with pytest.raises(ValueError, match=r"SamplingParams\.end_id must be"):
        SamplingParams(end_id=-2)
    with pytest.raises(ValueError, match=r"SamplingParams\.end_id must be None or a token id in \[0, 10\)"):
        SamplingParams(end_id=12).check_vocab(10)
    sp = SamplingParams(logits_processor=lambda *a: None, guided_decoding=GuidedDecodingParams(json={"type": "object"}))
    assert len(sp.logits_processor) == 1
    hash(sp)  # processors and guides stay out of the hash
