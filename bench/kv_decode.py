"""The graphed decode step over a bf16, int8 or fp8 KV cache, at long contexts (GPU).

An 8-bit cache halves the bytes attention reads; at long contexts attention is a large share of a decode
step, so the step should shrink with it. For each context and batch: Llama-3.1-8B's shapes (synthetic bf16
weights), every sequence with `context` tokens in the cache, `steps` decode steps replayed from the
engine's CUDA graphs and timed with CUDA events, over
* a bf16 cache (the paged Triton kernels),
* an int8 and an fp8 cache through the same kernels (the default),
* the int8 cache through the reference attention (`attention="reference"`: a padded gather of every
  context, dequantized in bf16), the route 8-bit caches took before.
Each row gives ms per step and the ratio to the bf16 cache in the same run. JSON to --out.

    python3 bench/kv_decode.py --out bench/results/kv_decode_h200.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from decode_graphs import time_decode  # noqa: E402  (bench/decode_graphs.py, beside this script)
from kit.backends.torch_backend import TorchBackend  # noqa: E402
from kit.batch import KVCache  # noqa: E402
from kit.builder import BuildConfig  # noqa: E402
from kit.engine import Engine  # noqa: E402
from kit.loader import ModelLoader  # noqa: E402
from kit.network import NetworkBuilder  # noqa: E402

BLOCK = 16
CASES = (("bf16", None, "auto"), ("int8", "INT8", "auto"), ("fp8", "FP8", "auto"), ("int8 reference", "INT8", "reference"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--max-reference-tokens", type=int, default=64 * 2048,
                   help="run the reference attention only where batch x context is at most this")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    network = NetworkBuilder(ModelLoader.synthetic(a.model, dtype=torch.bfloat16, device="cuda",
                                                   num_layers=a.num_layers)).build()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": f"synthetic:{a.model}",
              "num_layers": network.config.num_hidden_layers, "steps": a.steps, "runs": []}
    for context in a.contexts:
        for batch in a.batch_sizes:
            max_seq = context + a.steps + BLOCK
            blocks = batch * -(-max_seq // BLOCK) + 1
            bc = BuildConfig(max_batch_size=batch, max_seq_len=max_seq, max_input_len=max_seq // 2,
                             use_cuda_graphs=True, block_size=BLOCK)
            base = None
            for label, algo, attention in CASES:
                if attention == "reference" and batch * context > a.max_reference_tokens:
                    continue  # the padded gather of every context: its transients outgrow the card
                t0 = time.perf_counter()
                engine = Engine(network, TorchBackend(network, device="cuda", dtype=torch.bfloat16,
                                                      attention=attention), build_config=bc)
                kv = KVCache(engine.config, blocks, BLOCK, dtype=torch.bfloat16, device="cuda", quant_algo=algo)
                engine.backend.capture_cuda_graphs(kv, [batch], max_blocks=-(-max_seq // BLOCK))
                ms = 1e3 / time_decode(engine, kv, batch, context, a.steps, BLOCK)
                base = base or ms
                row = {"context": context, "batch": batch, "kv": label, "attention": attention,
                       "ms_per_step": round(ms, 3), "tokens_per_s": round(batch * 1e3 / ms, 1),
                       "speedup_vs_bf16": round(base / ms, 3), "kv_cache_gib": round(kv.nbytes / 2 ** 30, 2), "wall_s": round(time.perf_counter() - t0, 1)}
                result["runs"].append(row)
                print(f"context {context:5d} batch {batch:3d} {label:15s} {ms:8.3f} ms/step  x{base / ms:.2f} vs bf16",
                      flush=True)
                engine.backend.graphs = engine.backend.mixed_graphs = None
                del engine, kv
                gc.collect()
                torch.cuda.empty_cache()
                Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
