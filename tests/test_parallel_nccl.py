"""Tensor parallelism on GPUs (NCCL): TP=2 against TP=1, CUDA graphs with the all-reduce inside.

Skipped on the CPU and where fewer than 2 GPUs exist; run on the device machine with
`pytest -m gpu tests/test_parallel_nccl.py`.
"""

from __future__ import annotations

import pytest
import torch

from helpers import engine_for, make_hf_checkpoint, run_chunks
from kit import LLM, SamplingParams
from kit.builder import BuildConfig

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
        assert two.engine.backend.comm.backend == "nccl"
        got = [o.outputs[0].token_ids for o in two.generate(PROMPTS, sp, use_tqdm=False)]
        logits = run_chunks(two.engine, [[5, 6, 7, 8, 9, 10]], [[4], [1], [1]], block_size=16)
    assert got == want
    assert (logits[0] - ref[0]).abs().max().item() < 1e-3
