"""The float model, block by block, for calibration: token windows in, linear inputs out.

Calibration needs what each linear layer *sees*: its input activations on
representative text. This module runs a Llama-family model over HF-named weights one
decoder block at a time, with no KV cache and no serving machinery, so calibration
depends on nothing but the weights (the math is `kit/ops.py`'s, as in the engine):

    x = rmsnorm(h, input_layernorm)                    -> captured as "qkv"
    q, k, v = x @ Wq^T, x @ Wk^T, x @ Wv^T  (+ bias, qk-norm, RoPE)
    a = causal_attention(q, k, v)  (GQA, optional sliding window)
                                                       -> captured as "o"
    h = h + a @ Wo^T
    x = rmsnorm(h, post_attention_layernorm)           -> captured as "gate_up"
    m = silu(x @ Wg^T) * (x @ Wu^T)                    -> captured as "down"
    h = h + m @ Wd^T

Everything runs in float32 on the weights' device. `BlockRunner.set_weight` swaps in a
dequantized weight, which is how GPTQ feeds quantized outputs forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kit.config import ModelConfig
from kit.ops import apply_rope, causal_mask, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

__all__ = ["LinearGroup", "LINEAR_GROUPS", "BlockRunner", "embed", "final_norm", "MINI_BATCH"]

MINI_BATCH = 8  # calibration windows run through a block together


@dataclass(frozen=True)
class LinearGroup:
    """Linears of a block that read the same input (and the norm that produces it, if any)."""

    name: str
    members: tuple[str, ...]  # names inside the block, e.g. "self_attn.q_proj"
    norm: str | None  # the RMSNorm whose output they read: 1/s can be folded into it


LINEAR_GROUPS = (
    LinearGroup("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    LinearGroup("o", ("self_attn.o_proj",), None),
    LinearGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    LinearGroup("down", ("mlp.down_proj",), None),
)


def embed(weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, T, hidden) float32."""
    table = weights["model.embed_tokens.weight"]
    return F.embedding(tokens.to(table.device), table).float()


def final_norm(weights: dict[str, torch.Tensor], config: ModelConfig, hidden: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden, weights["model.norm.weight"].float(), config.rms_norm_eps)


class BlockRunner:
    """Decoder block `layer_idx` in float32, capturing the inputs of its linear groups."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], layer_idx: int) -> None:
        self.config, self.layer_idx = config, layer_idx
        p = f"model.layers.{layer_idx}."
        self.w = {k[len(p):]: v.float() for k, v in weights.items() if k.startswith(p)}  # float32 copies

    def weight(self, member: str) -> torch.Tensor:
        return self.w[f"{member}.weight"]

    def set_weight(self, member: str, w: torch.Tensor) -> None:
        self.w[f"{member}.weight"] = w.float()

    def _lin(self, x: torch.Tensor, member: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{member}.weight"], self.w.get(f"{member}.bias"))

    def _forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, want: set[str],
                 out: dict[str, list[torch.Tensor]], until: str | None) -> torch.Tensor | None:
        c, w = self.config, self.w
        B, T, _ = h.shape
        x = rms_norm(h, w["input_layernorm.weight"], c.rms_norm_eps)  # (B, T, hidden)
        if "qkv" in want:
            out["qkv"].append(x.reshape(B * T, -1))
        if until == "qkv":
            return None
        q = self._lin(x, "self_attn.q_proj").view(B, T, c.num_attention_heads, c.head_dim)
        k = self._lin(x, "self_attn.k_proj").view(B, T, c.num_key_value_heads, c.head_dim)
        v = self._lin(x, "self_attn.v_proj").view(B, T, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, w["self_attn.q_norm.weight"], c.rms_norm_eps)
            k = rms_norm(k, w["self_attn.k_norm.weight"], c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        pos = torch.arange(T, device=h.device)
        mask = causal_mask(pos, pos, c.sliding_window)  # (T, T)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           scale=c.head_dim ** -0.5,
                                           enable_gqa=c.num_key_value_heads != c.num_attention_heads)
        a = a.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        if "o" in want:
            out["o"].append(a.reshape(B * T, -1))
        if until == "o":
            return None
        h = h + self._lin(a, "self_attn.o_proj")
        x = rms_norm(h, w["post_attention_layernorm.weight"], c.rms_norm_eps)
        if "gate_up" in want:
            out["gate_up"].append(x.reshape(B * T, -1))
        if until == "gate_up":
            return None
        m = swiglu(self._lin(x, "mlp.gate_proj"), self._lin(x, "mlp.up_proj"))  # (B, T, intermediate)
        if "down" in want:
            out["down"].append(m.reshape(B * T, -1))
        if until == "down":
            return None
        return h + self._lin(m, "mlp.down_proj")

    @torch.no_grad()
    def run(self, hidden: torch.Tensor, want: set[str] = frozenset(), until: str | None = None
            ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """hidden (B, T, hidden) -> (block output or None if stopped at `until`,
        {group name: its input activations (B * T, in)} for the groups in `want`)."""
        cos, sin = rope_cos_sin(torch.arange(hidden.shape[1], device=hidden.device), rope_inv_freq(self.config))
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D): HF layout, the two halves of D rotate together
        captured: dict[str, list[torch.Tensor]] = {g: [] for g in want}
        outs = []
        for i in range(0, hidden.shape[0], MINI_BATCH):
            o = self._forward(hidden[i:i + MINI_BATCH].float(), cos, sin, set(want), captured, until)
            if o is not None:
                outs.append(o)
        return (torch.cat(outs) if outs else None), {g: torch.cat(v) for g, v in captured.items()}
