"""int8 weights, one scale per output channel (`W8A16`, and the weight half of W8A8).

Symmetric round-to-nearest: each row of the (out, in) weight gets the scale that maps
its largest magnitude to 127, and every weight becomes the nearest multiple of it:

    scale_o = max_i |W[o, i]| / 127        q[o, i] = round(W[o, i] / scale_o) in [-127, 127]

The rounding error of a weight is at most scale_o / 2, i.e. at most 1/254 of its row's
largest weight; for Gaussian-like rows that is a relative (Frobenius) error of about
0.5 %. Weight-only: the GEMM dequantizes `q * scale` to the compute dtype (bf16) and
multiplies as usual, so memory traffic halves while the math stays 16-bit. For a
fused projection the rows of q, k and v simply stack, each row keeping its own scale.

Stored tensors (`<prefix>.` omitted): `qweight` int8 (out, in), `weight_scale`
float32 (out,).
"""

from __future__ import annotations

import torch

__all__ = ["INT8_MAX", "quantize_weight", "dequantize_weight", "quantize_per_token", "quantize_linear"]

INT8_MAX = 127
_MIN_SCALE = 1e-12


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (qweight int8 (out, in), weight_scale float32 (out,))."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / INT8_MAX).clamp(min=_MIN_SCALE)  # (out,)
    q = torch.round(wf / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 (out, in) = q * scale[:, None]."""
    return q.float() * scale.float()[:, None]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x (T, in) -> (int8 (T, in), scale float32 (T, 1)).

    Each token (row) gets its own scale, computed at run time from its own amax: the
    activation half of W8A8 and SmoothQuant.
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_MIN_SCALE)
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_linear(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear (names after `<prefix>.`)."""
    q, s = quantize_weight(w)
    return {"qweight": q, "weight_scale": s}
