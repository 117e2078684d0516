"""Mixed-step CUDA graphs (kit/backends/mixed_graphs.py): the padded static batch a graph replays.

The graphs themselves need a GPU (tests/test_gpu.py); what they compute is `run_layers` over
`MixedStepInputs.batch(T)` after `load(batch, T)`, and that runs anywhere: here the padded
batch goes through the backend eagerly (Triton attention through its interpreter) and must
give the logits, greedy tokens and KV cache of the unpadded batch."""

import pytest
import torch

from kit.backends.mixed_graphs import MixedStepInputs
from kit.backends.torch_backend import TorchBackend
from kit.backends.triton_attention import triton_available
from kit.batch import ForwardBatch, KVCache, SequenceInput
from kit.build_config import BuildConfig
from kit.engine import Engine
from kit.llm_args import CudaGraphConfig, LlmArgs

from tests.test_attention_engine import BLOCK, PROMPTS, _greedy, _network

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")


class PaddedBackend(TorchBackend):
    """Runs every step as a mixed-step graph would: padded to the next bucket in static buffers."""

    def __init__(self, network, buckets, max_seqs, max_blocks):
        super().__init__(network, attention="triton")
        self.buckets, self.max_seqs, self.max_blocks = buckets, max_seqs, max_blocks
        self.inputs, self.padded = None, []

    def forward(self, batch, kv_cache, hooks=None):
        if self.inputs is None:
            self.inputs = MixedStepInputs(self.buckets[-1], self.max_seqs, self.max_seqs + 1, self.max_blocks,
                                          kv_cache.block_size, kv_cache.scratch_block, "cpu")
        size = next(t for t in self.buckets if t >= batch.num_tokens)
        self.padded.append(size - batch.num_tokens)
        self.inputs.load(batch, size)
        return self.run_layers(self.inputs.batch(size), kv_cache)[:batch.logits_indices.shape[0]]


def _batch(seqs):
    return ForwardBatch.build([SequenceInput(*s) for s in seqs], BLOCK)


@requires_triton
@pytest.mark.parametrize("kv_algo", [None, "INT8"])
def test_padded_steps_give_the_greedy_tokens_of_unpadded_ones(kv_algo):
    net = _network()
    padded = PaddedBackend(net, buckets=(8, 16, 32), max_seqs=4, max_blocks=8)
    got, kinds = _greedy(Engine(net, padded), PROMPTS, 9, 6, kv_algo)
    want, _ = _greedy(Engine(net, TorchBackend(net, attention="triton")), PROMPTS, 9, 6, kv_algo)
    assert kinds == {"prefill", "mixed", "decode"}
    assert got == want
    assert max(padded.padded) > 0  # steps were padded


@requires_triton
def test_a_padded_mixed_step_matches_logits_and_cache_and_keeps_padding_in_the_scratch_block():
    net = _network()
    backend = TorchBackend(net, attention="triton")
    engine = Engine(net, backend)
    caches = [KVCache(engine.config, 16, BLOCK, dtype=torch.float32) for _ in range(2)]
    prompt = list(range(3, 23))
    # a first step fills two sequences' prompts, the second mixes a chunk with a decode token
    steps = [[(prompt[:12], 0, [0, 1]), (prompt[:5], 0, [2])],
             [(prompt[12:], 12, [0, 1]), ([7], 5, [2]), ([1, 2, 3], 0, [3])]]
    inputs = MixedStepInputs(64, 4, 5, 4, BLOCK, caches[1].scratch_block, "cpu")
    for seqs in steps:
        batch = _batch(seqs)
        want = backend.run_layers(batch, caches[0])
        inputs.load(batch, 64)
        got = backend.run_layers(inputs.batch(64), caches[1])[:batch.logits_indices.shape[0]]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scratch = caches[1].scratch_block
    for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
        torch.testing.assert_close(b[:, :scratch], a[:, :scratch], rtol=1e-6, atol=1e-6)  # real blocks alike
        assert torch.isfinite(b[:, scratch]).all() and b[:, scratch].abs().sum() > 0  # padding wrote only here


def test_load_lays_out_real_rows_empty_sequences_and_the_padding_sequence():
    inputs = MixedStepInputs(32, 4, 5, 4, BLOCK, scratch_block=9, device="cpu")
    big = _batch([(list(range(20)), 0, [0, 1]), ([5], 3, [2]), ([6], 4, [3]), ([7, 8], 0, [4])])
    inputs.load(big, 32)
    small = _batch([(list(range(5)), 0, [5]), ([9], 7, [6])])
    inputs.load(small, 8)  # stale rows of the bigger step must not leak
    assert inputs.ids[:8].tolist() == [0, 1, 2, 3, 4, 9, 0, 0]
    assert inputs.slots[:8].tolist() == [80, 81, 82, 83, 84, 103, 9 * BLOCK, 9 * BLOCK + 1]
    assert inputs.qsl.tolist() == [0, 5, 6, 6, 6, 8]  # 2 sequences, 2 empty ones, padding sequence of 2 rows
    assert inputs.seq_lens.tolist() == [5, 8, 0, 0, 2]
    assert inputs.tables[:2, 0].tolist() == [5, 6] and (inputs.tables[:2, 1:] == 9).all()
    assert (inputs.tables[2:] == 9).all()
    assert inputs.logits.tolist() == [4, 5, 0, 0, 0]
    batch = inputs.batch(8)
    assert batch.num_tokens == 8 and batch.num_seqs == 5 and batch.max_query_len > 1
    assert inputs.batch(4).logits_indices.shape[0] == 4  # no more logits rows than the bucket has tokens
    assert not inputs.fits(_batch([([1], 0, [0])] * 5))  # more sequences than the graphs hold
    with pytest.raises(ValueError, match="does not fit"):
        inputs.load(big, 16)
    long_pad = MixedStepInputs(128, 4, 5, 4, BLOCK, scratch_block=9, device="cpu")  # 128 padding rows: 8 blocks
    long_pad.load(small, 128)
    assert long_pad.tables.shape == (5, 8) and long_pad.seq_lens[-1].item() == 122


def test_build_config_token_buckets():
    assert BuildConfig().graph_num_tokens == (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768,
                                              896, 1024, 1280, 1536, 1792, 2048)
    assert BuildConfig(max_num_tokens=300).graph_num_tokens[-2:] == (256, 300)
    assert BuildConfig(max_num_tokens=8192).graph_num_tokens[-1] == 2048  # longer steps are compute-bound
    assert BuildConfig(cuda_graph_mixed_steps=False).graph_num_tokens == ()
    assert BuildConfig(cuda_graph_num_tokens=(64, 16)).graph_num_tokens == (16, 64)
    bc = BuildConfig(cuda_graph_num_tokens=(16, 64))
    assert BuildConfig.from_dict(bc.to_dict()) == bc
    with pytest.raises(ValueError, match="cuda_graph_num_tokens"):
        BuildConfig(max_num_tokens=256, cuda_graph_num_tokens=(512,))
    with pytest.raises(ValueError, match="cuda_graph_mixed_steps"):
        BuildConfig(cuda_graph_mixed_steps="yes")


def test_cuda_graph_config_mixed_fields_reach_the_build_config():
    bc = LlmArgs(model="x", cuda_graph_config=CudaGraphConfig(mixed_steps=False)).build_config_to_use()
    assert bc.cuda_graph_mixed_steps is False and bc.graph_num_tokens == ()
    bc = LlmArgs(model="x", cuda_graph_config=CudaGraphConfig(mixed_num_tokens=[128, 64])).build_config_to_use()
    assert bc.graph_num_tokens == (64, 128)
    kept = LlmArgs(model="x", build_config=BuildConfig(cuda_graph_mixed_steps=False),
                   cuda_graph_config=CudaGraphConfig(batch_sizes=[1, 2])).build_config_to_use()
    assert kept.cuda_graph_mixed_steps is False and kept.cuda_graph_batch_sizes == (1, 2)  # None keeps the build's
    with pytest.raises(ValueError, match="mixed_num_tokens"):
        CudaGraphConfig(mixed_num_tokens=[0])
    with pytest.raises(ValueError, match="mixed_steps"):
        CudaGraphConfig(mixed_steps="no")


def test_backends_that_cannot_capture_mixed_steps_say_so():
    net = _network()
    kv = KVCache(net.config, 8, BLOCK)
    assert TorchBackend(net, attention="reference").mixed_graph_sizes(kv, (16, 32)) == ()
    if triton_available():
        backend = TorchBackend(net, attention="triton")
        assert backend.mixed_graph_sizes(kv, (32, 16, 128)) == (16, 32, 128)


def test_layout_and_html_show_rows_sequences_and_padding():
    inputs = MixedStepInputs(16, 3, 4, 4, BLOCK, scratch_block=9, device="cpu")
    assert "nothing loaded" in inputs._repr_html_() and inputs.layout() == {"rows": [], "sequences": []}
    inputs.load(_batch([(list(range(5)), 0, [5]), ([9], 7, [6])]), 8)
    lay = inputs.layout()
    assert [r["kind"] for r in lay["rows"]] == ["token"] * 6 + ["padding"] * 2
    assert [r["sequence"] for r in lay["rows"]] == [0, 0, 0, 0, 0, 1, 3, 3]
    assert lay["rows"][-1]["block"] == 9 and lay["rows"][0]["block"] == 5
    assert [q["kind"] for q in lay["sequences"]] == ["step's", "step's", "empty", "padding"]
    assert [q["queries"] for q in lay["sequences"]] == [5, 1, 0, 2]
    page = inputs._repr_html_()
    assert "bucket of 8 rows, 6 of the step (2 padding)" in page and "scratch block 9" in page
