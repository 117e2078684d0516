"""RoPE fused with the KV-cache write: one kernel from the qkv GEMM's output to the paged cache.

After the fused q/k/v projection, the unfused step is: split (views), rotate q and k (a
negation, a concatenation, two products and a sum each, over cos / sin tables built from
the positions), then scatter k and v into the paged cache at `slot_mapping`. Here one
program per (token, head) reads its head straight out of the qkv output (q, k and v may
be strided views of it), computes cos / sin of `position * inv_freq` in float32, and
writes either the rotated query head into `q_out`, or the rotated key head and the value
head into the cache slot of the token. Only 16-bit and float32 caches take this path; an
8-bit cache quantizes on write (`kit/quantization/kv_cache.py`) and keeps the unfused one.

The reference (`rope_kv_write_reference`) is `kit.ops.rope_cos_sin` + `kit.ops.apply_rope`
and the same scatter: the kernel differs from it by rounding only (it rotates in float32
and rounds once; the reference rounds cos / sin and each product to the dtype).

    q_rot = rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    # q, k, v (T, H|KVH, D) views; caches (num_blocks, block_size, KVH, D); q_rot (T, H, D)
"""

from __future__ import annotations

from typing import Any

import torch

from kit.kernels._triton import jit, next_pow2, resolve_impl, triton_module
from kit.kernels.launches import counted
from kit.ops import apply_rope, rope_cos_sin

__all__ = ["rope_kv_write", "rope_kv_write_reference"]

tl: Any = None  # triton.language, set on the first Triton call
_rotate_store: Any = None  # jit(_rotate_store_fn), set with `tl`: the kernel calls it for q and for k


def _rotate_store_fn(src, dst, i, ok, c, s, HALF: tl.constexpr):
    """Rotate one head by (c, s) in float32 (its halves at src and src + HALF) and store it at dst."""
    a = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + i, (a * c - b * s).to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + i, (b * c + a * s).to(dst.dtype.element_ty), mask=ok)


def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_cs, stride_ch, stride_vs, stride_vch,
                    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, HALF_PAD)
    ok = i < HALF
    ang = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_ptr + i, mask=ok, other=0.0)  # (HALF,)
    # NOTE: Cody-Waite reduction to [0, 2pi): 2pi = 6.28125 + 0.00193..., the first part short enough that
    # turns * 6.28125 is exact in float32, so cos / sin of long-context angles stay as exact as the angle
    turns = tl.floor(ang * 0.15915494309189535)
    ang = (ang - turns * 6.28125) - turns * 0.0019353071795864769
    c = tl.cos(ang)
    s = tl.sin(ang)
    if h < NUM_HEADS:  # a query head: rotate into q_out
        _rotate_store(q_ptr + t * stride_qt + h * stride_qh, qo_ptr + t * stride_ot + h * stride_oh, i, ok, c, s,
                      HALF)
    else:  # a kv head: rotate k, copy v, both into the token's cache slot
        kvh = h - NUM_HEADS
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            _rotate_store(k_ptr + t * stride_kt + kvh * stride_kh, kc_ptr + slot * stride_cs + kvh * stride_ch, i, ok,
                          c, s, HALF)
            vsrc = v_ptr + t * stride_vt + kvh * stride_vh
            vdst = vc_ptr + slot * stride_vs + kvh * stride_vch
            v1 = tl.load(vsrc + i, mask=ok, other=0.0)
            v2 = tl.load(vsrc + HALF + i, mask=ok, other=0.0)
            tl.store(vdst + i, v1.to(vc_ptr.dtype.element_ty), mask=ok)
            tl.store(vdst + HALF + i, v2.to(vc_ptr.dtype.element_ty), mask=ok)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"q must be (T, H, D), k and v (T, KVH, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or d % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share T and an even head_dim")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k and v must have contiguous heads (stride 1 along head_dim)")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache / v_cache must be (num_blocks, block_size, {k.shape[1]}, {d}), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.element_size() < 2 or not k_cache.is_floating_point():
        raise ValueError(f"rope_kv_write writes 16- or 32-bit caches; a {k_cache.dtype} cache quantizes on write")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"positions and slot_mapping must be ({t},), got {tuple(positions.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    if inv_freq.shape != (d // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be ({d // 2},) float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")


def _launch(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    global tl, _rotate_store
    tl = triton_module()[1]
    _rotate_store = jit(_rotate_store_fn)
    kernel = jit(_rope_kv_kernel)
    t, num_heads, d = q.shape
    num_kv = k.shape[1]
    q_out = torch.empty(t, num_heads, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    kc = k_cache.view(-1, num_kv, d)  # (slots, KVH, D)
    vc = v_cache.view(-1, num_kv, d)
    kernel[(t, num_heads + num_kv)](
        q, k, v, positions, inv_freq, q_out, kc, vc, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        NUM_HEADS=num_heads, HALF=d // 2, HALF_PAD=next_pow2(d // 2), num_warps=1,
    )
    return q_out


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor,
                            cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The unfused path: `apply_rope` over `rope_cos_sin` tables ((T, 1, D), or computed here), then the scatter."""
    if cos_sin is None:
        cos, sin = rope_cos_sin(positions, inv_freq, q.dtype)
        cos_sin = cos[:, None, :], sin[:, None, :]
    cos, sin = cos_sin
    q_rot = apply_rope(q, cos, sin)
    k_rot = apply_rope(k, cos, sin)
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d)[slot_mapping] = k_rot.to(k_cache.dtype)
    v_cache.view(-1, kvh, d)[slot_mapping] = v.to(v_cache.dtype)
    return q_rot


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None, impl: str = "auto") -> torch.Tensor:
    """Rotate q and k, write rotated k and v into the caches at `slot_mapping`; returns rotated q (T, H, D).

    `cos_sin`: the reference's (T, 1, D) tables when the caller already has them (the Triton
    kernel computes its own). A negative slot skips the token's write.
    """
    _check(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    if resolve_impl(impl, q) == "triton":
        return counted("rope_kv_write", _launch, q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    return counted("rope_kv_write", rope_kv_write_reference, q, k, v, positions, inv_freq, k_cache, v_cache,
                   slot_mapping, cos_sin)
