"""Speculative decoding (kit/speculative/): configs, drafters, the verification rules, the hooks in the
scheduler and the KV-cache manager, and the statistics; end to end on a tiny random model.

The SmolLM2 token-identity tests are in tests/test_speculative_smollm2.py; the chi-square test of the
rejection rule is in tests/test_speculative_sampling.py."""

import random

import pytest
import torch

from kit.builder import BuildConfig
from kit.config import ModelConfig
from kit.kv_cache import KVCacheManager
from kit.llm import LLM
from kit.loader import LoadedModel, random_weights
from kit.request import Request
from kit.sampling_params import SamplingParams
from kit.scheduler import Scheduler, SchedulerConfig
from kit.speculative import (DraftTargetDecodingConfig, NGramDecodingConfig, NGramDrafter, SpeculativeStats,
                             VerifyRecord, acceptance_frame, residual_distribution, verify_greedy, verify_rejection)

TINY = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
BC = dict(max_batch_size=8, max_input_len=48, max_seq_len=96, max_num_tokens=64, block_size=4)


@pytest.fixture(scope="module")
def tiny():
    return LoadedModel(TINY, random_weights(TINY, seed=0), name="tiny", source_format="synthetic")


def _draft(noise: float) -> LoadedModel:
    """The tiny target's weights plus Normal(0, noise) on every matrix: a draft that mostly agrees."""
    g = torch.Generator().manual_seed(1)
    w = {k: v + noise * torch.randn(v.shape, generator=g) if v.dim() == 2 else v
         for k, v in random_weights(TINY, seed=0).items()}
    return LoadedModel(TINY, w, name="tiny-draft", source_format="synthetic")


def _repetitive_prompts(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = [rng.randrange(3, TINY.vocab_size) for _ in range(rng.randrange(3, 7))]
        out.append(base * 3 + [rng.randrange(3, TINY.vocab_size) for _ in range(rng.randrange(1, 4))])
    return out


# ------------------------------------------------------------------ configs
def test_configs_keep_tensorrt_llm_names_and_refuse_bad_values():
    c = NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=4, is_keep_all=False, is_use_oldest=False,
                            is_public_pool=False)
    assert (c.max_draft_len, c.max_matching_ngram_size, c.decoding_type) == (3, 4, "NGram")
    d = DraftTargetDecodingConfig(max_draft_len=5, speculative_model_dir="smollm2-135m")
    assert d.decoding_type == "DraftTarget" and d.speculative_model_dir == "smollm2-135m"
    with pytest.raises(ValueError, match="max_draft_len must be an integer >= 1, got 0"):
        NGramDecodingConfig(max_draft_len=0)
    with pytest.raises(ValueError, match="max_matching_ngram_size"):
        NGramDecodingConfig(max_matching_ngram_size=0)
    with pytest.raises(ValueError, match="is_keep_all must be a bool"):
        NGramDecodingConfig(is_keep_all=1)
    with pytest.raises(ValueError, match="speculative_model_dir is required"):
        DraftTargetDecodingConfig(max_draft_len=2)
    with pytest.raises(ValueError, match="speculative_model_dir must be a name"):
        DraftTargetDecodingConfig(speculative_model_dir=3.5)
    with pytest.raises(ValueError, match="max_concurrency"):
        NGramDecodingConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="must be <= 32"):
        NGramDecodingConfig(max_draft_len=33)


# ------------------------------------------------------------------ verification rules
def test_verify_greedy_accepts_the_matching_prefix_then_emits_the_target_token():
    target = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [1, 2, 3, 4], [4, 4, 4, 4]])  # (B, K+1) argmaxes
    draft = torch.tensor([[5, 6, 7], [5, 6, 7], [9, 2, 3], [4, 4, 0]])
    num = torch.tensor([3, 3, 3, 2])
    a, nxt = verify_greedy(target, draft, num)
    assert a.tolist() == [3, 1, 0, 2] and nxt.tolist() == [8, 9, 1, 4]
    with pytest.raises(ValueError, match="K \\+ 1"):
        verify_greedy(target[:, :3], draft, num)
    with pytest.raises(ValueError, match="num_draft must be in"):
        verify_greedy(target, draft, torch.tensor([4, 0, 0, 0]))


def test_verify_rejection_certain_cases():
    V = 4
    p = torch.tensor([[0.0, 1.0, 0.0, 0.0]]).repeat(1, 3, 1)  # (1, 3, V): the target always says 1
    noise = torch.ones(1, V)
    u = torch.full((1, 2), 0.999)
    # drafts equal to the target's certain token: always accepted, then the bonus from p (token 1)
    a, nxt = verify_rejection(p, None, torch.tensor([[1, 1]]), torch.tensor([2]), u, noise)
    assert a.tolist() == [2] and nxt.tolist() == [1]
    # a draft the target gives probability 0 is always rejected; the residual is p without it
    a, nxt = verify_rejection(p, None, torch.tensor([[3, 1]]), torch.tensor([2]), torch.zeros(1, 2), noise)
    assert a.tolist() == [0] and nxt.tolist() == [1]
    # p == q: every draft is accepted whatever u (u < 1 = p/q)
    pq = torch.softmax(torch.randn(1, 3, V, generator=torch.Generator().manual_seed(0)), -1)
    a, _ = verify_rejection(pq, pq[:, :2], torch.tensor([[2, 0]]), torch.tensor([2]), u, noise)
    assert a.tolist() == [2]
    # residual: norm(max(0, p - q))
    r = residual_distribution(torch.tensor([[0.5, 0.3, 0.2, 0.0]]), torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    torch.testing.assert_close(r, torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0]]))
    same = torch.tensor([[0.25] * 4])
    torch.testing.assert_close(residual_distribution(same, same), same)  # p == q: p itself


# ------------------------------------------------------------------ n-gram drafter
def test_ngram_drafts_copy_what_followed_the_longest_matching_ngram():
    d = NGramDrafter(NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2))
    #            0  1  2  3  4  5  6  7
    tokens = [1, 2, 3, 4, 9, 2, 3]
    assert d.draft("a", tokens, 3) == [4, 9, 2]  # (2, 3) occurred at 1..2, followed by 4 9 2
    assert d.draft("a", tokens + [7], 3) == []  # nothing ever followed 7 (nor (3, 7))
    assert d.draft("a", tokens + [7, 1], 2) == [2, 3]  # (7, 1) no; 1 -> 2 3
    # the public pool: another request drafts from what "a" wrote
    assert d.draft("b", [5, 9], 3) == [2, 3, 7]
    newest = NGramDrafter(NGramDecodingConfig(max_draft_len=2, max_matching_ngram_size=1, is_use_oldest=False))
    assert newest.draft("a", [1, 5, 1, 6, 1], 2) == [6, 1]
    oldest = NGramDrafter(NGramDecodingConfig(max_draft_len=2, max_matching_ngram_size=1))
    assert oldest.draft("a", [1, 5, 1, 6, 1], 2) == [5, 1]
    private = NGramDrafter(NGramDecodingConfig(max_draft_len=2, is_public_pool=False))
    private.draft("a", [1, 2, 3], 2)
    assert private.draft("b", [7, 1], 2) == []
    private.release(["a"])
    assert private.request_ids == ["b"]


def test_ngram_extends_continuations_cut_by_the_end_of_the_sequence():
    d = NGramDrafter(NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=1))
    assert d.draft("a", [8, 1, 2], 4) == []
    # the continuation of 8 was (1, 2) when indexed; later tokens extend it to 4 tokens
    assert d.draft("a", [8, 1, 2, 3, 4, 5, 8], 4) == [1, 2, 3, 4]


# ------------------------------------------------------------------ KV rollback and the scheduler
def test_rollback_releases_blocks_past_the_accepted_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    r = Request("r", list(range(10, 16)), max_tokens=8)  # 6 tokens
    assert kv.allocate_slots(r, 6) is not None
    r.num_computed_tokens = 5
    kv.allocate_slots(r, 1 + 4)  # the newest token + 4 drafts: 10 slots, 3 blocks
    assert len(kv.block_table("r")) == 3 and kv.num_free_blocks == 5
    assert kv.rollback(r, 7) == 1  # 2 accepted: 7 computed tokens need 2 blocks
    assert len(kv.block_table("r")) == 2 and kv.num_free_blocks == 6
    assert kv.rollback(r, 7) == 0 and kv.rollback("unknown", 0) == 0
    kv.check_invariants()
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        kv.rollback(r, -1)


def test_scheduler_schedules_one_plus_k_within_the_budgets():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_tokens=8), kv)
    a, b = Request("a", [1, 2, 3], max_tokens=4), Request("b", [4, 5, 6, 7], max_tokens=10)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.update(out, {"a": 9, "b": 8})
    s.set_draft_tokens("a", [11, 12, 13, 14])  # a may still emit 3 tokens: at most 2 drafts
    s.set_draft_tokens("b", [21, 22, 23, 24, 25, 26, 27])  # the token budget leaves it 8 - 3 - 1 = 4
    out = s.schedule()
    seqs = {q.request_id: q for q in out.scheduled}
    assert seqs["a"].token_ids == (9, 11, 12) and seqs["a"].num_draft_tokens == 2 and seqs["a"].is_last_chunk
    assert seqs["b"].token_ids == (8, 21, 22, 23, 24) and seqs["b"].num_draft_tokens == 4
    assert out.num_decode_tokens == 8
    # a accepted one draft (11) and the target said 30; b accepted none and the target said 40
    s.update(out, {"a": [11, 30], "b": [40]})
    assert a.output_token_ids == [9, 11, 30] and a.num_computed_tokens == 5
    assert b.output_token_ids == [8, 40] and b.num_computed_tokens == 5
    assert len(kv.block_table("b")) == 2  # rolled back from 3 blocks (9 slots) to 5 tokens
    kv.check_invariants()
    out = s.schedule()  # drafts are for one step only
    assert all(q.num_draft_tokens == 0 for q in out.scheduled)
    with pytest.raises(ValueError, match="emits 1 to 1 tokens"):
        s.update(out, {"a": [1, 2], "b": 3})


# ------------------------------------------------------------------ end to end, tiny model
@pytest.mark.parametrize("kind", ["ngram", "draft", "other-draft"])
def test_greedy_is_token_identical_with_stops_lengths_and_mixed_requests(tiny, kind):
    prompts = _repetitive_prompts(24)
    params = []
    for i in range(24):
        if i % 4 == 3:  # penalties: not speculated, decoded plainly in the same batches
            params.append(SamplingParams(max_tokens=18, temperature=0.0, repetition_penalty=1.2, ignore_eos=True))
        elif i % 4 == 2:  # stop token ids: cut where plain decoding cuts
            params.append(SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[prompts[i][1]],
                                         ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=5 + i, temperature=0.0, ignore_eos=True, logprobs=2))
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC)) as llm:
        ref = llm.generate(prompts, params, use_tqdm=False)
    # "draft": the target's own weights (every draft accepted); "other-draft": the target's weights plus noise
    cfg = (NGramDecodingConfig(max_draft_len=4) if kind == "ngram" else
           DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=_draft(0.01 if kind == "other-draft" else 0)))
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC), enable_prefix_caching=True,
             speculative_config=cfg) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.executor.stats()
        spec = llm.executor.speculator
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0
        if kind != "ngram":
            assert spec.drafter.kv_cache_manager.num_used_blocks == 0 and spec.drafter.request_ids == []
    for o, r, sp in zip(outs, ref, params):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert o.outputs[0].finish_reason == r.outputs[0].finish_reason
        if sp.logprobs is not None:
            for got, want in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
                assert got.keys() == want.keys()
                assert all(abs(got[t].logprob - want[t].logprob) < 1e-4 for t in got)
    st = [o.outputs[0].spec_stats for o in outs]
    assert all(s.num_draft_tokens == 0 for s, sp in zip(st, params) if sp.repetition_penalty != 1.0)
    total = sum(st[1:], st[0])
    assert total.num_draft_tokens == int(stats["num_draft_tokens"].sum()) == spec.num_draft_tokens > 0
    assert total.num_accepted_draft_tokens == int(stats["num_accepted_draft_tokens"].sum()) > 0
    assert total.num_generated_tokens == sum(len(o.outputs[0].token_ids) for o in outs)
    # a request emits at most 1 + drafted tokens per target forward
    for s in st:
        assert s.num_target_forwards <= s.num_generated_tokens <= s.num_target_forwards + s.num_accepted_draft_tokens
    # speculating and plain sequences shared target forwards
    assert any(len(ids) > 1 and d > 0 for ids, d in zip(stats["request_ids"], stats["num_draft_tokens"]))
    if kind == "other-draft":
        assert 0 < total.acceptance_rate < 1
    if kind == "draft":  # the draft is the target itself: every draft is accepted
        assert total.acceptance_rate == 1.0
        assert max(s.tokens_per_forward for s in st) > 3.0


def test_acceptance_frame_lays_out_every_verification(tiny):
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC),
             speculative_config=NGramDecodingConfig(max_draft_len=3)) as llm:
        out = llm.generate(_repetitive_prompts(1, seed=5)[0], SamplingParams(max_tokens=20, temperature=0.0,
                                                                             ignore_eos=True))
        df = llm.executor.speculator.acceptance_frame(out.request_id)
    s = out.spec_stats
    assert (df["kind"] == "accepted").sum() == s.num_accepted_draft_tokens
    assert (df["kind"] != "target").sum() == s.num_draft_tokens
    # the accepted drafts and the target's tokens, in position order, are the output after the first token
    kept = df[df["kind"] != "rejected"].sort_values("position")
    assert kept["token_id"].tolist() == out.outputs[0].token_ids[kept["position"].min():kept["position"].max() + 1]
    recs = [VerifyRecord("x", 1, 4, (7, 8, 9), 1, 5)]
    f = acceptance_frame(recs)
    assert f["kind"].tolist() == ["accepted", "rejected", "rejected", "target"]
    assert f["position"].tolist() == [4, 5, 6, 5] and f["token_id"].tolist() == [7, 8, 9, 5]


def test_spec_stats_arithmetic():
    a = SpeculativeStats(10, 7, 4, 11)
    assert a.acceptance_rate == 0.7 and a.tokens_per_forward == 11 / 4
    assert (a + SpeculativeStats(2, 1, 1, 2)).to_dict()["num_draft_tokens"] == 12
    assert SpeculativeStats().acceptance_rate == 0.0 and SpeculativeStats().tokens_per_forward == 0.0


def test_kv_blocks_all_returned_after_aborts_mid_speculation(tiny):
    prompts = _repetitive_prompts(12, seed=3)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    draft = _draft(0.0)
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC), enable_prefix_caching=True,
             speculative_config=DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir=draft)) as llm:
        ex = llm.executor
        results = [llm.generate_async(p, sp, streaming=True) for p in prompts]
        for r in results[::2]:  # abort half of them once they have verified drafts
            for snap in r:
                if snap.outputs[0].spec_stats.num_draft_tokens:
                    break
            llm.abort(r.request_id)
        outs = [r.result(timeout=120) for r in results]
        spec = ex.speculator
        assert spec.num_draft_tokens > 0
        for _ in range(100):  # the loop frees the last blocks once it has seen the aborts
            if ex.num_inflight == 0 and spec.drafter.request_ids == []:
                break
            results[0].wait(0.05)
        assert ex.kv_cache_manager.num_used_blocks == 0
        assert spec.drafter.kv_cache_manager.num_used_blocks == 0 and spec.drafter.request_ids == []
        ex.kv_cache_manager.check_invariants()
        spec.drafter.kv_cache_manager.check_invariants()
    reasons = [o.outputs[0].finish_reason for o in outs]
    assert reasons[1::2] == ["length"] * 6 and set(reasons[::2]) <= {"cancelled", "length"} and "cancelled" in reasons


def test_draft_with_another_vocabulary_is_refused(tiny):
    other = ModelConfig(**{**TINY.__dict__, "vocab_size": 50})
    draft = LoadedModel(other, random_weights(other, seed=1), name="other", source_format="synthetic")
    with pytest.raises(ValueError, match="share one vocabulary"):
        LLM(tiny, device="cpu", build_config=BuildConfig(**BC),
            speculative_config=DraftTargetDecodingConfig(speculative_model_dir=draft))
    with pytest.raises(TypeError, match="speculative_config must be"):
        LLM(tiny, device="cpu", build_config=BuildConfig(**BC), speculative_config={"max_draft_len": 2})


def test_preemption_under_max_utilization_keeps_speculative_greedy_identical(tiny):
    from kit.kv_cache_config import KvCacheConfig

    prompts = _repetitive_prompts(16, seed=9)
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC)) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC), scheduler_policy="max_utilization",
             kv_cache_config=KvCacheConfig(num_blocks=40),
             speculative_config=DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir=_draft(0.01))) as llm:
        outs = llm.generate(prompts, sp, use_tqdm=False)
        stats = llm.executor.stats()
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0
        assert llm.executor.speculator.drafter.kv_cache_manager.num_used_blocks == 0
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert stats["num_preemptions"].sum() > 0 and stats["num_accepted_draft_tokens"].sum() > 0


def test_max_concurrency_turns_speculation_off_in_larger_batches(tiny):
    prompts = _repetitive_prompts(6, seed=4)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for cap, drafted in ((2, False), (8, True)):
        with LLM(tiny, device="cpu", build_config=BuildConfig(**BC),
                 speculative_config=NGramDecodingConfig(max_draft_len=3, max_concurrency=cap)) as llm:
            llm.generate(prompts, sp, use_tqdm=False)  # all 6 run together: above a cap of 2
            assert (llm.executor.speculator.num_draft_tokens > 0) is drafted
