"""The Sampler's batched pass (kit/sampling.py) against a per-row reference: same masks, same penalties,
seeded rows reproducible whatever the batch (also when top-k/top-p cut the vocabulary to candidates),
and the result stays on the device until one copy."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kit.sampling import SampledBatch, Sampler, SamplingContext
from kit.sampling_params import SamplingParams


def ctx(params, prompt=(), output=()):
    return SamplingContext(params, list(prompt), list(output), Sampler.make_generator(params, "cpu"))


def reference_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, the textbook way: full sort, top-k, nucleus, min-p."""
    vocab = row.shape[0]
    x = row.float() / (p.temperature if p.temperature >= 1e-5 else 1.0)
    k = vocab if p.top_k <= 0 else min(p.top_k, vocab)
    vals, order = x.sort(descending=True)
    vals = vals.masked_fill(vals < vals[k - 1], -math.inf)
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    if p.top_p < 1.0:
        drop = before >= p.top_p
        drop[0] = False
        vals = vals.masked_fill(drop, -math.inf)
    out = torch.full_like(x, -math.inf).scatter_(0, order, vals)
    if p.min_p > 0:
        probs = out.softmax(-1)
        out = out.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    return out


def test_batched_warpers_match_the_per_row_reference():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(24, 300, generator=g) * 3
    params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([-1, 1, 5, 40, 299, 300, 500]),
                             top_p=rng.choice([1.0, 0.3, 0.9, 0.99]), min_p=rng.choice([0.0, 0.05, 0.3]))
              for _ in range(24)]
    got = Sampler.apply_warpers(logits, params)
    for i, p in enumerate(params):
        want = reference_warp(logits[i], p)
        assert set(torch.isfinite(got[i]).nonzero().flatten().tolist()) == \
            set(torch.isfinite(want).nonzero().flatten().tolist()), (i, p)
        kept = torch.isfinite(want)
        assert torch.allclose(got[i][kept], want[kept])


def test_batched_penalties_match_per_row_application():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 40, generator=g)
    contexts = [ctx(SamplingParams(repetition_penalty=1.7), prompt=[1, 2, 2], output=[3, 30]),
                ctx(SamplingParams(temperature=0)),
                ctx(SamplingParams(presence_penalty=0.4, frequency_penalty=0.3), prompt=[5], output=[7, 7, 8]),
                ctx(SamplingParams(min_tokens=3, stop_token_ids=[11]), output=[1]),
                ctx(SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, min_tokens=1), prompt=[9],
                    output=[])]
    batched = Sampler.apply_penalties(logits, contexts, (4,))
    for i, c in enumerate(contexts):  # each row alone gives the same row
        assert torch.equal(batched[i], Sampler.apply_penalties(logits[i:i + 1], [c], (4,))[0])
    assert torch.equal(batched[1], logits[1])
    assert batched[3, 11] == -math.inf and batched[3, 4] == -math.inf and batched[4, 4] == -math.inf
    assert torch.isclose(batched[2, 7], logits[2, 7] - 0.3 * 2 - 0.4)


@pytest.mark.parametrize("vocab", [50, 3000])
def test_seeded_row_with_cut_candidates_is_independent_of_batch(vocab):
    """Above `top_p_candidates` the draw runs over candidates: a seeded row draws its own width only."""
    seeded = SamplingParams(seed=99, temperature=1.0, top_p=0.95)
    row = torch.zeros(1, vocab)
    row[0, : vocab // 2] = 0.5  # a flat-ish distribution: the nucleus is wide
    alone_ctx = ctx(seeded)
    alone = [Sampler().sample(row, [alone_ctx]).token_ids[0] for _ in range(10)]
    assert len(set(alone)) > 3
    batch = torch.randn(4, vocab)
    batch[2] = row[0]
    contexts = [ctx(SamplingParams(temperature=1.0, top_k=min(2000, vocab))), ctx(SamplingParams(temperature=0)),
                ctx(seeded), ctx(SamplingParams(temperature=0.7, min_p=0.1, seed=3))]
    torch.manual_seed(123)
    in_batch = [Sampler().sample(batch, contexts).token_ids[2] for _ in range(10)]
    assert in_batch == alone


def test_top_p_draws_follow_the_nucleus_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(6000, 4)
    out = Sampler().sample(logits, [ctx(SamplingParams(temperature=1.0, top_p=0.8)) for _ in range(6000)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).double()
    assert counts[3] == 0  # outside the nucleus {0, 1, 2}
    expected = torch.tensor([0.4, 0.3, 0.2]) / 0.9 * 6000
    chi2 = ((counts[:3] - expected) ** 2 / expected).sum().item()
    assert chi2 < 13.8  # df = 2, p = 0.001


def test_sample_async_keeps_tokens_on_the_device_until_result():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=g)
    contexts = [ctx(SamplingParams(temperature=0, logprobs=2)), ctx(SamplingParams(temperature=0)),
                ctx(SamplingParams(temperature=0, logprobs=0))]
    batch = Sampler().sample_async(logits, contexts)
    assert isinstance(batch, SampledBatch) and batch.ready
    assert batch.token_ids.tolist() == logits.argmax(-1).tolist()  # a tensor: the next step's input ids
    assert batch.packed.shape == (3, 2 + 2 * 2)
    out = batch.result()
    assert out.token_ids == logits.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1)
    top2 = raw[0].topk(2)
    assert out.top_logprobs[0] == dict(zip(top2.indices.tolist(), top2.values.tolist()))
    assert out.top_logprobs[1] is None and out.top_logprobs[2] == {out.token_ids[2]: raw[2].max().item()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_of_64_with_150k_vocabulary():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 151936, device="cuda", generator=g)
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9),
             SamplingParams(temperature=0.7, top_k=50, top_p=0.95, seed=5), SamplingParams(temperature=1.0, min_p=0.05)]
    contexts = [SamplingContext(p, [1], [2], Sampler.make_generator(p, "cuda")) for p in mixed * 16]
    batch = Sampler().sample_async(logits, contexts).start_copy()
    out = batch.result()
    assert len(out.token_ids) == 64 and all(0 <= t < 151936 for t in out.token_ids)
    assert out.token_ids[0::4] == logits[0::4].argmax(-1).tolist()


def _aten_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn()
    return rec.ops


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=8),
                                    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8),
                                    SamplingParams(temperature=0.7, top_k=50, top_p=0.95, max_tokens=8)],
                         ids=["greedy", "top_p", "top_k_top_p"])
def test_a_152k_vocabulary_batch_pass_has_no_per_row_op_and_no_sort(params):
    """Qwen2.5's 151,936-token vocabulary: the device ops of the pass are the same for 2 and 16 rows (nothing
    per row), and none sorts (top-k/top-p take `topk` over at most `top_p_candidates`)."""
    vocab = 151936
    ops = {}
    for rows in (2, 16):
        logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
        contexts = [ctx(params) for _ in range(rows)]
        ops[rows] = _aten_ops(lambda: Sampler().sample_async(logits, contexts))
    assert ops[2] == ops[16]
    assert not any("sort" in op for op in ops[16])
