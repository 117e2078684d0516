"""Beam search: token-identical to Hugging Face `generate(num_beams=4, do_sample=False)`, mixed with
greedy requests under in-flight batching and chunked prefill, copy-on-write block forking, and
clear refusals of what it cannot combine with."""

import time

import pytest
import torch

from kit.batch import KVCache
from kit.beam_search import BeamState, beam_extra_blocks, check_beam_request
from kit.builder import BuildConfig
from kit.config import ModelConfig
from kit.executor import KvCacheConfig
from kit.kv_cache import KVCacheManager
from kit.kv_fork import copy_blocks, fork_tables
from kit.llm import LLM
from kit.request import GenerationRequest, Request
from kit.sampling_params import SamplingParams
from kit.scheduler_output import SchedulerPolicy

EOS = 2
PROMPTS = ([5, 17, 33, 99, 120, 7, 8, 9, 10, 44, 61], [71, 3, 150, 12, 200, 31])
# (length_penalty, early_stopping, n): with and without a length penalty, every early-stopping mode
CASES = [(1.0, False, 4), (0.0, True, 2), (2.0, "never", 3), (-0.5, False, 1)]
# 8 tokens a step for max_batch_size 4: the 11-token prompt is prefilled in two chunks
BC = dict(max_batch_size=4, max_input_len=48, max_seq_len=96, max_num_tokens=8, block_size=4, max_beam_width=4)


def hf_beams(hf, prompt, end_ids, lp, es, n, max_new_tokens=24):
    """Hugging Face's beam search: generated tokens (through the first end token) and scores of n beams."""
    g = hf.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=n, length_penalty=lp, early_stopping=es,
                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(end_ids), pad_token_id=end_ids[0],
                    return_dict_in_generate=True, output_scores=True, attention_mask=torch.ones(1, len(prompt),
                                                                                                dtype=torch.long))
    outs = []
    for row in g.sequences.tolist():
        gen = row[len(prompt):]
        cut = next((i for i, t in enumerate(gen) if t in end_ids), None)
        outs.append(gen if cut is None else gen[:cut + 1])
    return outs, g.sequences_scores.tolist()


def end_token_for(hf, prompt):
    """A token that the beams meet a few tokens in: as an extra end token, it makes hypotheses finish early,
    so that length penalty and early stopping decide the outputs."""
    best = hf_beams(hf, prompt, (EOS,), 1.0, False, 1)[0][0]
    return best[3]


def check_against_hf(llm, hf, prompt, lp, es, n, stop):
    sp = SamplingParams(max_tokens=24, temperature=0.0, use_beam_search=True, n=n, best_of=4, length_penalty=lp,
                        early_stopping=es, stop_token_ids=[stop])
    out = llm.generate(prompt, sp)
    ref, scores = hf_beams(hf, prompt, (stop, EOS), lp, es, n)
    ended = [bool(r) and r[-1] in (stop, EOS) for r in ref]
    # the kit's outputs stop before the end token (TensorRT-LLM's rule); HF's include it
    assert [o.token_ids for o in out.outputs] == [r[:-1] if e else r for r, e in zip(ref, ended)]
    for o, score, e in zip(out.outputs, scores, ended):  # HF's score is the length-penalised cumulative logprob
        assert o.cumulative_logprob / (len(o.token_ids) + e) ** lp == pytest.approx(score, rel=1e-4, abs=1e-4)
        assert o.finish_reason == ("stop" if e else "length")
    assert [o.index for o in out.outputs] == list(range(n))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_token_identical_to_hf_on_tiny_checkpoints(family, tiny_checkpoints):
    path, hf = tiny_checkpoints[family]
    with LLM(str(path), device="cpu", build_config=BuildConfig(**BC)) as llm:
        for prompt in PROMPTS:
            stop = end_token_for(hf, prompt)
            finished_early = False
            for lp, es, n in CASES:
                out = check_against_hf(llm, hf, prompt, lp, es, n, stop)
                finished_early |= any(len(o.token_ids) < 24 for o in out.outputs)
            assert finished_early, "the extra end token was meant to end some hypotheses early"
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0


@pytest.fixture(scope="module")
def smollm2_pair(smollm2):
    """The embedded SmolLM2 as a Hugging Face model (fp32) and as a kit LLM with beam width 4."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in smollm2.config.to_hf_config().items() if k != "architectures"}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), attn_implementation="eager").eval()
    hf.load_state_dict(smollm2.weights, strict=False)  # lm_head is tied to the embedding
    hf.tie_weights()
    bc = BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128, max_num_tokens=16, block_size=16,
                     max_beam_width=4)
    with LLM(smollm2, device="cpu", build_config=bc) as llm:
        yield hf, llm


@pytest.mark.parametrize("text,lp,es,n", [
    ("The capital of France is", 1.0, False, 4),
    pytest.param("The capital of France is", 0.0, True, 2, marks=pytest.mark.slow),
    pytest.param("def fibonacci(n):", 1.0, False, 4, marks=pytest.mark.slow),
    pytest.param("def fibonacci(n):", 2.0, "never", 3, marks=pytest.mark.slow),
])
def test_token_identical_to_hf_on_smollm2(smollm2_pair, text, lp, es, n):
    hf, llm = smollm2_pair
    tok = llm.tokenizer
    stop = tok.encode(".")[-1]  # an extra end token, so that hypotheses finish before 24 tokens
    out = check_against_hf(llm, hf, tok.encode(text), lp, es, n, stop)
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
    assert llm.kv_cache_manager.num_used_blocks == 0


@pytest.mark.parametrize("prefix", [False, True])
def test_beam_requests_mixed_with_greedy_requests_equal_alone(tiny_checkpoints, prefix):
    path, _ = tiny_checkpoints["llama"]
    greedy = [[9, 8, 7, 6, 5, 4, 3], PROMPTS[0][:7] + [101, 102], [44] * 13]
    beam_sp = [SamplingParams(max_tokens=24, temperature=0.0, use_beam_search=True, n=2, best_of=4, length_penalty=1.0,
                              early_stopping=False, stop_token_ids=[57]),
               SamplingParams(max_tokens=20, use_beam_search=True, best_of=3, length_penalty=0.0)]
    greedy_sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    bc = BuildConfig(**{**BC, "max_batch_size": 1, "max_num_tokens": 64})
    with LLM(str(path), device="cpu", build_config=bc) as llm:
        alone_beams = [llm.generate(p, sp) for p, sp in zip(PROMPTS, beam_sp)]
        alone_greedy = [llm.generate(p, greedy_sp).outputs[0].token_ids for p in greedy]
    prompts = [greedy[0], PROMPTS[0], greedy[1], PROMPTS[1], greedy[2]]
    params = [greedy_sp, beam_sp[0], greedy_sp, beam_sp[1], greedy_sp]
    with LLM(str(path), device="cpu", build_config=BuildConfig(**{**BC, "max_num_tokens": 16}),
             enable_prefix_caching=prefix, kv_cache_config=KvCacheConfig(num_blocks=64)) as llm:
        outs = llm.generate(prompts, params)
        stats = llm.executor.stats()
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0  # every beam's blocks came back
    for o, a in zip((outs[1], outs[3]), alone_beams):
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in a.outputs]
        assert [c.cumulative_logprob for c in o.outputs] == pytest.approx([c.cumulative_logprob for c in a.outputs])
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 4)] == alone_greedy
    together = [ids for ids in stats["request_ids"] if outs[1].request_id in ids and len(ids) > 1]
    assert together, "a beam request was meant to share iterations with other requests"
    assert (stats["num_prefill_tokens"] + stats["num_decode_tokens"]).max() <= 16  # every beam's token counted
    assert len(outs[3].outputs) == 1 and outs[1].metrics["beam_history"].beam_width == 4


def test_abort_of_a_beam_request_returns_every_block(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    with LLM(str(path), device="cpu", build_config=BuildConfig(**BC)) as llm:
        sp = SamplingParams(max_tokens=60, use_beam_search=True, best_of=4, ignore_eos=True)
        result = llm.generate_async(PROMPTS[0], sp)
        deadline = time.monotonic() + 60
        while len(llm.executor.stats()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.kv_cache_manager.num_used_blocks > 3  # the four beams hold blocks of their own
        llm.abort(result.request_id)
        assert result.result(timeout=60).outputs[0].finish_reason == "cancelled"
        deadline = time.monotonic() + 10
        while llm.executor.beam_search.groups and time.monotonic() < deadline:
            time.sleep(0.01)
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0


# ------------------------------------------------------------------ copy-on-write forking
def test_fork_tables_shares_full_blocks_and_copies_the_partial_block():
    cfg = ModelConfig(family="llama", vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=4)
    kv = KVCache(cfg, num_blocks=12, block_size=4)
    kv.k.copy_(torch.arange(kv.k.numel(), dtype=kv.k.dtype).view_as(kv.k))
    kv.v.copy_(-kv.k)
    m = KVCacheManager(12, 4)
    a, b = Request("a", list(range(10)), 8), Request("b", list(range(10)), 8)
    m.allocate_slots(a, 10)  # blocks 0, 1, 2 (2 holds tokens 8..9)
    a.num_computed_tokens = 10
    m.fork(a, b)  # b shares 0, 1
    m.allocate_slots(b, 2)  # b's tail: block 3
    before = kv.k.clone()
    copies = fork_tables(m, kv, ["a", "b"], ["a", "b", "c"], [0, 0, 1], num_tokens=10)
    assert copies == 1
    assert m.block_table("a") == [0, 1, 2]  # first child of a takes its table
    assert m.block_table("c") == [0, 1, 3]  # b's only child takes b's table
    new = m.block_table("b")  # second child of a: shared full blocks, a copy of block 2
    assert new[:2] == [0, 1] and new[2] not in (0, 1, 2, 3)
    assert [m.ref_count(x) for x in (0, 1, 2, 3, new[2])] == [3, 3, 1, 1, 1]
    assert torch.equal(kv.k[:, new[2]], before[:, 2]) and torch.equal(kv.v[:, new[2]], -before[:, 2])
    m.check_invariants()
    fork_tables(m, kv, ["a", "b", "c"], ["a"], [2], num_tokens=10)  # one beam left: c's blocks, renamed a
    assert m.block_table("a") == [0, 1, 3] and m.num_used_blocks == 3
    m.check_invariants()
    m.free("a")
    assert m.num_used_blocks == 0


def test_fork_tables_refuses_without_blocks_for_the_copies_and_changes_nothing():
    m = KVCacheManager(3, 4)
    a = Request("a", list(range(6)), 4)
    m.allocate_slots(a, 6)  # 2 blocks, the second partial
    m.allocate_slots(Request("x", [1], 4), 1)  # the last free block
    with pytest.raises(RuntimeError, match="1 partial blocks to copy but 0 free"):
        fork_tables(m, None, ["a"], ["a", "b"], [0, 0], num_tokens=6)
    assert m.block_table("a") == [0, 1] and not m.has_request("b")
    m.check_invariants()
    with pytest.raises(ValueError, match="both a source and a destination"):
        copy_blocks(KVCache(ModelConfig(family="llama", vocab_size=5, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                                        num_attention_heads=1, num_key_value_heads=1, head_dim=4), 3, 4), [1], [1])


def test_beam_budget_covers_every_beam():
    req = Request("r", list(range(10)), 24, beam_width=4)
    # 33 tokens at most in cache; the prompt's 2 full blocks (8 tokens) are shared; each other beam holds
    # ceil(25 / 4) = 7 blocks of its own and one partial-block copy while re-mapping
    assert beam_extra_blocks(req, 4, 33) == 3 * (7 + 1)
    assert beam_extra_blocks(Request("g", [1, 2], 4), 4, 5) == 0


# ------------------------------------------------------------------ the search itself
def test_early_stopping_true_ends_once_beam_width_hypotheses_finished():
    def run(es):
        s = BeamState(SamplingParams(max_tokens=10, use_beam_search=True, n=2, best_of=2, early_stopping=es,
                                     length_penalty=1.0), end_ids=[0])
        steps = 0
        while not s.done:
            rows = torch.tensor([[0.0, 3.0, 2.9, 1.0, 0.5]]).repeat(len(s.tokens), 1)
            rows[:, 0] = 3.5 if steps >= 1 else -9.0  # the end token becomes the likeliest from the second step
            s.step(rows)
            steps += 1
        return s, steps

    s, steps = run(True)
    assert steps == 2 and len(s.finished) == 2 and all(h.tokens[-1] == 0 for h in s.outputs())
    assert [h.score for h in s.outputs()] == sorted((h.score for h in s.outputs()), reverse=True)
    never, steps_never = run("never")
    assert steps_never > steps
    hist = s.history.frame()
    assert (hist["rank"] >= 0).sum() == 2 and set(hist["kind"]) == {"running", "finished"}
    for rank in range(2):  # every returned hypothesis traces back to the prompt through its parents
        chain = s.history.path(rank)
        assert [s.history.rows[i]["token"] for i in chain] == s.outputs()[rank].tokens
        assert s.history.rows[chain[0]]["parent"] == -1
    assert "BeamState" in s._repr_html_() and "done" in s._repr_html_() and "BeamHistory" in s.history._repr_html_()


# ------------------------------------------------------------------ refusals
def test_sampling_params_beam_fields_are_validated():
    with pytest.raises(ValueError, match=r"best_of must be None or an int >= n=3"):
        SamplingParams(n=3, best_of=2, use_beam_search=True)
    with pytest.raises(ValueError, match="best_of .* use_beam_search=True"):
        SamplingParams(n=1, best_of=4)
    with pytest.raises(ValueError, match="early_stopping must be None, True/1, False/0 or 'never', got 'sometimes'"):
        SamplingParams(use_beam_search=True, early_stopping="sometimes")
    with pytest.raises(ValueError, match="beam_search_diversity_rate"):
        SamplingParams(use_beam_search=True, beam_search_diversity_rate=0.5)
    with pytest.raises(ValueError, match="length_penalty"):
        SamplingParams(use_beam_search=True, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="use_beam_search must be a bool"):
        SamplingParams(use_beam_search="yes")
    sp = SamplingParams(n=2, best_of=4, use_beam_search=True, early_stopping=1)
    assert sp.beam_width == 4 and sp.early_stopping is True and SamplingParams(n=3, temperature=1.0).beam_width == 1


@pytest.mark.parametrize("changes,match", [
    (dict(best_of=8), r"beam width 8 \(SamplingParams.best_of=8, n=1\) exceeds this engine's BuildConfig.max_beam_width=4"),
    (dict(temperature=0.7), r"temperature=0.7 with use_beam_search=True: .*TensorRT-LLM applies temperature"),
    (dict(top_p=0.9), r"top_p=0.9 cannot be combined with use_beam_search=True"),
    (dict(logprobs=2), r"logprobs=2 cannot be combined"),
    (dict(stop=["x"]), r"stop=\('x',\) cannot be combined"),
])
def test_beam_requests_it_cannot_serve_are_refused_by_name(tiny_checkpoints, changes, match):
    path, _ = tiny_checkpoints["llama"]
    with LLM(str(path), device="cpu", build_config=BuildConfig(**BC)) as llm:
        with pytest.raises(ValueError, match=match):
            llm.generate(PROMPTS[0], SamplingParams(**{"max_tokens": 4, "use_beam_search": True, "best_of": 4, **changes}))


def test_streaming_and_preempting_policies_are_refused_for_beams():
    req = GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4, use_beam_search=True, best_of=2), streaming=True)
    with pytest.raises(ValueError, match="streaming=True cannot be combined with use_beam_search"):
        check_beam_request(req, 4, SchedulerPolicy.GUARANTEED_NO_EVICT)
    req.streaming = False
    with pytest.raises(ValueError, match="guaranteed_no_evict scheduler policy \\(got max_utilization\\)"):
        check_beam_request(req, 4, SchedulerPolicy.MAX_UTILIZATION)
    check_beam_request(GenerationRequest([1], SamplingParams(max_tokens=4, temperature=0.5)), 1,
                       SchedulerPolicy.MAX_UTILIZATION)  # not a beam request: nothing to check
