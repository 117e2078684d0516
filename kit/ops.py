"""The decoder's math, written once: RMSNorm, RoPE, causal masks, paged attention, SwiGLU.

Every place that computes a Llama-family block uses these functions: the PyTorch
backend (serving), `quantization/calibration.py` (what each linear sees during
calibration) and the TensorRT backend's `reference_forward` (the lowered graph's math,
checked on a machine where the plan cannot run). The TensorRT lowering builds the same
formulas out of TensorRT layers; its reference is checked against these functions.

    rms_norm(x, w, eps)        w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
    rope_inv_freq(config)      1 / theta^(2i / D), with linear / llama3 scaling
    rope_cos_sin(pos, inv)     cos / sin of pos * inv_freq, halves repeated: (..., D)
    apply_rope(x, cos, sin)    x * cos + rotate_half(x) * sin (HF layout)
    causal_mask(qpos, kpos)    key j visible to query i iff j <= i (and i - j < window)
    paged_attention(...)       causal attention over a paged KV cache (the reference)
    swiglu(gate, up)           silu(gate) * up
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kit.config import ModelConfig

if TYPE_CHECKING:  # NOTE: for the annotation only; kit.batch sits above kit.quantization, which uses these ops
    from kit.batch import ForwardBatch

__all__ = ["rms_norm", "rope_inv_freq", "rope_cos_sin", "apply_rope", "causal_mask", "paged_attention", "swiglu"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalize(x): in float32, back to the input dtype before the weight (as transformers does).

    NOTE: `F.rms_norm` is one fused kernel where PyTorch has one, instead of five elementwise ones.
    """
    dtype = x.dtype
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * xf.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies (D/2,) float32, with linear / llama3 scaling, computed as transformers does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if config.rope_type == "linear":
        return inv / factor
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    # long wavelengths are scaled by `factor`, short ones kept, a smooth ramp between
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (...,) -> cos, sin (..., D) in `dtype` (default float32); the two halves of D repeat."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., D)
    cos, sin = emb.cos(), emb.sin()
    return (cos, sin) if dtype is None else (cos.to(dtype), sin.to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated by cos / sin broadcast to it (e.g. (..., 1, D)); HF's rotate_half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean mask q_pos[..., None] vs k_pos[..., None, :]: True where the key is visible.

    q_pos (..., Q) and k_pos (..., K) are positions in the sequence; returns (..., Q, K).
    """
    q, k = q_pos[..., :, None], k_pos[..., None, :]
    mask = k <= q
    if sliding_window is not None:
        mask = mask & (k > q - sliding_window)
    return mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                    scale: float, sliding_window: int | None = None,
                    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of the batch's queries over their sequences' cached keys/values (the reference).

    q (T, H, D); k_cache / v_cache (num_blocks, block_size, KVH, D) for one layer,
    already holding this step's keys and values. An 8-bit cache passes its scales
    (num_blocks, block_size, KVH) and is dequantized right after the gather. Each
    sequence's blocks are gathered into a padded (S, max_seq_len) view and one
    `scaled_dot_product_attention` runs for the whole batch with a mask built from the
    token positions, so any mix of prompt chunks and decode tokens is correct. Returns (T, H, D).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, bs = batch.num_seqs, batch.block_size
    max_q, max_len = batch.max_query_len, batch.max_seq_len
    nb = -(-max_len // bs)
    tables = batch.block_tables[:, :nb]  # (S, nb)
    kvh = k_cache.shape[2]
    k = k_cache[tables].reshape(num_seqs, nb * bs, kvh, head_dim)[:, :max_len]  # (S, L, KVH, D)
    v = v_cache[tables].reshape(num_seqs, nb * bs, kvh, head_dim)[:, :max_len]
    if kv_scales is not None:
        ks = kv_scales[0][tables].reshape(num_seqs, nb * bs, kvh)[:, :max_len]
        vs = kv_scales[1][tables].reshape(num_seqs, nb * bs, kvh)[:, :max_len]
        k = (k.float() * ks[..., None]).to(q.dtype)
        v = (v.float() * vs[..., None]).to(q.dtype)
    # scatter the flat queries into a padded (S, max_q) grid
    qlens = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), qlens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=q.device) - batch.query_start_loc[seq_idx]
    qp = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    qp[seq_idx, row] = q
    qpos = torch.zeros(num_seqs, max_q, dtype=torch.long, device=q.device)  # padded rows see key 0 only
    qpos[seq_idx, row] = batch.positions
    mask = causal_mask(qpos, torch.arange(max_len, device=q.device), sliding_window)  # (S, max_q, L)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=kvh != num_heads,
    )  # (S, H, max_q, D)
    return out.transpose(1, 2)[seq_idx, row]  # (T, H, D)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the gated activation of the Llama MLP."""
    return F.silu(gate) * up
