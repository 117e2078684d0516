"""The serving loop against the bare decode step: does the loop keep the GPU busy? (one GPU run, ~300 s)

For synthetic Llama-3.2-1B and Llama-3.1-8B (bf16), workloads 128/128 and 1024/128 tokens, at
concurrency 1, 8 and 64, with overlapped scheduling on and off (one engine per model: the
executor's `overlap` flag is switched between runs, while it is idle), and at concurrency 8 and
64 also with the mixed-step CUDA graphs set aside (those steps then run eagerly), reports the serving
throughput (`kit.bench.run_benchmark`), TTFT/TPOT p50/p99, the loop's time split, and the same
engine's decode-only throughput at the same batch and mean context (`kit.bench.decode_only`),
so that `serving_over_decode_only` is measured in the same run. Also: Qwen2.5-0.5B at
concurrency 64 (p50 and p99 TPOT; its 152k vocabulary exercises the sampler), the sampler's
batch pass alone at 64 x 151,936 (greedy and top-p), and Hugging Face `generate` (by default for 1B at
concurrency 1 and 8; `--hf` names others) while the time budget allows, after the kit runs. Items that would pass the budget are skipped
and listed under "skipped".

Every timed run is preceded by one untimed wave of the same shape (model, input/output mix,
concurrency, overlap mode; other prompts), so that every kernel shape it meets (prefill chunks,
mixed chunk + decode steps, decode batches) is compiled and tuned before the clock starts. A run
serves 4 x concurrency requests (at least 4) with fresh prompts (no prefix-cache hit from an
earlier run); in its closed loop the first wave arrives spread over one output length (output_len
decode-only steps), so requests then finish and are replaced one at a time, as in a server, and
`steady_over_decode_only` (throughput while every slot is busy) sits beside the whole-run
`serving_over_decode_only`. Before each timed run its time is estimated from the warm-up wave
(the ramp, then requests / concurrency waves as long as the warm-up's) and printed beside the
time the row took; a run whose estimate would pass the budget is skipped. Each row keeps its
run's five longest iterations (what they held, the loop's time split): where the p99s come from.

    python bench/serving.py --out bench/results/serving_h100.json
    python bench/serving.py --smoke --out /tmp/serving_smoke.json     # same code path, CPU, seconds
    python bench/serving.py --models llama-3.2-1b,llama-3.1-8b --pairs 128/128 --no-qwen \
        --hf 'llama-3.2-1b:1,8,64;llama-3.1-8b:1,8,64' --out hf.json      # HF baselines at every concurrency
    python bench/serving.py --max-num-tokens 128 --concurrency 64 --pairs 128/128 --no-qwen --hf '' --out c.json
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

from kit.bench import decode_only, hf_baseline, make_prompts, run_benchmark, write_results
from kit.builder import BuildConfig
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.sampling import Sampler, SamplingContext
from kit.sampling_params import SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the code path in seconds")
    p.add_argument("--budget-s", type=float, default=300.0, help="skip what would end after this many seconds")
    p.add_argument("--models", help="comma-separated subset of the plan's models (default: all)")
    p.add_argument("--pairs", help="input/output pairs, e.g. 128/128,1024/128 (default: the plan's)")
    p.add_argument("--concurrency", help="e.g. 1,8,64 (default: the plan's)")
    p.add_argument("--max-num-tokens", type=int, default=2048, help="tokens per step (the chunk size)")
    p.add_argument("--no-qwen", action="store_true", help="skip the Qwen2.5-0.5B p99 row")
    p.add_argument("--hf", default=None,
                   help="HF generate baselines, e.g. 'llama-3.2-1b:1,8;llama-3.1-8b:1,8,64' ('' for none; default: "
                        "the plan's), run last, each against the kit row of the same model, concurrency and lengths")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:
        cfg = {"device": "cpu", "dtype": torch.float32, "num_layers": 1,
               "models": [("qwen2.5-0.5b", [(8, 4), (16, 4)], [1])], "qwen": ("qwen2.5-0.5b", 2, (8, 4)),
               "hf": [("qwen2.5-0.5b", [1])], "hf_lens": (8, 4), "sampler": (4, 2000)}
    else:
        cfg = {"device": "cuda", "dtype": torch.bfloat16, "num_layers": None,
               "models": [("llama-3.2-1b", [(128, 128), (1024, 128)], [1, 8, 64]),
                          ("llama-3.1-8b", [(128, 128), (1024, 128)], [1, 8, 64])],
               "qwen": ("qwen2.5-0.5b", 64, (128, 128)), "hf": [("llama-3.2-1b", [1, 8])], "hf_lens": (128, 128),
               "sampler": (64, 151936)}
    if args.models:
        keep = args.models.split(",")
        cfg["models"] = [m for m in cfg["models"] if m[0] in keep]
    if args.pairs:
        pairs = [tuple(int(x) for x in p.split("/")) for p in args.pairs.split(",")]
        cfg["models"] = [(m, pairs, c) for m, _, c in cfg["models"]]
        cfg["hf_lens"] = pairs[0]
    if args.concurrency:
        conc = [int(c) for c in args.concurrency.split(",")]
        cfg["models"] = [(m, p, conc) for m, p, _ in cfg["models"]]
    if args.no_qwen:
        cfg["qwen"] = None
    if args.hf is not None:
        cfg["hf"] = [(spec.split(":")[0], [int(c) for c in spec.split(":")[1].split(",")])
                     for spec in args.hf.split(";") if spec]
    cfg["max_num_tokens"] = args.max_num_tokens
    return cfg


def num_requests(c: int) -> int:
    """Requests of a timed run: 4 waves, so that the first wave's ramp and the last one's drain do not dominate."""
    return max(4, 4 * c)


def sampler_case(rows: int, vocab: int, device: str) -> dict[str, Any]:
    """The Sampler's batch pass alone (forward excluded): ms per step, greedy and top-p rows."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(rows, vocab, device=device, generator=g).to(torch.bfloat16 if device == "cuda" else torch.float32)
    out = {}
    for name, sp in (("greedy", SamplingParams(temperature=0.0, max_tokens=8)),
                     ("top_p_0.9", SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8)),
                     ("top_k_50_top_p_0.95_seeded", SamplingParams(temperature=0.7, top_k=50, top_p=0.95, seed=1,
                                                                   max_tokens=8))):
        contexts = [SamplingContext(sp, [1, 2], [3], Sampler.make_generator(sp, device)) for _ in range(rows)]
        sampler = Sampler()
        for _ in range(3):
            sampler.sample(logits, contexts)
        steps = 20
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = sampler.sample_async(logits, contexts).start_copy()
        batch.result()
        if device == "cuda":
            torch.cuda.synchronize()
        out[name] = 1e3 * (time.perf_counter() - t0) / steps
    return {"rows": rows, "vocab": vocab, "ms_per_step": out}


def serve_model(name: str, pairs: list[tuple[int, int]], concurrency: list[int], cfg: dict[str, Any],
                res: dict[str, Any], deadline: float) -> None:
    loaded = ModelLoader.synthetic(name, device=cfg["device"], dtype=cfg["dtype"], num_layers=cfg["num_layers"])
    bc = BuildConfig(max_batch_size=max(concurrency), max_input_len=max(i for i, _ in pairs),
                     max_seq_len=max(i + o for i, o in pairs), max_num_tokens=cfg["max_num_tokens"])
    vocab = loaded.config.vocab_size
    seeds = iter(range(1, 1_000_000))  # NOTE: fresh prompts for every run: no prefix-cache hit from an earlier one
    with LLM(loaded, device=cfg["device"], build_config=bc, enable_build_cache=False) as llm:
        captures = [r for r in llm.engine.build_log if r["step"] == "capture CUDA graphs"]
        res.setdefault("captures", {})[name] = captures
        print(f"{name}: {captures}", flush=True)
        for in_len, out_len in pairs:
            for c in concurrency:
                dec = decode_only(llm, c, in_len + out_len // 2)
                ramp = out_len * dec["step_ms"] / 1e3  # one output length at this batch
                # mixed-step CUDA graphs (kit/backends/mixed_graphs.py) on, and off at c >= 8 for the comparison
                runner = getattr(llm.engine.backend, "mixed_graphs", None)
                variants = [(o, True) for o in (True, False)]
                if runner is not None and c >= 8:
                    variants += [(o, False) for o in (True, False)]
                for overlap, mixed in variants:
                    key = f"{name} {in_len}/{out_len} c={c} overlap={overlap} mixed_graphs={mixed and runner is not None}"
                    if time.monotonic() > deadline:
                        res["skipped"].append(key)
                        continue
                    llm.executor.overlap = overlap  # idle between runs: the next step reads the flag
                    # NOTE: idle between runs too: mixed steps run eagerly while the runner is set aside
                    llm.engine.backend.mixed_graphs = runner if mixed else None
                    n = num_requests(c)
                    t0 = time.monotonic()  # the warm-up: one wave of this very shape, untimed
                    run_benchmark(llm, make_prompts(vocab, in_len, c, next(seeds)), out_len, c, progress=False,
                                  ramp_s=ramp)
                    warm_s = time.monotonic() - t0
                    # the timed run: the first wave's ramp, then n / c waves of what the warm-up's wave took
                    ramp_eff = ramp * (c - 1) / c
                    estimate = ramp_eff + n / c * max(warm_s - ramp_eff, 0.0)
                    if time.monotonic() + estimate > deadline:
                        res["skipped"].append(f"{key} (estimated {estimate:.0f} s)")
                        continue
                    first_iter = int(llm.executor.stats()["iteration"].max()) if len(llm.executor.stats()) else -1
                    kit = run_benchmark(llm, make_prompts(vocab, in_len, n, next(seeds)), out_len, c,
                                        progress=False, ramp_s=ramp)
                    steady = kit["steady"]
                    row = {"model": name, "input_len": in_len, "output_len": out_len, "concurrency": c,
                           "overlap": overlap, "mixed_graphs": mixed and runner is not None, "kit": kit,
                           "decode_only": dec, "warmup_s": warm_s,
                           "estimated_s": estimate, "row_s": time.monotonic() - t0,
                           "serving_over_decode_only": kit["output_tokens_per_s"] / dec["output_tokens_per_s"],
                           "steady_over_decode_only": (steady["output_tokens_per_s"] / dec["output_tokens_per_s"]
                                                       if steady else None),
                           "tpot_over_decode_step": kit["tpot_ms"]["p50"] / dec["step_ms"],
                           "slowest_iterations": slowest_iterations(llm, first_iter)}
                    res["runs"].append(row)
                    sod = row["steady_over_decode_only"]
                    print(f"{key:60s} {kit['output_tokens_per_s']:9.1f} tok/s  decode-only "
                          f"{dec['output_tokens_per_s']:9.1f}  ratio {row['serving_over_decode_only']:.2f} "
                          f"(steady {sod if sod is not None else float('nan'):.2f})  "
                          f"TTFT p50 {kit['ttft_ms']['p50']:8.1f} p99 {kit['ttft_ms']['p99']:8.1f}  "
                          f"TPOT p50 {kit['tpot_ms']['p50']:6.2f} "
                          f"p99 {kit['tpot_ms']['p99']:6.2f} ms (decode step {dec['step_ms']:.2f} ms)  "
                          f"slowest step {row['slowest_iterations'][0]['duration_ms'] if row['slowest_iterations'] else 0:.1f} ms  "
                          f"row {estimate + warm_s:.1f} s estimated, {row['row_s']:.1f} s taken  host/device ms "
                          + ", ".join(f"{k} {v['host_ms']:.2f}/{v['device_ms']:.2f}" for k, v in kit["loop_by_step"].items()),
                          flush=True)
                llm.engine.backend.mixed_graphs = runner
    del llm, loaded
    gc.collect()
    if cfg["device"] == "cuda":
        torch.cuda.empty_cache()


def slowest_iterations(llm: LLM, after: int, k: int = 5) -> list[dict[str, Any]]:
    """The `k` longest iterations of the last run (what they held, the loop's time split): where p99s come from."""
    df = llm.executor.stats()
    df = df[df["iteration"] > after]
    cols = [c for c in ("iteration", "duration_ms", "num_prefill_tokens", "num_decode_tokens", "batch_size",
                        "schedule_ms", "prepare_ms", "forward_ms", "sampling_ms", "output_ms", "device_idle_ms")
            if c in df.columns]
    return [{c: (float(v) if not isinstance(v, (int, str)) else v) for c, v in r.items()}
            for r in df.nlargest(k, "duration_ms")[cols].to_dict("records")]


def hf_runs(cfg: dict[str, Any], res: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    """Hugging Face `generate` on the same synthetic weights, beside the kit runs of that model."""
    hi, ho = cfg["hf_lens"]
    out: list[dict[str, Any]] = []
    for hname, hcs in cfg["hf"]:
        loaded = None
        for c in hcs:
            if time.monotonic() > deadline:
                res["skipped"].append(f"hf {hname} c={c}")
                continue
            if loaded is None:
                loaded = ModelLoader.synthetic(hname, device=cfg["device"], dtype=cfg["dtype"],
                                               num_layers=cfg["num_layers"])
            prompts = make_prompts(loaded.config.vocab_size, hi, max(2, c))
            hf = hf_baseline(loaded, prompts, ho, c, progress=False)
            # the kit row of the defaults (overlap on; mixed-step graphs where the engine has them)
            rows = [r for r in res["runs"] if r["model"] == hname and r["concurrency"] == c and r["overlap"]
                    and r["input_len"] == hi and r["output_len"] == ho]
            kit = max(rows, key=lambda r: r["mixed_graphs"], default=None)
            entry = {"model": hname, "concurrency": c, "input_len": hi, "output_len": ho, "hf": hf}
            if kit is not None:
                entry["kit_over_hf"] = kit["kit"]["output_tokens_per_s"] / hf["output_tokens_per_s"]
            out.append(entry)
            print(f"hf generate {hname} c={c}: {hf['output_tokens_per_s']:.1f} tok/s"
                  f"{'  kit %.1fx' % entry['kit_over_hf'] if kit is not None else ''}", flush=True)
        del loaded
        gc.collect()
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s * 0.92
    cfg = plan(args)
    dev = cfg["device"]
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                           "torch": torch.__version__, "smoke": args.smoke, "max_num_tokens": cfg["max_num_tokens"],
                           "runs": [], "skipped": []}
    res["sampler"] = sampler_case(*cfg["sampler"], dev)
    print(f"sampler pass {res['sampler']}", flush=True)
    # order: the first model, Qwen (its p99 TPOT target), the others; the HF baselines last
    first, *rest = cfg["models"] or [None]
    if first is not None:
        serve_model(*first, cfg, res, deadline)
    if cfg["qwen"] is not None:
        qname, qc, (qi, qo) = cfg["qwen"]
        if time.monotonic() < deadline:
            serve_model(qname, [(qi, qo)], [qc], cfg, res, deadline)
        else:
            res["skipped"].append(f"{qname} c={qc}")
    for name, pairs, conc in rest:
        serve_model(name, pairs, conc, cfg, res, deadline)
    res["hf"] = hf_runs(cfg, res, deadline)
    res["wall_s"] = time.monotonic() - t0
    write_results(res, args.out)
    print(f"{res['wall_s']:.0f} s, skipped {len(res['skipped'])}")
    return res


if __name__ == "__main__":
    main()
