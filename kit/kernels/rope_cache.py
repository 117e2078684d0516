"""RoPE fused with the KV-cache write: one kernel from the qkv GEMM's output to the paged cache.

After the fused q/k/v projection, the unfused step is: split (views), rotate q and k (a
negation, a concatenation, two products and a sum each, over cos / sin tables built from
the positions), then scatter k and v into the paged cache at `slot_mapping`. Here one
program per (token, head) reads its head straight out of the qkv output (q, k and v may
be strided views of it), computes cos / sin of `position * inv_freq` in float32, and
writes either the rotated query head into `q_out`, or the rotated key head and the value
head into the cache slot of the token. An 8-bit cache (int8 / fp8 e4m3, with `k_scale` and
`v_scale`) is written by the same kernel (`QUANT`): its kv-head program also rounds the rotated
key to the model's dtype, takes the head's absmax, and stores the codes and the float32 scale
of the token, as `kit.quantization.kv_cache.quantize_kv` does (IEEE divisions, round half
to even), so a quantized cache costs one kernel instead of the ~15 of the unfused quantize,
scatter and scale writes.

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
from kit.quantization.kv_cache import KV_QMAX, write_kv

__all__ = ["rope_kv_write", "rope_kv_write_reference"]

tl: Any = None  # triton.language, set on the first Triton call
_rotate_store: Any = None  # jit(_rotate_store_fn), set with `tl`: the kernel calls it for q and for k
_quant_store: Any = None  # jit(_quant_store_fn): the 8-bit kernel calls it for k and for v
_fp8_round: Any = None  # jit(_fp8_round_fn), called by _quant_store
_rint: Any = None  # jit(_rint_fn), called by _quant_store and _fp8_round


def _rotate_store_fn(src, dst, i, ok, c, s, HALF: tl.constexpr):
    """Rotate one head by (c, s) in float32 (its halves at src and src + HALF) and store it at dst."""
    a = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(src + HALF + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + i, (a * c - b * s).to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + i, (b * c + a * s).to(dst.dtype.element_ty), mask=ok)


def _rint_fn(y):
    """float32 y rounded half to even, by exact steps only (floor, the fraction, the parity of the floor), the same
    on a GPU and in Triton's interpreter, which has no libdevice.rint."""
    r = tl.floor(y)
    f = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


def _fp8_round_fn(y):
    """float32 y (|y| <= 448) rounded half to even onto the e4m3 grid: a step of 2**(e - 3) for y in [2**e, 2**(e+1)),
    2**-9 below 2**-6 (subnormals): y / step rounded by `_rint` (both scalings by a power of two are exact).
    Triton's interpreter converts to fp8 without carrying a rounded-up mantissa into the exponent (124 -> 64);
    this leaves the conversion nothing to round."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
    inv = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e)
    return _rint(y * inv) * step


def _quant_store_fn(x1, x2, dst, scale_ptr, i, ok, HALF: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr):
    """One head, its halves x1 and x2 (float32), as 8-bit codes at dst and its float32 scale at scale_ptr.

    As `quantize_kv`: scale = max(absmax * float32(1 / QMAX), 1e-12), codes = x / scale (IEEE `div_rn`:
    `/` is approximate on a GPU), int8 rounded half to even (`_rint`) and clamped, fp8 clamped and rounded
    to e4m3's grid (`_fp8_round`)."""
    amax = tl.maximum(tl.max(tl.where(ok, tl.abs(x1), 0.0), 0), tl.max(tl.where(ok, tl.abs(x2), 0.0), 0))
    scale = tl.maximum(amax * (1.0 / QMAX), 1e-12)  # as quantize_kv: a product by float32(1 / QMAX)
    y1 = tl.math.div_rn(x1, scale)
    y2 = tl.math.div_rn(x2, scale)
    if INT8:
        y1 = tl.minimum(tl.maximum(_rint(y1), -QMAX), QMAX)
        y2 = tl.minimum(tl.maximum(_rint(y2), -QMAX), QMAX)
    else:  # e4m3: rounded here to its 3 mantissa bits, half to even, so the conversion below is exact
        y1 = _fp8_round(tl.minimum(tl.maximum(y1, -QMAX), QMAX))
        y2 = _fp8_round(tl.minimum(tl.maximum(y2, -QMAX), QMAX))
    tl.store(dst + i, y1.to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + i, y2.to(dst.dtype.element_ty), mask=ok)
    tl.store(scale_ptr, scale)


def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, inv_ptr, qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_ot, stride_oh, stride_cs, stride_ch, stride_vs, stride_vch, stride_ss, stride_sh,
                    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                    QUANT: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr):
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
            ksrc = k_ptr + t * stride_kt + kvh * stride_kh
            kdst = kc_ptr + slot * stride_cs + kvh * stride_ch
            vsrc = v_ptr + t * stride_vt + kvh * stride_vh
            vdst = vc_ptr + slot * stride_vs + kvh * stride_vch
            if QUANT:  # an 8-bit cache: the rotated key, rounded to the model's dtype as a 16-bit cache would hold
                # it, and the value, quantized per (token, kv head) into the cache and its scales
                a = tl.load(ksrc + i, mask=ok, other=0.0).to(tl.float32)
                b = tl.load(ksrc + HALF + i, mask=ok, other=0.0).to(tl.float32)
                k1 = (a * c - b * s).to(k_ptr.dtype.element_ty).to(tl.float32)
                k2 = (b * c + a * s).to(k_ptr.dtype.element_ty).to(tl.float32)
                s_off = slot * stride_ss + kvh * stride_sh
                _quant_store(k1, k2, kdst, ks_ptr + s_off, i, ok, HALF, QMAX, INT8)
                v1 = tl.load(vsrc + i, mask=ok, other=0.0).to(tl.float32)
                v2 = tl.load(vsrc + HALF + i, mask=ok, other=0.0).to(tl.float32)
                _quant_store(v1, v2, vdst, vs_ptr + s_off, i, ok, HALF, QMAX, INT8)
            else:
                _rotate_store(ksrc, kdst, i, ok, c, s, HALF)
                v1 = tl.load(vsrc + i, mask=ok, other=0.0)
                v2 = tl.load(vsrc + HALF + i, mask=ok, other=0.0)
                tl.store(vdst + i, v1.to(vc_ptr.dtype.element_ty), mask=ok)
                tl.store(vdst + HALF + i, v2.to(vc_ptr.dtype.element_ty), mask=ok)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
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
    if k_cache.dtype in KV_QMAX:
        want = tuple(k_cache.shape[:3])
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc is None or tuple(sc.shape) != want or sc.dtype != torch.float32:
                raise ValueError(f"an {k_cache.dtype} cache needs {name} {want} float32, got "
                                 f"{None if sc is None else (tuple(sc.shape), sc.dtype)}")
        if k_scale.stride() != v_scale.stride():
            raise ValueError("k_scale and v_scale must share strides")
    elif k_cache.element_size() < 2 or not k_cache.is_floating_point():
        raise ValueError(f"rope_kv_write writes 16- or 32-bit caches, or int8 / float8_e4m3fn ones with scales; "
                         f"got {k_cache.dtype}")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"positions and slot_mapping must be ({t},), got {tuple(positions.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    if inv_freq.shape != (d // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be ({d // 2},) float32, got {tuple(inv_freq.shape)} {inv_freq.dtype}")


def _launch(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> torch.Tensor:
    global tl, _rotate_store, _quant_store, _fp8_round, _rint
    tl = triton_module()[1]
    _rotate_store, _quant_store, _fp8_round, _rint = (jit(_rotate_store_fn), jit(_quant_store_fn), jit(_fp8_round_fn),
                                                      jit(_rint_fn))
    t, num_heads, d = q.shape
    num_kv = k.shape[1]
    q_out = torch.empty(t, num_heads, d, dtype=q.dtype, device=q.device)
    if t == 0:
        return q_out
    kc = k_cache.view(-1, num_kv, d)  # (slots, KVH, D)
    vc = v_cache.view(-1, num_kv, d)
    quant = k_cache.dtype in KV_QMAX
    # NOTE: a 16-bit cache passes its own pools where the scales go (unused: QUANT is off)
    ks, vs = (k_scale.view(-1, num_kv), v_scale.view(-1, num_kv)) if quant else (kc[:, :, 0], vc[:, :, 0])
    jit(_rope_kv_kernel)[(t, num_heads + num_kv)](
        q, k, v, positions, inv_freq, q_out, kc, vc, ks, vs, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        ks.stride(0), ks.stride(1), NUM_HEADS=num_heads, HALF=d // 2, HALF_PAD=next_pow2(d // 2),
        QUANT=quant, QMAX=KV_QMAX.get(k_cache.dtype, 1.0), INT8=k_cache.dtype == torch.int8, num_warps=1,
    )
    return q_out


def rope_kv_write_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor,
                            cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused path: `apply_rope` over `rope_cos_sin` tables ((T, 1, D), or computed here), then the scatter
    (an 8-bit cache: `quantize_kv` first, the scales beside the codes)."""
    if cos_sin is None:
        cos, sin = rope_cos_sin(positions, inv_freq, q.dtype)
        cos_sin = cos[:, None, :], sin[:, None, :]
    cos, sin = cos_sin
    q_rot = apply_rope(q, cos, sin)
    k_rot = apply_rope(k, cos, sin)
    write_kv(k_cache, v_cache, slot_mapping, k_rot, v, k_scale, v_scale)
    return q_rot


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None, impl: str = "auto", *,
                  k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate q and k, write rotated k and v into the caches at `slot_mapping`; returns rotated q (T, H, D).

    `cos_sin`: the reference's (T, 1, D) tables when the caller already has them (the Triton
    kernel computes its own). A negative slot skips the token's write. An int8 / float8_e4m3fn
    cache takes its (num_blocks, block_size, KVH) float32 `k_scale` / `v_scale` and is quantized
    on write, one scale per (token, kv head).
    """
    _check(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if resolve_impl(impl, q) == "triton":
        return counted("rope_kv_write", _launch, q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping,
                       k_scale, v_scale)
    return counted("rope_kv_write", rope_kv_write_reference, q, k, v, positions, inv_freq, k_cache, v_cache,
                   slot_mapping, cos_sin, k_scale, v_scale)
