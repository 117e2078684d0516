"""Per-layer profiles (prefill and decode) of SmolLM2 and a synthetic llama-3.2-1b, as JSON.

    python bench/profile_layers.py --out profiles.json [--trace-dir DIR] [--fuse off]

`--fuse off` profiles the PyTorch backend without its fused kernels (the layout of
bench/results/profiles_h100.json, measured before they existed); each profile records
`fuse`, the kernels each layer kind launches, and the per-kind roofline (`ProfiledEngine.roofline`).
"""

from __future__ import annotations

import argparse
import json

import torch

from kit.backends.torch_backend import TorchBackend
from kit.engine import Engine
from kit.loader import ModelLoader
from kit.network import NetworkBuilder
from kit.profiler import ProfiledEngine

CASES = [("prefill", 1, 512), ("decode", 1, 512), ("decode", 64, 512)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "synthetic:llama-3.2-1b"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--fuse", choices=["on", "off"], default="on")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "profiles": []}
    for name in args.models:
        if name.startswith("synthetic:"):
            loaded = ModelLoader.synthetic(name.split(":", 1)[1], device=device, dtype=dtype)
        else:
            loaded = ModelLoader(name, device=device, dtype=dtype).load()
        net = NetworkBuilder(loaded).build()
        prof = ProfiledEngine(Engine(net, TorchBackend(net, device=device, dtype=dtype, fuse=args.fuse == "on")))
        for phase, batch, seq in CASES:
            df = prof.profile(batch_size=batch, seq_len=seq, phase=phase, iters=args.iters)
            s = prof.last_summary
            kernels = prof.count_kernels(batch_size=batch, seq_len=seq, phase=phase)
            out["profiles"].append({"model": name, "fuse": args.fuse == "on", **s, "layers": df.to_dict(orient="records"),
                                    "by_kind": ProfiledEngine.by_kind(df).to_dict(orient="records"),
                                    "roofline_by_kind": prof.roofline().to_dict(orient="records"),
                                    "kernels_by_kind": kernels.groupby("kind", sort=False)["kernels"].sum().to_dict()})
            print(f"{name:<26}{phase:>8} b={batch:<3} unprofiled {s['unprofiled_ms']:8.3f} ms  sum of layers "
                  f"{s['profiled_sum_ms']:8.3f} ms  ({s['overhead_pct']:+.0f}%)  "
                  f"{s['total_bytes'] / 1e6:8.1f} MB -> {s['total_bytes'] / s['unprofiled_ms'] / 1e6:7.1f} GB/s")
        if args.trace_dir:
            prof.export_trace(f"{args.trace_dir}/trace_{name.replace(':', '_')}_decode.json", 1, 512, "decode")
        del prof, loaded
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
