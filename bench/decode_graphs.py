"""Decode steps/s of the PyTorch engine with and without the build's CUDA graphs (GPU only).

For each model and batch size: a batch of `batch` sequences, each with `context` tokens in
the cache, decodes `steps` tokens; timed with CUDA events after a warm-up. Eager runs the
same Python layer loop that the graph recorded. Writes JSON to --out.

    python bench/decode_graphs.py --models smollm2-135m synthetic:llama-3.2-1b --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kit.backends.torch_backend import TorchBackend
from kit.builder import BuildConfig
from kit.batch import ForwardBatch, SequenceInput
from kit.engine import Engine
from kit.loader import ModelLoader
from kit.network import NetworkBuilder


def load(name: str, device: str):
    if name.startswith("synthetic:"):
        return ModelLoader.synthetic(name.split(":", 1)[1], device=device, dtype=torch.bfloat16)
    return ModelLoader(name, device=device, dtype=torch.bfloat16).load()


def time_decode(engine, kv, batch_size: int, context: int, steps: int, block_size: int) -> float:
    per_seq = -(-(context + steps) // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]

    def step_batch(k: int) -> ForwardBatch:
        return ForwardBatch.build([SequenceInput([7], context + k, t) for t in tables], block_size, device="cuda")

    batches = [step_batch(k) for k in range(steps)]  # built up front: the timing is the engine's
    for b in batches[:3]:
        engine.forward(b, kv)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for b in batches:
        engine.forward(b, kv)
    end.record()
    torch.cuda.synchronize()
    return steps / (start.elapsed_time(end) / 1e3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "synthetic:llama-3.2-1b"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--fuse", nargs="+", choices=["on", "off"], default=["on"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context": args.context,
               "steps": args.steps, "runs": []}
    for name in args.models:
        loaded = load(name, "cuda")
        network = NetworkBuilder(loaded).build()
        bs = 16
        max_seq = args.context + args.steps + bs
        for fuse, graphs in [(f == "on", g) for f in args.fuse for g in (False, True)]:
            bc = BuildConfig(max_batch_size=max(args.batch_sizes), max_seq_len=max_seq, max_input_len=max_seq // 2,
                             use_cuda_graphs=graphs, block_size=bs)
            engine = Engine(network, TorchBackend(network, device="cuda", dtype=torch.bfloat16, fuse=fuse),
                            build_config=bc)
            t0 = time.perf_counter()
            kv = engine.allocate_kv_cache(max(args.batch_sizes) * -(-max_seq // bs) + 1, bs)
            engine.capture_cuda_graphs(kv)
            capture_s = time.perf_counter() - t0
            for b in args.batch_sizes:
                sps = time_decode(engine, kv, b, args.context, args.steps, bs)
                row = {"model": name, "fuse": fuse, "cuda_graphs": graphs, "batch_size": b, "steps_per_s": sps,
                       "tokens_per_s": sps * b, "ms_per_step": 1e3 / sps, "graph_capture_s": capture_s if graphs else 0.0,
                       "backend": engine.backend.describe()}
                results["runs"].append(row)
                print(json.dumps(row))
            del engine, kv
            torch.cuda.empty_cache()
        del loaded, network
        torch.cuda.empty_cache()
    for r in results["runs"]:
        if r["cuda_graphs"]:
            eager = next(x for x in results["runs"] if x["model"] == r["model"] and not x["cuda_graphs"]
                         and x["batch_size"] == r["batch_size"] and x["fuse"] == r["fuse"])
            r["speedup_vs_eager"] = r["steps_per_s"] / eager["steps_per_s"]
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"{'model':<26}{'fuse':>6}{'batch':>6}{'eager ms':>10}{'graph ms':>10}{'speedup':>9}")
    for r in results["runs"]:
        if r["cuda_graphs"]:
            print(f"{r['model']:<26}{str(r['fuse']):>6}{r['batch_size']:>6}{1e3 / (r['steps_per_s'] / r['speedup_vs_eager']):>10.2f}"
                  f"{r['ms_per_step']:>10.2f}{r['speedup_vs_eager']:>9.2f}")


if __name__ == "__main__":
    main()
