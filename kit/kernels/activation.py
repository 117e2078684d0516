"""SiLU × mul in one kernel over the gate_up GEMM's output: `silu(gate) * up`.

The MLP's gate and up projections are one GEMM whose output holds `gate` in its first
`inter` columns and `up` in the next `inter`. Unfused, `kit.ops.swiglu` is a SiLU kernel
and a multiply kernel; here one kernel reads both halves once and writes the product.
Numerics as `kit.ops.swiglu` in the input dtype: SiLU in float32 rounded to the dtype,
then the product rounded again.

    silu_mul(gate_up, impl="auto")   # (T, 2 * inter) -> (T, inter)
"""

from __future__ import annotations

from typing import Any

import torch

from kit.kernels._triton import jit, resolve_impl, triton_module
from kit.kernels.launches import counted
from kit.ops import swiglu

__all__ = ["silu_mul", "silu_mul_reference"]

tl: Any = None  # triton.language, set on the first Triton call
BLOCK = 1024


def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=ok, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # silu, rounded as F.silu's output is
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(gate_up: torch.Tensor) -> torch.Tensor:
    global tl
    tl = triton_module()[1]
    kernel = jit(_silu_mul_kernel)
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    kernel[(rows, -(-inter // BLOCK))](gate_up, out, inter, gate_up.stride(0), out.stride(0), BLOCK=BLOCK,
                                       num_warps=4)
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu(gate, up)


def silu_mul(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """`swiglu(gate, up)` of `gate_up = [gate | up]` (T, 2 * inter) -> (T, inter), in one kernel."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be (num_tokens, 2 * intermediate) with contiguous rows, got shape "
                         f"{tuple(gate_up.shape)} strides {gate_up.stride()}")
    if resolve_impl(impl, gate_up) == "triton":
        return counted("silu_mul", _launch, gate_up)
    return counted("silu_mul", silu_mul_reference, gate_up)
