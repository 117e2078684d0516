"""FP8 (float8_e4m3fn) weights and activations, as Hopper's tensor cores take them.

float8_e4m3fn has 4 exponent bits and 3 mantissa bits: magnitudes up to 448, about
two significant decimal digits everywhere in range (a *relative* precision of 2^-4,
unlike int8's fixed absolute step). So FP8 needs only a scale that brings a tensor's
largest magnitude to 448, and no clipping search:

    scale = amax / 448        q = fp8(clamp(x / scale, -448, 448))        x ~ q * scale

Two recipes (TensorRT-LLM names):

* `FP8` — per-tensor. One scale for the whole weight (`weight_scale`, shape (1,)) and
  one *static* scale for the activations (`input_scale`, shape (1,)) measured on
  calibration data (amax of the linear's input over every calibration token). The
  GEMM is `y = (x_q @ w_q^T) * input_scale * weight_scale`.
* `FP8_PER_CHANNEL_PER_TOKEN` — one scale per output row of the weight
  (`weight_scale`, shape (out,)) and a *dynamic* scale per token computed on the fly
  from the token's own amax: no calibration, and robust to outlier tokens.

Stored tensors (`<prefix>.` omitted): `qweight` float8_e4m3fn (out, in),
`weight_scale` float32 (1,) or (out,), `input_scale` float32 (1,) (per-tensor only).
"""

from __future__ import annotations

import torch

__all__ = ["FP8_MAX", "FP8_DTYPE", "quantize_weight_per_tensor", "quantize_weight_per_channel",
           "quantize_static", "quantize_per_token", "activation_scale", "dequantize", "quantize_linear"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
_MIN_SCALE = 1e-12  # an all-zero tensor still gets a finite scale


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # NOTE: casting a value beyond +-448 to e4m3fn gives NaN, not saturation: clamp first
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight fp8 (out, in), weight_scale float32 (1,)) with one scale for the whole matrix."""
    scale = (w.float().abs().amax() / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1)
    return _to_fp8(w, scale), scale


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight fp8 (out, in), weight_scale float32 (out,)) with one scale per output row."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)  # (out,)
    return _to_fp8(w, scale[:, None]), scale


def activation_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The static per-tensor input scale (float32 (1,)) for a calibrated amax."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / FP8_MAX).clamp(min=_MIN_SCALE).reshape(1)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (T, in) -> fp8 with a given per-tensor scale (values beyond it saturate at 448)."""
    return _to_fp8(x, scale)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, in) -> (fp8 (T, in), scale float32 (T, 1)): one dynamic scale per token (row)."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)
    return _to_fp8(x, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale; `scale` is (1,) per-tensor, (out,) per row of a weight, or (T, 1) per token."""
    if scale.dim() == 1 and scale.numel() > 1:
        scale = scale[:, None]
    return q.float() * scale


def quantize_linear(w: torch.Tensor, *, per_channel: bool, input_amax: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
    """The stored tensors of one linear (names after `<prefix>.`)."""
    if per_channel:
        q, s = quantize_weight_per_channel(w)
        return {"qweight": q, "weight_scale": s}
    if input_amax is None:
        raise ValueError("FP8 per-tensor quantization needs the calibrated input amax (input_amax)")
    q, s = quantize_weight_per_tensor(w)
    return {"qweight": q, "weight_scale": s, "input_scale": activation_scale(input_amax)}
