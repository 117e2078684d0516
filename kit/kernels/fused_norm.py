"""Residual add + RMSNorm in one kernel: `residual += x; out = rms_norm(residual, w, eps)`.

In a decoder block the o_proj and the MLP each produce an update of the residual stream
`hidden`, and the next layer normalises the updated stream. Unfused that is an add
kernel, then the norm's kernels (cast to float32, reduce, scale, cast back, multiply by
the weight). Here one program per token row loads both rows once, writes the updated
residual in place and the normalised row beside it. Without `x` it is a plain RMSNorm,
still one kernel.

The numerics are `kit.ops.rms_norm`'s: the sum is rounded to the residual's dtype
before it is normalised (as an unfused add would round it), the statistics are float32,
the normalised row is cast to the dtype before the weight multiplies it.

    fused_add_rms_norm(x, residual, weight, eps, impl="auto")   # (T, N); residual (T, N) updated
    rms_norm_kernel(x, weight, eps, impl="auto")                # (T, N), plain norm
"""

from __future__ import annotations

from typing import Any

import torch

from kit.kernels._triton import jit, next_pow2, resolve_impl, triton_module
from kit.kernels.launches import counted
from kit.ops import rms_norm

__all__ = ["fused_add_rms_norm", "rms_norm_kernel", "fused_add_rms_norm_reference"]

tl: Any = None  # triton.language, set on the first Triton call (see kit/kernels/_triton.py)


def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps,
                         stride_x, stride_r, stride_o,
                         HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    h = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
    if HAS_X:
        # NOTE: a float32 x (a tensor-parallel partial sum reduced in float32) is rounded to the residual's
        # dtype first, as the one GEMM of TP=1 rounds its output: the sum then rounds as TP=1's does
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(h.dtype)
        h = (h.to(tl.float32) + x.to(tl.float32)).to(h.dtype)  # rounded as an unfused add would be
        tl.store(res_ptr + row * stride_r + cols, h, mask=ok)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    y = (hf * rstd).to(h.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    global tl
    tl = triton_module()[1]
    kernel = jit(_add_rms_norm_kernel)
    rows, n = residual.shape
    out = torch.empty_like(residual)
    if rows == 0:
        return out
    block = next_pow2(n)
    kernel[(rows,)](x if x is not None else residual, residual, weight, out, n, float(eps),
                    x.stride(0) if x is not None else 0, residual.stride(0), out.stride(0),
                    HAS_X=x is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out


def _check(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if residual.dim() != 2 or residual.stride(-1) != 1:
        raise ValueError(f"residual must be (num_tokens, hidden) with contiguous rows, got shape "
                         f"{tuple(residual.shape)} strides {residual.stride()}")
    if x is not None and (x.shape != residual.shape or x.dtype not in (residual.dtype, torch.float32)
                          or x.stride(-1) != 1):
        raise ValueError(f"x must match residual {tuple(residual.shape)} {residual.dtype} (or be float32) with "
                         f"contiguous rows, got {tuple(x.shape)} {x.dtype}")
    if weight.shape != (residual.shape[1],):
        raise ValueError(f"weight must be ({residual.shape[1]},), got {tuple(weight.shape)}")


def fused_add_rms_norm_reference(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> torch.Tensor:
    """The same in torch ops: `kit.ops.rms_norm` after an in-place add."""
    if x is not None:
        residual.add_(x.to(residual.dtype))  # a float32 x is rounded first, as the kernel does
    return rms_norm(residual, weight, eps)


def fused_add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       impl: str = "auto") -> torch.Tensor:
    """`residual += x` in place (skipped when x is None), then `rms_norm(residual, weight, eps)`; one kernel."""
    _check(x, residual, weight)
    if resolve_impl(impl, residual) == "triton":
        return counted("fused_add_rms_norm", _launch, x, residual, weight, eps)
    return counted("fused_add_rms_norm", fused_add_rms_norm_reference, x, residual, weight, eps)


def rms_norm_kernel(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """`kit.ops.rms_norm(x, weight, eps)` over rows of a 2-D `x` in one kernel (x is not changed)."""
    return fused_add_rms_norm(None, x, weight, eps, impl)
