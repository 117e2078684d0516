"""Draft-target speculative decoding against plain decoding of the target, same run, same GPU.

Synthetic models, acceptance forced BY CONSTRUCTION (documented here and in the JSON):

- the target is `llama-3.1-8b` with random weights (bf16), except that in every layer after
  the first its output projections (`o_proj`, `down_proj`) are zero: those layers run all their
  matmuls and attention, but add nothing to the residual stream;
- the draft shares the target's embedding, FIRST layer, final norm and head (~10x fewer weight
  bytes read per token: 1 layer + head against 32 layers + head).

So the target's logits equal the draft's up to kernel rounding, greedy drafts are (almost)
always accepted, and the speedup measured is the mechanism's ceiling for that draft length:
what k drafts and one verifying forward cost against k + 1 plain decode steps. Real drafts
accept less (see bench/results/spec_acceptance_cpu.json for SmolLM2).

    python bench/spec_decode.py --out bench/results/spec_decode_h100.json     (GPU, ~120 s)
    python bench/spec_decode.py --smoke --out /tmp/spec_decode_smoke.json      (CPU, seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import torch

from kit.builder import BuildConfig, Builder
from kit.kv_cache_config import KvCacheConfig
from kit.llm import LLM
from kit.loader import LoadedModel, ModelLoader
from kit.sampling_params import SamplingParams
from kit.speculative import DraftTargetDecodingConfig

CONSTRUCTION = ("target: random weights, o_proj and down_proj zero in layers 1..L-1 (computed, adding nothing); "
                "draft: the target's embedding, layer 0, final norm and head")


def models(preset: str, device: str, dtype: torch.dtype, num_layers: int | None) -> tuple[LoadedModel, LoadedModel]:
    target = ModelLoader.synthetic(preset, device=device, dtype=dtype, num_layers=num_layers)
    w = target.weights
    for i in range(1, target.config.num_hidden_layers):
        w[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        w[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    cfg = dataclasses.replace(target.config, num_hidden_layers=1)
    dw = {k: v for k, v in w.items() if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    draft = LoadedModel(cfg, dw, None, name=f"draft-of-{preset}", source_format="synthetic")
    return target, draft


def weight_bytes(m: LoadedModel) -> int:
    # NOTE: per token a decode step reads every matrix but the embedding table (one row of it)
    return sum(v.numel() * v.element_size() for k, v in m.weights.items() if k != "model.embed_tokens.weight"
               or m.config.tie_word_embeddings)


def timed_generate(llm: LLM, prompts: list[list[int]], sp: SamplingParams, sync) -> tuple[float, list]:
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)  # warm
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    sync()
    return time.perf_counter() - t0, outs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="CPU, a 4-layer qwen2.5-0.5b-shaped target, few tokens")
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--draft-lens", nargs="+", type=int, default=[2, 4, 6])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    t_start = time.perf_counter()
    if args.smoke:
        args.preset, args.batch_sizes, args.draft_lens, args.prompt_len, args.max_tokens = "qwen2.5-0.5b", [1, 2], [2], 16, 12
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    target, draft = models(args.preset, device, dtype, 4 if args.smoke else None)
    max_batch = max(args.batch_sizes)
    bc = BuildConfig(max_batch_size=max_batch, max_input_len=args.prompt_len, max_num_tokens=max(256, max_batch * 8),
                     max_seq_len=args.prompt_len + args.max_tokens + 8)
    builder = Builder("torch", device=device)
    target_engine = builder.get_engine(target, bc, progress=False).engine
    draft_engine = builder.get_engine(draft, bc, progress=False).engine
    blocks = KvCacheConfig(num_blocks=max_batch * (-(-bc.max_seq_len // bc.block_size)) + 8)
    g = torch.Generator().manual_seed(0)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "preset": args.preset, "dtype": str(dtype).replace("torch.", ""), "construction": CONSTRUCTION,
           "target_weight_bytes": weight_bytes(target), "draft_weight_bytes": weight_bytes(draft),
           "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "greedy": True, "runs": []}
    out["draft_size_ratio"] = round(out["target_weight_bytes"] / out["draft_weight_bytes"], 2)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = {b: [torch.randint(0, target.config.vocab_size, (args.prompt_len,), generator=g).tolist()
                   for _ in range(b)] for b in args.batch_sizes}
    plain = {}
    with LLM(target_engine, kv_cache_config=blocks) as llm:
        for b in args.batch_sizes:
            plain[b] = timed_generate(llm, prompts[b], sp, sync)
    for k in args.draft_lens:
        cfg = DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir=draft_engine)
        with LLM(target_engine, kv_cache_config=blocks, speculative_config=cfg) as llm:
            for b in args.batch_sizes:
                seconds, outs = timed_generate(llm, prompts[b], sp, sync)
                base_s, base_outs = plain[b]
                same = sum(o.outputs[0].token_ids == r.outputs[0].token_ids for o, r in zip(outs, base_outs))
                st = sum((o.spec_stats for o in outs[1:]), outs[0].spec_stats)
                tokens = b * args.max_tokens
                row = {"batch_size": b, "max_draft_len": k, "plain_tokens_per_s": round(tokens / base_s, 1),
                       "spec_tokens_per_s": round(tokens / seconds, 1), "speedup": round(base_s / seconds, 3),
                       "acceptance_rate": round(st.acceptance_rate, 4), "tokens_per_forward": round(st.tokens_per_forward, 3),
                       "outputs_identical": f"{same}/{b}"}
                out["runs"].append(row)
                print(f"bs {b:2d} k {k}: plain {row['plain_tokens_per_s']:8.1f} tok/s  speculative "
                      f"{row['spec_tokens_per_s']:8.1f} tok/s  speedup {row['speedup']:.2f}x  acceptance "
                      f"{row['acceptance_rate']:.1%}  tokens/forward {row['tokens_per_forward']:.2f}  identical {same}/{b}",
                      flush=True)
                with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                    json.dump(out, f, indent=2)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"draft is {out['draft_size_ratio']}x smaller (weight bytes read per token); {out['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
