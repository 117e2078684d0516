"""A GEMV for decode steps of a few tokens: `y = x @ W^T` with x (M, K), M <= 4, W (N, K), in one kernel.

At batch 1 a projection reads its whole weight to multiply one row: the time is the weight's bytes over
the memory bandwidth, plus the kernel's start and its tail. cuBLAS's kernels for M = 1 reach ~90 % of the
copy bandwidth on big MLP weights but ~30-60 % on the 8-34 MB of q/k/v, o_proj and down of a 1B model.
Each program here owns `BLOCK_N` rows of W and walks K in `BLOCK_K` steps, loading each weight tile once
for every row of x: coalesced along K, float32 sums, the result rounded once to x's dtype.

What it showed (`bench/gemv.py`, `bench/results/gemv_h200.json`, H200, 24 tiles swept): at M = 1 it
matches cuBLAS within about 10 % (1B o_proj 5.5 against 6.1 us, down 16.3 against 13.4; 8B o_proj 11.3
against 13.3), and at M = 4 it is up to 2.7x slower. A projection of a few MB costs ~5.5 us whoever
writes it: kernel start and tail, not bytes. So the engine keeps cuBLAS; the kernel stays as the
measured experiment (and a reference a notebook can run).

    gemv(x, weight, config=None, impl="auto")   # (M, K) @ (N, K)^T -> (M, N)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kit.kernels._triton import jit, resolve_impl, triton_module

__all__ = ["GemvConfig", "gemv", "MAX_GEMV_ROWS"]

tl: Any = None  # triton.language, set on the first Triton call
MAX_GEMV_ROWS = 4


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym,
                 M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok_n = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        ok_k = k < K
        w = tl.load(w_rows + k[None, :], mask=ok_n[:, None] & ok_k[None, :], other=0.0).to(tl.float32)
        x0 = tl.load(x_ptr + k, mask=ok_k, other=0.0).to(tl.float32)
        acc0 += tl.sum(w * x0[None, :], axis=1)
        if M > 1:
            x1 = tl.load(x_ptr + stride_xm + k, mask=ok_k, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * x1[None, :], axis=1)
        if M > 2:
            x2 = tl.load(x_ptr + 2 * stride_xm + k, mask=ok_k, other=0.0).to(tl.float32)
            acc2 += tl.sum(w * x2[None, :], axis=1)
        if M > 3:
            x3 = tl.load(x_ptr + 3 * stride_xm + k, mask=ok_k, other=0.0).to(tl.float32)
            acc3 += tl.sum(w * x3[None, :], axis=1)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rows, acc0.to(out_ty), mask=ok_n)
    if M > 1:
        tl.store(y_ptr + stride_ym + rows, acc1.to(out_ty), mask=ok_n)
    if M > 2:
        tl.store(y_ptr + 2 * stride_ym + rows, acc2.to(out_ty), mask=ok_n)
    if M > 3:
        tl.store(y_ptr + 3 * stride_ym + rows, acc3.to(out_ty), mask=ok_n)


def _launch(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    global tl
    tl = triton_module()[1]
    kernel = jit(_gemv_kernel)
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    kernel[(-(-n // config.block_n),)](x, weight, y, n, k, x.stride(0), weight.stride(0), y.stride(0), M=m,
                                       BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                       num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None,
         impl: str = "auto") -> torch.Tensor:
    """`x @ weight.T` for 1..4 rows of x, in x's dtype (float32 sums, one rounding)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv: x must be (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not 1 <= x.shape[0] <= MAX_GEMV_ROWS:
        raise ValueError(f"gemv: x has {x.shape[0]} rows; this kernel takes 1..{MAX_GEMV_ROWS}")
    if x.dtype != weight.dtype or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError(f"gemv: x and weight must share a dtype and have contiguous rows, got {x.dtype} "
                         f"{x.stride()} and {weight.dtype} {weight.stride()}")
    if resolve_impl(impl, x) == "triton":
        return _launch(x, weight, config or GemvConfig())
    return F.linear(x.float(), weight.float()).to(x.dtype)
