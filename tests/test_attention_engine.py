"""The PyTorch backend with the Triton paged attention kernels against the same backend with the
reference attention (`kit.ops.paged_attention`): greedy decode of a tiny synthetic model, through
prompt chunks, mixed chunk + decode steps and decode steps, with bf16/fp32 and int8/fp8 caches.
On the CPU the kernels run through Triton's interpreter (`attention="triton"`); on a GPU at full speed."""

import pytest
import torch

from kit.backends.torch_backend import TorchBackend
from kit.backends.triton_attention import triton_available
from kit.batch import ForwardBatch, KVCache, SequenceInput
from kit.config import ModelConfig
from kit.engine import Engine
from kit.loader import LoadedModel, random_weights
from kit.network import NetworkBuilder

requires_triton = pytest.mark.skipif(not triton_available(), reason="needs triton (pip install triton)")

BLOCK = 16


def _network(family="llama", sliding_window=None, head_dim=16, device="cpu"):
    cfg = ModelConfig(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                      sliding_window=sliding_window)
    weights = random_weights(cfg, seed=3, std=0.3, device=device)
    return NetworkBuilder(LoadedModel(cfg, weights, name="tiny", source_format="synthetic")).build()


def _greedy(engine, prompts, chunk, new_tokens, kv_algo):
    """Greedy decode with chunked prefill: each step computes up to `chunk` prompt tokens of every
    sequence still in its prompt and one token of every sequence already decoding (mixed batches)."""
    kv = KVCache(engine.config, num_blocks=64, block_size=BLOCK, dtype=engine.backend.dtype,
                 device=engine.device, quant_algo=kv_algo)
    need = [-(-(len(p) + new_tokens) // BLOCK) for p in prompts]
    order = torch.randperm(sum(need), generator=torch.Generator().manual_seed(0)).tolist()
    tables = [order[sum(need[:i]):sum(need[:i + 1])] for i in range(len(prompts))]
    tokens = [list(p) for p in prompts]
    done = [0] * len(prompts)
    kinds = set()
    while any(len(t) < len(p) + new_tokens for t, p in zip(tokens, prompts)):
        inputs, owners = [], []
        for i, (t, p) in enumerate(zip(tokens, prompts)):
            if len(t) >= len(p) + new_tokens:
                continue
            n = min(chunk, len(t) - done[i])
            inputs.append(SequenceInput(t[done[i]:done[i] + n], done[i], tables[i]))
            owners.append((i, n))
        batch = ForwardBatch.build(inputs, BLOCK, device=engine.device)
        kinds.add("decode" if batch.max_query_len == 1 else "mixed" if batch.num_seqs > 1 and any(
            n == 1 for _, n in owners) else "prefill")
        logits = engine.forward(batch, kv)
        for row, (i, n) in enumerate(owners):
            done[i] += n
            if done[i] == len(tokens[i]):  # its last known token was computed: sample the next one
                tokens[i].append(int(logits[row].argmax()))
    return [t[len(p):] for t, p in zip(tokens, prompts)], kinds


PROMPTS = [[5, 9, 11, 3, 50, 61, 2, 8, 8, 13, 21, 34, 55, 1, 7, 30, 31, 40, 41, 42, 43, 44],
           [17, 4], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82,
                     83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 93, 94, 95, 96, 1, 2, 3]]


@requires_triton
@pytest.mark.parametrize("family,window,kv_algo", [("llama", None, None), ("llama", None, "INT8"),
                                                   ("llama", None, "FP8"), ("mistral", 6, None)])
def test_greedy_with_kernels_equals_reference_attention(family, window, kv_algo):
    net = _network(family, window)
    fast = Engine(net, TorchBackend(net, attention="triton"))
    ref = Engine(net, TorchBackend(net, attention="reference"))
    assert fast.backend.prefill_kernel is not None and ref.backend.prefill_kernel is None
    got, kinds = _greedy(fast, PROMPTS, 9, 6, kv_algo)
    want, _ = _greedy(ref, PROMPTS, 9, 6, kv_algo)
    assert kinds == {"prefill", "mixed", "decode"}
    assert got == want


def test_triton_attention_on_the_cpu_needs_the_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    net = _network()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        TorchBackend(net, attention="triton")
    assert TorchBackend(net).decode_kernel is None  # "auto" on the CPU: the reference


# ------------------------------------------------------------------------------ GPU
@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("kv_algo", [None, "INT8", "FP8"])
@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 6)])
def test_gpu_greedy_with_kernels_equals_reference_attention(family, window, kv_algo):
    net = _network(family, window, head_dim=64, device="cuda")
    fast = Engine(net, TorchBackend(net, device="cuda", dtype=torch.float32, attention="triton"))
    ref = Engine(net, TorchBackend(net, device="cuda", dtype=torch.float32, attention="reference"))
    assert fast.backend.decode_kernel is not None and ref.backend.decode_kernel is None
    got, kinds = _greedy(fast, PROMPTS, 9, 12, kv_algo)
    want, _ = _greedy(ref, PROMPTS, 9, 12, kv_algo)
    assert kinds == {"prefill", "mixed", "decode"}
    assert got == want


_DRIFT = pytest.mark.xfail(reason="8-bit caches: on an H200 the kernels' bf16 logits drifted from the reference's "
                                  "(top-1 0.67); the engine routes 8-bit caches to the reference unless "
                                  "attention='triton'", strict=False)


@requires_triton
@pytest.mark.gpu
@pytest.mark.parametrize("kv_algo", [None, pytest.param("INT8", marks=_DRIFT), pytest.param("FP8", marks=_DRIFT)])
def test_gpu_bf16_kernels_track_reference_logits_with_graphs(kv_algo):
    """bf16: the kernels' logits within rounding of the reference's, decode steps replayed from CUDA graphs."""
    net = _network(head_dim=64, device="cuda")
    fast = Engine(net, TorchBackend(net, device="cuda", dtype=torch.bfloat16, attention="triton"))
    ref = Engine(net, TorchBackend(net, device="cuda", dtype=torch.bfloat16, attention="reference"))
    caches = {}
    for name, engine in (("fast", fast), ("ref", ref)):
        caches[name] = KVCache(engine.config, num_blocks=64, block_size=BLOCK, dtype=torch.bfloat16, device="cuda",
                               quant_algo=kv_algo)
        engine.backend.capture_cuda_graphs(caches[name], [1, 4], max_blocks=8)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    prompts = [list(range(1, 41)), list(range(20, 27)), list(range(50, 90))]
    steps = [[SequenceInput(p, 0, t) for p, t in zip(prompts, tables)]]
    for k in range(5):
        steps.append([SequenceInput([k + 3], len(p) + k, t) for p, t in zip(prompts, tables)])
    for inputs in steps:
        a = fast.forward(ForwardBatch.build(inputs, BLOCK, device="cuda"), caches["fast"])
        b = ref.forward(ForwardBatch.build(inputs, BLOCK, device="cuda"), caches["ref"])
        assert (a.float() - b.float()).abs().max().item() < 0.3
        assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.95
    assert fast.backend.graphs is not None and ref.backend.graphs is not None
