"""Host cost of one serving step on the CPU: microseconds per step, per phase, at batch 64 and 256.

The device work is made nearly free (a synthetic Llama with 1 layer, hidden 64, a 256-token
vocabulary), so what a step costs is the Python of the serving loop: the real `Scheduler`,
`ForwardBatch` building, the `Sampler`'s batch pass, `OutputProcessor` (stop checks,
detokenization: `--detokenize` adds runs with SmolLM2's tokenizer, publishing) and the `Executor`'s step loop. `B` requests of
`--input-len` prompt tokens each generate `--output-len` tokens together (greedy, ignore_eos);
only pure decode steps at batch `B` are counted. Per phase, from `Executor.stats()`:

    schedule   scheduler.schedule()
    prepare    ForwardBatch building (+ the device gather of the previous step's tokens)
    forward    the tiny model (device work; reported, not host cost)
    sample     rows to sample + the sampler's batch pass (host Python + a tiny device pass)
    advance    scheduler.advance (the rest of the step: duration - the phases above)
    output     tokens -> stop checks, detokenization, scheduler.commit, publishing

`host_us` = schedule + prepare + sample + advance + output. Run with the synchronous loop
(overlap off) so that the phases do not interleave; `--profile` adds the top cProfile entries
of the loop thread. Each batch runs `--repeat` times and keeps, per phase, the lowest median
(on a shared machine other load only adds time).

    python bench/host_overhead.py --detokenize --before BEFORE.json --out bench/results/host_overhead_cpu.json
    python bench/host_overhead.py --smoke --out /tmp/host_overhead_smoke.json
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

from kit.builder import BuildConfig
from kit.kv_cache_config import KvCacheConfig
from kit.config import ModelConfig
from kit.llm import LLM
from kit.loader import LoadedModel, ModelLoader, random_weights
from kit.sampling_params import SamplingParams

PHASES = ("schedule", "prepare", "forward", "sample", "advance", "output")
HOST_PHASES = ("schedule", "prepare", "sample", "advance", "output")


def tiny_model(vocab: int) -> LoadedModel:
    """A 1-layer, hidden-64 Llama: its forward is nearly free, so the host's work shows."""
    config = ModelConfig(family="llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, eos_token_ids=(vocab - 1,))
    return LoadedModel(config, random_weights(config, seed=0), None, name="tiny-host-overhead",
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
            profile: bool, stream: bool) -> dict[str, Any]:
    """Serve `batch` requests together; µs per pure-decode step at batch `batch`, per phase."""
    bc = BuildConfig(max_batch_size=batch, max_input_len=input_len, max_seq_len=input_len + output_len,
                     max_num_tokens=max(batch * input_len, 256), block_size=16, use_cuda_graphs=False)
    vocab = loaded.config.vocab_size
    prompts = [[(7 * r + 13 * j) % (vocab - 2) + 1 for j in range(input_len)] for r in range(batch)]
    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    prof = cProfile.Profile() if profile else None
    kvc = KvCacheConfig(num_blocks=batch * -(-(input_len + output_len) // bc.block_size) + 8)  # every request fits
    with LLM(loaded, device="cpu", build_config=bc, tokenizer=tokenizer, enable_build_cache=False,
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
    per_step = {
        "schedule": decode["schedule_ms"], "prepare": decode["prepare_ms"], "forward": decode["forward_ms"],
        "sample": decode["sampling_ms"], "output": decode["output_ms"],
        "advance": (decode["duration_ms"] - decode[["schedule_ms", "prepare_ms", "forward_ms", "sampling_ms",
                                                    "output_ms"]].sum(axis=1)).clip(lower=0.0)}
    us = {k: 1e3 * float(statistics.median(v)) for k, v in per_step.items()}
    us["host"] = sum(us[k] for k in HOST_PHASES)
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
                   help="results JSONs of an earlier version (same flags): stored under 'before', with the cut per phase")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per batch; per phase the lowest median is kept (the machine's other load only adds)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.batch, args.input_len, args.output_len, args.repeat = [4], 8, 6, 1
    tokenizer = ModelLoader("smollm2-135m").load().tokenizer if args.detokenize else None
    loaded = tiny_model(args.vocab)
    res: dict[str, Any] = {"label": args.label, "device": "cpu", "cpu": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
                           "runs": []}
    print(f"{'batch':>5} {'detok':>5} {'stream':>6} " + " ".join(f"{k:>9}" for k in (*PHASES, "host"))
          + "   (µs/step)")
    for b, tok in [(b, t) for t in ([None, tokenizer] if tokenizer is not None else [None]) for b in args.batch]:
        tries = [measure(loaded, tok, b, args.input_len, args.output_len, False, args.profile and i == 0,
                         args.stream) for i in range(args.repeat)]
        r = tries[0]
        r["us_per_step"] = {k: min(t["us_per_step"][k] for t in tries) for k in PHASES}
        r["us_per_step"]["host"] = sum(r["us_per_step"][k] for k in HOST_PHASES)
        r["us_per_request_step"] = {k: v / b for k, v in r["us_per_step"].items()}
        r["repeat"] = args.repeat
        res["runs"].append(r)
        u = r["us_per_step"]
        print(f"{b:>5} {str(r['detokenize']):>5} {str(r['stream']):>6} "
              + " ".join(f"{u[k]:>9.0f}" for k in (*PHASES, "host")), flush=True)
    if args.before:
        res["before"] = [r for f in args.before for r in json.loads(Path(f).read_text())["runs"]]
        res["cut_pct"] = []
        for r in res["runs"]:
            old = next((b for b in res["before"] if (b["batch"], b["detokenize"], b["stream"])
                        == (r["batch"], r["detokenize"], r["stream"])), None)
            if old is not None:
                cut = {k: 100.0 * (1.0 - r["us_per_step"][k] / old["us_per_step"][k]) for k in (*HOST_PHASES, "host")}
                res["cut_pct"].append({"batch": r["batch"], "detokenize": r["detokenize"], **cut})
                print(f"batch {r['batch']:>4} detokenize={r['detokenize']}: host {old['us_per_step']['host']:.0f} -> "
                      f"{r['us_per_step']['host']:.0f} µs/step ({cut['host']:.0f}% less)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
