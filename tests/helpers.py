"""Shared test helpers: tiny Hugging Face checkpoints of every supported family, and a
driver that runs sequences through the kit's engine in mixed chunks."""

from __future__ import annotations

from pathlib import Path

import torch

from kit.build_config import BuildConfig
from kit.engine import Engine, ForwardBatch, SequenceInput
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.network import NetworkBuilder

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

FAMILY_CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama3_rope": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, sliding_window=6, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=False),
}


def make_hf_checkpoint(family: str, path: Path, seed: int = 0):
    """Save a randomly initialised transformers model of `family`; return the HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY, **FAMILY_CONFIGS[family]}
    model_type = spec.pop("model_type")
    if "rope_scaling" in spec:
        rs = spec.pop("rope_scaling")
        spec["rope_parameters"] = {**rs, "rope_theta": spec["rope_theta"]}
    cfg = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # random norms and biases too, so that a mis-wired weight cannot hide behind ones/zeros
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return model


def engine_for(path_or_name, dtype=torch.float32, device="cpu") -> Engine:
    loaded = ModelLoader(path_or_name, dtype=dtype, device=device).load()
    return Engine.from_network(NetworkBuilder(loaded).build(), device=device, dtype=dtype)


def run_chunks(engine: Engine, seqs: list[list[int]], schedule: list[list[int]], block_size: int,
               block_order: list[int] | None = None) -> list[torch.Tensor]:
    """Feed each sequence through the engine in steps; return per-sequence logits of every position.

    `schedule[step][i]` is how many tokens of sequence i are computed at that step (0 = idle),
    so one step mixes prompt chunks and single decode tokens. Blocks are handed out in
    `block_order` (default ascending), interleaved between sequences.
    """
    needed = [-(-len(s) // block_size) for s in seqs]
    order = block_order if block_order is not None else list(range(sum(needed)))
    kv = engine.allocate_kv_cache(num_blocks=max(order) + 1, block_size=block_size)
    tables: list[list[int]] = [[] for _ in seqs]
    it = iter(order)
    for b in range(max(needed)):  # interleave: seq0 blk0, seq1 blk0, ..., seq0 blk1, ...
        for i in range(len(seqs)):
            if b < needed[i]:
                tables[i].append(next(it))
    done = [0] * len(seqs)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in schedule:
        inputs, owners = [], []
        for i, n in enumerate(step):
            if n:
                inputs.append(SequenceInput(seqs[i][done[i]:done[i] + n], done[i], tables[i], logits="all"))
                owners.append((i, n))
        if not inputs:
            continue
        batch = ForwardBatch.build(inputs, block_size, device=engine.device)
        logits = engine.forward(batch, kv)
        row = 0
        for i, n in owners:
            out[i].append(logits[row:row + n])
            row += n
            done[i] += n
    assert done == [len(s) for s in seqs], f"schedule does not cover the sequences: {done}"
    return [torch.cat(o) for o in out]


def complete_schedule(schedule: list[list[int]], seqs: list[list[int]]) -> list[list[int]]:
    """Clip a schedule to the sequences' lengths and add decode steps until each is covered."""
    done = [0] * len(seqs)
    out = []
    for step in schedule:
        row = [max(0, min(n, len(s) - d)) for n, s, d in zip(step, seqs, done)]
        done = [d + n for d, n in zip(done, row)]
        out.append(row)
    while any(d < len(s) for d, s in zip(done, seqs)):
        row = [1 if d < len(s) else 0 for d, s in zip(done, seqs)]
        done = [d + n for d, n in zip(done, row)]
        out.append(row)
    return out


def hf_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


def tiny_llm(path, **build):
    """An LLM over the checkpoint at `path` on the CPU (importable by name: engine-process tests spawn it)."""
    bc = BuildConfig(**{"max_batch_size": 8, "max_seq_len": 128, "max_input_len": 64, "max_num_tokens": 256, **build})
    return LLM(str(path), device="cpu", build_config=bc)


def error_against(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> tuple[float, float]:
    """(largest |logit difference|, top-1 agreement) of per-position logits against a reference, over all
    sequences: bf16 paths are held to a float32 reference this way (two bf16 paths round differently)."""
    worst, agree, total = 0.0, 0, 0
    for out, ref in zip(outs, refs):
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
        agree += (out.argmax(-1) == ref.argmax(-1)).sum().item()
        total += out.shape[0]
    return worst, agree / total
