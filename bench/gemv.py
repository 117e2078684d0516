"""Decode projections at batch 1..4: cuBLAS (`F.linear`) against `kit.kernels.gemv` over a sweep of tiles.

For each weight shape of Llama-3.2-1B and Llama-3.1-8B (q/k/v, o_proj, gate/up, down; bf16) and each M,
a CUDA graph runs the projection over 16 different weights in turn (each read from HBM, as in a step,
not from L2) and is replayed; the time per call, its share of the card's copy bandwidth, and the best
GEMV tile against cuBLAS. Results are JSON; nothing is asserted.

    python bench/gemv.py --out bench/results/gemv_h200.json      # a GPU, ~2 min
    python bench/gemv.py --smoke --out /tmp/gemv_smoke.json      # the CPU (Triton's interpreter), tiny
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first JIT-decorated

from kit.kernels.gemv import GemvConfig, gemv
from kit.roofline import copy_bandwidth

SHAPES = {  # (name, N, K)
    "llama-3.2-1b": [("qkv", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)],
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
}
CONFIGS = [GemvConfig(bn, bk, w, s) for bn, bk, w, s in itertools.product((4, 8, 16), (256, 512), (4, 8), (2, 4))]


def time_calls(fn, weights, x, reps: int) -> float:
    """us per call: a CUDA graph of one call per weight, replayed `reps` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for w in weights:
            fn(x, w)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (reps * len(weights))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    p.add_argument("--models", nargs="+", default=list(SHAPES))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:  # the interpreter: one tiny shape, correctness only
        x, w = torch.randn(2, 64), torch.randn(40, 64)
        got = gemv(x, w, GemvConfig(8, 32, 1, 1), impl="triton")
        err = float((got - x @ w.T).abs().max())
        json.dump({"device": "cpu", "smoke": True, "max_abs_err": err}, open(args.out, "w"), indent=2)
        print(f"smoke: max |gemv - x @ w.T| = {err:.2e} -> {args.out}")
        return
    dev = torch.device("cuda")
    bw = copy_bandwidth(torch.cuda.get_device_name(0)) or 3.0e12
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "bandwidth": bw, "rows": []}
    t0 = time.perf_counter()
    for model in args.models:
        for name, n, k in SHAPES[model]:
            copies = max(4, min(16, int(768e6 // (n * k * 2))))
            weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            for m in args.rows:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = F.linear(x, weights[0])
                floor_us = 1e6 * n * k * 2 / bw
                cublas = time_calls(lambda a, b: F.linear(a, b), weights, x, 20)
                best = None
                for cfg in CONFIGS:
                    got = gemv(x, weights[0], cfg)
                    if not torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2):
                        raise SystemExit(f"{model} {name} M={m} {cfg}: gemv differs from F.linear")
                    us = time_calls(lambda a, b, c=cfg: gemv(a, b, c), weights, x, 20)
                    if best is None or us < best[0]:
                        best = (us, cfg)
                row = {"model": model, "layer": name, "n": n, "k": k, "m": m, "weight_mb": n * k * 2 / 1e6,
                       "floor_us": floor_us, "cublas_us": cublas, "cublas_bw_pct": 100 * floor_us / cublas,
                       "gemv_us": best[0], "gemv_bw_pct": 100 * floor_us / best[0],
                       "gemv_config": vars(best[1]), "gemv_over_cublas": best[0] / cublas}
                results["rows"].append(row)
                print(f"{model:13s} {name:8s} M={m} {row['weight_mb']:6.1f} MB  floor {floor_us:6.2f} us  cuBLAS "
                      f"{cublas:6.2f} ({row['cublas_bw_pct']:3.0f} %)  gemv {best[0]:6.2f} ({row['gemv_bw_pct']:3.0f} %) "
                      f"{vars(best[1])}", flush=True)
            del weights
            torch.cuda.empty_cache()
    results["wall_s"] = time.perf_counter() - t0
    json.dump(results, open(args.out, "w"), indent=2)
    print(f"wall {results['wall_s']:.0f} s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
