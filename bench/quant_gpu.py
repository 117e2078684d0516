"""Time the quantized GEMMs of every scheme against bf16 on a CUDA GPU; write JSON.

    python bench/quant_gpu.py --out quant_gpu.json [--models llama-3.2-1b llama-3.1-8b] [--ms 1 16 64 256]

For each synthetic model (random weights with the real shapes, one decoder block is
enough: every block has the same linears) and each distinct linear of a block (fused
q/k/v, o_proj, fused gate/up, down_proj), for each token count M:

* `gemm`: bf16 `F.linear` vs every scheme's `build_linear` layer (its GPU fast path,
  activation quantization included): `eager_ms`, median of `triton.testing.do_bench`
  (Python and launch overhead included), and `graph_ms`, median of
  `do_bench_cudagraph` (replayed from a CUDA graph, as the engine decodes); with the
  path taken, the weight bytes, effective weight bandwidth (from graph_ms) and the
  relative error of the fast path against the scheme's float32 reference;
* `weight_only_paths`: for W8A16 / W4A16, the Triton weight-streaming kernel (M <= 64) and
  Triton dequantize + cuBLAS side by side (graph replay), to choose `TRITON_MAX_M` from
  (`bench/quant_gemm.py` measures every scheme's two variants with cold L2 and the decode steps);
* `fp8_decode_variants`: at M <= 64, FP8 with per-token scales as one row-wise
  `_scaled_mm`, or as a tensor-wise one (unit scales, float32 out) + a scaling epilogue;
* `large_m`: FP8 vs bf16 GEMM at large M (prefill), bare `torch._scaled_mm` on already
  quantized inputs (tensor-wise and row-wise scales) and the whole FP8 layer.

Only `main()` needs CUDA and Triton; the rest imports on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.config import ModelConfig  # noqa: E402
from kit.loader import ModelLoader  # noqa: E402
from kit.quantization import QuantAlgo, QuantConfig, Quantizer, build_linear  # noqa: E402
from kit.quantization.linear import TRITON_MAX_M  # noqa: E402

__all__ = ["MODELS", "M_VALUES", "LARGE_M", "SCHEMES", "linear_shapes", "parse_args", "main"]

MODELS = ("llama-3.2-1b", "llama-3.1-8b")
M_VALUES = (1, 16, 64, 256)
LARGE_M = (4096, 8192)
SCHEMES = tuple(a for a in QuantAlgo if a is not QuantAlgo.NO_QUANT)


def linear_shapes(config: ModelConfig) -> dict[str, tuple[list[str], int, int]]:
    """Distinct linears of a block: name -> (member names inside the block, out_features, in_features)."""
    c, h, i = config, config.hidden_size, config.intermediate_size
    return {
        "qkv_proj": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], c.q_size + 2 * c.kv_size, h),
        "o_proj": (["self_attn.o_proj"], h, c.q_size),
        "gate_up_proj": (["mlp.gate_proj", "mlp.up_proj"], 2 * i, h),
        "down_proj": (["mlp.down_proj"], h, i),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON file to write")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--ms", nargs="+", type=int, default=list(M_VALUES), help="token counts M")
    p.add_argument("--large-ms", nargs="+", type=int, default=list(LARGE_M), help="M for FP8 vs bf16 at large M")
    p.add_argument("--schemes", nargs="+", default=[s.value for s in SCHEMES])
    p.add_argument("--calib-size", type=int, default=4, help="calibration windows (speed only: quality unused)")
    p.add_argument("--calib-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    return p.parse_args(argv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/quant_gpu.py needs a CUDA GPU")
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from kit.quantization.triton_quant import int8_epilogue, quantize_rows

    def bench(fn) -> float:
        """Median ms of eager calls (includes Python / launch overhead)."""
        return float(do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median"))

    def bench_graph(fn) -> float:
        """Median ms of the call replayed from a CUDA graph: what the GPU itself spends (the engine's decode)."""
        fn()  # autotune / warm up outside the capture
        return float(do_bench_cudagraph(fn, rep=args.rep, return_mode="median"))

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "triton_max_m": TRITON_MAX_M, "gemm": [], "weight_only_paths": [], "fp8_decode_variants": [], "large_m": [], "quantize_s": {},
    }
    def wo_paths(layers: dict, x: torch.Tensor, row0: dict, t_bf16: float) -> None:
        """The two weight-only paths side by side: Triton kernel vs dequantize + cuBLAS."""
        for name in ("W8A16", "W4A16"):
            if name not in layers:
                continue
            lin = layers[name][0]
            t_tri = None
            if x.shape[0] <= 64:  # the streaming kernel's range
                lin.stream_max_m = 64
                t_tri = bench_graph(lambda: lin(x))
            lin.stream_max_m = 0
            t_deq = bench_graph(lambda: lin(x))
            lin.stream_max_m = TRITON_MAX_M
            out["weight_only_paths"].append({**row0, "scheme": name, "triton_graph_ms": t_tri,
                                             "dequant_cublas_graph_ms": t_deq, "bf16_graph_ms": t_bf16})

    torch.manual_seed(0)
    for preset in args.models:
        loaded = ModelLoader.synthetic(preset, device=dev, dtype=bf16, num_layers=1)
        quantized = {}
        for name in args.schemes:
            qc = QuantConfig(QuantAlgo(name), calib_size=args.calib_size, calib_max_seq_len=args.calib_len)
            t0 = time.perf_counter()
            quantized[name] = (qc, Quantizer(qc).quantize(loaded, progress=False))
            torch.cuda.synchronize()
            out["quantize_s"][f"{preset}/{name}"] = round(time.perf_counter() - t0, 3)
            print(f"{preset}: quantized {name} in {out['quantize_s'][f'{preset}/{name}']} s", flush=True)
        for lin_name, (members, n_out, n_in) in linear_shapes(loaded.config).items():
            prefixes = [f"model.layers.0.{m}" for m in members]
            dense = build_linear(loaded.weights, prefixes, QuantConfig(), bias=False, device=dev, dtype=bf16)
            layers = {name: (build_linear(q.weights, prefixes, qc, bias=False, device=dev, dtype=bf16),
                             build_linear(q.weights, prefixes, qc, bias=False, device=dev, dtype=bf16,
                                          force_reference=True))
                      for name, (qc, q) in quantized.items()}
            for m in args.ms:
                x = torch.randn(m, n_in, device=dev, dtype=bf16)
                t_bf16, g_bf16 = bench(lambda: dense(x)), bench_graph(lambda: dense(x))
                row0 = dict(model=preset, linear=lin_name, out_features=n_out, in_features=n_in, M=m)
                out["gemm"].append({**row0, "scheme": "bf16", "path": "F.linear (cuBLAS)", "eager_ms": t_bf16,
                                    "graph_ms": g_bf16, "speedup_vs_bf16": 1.0, "weight_bytes": dense.weight_bytes,
                                    "weight_GBps": dense.weight_bytes / g_bf16 / 1e6, "rel_err_vs_reference": 0.0})
                for name, (lin, ref) in layers.items():
                    err = _rel(lin(x), ref(x))
                    t, g = bench(lambda: lin(x)), bench_graph(lambda: lin(x))
                    out["gemm"].append({**row0, "scheme": name, "path": lin.path, "eager_ms": t, "graph_ms": g,
                                        "speedup_vs_bf16": g_bf16 / g, "weight_bytes": lin.weight_bytes,
                                        "weight_GBps": lin.weight_bytes / g / 1e6, "rel_err_vs_reference": err})
                wo_paths(layers, x, row0, g_bf16)
                if m <= 64:  # FP8 per-token at decode: row-wise _scaled_mm vs tensor-wise (unit scales) + epilogue
                    xq, xs = quantize_rows(x, to_fp8=True)
                    wq_t = (dense.weight.float() / (dense.weight.float().abs().amax(1, keepdim=True) / 448)).to(
                        torch.float8_e4m3fn).t()
                    ws = torch.ones(1, n_out, device=dev)
                    one = torch.ones(1, device=dev)
                    out["fp8_decode_variants"].append({**row0, "rowwise_graph_ms": bench_graph(
                        lambda: torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=ws, out_dtype=bf16)),
                        "tensorwise_f32_plus_epilogue_graph_ms": bench_graph(lambda: int8_epilogue(
                            torch._scaled_mm(xq, wq_t, scale_a=one, scale_b=one, out_dtype=torch.float32),
                            xs, ws[0], None, bf16))})
                print(f"{preset} {lin_name} M={m} (graph us): bf16 {g_bf16 * 1e3:.1f}; " + ", ".join(
                    f"{r['scheme']} {r['graph_ms'] * 1e3:.1f}" for r in out["gemm"][-len(layers):]), flush=True)
            # FP8 vs bf16 at large M
            fp8_lin = layers.get("FP8", (None,))[0]
            for m in args.large_ms:
                x = torch.randn(m, n_in, device=dev, dtype=bf16)
                w = dense.weight
                flops = 2.0 * m * n_in * n_out
                t_bf16 = bench(lambda: F.linear(x, w))
                a_scale = (x.float().abs().amax() / 448).reshape(1)
                xq = (x.float() / a_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                w_scale = (w.float().abs().amax() / 448).reshape(1)
                wq_t = (w.float() / w_scale).clamp(-448, 448).to(torch.float8_e4m3fn).t()
                t_tw = bench(lambda: torch._scaled_mm(xq, wq_t, scale_a=a_scale, scale_b=w_scale, out_dtype=bf16))
                sa, sb = a_scale.expand(m, 1).contiguous(), w_scale.expand(1, n_out).contiguous()
                t_rw = bench(lambda: torch._scaled_mm(xq, wq_t, scale_a=sa, scale_b=sb, out_dtype=bf16))
                row = dict(model=preset, linear=lin_name, out_features=n_out, in_features=n_in, M=m,
                           bf16_ms=t_bf16, fp8_tensorwise_ms=t_tw, fp8_rowwise_ms=t_rw,
                           bf16_TFLOPs=flops / t_bf16 / 1e9, fp8_tensorwise_TFLOPs=flops / t_tw / 1e9,
                           fp8_rowwise_TFLOPs=flops / t_rw / 1e9)
                wo_paths(layers, x, dict(model=preset, linear=lin_name, out_features=n_out, in_features=n_in, M=m),
                         t_bf16)
                if fp8_lin is not None:
                    t_layer = bench(lambda: fp8_lin(x))
                    row.update(fp8_layer_ms=t_layer, fp8_layer_TFLOPs=flops / t_layer / 1e9, fp8_layer_path=fp8_lin.path)
                out["large_m"].append(row)
                print(f"{preset} {lin_name} M={m}: bf16 {row['bf16_TFLOPs']:.0f} TFLOP/s, fp8 tensor-wise "
                      f"{row['fp8_tensorwise_TFLOPs']:.0f}, row-wise {row['fp8_rowwise_TFLOPs']:.0f}", flush=True)
        del loaded, quantized, layers
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))  # after each model: partial results survive
        print(f"wrote {args.out} ({preset} done)", flush=True)
    return out


if __name__ == "__main__":
    main()
