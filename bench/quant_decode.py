"""Decode tokens/s of quantized engines against bf16, same run, same GPU (CUDA graphs on).

For each synthetic model and scheme: quantize (RTN / FP8 with a short random-token
calibration: synthetic weights have no text to calibrate on), build with CUDA graphs for
the measured batch sizes, and time `steps` decode steps of `batch` sequences with
`context` cached tokens. Results are appended to the JSON after every measurement, so a
run cut short keeps what it measured.

    python bench/quant_decode.py --models llama-3.2-1b llama-3.1-8b --out quant_decode.json
    python bench/quant_decode.py --smoke --out /tmp/quant_decode_smoke.json   # CPU: one layer, seconds

`fp8_wo` is FP8 with `FP8Linear.weight_only_decode` (bf16 activations x fp8 weights up to the
layer's `stream_max_m`); `fp8` lets each layer time its two equivalent decode paths per shape.

`build_engine` and `time_decode` are also what `bench/quant_gemm.py` times its decode steps with.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.batch import ForwardBatch, SequenceInput  # noqa: E402
from kit.builder import BuildConfig, Builder  # noqa: E402
from kit.loader import ModelLoader  # noqa: E402
from kit.network import NetworkBuilder  # noqa: E402
from kit.quantization import QuantConfig, Quantizer  # noqa: E402
from kit.quantization.linear import FP8Linear  # noqa: E402
from kit.quantization.path_choice import CHOOSER  # noqa: E402

__all__ = ["SCHEMES", "BLOCK_SIZE", "build_engine", "time_decode", "main"]

SCHEMES = {"bf16": None, "fp8": "fp8", "fp8_wo": "fp8", "int8_wo": "int8_wo", "int4_wo": "int4_wo",
           "int4_awq": "int4_awq"}
BLOCK_SIZE = 16


def build_engine(loaded, batch_sizes: list[int], context: int, steps: int, device: str):
    """(engine, kv cache) for decoding `batch_sizes` sequences of `context` + `steps` tokens, graphs captured."""
    bs = BLOCK_SIZE
    max_seq = context + steps + bs
    bc = BuildConfig(max_batch_size=max(batch_sizes), max_seq_len=max_seq, max_input_len=max_seq // 2,
                     cuda_graph_batch_sizes=tuple(batch_sizes), block_size=bs)
    engine = Builder("torch", device=device).build(NetworkBuilder(loaded).build(), bc, loaded=loaded,
                                                  enable_build_cache=False, progress=False)
    kv = engine.allocate_kv_cache(max(batch_sizes) * -(-max_seq // bs) + 1, bs)
    engine.capture_cuda_graphs(kv)
    return engine, kv


def time_decode(engine, kv, batch: int, context: int, steps: int, bs: int = BLOCK_SIZE) -> float:
    """Decode steps per second of `batch` sequences with `context` cached tokens (CUDA graphs if captured)."""
    per_seq = -(-(context + steps) // bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    batches = [ForwardBatch.build([SequenceInput([7], context + k, t) for t in tables], bs, device=engine.device)
               for k in range(steps)]
    for b in batches[:3]:
        engine.forward(b, kv)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for b in batches:
        engine.forward(b, kv)
    sync()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--num-layers", type=int, default=None, help="fewer layers, for a quick CPU check")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="a CPU dry run: qwen2.5-0.5b, one layer, 2 steps")
    args = p.parse_args()
    if args.smoke:
        args.models, args.num_layers, args.batch_sizes, args.steps, args.context = ["qwen2.5-0.5b"], 1, [1, 2], 2, 16
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "context": args.context, "steps": args.steps, "runs": []}
    bs = 16
    for model in args.models:
        base = ModelLoader.synthetic(model, device=device, dtype=dtype, num_layers=args.num_layers)
        for scheme in args.schemes:
            t0 = time.perf_counter()
            loaded = base
            if SCHEMES[scheme] is not None:
                qc = QuantConfig.from_name(SCHEMES[scheme], calib_size=4, calib_max_seq_len=64)
                loaded = Quantizer(qc).quantize(base, progress=False)
            quant_s = time.perf_counter() - t0
            FP8Linear.weight_only_decode = scheme == "fp8_wo"  # read as the graphs are captured
            engine, kv = build_engine(loaded, args.batch_sizes, args.context, args.steps, device)
            lin = engine.network.to_frame()
            lin_bytes = int(lin[lin.kind.isin(["qkv_proj", "o_proj", "mlp"])]["weight_bytes"].sum())
            for b in args.batch_sizes:
                sps = time_decode(engine, kv, b, args.context, args.steps, bs)
                base_sps = {r["batch_size"]: r["steps_per_s"] for r in out["runs"]
                            if r["model"] == model and r["scheme"] == "bf16"}
                row = {"model": model, "scheme": scheme, "batch_size": b, "steps_per_s": sps, "tokens_per_s": sps * b,
                       "ms_per_step": 1e3 / sps,
                       "speedup_vs_bf16": 1.0 if scheme == "bf16" else sps / base_sps[b] if b in base_sps else None,
                       "linear_weight_bytes": lin_bytes,
                       "weight_bytes": engine.network.weight_bytes, "quantize_s": quant_s}
                out["runs"].append(row)
                out["fp8_path_choices"] = CHOOSER.table()
                print(json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=2)
            FP8Linear.weight_only_decode = False
            del engine, kv, loaded
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        del base
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
