"""Offline serving benchmark: throughput and latency of `LLM` on a synthetic workload.

Each request has `input_len` random prompt tokens and generates exactly `output_len`
tokens (`ignore_eos`), greedily. `--input-len 128 1024 --output-len 128 128` runs each
(input, output) pair as its own workload (a long-prompt case beside the short one). At
most `concurrency` requests are in flight; with a finite `request_rate` they arrive as a
seeded Poisson process (open loop), else a new one is submitted as soon as one finishes
(closed loop). In a closed loop the first wave's arrivals are spread over `ramp_s` seconds
(`kit bench`: one output length, `output_len` decode steps), so that requests finish and are
replaced one by one, as in a server, instead of in lockstep waves. Before each timed run,
`kit bench` serves one untimed wave of the same shape (other prompts: no prefix-cache hits),
so no kernel is compiled or tuned inside the timed run. Reported:

* `output_tokens_per_s`, `requests_per_s` over the whole run;
* `steady`: output tokens per second while all `concurrency` requests are in flight (closed
  loop: from the last arrival of the first wave to the last submission; tokens of a request
  counted as spread evenly between its first token and its end), without the ramp and drain;
* TTFT (time to first token: submit -> first token) and TPOT (time per output token
  after the first), mean / p50 / p99, in milliseconds;
* goodput: requests (and their tokens) per second that met the TTFT and TPOT SLOs
  (`--slo-ttft-ms`, `--slo-tpot-ms`; every request counts where no SLO is given);
* peak KV-cache use (blocks and percent), and where the loop's time went (mean host
  scheduling, input preparation, output processing, device forward and idle ms per
  iteration, from `Executor.stats()`; `loop_by_step`: medians for decode steps and for steps
  with prompt tokens, whose host lanes summed against the device's time say which is host-bound);
* `decode_only`: the same engine's decode step alone (a full batch of `concurrency`
  sequences at the workload's mean context, no scheduler, no host work), so that
  `serving_over_decode_only` says how much of the GPU the serving loop keeps busy.

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

from kit.batch import ForwardBatch, SequenceInput
from kit.builder import BuildConfig
from kit.iteration_stats import loop_split
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.profiler import step_kernels
from kit.roofline import describe_row, step_roofline
from kit.sampling_params import SamplingParams

__all__ = ["run_benchmark", "hf_baseline", "decode_only", "make_prompts", "add_arguments", "check_arguments", "main",
           "write_results", "workloads"]


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_rate(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0 (inf: no pacing), got {value!r}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def workloads(input_len: Any, output_len: Any) -> list[tuple[int, int]]:
    """(input, output) pairs: the two lists zipped; a single value goes with every value of the other."""
    ins, outs = _as_list(input_len), _as_list(output_len)
    if len(ins) != len(outs) and 1 not in (len(ins), len(outs)):
        raise ValueError(f"--input-len and --output-len must list as many values, or one of them a single value; "
                         f"got {len(ins)} and {len(outs)}")
    n = max(len(ins), len(outs))
    return [(ins[i if len(ins) > 1 else 0], outs[i if len(outs) > 1 else 0]) for i in range(n)]


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse flags that cannot describe a run (ValueError naming the flag, the value, what is allowed)."""
    for v in _as_list(args.input_len):
        _check_int("--input-len", v)
    for v in _as_list(args.output_len):
        _check_int("--output-len", v)
    workloads(args.input_len, args.output_len)
    for flag in ("slo_ttft_ms", "slo_tpot_ms"):
        if getattr(args, flag, None) is not None:
            _check_rate("--" + flag.replace("_", "-"), getattr(args, flag))
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


def _tokens_between(spans: list[tuple[float, float, int]], a: float, b: float) -> float:
    """Output tokens of requests (first token time, finish time, tokens) made within [a, b]: the first token
    at its time, the others spread evenly over (first token, finish]."""
    total = 0.0
    for first, end, n in spans:
        total += float(a <= first <= b)
        if n > 1 and end > first:
            total += (n - 1) * max(0.0, min(end, b) - max(first, a)) / (end - first)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(llm: Any, prompts: list[list[int]], output_len: int, concurrency: int,
                  request_rate: float = float("inf"), seed: int = 0, progress: bool = True,
                  slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
                  ramp_s: float = 0.0) -> dict[str, Any]:
    """Serve `prompts` through `llm` under the given concurrency; return the metrics dict.

    `ramp_s`: the first `concurrency` arrivals are spread evenly over this many seconds (0: all at once)."""
    _check_int("concurrency", concurrency)
    _check_int("output_len", output_len)
    _check_rate("request_rate", request_rate)
    if isinstance(ramp_s, bool) or not isinstance(ramp_s, (int, float)) or not 0 <= ramp_s < math.inf:
        raise ValueError(f"ramp_s must be a number of seconds >= 0, got {ramp_s!r}")
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
    t0_mono = time.monotonic()
    bar = tqdm(total=len(prompts), desc=f"bench c={concurrency}", disable=not progress, leave=False)
    ramp_end = last_submit = t0_mono  # monotonic: when the first wave is complete, and the last submission
    first_wave = min(concurrency, len(prompts))
    while pending or inflight:
        now = time.perf_counter()
        while (pending and len(inflight) < concurrency and now >= next_arrival
               and (len(submit_t) >= first_wave or now >= t0 + len(submit_t) * ramp_s / first_wave)):
            i = pending.pop(0)
            submit_t[i] = last_submit = time.monotonic()
            if len(submit_t) == first_wave:
                ramp_end = last_submit
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
        elif pending:  # waiting for the next arrival
            time.sleep(0.0005)
    wall = time.perf_counter() - t0
    bar.close()
    ttft, tpot, n_out, good, good_tokens = [], [], 0, 0, 0
    spans: list[tuple[float, float, int]] = []
    for i, o in outs.items():
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        n_out += n
        spans.append((m["first_token_time"], m["finished_time"], n))
        ttft.append(1e3 * (m["first_token_time"] - submit_t[i]))
        if n > 1:
            tpot.append(1e3 * (m["finished_time"] - m["first_token_time"]) / (n - 1))
        if ((slo_ttft_ms is None or ttft[-1] <= slo_ttft_ms)
                and (slo_tpot_ms is None or n <= 1 or tpot[-1] <= slo_tpot_ms)):
            good, good_tokens = good + 1, good_tokens + n
    stats = llm.executor.stats()
    total_blocks = llm.kv_cache_manager.num_blocks
    steady = None  # closed loop only: every request slot busy between the first wave's end and the last submission
    if request_rate == float("inf") and last_submit > ramp_end:
        steady = {"start_s": ramp_end - t0_mono, "end_s": last_submit - t0_mono,
                  "output_tokens_per_s": _tokens_between(spans, ramp_end, last_submit) / (last_submit - ramp_end)}
    peak = int(stats["kv_blocks_used"].max()) if len(stats) else 0
    return {
        "num_requests": len(prompts), "input_len": len(prompts[0]), "output_len": output_len,
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "ramp_s": ramp_s, "wall_s": wall, "output_tokens": n_out, "output_tokens_per_s": n_out / wall, "steady": steady,
        "requests_per_s": len(prompts) / wall, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
        "iterations": len(stats), "mean_batch_size": float(stats["batch_size"].mean()) if len(stats) else 0.0,
        "peak_kv_blocks": peak, "kv_blocks_total": total_blocks, "peak_kv_pct": 100.0 * peak / total_blocks,
        "goodput": {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms, "num_requests": good,
                    "requests_per_s": good / wall, "output_tokens_per_s": good_tokens / wall},
        "overlap": bool(llm.executor.overlap),
        "loop_ms": {col: float(stats[col].mean()) if len(stats) else 0.0 for col in _LOOP_COLUMNS},
        "loop_by_step": loop_split(stats),  # medians per kind of step: host lanes against the device
    }


_LOOP_COLUMNS = ("schedule_ms", "prepare_ms", "forward_ms", "sampling_ms", "output_ms", "device_idle_ms", "duration_ms")


def decode_only(llm: Any, batch_size: int, context_len: int, steps: int = 32, warmup: int = 4,
                roofline: bool = False) -> dict[str, Any]:
    """The engine's decode step alone: `batch_size` sequences at `context_len`, forward + greedy pick,
    `steps` times back to back (CUDA graphs when the engine has them), no scheduler and no host work.

    Reads the serving cache's first blocks and writes only into its scratch block, so it never
    disturbs cached prefixes; call it while the executor is idle.

    With `roofline`, also `roofline`: the step against its bandwidth floor (`kit.roofline.roofline_row`:
    bytes per step, roofline ms, achieved fraction, at the GPU's measured copy bandwidth when the kit
    knows it, else bytes only; with tensor parallelism the whole model's bytes over tp GPUs'
    bandwidth), and on CUDA `kernels`: the step traced as it runs, graph replay included
    (`kit.profiler.step_kernels`; rank 0's kernels under tensor parallelism): kernels per step, GPU
    idle time and the top 5 kernels.
    """
    _check_int("batch_size", batch_size)
    _check_int("context_len", context_len)
    engine, kv = llm.engine, llm.executor.kv_cache
    bs = kv.block_size
    table = list(range(min(kv.num_blocks, -(-context_len // bs))))
    context_len = min(context_len, len(table) * bs)
    vocab = engine.config.vocab_size
    seqs = [SequenceInput([(vocab // 2 + i) % vocab], context_len - 1, table) for i in range(batch_size)]
    batch = ForwardBatch.build(seqs, bs, device=engine.device)
    batch.slot_mapping = torch.full_like(batch.slot_mapping, kv.scratch_block * bs)  # writes: scratch only
    for _ in range(warmup):
        engine.forward(batch, kv).argmax(-1)
    _sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.forward(batch, kv).argmax(-1)
    _sync(engine.device)
    step_s = (time.perf_counter() - t0) / steps
    out = {"batch_size": batch_size, "context_len": context_len, "steps": steps, "step_ms": 1e3 * step_s,
           "output_tokens_per_s": batch_size / step_s}
    if roofline:
        out.update(step_roofline(engine, batch_size, context_len, 1e3 * step_s))
        if engine.device.type == "cuda":
            df = step_kernels(lambda: engine.forward(batch, kv).argmax(-1), iters=8, device=engine.device)
            out["kernels"] = {"kernels_per_step": df.attrs["kernels_per_step"], "kernel_ms": df.attrs["kernel_ms"],
                              "idle_ms": df.attrs["idle_ms"],
                              "top": [{"name": r.name[:80], "calls": r.calls, "time_us": round(r.time_us, 1),
                                       "share_pct": round(r.share_pct, 1)} for r in df.head(5).itertuples()]}
    return out


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
    p.add_argument("--input-len", type=int, nargs="+", default=[128],
                   help="prompt tokens; several values: one workload each, paired with --output-len")
    p.add_argument("--output-len", type=int, nargs="+", default=[64])
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per concurrency level (default: max(8, 4 x concurrency): waves do not dominate)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (open loop, seeded); inf: closed loop")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request's TTFT must be at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: a request's TPOT must be at most this")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="overlapped scheduling (default: on on CUDA, off on the CPU)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="serve one untimed wave of each run's shape first (no compilation inside a timed run)")
    p.add_argument("--stagger", action=argparse.BooleanOptionalAction, default=True,
                   help="closed loop: spread the first wave's arrivals over one output length (output_len decode "
                        "steps of the decode-only run, else of the warm-up's TPOT)")
    p.add_argument("--decode-only", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the engine's bare decode step at each concurrency (the serving / decode-only column)")
    p.add_argument("--baseline", choices=["none", "hf"], default="none")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-mixed-graphs", action="store_true",
                   help="graph pure decode steps only; steps with prompt tokens run eagerly")
    p.add_argument("--quantization", default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (kit/parallel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")


def _table(runs: list[dict[str, Any]]) -> None:
    print(f"{'in/out':>9} {'conc':>5} {'kit tok/s':>10} {'decode tok/s':>12} {'serve/dec':>9} {'steady/dec':>10} "
          f"{'hf tok/s':>9} {'ratio':>6} {'TTFT p50':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'goodput r/s':>11}")
    for run in runs:
        k = run["kit"]
        hf = run.get("hf", {}).get("output_tokens_per_s", float("nan"))
        dec = run.get("decode_only", {}).get("output_tokens_per_s", float("nan"))
        steady = run.get("steady_over_decode_only")
        print(f"{k['input_len']:>4}/{k['output_len']:<4} {k['concurrency']:>5} {k['output_tokens_per_s']:>10.1f} "
              f"{dec:>12.1f} {run.get('serving_over_decode_only', float('nan')):>9.2f} "
              f"{steady if steady is not None else float('nan'):>10.2f} {hf:>9.1f} "
              f"{run.get('speedup_vs_hf', float('nan')):>6.2f} {k['ttft_ms']['p50']:>9.1f} {k['tpot_ms']['p50']:>9.2f} "
              f"{k['tpot_ms']['p99']:>9.2f} {k['goodput']['requests_per_s']:>11.2f}")
    for run in runs:  # the decode step against its roofline, and (CUDA) the kernels it ran
        dec, k = run.get("decode_only", {}), run["kit"]
        roof = dec.get("roofline")
        if not roof:
            continue
        head = f"{k['input_len']:>4}/{k['output_len']:<4} c={k['concurrency']} decode step (context {dec['context_len']}):"
        if "error" in roof:
            print(f"{head} no roofline: {roof['error']}")
        elif "roofline_ms" in roof:
            print(f"{head} {describe_row(roof)} at {roof['bandwidth_tb_s']:.2f} TB/s")
        else:
            print(f"{head} {roof['bytes_per_step'] / 1e9:.3f} GB/step, measured {dec['step_ms']:.3f} ms ({roof['note']})")
        ks = dec.get("kernels")
        if ks:
            top = ", ".join(f"{t['name'][:40]} {t['time_us']:.0f} us x{t['calls']:g}" for t in ks["top"][:3])
            print(f"    {ks['kernels_per_step']:.0f} kernels, GPU idle {ks['idle_ms']:.3f} ms; top: {top}")


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = None if args.dtype == "auto" else args.dtype
    if args.model.startswith("synthetic:"):
        loaded = ModelLoader.synthetic(args.model.split(":", 1)[1], seed=args.seed, device=device, dtype=dtype)
    else:
        loaded = ModelLoader(args.model, device=device, dtype=dtype).load()
    pairs = workloads(args.input_len, args.output_len)
    max_c = max(args.concurrency)
    bc = BuildConfig(max_batch_size=max_c, max_input_len=max(i for i, _ in pairs),
                     max_seq_len=max(i + o for i, o in pairs),
                     max_num_tokens=max(2048, max_c), use_cuda_graphs=not args.no_cuda_graphs,
                     cuda_graph_mixed_steps=not args.no_mixed_graphs)

    def count(c: int) -> int:
        return args.num_requests or max(8, 4 * c)

    # NOTE: fresh prompts for every run (and its warm-up): none of them hits the prefix cache of an earlier one
    seeds = iter(range(args.seed, args.seed + 1_000_000))
    prompts: dict[tuple[int, int], list[list[int]]] = {}  # (input_len, concurrency) -> the timed run's prompts
    results: dict[str, Any] = {"model": args.model, "environment": environment(device), "build_config": bc.to_dict(),
                               "quantization": args.quantization, "runs": []}
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}
    with LLM(loaded, device=device, build_config=bc, quantization=args.quantization,
             kv_cache_config=None, tensor_parallel_size=args.tp, overlap=args.overlap) as llm:
        results["startup_s"] = llm.startup_seconds
        results["overlap"] = llm.executor.overlap
        vocab = loaded.config.vocab_size
        for in_len, out_len in pairs:
            for c in args.concurrency:
                run: dict[str, Any] = {}
                ramp = 0.0
                if args.decode_only:  # measured first: its step sets the stagger
                    run["decode_only"] = decode_only(llm, c, in_len + out_len // 2, roofline=True)
                    ramp = out_len * run["decode_only"]["step_ms"] / 1e3
                if args.warmup:  # one untimed wave of this shape
                    warm = run_benchmark(llm, make_prompts(vocab, in_len, c, next(seeds)), out_len, c,
                                         args.request_rate, args.seed, progress=False, ramp_s=ramp)
                    if not args.decode_only and warm["tpot_ms"]["p50"] == warm["tpot_ms"]["p50"]:  # not NaN
                        ramp = out_len * warm["tpot_ms"]["p50"] / 1e3
                prompts[(in_len, c)] = make_prompts(vocab, in_len, count(c), next(seeds))
                run["kit"] = run_benchmark(llm, prompts[(in_len, c)], out_len, c, args.request_rate, args.seed,
                                           ramp_s=ramp if args.stagger and args.request_rate == float("inf") else 0.0,
                                           **slo)
                if args.decode_only:
                    dec = run["decode_only"]["output_tokens_per_s"]
                    run["serving_over_decode_only"] = run["kit"]["output_tokens_per_s"] / dec
                    steady = run["kit"]["steady"]
                    run["steady_over_decode_only"] = steady["output_tokens_per_s"] / dec if steady else None
                results["runs"].append(run)
    if args.baseline == "hf":
        for run in results["runs"]:
            k = run["kit"]
            run["hf"] = hf_baseline(loaded, prompts[(k["input_len"], k["concurrency"])], k["output_len"],
                                    k["concurrency"])
            run["speedup_vs_hf"] = k["output_tokens_per_s"] / run["hf"]["output_tokens_per_s"]
    _table(results["runs"])
    write_results(results, args.out)
    return 0


def write_results(results: dict[str, Any], out: str | None) -> None:
    """Write a benchmark's JSON to `out` (if given): the layout `kit bench` and `kit bench-serve` share."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
