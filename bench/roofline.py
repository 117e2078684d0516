"""Decode steps against the bandwidth roofline, with the fused kernels off and on (GPU; --smoke on the CPU).

For each model (synthetic weights, bf16) and batch size (context 256 tokens): the decode
step replayed from a CUDA graph, timed over `--steps` steps, with `TorchBackend(fuse=False)`
and `fuse=True` in the same run; the device-to-device copy bandwidth measured with a large
copy; each step's bytes, FLOPs and roofline (`kit.roofline.roofline_row`) at that bandwidth;
the kernels one step launches (`ProfiledEngine.count_kernels`); and one eager step profiled
per layer kind against its roofline, with the top kernels by device time. Writes JSON to --out.

    python bench/roofline.py --out bench/results/roofline_h100.json          # ~150 s on an H100
    python bench/roofline.py --smoke --out /tmp/roofline_smoke.json          # seconds, on the CPU
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
from kit.loader import SYNTHETIC_PRESETS, LoadedModel, ModelLoader, random_weights
from kit.network import NetworkBuilder
from kit.profiler import ProfiledEngine
from kit.roofline import roofline_row

MODELS = ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"]
# SmolLM2-135M's shapes, for machines without the GGUF reader (the H100 box has no `gguf`)
SMOLLM2 = dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True)
TINY = dict(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
# the targets (H100, bf16, graphed decode, context 256)
TARGETS = [("llama-3.2-1b", 1, "step_ms", "<=", 1.03), ("llama-3.1-8b", 1, "steps_per_s", ">=", 150.0),
           ("smollm2-135m", 1, "step_ms", "<=", 0.6), ("qwen2.5-0.5b", 1, "step_ms", "<=", 0.45),
           ("llama-3.2-1b", 64, "tokens_per_s", ">=", 38000.0), ("llama-3.1-8b", 64, "tokens_per_s", ">=", 9000.0)]


def load(name: str, device: str, dtype: torch.dtype, smoke: bool) -> LoadedModel:
    if smoke:
        cfg = ModelConfig(**TINY)
        return LoadedModel(cfg, random_weights(cfg, dtype=dtype, device=device), name=f"tiny-{name}")
    if name in SYNTHETIC_PRESETS:
        return ModelLoader.synthetic(name, device=device, dtype=dtype)
    if name != "smollm2-135m":
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    cfg = ModelConfig(**SMOLLM2)
    return LoadedModel(cfg, random_weights(cfg, dtype=dtype, device=device), name="synthetic-smollm2-135m")


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), the best of a few repeats."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    del src, dst
    return 2 * nbytes / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(engine: Engine, kv, batch_size: int, context: int, steps: int, block_size: int, device: str) -> float:
    """ms per decode step: `batch_size` sequences, `context` cached tokens each, batches built up front."""
    per_seq = -(-(context + steps + 1) // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch_size)]
    batches = [ForwardBatch.build([SequenceInput([7], context + k, t) for t in tables], block_size, device=device)
               for k in range(steps)]
    for b in batches[:3]:
        engine.forward(b, kv)
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        engine.forward(b, kv)
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def run_model(name: str, args, device: str, dtype: torch.dtype, bandwidth: float, out: dict) -> None:
    loaded = load(name, device, dtype, args.smoke)
    net = NetworkBuilder(loaded).build()
    bs = 16
    max_seq = args.context + args.steps + bs
    bc = BuildConfig(max_batch_size=max(args.batch_sizes), max_seq_len=max_seq, max_input_len=max_seq // 2,
                     max_num_tokens=max(args.batch_sizes) * 4, block_size=bs)
    dname = str(dtype).replace("torch.", "")
    for fuse in (False, True):
        engine = Engine(net, TorchBackend(net, device=device, dtype=dtype, fuse=fuse), build_config=bc)
        kv = engine.allocate_kv_cache(max(args.batch_sizes) * -(-max_seq // bs) + 1, bs)
        t0 = time.perf_counter()
        graphs = device == "cuda"
        if graphs:
            engine.capture_cuda_graphs(kv, batch_sizes=args.batch_sizes)
        capture_s = time.perf_counter() - t0
        prof = ProfiledEngine(engine, block_size=bs)
        kernels = prof.count_kernels(batch_size=1, seq_len=args.context, phase="decode")
        for b in args.batch_sizes:
            ms = time_steps(engine, kv, b, args.context, args.steps, bs, device)
            row = {"model": name, "fuse": fuse, "batch_size": b, "context": args.context, "cuda_graphs": graphs,
                   "step_ms": ms, "steps_per_s": 1e3 / ms, "tokens_per_s": 1e3 * b / ms,
                   "kernels_per_step": int(kernels["kernels"].sum()) + kernels.attrs["outside_layers"],
                   "graph_capture_s": capture_s, "backend": engine.backend.describe(),
                   **roofline_row(loaded.config, b, args.context, ms, dtype=dname, bandwidth=bandwidth)}
            out["runs"].append(row)
            print(f"{name:<14} fuse={str(fuse):<5} b={b:<3} {ms:8.3f} ms  {row['tokens_per_s']:10.0f} tok/s  "
                  f"roofline {row['roofline_ms']:.3f} ms ({100 * row['roofline_fraction']:.0f}%)  "
                  f"{row['kernels_per_step']} kernels", flush=True)
        # one eager step, per layer kind, against the roofline; the top kernels of the fused step
        prof.profile(batch_size=1, seq_len=args.context, phase="decode", iters=args.profile_iters, warmup=2)
        table = prof.roofline(bandwidth=bandwidth)
        entry = {"model": name, "fuse": fuse, "batch_size": 1, "context": args.context,
                 "summary": prof.last_summary, "roofline_by_kind": table.to_dict(orient="records"),
                 "kernels_by_kind": kernels.groupby("kind", sort=False)["kernels"].sum().to_dict()}
        if fuse:
            entry["top_kernels"] = prof.top_kernels(n=10, batch_size=1, seq_len=args.context).to_dict(orient="records")
        out["profiles"].append(entry)
        del prof, engine, kv
        if device == "cuda":
            torch.cuda.empty_cache()
    del net, loaded
    if device == "cuda":
        torch.cuda.empty_cache()


def _unfused(runs: list[dict], r: dict) -> dict | None:
    """The unfused run of the same model and batch size as `r`."""
    return next((x for x in runs if x["model"] == r["model"] and not x["fuse"] and x["batch_size"] == r["batch_size"]),
                None)


def summarise(out: dict) -> None:
    runs = out["runs"]
    for r in runs:
        if r["fuse"]:
            base = _unfused(runs, r)
            r["speedup_vs_unfused"] = base["step_ms"] / r["step_ms"] if base else None
    out["targets"] = []
    for model, b, key, op, bound in TARGETS:
        row = next((r for r in runs if r["model"] == model and r["batch_size"] == b and r["fuse"]), None)
        if row is not None:
            value = row[key]
            met = value <= bound if op == "<=" else value >= bound
            out["targets"].append({"model": model, "batch_size": b, "metric": key, "bound": f"{op} {bound}",
                                   "value": value, "met": met})
    print(f"\ncopy bandwidth {out['copy_bandwidth_tb_s']:.2f} TB/s")
    print(f"{'model':<14}{'batch':>6}{'unfused ms':>12}{'fused ms':>10}{'speedup':>9}{'roofline ms':>13}"
          f"{'fraction':>10}{'kernels':>14}")
    for r in runs:
        base = _unfused(runs, r)
        if r["fuse"] and base is not None:
            print(f"{r['model']:<14}{r['batch_size']:>6}{base['step_ms']:>12.3f}{r['step_ms']:>10.3f}"
                  f"{r['speedup_vs_unfused']:>9.2f}{r['roofline_ms']:>13.3f}{r['roofline_fraction']:>10.2f}"
                  f"{base['kernels_per_step']:>7}->{r['kernels_per_step']:<6}")
    for t in out["targets"]:
        print(f"target {t['model']} b={t['batch_size']} {t['metric']} {t['bound']}: {t['value']:.3f} "
              f"{'met' if t['met'] else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--profile-iters", type=int, default=5)
    p.add_argument("--copy-mib", type=int, default=2048, help="size of the bandwidth-measuring copy")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: the same code path in seconds")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.batch_sizes, args.context, args.steps, args.profile_iters, args.copy_mib = [1, 4], 16, 4, 1, 16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/roofline.py needs a CUDA GPU (or --smoke for the CPU path)")
        device, dtype = "cuda", torch.bfloat16
    t_start = time.perf_counter()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    bandwidth = copy_bandwidth(device, args.copy_mib * 2**20)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton_version, "dtype": str(dtype).replace("torch.", ""), "context": args.context,
           "steps": args.steps, "copy_bandwidth_tb_s": bandwidth / 1e12, "smoke": args.smoke,
           "runs": [], "profiles": []}
    out["errors"] = []
    for name in args.models:
        try:
            run_model(name, args, device, dtype, bandwidth, out)
        except Exception as e:  # NOTE: one model failing must not lose the others' numbers from a scarce GPU run
            out["errors"].append({"model": name, "error": f"{type(e).__name__}: {e}"})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            if args.smoke:
                raise
            if device == "cuda":
                torch.cuda.empty_cache()
    summarise(out)
    out["wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)
    print(f"wrote {args.out} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
