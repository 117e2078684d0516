"""Tensor parallelism on GPUs (NCCL): TP=2 against TP=1, CUDA graphs with the all-reduce inside, and the
sequence of engine calls bench/tp.py makes (weights on another GPU, graphs, profiler, all logits).

Skipped on the CPU and where fewer than 2 GPUs exist; run on the device machine with
`pytest -m gpu tests/test_parallel_nccl.py`.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist

from helpers import engine_for, make_hf_checkpoint, run_chunks
from kit import LLM, SamplingParams
from kit.backends.base import LayerHook
from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig
from kit.loader import ModelLoader
from kit.network import NetworkBuilder
from kit.parallel import DistributedEngine
from kit.parallel.comm import TRACE_ENV
from kit.profiler import ProfiledEngine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

BC = BuildConfig(max_batch_size=4, max_seq_len=128, max_input_len=64, max_num_tokens=64, dtype="float32",
                 cuda_graph_batch_sizes=(1, 2, 4))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [100, 3, 27, 41, 9]]


def test_tp2_nccl_graphed_greedy_equals_tp1(tmp_path):
    make_hf_checkpoint("qwen2", tmp_path / "m")
    path = str(tmp_path / "m")
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    with LLM(path, device="cuda", build_config=BC, enable_build_cache=False) as one:
        want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, sp, use_tqdm=False)]
    ref = run_chunks(engine_for(path, device="cuda"), [[5, 6, 7, 8, 9, 10]], [[4], [1], [1]], block_size=16)
    with LLM(path, device="cuda", build_config=BC, tensor_parallel_size=2, enable_build_cache=False) as two:
        assert two.engine.backend.graphs is not None  # decode graphs recorded with NCCL inside
        assert two.engine.backend.mixed_graphs.num_tokens == BC.graph_num_tokens  # and the prompt steps' graphs
        assert two.engine.backend.comm.backend == "nccl"
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, sp, use_tqdm=False)]
        logits = run_chunks(two.engine, [[5, 6, 7, 8, 9, 10]], [[4], [1], [1]], block_size=16)
        pids = two.engine.pids
    # shutdown destroyed every rank's graphs first, so the group was left (NCCL waits for graphs to be gone)
    assert not dist.is_initialized()
    for pid in pids:  # every rank exited by itself after leaving the group
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert got == want
    assert (logits[0] - ref[0]).abs().max().item() < 1e-3


def test_bench_path_on_nccl_weights_on_another_gpu_graphs_profiler_and_all_logits(tmp_path, monkeypatch):
    """bench/tp.py's sequence at a small size: the weights made on the last GPU, graphs of [1, 8] in bf16,
    eager steps with hooks, the profiler's timed collectives, a prefill with logits of every position;
    every rank issued the same collectives (KIT_TP_TRACE) and the graphed step equals the eager one."""
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace"))
    last = torch.device("cuda", torch.cuda.device_count() - 1)
    loaded = ModelLoader.synthetic("llama-3.2-1b", seed=0, device=last, dtype=torch.bfloat16, num_layers=2)
    bc = BuildConfig(max_batch_size=8, max_seq_len=128, max_input_len=64, max_num_tokens=64, dtype="bfloat16",
                     cuda_graph_batch_sizes=(1, 8))
    engine = DistributedEngine.start(NetworkBuilder(loaded).build(), 2, device="cuda", dtype=torch.bfloat16,
                                     build_config=bc, timeout_s=60)
    try:
        assert {t.device for t in engine.network.weights.values()} == {torch.device("cuda", 0)}
        assert engine.step_channel == "shared memory"  # every rank on this host: step headers by the ring
        kv = engine.allocate_kv_cache(8 * 4, 16)
        assert engine.capture_cuda_graphs(kv, [1, 8]) == (1, 8)

        def decode(n: int, ctx: int) -> ForwardBatch:
            return ForwardBatch.build([SequenceInput([7 + i], ctx, list(range(4 * i, 4 * i + 4))) for i in range(n)],
                                      16, device="cuda")

        for n in (1, 8):
            graphed = engine.forward(decode(n, 20), kv).float()
            eager = engine.forward(decode(n, 20), kv, hooks=[LayerHook()]).float()
            assert graphed.shape == (n, 128256)  # the graph attends over its whole bucket: bf16 rounding differs
            assert (graphed - eager).abs().max().item() <= 5e-2 * eager.abs().max().item()
        df = ProfiledEngine(engine, 16).collectives(batch_size=1, seq_len=20, phase="decode", iters=2)
        assert set(df["rank"]) == {0, 1}
        assert len(df[df["rank"] == 0]) == 1 + 2 * 2 + 1  # the embedding, 2 per block, the lm_head
        second = engine.allocate_kv_cache(5, 16)
        logits = engine.forward(ForwardBatch.build([SequenceInput(list(range(3, 67)), 0, list(range(4)), logits="all")],
                                                   16, device="cuda"), second)
        assert logits.shape == (64, 128256)
        torch.cuda.synchronize()
    finally:
        engine.shutdown()
    ops = [re.findall(r"#\d+ .*", (tmp_path / "trace" / f"rank{r}.log").read_text()) for r in (0, 1)]
    assert ops[0] == ops[1] and len(ops[0]) > 0
