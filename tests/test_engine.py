"""The engine against Hugging Face transformers, and paged attention against itself."""

import random

import pytest
import torch

from helpers import FAMILY_CONFIGS, complete_schedule, engine_for, hf_logits, run_chunks
from kit.backends.base import Backend, LayerHook
from kit.engine import ForwardBatch, SequenceInput

# three sequences; each step mixes prompt chunks and single decode tokens
LENGTHS = (13, 5, 20)
SCHEDULE = [[7, 5, 4], [1, 0, 9], [3, 0, 7], [1, 0, 0], [1, 0, 0]]


def _seqs(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_logits_match_transformers_on_a_mixed_batch(family, tiny_checkpoints):
    path, hf = tiny_checkpoints[family]
    engine = engine_for(path)
    seqs = _seqs(hf.config.vocab_size)
    for out, seq in zip(run_chunks(engine, seqs, SCHEDULE, block_size=4), seqs):
        assert out.shape == (len(seq), hf.config.vocab_size)
        assert (out - hf_logits(hf, seq)).abs().max().item() < 1e-4


def test_smollm2_logits_match_transformers(smollm2):
    from transformers import AutoConfig, AutoModelForCausalLM

    from kit.engine import Engine
    from kit.network import NetworkBuilder

    cfg = {k: v for k, v in smollm2.config.to_hf_config().items() if k != "architectures"}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), attn_implementation="eager").eval()
    hf.load_state_dict(smollm2.weights, strict=False)  # lm_head is tied to the embedding
    hf.tie_weights()
    engine = Engine.from_network(NetworkBuilder(smollm2).build())
    seqs = [smollm2.tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):",
                                                    "Once upon a time, in a land far away, there lived a")]
    schedule = [[3, 4, 6], [2, 1, 5], [1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    outs = run_chunks(engine, seqs, complete_schedule(schedule, seqs), block_size=16)
    for out, seq in zip(outs, seqs):
        assert (out - hf_logits(hf, seq)).abs().max().item() < 1e-4


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_paged_attention_independent_of_block_size_and_order(block_size, tiny_checkpoints):
    path, hf = tiny_checkpoints["llama"]
    engine = engine_for(path)
    seqs = _seqs(hf.config.vocab_size, seed=2)
    reference = run_chunks(engine, seqs, SCHEDULE, block_size=8)
    needed = sum(-(-n // block_size) for n in LENGTHS)
    for trial in range(3):
        order = list(range(needed + 5))
        random.Random(trial).shuffle(order)
        outs = run_chunks(engine, seqs, SCHEDULE, block_size=block_size, block_order=order[:needed])
        for a, b in zip(outs, reference):
            assert (a - b).abs().max().item() < 1e-5


def test_forward_batch_validates_block_tables():
    with pytest.raises(ValueError, match="cannot hold"):
        ForwardBatch.build([SequenceInput([1, 2, 3], 2, [0])], block_size=4)
    with pytest.raises(ValueError, match="no tokens"):
        ForwardBatch.build([SequenceInput([], 0, [0])], block_size=4)
    b = ForwardBatch.build([SequenceInput([5, 6, 7], 0, [3]), SequenceInput([9], 6, [1, 2])], block_size=4)
    assert b.positions.tolist() == [0, 1, 2, 6]
    assert b.slot_mapping.tolist() == [12, 13, 14, 10]
    assert b.logits_indices.tolist() == [2, 3] and b.seq_lens.tolist() == [3, 7]
    assert b.query_start_loc.tolist() == [0, 3, 4] and b.max_query_len == 3 and b.max_seq_len == 7


def test_hooks_see_every_layer_with_its_inputs_and_outputs(tiny_checkpoints):
    engine = engine_for(tiny_checkpoints["qwen3"][0])
    seen = []

    class Recorder(LayerHook):
        def before(self, layer, inputs):
            seen.append(("before", layer.name, sorted(inputs)))

        def after(self, layer, outputs):
            seen.append(("after", layer.name, sorted(outputs)))
            assert all(isinstance(t, torch.Tensor) for t in outputs.values())

    batch = ForwardBatch.build([SequenceInput([5, 6, 7], 0, [0]), SequenceInput([9], 3, [1])], block_size=4)
    plain = engine.forward(batch, engine.allocate_kv_cache(4, 4, capture_graphs=False))
    hooked = engine.forward(batch, engine.allocate_kv_cache(4, 4, capture_graphs=False), hooks=[Recorder()])
    assert torch.equal(plain, hooked)
    layers = list(engine.network)
    assert [name for when, name, _ in seen if when == "before"] == [layer.name for layer in layers]
    assert [name for when, name, _ in seen if when == "after"] == [layer.name for layer in layers]
    assert seen[0] == ("before", "embedding", ["input_ids"]) and seen[1] == ("after", "embedding", ["hidden"])
    by_name = {(when, name): keys for when, name, keys in seen}
    assert by_name[("before", "layers.0.rope")] == ["k", "positions", "q"]
    assert by_name[("after", "layers.0.qkv_proj")] == ["k", "q", "v"]
    assert by_name[("before", "lm_head")] == ["logits_indices", "x"]
    assert by_name[("after", "lm_head")] == ["logits"]


def test_cuda_graph_capture_is_an_explicit_step(tiny_checkpoints):
    engine = engine_for(tiny_checkpoints["llama"][0])
    assert isinstance(engine.backend, Backend) and engine.backend.can_execute
    assert "executes paged batches" in engine.backend.capabilities
    kv = engine.allocate_kv_cache(4, 4, capture_graphs=False)
    assert not hasattr(kv, "compute_dtype") and kv.dtype == torch.float32
    assert engine.capture_cuda_graphs(kv) == ()  # on the CPU: nothing to capture, nothing logged
    assert engine.backend.graphs is None and engine.build_log == []
    with pytest.raises(ValueError, match=r"batch_sizes=\[1, 2\].*cannot capture CUDA graphs"):
        engine.capture_cuda_graphs(kv, batch_sizes=[1, 2])
