"""Tests for kit/sampling.py: penalties, warpers, seeds, logprobs, stops (SamplingParams: test_sampling_params.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kit.sampling import (
    Sampler,
    SamplingContext,
    find_stop,
    prompt_logprobs,
)
from kit.sampling_params import SamplingParams

EOS = 3


def ctx(params: SamplingParams | None = None, prompt=(), output=(), device="cpu") -> SamplingContext:
    params = params or SamplingParams(temperature=1.0)
    return SamplingContext(params, list(prompt), list(output), Sampler.make_generator(params, device))


def finite_ids(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


# ---------------------------------------------------------------- greedy


def test_greedy_is_argmax_any_dtype():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    greedy = SamplingParams(temperature=0)
    out = Sampler().sample(logits.bfloat16(), [ctx(greedy) for _ in range(5)])
    assert out.token_ids == logits.bfloat16().float().argmax(-1).tolist()
    out = Sampler().sample(logits, [ctx(greedy) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_ties_break_to_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    out = Sampler().sample(logits, [ctx(SamplingParams(temperature=0)), ctx(SamplingParams(top_k=1))])
    assert out.token_ids == [1, 0]


def test_greedy_batch_does_not_copy_logits():
    # the hot path: no penalties -> apply_penalties hands back the same tensor
    logits = torch.randn(3, 10)
    same = Sampler.apply_penalties(logits, [ctx(SamplingParams(temperature=0)) for _ in range(3)], (EOS,))
    assert same is logits


# ---------------------------------------------------------------- random sampling


def test_temperature_distribution_matches_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    num_draws, temp = 20000, 0.7
    contexts = [ctx(SamplingParams(temperature=temp)) for _ in range(num_draws)]
    out = Sampler().sample(logits.expand(num_draws, 4), contexts)
    observed = torch.bincount(torch.tensor(out.token_ids), minlength=4).double()
    expected = torch.softmax(logits.double() / temp, -1) * num_draws
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.27  # df = 3, p = 0.001
    # and the sharper temperature matters: T=1 would put far less mass on id 2
    assert observed[2] / num_draws > torch.softmax(logits, -1)[2].item() + 0.05


def test_top_k_keeps_k_ids():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.7, 3.0]])
    warped = Sampler.apply_warpers(logits, [SamplingParams(top_k=3)])
    assert finite_ids(warped[0]) == {1, 3, 5}
    assert torch.equal(warped[0, [1, 3, 5]], logits[0, [1, 3, 5]])
    torch.manual_seed(1)
    out = Sampler().sample(logits.expand(500, 6), [ctx(SamplingParams(top_k=3)) for _ in range(500)])
    assert set(out.token_ids) == {1, 3, 5}


def test_top_p_keeps_minimal_nucleus():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1]])
    logits = probs.log()[:, [2, 0, 3, 1]]  # shuffled: ids 1:0.5, 3:0.25, 0:0.15, 2:0.1
    s = Sampler
    assert finite_ids(s.apply_warpers(logits, [SamplingParams(top_p=0.4)])[0]) == {1}
    assert finite_ids(s.apply_warpers(logits, [SamplingParams(top_p=0.7)])[0]) == {1, 3}
    assert finite_ids(s.apply_warpers(logits, [SamplingParams(top_p=0.8)])[0]) == {1, 3, 0}
    assert finite_ids(s.apply_warpers(logits, [SamplingParams(top_p=1.0)])[0]) == {0, 1, 2, 3}
    # top_k first, then top_p over the renormalised survivors: {0.5, 0.25} -> 2/3, 1/3
    both = s.apply_warpers(logits, [SamplingParams(top_k=2, top_p=0.6)])
    assert finite_ids(both[0]) == {1}


def test_min_p_and_per_row_params():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(3, 4)
    params = [SamplingParams(min_p=0.25), SamplingParams(min_p=0.4), SamplingParams(temperature=2.0)]
    warped = Sampler.apply_warpers(logits, params)
    assert finite_ids(warped[0]) == {0, 1, 2}  # keep p >= 0.125
    assert finite_ids(warped[1]) == {0, 1}  # keep p >= 0.2
    assert torch.equal(warped[2], logits[2] / 2.0)  # temperature only


# ---------------------------------------------------------------- penalties

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])


def test_repetition_penalty_over_prompt_and_output():
    c = ctx(SamplingParams(repetition_penalty=2.0), prompt=[0, 1, 1], output=[2, 5])
    got = Sampler.apply_penalties(LOGITS, [c])
    # 0: 2/2, 1: -1*2, 2: 0.5/2, 5: 0*2; 3 and 4 never seen
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.25, 3.0, -2.0, 0.0]]))
    assert torch.equal(LOGITS, torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]]))  # not in place


def test_presence_and_frequency_over_output_only():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    c = ctx(p, prompt=[3, 3, 3], output=[1, 2, 2])
    got = Sampler.apply_penalties(LOGITS, [c])
    # 1 once: -0.25 - 0.5; 2 twice: -0.5 - 0.5; prompt token 3 untouched
    assert torch.equal(got, torch.tensor([[2.0, -1.75, -0.5, 3.0, -2.0, 0.0]]))


def test_all_penalties_compose_in_order():
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=-0.5)
    got = Sampler.apply_penalties(LOGITS, [ctx(p, prompt=[0], output=[3, 3])])
    # 0: 2/2 = 1;  3: 3/2 = 1.5, then -1.0 + 0.5*2 = 1.5
    assert torch.equal(got, torch.tensor([[1.0, -1.0, 0.5, 1.5, -2.0, 0.0]]))


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # eos (3) is the argmax
    mk = lambda **kw: SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[4], **kw)
    s = Sampler()
    masked = Sampler.apply_penalties(logits, [ctx(mk(), output=[1])], (EOS,))
    assert finite_ids(masked[0]) == {0, 1, 2}
    assert s.sample(logits, [ctx(mk(), output=[1])], (EOS,)).token_ids == [2]
    # ignore_eos spares eos only
    spared = Sampler.apply_penalties(logits, [ctx(mk(ignore_eos=True), output=[])], (EOS,))
    assert finite_ids(spared[0]) == {0, 1, 2, 3}
    # once min_tokens are out, nothing is masked
    assert s.sample(logits, [ctx(mk(), output=[1, 1])], (EOS,)).token_ids == [EOS]


# ---------------------------------------------------------------- seeds


def test_seeded_row_is_independent_of_batch():
    vocab, steps = 50, 12
    logits = torch.zeros(1, vocab)  # flat: every draw is a coin toss over 50 ids
    seeded = SamplingParams(seed=1234, top_p=0.9)

    torch.manual_seed(0)
    alone_ctx = ctx(seeded)
    alone = [Sampler().sample(logits, [alone_ctx]).token_ids[0] for _ in range(steps)]
    assert len(set(alone)) > 3

    torch.manual_seed(99)  # the default RNG differs too
    batch_ctx = [ctx(SamplingParams(temperature=0.8)), ctx(SamplingParams(seed=7, temperature=1.0)),
                 ctx(SamplingParams(temperature=0)), ctx(seeded)]
    rows = torch.randn(4, vocab)
    rows[3] = 0.0
    in_batch = [Sampler().sample(rows, batch_ctx).token_ids[3] for _ in range(steps)]
    assert in_batch == alone


def test_unseeded_rows_follow_default_rng():
    logits = torch.zeros(8, 50)
    torch.manual_seed(5)
    a = Sampler().sample(logits, [ctx() for _ in range(8)]).token_ids
    torch.manual_seed(5)
    b = Sampler().sample(logits, [ctx() for _ in range(8)]).token_ids
    torch.manual_seed(6)
    c = Sampler().sample(logits, [ctx() for _ in range(8)]).token_ids
    assert a == b and a != c


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 30, generator=g)
    raw = torch.log_softmax(logits, -1)
    contexts = [
        ctx(SamplingParams(logprobs=3, temperature=0.5, top_k=5, repetition_penalty=1.3), prompt=[1, 2]),
        ctx(SamplingParams(logprobs=0, temperature=0)),
        ctx(SamplingParams(seed=0, temperature=1.0)),
    ]
    torch.manual_seed(0)
    out = Sampler().sample(logits, contexts)
    for i, t in enumerate(out.token_ids):
        assert out.logprobs[i] == raw[i, t].item()
    top3 = raw[0].topk(3)
    want = dict(zip(top3.indices.tolist(), top3.values.tolist())) | {out.token_ids[0]: raw[0, out.token_ids[0]].item()}
    assert out.top_logprobs[0] == want
    assert out.top_logprobs[1] == {out.token_ids[1]: raw[1].max().item()}
    assert out.top_logprobs[2] is None


def test_prompt_logprobs():
    g = torch.Generator().manual_seed(4)
    prompt = [5, 2, 7]
    logits = torch.randn(2, 10, generator=g)  # rows predict prompt[1], prompt[2]
    raw = torch.log_softmax(logits, -1)
    res = prompt_logprobs(logits, prompt, 2)
    assert res[0] is None and len(res) == 3
    for j in (1, 2):
        top = raw[j - 1].topk(2)
        want = dict(zip(top.indices.tolist(), top.values.tolist()))
        want[prompt[j]] = raw[j - 1, prompt[j]].item()
        assert res[j] == want
    assert prompt_logprobs(logits, prompt, 0)[2] == {7: raw[1, 7].item()}
    assert prompt_logprobs(torch.zeros(0, 10), [5], 3) == [None]
    with pytest.raises(ValueError, match="len\\(prompt_token_ids\\) - 1"):
        prompt_logprobs(torch.zeros(3, 10), prompt, 1)


# ---------------------------------------------------------------- stop strings


def test_find_stop_across_token_boundary():
    text = "Hello world!"  # previous text "Hello wor", newest token "ld!"
    assert find_stop(text, 9, ("world",), include=False) == 6
    assert find_stop(text, 9, ("world",), include=True) == 11
    assert text[: find_stop(text, 9, ("world",), False)] == "Hello "


def test_find_stop_none_and_old_occurrences():
    assert find_stop("Hello world", 6, ("xyz",), False) is None
    assert find_stop("Hello world", 6, (), True) is None
    # "Hello" ended before the new piece: an earlier call already had its chance
    assert find_stop("Hello world", 6, ("Hello",), False) is None
    # a stop string wholly inside the new piece
    assert find_stop("ab STOP cd", 2, ("STOP",), True) == 7


def test_find_stop_earliest_ending_wins():
    # both appear in the new piece "xyz"; "y" ends first
    assert find_stop("..xyz", 2, ("xyz", "y"), False) == 3
    assert find_stop("..xyz", 2, ("xyz", "y"), True) == 4
    # same end: the one starting first
    assert find_stop("..xyz", 2, ("yz", "xyz"), False) == 2


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract():
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(64, 32000, device=dev, generator=g)
    greedy = [ctx(SamplingParams(temperature=0), device=dev) for _ in range(64)]
    out = Sampler().sample(logits.bfloat16(), greedy)
    assert out.token_ids == logits.bfloat16().float().argmax(-1).tolist()
    # a seeded row on the GPU: same tokens alone and inside a mixed batch
    seeded = SamplingParams(seed=42, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01)
    row = logits[7:8]
    alone_ctx = ctx(seeded, device=dev)
    alone = [Sampler().sample(row, [alone_ctx]).token_ids[0] for _ in range(8)]
    mixed = [ctx(SamplingParams(temperature=1.0), device=dev) for _ in range(5)]
    mixed.insert(2, ctx(seeded, device=dev))
    batch = logits[:6].clone()
    batch[2] = row[0]
    in_batch = [Sampler().sample(batch, mixed).token_ids[2] for _ in range(8)]
    assert in_batch == alone and len(set(alone)) > 1
