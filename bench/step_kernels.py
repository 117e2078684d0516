"""The kernels of a whole engine step as it runs on the GPU: decode and mixed steps, CUDA graphs replayed.

Per-layer hooks cannot see inside a CUDA graph; `kit.profiler.step_kernels` traces the replay
itself. For each model, the engine captures its graphs (decode batch sizes and mixed-step token
buckets, as `LLM` does) and this script traces:

* decode steps at each `--batch-sizes` (context `--context`, growing one token a step);
* mixed steps `P:D`: one prompt chunk of P tokens beside D sequences decoding one token each
  (the step a serving loop runs while requests arrive), replayed from its mixed-step graph.

Each row: step time (back to back), kernels per step, summed kernel time, the GPU's idle time
between kernels, the time per kernel family (GEMM, attention, norm, rope/KV write, activation,
elementwise and other), bytes of weights and the roofline step time (weights / `--bandwidth`),
and the 15 costliest kernels. JSON to --out.

    python bench/step_kernels.py --models synthetic:llama-3.2-1b synthetic:llama-3.1-8b --out step_kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import time

import torch

from kit.backends.torch_backend import TorchBackend
from kit.batch import ForwardBatch, SequenceInput
from kit.build_config import BuildConfig
from kit.engine import Engine
from kit.loader import ModelLoader
from kit.network import NetworkBuilder
from kit.profiler import step_kernels

BLOCK = 16
# kernel families by name (first match wins): cuBLAS / CUTLASS GEMMs, the kit's Triton kernels, the rest
FAMILIES = (
    ("gemm", r"gemm|gemv|cutlass|nvjet|sm90_|sm80_|cublas|matmul|splitk|_w4a16|_w8a16|fp8_linear"),
    ("attention", r"attention|attn|_decode_kernel|_prefill_kernel|flash|reduce_splits"),
    ("norm", r"rms_norm"),
    ("rope / KV write", r"rope"),
    ("activation", r"silu"),
    ("collective", r"nccl|all_reduce|allreduce|symm"),
    ("elementwise / copy", r"elementwise|vectorized|copy|fill|index|gather|scatter|memcpy|memset|cat"),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def load(name: str):
    if name.startswith("synthetic:"):
        return ModelLoader.synthetic(name.split(":", 1)[1], device="cuda", dtype=torch.bfloat16)
    return ModelLoader(name, device="cuda", dtype=torch.bfloat16).load()


def row_of(df, what: str, weight_bytes: int, bandwidth: float) -> dict:
    a = df.attrs
    fam: dict[str, float] = {}
    for r in df.itertuples():
        fam[family(r.name)] = fam.get(family(r.name), 0.0) + r.time_us
    roof = 1e3 * weight_bytes / bandwidth
    return {"step": what, "step_ms": a["step_ms"], "kernels_per_step": a["kernels_per_step"],
            "kernel_ms": a["kernel_ms"], "gpu_idle_ms": a["idle_ms"], "weights_roofline_ms": roof,
            "roofline_fraction": roof / a["step_ms"],
            "us_per_kernel": 1e3 * a["step_ms"] / max(a["kernels_per_step"], 1.0),
            "family_us": {k: round(v, 1) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": r.name[:100], "family": family(r.name), "calls": r.calls,
                             "time_us": round(r.time_us, 1)} for r in df.head(15).itertuples()]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["synthetic:llama-3.2-1b"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--mixed", nargs="*", default=["128:63"], help="P:D = a P-token prompt chunk beside D decodes")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--bandwidth", type=float, default=4.26e12, help="bytes/s for the roofline (H200 copy: 4.26e12)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/step_kernels.py traces CUDA kernels: it needs a GPU")
    mixed = []
    for m in args.mixed:
        try:
            pt, d = (int(x) for x in m.split(":"))
        except ValueError:
            raise SystemExit(f"--mixed takes P:D (prompt tokens : decode sequences), got {m!r}") from None
        mixed.append((pt, d))
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "context": args.context,
           "bandwidth": args.bandwidth, "runs": []}
    for name in args.models:
        t0 = time.perf_counter()
        net = NetworkBuilder(load(name)).build()
        max_b = max(args.batch_sizes + [d + 1 for _, d in mixed])
        max_tokens = max([256] + [pt + d for pt, d in mixed])
        bc = BuildConfig(max_batch_size=max_b, max_seq_len=2 * (args.context + args.steps) + 256,
                         max_num_tokens=max_tokens, dtype="bfloat16",
                         cuda_graph_batch_sizes=tuple(sorted(set(args.batch_sizes))))
        engine = Engine(net, TorchBackend(net, device="cuda", dtype=torch.bfloat16), build_config=bc)
        per_seq = -(-(2 * (args.context + args.steps) + 256) // BLOCK)
        kv = engine.allocate_kv_cache(max_b * per_seq + 1, BLOCK)
        engine.capture_cuda_graphs(kv)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(max_b)]
        weight_bytes = net.weight_bytes
        print(f"{name}: {weight_bytes / 1e9:.2f} GB of weights; {engine.backend.describe()}", flush=True)
        for b in args.batch_sizes:
            batches = [ForwardBatch.build([SequenceInput([7], args.context + k, tables[i]) for i in range(b)], BLOCK,
                                          device="cuda") for k in range(args.steps)]
            steps = itertools.cycle(batches)
            df = step_kernels(lambda: engine.forward(next(steps), kv), iters=args.steps)
            row = {"model": name, "batch_size": b, **row_of(df, f"decode b{b}", weight_bytes, args.bandwidth)}
            out["runs"].append(row)
            print(f"  decode b{b}: {row['step_ms']:.3f} ms, {row['kernels_per_step']:.0f} kernels "
                  f"({row['us_per_kernel']:.2f} us each), idle {row['gpu_idle_ms']:.3f} ms, roofline "
                  f"{row['weights_roofline_ms']:.3f} ms; {row['family_us']}", flush=True)
        for pt, d in mixed:
            seqs = [SequenceInput(list(range(11, 11 + pt)), 0, tables[0])]
            seqs += [SequenceInput([7], args.context, tables[1 + i]) for i in range(d)]
            batch = ForwardBatch.build(seqs, BLOCK, device="cuda")
            graphed = engine.backend.mixed_graphs is not None and engine.backend.mixed_graphs.can_run(batch, kv)
            df = step_kernels(lambda: engine.forward(batch, kv), iters=args.steps)
            row = {"model": name, "prompt_tokens": pt, "decode_seqs": d, "graphed": graphed,
                   **row_of(df, f"mixed {pt}+{d}", weight_bytes, args.bandwidth)}
            out["runs"].append(row)
            print(f"  mixed {pt}+{d} ({'graph' if graphed else 'eager'}): {row['step_ms']:.3f} ms, "
                  f"{row['kernels_per_step']:.0f} kernels, idle {row['gpu_idle_ms']:.3f} ms; {row['family_us']}",
                  flush=True)
        for r in out["runs"][-len(args.batch_sizes) - len(mixed):]:
            for k in r["top_kernels"][:8]:
                print(f"    {r['step']:>14} {k['time_us']:8.1f} us x{k['calls']:<5g} {k['family']:>12}  {k['name']}")
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
        del engine, kv, net
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
