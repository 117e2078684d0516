"""Tensor parallelism on one host: TP=1 vs TP=2 vs TP=4 of synthetic Llama-3.1-8B in bf16.

For each TP size that the GPUs allow (1, 2, 4), in one run:

* decode step at batch 1 (CUDA graphs, NCCL all-reduce inside them), ms per step: steps back to
  back (`decode_b1_ms`) and each waited for (`decode_b1_synced_ms`, as a loop sampling on the host);
  `step_channel` says how the step headers reached the other ranks (KIT_TP_CHANNEL);
* decode throughput at batch 64 (graphed), tokens/s;
* the all-reduce share of an eager decode step (ProfiledEngine.collectives on rank 0), and of the graphed
  batch-1 step as it runs (`collective_share_pct_b1`: rank 0's kernels traced by kit.profiler.step_kernels,
  with kernels per step, the GPU's idle time and the costliest kernels);
* top-1 agreement over the same 64 prefill positions, three ways (random weights leave near-tied
  logits, so two correct bf16 computations often pick different argmaxes):
  - bf16 TP=N vs bf16 TP=1 (`top1_agreement_vs_tp1`);
  - float32 TP=N vs float32 TP=1, and their max |logit diff| (`fp32_*`): the sharding's exactness
    (the same weights, upcast; >= 0.99 expected);
  - bf16 TP=1 and bf16 TP=N vs float32 TP=1 (`top1_agreement_vs_fp32_tp1`): bf16's own noise, which
    should be about the same for both;
  - bf16 TP=1 with one element of the embedding table moved by one bf16 ulp (its bits plus one) vs bf16 TP=1
    (`one_ulp_top1_agreement_vs_tp1`, TP=1's row): how far a bf16 forward pass carries the smallest change
    there is, the floor for any computation not bitwise equal to TP=1's (a sum in another order);
* the seconds `shutdown()` took (every rank destroys its CUDA graphs, then they leave the group);

and a model that does not fit one GPU's budget at TP=1 served at TP=2: GPU 0 is capped at
`--budget-frac` of the weights (torch.cuda.set_per_process_memory_fraction); TP=1 fails to
place the weights, TP=2 serves greedy requests under the same cap (every rank holds half).

Ranks 1..N-1 are spawned by the kit (torch.multiprocessing); NCCL's NVLink-multicast
settings are left as the machine has them. The weights are made once, on the last GPU.

    python bench/tp.py --out bench/results/tp_h100.json          # 2 or 4 GPUs, ~240 s at most
    python bench/tp.py --smoke --out /tmp/tp_smoke.json          # the same code on the CPU (gloo)
    bash bench/tp_gpu.sh OUT_DIR                                  # NCCL tests + one process per TP size

Hangs: every stage (load, start, shard copy, KV allocation, graph capture per size, each
measurement, shutdown) prints a timestamped line to stderr as it starts and re-arms
`faulthandler.dump_traceback_later(--stage-timeout, exit=True)`: a stage that stalls dumps
the stacks of every thread and ends the run, and the ranks' own watchdogs (0.8 x that)
name the rank and the step first (kit/parallel/watchdog.py). The JSON is rewritten after
each TP size, so a later stall keeps the earlier rows. `KIT_TP_TRACE=DIR` writes every
rank's collectives to DIR/rank{r}.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import gc
import itertools
import json
import os
import signal
import sys
import time
import traceback
from typing import Any

import torch

from kit.backends.base import LayerHook
from kit.backends.torch_backend import TorchBackend
from kit.batch import ForwardBatch, SequenceInput
from kit.build_config import BuildConfig
from kit.engine import Engine
from kit.kv_cache_config import KvCacheConfig
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.network import Network, NetworkBuilder
from kit.parallel import DistributedEngine, sharding_frame
from kit.profiler import ProfiledEngine, step_kernels
from kit.sampling_params import SamplingParams

BLOCK = 16
_T0 = time.perf_counter()
_STAGES: list[dict[str, Any]] = []
_STAGE_TIMEOUT = [600.0]


def stage(name: str) -> None:
    """A timestamped line on stderr; re-arms the stall dump (stacks of every thread, then exit)."""
    now = time.perf_counter() - _T0
    if _STAGES:
        _STAGES[-1]["seconds"] = round(now - _STAGES[-1]["at_s"], 3)
    _STAGES.append({"stage": name, "at_s": round(now, 3)})
    print(f"[tp {time.strftime('%H:%M:%S')} +{now:7.1f}s] {name}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback_later(_STAGE_TIMEOUT[0], exit=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batches(batch: int, context: int, steps: int, device: torch.device) -> list[ForwardBatch]:
    per_seq = -(-(context + steps) // BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    return [ForwardBatch.build([SequenceInput([7 + i], context + k, t) for i, t in enumerate(tables)], BLOCK,
                               device=device) for k in range(steps)]


def ms_per_step(engine: Engine, kv: Any, batches: list[ForwardBatch], eager: bool = False, what: str = "",
                synced: bool = False) -> float:
    """Steps back to back (the host runs ahead of the GPU), or with `synced` each waited for, as a loop that
    samples on the host between steps does (then the other ranks' host latency is on the critical path)."""
    hooks = [LayerHook()] if eager else None
    stage(f"measure {what}: {len(batches)} steps of batch {batches[0].num_seqs}{' eager' if eager else ''}"
          f"{' synced' if synced else ''}")
    for b in batches[:3]:
        engine.forward(b, kv, hooks)
    sync(engine.device)
    t0 = time.perf_counter()
    for b in batches:
        engine.forward(b, kv, hooks)
        if synced:
            sync(engine.device)
    sync(engine.device)
    return 1e3 * (time.perf_counter() - t0) / len(batches)


COLLECTIVE_KERNELS = ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "symm")


def kernel_summary(df: Any, top: int) -> dict[str, Any]:
    """What `step_kernels` traced, per step: kernels, kernel time, the GPU's idle time, the step, the collectives'
    kernels and time, and the `top` costliest kernels."""
    a = df.attrs
    coll = df[df["name"].str.lower().str.contains("|".join(COLLECTIVE_KERNELS))]
    return {"kernels_per_step": a["kernels_per_step"], "kernel_ms": a["kernel_ms"], "gpu_idle_ms": a["idle_ms"],
            "traced_step_ms": a["step_ms"], "collective_kernels_per_step": float(coll["calls"].sum()),
            "collective_ms": float(coll["time_us"].sum()) / 1e3,
            "top_kernels": [{"name": r.name[:90], "calls": r.calls, "time_us": round(r.time_us, 1)}
                            for r in df.head(top).itertuples()]}


def graphed_kernels(engine: Engine, kv: Any, batches: list[ForwardBatch], what: str) -> dict[str, Any]:
    """Rank 0's kernels in graphed batch-1 steps (kit.profiler.step_kernels): kernels per step, the
    collectives' time per step and share of the step, the GPU's idle time, the 12 costliest kernels."""
    stage(f"{what}: trace rank 0's kernels in {len(batches)} graphed batch-1 steps")
    steps = itertools.cycle(batches)
    t = kernel_summary(step_kernels(lambda: engine.forward(next(steps), kv), iters=len(batches),
                                    device=engine.device), top=12)
    return {"kernels_per_step_b1": t["kernels_per_step"], "kernel_ms_b1": t["kernel_ms"],
            "gpu_idle_ms_b1": t["gpu_idle_ms"], "traced_step_ms_b1": t["traced_step_ms"],
            "collective_kernels_per_step_b1": t["collective_kernels_per_step"],
            "collective_us_per_step_b1": 1e3 * t["collective_ms"],
            "collective_share_pct_b1": 100.0 * t["collective_ms"] / t["traced_step_ms"],
            "top_kernels_b1": t["top_kernels"]}


def capture_staged(engine: Engine, kv: Any, sizes: list[int], what: str) -> tuple[int, ...]:
    """`capture_cuda_graphs` with a stage line each time the captured batch size changes (rank 0's view)."""
    backend = engine.backend
    inner, last = backend.run_layers, [None]

    def run_layers(batch: ForwardBatch, kv_cache: Any, hooks: Any = None) -> torch.Tensor:
        if batch.num_seqs != last[0]:
            last[0] = batch.num_seqs
            stage(f"{what}: capture batch {batch.num_seqs} (2 warm-up steps, then the capture)")
        return inner(batch, kv_cache, hooks)

    backend.run_layers = run_layers  # NOTE: the graph runner calls backend.run_layers: this instance's, now
    try:
        return engine.capture_cuda_graphs(kv, sizes)
    finally:
        del backend.run_layers


def prefill_logits(engine: Engine, prompt: list[int], what: str) -> torch.Tensor:
    """The logits of every prompt position, float32 on the CPU: (positions, vocab)."""
    stage(f"{what}: logits of {len(prompt)} prefill positions")
    kv = engine.allocate_kv_cache(-(-len(prompt) // BLOCK) + 1, BLOCK)
    batch = ForwardBatch.build([SequenceInput(prompt, 0, list(range(-(-len(prompt) // BLOCK))), logits="all")],
                               BLOCK, device=engine.device)
    return engine.forward(batch, kv).float().cpu()


def prefill_run(engine: Engine, tokens: int, what: str, kv: Any = None, reps: int = 3) -> dict[str, Any]:
    """One sequence's prefill of `tokens` tokens: ms after a warm-up and, on CUDA, rank 0's kernels in it (time
    in kernels, in collectives, the GPU idle between them). Over `kv`, the cache the CUDA graphs were captured
    on, the step replays the mixed-step graph of its token bucket (keys `graphed_prefill_*`); without, a cache
    of its own: eager (`prefill_*`)."""
    key = "prefill" if kv is None else "graphed_prefill"
    stage(f"{what}: {key.replace('_', ' ')} of {tokens} tokens x {reps}")
    blocks = -(-tokens // BLOCK)
    if kv is None:
        kv = engine.allocate_kv_cache(blocks + 1, BLOCK)
    batch = ForwardBatch.build([SequenceInput([11 + i % 1000 for i in range(tokens)], 0, list(range(blocks)))],
                               BLOCK, device=engine.device)
    engine.forward(batch, kv)
    sync(engine.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        engine.forward(batch, kv)
    sync(engine.device)
    out: dict[str, Any] = {f"{key}_{tokens}_ms": 1e3 * (time.perf_counter() - t0) / reps}
    if engine.device.type == "cuda":
        stage(f"{what}: trace rank 0's kernels in the prefill")
        t = kernel_summary(step_kernels(lambda: engine.forward(batch, kv), iters=reps, device=engine.device), top=8)
        for name, value in (("traced_ms", t["traced_step_ms"]), ("kernel_ms", t["kernel_ms"]),
                            ("gpu_idle_ms", t["gpu_idle_ms"]), ("collective_ms", t["collective_ms"]),
                            ("top_kernels", t["top_kernels"])):
            out[f"{key}_{tokens}_{name}"] = value
    return out


def compare(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, max |logit diff|) of two (positions, vocab) logits."""
    return float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), float((logits - ref).abs().max())


def one_ulp_up(value: torch.Tensor) -> torch.Tensor:
    """The next bf16 value away from zero (one ulp: the bit pattern plus one); 0 becomes the smallest subnormal."""
    return (value.view(torch.int16) + 1).view(torch.bfloat16)


def one_ulp_logits(network: Network, device: torch.device, dtype: torch.dtype, bc: BuildConfig,
                   prompt: list[int]) -> torch.Tensor:
    """TP=1's prefill logits with the embedding of the prompt's first token moved by one bf16 ulp in one
    element: the smallest change a bf16 forward pass can see (restored afterwards)."""
    table = network.weights["model.embed_tokens.weight"]
    if table.dtype != torch.bfloat16:
        raise ValueError(f"one_ulp_logits nudges a bf16 embedding table, got {table.dtype}")
    row = table[prompt[0]]
    old = row[0].clone()
    row[0] = one_ulp_up(old)
    try:
        engine = Engine(network, TorchBackend(network, device=device, dtype=dtype), build_config=bc)
        logits = prefill_logits(engine, prompt, "TP=1, one embedding element one ulp up")
        del engine
        return logits
    finally:
        row[0] = old


def fp32_network(network: Network) -> Network:
    """The same weights upcast to float32 (on their device): the reference every bf16 run is held to."""
    return Network(network.config, network.layers,
                   {n: t.float() if t.is_floating_point() else t for n, t in network.weights.items()},
                   name=network.name, quant_config=network.quant_config)


def shut_down(engine: Engine, device: torch.device) -> float:
    """Stop `engine` (every rank, for a distributed one); the seconds it took."""
    t0 = time.perf_counter()
    if isinstance(engine, DistributedEngine):
        engine.shutdown()
    dt = time.perf_counter() - t0
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dt


def fp32_logits(network: Network, tp: int, args, device: torch.device, bc: BuildConfig,
                prompt: list[int]) -> dict[str, Any]:
    """Prefill logits of the float32 copy of `network` at TP=`tp` (eager), and the shutdown's seconds."""
    first = torch.device("cuda", 0) if device.type == "cuda" else device
    stage(f"TP={tp} float32: upcast the weights, start the engine")
    net = fp32_network(network)
    bc32 = dataclasses.replace(bc, dtype="float32")
    if tp == 1:
        engine = Engine(net, TorchBackend(net, device=first, dtype=torch.float32), build_config=bc32)
    else:
        engine = DistributedEngine.start(net, tp, device=device, dtype=torch.float32, build_config=bc32,
                                         timeout_s=0.8 * args.stage_timeout)
    del net
    out: dict[str, Any] = {}
    try:
        out["logits"] = prefill_logits(engine, prompt, f"TP={tp} float32")
        sync(device)
    finally:
        stage(f"TP={tp} float32: shut down")
        out["shutdown_s"] = shut_down(engine, device)
    return out


def run_tp(network, tp: int, args, device: torch.device, dtype: torch.dtype, bc: BuildConfig,
           prompt: list[int]) -> dict[str, Any]:
    first = torch.device("cuda", 0) if device.type == "cuda" else device
    stage(f"TP={tp}: start the engine" + (f" (spawn ranks 1..{tp - 1}, join the group, copy the shards)"
                                           if tp > 1 else ""))
    if tp == 1:
        engine = Engine(network, TorchBackend(network, device=first, dtype=dtype), build_config=bc)
    else:
        engine = DistributedEngine.start(network, tp, device=device, dtype=dtype, build_config=bc,
                                         timeout_s=0.8 * args.stage_timeout)
    wide = getattr(engine.backend, "float32_partial_sums", False) and dtype != torch.float32
    row: dict[str, Any] = {"tp": tp, "step_channel": getattr(engine, "step_channel", "none (one rank)"),
                           "partial_sums": ("float32" if wide else "model dtype") if tp > 1 else "none (one rank)"}
    try:
        per_seq = -(-(args.context + args.steps) // BLOCK)
        stage(f"TP={tp}: allocate the KV cache ({args.max_batch * per_seq} blocks)")
        kv = engine.allocate_kv_cache(args.max_batch * per_seq, BLOCK)
        graphs: tuple[int, ...] = ()
        if device.type == "cuda":
            stage(f"TP={tp}: capture CUDA graphs {[1, args.max_batch]} (largest first)")
            graphs = capture_staged(engine, kv, [1, args.max_batch], f"TP={tp}")
            sync(device)
        b1 = decode_batches(1, args.context, args.steps, device)
        bN = decode_batches(args.max_batch, args.context, args.steps, device)
        row["cuda_graphs"] = list(graphs)
        row["decode_b1_ms"] = ms_per_step(engine, kv, b1, what=f"TP={tp} decode")
        row["decode_b1_synced_ms"] = ms_per_step(engine, kv, b1, what=f"TP={tp} decode", synced=True)
        if device.type == "cuda":
            row.update(graphed_kernels(engine, kv, b1, f"TP={tp}"))
        row[f"decode_b{args.max_batch}_ms"] = ms_per_step(engine, kv, bN, what=f"TP={tp} decode")
        row[f"tokens_per_s_b{args.max_batch}"] = args.max_batch * 1e3 / row[f"decode_b{args.max_batch}_ms"]
        row["eager_decode_b1_ms"] = ms_per_step(engine, kv, b1[:8], eager=True, what=f"TP={tp} decode")
        if tp > 1:
            stage(f"TP={tp}: ProfiledEngine.collectives (eager decode, batch 1, 5 steps)")
            coll = ProfiledEngine(engine, BLOCK).collectives(batch_size=1, seq_len=args.context, phase="decode",
                                                             iters=5)
            own = coll[coll["rank"] == 0]
            row["allreduce_ms_b1"] = float(own["latency_ms"].sum())
            row["allreduce_share_pct_b1"] = 100.0 * row["allreduce_ms_b1"] / row["eager_decode_b1_ms"]
            row["collectives_per_step"] = int(len(own))
        row.update(prefill_run(engine, args.prefill_tokens, f"TP={tp}"))
        if graphs:  # the same prefill replayed from the mixed-step graph of its bucket (as a served step is)
            row.update(prefill_run(engine, args.prefill_tokens, f"TP={tp}", kv=kv))
        row["logits"] = prefill_logits(engine, prompt, f"TP={tp}")
        sync(device)
        return row
    finally:
        stage(f"TP={tp}: shut down")
        row["shutdown_s"] = shut_down(engine, device)


def fit_experiment(loaded, args, device: torch.device) -> dict[str, Any]:
    """A per-GPU budget below the weights: TP=1 cannot place them, TP=2 serves under the same cap."""
    weight_bytes = sum(t.numel() * t.element_size() for t in loaded.weights.values())
    budget = int(args.budget_frac * weight_bytes)
    out: dict[str, Any] = {"weight_gib": weight_bytes / 2**30, "budget_gib_per_gpu": budget / 2**30}
    if device.type != "cuda":
        out["note"] = "CPU smoke run: no memory cap is enforced"
    else:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(budget / total, 0)
    bc = BuildConfig(max_batch_size=8, max_seq_len=256, max_input_len=128, max_num_tokens=256,
                     dtype="bfloat16" if device.type == "cuda" else "float32", cuda_graph_batch_sizes=(1, 8))
    try:
        network = NetworkBuilder(loaded).build()
        stage(f"fit: TP=1 under a cap of {budget / 2**30:.1f} GiB on GPU 0 (expected to fail)")
        try:
            e = Engine(network, TorchBackend(network, device=torch.device("cuda", 0) if device.type == "cuda"
                                             else device, dtype=loaded.dtype), build_config=bc)
            out["tp1"] = "fits"
            del e
        except torch.cuda.OutOfMemoryError as err:
            out["tp1"] = f"does not fit: {type(err).__name__}"
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        frame = sharding_frame(network, 2)
        out["rank0_shard_gib"] = float(frame[frame["rank"] == 0]["shard_bytes"].sum()) / 2**30
        del network, frame
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(0)  # NOTE: the peak below is TP=2's, not the TP=1 attempt's
        prompts = [[100 + i, 200 + i, 300 + i, 400 + i] * 8 for i in range(8)]
        t0 = time.perf_counter()
        stage("fit: LLM(tensor_parallel_size=2) under the same cap (start, KV cache, graphs)")
        with LLM(loaded, device=device, build_config=bc, kv_cache_config=KvCacheConfig(max_tokens=4096),
                 tensor_parallel_size=2) as llm:
            out["tp2_startup_s"] = time.perf_counter() - t0
            stage(f"fit: generate {len(prompts)} x 32 tokens at TP=2")
            t0 = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
                                use_tqdm=False)
            dt = time.perf_counter() - t0
            stage("fit: shut down")
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        out.update(tp2="served", tp2_requests=len(outs), tp2_tokens=n, tp2_tokens_per_s=n / dt)
        if device.type == "cuda":
            out["tp2_rank0_peak_gib"] = torch.cuda.max_memory_allocated(0) / 2**30
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, 0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (gloo): the same code path")
    p.add_argument("--context", type=int, default=None, help="decode context (256; --smoke: 16)")
    p.add_argument("--steps", type=int, default=None, help="decode steps measured (32; --smoke: 4)")
    p.add_argument("--max-batch", type=int, default=None, help="the throughput batch (64; --smoke: 4)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="one prompt's prefill timed (1024; --smoke: 32)")
    p.add_argument("--preset", default=None, help="synthetic preset (llama-3.1-8b; --smoke: qwen2.5-0.5b)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (--smoke: 1)")
    p.add_argument("--budget-frac", type=float, default=0.75, help="GPU 0's cap in the fit test, x the weights")
    p.add_argument("--time-budget", type=float, default=240.0)
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="TP sizes to run (default 1, 2, 4 that fit)")
    p.add_argument("--save-ref", default=None, help="TP=1: write its row and its logits (and float32's) here (.pt)")
    p.add_argument("--ref", default=None, help="compare against the TP=1 row and logits saved with --save-ref")
    p.add_argument("--no-fp32", action="store_true", help="skip the float32 runs (sharding exactness, bf16 noise)")
    p.add_argument("--no-fit", action="store_true", help="skip the model-over-one-GPU experiment")
    p.add_argument("--fit-only", action="store_true", help="only the model-over-one-GPU experiment")
    p.add_argument("--stage-timeout", type=float, default=150.0,
                   help="seconds a stage may take before every thread's stack is dumped and the run ends "
                        "(the ranks' watchdogs name the stuck rank and step at 0.8 x this)")
    args = p.parse_args()
    if args.stage_timeout <= 0:
        raise SystemExit(f"--stage-timeout must be > 0, got {args.stage_timeout}")
    _STAGE_TIMEOUT[0] = args.stage_timeout
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # `timeout` ends us: stacks first
    os.environ.setdefault("KIT_TP_STACKS_AFTER", str(args.time_budget + args.stage_timeout))
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    gpus = torch.cuda.device_count() if cuda else 2
    small = (dict(context=16, steps=4, max_batch=4, prefill_tokens=32) if args.smoke
             else dict(context=256, steps=32, max_batch=64, prefill_tokens=1024))
    for k, v in small.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        preset, layers, dtype, home = args.preset or "qwen2.5-0.5b", args.layers or 1, torch.float32, device
        sizes = [1, 2]
    else:
        preset, layers, dtype, home = (args.preset or "llama-3.1-8b", args.layers, torch.bfloat16,
                                       torch.device("cuda", gpus - 1))
        sizes = [s for s in (1, 2, 4) if s <= gpus]
    if args.sizes:
        sizes = args.sizes
    if args.fit_only:
        sizes = []
    nccl = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_SYMM", "NVSHMEM_"))}
    stage(f"load synthetic {preset} ({dtype}) on {home}; TP sizes {sizes}; GPUs {gpus if cuda else 0}; "
          f"NCCL settings {nccl}")
    loaded = ModelLoader.synthetic(preset, seed=0, device=home, dtype=dtype, num_layers=layers)
    stage("build the network")
    network = NetworkBuilder(loaded).build()
    prompt = torch.randint(0, loaded.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    bc = BuildConfig(max_batch_size=args.max_batch,
                     max_seq_len=max(128, 2 * (args.context + args.steps), args.prefill_tokens + 16),
                     max_input_len=max(64, args.prefill_tokens), max_num_tokens=max(64, args.max_batch, args.prefill_tokens),
                     dtype=str(dtype).replace("torch.", ""), cuda_graph_batch_sizes=(1, args.max_batch))
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "num_gpus": gpus if cuda else 0,
        "torch": torch.__version__, "model": f"synthetic:{preset}", "dtype": str(dtype).replace("torch.", ""),
        "context": args.context, "steps": args.steps, "max_batch": args.max_batch, "smoke": args.smoke,
        "nccl_env": nccl, "stages": _STAGES, "runs": []}

    def dump() -> None:
        results["wall_s"] = time.perf_counter() - t_start
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    # NOTE: --ref lets each TP size run in a process of its own (one NCCL group per process, never re-made)
    base = None if args.ref is None else torch.load(args.ref)  # {"row", "logits", "logits_fp32"}
    for tp in sizes:
        if time.perf_counter() - t_start > 0.6 * args.time_budget:
            results["runs"].append({"tp": tp, "skipped": "time budget"})
            continue
        try:
            row = run_tp(network, tp, args, device, dtype, bc, prompt)
        except Exception as e:  # noqa: BLE001 - a failed size is a row (with its error); the others still run
            stage(f"TP={tp} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            results["runs"].append({"tp": tp, "error": f"{type(e).__name__}: {e}"})
            dump()
            if isinstance(e, RuntimeError) and "tensor-parallel" in str(e) and cuda:
                break  # NOTE: a broken NCCL group cannot be re-made in this process
            continue
        logits = row.pop("logits")
        fp32 = None
        if not args.no_fp32:
            try:  # NOTE: at TP > 1 a second engine in this process: the first one's shutdown left the group
                fp32 = fp32_logits(network, tp, args, device, bc, prompt)
                row["fp32_shutdown_s"] = fp32["shutdown_s"]
            except Exception as e:  # noqa: BLE001 - reported in the row; the measured figures stay
                stage(f"TP={tp} float32 failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                row["fp32_error"] = f"{type(e).__name__}: {e}"
        if base is None and tp == 1:
            base = {"row": dict(row), "logits": logits, "logits_fp32": fp32["logits"] if fp32 else None}
            if args.save_ref:
                torch.save(base, args.save_ref)
            if dtype == torch.bfloat16:
                try:  # NOTE: after the reference is saved: a failure here costs only this figure
                    first = torch.device("cuda", 0) if cuda else device
                    row["one_ulp_top1_agreement_vs_tp1"], row["one_ulp_max_abs_logit_diff_vs_tp1"] = compare(
                        one_ulp_logits(network, first, dtype, bc, prompt), logits)
                except Exception as e:  # noqa: BLE001 - reported in the row; the measured figures stay
                    stage(f"TP=1 one-ulp run failed: {type(e).__name__}: {e}")
                    row["one_ulp_error"] = f"{type(e).__name__}: {e}"
        key = f"tokens_per_s_b{args.max_batch}"
        if base is not None:
            row["top1_agreement_vs_tp1"], row["max_abs_logit_diff_vs_tp1"] = compare(logits, base["logits"])
            if base.get("logits_fp32") is not None:
                ref32 = base["logits_fp32"]
                # the run's dtype (bf16 on a GPU) against float32 TP=1: bf16's own noise
                row["top1_agreement_vs_fp32_tp1"], row["max_abs_logit_diff_vs_fp32_tp1"] = compare(logits, ref32)
                if fp32 is not None and tp > 1:  # float32 TP=N vs float32 TP=1: the sharding's exactness
                    row["fp32_top1_agreement_vs_fp32_tp1"], row["fp32_max_abs_logit_diff_vs_fp32_tp1"] = compare(
                        fp32["logits"], ref32)
            row["decode_b1_ratio_vs_tp1"] = row["decode_b1_ms"] / base["row"]["decode_b1_ms"]
            if "decode_b1_synced_ms" in base["row"]:
                row["decode_b1_synced_ratio_vs_tp1"] = row["decode_b1_synced_ms"] / base["row"]["decode_b1_synced_ms"]
            row[f"throughput_b{args.max_batch}_ratio_vs_tp1"] = row[key] / base["row"][key]
        else:
            row["vs_tp1"] = "no TP=1 reference in this run (--ref missing)"
        results["runs"].append(row)
        dump()
    del network
    gc.collect()
    if args.fit_only or (not args.no_fit and gpus >= 2 and time.perf_counter() - t_start < 0.7 * args.time_budget):
        try:
            results["fit"] = fit_experiment(loaded, args, device)
        except Exception as e:  # noqa: BLE001 - reported in the JSON; the measured rows stay
            stage(f"fit failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            results["fit"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        results["fit"] = {"skipped": "needs 2 GPUs and time left"}
    stage("done")
    faulthandler.cancel_dump_traceback_later()
    dump()
    print(f"{results['device']} x{results['num_gpus']}  {results['model']} {results['dtype']}")
    print(f"{'tp':>3} {'b1 ms':>8} {'b1 x':>6} {'tok/s b' + str(args.max_batch):>12} {'x':>6} {'AR %':>6} {'top1':>6} "
          f"{'vs f32':>6} {'f32 top1':>8} {'f32 maxdiff':>11} {'stop s':>6}")
    for r in results["runs"]:
        if "skipped" in r or "error" in r:
            print(f"{r['tp']:>3} {'skipped' if 'skipped' in r else 'failed'}: {r.get('skipped', r.get('error'))}")
            continue
        nan = float("nan")
        print(f"{r['tp']:>3} {r['decode_b1_ms']:>8.3f} {r.get('decode_b1_ratio_vs_tp1', nan):>6.2f} "
              f"{r[f'tokens_per_s_b{args.max_batch}']:>12.1f} "
              f"{r.get(f'throughput_b{args.max_batch}_ratio_vs_tp1', nan):>6.2f} "
              f"{r.get('collective_share_pct_b1', r.get('allreduce_share_pct_b1', 0.0)):>6.1f} {r.get('top1_agreement_vs_tp1', nan):>6.3f} "
              f"{r.get('top1_agreement_vs_fp32_tp1', nan):>6.3f} {r.get('fp32_top1_agreement_vs_fp32_tp1', nan):>8.3f} "
              f"{r.get('fp32_max_abs_logit_diff_vs_fp32_tp1', nan):>11.2e} {r.get('shutdown_s', nan):>6.1f}")
    for r in results["runs"]:
        if "one_ulp_top1_agreement_vs_tp1" in r:
            print(f"TP=1 with one embedding element one ulp up: top-1 {r['one_ulp_top1_agreement_vs_tp1']:.3f}, "
                  f"max |logit diff| {r['one_ulp_max_abs_logit_diff_vs_tp1']:.3f} (the floor of 'top1')")
        n = args.prefill_tokens
        for key in ("prefill", "graphed_prefill"):
            if f"{key}_{n}_ms" not in r:
                continue
            traced = (f"; traced {r[f'{key}_{n}_traced_ms']:.2f} ms: kernels {r[f'{key}_{n}_kernel_ms']:.2f}, "
                      f"collectives {r[f'{key}_{n}_collective_ms']:.2f}, GPU idle {r[f'{key}_{n}_gpu_idle_ms']:.2f}"
                      if f"{key}_{n}_traced_ms" in r else "")
            print(f"TP={r['tp']} ({r.get('partial_sums')} partial sums): {key.replace('_', ' ')} of {n} tokens "
                  f"{r[f'{key}_{n}_ms']:.2f} ms{traced}")
    print("fit:", json.dumps(results["fit"]))
    print(f"wall {results['wall_s']:.1f} s -> {args.out}", flush=True)
    if cuda:  # NOTE: the results are written; skip NCCL's teardown at interpreter exit, which can abort
        os._exit(0)


if __name__ == "__main__":
    main()
