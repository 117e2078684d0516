"""8-bit KV caches: are the Triton attention kernels as close to float32 as the reference attention is?

The engine once routed int8 / fp8 caches to the reference attention (`kit.ops.paged_attention`, a padded
gather) because a GPU test saw the kernels' bf16 logits disagree with the reference's bf16 logits (top-1
0.67 over 18 positions of a tiny random model). Two bf16 computations that round differently disagree on
every near-tied logit, so that figure alone cannot tell a bug from rounding. This script holds both bf16
paths to the same float32 computation (the same bf16 weights upcast, the same 8-bit cache format, the
reference attention) and reports, per model and cache format:

* `kernels` and `reference`: relative RMS logit error against float32, max |diff|, top-1 agreement;
* `kernels_vs_reference`: the test's old figures (top-1 agreement and max |diff| between the two bf16 paths);
* `one_ulp`: the bf16 reference with one embedding element moved by one bf16 ulp, against the unmodified
  bf16 reference: how often a change too small to matter flips the top-1 on these weights.

Every engine runs the same steps with the same tokens (prompts of several lengths in one prefill step,
then teacher-forced decode steps replayed from CUDA graphs on a GPU), so an error cannot compound through
a different sampled token. Results: JSON (`--out`).

    python3 bench/kv8_parity.py --out bench/results/kv8_parity_h200.json        # on a GPU
    TRITON_INTERPRET=1 python3 bench/kv8_parity.py --models tiny --smoke         # CPU: float16, the interpreter
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kit.backends.torch_backend import TorchBackend  # noqa: E402
from tp import one_ulp_up  # noqa: E402  (bench/tp.py, beside this script)
from kit.batch import ForwardBatch, KVCache, SequenceInput  # noqa: E402
from kit.config import ModelConfig  # noqa: E402
from kit.engine import Engine  # noqa: E402
from kit.loader import LoadedModel, ModelLoader, random_weights  # noqa: E402
from kit.network import Network, NetworkBuilder  # noqa: E402

BLOCK = 16
KV_ALGOS = (None, "INT8", "FP8")


def tiny_network(device: torch.device) -> Network:
    """tests/test_attention_engine.py's model (head_dim 64), bf16 weights."""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048)
    weights = random_weights(cfg, seed=3, std=0.3, dtype=torch.bfloat16, device=device)
    return NetworkBuilder(LoadedModel(cfg, weights, name="tiny", source_format="synthetic")).build()


def network_for(name: str, device: torch.device, num_layers: int | None) -> Network:
    if name == "tiny":
        return tiny_network(device)
    loaded = ModelLoader.synthetic(name, dtype=torch.bfloat16, device=device, num_layers=num_layers)
    return NetworkBuilder(loaded).build()


def plan(prompt_lens: list[int], decode_steps: int, vocab: int) -> tuple[list[list[SequenceInput]], list[list[int]]]:
    """One prefill step of every prompt, then `decode_steps` teacher-forced decode steps; disjoint block tables."""
    g = torch.Generator().manual_seed(0)
    tables, first = [], 0
    for n in prompt_lens:
        blocks = -(-(n + decode_steps) // BLOCK)
        tables.append(list(range(first, first + blocks)))
        first += blocks
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    steps = [[SequenceInput(p, 0, t) for p, t in zip(prompts, tables)]]
    for k in range(decode_steps):
        toks = torch.randint(1, vocab, (len(prompts),), generator=g).tolist()
        steps.append([SequenceInput([tok], n + k, t) for tok, n, t in zip(toks, prompt_lens, tables)])
    return steps, tables


def run(engine: Engine, steps: list[list[SequenceInput]], tables: list[list[int]], kv_algo: str | None,
        graphs: bool) -> torch.Tensor:
    """Every step's logits (one row per sequence), float32 on the CPU: (steps * seqs, vocab)."""
    num_blocks = sum(len(t) for t in tables) + 1
    kv = KVCache(engine.config, num_blocks=num_blocks, block_size=BLOCK, dtype=engine.backend.dtype,
                 device=engine.device, quant_algo=kv_algo)
    if graphs:
        engine.backend.capture_cuda_graphs(kv, [len(tables)], max_blocks=max(len(t) for t in tables))
    out = [engine.forward(ForwardBatch.build(inputs, BLOCK, device=engine.device), kv).float().cpu()
           for inputs in steps]
    return torch.cat(out)


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    diff = got - want
    return {"rel_rms_error": float(diff.pow(2).mean().sqrt() / want.pow(2).mean().sqrt()),
            "max_abs_diff": float(diff.abs().max()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def measure(name: str, network: Network, device: torch.device, prompt_lens: list[int], decode_steps: int,
            kv_algos: tuple) -> list[dict[str, Any]]:
    graphs = device.type == "cuda"
    low = torch.bfloat16 if graphs else torch.float16  # Triton's interpreter (the CPU) gets bf16 dots wrong
    steps, tables = plan(prompt_lens, decode_steps, network.config.vocab_size)
    rows = []
    for algo in kv_algos:
        t0 = time.perf_counter()
        engines = {
            "float32": TorchBackend(network, device=device, dtype=torch.float32, attention="reference"),
            "kernels": TorchBackend(network, device=device, dtype=low, attention="triton"),
            "reference": TorchBackend(network, device=device, dtype=low, attention="reference"),
        }
        logits = {k: run(Engine(network, b), steps, tables, algo, graphs) for k, b in engines.items()}
        table = network.weights["model.embed_tokens.weight"]
        tok = steps[0][0].token_ids[0]
        old = table[tok, 0].clone()
        table[tok, 0] = one_ulp_up(old)
        try:
            nudged = run(Engine(network, TorchBackend(network, device=device, dtype=low, attention="reference")),
                         steps, tables, algo, graphs)
        finally:
            table[tok, 0] = old
        truth = logits["float32"]
        row = {"model": name, "kv": (algo or "bf16").lower(), "positions": truth.shape[0],
               "prompt_lens": prompt_lens, "decode_steps": decode_steps, "cuda_graphs": graphs,
               "kernels": compare(logits["kernels"], truth), "reference": compare(logits["reference"], truth),
               "kernels_vs_reference": compare(logits["kernels"], logits["reference"]),
               "one_ulp": compare(nudged, logits["reference"]),
               "wall_s": round(time.perf_counter() - t0, 2)}
        print(f"{name:16s} {row['kv']:5s} vs float32: kernels rel RMS {row['kernels']['rel_rms_error']:.4f} "
              f"top-1 {row['kernels']['top1_agreement']:.3f} | reference {row['reference']['rel_rms_error']:.4f} "
              f"top-1 {row['reference']['top1_agreement']:.3f} | kernels vs reference top-1 "
              f"{row['kernels_vs_reference']['top1_agreement']:.3f} | one ulp top-1 "
              f"{row['one_ulp']['top1_agreement']:.3f}", flush=True)
        rows.append(row)
        del engines, logits
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,llama-3.2-1b", help="tiny and/or synthetic presets, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="short prompts, few steps (the CPU check)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompt_lens, decode_steps = ([40, 7, 40], 5) if args.smoke else ([1000, 200, 37], 32)
    rows = []
    for name in args.models.split(","):
        network = network_for(name, device, 2 if args.smoke else None)
        lens = [40, 7, 40] if name == "tiny" else prompt_lens
        rows += measure(name, network, device, lens, 5 if name == "tiny" else decode_steps, KV_ALGOS)
        del network
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke,
              "low_precision": "bfloat16" if device.type == "cuda" else "float16", "runs": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
