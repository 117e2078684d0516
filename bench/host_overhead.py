"""Host cost of one serving step: microseconds per step, per phase, at batch 64 and 256 (CPU, or CUDA).

The device work is made nearly free (a synthetic Llama with 1 layer, hidden 64, a 256-token
vocabulary), so what a step costs is the Python of the serving loop: the real `Scheduler`,
`ForwardBatch` building, the `Sampler`'s batch pass, `OutputProcessor` (stop checks,
detokenization: `--detokenize` adds runs with SmolLM2's tokenizer, publishing) and the
`Executor`'s step loop. `B` requests of `--input-len` prompt tokens each generate
`--output-len` tokens together (greedy, ignore_eos); only pure decode steps at batch `B` are
counted. Per phase, on the host clock (`Executor.stats()`'s cpu_* columns):

    schedule   scheduler.schedule()
    prepare    ForwardBatch building (+ the device gather of the previous step's tokens)
    forward    the tiny model's forward (device time; not host cost)
    sample     CPU: the rows to sample + the sampler's pass (its Python and its small tensor math);
               CUDA: the enqueue of the forward and the sampler
    advance    scheduler.advance and the step's bookkeeping until its tokens are read
    output     tokens -> stop checks, detokenization, scheduler.commit, publishing (CUDA: with the wait
               for the step's tokens)
    iteration  the median time between the starts of two decode iterations (the loop's cadence)

`host` = schedule + prepare + sample + advance + output, read on the synchronous loop (overlap
off) so that the phases do not interleave; `--overlap` adds runs of the overlapped loop, whose
`iteration` says what a step costs when the device work is hidden. `--profile` adds the top
cProfile entries of the loop thread. Each batch runs `--repeat` times and keeps, per phase, the
lowest median (on a shared machine other load only adds time).

    python bench/host_overhead.py --detokenize --overlap --before BEFORE.json --out bench/results/host_overhead_cpu.json
    python bench/host_overhead.py --device cuda --overlap --out bench/results/host_overhead_h200.json  # ~1 min
    python bench/host_overhead.py --smoke --overlap --out /tmp/host_overhead_smoke.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kit.bench import write_results
from kit.builder import BuildConfig
from kit.kv_cache_config import KvCacheConfig
from kit.config import ModelConfig
from kit.llm import LLM
from kit.loader import LoadedModel, ModelLoader, random_weights
from kit.sampling_params import SamplingParams

PHASES = ("schedule", "prepare", "forward", "sample", "advance", "output")
HOST_PHASES = ("schedule", "prepare", "sample", "advance", "output")


def tiny_model(vocab: int, device: str = "cpu") -> LoadedModel:
    """A 1-layer, hidden-64 Llama: its forward is nearly free, so the host's work shows."""
    config = ModelConfig(family="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, eos_token_ids=(vocab - 1,))
    return LoadedModel(config, random_weights(config, seed=0, device=device), None, name="tiny-host-overhead",
                       source="synthetic:tiny", identity={"source": "synthetic:tiny", "sha256": "seed=0"},
                       source_format="synthetic")


def _profiled(step: Any, profile: cProfile.Profile) -> Any:
    def run() -> Any:
        profile.enable()  # NOTE: cProfile follows the calling thread only: enabled inside the loop thread
        try:
            return step()
        finally:
            profile.disable()
    return run


def measure(loaded: LoadedModel, tokenizer: Any, batch: int, input_len: int, output_len: int, overlap: bool,
            profile: bool, stream: bool, device: str = "cpu") -> dict[str, Any]:
    """Serve `batch` requests together; µs per pure-decode step at batch `batch`, per phase (host clock).

    On CUDA `sample` is the enqueue of the forward and the sampler (their device times are `forward` and
    the stats' sampling_ms), and `output` includes waiting for the step's tokens. `iteration` is the
    median time between the starts of consecutive decode iterations: the loop's cadence (with overlap, what
    a step costs when the device work is hidden)."""
    bc = BuildConfig(max_batch_size=batch, max_input_len=input_len, max_seq_len=input_len + output_len,
                     max_num_tokens=max(batch * input_len, 256), block_size=16, use_cuda_graphs=device == "cuda")
    vocab = loaded.config.vocab_size
    prompts = [[(7 * r + 13 * j) % (vocab - 2) + 1 for j in range(input_len)] for r in range(batch)]
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prof = cProfile.Profile() if profile else None
    kvc = KvCacheConfig(num_blocks=batch * -(-(input_len + output_len) // bc.block_size) + 8)  # every request fits
    with LLM(loaded, device=device, build_config=bc, tokenizer=tokenizer, enable_build_cache=False,
             kv_cache_config=kvc, overlap=overlap) as llm:
        ex = llm.executor
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
        ex.reset_stats()
        if prof is not None:
            ex.step = _profiled(ex.step, prof)
        t0 = time.perf_counter()
        if stream:
            for _ in llm.generate(prompts, sp, use_tqdm=False, streaming=True):
                pass
        else:
            outs = llm.generate(prompts, sp, use_tqdm=False)
            if any(len(o.outputs[0].token_ids) != output_len for o in outs):
                raise RuntimeError("a request did not generate output_len tokens")
        wall = time.perf_counter() - t0
        stats = ex.stats()
    decode = stats[(stats["batch_size"] == batch) & (stats["num_prefill_tokens"] == 0)]
    if not len(decode):
        raise RuntimeError(f"no pure decode step at batch {batch}")
    d = decode
    launch = 1e3 * (d["cpu_launch_end_s"] - d["cpu_launch_s"])  # CPU: forward + sampler run here; CUDA: enqueued
    per_step = {
        "schedule": 1e3 * (d["cpu_prepare_s"] - d["cpu_schedule_s"]),
        "prepare": 1e3 * (d["cpu_launch_s"] - d["cpu_prepare_s"]),
        "forward": d["forward_ms"], "sample": launch - d["forward_ms"] if device == "cpu" else launch,
        "advance": 1e3 * (d["cpu_output_s"] - d["cpu_launch_end_s"]),  # synchronous loop: advance, then resolve
        "output": 1e3 * (d["cpu_output_end_s"] - d["cpu_output_s"])}
    us = {k: 1e3 * float(statistics.median(v)) for k, v in per_step.items()}
    us["host"] = sum(us[k] for k in HOST_PHASES)
    starts = stats["cpu_schedule_s"].tolist()
    gaps = [b - a for a, b, steady in zip(starts, starts[1:], stats["batch_size"].tolist()[1:]) if steady == batch]
    us["iteration"] = 1e6 * float(statistics.median(gaps)) if gaps else float("nan")
    res = {"batch": batch, "input_len": input_len, "output_len": output_len, "overlap": overlap, "stream": stream,
           "detokenize": tokenizer is not None, "num_decode_steps": len(decode), "wall_s": wall,
           "us_per_step": us, "us_per_request_step": {k: v / batch for k, v in us.items()}}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        res["profile_top"] = buf.getvalue().splitlines()[:60]
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path in seconds")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256, help="small: the sampler's math (device work) stays negligible")
    p.add_argument("--detokenize", action="store_true",
                   help="also runs that detokenize with SmolLM2's tokenizer (ids < vocab; smollm2-135m from the cache)")
    p.add_argument("--stream", action="store_true", help="streaming requests (a snapshot per token)")
    p.add_argument("--profile", action="store_true", help="cProfile of the loop thread (top entries in the JSON)")
    p.add_argument("--label", default="", help="stored with the results (e.g. before / after)")
    p.add_argument("--before", nargs="*", default=[],
                   help="results JSONs of an earlier version (same flags): kept under 'before', with the cut per phase")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the same loop with the real host->device copies")
    p.add_argument("--overlap", action="store_true",
                   help="also the overlapped loop (phases interleave there: only its iteration cadence is read)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per batch; per phase the lowest median is kept (the machine's other load only adds)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.batch, args.input_len, args.output_len, args.repeat, args.device = [4], 8, 6, 1, "cpu"
    tokenizer = ModelLoader("smollm2-135m").load().tokenizer if args.detokenize else None
    loaded = tiny_model(args.vocab, args.device)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    res: dict[str, Any] = {"label": args.label, "device": args.device, "gpu": gpu,
                           "cpu": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
                           "runs": []}
    print(f"{'batch':>5} {'detok':>5} {'overlap':>7} " + " ".join(f"{k:>9}" for k in (*PHASES, "host", "iteration"))
          + "   (µs/step; with overlap only `iteration` is meaningful)")
    configs = [(b, t, o) for o in ([False, True] if args.overlap else [False])
               for t in ([None, tokenizer] if tokenizer is not None else [None]) for b in args.batch]
    for b, tok, overlap in configs:
        tries = [measure(loaded, tok, b, args.input_len, args.output_len, overlap, args.profile and i == 0,
                         args.stream, args.device) for i in range(args.repeat)]
        r = tries[0]
        r["us_per_step"] = {k: min(t["us_per_step"][k] for t in tries) for k in (*PHASES, "iteration")}
        # the overlapped loop's phases interleave (its `advance` spans the next step): no host sum there
        r["us_per_step"]["host"] = sum(r["us_per_step"][k] for k in HOST_PHASES) if not overlap else None
        r["us_per_request_step"] = {k: v / b for k, v in r["us_per_step"].items() if v is not None}
        r["repeat"] = args.repeat
        res["runs"].append(r)
        u = r["us_per_step"]
        print(f"{b:>5} {str(r['detokenize']):>5} {str(overlap):>7} "
              + " ".join(f"{u[k]:>9.0f}" if u[k] is not None else f"{'-':>9}" for k in (*PHASES, "host", "iteration")),
              flush=True)
    if args.before:
        res["before"] = [r for f in args.before for r in json.loads(Path(f).read_text())["runs"]]
        res["cut_pct"] = []
        for r in res["runs"]:
            old = next((b for b in res["before"] if (b["batch"], b["detokenize"], b["stream"], b["overlap"])
                        == (r["batch"], r["detokenize"], r["stream"], r["overlap"])), None)
            if old is not None:  # the overlapped loop's phases interleave: only its cadence compares
                keys = ("iteration",) if r["overlap"] else (*HOST_PHASES, "host", "iteration")
                cut = {k: 100.0 * (1.0 - r["us_per_step"][k] / old["us_per_step"][k]) for k in keys}
                res["cut_pct"].append({"batch": r["batch"], "detokenize": r["detokenize"], "overlap": r["overlap"],
                                       **cut})
                key = "iteration" if r["overlap"] else "host"
                print(f"batch {r['batch']:>4} detokenize={r['detokenize']} overlap={r['overlap']}: {key} "
                      f"{old['us_per_step'][key]:.0f} -> {r['us_per_step'][key]:.0f} µs/step ({cut[key]:.0f}% less)")
    write_results(res, args.out)
    return res


if __name__ == "__main__":
    main()
