"""Offline serving benchmark: throughput and latency of `LLM` on a synthetic workload.

Each request has `input_len` random prompt tokens and generates exactly `output_len`
tokens (`ignore_eos`), greedily. At most `concurrency` requests are in flight; with a
finite `request_rate` they arrive as a Poisson process (open loop), else a new one is
submitted as soon as one finishes (closed loop). Reported:

* `output_tokens_per_s`, `requests_per_s` over the whole run;
* TTFT (time to first token: submit -> first token) and TPOT (time per output token
  after the first), mean / p50 / p99, in milliseconds;
* peak KV-cache use (blocks and percent).

`--baseline hf` runs Hugging Face `generate` on the same prompts in the same process,
`concurrency` prompts per static batch, and reports the ratio. Results are JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from kit.progress import tqdm

from kit.builder import BuildConfig
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.sampling_params import SamplingParams

__all__ = ["run_benchmark", "hf_baseline", "make_prompts", "add_arguments", "check_arguments", "main",
           "write_results"]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0 (inf: no pacing), got {value!r}")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags that cannot describe a run (ValueError naming the flag, the value, what is allowed)."""
    _check_int("--input-len", args.input_len)
    _check_int("--output-len", args.output_len)
    if args.num_requests is not None:
        _check_int("--num-requests", args.num_requests)
    if not args.concurrency:
        raise ValueError("--concurrency must list at least one integer >= 1, got none")
    for c in args.concurrency:
        _check_int("--concurrency", c)
    _check_rate("--request-rate", args.request_rate)


def make_prompts(vocab_size: int, input_len: int, num_requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(1000, vocab_size // 4)  # stay clear of special tokens at the start of the vocabulary
    return [[rng.randrange(lo, vocab_size) for _ in range(input_len)] for _ in range(num_requests)]


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan")}
    s = sorted(xs)
    return {"mean": statistics.fmean(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(0.99 * len(s)))]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(llm: Any, prompts: list[list[int]], output_len: int, concurrency: int,
                  request_rate: float = float("inf"), seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Serve `prompts` through `llm` under the given concurrency; return the metrics dict."""
    _check_int("concurrency", concurrency)
    _check_int("output_len", output_len)
    _check_rate("request_rate", request_rate)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt, got none")
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    rng = random.Random(seed)
    llm.executor.reset_stats()
    pending = list(range(len(prompts)))
    inflight: dict[int, Any] = {}
    submit_t: dict[int, float] = {}
    outs: dict[int, Any] = {}
    next_arrival = time.perf_counter()
    t0 = time.perf_counter()
    bar = tqdm(total=len(prompts), desc=f"bench c={concurrency}", disable=not progress, leave=False)
    while pending or inflight:
        now = time.perf_counter()
        while pending and len(inflight) < concurrency and now >= next_arrival:
            i = pending.pop(0)
            submit_t[i] = time.monotonic()
            inflight[i] = llm.generate_async(prompts[i], sp)
            if request_rate != float("inf"):
                next_arrival = now + rng.expovariate(request_rate)
        for i, r in list(inflight.items()):
            if r.done:
                outs[i] = r.result()
                del inflight[i]
                bar.update(1)
        if inflight:
            next(iter(inflight.values())).wait(0.002)
    wall = time.perf_counter() - t0
    bar.close()
    ttft, tpot, n_out = [], [], 0
    for i, o in outs.items():
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        n_out += n
        ttft.append(1e3 * (m["first_token_time"] - submit_t[i]))
        if n > 1:
            tpot.append(1e3 * (m["finished_time"] - m["first_token_time"]) / (n - 1))
    stats = llm.executor.stats()
    total_blocks = llm.kv_cache_manager.num_blocks
    peak = int(stats["kv_blocks_used"].max()) if len(stats) else 0
    return {
        "num_requests": len(prompts), "input_len": len(prompts[0]), "output_len": output_len,
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "wall_s": wall, "output_tokens": n_out, "output_tokens_per_s": n_out / wall,
        "requests_per_s": len(prompts) / wall, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
        "iterations": len(stats), "mean_batch_size": float(stats["batch_size"].mean()) if len(stats) else 0.0,
        "peak_kv_blocks": peak, "kv_blocks_total": total_blocks, "peak_kv_pct": 100.0 * peak / total_blocks,
    }


def hf_baseline(loaded: Any, prompts: list[list[int]], output_len: int, concurrency: int,
                progress: bool = True) -> dict[str, Any]:
    """Hugging Face `generate` (greedy, KV cache, static batches of `concurrency`) on the same prompts."""
    model = loaded.to_transformers()
    device = loaded.device
    n_out = 0
    first = torch.tensor(prompts[:1], device=device)
    model.generate(first, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), concurrency), desc=f"hf generate c={concurrency}",
                      disable=not progress, leave=False):
        ids = torch.tensor(prompts[start:start + concurrency], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    _sync(device)
    wall = time.perf_counter() - t0
    del model
    return {"wall_s": wall, "output_tokens": n_out, "output_tokens_per_s": n_out / wall,
            "requests_per_s": len(prompts) / wall}


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="a model name/path, or synthetic:<preset>")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per concurrency level (default: max(8, 2 x concurrency))")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--quantization", default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (kit/parallel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = None if args.dtype == "auto" else args.dtype
    if args.model.startswith("synthetic:"):
        loaded = ModelLoader.synthetic(args.model.split(":", 1)[1], seed=args.seed, device=device, dtype=dtype)
    else:
        loaded = ModelLoader(args.model, device=device, dtype=dtype).load()
    max_c = max(args.concurrency)
    bc = BuildConfig(max_batch_size=max_c, max_input_len=args.input_len,
                     max_seq_len=args.input_len + args.output_len,
                     max_num_tokens=max(2048, max_c), use_cuda_graphs=not args.no_cuda_graphs)
    def count(c: int) -> int:
        return args.num_requests or max(8, 2 * c)

    prompts = make_prompts(loaded.config.vocab_size, args.input_len, max(count(c) for c in args.concurrency), args.seed)
    results: dict[str, Any] = {"model": args.model, "environment": environment(device), "build_config": bc.to_dict(),
                               "quantization": args.quantization, "runs": []}
    with LLM(loaded, device=device, build_config=bc, quantization=args.quantization,
             kv_cache_config=None, tensor_parallel_size=args.tp) as llm:
        results["startup_s"] = llm.startup_seconds
        run_benchmark(llm, prompts[:max(2, min(4, len(prompts)))], min(8, args.output_len), 2, progress=False)  # warm-up
        for c in args.concurrency:
            run = {"kit": run_benchmark(llm, prompts[:count(c)], args.output_len, c, args.request_rate, args.seed)}
            results["runs"].append(run)
    if args.baseline == "hf":
        for run in results["runs"]:
            c = run["kit"]["concurrency"]
            run["hf"] = hf_baseline(loaded, prompts[:count(c)], args.output_len, c)
            run["speedup_vs_hf"] = run["kit"]["output_tokens_per_s"] / run["hf"]["output_tokens_per_s"]
    print(f"{'concurrency':>11} {'kit tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for run in results["runs"]:
        k = run["kit"]
        hf = run.get("hf", {}).get("output_tokens_per_s", float("nan"))
        print(f"{k['concurrency']:>11} {k['output_tokens_per_s']:>10.1f} {hf:>9.1f} "
              f"{run.get('speedup_vs_hf', float('nan')):>6.2f} {k['ttft_ms']['p50']:>12.1f} {k['tpot_ms']['p50']:>12.2f}")
    write_results(results, args.out)
    return 0


def write_results(results: dict[str, Any], out: str | None) -> None:
    """Write a benchmark's JSON to `out` (if given): the layout `kit bench` and `kit bench-serve` share."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
