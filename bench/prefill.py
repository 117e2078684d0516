"""Prefill throughput against the bf16 matrix peak, per chunk size (GPU; --smoke on the CPU).

A step that computes prompt tokens is a set of GEMMs of `num_tokens` rows plus the causal attention of
each chunk against its sequence's cached context. For each model (synthetic weights, bf16) and chunk
size T (`max_num_tokens`: 256 ... 8192 tokens in one step), this times one engine forward of 1,024-token
prompts cut into steps of T tokens: T < 1,024 is the last T-token chunk of one prompt (its first
1,024 - T tokens already cached, so attention reads them), T >= 1,024 is T / 1,024 whole prompts. It
reports the step time, prompt tokens/s, the model's TFLOP/s (`kit.roofline`'s FLOP count: the GEMMs,
the causal attention, `lm_head` for one row per sequence) and its share of the bf16 matrix peak
measured in the same run (an 8192^3 bf16 product, as the README's peak; 790 TFLOP/s on an H100).

The chunk size trades TTFT and TPOT: a decode step of batch 64 reads every weight once, and up to the
ridge point (peak / bandwidth, ~180-230 FLOP per byte: ~180-230 tokens of bf16 weights) extra prompt
tokens in the same step cost almost nothing; beyond it each token costs its FLOPs. The smallest T that
reaches most of the peak is the chunk size a mixed step wants (README: "Prefill and the chunk size").

    python bench/prefill.py --out bench/results/prefill_h200.json       # ~60 s on an H200
    python bench/prefill.py --smoke --out /tmp/prefill_smoke.json       # seconds, on the CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kit.backends.torch_backend import TorchBackend
from kit.batch import ForwardBatch, SequenceInput
from kit.build_config import BuildConfig
from kit.config import ModelConfig
from kit.engine import Engine
from kit.loader import LoadedModel, ModelLoader, random_weights
from kit.network import NetworkBuilder

BLOCK = 16
PROMPT = 1024
CHUNKS = (256, 512, 1024, 2048, 4096, 8192)
MODELS = ("llama-3.2-1b", "llama-3.1-8b")
TINY = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matrix_peak_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n x n x n product on random data: the mean of 10 after 3 warm-ups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


def step_flops(cfg: ModelConfig, chunks: list[tuple[int, int]]) -> float:
    """FLOPs of one step: (offset, length) per sequence chunk; GEMMs, causal attention, last-row lm_head."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    per_token = 2 * cfg.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size)
    tokens = sum(n for _, n in chunks)
    # QK^T and PV: 2 products of 2 FLOPs per (query, key, head dim); a query at position p sees p + 1 keys
    attn = sum(4 * q * (n * off + n * (n + 1) / 2) for off, n in chunks) * cfg.num_hidden_layers
    return per_token * tokens + attn + 2 * h * cfg.vocab_size * len(chunks)


def batch_for(chunk: int, prompt: int, device: str) -> tuple[ForwardBatch, list[tuple[int, int]], int]:
    """The step of `chunk` tokens of `prompt`-token prompts, its (offset, length) chunks, its KV blocks."""
    per_seq = -(-prompt // BLOCK)
    if chunk < prompt:
        chunks = [(prompt - chunk, chunk)]
    else:
        chunks = [(0, prompt)] * (chunk // prompt)
    seqs = [SequenceInput(list(range(100 + off, 100 + off + n)), off, list(range(i * per_seq, (i + 1) * per_seq)))
            for i, (off, n) in enumerate(chunks)]
    return ForwardBatch.build(seqs, BLOCK, device=device), chunks, per_seq * len(chunks)


def measure(loaded: LoadedModel, chunk_sizes: list[int], prompt: int, device: str, iters: int) -> list[dict]:
    network = NetworkBuilder(loaded).build()
    bc = BuildConfig(max_batch_size=max(1, max(chunk_sizes) // prompt), max_seq_len=prompt + BLOCK,
                     max_input_len=prompt, max_num_tokens=max(chunk_sizes), use_cuda_graphs=False)
    engine = Engine(network, TorchBackend(network, device=device, dtype=loaded.dtype), build_config=bc)
    rows = []
    for chunk in chunk_sizes:
        batch, chunks, blocks = batch_for(chunk, prompt, device)
        kv = engine.allocate_kv_cache(blocks, BLOCK)
        for _ in range(2):  # warm-up: Triton compiles this shape's kernels here
            engine.forward(batch, kv)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            engine.forward(batch, kv)
        sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / iters
        flops = step_flops(loaded.config, chunks)
        rows.append({"model": loaded.name, "chunk_tokens": chunk, "sequences": len(chunks), "step_ms": ms,
                     "prompt_tokens_per_s": chunk * 1e3 / ms, "tflops": flops / ms / 1e9, "step_tflop": flops / 1e12})
        del kv
        print(f"{loaded.name:28s} chunk {chunk:5d}: {ms:8.2f} ms  {rows[-1]['prompt_tokens_per_s']:10.0f} tok/s  "
              f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
    del engine
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: the same code path")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--chunks", type=int, nargs="*", default=list(CHUNKS))
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    t_start = time.perf_counter()
    peak = matrix_peak_tflops(device, 8192 if cuda else 256, dtype)
    prompt = PROMPT if cuda else 16
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "smoke": args.smoke, "dtype": str(dtype).replace("torch.", ""), "prompt_len": prompt,
           "matrix_peak_tflops": peak, "peak_note": "8192^3 bf16 product on random data, mean of 10, this run",
           "runs": []}
    print(f"{out['device']}: matrix peak {peak:.0f} TFLOP/s", flush=True)
    for name in args.models:
        if args.smoke:
            cfg = ModelConfig(**TINY)
            loaded = LoadedModel(cfg, random_weights(cfg, dtype=dtype, device=device), name=f"tiny-{name}")
            chunks = [c // 64 for c in args.chunks if c // 64 >= 4]  # 4 ... 128 tokens of 16-token prompts
        else:
            loaded = ModelLoader.synthetic(name, device=device, dtype=dtype)
            chunks = args.chunks
        rows = measure(loaded, chunks, prompt, device, args.iters)
        for r in rows:
            r["peak_fraction"] = r["tflops"] / peak
        out["runs"] += rows
        del loaded
        if cuda:
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
