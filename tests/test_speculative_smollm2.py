"""Speculative decoding on SmolLM2: greedy output is token-identical to plain decoding.

Prompts (half share a system prefix, so prefix caching serves blocks; a few are code to
edit, where n-gram drafts hit), under in-flight batching with requests that do not speculate
(repetition penalty) in the same steps, with stop strings and lengths that cut inside a
step's accepted drafts. Drafters: SmolLM2 quantized to int4 (weight-only, through the build
cache) drafting for SmolLM2 in float, and n-gram prompt lookup."""

import pytest

from kit.builder import BuildConfig
from kit.llm import LLM
from kit.sampling_params import SamplingParams
from kit.speculative import DraftTargetDecodingConfig, NGramDecodingConfig

BC = BuildConfig(max_batch_size=12, max_input_len=160, max_seq_len=192, max_num_tokens=512)
SYSTEM = "You are a careful assistant. Answer in one short paragraph, plainly and without lists.\n\n"
TOPICS = ["The capital of France is", "Water boils at", "The largest planet in the solar system is",
          "A good breakfast includes", "The first step in baking bread is", "Photosynthesis is",
          "The sum of 12 and 30 is", "In chess, the knight moves", "The speed of light is",
          "My favourite season is autumn because", "To learn a language quickly,", "The Eiffel Tower was built",
          "A haiku is a poem that", "Rain forms when", "The heart pumps blood", "Python lists are"]
CODE = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "Rewrite both functions with type hints:\n\ndef add(a: int, b: int) -> int:\n")


def _workload(n: int):
    prompts, params = [], []
    for i in range(n):
        if i % 8 == 7:
            prompts.append(CODE)
        else:
            topic = TOPICS[i % len(TOPICS)]
            prompts.append(SYSTEM + topic if i % 2 else topic)
        if i % 4 == 3:  # does not speculate: decoded plainly in the same steps
            params.append(SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.1))
        elif i % 4 == 2:
            params.append(SamplingParams(max_tokens=24, temperature=0.0, stop=[".", "\n"]))
        else:
            params.append(SamplingParams(max_tokens=6 + i % 11, temperature=0.0))
    return prompts, params


@pytest.fixture(scope="module")
def plain():
    """Plain decoding of the first n prompts of the workload, made once per n."""
    made = {}

    def get(n):
        if n not in made:
            prompts, params = _workload(n)
            with LLM("smollm2-135m", device="cpu", build_config=BC, enable_prefix_caching=True) as llm:
                made[n] = llm.generate(prompts, params, use_tqdm=False)
        return made[n]

    return get


# NOTE: 16 prompts already hold every kind of request (system prefix served from the prefix cache once the
# first 12 run, code, penalty, stop strings); the 32-prompt run (~40 s on 2 cores) is `make test-slow`'s
@pytest.mark.parametrize("n", [16, pytest.param(32, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["draft-int4", "ngram"])
def test_speculative_greedy_is_token_identical_to_plain_decoding(plain, kind, n):
    prompts, params = _workload(n)
    expected = plain(n)
    cfg = (NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=3) if kind == "ngram" else
           DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir="smollm2-135m",
                                     speculative_model_quantization="int4_wo"))
    with LLM("smollm2-135m", device="cpu", build_config=BC, enable_prefix_caching=True,
             speculative_config=cfg) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.executor.stats()
        hit_rate = llm.kv_cache_inspector.stats()["hit_rate"]
        assert llm.kv_cache_manager.num_used_blocks == 0
        llm.kv_cache_manager.check_invariants()
    for o, ref in zip(outs, expected):
        assert o.outputs[0].token_ids == ref.outputs[0].token_ids
        assert (o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason) == \
            (ref.outputs[0].text, ref.outputs[0].finish_reason, ref.outputs[0].stop_reason)
    assert hit_rate > 0  # the shared system prefix came from the prefix cache
    assert {o.outputs[0].finish_reason for o in outs} == {"stop", "length"}
    total = sum((o.spec_stats for o in outs[1:]), outs[0].spec_stats)
    assert total.num_accepted_draft_tokens > 0 and total.num_draft_tokens > total.num_accepted_draft_tokens
    assert all(o.spec_stats.num_draft_tokens == 0 for o, sp in zip(outs, params) if sp.repetition_penalty != 1.0)
    # speculating and plain requests shared target forwards
    assert any(len(ids) > 1 and d > 0 for ids, d in zip(stats["request_ids"], stats["num_draft_tokens"]))
