"""Dequantize a weight-only weight to bf16 in one Triton pass: the prefill half of W8A16 / W4A16.

At large M (prefill) a GEMM reads each weight once for many tokens, so it is bound by
the tensor cores, not by the weight bytes: there, the weight is dequantized to the
compute dtype once per call and cuBLAS does the GEMM (the small-M half, where the bytes
matter, is `stream_gemm.py`). The kernel reads the run-time layouts of
`weight_layout.py`:

* int8 (N, K) with a float32 scale a row: w = q * s;
* int4 int32 words (N, K/8) (column 8i + b in nibble b of word i), float16 scales
  (K/G, N) (and uint8 zero points (K/G, N)): one program per (BLOCK_N rows, one group),
  which repeats each word 8 times in registers and takes nibble c % 8 for column c:
  w = (u - z) * s (z = 8 when symmetric).

Imported by `linear.py` when triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dequantize"]


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn,
                       INT4: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    if INT4:  # program_id(1) is the group
        g = tl.program_id(1)
        offs_w = tl.arange(0, GROUP // 8)
        p = tl.load(w_ptr + rows * stride_wn + g * (GROUP // 8) + offs_w[None, :], mask=mask_n[:, None], other=0)
        p = tl.interleave(p, p)
        p = tl.interleave(p, p)
        p = tl.interleave(p, p)  # (BLOCK_N, GROUP): word c // 8 at column c
        offs_g = tl.arange(0, GROUP)
        u = (p >> ((offs_g % 8) * 4)[None, :]) & 0xF
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None]
        else:
            z = 8.0
        w = (u.to(tl.float32) - z) * s
        tl.store(out_ptr + rows * K + g * GROUP + offs_g[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None])
    else:
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_n[:, None] & (offs_k[None, :] < K)
        q = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int, group_size: int,
               out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) in `dtype` from the run-time layout (`weight_layout.py`), in one pass."""
    N, K = out_features, in_features
    out = torch.empty(N, K, device=w.device, dtype=dtype)
    z = zero if zero is not None else scale
    bn = 64
    if bits == 4:
        grid = (triton.cdiv(N, bn), K // group_size)
        bk = group_size
    else:
        bk = 128
        grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
    _dequantize_kernel[grid](w, scale, z, out, N, K, w.stride(0), INT4=bits == 4,
                             GROUP=group_size if bits == 4 else 0, HAS_ZERO=zero is not None,
                             BLOCK_N=bn, BLOCK_K=bk)
    return out
