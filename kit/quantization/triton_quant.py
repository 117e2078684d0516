"""Fused Triton kernels around the 8-bit tensor-core GEMMs: activation quantization and
the W8A8 epilogue.

`torch._scaled_mm` (FP8) and `torch._int_mm` (int8) are single cuBLAS calls, but what
surrounds them in plain PyTorch is a chain of small elementwise kernels (cast, amax,
divide, clamp, round, cast; then int32 -> float, times token scale, times channel
scale, cast). At decode sizes each costs a launch and a round trip through memory,
more than the GEMM itself. Two kernels replace the chains:

* `quantize_rows(x, ...)`: one program per token row: optional smoothing
  (x * pre_quant_scale), the row's amax (dynamic per-token scale) or a given static
  scale, and the rounded / saturated int8 or float8_e4m3 codes; returns the codes and
  a (T, 1) float32 scale, the layout row-wise `_scaled_mm` wants.
* `int8_epilogue(acc, token_scale, channel_scale, bias, dtype)`: y = acc * ts * cs (+ b).

int8 rounding here is half away from zero (floor(v + 0.5) on |v|), the CPU reference's
`torch.round` is half to even: they differ only on exact ties. Imported only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize_rows", "int8_epilogue"]

_FP8_MAX = 448.0
_INT8_MAX = 127.0


@triton.jit
def _quantize_rows_kernel(x_ptr, pqs_ptr, static_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                          HAS_PQS: tl.constexpr, STATIC: tl.constexpr, TO_FP8: tl.constexpr,
                          QMAX: tl.constexpr, BLOCK: tl.constexpr):
    # one program holds one whole token row in registers (BLOCK >= K): read once, written once
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    v = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PQS:
        v = v * tl.load(pqs_ptr + offs, mask=mask, other=0.0)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        scale = tl.maximum(tl.max(tl.abs(v), axis=0) / QMAX, 1e-12)
    tl.store(s_ptr + row, scale)
    v = tl.minimum(tl.maximum(v / scale, -QMAX), QMAX)
    if TO_FP8:
        q = v.to(tl.float8e4nv)
    else:
        q = tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5)).to(tl.int8)
    tl.store(q_ptr + row * stride_qm + offs, q, mask=mask)


def quantize_rows(x: torch.Tensor, *, to_fp8: bool, static_scale: torch.Tensor | None = None,
                  pre_quant_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, K) -> (codes (T, K) float8_e4m3fn or int8, scale (T, 1) float32).

    `static_scale` (1,) float32 gives every row that scale (FP8 per-tensor); without it
    each row gets amax / qmax. `pre_quant_scale` (K,) float32 multiplies x first.
    """
    x = x.contiguous()
    T, K = x.shape
    q = torch.empty(T, K, device=x.device, dtype=torch.float8_e4m3fn if to_fp8 else torch.int8)
    s = torch.empty(T, 1, device=x.device, dtype=torch.float32)
    dummy = s
    block = triton.next_power_of_2(K)
    _quantize_rows_kernel[(T,)](
        x, pre_quant_scale if pre_quant_scale is not None else dummy,
        static_scale if static_scale is not None else dummy, q, s, K, x.stride(0), q.stride(0),
        HAS_PQS=pre_quant_scale is not None, STATIC=static_scale is not None, TO_FP8=to_fp8,
        QMAX=_FP8_MAX if to_fp8 else _INT8_MAX, BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return q, s


@triton.jit
def _int8_epilogue_kernel(acc_ptr, ts_ptr, cs_ptr, b_ptr, y_ptr, M, N, stride_am, stride_ym,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.load(acc_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    ts = tl.load(ts_ptr + offs_m, mask=offs_m < M, other=0.0)
    cs = tl.load(cs_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc * ts[:, None] * cs[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def int8_epilogue(acc: torch.Tensor, token_scale: torch.Tensor, channel_scale: torch.Tensor,
                  bias: torch.Tensor | None, dtype: torch.dtype, rows: int | None = None) -> torch.Tensor:
    """acc (>= rows, N) int32, token_scale (rows, 1), channel_scale (N,) -> y (rows, N) in dtype."""
    M = rows if rows is not None else acc.shape[0]
    N = acc.shape[1]
    y = torch.empty(M, N, device=acc.device, dtype=dtype)
    bm, bn = 16, 256
    _int8_epilogue_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
        acc, token_scale, channel_scale, bias if bias is not None else channel_scale, y, M, N,
        acc.stride(0), y.stride(0), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn)
    return y
