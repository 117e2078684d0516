"""Quantized GEMMs and quantized decode steps against bf16, on one CUDA GPU in one run; writes JSON.

    python bench/quant_gemm.py --out bench/results/quant_stream_h200.json    # H100 / H200: within --budget-s 230
    python bench/quant_gemm.py --smoke --out /tmp/quant_gemm_smoke.json       # CPU, Triton interpreter

1. `copy_GBps`: a device-to-device copy of 1 GiB (read + write bytes / time), the bandwidth
   the fractions below are taken of.
2. `gemm`: Llama-3.1-8B's (then Llama-3.2-1B's) linears (fused qkv, o, fused gate/up, down,
   and the 8B's lm_head) at M = 1, 4, 16, 64 tokens, one row per scheme and variant:
   bf16 `F.linear` (cuBLAS); FP8 per tensor (and with `--fp8-per-token` FP8 per channel/token)
   as `stream` (the Triton weight-streaming kernel, activations quantized as it loads them),
   `stream_wo` (the same kernel, weight-only: bf16 activations, fp8 weights upcast in registers)
   and `scaled_mm` (`quantize_rows` + `torch._scaled_mm`); W8A16 and W4A16 (AWQ layout: with
   `pre_quant_scale` on o/down; with `--gptq` the GPTQ layout: zero points) as `stream` and, from M=16,
   `dequant` (dequantize to bf16 + cuBLAS). Columns: `us` (median of CUDA-graph replays,
   autotuning done before), `weight_GBps`, `frac_copy_bw`, `speedup_vs_bf16`, `path`,
   `rel_err_vs_reference` (against the layer's float32 reference path). Each timed call runs
   enough copies of the layer (different weights) that they overflow L2 (4x 60 MB): every
   weight byte comes from HBM, as in a decode step.
3. `crossovers`: per scheme, the largest measured M up to which `stream` beats the other
   variant on every linear (FP8: the engine does not use a fixed crossover, it times both
   per shape, see `fp8_path_choices`).
4. `decode`: steps/s of synthetic llama-3.1-8b and llama-3.2-1b engines (CUDA graphs, 256
   cached tokens) at batch 1 and 64 for bf16, fp8 (stream or _scaled_mm, timed per shape),
   fp8_wo (weight-only decode), int8_wo (W8A16), int4_awq (W4A16, AWQ layout; and, untied 8B
   only, int4_awq with `quantize_lm_head`), each with `speedup_vs_bf16` from the same run.
5. `tuned_configs`: the tile, split and product (tensor cores or FMAs) the autotuner chose for
   each (M bucket, N, K, kind); `fp8_path_choices`: the FP8 layers' timed choices.

NOTE: timing only. The synthetic weights are quantized round-to-nearest in seconds (no
calibration: FP8's static input scale is a fixed 8/448, AWQ's pre_quant_scale is ones on
o/down); the accuracy of each scheme is measured elsewhere (tests/test_quant_accuracy.py),
not here. The work runs in priority order (8B GEMMs, 8B decode, 1B GEMMs, 1B decode) and
stops starting new parts once `--budget-s` is spent; the JSON is written after each part.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

if "--smoke" in sys.argv:  # NOTE: Triton reads TRITON_INTERPRET when kit's kernels are decorated (at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.config import ModelConfig  # noqa: E402
from kit.loader import SYNTHETIC_PRESETS, LoadedModel, ModelLoader  # noqa: E402
from kit.quantization import QuantAlgo, QuantConfig, build_linear, fp8  # noqa: E402
from kit.quantization import linear as linear_mod  # noqa: E402
from kit.quantization.path_choice import CHOOSER  # noqa: E402
from kit.quantization.stream_gemm import tuned_configs  # noqa: E402
from quant_decode import build_engine, time_decode  # noqa: E402

__all__ = ["GEMM_VARIANTS", "DECODE_SCHEMES", "linear_shapes", "rtn_quantize", "main"]

L2_BYTES = 60 * 2**20  # H200 (H100: 50 MB)
# (row name, algo, variant, QuantConfig overrides); variant: stream / scaled_mm / dequant / None (bf16)
GEMM_VARIANTS: list[tuple[str, QuantAlgo | None, str | None, dict]] = [
    ("bf16", None, None, {}),
    ("FP8", QuantAlgo.FP8, "stream", {}), ("FP8", QuantAlgo.FP8, "stream_wo", {}),
    ("FP8", QuantAlgo.FP8, "scaled_mm", {}),
    ("W8A16", QuantAlgo.W8A16, "stream", {}), ("W8A16", QuantAlgo.W8A16, "dequant", {}),
    ("W4A16_AWQ", QuantAlgo.W4A16_AWQ, "stream", {}), ("W4A16_AWQ", QuantAlgo.W4A16_AWQ, "dequant", {}),
]
# behind --gptq (a 5th compiled kernel variant: the budget): W4A16 with zero points
GPTQ_VARIANTS = [("W4A16_GPTQ", QuantAlgo.W4A16_GPTQ, "stream", {"has_zero_point": True})]
DECODE_SCHEMES: dict[str, dict | None] = {
    "bf16": None, "fp8": {"quant_algo": QuantAlgo.FP8}, "fp8_wo": {"quant_algo": QuantAlgo.FP8},
    "int8_wo": {"quant_algo": QuantAlgo.W8A16},
    "int4_awq": {"quant_algo": QuantAlgo.W4A16_AWQ},
    "int4_awq+lm_head": {"quant_algo": QuantAlgo.W4A16_AWQ, "quantize_lm_head": True},
}
FP8_PER_TOKEN_VARIANTS = [("FP8_PC_PT", QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, v, {})
                          for v in ("stream", "stream_wo", "scaled_mm")]
STREAM_VARIANTS = ("stream", "stream_wo")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(c: ModelConfig, lm_head: bool) -> dict[str, tuple[int, int, bool]]:
    """name -> (out_features, in_features, AWQ stores a pre_quant_scale) of a block's distinct linears."""
    h, i = c.hidden_size, c.intermediate_size
    out = {"qkv_proj": (c.q_size + 2 * c.kv_size, h, False), "o_proj": (h, c.q_size, True),
           "gate_up_proj": (2 * i, h, False), "down_proj": (h, i, True)}
    if lm_head:
        out["lm_head"] = (c.vocab_size, h, True)
    return out


def stored_tensors(w: torch.Tensor, qc: QuantConfig, pqs: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest stored tensors of one linear (FP8: a fixed static input scale)."""
    if qc.quant_algo is QuantAlgo.FP8:
        st = fp8.quantize_linear(w.float(), per_channel=False, input_amax=torch.tensor(8.0, device=w.device))
    else:
        st, _ = qc.scheme.quantize_one(w.float(), None, qc)
    if pqs and qc.scheme.calibration == "awq":
        st["pre_quant_scale"] = torch.ones(w.shape[1], device=w.device)
    return st


def rtn_quantize(loaded: LoadedModel, qc: QuantConfig) -> LoadedModel:
    """The model in `qc`'s stored format, quantized round-to-nearest without calibration (timing only)."""
    weights: dict[str, torch.Tensor] = {}
    for name, t in loaded.weights.items():
        prefix = name[: -len(".weight")]
        linear = name.endswith(".weight") and (prefix.rsplit(".", 1)[-1] in _LINEARS or prefix == "lm_head")
        if not linear or qc.is_excluded(prefix):
            weights[name] = t
            continue
        pqs = prefix.endswith(("o_proj", "down_proj"))  # AWQ: no norm before them to fold the scale into
        weights.update({f"{prefix}.{k}": v for k, v in stored_tensors(t, qc, pqs).items()})
    return LoadedModel(loaded.config, weights, None, loaded.name, loaded.source, dict(loaded.identity), qc,
                       loaded.source_format, list(loaded.notes) + [f"round-to-nearest {qc} (timing only)"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="path of the JSON file to write")
    p.add_argument("--models", nargs="+", default=["llama-3.1-8b", "llama-3.2-1b"])
    p.add_argument("--ms", nargs="+", type=int, default=[1, 4, 16, 64], help="token counts M of the GEMMs")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--parts", nargs="+", default=["gemm", "decode"], choices=["gemm", "decode"])
    p.add_argument("--budget-s", type=float, default=230.0, help="start no new part after this many seconds")
    p.add_argument("--rep", type=int, default=10, help="ms of CUDA-graph replays per measurement")
    p.add_argument("--fp8-per-token", action="store_true", help="also time FP8_PER_CHANNEL_PER_TOKEN's variants")
    p.add_argument("--gptq", action="store_true", help="also time W4A16 with zero points (GPTQ layout)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (Triton interpreter): a dry run")
    return p.parse_args(argv)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


class Runner:
    """Times callables (CUDA graphs on a GPU, wall clock on the CPU) and keeps the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.t0 = time.perf_counter()
        self.out: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if self.cuda else "cpu (smoke)", "torch": torch.__version__,
            "python": platform.python_version(), "smoke": args.smoke, "budget_s": args.budget_s,
            "note": "timing only: round-to-nearest quantization of synthetic weights, accuracy not measured here",
            "copy_GBps": None, "gemm": [], "crossovers": {}, "decode": [], "tuned_configs": [],
            "fp8_path_choices": [], "skipped": []}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def time_ms(self, fn: Callable[[], Any]) -> float:
        fn()  # autotune / warm up outside the graph
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench_cudagraph  # noqa: PLC0415 (triton: GPU runs only)

        torch.cuda.synchronize()
        return float(do_bench_cudagraph(fn, rep=self.args.rep, return_mode="median"))

    def save(self) -> None:
        self.out["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out["tuned_configs"] = tuned_configs()
        self.out["fp8_path_choices"] = CHOOSER.table()
        Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.args.out).write_text(json.dumps(self.out, indent=1))

    # ------------------------------------------------------------------ parts
    def copy_bandwidth(self) -> None:
        n = (2**30 if self.cuda else 2**20) // 2
        src = torch.empty(n, dtype=torch.bfloat16, device=self.dev)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        self.out["copy_GBps"] = 2 * n * 2 / ms / 1e6
        print(f"device-to-device copy: {self.out['copy_GBps']:.0f} GB/s", flush=True)

    def gemm(self, model: str, config: ModelConfig) -> None:
        dev, rows = self.dev, self.out["gemm"]
        group = 32 if self.args.smoke else 128
        copy_bw = self.out["copy_GBps"]
        shapes = linear_shapes(config, not config.tie_word_embeddings)
        if self.args.smoke:  # a dry run: one linear with and one without AWQ's pre_quant_scale
            shapes = {s: shapes[s] for s in ("qkv_proj", "down_proj")}
        variants = GEMM_VARIANTS + (FP8_PER_TOKEN_VARIANTS if self.args.fp8_per_token or self.args.smoke else []) \
            + (GPTQ_VARIANTS if self.args.gptq or self.args.smoke else [])
        for lin_name, (n, k, pqs) in shapes.items():
            if self.left() <= 0:
                self.out["skipped"].append(f"gemm {model} {lin_name}")
                continue
            w = (torch.randn(n, k, device=dev) * 0.02).to(torch.bfloat16)
            base: dict[int, float] = {}
            for name, algo, variant, extra in variants:
                if algo is None:
                    copies = max(1, min(32, math.ceil(4 * L2_BYTES / (2 * n * k)))) if self.cuda else 1
                    ws = [w] + [w.clone() for _ in range(copies - 1)]
                    calls = [lambda x, wi=wi: F.linear(x, wi) for wi in ws]
                    ref, path, nbytes = None, "F.linear (cuBLAS)", 2 * n * k
                else:
                    qc = QuantConfig(algo, group_size=group, **extra)
                    st = stored_tensors(w, qc, pqs)
                    kw = dict(bias=False, device=dev, dtype=torch.bfloat16)
                    first = build_linear({f"l.{s}": t for s, t in st.items()}, ["l"], qc, **kw)
                    copies = max(1, min(32, math.ceil(4 * L2_BYTES / first.weight_bytes))) if self.cuda else 1
                    layers = [first] + [build_linear({f"l.{s}": t.clone() for s, t in st.items()}, ["l"], qc, **kw)
                                        for _ in range(copies - 1)]
                    calls = [self.variant_call(lin, variant) for lin in layers]
                    ref = build_linear({f"l.{s}": t for s, t in st.items()}, ["l"], qc, force_reference=True, **kw)
                    if variant == "stream_wo":  # the weight-only product: bf16 activations as they are
                        deq = first.dequantized_weight()
                        ref = lambda x, deq=deq: x.float() @ deq.T  # noqa: E731
                    path = {"stream": "triton stream_gemm", "stream_wo": "triton stream_gemm, weight-only",
                            "dequant": "triton dequantize + cuBLAS"}.get(variant, first.path.split(" / ")[-1])
                    nbytes = first.weight_bytes
                for m in self.args.ms:
                    if (variant in STREAM_VARIANTS and m > 64) or (variant == "dequant" and m < 16):
                        continue
                    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                    us = self.time_ms(lambda cs=calls, x=x: [c(x) for c in cs]) * 1e3 / len(calls)
                    if algo is None:
                        base[m] = us
                    gbps = nbytes / us / 1e3
                    err = _rel(calls[0](x), ref(x)) if ref is not None else 0.0
                    rows.append(dict(model=model, linear=lin_name, out_features=n, in_features=k, M=m, scheme=name,
                                     variant=variant, path=path, us=us, weight_bytes=nbytes, weight_GBps=gbps,
                                     frac_copy_bw=gbps / copy_bw, speedup_vs_bf16=base[m] / us, copies=len(calls),
                                     rel_err_vs_reference=err))
                del calls, ref
            gc.collect()
            for m in self.args.ms:
                line = [f"{r['scheme']}{'/' + r['variant'] if r['variant'] else ''} {r['us']:.1f}"
                        f" ({r['frac_copy_bw']:.0%})" for r in rows
                        if r["model"] == model and r["linear"] == lin_name and r["M"] == m]
                print(f"{model} {lin_name} ({n}x{k}) M={m}: " + ", ".join(line), flush=True)
        self.crossovers(model)

    @staticmethod
    def variant_call(lin: Any, variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The call that times one variant of a quantized layer (FP8: one path, not the timed choice)."""
        if isinstance(lin, linear_mod.FP8Linear):
            if variant in STREAM_VARIANTS:
                return lambda x: lin.forward_stream(x, weight_only=variant == "stream_wo")
            return lin.forward_scaled_mm
        lin.stream_max_m = 64 if variant == "stream" else 0  # weight-only: stream, or dequantize + cuBLAS
        return lin

    def crossovers(self, model: str) -> None:
        """Largest measured M up to which `stream` is at least as fast as the scheme's other variant."""
        rows = [r for r in self.out["gemm"] if r["model"] == model]
        for name in sorted({r["scheme"] for r in rows if r["variant"] == "stream"}):
            best = 0
            for m in sorted({r["M"] for r in rows if r["scheme"] == name and r["variant"] == "stream"}):
                t = {(r["variant"], r["linear"]): r["us"] for r in rows if r["scheme"] == name and r["M"] == m}
                if any(v != "stream" and t[(v, lin)] < t[("stream", lin)] for v, lin in t):
                    break
                best = m
            self.out["crossovers"][f"{model}/{name}"] = {"stream_max_m": best}

    def decode(self, model: str) -> None:
        dev = "cuda" if self.cuda else "cpu"
        layers = 1 if self.args.smoke else None
        # the smoke run decodes one layer in float32 on the CPU (reference linears; the GEMM part ran the kernels)
        base = ModelLoader.synthetic(model, device=dev, dtype=torch.bfloat16 if self.cuda else torch.float32,
                                     num_layers=layers)
        bf16: dict[int, float] = {}
        for scheme, fields in DECODE_SCHEMES.items():
            if fields and fields.get("quantize_lm_head") and base.config.tie_word_embeddings:
                continue  # a tied lm_head reads the (never quantized) embedding
            if self.left() < (25 if "8b" in model else 10):
                self.out["skipped"].append(f"decode {model} {scheme}")
                continue
            t0 = time.perf_counter()
            loaded = base if fields is None else rtn_quantize(base, QuantConfig(
                **fields, group_size=32 if self.args.smoke else 128))
            quant_s = time.perf_counter() - t0
            # fp8_wo: every FP8 layer streams bf16 activations x fp8 weights (read when the graphs are captured)
            linear_mod.FP8Linear.weight_only_decode = scheme == "fp8_wo"
            engine, kv = build_engine(loaded, self.args.batch_sizes, self.args.context, self.args.steps, dev)
            net = engine.network.to_frame()
            for b in self.args.batch_sizes:
                sps = time_decode(engine, kv, b, self.args.context, self.args.steps)
                if scheme == "bf16":
                    bf16[b] = sps
                row = dict(model=model, scheme=scheme, batch_size=b, steps_per_s=sps, tokens_per_s=sps * b,
                           ms_per_step=1e3 / sps, speedup_vs_bf16=sps / bf16[b] if b in bf16 else None,
                           weight_bytes=int(net["weight_bytes"].sum()), quantize_s=round(quant_s, 2))
                self.out["decode"].append(row)
                print(f"decode {model} {scheme} batch {b}: {sps:.1f} steps/s, {row['ms_per_step']:.3f} ms"
                      + (f", {row['speedup_vs_bf16']:.2f}x bf16" if row["speedup_vs_bf16"] else ""), flush=True)
            linear_mod.FP8Linear.weight_only_decode = False
            del engine, kv, loaded
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            self.save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/quant_gemm.py needs a CUDA GPU (or --smoke for a CPU dry run)")
    if args.smoke:
        args.ms, args.batch_sizes, args.steps, args.rep, args.budget_s = [1, 80], [1, 2], 2, 1, 1e9
    r = Runner(args)
    r.copy_bandwidth()
    torch.manual_seed(0)
    smoke_cfg = ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            rms_norm_eps=1e-5, max_position_embeddings=256)
    models = ["qwen2.5-0.5b"] if args.smoke else args.models
    for model in models:
        for part in args.parts:
            if r.left() <= 0:
                r.out["skipped"].append(f"{part} {model}")
                continue
            if part == "gemm" and args.smoke:  # the CUDA fast paths, through Triton's interpreter, tiny shapes
                fast_ok = {cls: cls._fast_ok for cls in (linear_mod.WeightOnlyLinear, linear_mod.FP8Linear)}
                for cls in fast_ok:
                    cls._fast_ok = lambda self: True
                r.gemm(model, smoke_cfg)
                for cls, fn in fast_ok.items():
                    cls._fast_ok = fn
            elif part == "gemm":
                r.gemm(model, ModelConfig(**SYNTHETIC_PRESETS[model]))
            else:
                r.decode(model)
            r.save()
            print(f"-- {part} {model} done at {time.perf_counter() - r.t0:.0f} s", flush=True)
    r.save()
    print(f"wrote {args.out}; crossovers {r.out['crossovers']}; skipped {r.out['skipped']}", flush=True)
    return r.out


if __name__ == "__main__":
    main()
