"""The lowered TensorRT graph, op for op, in PyTorch: how its math is tested where a plan cannot run.

`reference_forward` takes the plan's inputs (input_ids, position_ids, a contiguous
past K/V per layer) and returns its outputs (float32 logits for every new position,
present K/V), computing each kind of layer with `kit/ops.py` the way the lowering
does: scores in float32 times the scale, masked with `ops.causal_mask` from the
shapes (new tokens follow the cached ones), GQA by grouping query heads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kit.backends.tensorrt_common import NEG
from kit.layer_kinds import check_covers
from kit.network import Layer, Network
from kit.ops import apply_rope, causal_mask, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

__all__ = ["reference_forward", "KV"]

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value) of one layer, each (B, KVH, len, D)
Env = dict[str, torch.Tensor]


class _Reference:
    """One forward pass over a contiguous cache; one method per kind of `kit/layer_kinds.py`."""

    def __init__(self, network: Network, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 past_kv: Sequence[KV] | None, dtype: torch.dtype) -> None:
        c = self.config = network.config
        self.network, self.input_ids, self.dtype = network, input_ids, dtype
        self.dev = dev = input_ids.device
        self.bsz, self.s_len = input_ids.shape
        kvh, d = c.num_key_value_heads, c.head_dim
        if past_kv is None:
            past_kv = [(torch.zeros(self.bsz, kvh, 0, d, dtype=dtype, device=dev),) * 2
                       for _ in range(c.num_hidden_layers)]
        self.past_kv = past_kv
        past_len = past_kv[0][0].shape[2]
        qpos = torch.arange(self.s_len, device=dev) + past_len  # (S,) new tokens follow the cached ones
        self.mask = causal_mask(qpos, torch.arange(past_len + self.s_len, device=dev), c.sliding_window)  # (S, L)
        cos, sin = rope_cos_sin(position_ids, rope_inv_freq(c), dtype)  # (B, S, D)
        self.cos, self.sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, S, 1, D)
        self.present: list[KV] = []

    def w(self, name: str) -> torch.Tensor:
        return self.network.weights[name].to(self.dev, self.dtype)

    def cat_w(self, prefix: str, names: Sequence[str], suffix: str) -> torch.Tensor:
        return torch.cat([self.w(f"{prefix}.{m}.{suffix}") for m in names], 0)

    def embedding(self, layer: Layer, env: Env) -> None:
        env["hidden"] = self.w(layer.weights[0])[self.input_ids.long()]  # (B, S, H)

    def rmsnorm(self, layer: Layer, env: Env) -> None:
        env[layer.outputs[0]] = rms_norm(env[layer.inputs[0]], self.w(layer.weights[0]), layer.attrs["eps"])

    def qkv_proj(self, layer: Layer, env: Env) -> None:
        c = self.config
        attn, parts = layer.weights[0].rsplit(".", 2)[0], ("q_proj", "k_proj", "v_proj")
        qkv = env["x"] @ self.cat_w(attn, parts, "weight").T
        if layer.attrs["bias"]:
            qkv = qkv + self.cat_w(attn, parts, "bias")
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], -1)
        env["q"] = q.reshape(self.bsz, self.s_len, c.num_attention_heads, c.head_dim)  # (B, S, H, D)
        env["k"] = k.reshape(self.bsz, self.s_len, c.num_key_value_heads, c.head_dim)
        env["v"] = v.reshape(self.bsz, self.s_len, c.num_key_value_heads, c.head_dim)

    def qk_norm(self, layer: Layer, env: Env) -> None:
        env["q"] = rms_norm(env["q"], self.w(layer.weights[0]), layer.attrs["eps"])
        env["k"] = rms_norm(env["k"], self.w(layer.weights[1]), layer.attrs["eps"])

    def rotary(self, layer: Layer, env: Env) -> None:
        env["q"] = apply_rope(env["q"], self.cos, self.sin)
        env["k"] = apply_rope(env["k"], self.cos, self.sin)

    def attention(self, layer: Layer, env: Env) -> None:
        c, dtype = self.config, self.dtype
        kvh, d, g = c.num_key_value_heads, c.head_dim, c.num_attention_heads // c.num_key_value_heads
        past_k, past_v = self.past_kv[layer.attrs["layer_idx"]]
        k = torch.cat((past_k.to(dtype), env["k"].transpose(1, 2)), 2)  # (B, KVH, L, D)
        v = torch.cat((past_v.to(dtype), env["v"].transpose(1, 2)), 2)
        self.present.append((k, v))
        q = env["q"].reshape(self.bsz, self.s_len, kvh, g, d).permute(0, 2, 3, 1, 4)  # (B, KVH, G, S, D)
        scores = (q @ k[:, :, None].transpose(-1, -2)).float() * layer.attrs["scale"]  # (B, KVH, G, S, L)
        scores = torch.where(self.mask, scores, torch.tensor(NEG, device=self.dev))
        out = scores.softmax(-1).to(dtype) @ v[:, :, None]  # (B, KVH, G, S, D)
        env["attn"] = out.permute(0, 3, 1, 2, 4).reshape(self.bsz, self.s_len, -1)  # (B, S, H*D)

    def o_proj(self, layer: Layer, env: Env) -> None:
        y = env["attn"] @ self.w(layer.weights[0]).T
        if layer.attrs["bias"]:
            y = y + self.w(layer.weights[1])
        env["hidden"] = env["hidden"] + y

    def mlp(self, layer: Layer, env: Env) -> None:
        mlp, inter = layer.weights[0].rsplit(".", 2)[0], layer.attrs["intermediate_size"]
        gu = env["x"] @ self.cat_w(mlp, ("gate_proj", "up_proj"), "weight").T
        if layer.attrs["bias"]:
            gu = gu + self.cat_w(mlp, ("gate_proj", "up_proj"), "bias")
        gate, up = gu.split([inter, inter], -1)
        y = swiglu(gate, up) @ self.w(f"{mlp}.down_proj.weight").T
        if layer.attrs["bias"]:
            y = y + self.w(f"{mlp}.down_proj.bias")
        env["hidden"] = env["hidden"] + y

    def lm_head(self, layer: Layer, env: Env) -> None:
        env["logits"] = (env["x"] @ self.w(layer.weights[0]).T).float()  # (B, S, V)

    RUN: dict[str, Callable[["_Reference", Layer, Env], None]] = {
        "embedding": embedding, "rmsnorm": rmsnorm, "qkv_proj": qkv_proj, "qk_norm": qk_norm, "rope": rotary,
        "attention": attention, "o_proj": o_proj, "mlp": mlp, "lm_head": lm_head,
    }


check_covers("reference_forward", _Reference.RUN)


def reference_forward(network: Network, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      past_kv: Sequence[KV] | None = None, *,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[KV]]:
    """The lowered graph, op for op, in PyTorch: same inputs, outputs and contiguous KV as the plan.

    input_ids / position_ids (B, S); past_kv[i] = (k, v) of (B, KVH, P, D) or None for an empty
    cache. Returns logits (B, S, V) in float32 and present_kv[i] of (B, KVH, P + S, D).
    """
    if network.quant_config is not None:
        raise ValueError("reference_forward supports unquantized networks only")
    dtype = dtype or next(iter(network.weights.values())).dtype
    ref = _Reference(network, input_ids, position_ids, past_kv, dtype)
    env: Env = {}
    for layer in network.layers:
        ref.RUN[layer.kind](ref, layer, env)
    return env["logits"], ref.present
