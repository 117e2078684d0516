"""SmoothQuant: int8 weights *and* int8 activations (Xiao et al., 2022).

int8 activations fail on LLMs because a few input channels of a linear carry values
100x larger than the rest, in every token: a per-token scale must cover them, and
the ordinary channels round to a handful of levels. Weights, by contrast, are easy.
SmoothQuant moves the difficulty from the activations to the weights with an exact
per-input-channel rescaling,

    y = x @ W^T = (x / s) @ (W * s)^T,     s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

where max|X_j| is channel j's largest activation on calibration data and max|W_j| the
largest weight in column j (over every linear that reads x). alpha = 0.5 splits the
range evenly; alpha -> 1 moves all of it into the weights. `1 / s` is folded into the
preceding RMSNorm's weight (q/k/v, gate/up) or, for o_proj / down_proj, stored as
`pre_quant_scale` and applied to x at run time (TensorRT-LLM's "smoother").

Then: weights int8 with one scale per output row, activations int8 with one dynamic
scale per token, and the GEMM runs on int8 tensor cores with int32 accumulation:

    y = (x_q @ w_q^T) * token_scale[:, None] * weight_scale[None, :]

`QuantAlgo.W8A8` is the same recipe without the smoothing, to compare against.
Stored tensors (`<prefix>.` omitted): `qweight` int8 (out, in), `weight_scale` float32
(out,), and `pre_quant_scale` float32 (in,) where no norm could absorb 1 / s.
"""

from __future__ import annotations

import torch

from kit.quantization.int8_weight_only import quantize_per_token, quantize_weight

__all__ = ["smooth_scales", "int8_linear_reference", "quantize_linear"]

_EPS = 1e-5


def smooth_scales(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (in,) float32 from calibration act_max (in,) and the linears `weights` (each (out_i, in)).

    A channel never active in calibration (act_max = 0) keeps s = 1.
    """
    w_max = torch.cat([w.float() for w in weights], 0).abs().amax(dim=0).clamp(min=_EPS)  # (in,)
    a = act_max.float().clamp(min=_EPS)
    s = (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=_EPS)
    return torch.where(act_max > 0, s, torch.ones_like(s))


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """What a W8A8 GEMM computes, exactly, in float32: per-token int8 x, int32 accumulation.

    x (T, in) float; qweight int8 (out, in); weight_scale (out,). Returns (T, out) float32.
    """
    xq, xs = quantize_per_token(x)
    # NOTE: int8 x int8 products summed over `in` are integers below 127^2 * in < 2^53, so the
    # float64 GEMM is exact: the same int32 accumulator a GPU computes (and it runs on any device)
    acc = xq.double() @ qweight.double().T  # (T, out)
    return (acc * xs.double() * weight_scale.double()[None, :]).float()


def quantize_linear(w: torch.Tensor, pre_quant_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of one (already smoothed) linear (names after `<prefix>.`)."""
    q, s = quantize_weight(w)
    out = {"qweight": q, "weight_scale": s}
    if pre_quant_scale is not None:
        out["pre_quant_scale"] = pre_quant_scale.float()
    return out
