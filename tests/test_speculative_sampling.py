"""The rejection-sampling rule keeps the target's distribution exactly: a chi-square test.

A tiny random model with a 4-token vocabulary (so the 64 joint outcomes of three tokens each
get ~30 of 2,000 samples), a different random model as the draft (so drafts are accepted,
rejected and corrected), seeds 0..1999. The exact joint distribution of the first three
tokens comes from the target's logits over every prefix; the test also shows it has the power
to see a wrong distribution (the draft's)."""

import itertools

import pytest
import torch

from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig
from kit.config import ModelConfig
from kit.engine import Engine
from kit.llm import LLM
from kit.loader import LoadedModel, random_weights
from kit.network import NetworkBuilder
from kit.sampling import Sampler
from kit.sampling_params import SamplingParams
from kit.speculative import DraftTargetDecodingConfig, NGramDecodingConfig

V = 4
SMALL = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
BC = BuildConfig(max_batch_size=64, max_input_len=16, max_seq_len=32, max_num_tokens=256, block_size=4)
PROMPT = [0, 1, 0, 2, 0, 2, 0, 2, 2, 0, 3, 2]  # the prompt [0, 1] and a sample of the target after it
N = 2000


def _model(seed: int) -> LoadedModel:
    return LoadedModel(SMALL, random_weights(SMALL, seed=seed, std=0.4), name=f"small-{seed}", source_format="synthetic")


def _joint(model: LoadedModel, params: SamplingParams) -> torch.Tensor:
    """(V, V, V): exact P(t1, t2, t3 | PROMPT) under `params`' warpers, from the model's logits."""
    engine = Engine.from_network(NetworkBuilder(model).build())
    kv = engine.allocate_kv_cache(num_blocks=4, block_size=4)
    joint = torch.zeros(V, V, V)
    for t1, t2 in itertools.product(range(V), range(V)):
        seq = PROMPT + [t1, t2]
        batch = ForwardBatch.build([SequenceInput(seq, 0, [0, 1, 2, 3], "all")], 4)
        rows = engine.forward(batch, kv)[-3:]  # (3, V): after the prompt, after t1, after t2
        p = Sampler.apply_warpers(rows, [params] * 3).softmax(-1)
        joint[t1, t2] = p[0, t1] * p[1, t2] * p[2]
    return joint


def _chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's statistic over the cells, those expecting fewer than 5 pooled into one; (chi2, df, p-value)."""
    counts, expected = counts.flatten().double(), expected.flatten().double()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(chi2 / 2)))
    return chi2, df, p_value


@pytest.mark.parametrize("kind", ["draft-target", "ngram"])
def test_first_three_tokens_follow_the_target_distribution_chi_square(kind):
    target = _model(0)
    params = SamplingParams(max_tokens=4, temperature=0.9, top_k=3) if kind == "draft-target" else \
        SamplingParams(max_tokens=4, temperature=1.0)
    cfg = (DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=_model(7)) if kind == "draft-target"
           else NGramDecodingConfig(max_draft_len=3, is_public_pool=False))  # NOTE: a public pool's drafts depend
    # on what other requests wrote, so a seeded request is reproducible only with a private pool
    sps = [SamplingParams(**{**params.to_dict(), "seed": s}) for s in range(N)]
    with LLM(target, device="cpu", build_config=BC, speculative_config=cfg) as llm:
        outs = llm.generate([PROMPT] * N, sps, use_tqdm=False)
        num_drafted = llm.executor.speculator.num_draft_tokens
        again = llm.generate([PROMPT] * 100, sps[:100], use_tqdm=False)
    firsts = [tuple(o.outputs[0].token_ids[:3]) for o in outs]
    assert [tuple(o.outputs[0].token_ids[:3]) for o in again] == firsts[:100]  # seeded: reproducible
    stats = sum((o.spec_stats for o in outs[1:]), outs[0].spec_stats)
    # drafts were accepted and rejected many times: the rule itself was exercised
    assert stats.num_accepted_draft_tokens > 500 and stats.num_draft_tokens - stats.num_accepted_draft_tokens > 500
    assert num_drafted == stats.num_draft_tokens
    counts = torch.zeros(V, V, V)
    for t in firsts:
        counts[t] += 1
    expected = N * _joint(target, params)
    chi2, df, p_value = _chi_square(counts, expected)
    assert p_value > 1e-3, f"chi-square {chi2:.1f} with {df} degrees of freedom, p = {p_value:.2g}"
    if kind == "draft-target":  # the same test tells the draft's own distribution apart
        _, _, p_draft = _chi_square(counts, N * _joint(_model(7), params))
        assert p_draft < 1e-6
