"""The sampler's batch pass alone, greedy: one fused kernel against the unfused ops (GPU, seconds).

A greedy batch without penalties or top logprobs takes `kit/kernels/greedy.py`'s kernel: each row's
argmax and its log-probability in one read of the logits. `logprobs=0` (the sampled token's
logprob only) keeps the same tokens but takes the general path (float32 copy, log_softmax,
argmax, gather, packing): the baseline, in the same run. Batches of 64 and 1 rows over Llama-3's
128,256-token vocabulary and 64 rows over Qwen2.5's 151,936, bf16 logits; ms per pass from CUDA
events over 50 passes; the tokens of both paths are compared.

    python bench/sampler.py --out bench/results/sampler_greedy_h200.json
    python bench/sampler.py --smoke --out /tmp/sampler_smoke.json     # CPU, small vocabulary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kit.sampling import Sampler, SamplingContext
from kit.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    dev = "cpu" if a.smoke else "cuda"
    shapes = ((4, 1000), (1, 1000)) if a.smoke else ((64, 128256), (1, 128256), (64, 151936))
    out: dict = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
                 "passes": 50, "runs": []}
    for rows, vocab in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        logits = torch.randn(rows, vocab, device=dev, generator=g).to(torch.bfloat16 if dev == "cuda" else torch.float32)
        row: dict = {"rows": rows, "vocab": vocab}
        for name, sp in (("fused", SamplingParams(temperature=0.0, max_tokens=8)),
                         ("unfused", SamplingParams(temperature=0.0, max_tokens=8, logprobs=0))):
            ctx = [SamplingContext(sp, [1, 2], [3], None) for _ in range(rows)]
            sampler = Sampler()
            for _ in range(5):
                sampler.sample(logits, ctx)
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(out["passes"]):
                sampler.sample_async(logits, ctx)
            if dev == "cuda":
                torch.cuda.synchronize()
            row[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / out["passes"]
            row[f"{name}_tokens"] = sampler.sample(logits, ctx).token_ids
        row["speedup"] = row["unfused_ms"] / row["fused_ms"]
        row["same_tokens"] = row.pop("fused_tokens") == row.pop("unfused_tokens")
        out["runs"].append(row)
        print(f"{rows:3d} x {vocab:6d}: fused {row['fused_ms']:.3f} ms, unfused {row['unfused_ms']:.3f} ms "
              f"(x{row['speedup']:.2f}), same tokens {row['same_tokens']}", flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
